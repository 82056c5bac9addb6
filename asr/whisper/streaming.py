"""Partial transcripts for a growing utterance, without flicker (sans-IO: no clocks).

Whisper is not a streaming model: a partial is a fresh decode of the audio so far. Two
things keep that cheap and steady:

* **Local agreement** (:class:`LocalAgreement`): a token prefix becomes *stable* once
  ``n`` consecutive hypotheses agree on it (``n = 2`` by default), cut back to a word
  boundary. A partial's text is the stable prefix plus the newest hypothesis's tail.
* **Forced prefix**: the stable tokens are fed to the decoder in the same call as the
  task tokens, so each re-decode only generates the unstable tail (one decoder step per
  tail token instead of one per token of the utterance).
* **Re-checks**: two early hypotheses can agree on a mishearing (tiny.en on 1.5 s: "How
  do you marry the more", on 3 s: "Had he married a more"), and forcing it would keep it
  to the final. So whenever the audio has grown by ``recheck_growth`` (1.5x) since the
  stable prefix was last confirmed, one decode runs unforced; if it does not start with
  the stable prefix, the prefix is cut back to what they share (a retraction: better
  than a partial the final does not support). Geometric growth keeps the cost to a few
  unforced decodes per utterance, most of them early, where mishearings are.

The production path is ``asr.engine.StablePartials`` (the policy of one utterance) and
``WhisperBackend._partials`` (batched decodes through :class:`EnginePartialDecoder`),
driven by the server; encoder windows are sized there (``asr.engine.window_frames``).
A final decodes the whole utterance afresh and replaces its partials.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from asr.whisper import mel as melmod
from asr.whisper.engine import WhisperEngine
from asr.whisper.search import DecodeOptions, DecodeRequest, DecodeResult
from asr.whisper.tokenizer import WhisperTokenizer

SAMPLE_RATE = melmod.SAMPLE_RATE  # Hz


# -- the stable-prefix policy -------------------------------------------------------------


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by every sequence (0 for none given)."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


class LocalAgreement:
    """Commit the token prefix that ``n`` consecutive hypotheses agree on.

    Args:
        n: hypotheses that must agree (2 = the newest and the one before).
        can_cut: ``can_cut(tokens, k)`` says whether a stable prefix may end before
            ``tokens[k]``; by default anywhere.
        recheck_growth: with a growth factor (> 1), :meth:`recheck_due` asks for an
            unforced decode once the audio is that many times as long as when the
            committed prefix was last confirmed; None (the default): never.

    The committed prefix grows, except at a re-check: an unforced hypothesis (``update``
    with ``unforced_at``) that does not start with it cuts it back to what they share.
    Any other hypothesis that does not start with it contributes no tail and restarts
    agreement.
    """

    def __init__(self, n: int = 2, can_cut: Callable[[Sequence[int], int], bool] | None = None,
                 *, recheck_growth: float | None = None) -> None:
        if n < 1:
            raise ValueError(f"agreement needs n >= 1 hypotheses, got {n}")
        if recheck_growth is not None and recheck_growth <= 1:
            raise ValueError(f"recheck_growth must be > 1, got {recheck_growth}")
        self.n = n
        self._can_cut = can_cut or (lambda tokens, k: True)
        self.recheck_growth = recheck_growth
        self.committed: tuple[int, ...] = ()
        self._recent: list[tuple[int, ...]] = []
        # Audio length (any unit) of the last unforced hypothesis that carried the
        # committed prefix; None: not known (no re-checks).
        self._confirmed_at: float | None = None
        self.retractions = 0  # re-checks that cut the committed prefix back

    def recheck_due(self, audio: float) -> bool:
        """The next decode, on ``audio`` (the unit of ``unforced_at``), should run
        unforced to re-check the committed prefix."""
        return (self.recheck_growth is not None and bool(self.committed)
                and self._confirmed_at is not None
                and audio >= self._confirmed_at * self.recheck_growth)

    def update(
        self, hypothesis: Sequence[int], *, trusted: bool = True,
        unforced_at: float | None = None,
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Take the newest hypothesis.

        Args:
            hypothesis: text tokens of the latest decode of the whole utterance so far.
            trusted: False for a hypothesis that may be degenerate (it hit its token
                limit, so it is probably looping): its tail is returned but it takes no
                part in agreement (nor in a re-check).
            unforced_at: the hypothesis was decoded without the committed prefix, on
                this much audio: it re-checks the prefix (see ``recheck_growth``).

        Returns:
            ``(stable, tail)``: the committed tokens and the rest of this hypothesis after
            them. ``stable`` extends every earlier one, except after a re-check that
            disagreed: then it is cut back to what the re-check shares with it.
        """
        h = tuple(hypothesis)
        c = self.committed
        if unforced_at is not None and trusted:
            if h[: len(c)] != c:
                k = common_prefix_length([c, h])
                while k > 0 and not self._can_cut(h, k):
                    k -= 1
                self.committed = h[:k]
                self.retractions += 1
                self._recent = [h]
                self._confirmed_at = unforced_at
                return self.committed, h[k:]
            self._confirmed_at = unforced_at
        if h[: len(c)] != c:
            self._recent = [h] if trusted else []
            return c, ()
        if not trusted:
            return c, h[len(c) :]
        self._recent = [*self._recent[-(self.n - 1) :], h] if self.n > 1 else [h]
        if len(self._recent) >= self.n:
            k = common_prefix_length(self._recent)
            # The newest hypothesis decides where words end: cut back to a boundary.
            while k > len(c) and not self._can_cut(h, k):
                k -= 1
            if k > len(c):
                self.committed = h[:k]
        return self.committed, h[len(self.committed) :]

    def reset(self) -> None:
        """Forget everything (a new utterance)."""
        self.committed = ()
        self._recent = []
        self._confirmed_at = None


