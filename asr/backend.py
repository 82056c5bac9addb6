"""What the ASR server needs from a recognition engine (the Whisper engine implements it).

Keeping this small lets the HTTP/2 shell be tested with any engine, and lets ops plug in
another model family without touching the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .scheduler import Job


@dataclass(frozen=True)
class Recognition:
    """The text of one utterance (partial or final).

    ``finished``: the decode ended on its own (False: it hit its token budget, so a
    partial may be looping and must not make text stable).
    """

    text: str
    lang: str
    no_speech_prob: float = 0.0
    tokens: tuple[int, ...] = ()
    finished: bool = True


class PartialPolicy(Protocol):
    """Turns successive partial hypotheses of one utterance into steady text: what it
    calls stable is forced onto later decodes, and retracted only when an unforced
    re-check on grown audio disagrees (``asr.engine.StablePartials``)."""

    @property
    def prefix(self) -> tuple[int, ...]:
        """Tokens now stable: the next partial decode may be forced to start with them."""
        ...

    def prefix_for(self, samples: int) -> tuple[int, ...]:
        """The prefix to force on a decode of ``samples`` of audio: ``prefix``, or none
        when this decode re-checks it."""
        ...

    def update(self, result: Recognition) -> str:
        """The text to show for this hypothesis."""
        ...


@dataclass(frozen=True)
class LidResult:
    """Language identification: the best language, its probability and the top list."""

    lang: str
    score: float
    top: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    no_speech_prob: float = 0.0


class Backend(Protocol):
    """A recognition engine behind the scheduler."""

    def pools(self) -> dict[str, tuple[str, ...]]:
        """Pool name -> languages it serves (``("*",)`` for every language)."""
        ...

    def select_pool(self, lang_hint: str, domain: str) -> str | None:
        """The pool for a stream, or None when no pool fits."""
        ...

    def lid_pool(self) -> str | None:
        """The pool whose model answers language ID, or None without one."""
        ...

    def run_batch(self, pool: str, jobs: Sequence[Job]
                  ) -> Sequence[Recognition | LidResult | Exception]:
        """Run ``jobs`` (all of ``pool``) at once; called in a worker thread.

        Job kinds: ``partial`` and ``final`` return ``Recognition``; ``lid`` returns
        ``LidResult``. ``job.options`` may carry ``lang`` and ``prompt``. An
        ``Exception`` instance in a job's slot fails that job alone (its stream gets an
        error, the other jobs their results); raising fails the whole batch.
        """
        ...

    def partial_policy(self, pool: str) -> PartialPolicy | None:
        """A fresh stable-prefix policy for one utterance (None: show raw hypotheses)."""
        ...

    def warmup(self) -> None:
        """Run each model once so the first user does not pay for lazy init."""
        ...


# Optional backend methods. The server calls them only when the backend has them, so a
# backend (or a stand-in in tests) may leave them out.


@runtime_checkable
class LanguageNormalizer(Protocol):
    """A backend that can validate a ``Start.lang_hint`` before any audio costs CPU
    (an unknown language used to fail a whole batch of other streams' jobs)."""

    def normalize_language(self, code: str) -> str:
        """The backend's code for ``code`` (``"en-US"`` -> ``"en"``).

        Raises:
            ValueError: the language is unknown or malformed.
        """
        ...


@runtime_checkable
class HealthReporter(Protocol):
    """A backend that knows whether it can serve (e.g. its inference workers are up)."""

    def health(self) -> dict[str, Any]:
        """At least ``{"ok": bool}``, plus whatever explains it; must not block."""
        ...


def degrade_model(model: str, partial_model: str | None, languages: Sequence[str]
                  ) -> str | None:
    """The faster model a pool's finals may switch to when the pool is past capacity
    (``SchedulerPolicy.degrade_finals``): its partial model, when that is another model
    and serves every language of the pool (an English-only one, such as tiny.en, only
    for a pool whose languages are ``["en"]``). None: the pool's finals never degrade."""
    if not partial_model or partial_model == model:
        return None
    if partial_model.endswith(".en") and tuple(languages) != ("en",):
        return None
    return partial_model


def degradable_pools(described: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """The pools of a backend's ``describe()`` whose finals may degrade."""
    out = set()
    for name, d in described.items():
        model = str(d.get("model", ""))
        partial = d.get("partial_model")
        if degrade_model(model, None if partial is None else str(partial),
                         tuple(d.get("languages", ()))):
            out.add(name)
    return frozenset(out)
