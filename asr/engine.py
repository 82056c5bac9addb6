"""The Whisper backend of the ASR service: pools of models behind the scheduler.

A pool names the model for finals, optionally a faster model and a shorter window for
partials, and the languages it serves. Engines are loaded once per (model, precision)
and shared by the pools that use them. Everything here runs in the scheduler's worker
thread; nothing touches the event loop.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backend import LidResult, Recognition
from .scheduler import Job
from .whisper import mel as melmod
from .whisper.decoding import Utterance, WhisperEngine
from .whisper.streaming import (
    EnginePartialDecoder,
    LocalAgreement,
    PartialJob,
    trim_repetition,
    word_boundary,
)
from .whisper.tokenizer import WhisperTokenizer

log = logging.getLogger("voxgate.asr.engine")

PARTIAL_TOKENS_PER_S = 8.0  # a partial's token budget: speech is ~3 tokens/s ...
PARTIAL_EXTRA_TOKENS = 8  # ... so a looping partial stops early instead of at 224

# Whisper's own rule for "this window is silence": a likely no-speech token and a
# decode it was not sure of. Without it, silence comes back as "Thank you." and kin.
NO_SPEECH_PROB = 0.6
LOGPROB_THRESHOLD = -1.0


@dataclass(frozen=True)
class PoolSpec:
    """One recognition pool.

    Args:
        model: model for finals (``base`` or ``tiny.en``).
        languages: languages it serves; ``("*",)`` is any (language detected).
        partial_model: model for partials (default: ``model``).
        partial_window_s: partials pad to this many seconds instead of 30 (a shorter
            window is cheaper; the growing audio must fit).
        final_window_s: finals pad to this many seconds (longer utterances to their
            length). 30 is Whisper's own window and the safe default; on the
            pocketsphinx set base keeps its WER at 15 (``bench/asr_quality.py
            --partial-windows``), which halves a final's encoder cost.
        precision: ``int8`` or ``fp32``.
        beam_size: beam for finals (partials are always greedy).
    """

    model: str = "base"
    languages: tuple[str, ...] = ("*",)
    partial_model: str | None = None
    partial_window_s: float = 30.0
    final_window_s: float = 30.0
    precision: str = "int8"
    beam_size: int = 1

    def __post_init__(self) -> None:
        if self.model.endswith(".en") and self.languages != ("en",):
            raise ValueError(f"{self.model} is English-only: languages must be ['en']")
        if not 1.0 <= self.partial_window_s <= 30.0:
            raise ValueError("partial_window_s must be between 1 and 30")
        if not 5.0 <= self.final_window_s <= 30.0:
            raise ValueError("final_window_s must be between 5 and 30")
        if not 1 <= self.beam_size <= 5:
            raise ValueError("beam_size must be between 1 and 5")


# Chosen with bench/asr_server.py (2 cores, real-time streams; see the project notes):
# English finals on base at a 15 s window (same WER as 30 s on the pocketsphinx set,
# half the encoder cost) with tiny.en partials at 15 s gave the lowest final and
# first-partial latency of the strategies measured. Other languages keep Whisper's
# 30 s window for finals (15 s was measured on English only) and cheaper 10 s partials.
# Language ID runs the encoder on a 10 s window, not 30 s: on this 2-core machine that took
# a request from ~1.5 s to ~0.4 s under load, and on LibriVox speech it answered en at
# 0.88-1.00 from 1 s of speech on either window.
LID_WINDOW_S = 10.0

DEFAULT_POOLS: dict[str, PoolSpec] = {
    "en": PoolSpec(model="base", languages=("en",), partial_model="tiny.en",
                   partial_window_s=15.0, final_window_s=15.0),
    "multi": PoolSpec(model="base", languages=("*",), partial_window_s=10.0),
}
DEFAULT_POOL = "multi"


def load_pools(path: str | Path) -> tuple[dict[str, PoolSpec], str]:
    """Read pools from TOML: ``default = "multi"`` and ``[pools.<name>]`` tables.

    Raises:
        ValueError: unknown keys or invalid values, naming the pool.
    """
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    pools: dict[str, PoolSpec] = {}
    for name, table in data.get("pools", {}).items():
        try:
            if "languages" in table:
                table = {**table, "languages": tuple(table["languages"])}
            pools[name] = PoolSpec(**table)
        except TypeError as exc:
            raise ValueError(f"pool {name!r}: {exc}") from exc
    if not pools:
        raise ValueError(f"{path}: no [pools.<name>] tables")
    default = data.get("default", next(iter(pools)))
    if default not in pools:
        raise ValueError(f"default pool {default!r} is not defined")
    return pools, default


class StablePartials:
    """Local agreement over one utterance's partial hypotheses (asr.whisper.streaming).

    A token prefix becomes stable once two consecutive hypotheses agree on it (cut back
    to a word boundary); the next decode is forced to start with it, so each re-decode
    only generates the unstable tail, and shown text never retracts what was stable.
    """

    def __init__(self, tok: WhisperTokenizer) -> None:
        self.tok = tok
        self.policy = LocalAgreement(2, word_boundary(tok))

    @property
    def prefix(self) -> tuple[int, ...]:
        return self.policy.committed

    def update(self, result: Recognition) -> str:
        tokens, looped = trim_repetition(result.tokens)
        stable, tail = self.policy.update(tokens, trusted=result.finished and not looped)
        return self.tok.decode(stable + tail).strip()


@dataclass
class WhisperBackend:
    """Implements ``asr.backend.Backend`` with the ONNX Whisper engines."""

    pools_spec: dict[str, PoolSpec] = field(default_factory=lambda: dict(DEFAULT_POOLS))
    default_pool: str = DEFAULT_POOL
    threads: int = 2
    _engines: dict[tuple[str, str], WhisperEngine] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.default_pool not in self.pools_spec:
            raise ValueError(f"default pool {self.default_pool!r} is not defined")

    # -- Backend ---------------------------------------------------------------------

    def pools(self) -> dict[str, tuple[str, ...]]:
        return {name: spec.languages for name, spec in self.pools_spec.items()}

    def select_pool(self, lang_hint: str, domain: str) -> str | None:
        """A pool named by ``domain``, else one serving ``lang_hint``, else the default."""
        if domain and domain != "default":
            return domain if domain in self.pools_spec else None
        hint = lang_hint.lower()
        if hint and hint != "auto":
            for name, spec in self.pools_spec.items():
                if hint in spec.languages:
                    return name
            for name, spec in self.pools_spec.items():
                if "*" in spec.languages and not spec.model.endswith(".en"):
                    return name
            return None
        return self.default_pool

    def lid_pool(self) -> str | None:
        for name, spec in self.pools_spec.items():
            if not spec.model.endswith(".en"):
                return name
        return None

    def engine(self, model: str, precision: str) -> WhisperEngine:
        key = (model, precision)
        if key not in self._engines:
            log.info("loading %s (%s)", model, precision)
            self._engines[key] = WhisperEngine.load(model, precision=precision,
                                                    threads=self.threads)
        return self._engines[key]

    def run_batch(self, pool: str, jobs: Sequence[Job]) -> list[Recognition | LidResult]:
        spec = self.pools_spec[pool]
        out: dict[int, Recognition | LidResult] = {}
        groups: dict[str, list[int]] = {"final": [], "partial": [], "lid": []}
        for i, job in enumerate(jobs):
            groups[job.kind].append(i)
        if groups["lid"]:
            engine = self.engine(spec.model, spec.precision)
            for i in groups["lid"]:
                res = engine.detect_language(jobs[i].audio, top_k=5,
                                             min_window_s=LID_WINDOW_S)
                out[i] = LidResult(res.lang, res.prob, res.top, res.no_speech_prob)
        if groups["final"]:
            self._finals(spec, jobs, groups["final"], out)
        if groups["partial"]:
            self._partials(spec, jobs, groups["partial"], out)
        return [out[i] for i in range(len(jobs))]

    def _language(self, spec: PoolSpec, model: str, job: Job) -> str | None:
        lang = job.options.get("lang") or self._fixed_language(spec, model)
        return None if lang in (None, "", "auto") else str(lang)

    def _finals(self, spec: PoolSpec, jobs: Sequence[Job], idx: list[int],
                out: dict[int, Recognition | LidResult]) -> None:
        engine = self.engine(spec.model, spec.precision)
        items = [Utterance(jobs[i].audio[: melmod.N_SAMPLES], 0.0,
                           self._language(spec, spec.model, jobs[i]),
                           jobs[i].options.get("prompt")) for i in idx]
        longest = max(len(u.audio) for u in items)
        frames = min(melmod.N_FRAMES, max(
            int(spec.final_window_s * melmod.SAMPLE_RATE / melmod.HOP_LENGTH),
            -(-longest // melmod.HOP_LENGTH)))
        results = engine.transcribe_batch(items, beam_size=spec.beam_size,
                                          pad_to_frames=frames + frames % 2)
        for i, t in zip(idx, results, strict=True):
            silent = t.no_speech_prob > NO_SPEECH_PROB and t.avg_logprob < LOGPROB_THRESHOLD
            out[i] = Recognition("" if silent else t.text, t.lang, t.no_speech_prob,
                                 t.tokens)

    def _partials(self, spec: PoolSpec, jobs: Sequence[Job], idx: list[int],
                  out: dict[int, Recognition | LidResult]) -> None:
        model = spec.partial_model or spec.model
        engine = self.engine(model, spec.precision)
        window = int(spec.partial_window_s * melmod.SAMPLE_RATE / melmod.HOP_LENGTH)
        pjobs = []
        for i in idx:
            job = jobs[i]
            audio = job.audio[: melmod.N_SAMPLES]
            frames = min(melmod.N_FRAMES, max(window, -(-audio.size // melmod.HOP_LENGTH)))
            prefix = tuple(job.options.get("prefix", ()))
            budget = int(np.ceil(audio.size / melmod.SAMPLE_RATE * PARTIAL_TOKENS_PER_S))
            pjobs.append(PartialJob(
                audio=audio, window_frames=frames + frames % 2, prefix=prefix,
                language=self._language(spec, model, job), prompt=job.options.get("prompt"),
                max_new_tokens=max(1, budget + PARTIAL_EXTRA_TOKENS - len(prefix))))
        for i, r in zip(idx, EnginePartialDecoder(engine).decode_partials(pjobs),
                        strict=True):
            silent = r.no_speech_prob > NO_SPEECH_PROB and r.avg_logprob < LOGPROB_THRESHOLD
            out[i] = Recognition("" if silent else r.text.strip(), r.language,
                                 r.no_speech_prob, () if silent else r.tokens, r.finished)

    def partial_policy(self, pool: str) -> StablePartials:
        spec = self.pools_spec[pool]
        return StablePartials(self.engine(spec.partial_model or spec.model, spec.precision).tok)

    @staticmethod
    def _fixed_language(spec: PoolSpec, model: str) -> str | None:
        if model.endswith(".en"):
            return "en"
        if len(spec.languages) == 1 and spec.languages[0] != "*":
            return spec.languages[0]
        return None

    def warmup(self) -> None:
        """Load every engine and run each path once (finals, partials, LID)."""
        silence = np.zeros(16000, dtype=np.float32)
        for name in self.pools_spec:
            jobs: list[Job] = [
                Job("final", name, silence, key=None),
                Job("partial", name, silence, key=None),
            ]
            self.run_batch(name, jobs)
        lid = self.lid_pool()
        if lid is not None:
            self.run_batch(lid, [Job("lid", lid, silence, key=None)])

    def describe(self) -> dict[str, Any]:
        return {name: {"model": s.model, "languages": list(s.languages),
                       "partial_model": s.partial_model or s.model,
                       "partial_window_s": s.partial_window_s,
                       "final_window_s": s.final_window_s, "precision": s.precision}
                for name, s in self.pools_spec.items()}