def trim_repetition(
    tokens: Sequence[int], max_period: int = 12, min_repeats: int = 3
) -> tuple[tuple[int, ...], bool]:
    """Cut a hypothesis that ends in a loop back to one copy of the repeated part.

    Short windows and cut-off audio send Whisper into loops ("ten of clubs ten of clubs
    ten of clubs ..."); a partial should show the text once, not the loop.

    Args:
        tokens: the hypothesis.
        max_period: longest repeated unit looked for, in tokens.
        min_repeats: consecutive copies at the end that count as a loop (3: "no no" and
            "five five" stay).

    Returns:
        The tokens up to and including the first copy of the loop, and whether a loop was
        found.
    """
    t = tuple(tokens)
    n = len(t)
    for p in range(1, min(max_period, n // min_repeats) + 1):
        unit = t[n - p :]
        reps = 1
        while reps * p + p <= n and t[n - (reps + 1) * p : n - reps * p] == unit:
            reps += 1
        if reps >= min_repeats:
            return t[: n - (reps - 1) * p], True
    return t, False


def word_boundary(tok: WhisperTokenizer) -> Callable[[Sequence[int], int], bool]:
    """A ``can_cut`` for :class:`LocalAgreement` that ends stable text between words.

    A cut before ``tokens[k]`` is allowed when that token starts with a space (a new word
    in Whisper's byte-level BPE) and the bytes before it are complete UTF-8, so the stable
    text never ends in half a word or half a character. A cut at the very end of the
    hypothesis is not allowed: the audio may stop mid-word.

    Args:
        tok: the model's tokenizer.

    Returns:
        The predicate.
    """

    def can_cut(tokens: Sequence[int], k: int) -> bool:
        if k >= len(tokens):
            return False
        if not tok.token_bytes(tokens[k]).startswith(b" "):
            return False
        head = b"".join(tok.token_bytes(t) for t in tokens[:k])
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    return can_cut


# -- decoding jobs ------------------------------------------------------------------------


@dataclass(frozen=True)
class PartialJob:
    """One partial decode to run: the audio so far and how to decode it."""

    audio: np.ndarray  # float32, at most 30 s
    window_frames: int  # mel frames to pad to (even)
    prefix: tuple[int, ...]  # forced stable tokens
    language: str | None
    prompt: str | None
    max_new_tokens: int


class PartialDecoder(Protocol):
    """Runs partial jobs (several streams at once)."""

    tokenizer: WhisperTokenizer

    def decode_partials(self, jobs: Sequence[PartialJob]) -> list[DecodeResult]:
        """Decode every job; results in order."""
        ...


class EnginePartialDecoder:
    """:class:`PartialDecoder` on a :class:`~asr.whisper.engine.WhisperEngine`: jobs
    with the same window run as one encoder batch and one decoder run per step.

    Args:
        engine: the engine.
    """

    def __init__(self, engine: WhisperEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tok

    def decode_partials(self, jobs: Sequence[PartialJob]) -> list[DecodeResult]:
        """Decode partial jobs, batching those with equal windows.

        Args:
            jobs: the jobs.

        Returns:
            One greedy result per job, in order.
        """
        out: list[DecodeResult | None] = [None] * len(jobs)
        by_window: dict[int, list[int]] = {}
        for i, j in enumerate(jobs):
            by_window.setdefault(j.window_frames, []).append(i)
        for frames, idx in by_window.items():
            cross, _, _ = self.engine.encode([jobs[i].audio for i in idx], frames)
            reqs = [
                DecodeRequest(language=jobs[i].language, prompt=jobs[i].prompt,
                              prefix=jobs[i].prefix, max_new_tokens=jobs[i].max_new_tokens)
                for i in idx
            ]
            for i, r in zip(idx, self.engine.decoder.decode(cross, reqs, DecodeOptions()),
                            strict=True):
                out[i] = r
        return [r for r in out if r is not None]
