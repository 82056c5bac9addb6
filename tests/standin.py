"""A stand-in recognition engine and a helper that starts the ASR service around it."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import trio

from asr.backend import LidResult, Recognition
from asr.scheduler import Job
from asr.server import AsrApp, AsrServerConfig, serve


class StandInEngine:
    """Answers with the duration it heard, so tests can check what audio arrived.

    Knows a few languages (``LANGUAGES``); a job whose ``lang`` option is another one
    fails alone, as the Whisper engine's does.
    """

    LANGUAGES = frozenset({"en", "nl", "de", "fr", "es"})

    def __init__(self, delay_s: float = 0.0, *, lid: tuple[str, float] = ("en", 0.9),
                 lid_delay_s: float = 0.0, job_delay_s: float = 0.0) -> None:
        self.delay_s = delay_s  # per batch
        self.job_delay_s = job_delay_s  # per partial or final: a CPU-bound engine's cost
        self.lid = lid  # what /v1/lid answers
        self.lid_delay_s = lid_delay_s
        self.batches: list[tuple[str, int]] = []
        self.lid_requests: list[int] = []  # samples per language-ID request

    def pools(self) -> dict[str, tuple[str, ...]]:
        return {"en": ("en",), "multi": ("*",)}

    def select_pool(self, lang_hint: str, domain: str) -> str | None:
        if domain not in ("default", ""):
            return None
        return "en" if lang_hint in ("", "en") else "multi"

    def lid_pool(self) -> str | None:
        return "multi"

    def run_batch(self, pool: str, jobs: Sequence[Job]
                  ) -> list[Recognition | LidResult | Exception]:
        time.sleep(self.delay_s)
        self.batches.append((pool, len(jobs)))
        out: list[Recognition | LidResult | Exception] = []
        for j in jobs:
            if j.kind == "lid":
                time.sleep(self.lid_delay_s)
                self.lid_requests.append(len(j.audio))
                lang, score = self.lid
                out.append(LidResult(lang, score, ((lang, score), ("nl", min(0.05, 1 - score)))))
            elif (time.sleep(self.job_delay_s) or
                  j.options.get("lang", "en") not in self.LANGUAGES):
                out.append(ValueError(f"unsupported language {j.options['lang']!r}"))
            else:
                rms = float(np.sqrt(np.mean(j.audio ** 2))) if len(j.audio) else 0.0
                out.append(Recognition(f"{len(j.audio) / 16000:.2f}s rms={rms:.3f}",
                                       j.options.get("lang", "en")))
        return out

    def normalize_language(self, code: str) -> str:
        """``"en-US"`` -> ``"en"``; ValueError for a malformed or unknown code."""
        m = re.fullmatch(r"([A-Za-z]{2,3})(?:[-_][A-Za-z0-9]{2,8})*", code)
        if m is None:
            raise ValueError(f"{code!r} is not a language code")
        lang = m.group(1).lower()
        if lang not in self.LANGUAGES:
            raise ValueError(f"unknown language {lang!r}")
        return lang

    def partial_policy(self, pool: str) -> None:
        return None

    def warmup(self) -> None:
        pass


class WorkerStandIn(StandInEngine):
    """A stand-in that also reports health, as the inference-worker backend does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.health_report: dict[str, Any] = {"ok": True, "workers": 2, "restarts": 0}

    def health(self) -> dict[str, Any]:
        return dict(self.health_report)


async def start_asr(nursery: trio.Nursery, engine: StandInEngine, **cfg: object
                        ) -> tuple[AsrApp, int, trio.Event]:
    shutdown = trio.Event()
    config = AsrServerConfig(port=0, **cfg)  # type: ignore[arg-type]
    app, port = await nursery.start(functools.partial(serve, engine, config,
                                                      shutdown=shutdown))
    await app.ready_event.wait()
    return app, port, shutdown


