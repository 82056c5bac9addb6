"""Partial transcripts for a growing utterance, without flicker (sans-IO: no clocks).

Whisper is not a streaming model: a partial is a fresh decode of the audio so far. Three
things keep that cheap and steady:

* **Local agreement** (:class:`LocalAgreement`): a token prefix becomes *stable* once
  ``n`` consecutive hypotheses agree on it (``n = 2`` by default), cut back to a word
  boundary. Stable tokens are never retracted: a partial's text is the stable prefix
  plus the newest hypothesis's tail.
* **Forced prefix**: the stable tokens are fed to the decoder in the same call as the
  task tokens, so each re-decode only generates the unstable tail (one decoder step per
  tail token instead of one per token of the utterance).
* **Window padding** for partials is a knob (``partial_window_frames``): 3000 frames
  (30 s, like finals) by default; a shorter window makes the encoder cheaper.
  ``bench/asr_quality.py --partial-windows`` measures what it costs in WER.

A *final* decodes the whole utterance afresh at 30 s padding, with the configured beam,
no forced prefix, and replaces every partial of its utterance (same ``utterance`` id).

Time is counted in samples (16 kHz); ``*_ms`` fields are derived from them. Decoding goes
through the :class:`PartialDecoder` protocol, so several streams can share one batched
encoder/decoder run (:meth:`EnginePartialDecoder.decode_partials`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from asr.whisper import mel as melmod
from asr.whisper.decoding import (
    DecodeOptions,
    DecodeRequest,
    DecodeResult,
    Transcript,
    WhisperEngine,
    to_float_audio,
)
from asr.whisper.tokenizer import WhisperTokenizer

SAMPLE_RATE = melmod.SAMPLE_RATE  # Hz


def _ms(samples: int) -> float:
    return samples * 1000.0 / SAMPLE_RATE


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

    The committed prefix only ever grows. A hypothesis that does not start with it (when
    the decoder was not forced to keep it) contributes no tail and restarts agreement.
    """

    def __init__(self, n: int = 2, can_cut: Callable[[Sequence[int], int], bool] | None = None
                 ) -> None:
        if n < 1:
            raise ValueError(f"agreement needs n >= 1 hypotheses, got {n}")
        self.n = n
        self._can_cut = can_cut or (lambda tokens, k: True)
        self.committed: tuple[int, ...] = ()
        self._recent: list[tuple[int, ...]] = []

    def update(
        self, hypothesis: Sequence[int], *, trusted: bool = True
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Take the newest hypothesis.

        Args:
            hypothesis: text tokens of the latest decode of the whole utterance so far.
            trusted: False for a hypothesis that may be degenerate (it hit its token
                limit, so it is probably looping): its tail is returned but it takes no
                part in agreement.

        Returns:
            ``(stable, tail)``: the committed tokens (a prefix extension of every earlier
            ``stable``) and the rest of this hypothesis after them.
        """
        h = tuple(hypothesis)
        c = self.committed
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


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partial:
    """Fires after each partial decode of an utterance.

    ``text`` = ``stable_text`` + the newest hypothesis's tail. Within one utterance
    ``stable_text`` only grows (each is a prefix of the next). ``end_ms`` is the end of
    the audio decoded so far, in session time.
    """

    utterance: int
    revision: int  # 1, 2, ... per utterance
    text: str
    stable_text: str
    tokens: tuple[int, ...]
    stable_tokens: int  # how many of ``tokens`` are stable
    language: str
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class Final:
    """Fires once per utterance; replaces all of its partials."""

    utterance: int
    text: str
    tokens: tuple[int, ...]
    language: str
    language_prob: float
    no_speech_prob: float
    avg_logprob: float
    start_ms: float
    end_ms: float


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
    """Runs partial jobs (several streams at once) and finals."""

    tokenizer: WhisperTokenizer

    def decode_partials(self, jobs: Sequence[PartialJob]) -> list[DecodeResult]:
        """Decode every job; results in order."""
        ...

    def decode_final(self, audio: np.ndarray, language: str | None, prompt: str | None,
                     beam_size: int, start_ms: float) -> Transcript:
        """Decode a whole utterance at full accuracy."""
        ...


class EnginePartialDecoder:
    """:class:`PartialDecoder` on a :class:`~asr.whisper.decoding.WhisperEngine`: jobs
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

    def decode_final(self, audio: np.ndarray, language: str | None, prompt: str | None,
                     beam_size: int, start_ms: float) -> Transcript:
        """Decode a whole utterance through :meth:`WhisperEngine.transcribe`.

        Args:
            audio: the utterance.
            language: language code or None to detect.
            prompt: initial prompt.
            beam_size: beam width.
            start_ms: session time of the first sample.

        Returns:
            The transcript.
        """
        return self.engine.transcribe(audio, language=language, beam_size=beam_size,
                                      prompt=prompt, start_ms=start_ms)


# -- one utterance ------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    """Knobs of partial decoding; sample counts are at 16 kHz."""

    partial_interval_samples: int = 8000  # decode a partial every 0.5 s of new audio
    min_partial_samples: int = 4800  # no partial before 0.3 s of audio
    partial_window_frames: int = melmod.N_FRAMES  # pad partials to this (3000 = 30 s)
    agreement: int = 2  # hypotheses that must agree before tokens become stable
    force_prefix: bool = True  # feed the stable tokens instead of re-decoding them
    tokens_per_second: float = 8.0  # partial token budget per second of audio ...
    extra_tokens: int = 8  # ... plus this, so a partial cannot loop for 224 tokens
    final_beam_size: int = 1
    language_lock_prob: float = 0.5  # detected language kept once this likely

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad knob."""
        if self.partial_interval_samples < 1 or self.min_partial_samples < 0:
            raise ValueError("partial intervals must be positive sample counts")
        if not 2 <= self.partial_window_frames <= melmod.N_FRAMES:
            raise ValueError(
                f"partial_window_frames must be in 2..{melmod.N_FRAMES}, "
                f"got {self.partial_window_frames}"
            )
        if self.agreement < 1:
            raise ValueError(f"agreement must be >= 1, got {self.agreement}")
        if self.tokens_per_second <= 0 or self.extra_tokens < 1:
            raise ValueError("token budget must be positive")
        if not 1 <= self.final_beam_size <= 16:
            raise ValueError(f"final_beam_size must be in 1..16, got {self.final_beam_size}")


class UtteranceStream:
    """Partials and the final of one utterance, fed with audio as it arrives.

    Low level: :meth:`feed` buffers, :meth:`partial_job` / :meth:`on_partial` let a runner
    batch several streams. High level: :meth:`step` and :meth:`finalize` decode through a
    :class:`PartialDecoder` directly.

    Args:
        utterance: id carried by every event of this utterance.
        tokenizer: the model's tokenizer (word boundaries, text).
        start_sample: session time of the first sample, in samples.
        language: language code, or None to detect it (kept for later partials once its
            probability reaches ``config.language_lock_prob``; the final detects anew).
        prompt: initial prompt / hotwords for every decode.
        config: knobs.
    """

    def __init__(
        self,
        utterance: int,
        tokenizer: WhisperTokenizer,
        *,
        start_sample: int = 0,
        language: str | None = None,
        prompt: str | None = None,
        config: StreamConfig | None = None,
    ) -> None:
        self.config = config or StreamConfig()
        self.config.validate()
        self.utterance = utterance
        self.tok = tokenizer
        self.start_sample = start_sample
        self.language = language
        self._language_given = language is not None
        self.prompt = prompt
        self.policy = LocalAgreement(self.config.agreement, word_boundary(tokenizer))
        self._chunks: list[np.ndarray] = []
        self._n = 0
        self._audio: np.ndarray | None = None
        self._decoded_at = 0  # samples covered by the last partial
        self.revision = 0
        self.finished = False

    # -- audio ------------------------------------------------------------------------

    @property
    def samples(self) -> int:
        """Samples received so far."""
        return self._n

    def feed(self, samples: np.ndarray) -> None:
        """Append audio (int16 or float, 16 kHz mono).

        Raises:
            RuntimeError: after :meth:`finalize`.
        """
        if self.finished:
            raise RuntimeError(f"utterance {self.utterance} is already final")
        x = to_float_audio(samples)
        if x.size:
            self._chunks.append(x)
            self._n += x.size
            self._audio = None

    def audio(self) -> np.ndarray:
        """All audio so far, float32."""
        if self._audio is None:
            self._audio = (np.concatenate(self._chunks) if self._chunks
                           else np.zeros(0, np.float32))
            self._chunks = [self._audio] if self._audio.size else []
        return self._audio

    # -- partials -----------------------------------------------------------------------

    def partial_due(self) -> bool:
        """Whether enough new audio arrived for another partial."""
        c = self.config
        return (not self.finished and self._n >= max(c.min_partial_samples, 1)
                and self._n - self._decoded_at >= c.partial_interval_samples)

    def partial_job(self) -> PartialJob:
        """The decode to run for a partial now (whether or not one is due).

        Returns:
            The job: the first 30 s at most (an utterance should be cut before that
            upstream; the final still decodes all of it).
        """
        c = self.config
        x = self.audio()[: melmod.N_SAMPLES]
        frames = max(c.partial_window_frames, -(-x.size // melmod.HOP_LENGTH))
        frames = min(frames + frames % 2, melmod.N_FRAMES)
        prefix = self.policy.committed if c.force_prefix else ()
        budget = math.ceil(x.size / SAMPLE_RATE * c.tokens_per_second) + c.extra_tokens
        return PartialJob(
            audio=x,
            window_frames=frames,
            prefix=prefix,
            language=self.language,
            prompt=self.prompt,
            max_new_tokens=max(1, budget - len(prefix)),
        )

    def on_partial(self, result: DecodeResult, covered_samples: int | None = None) -> Partial:
        """Apply a partial decode's result.

        Args:
            result: the decode of :meth:`partial_job`.
            covered_samples: audio the job covered (default: all received so far).

        Returns:
            The partial event.
        """
        self._decoded_at = self._n if covered_samples is None else covered_samples
        if self.language is None and result.language_prob >= self.config.language_lock_prob:
            # Confident enough: keep this language for the partials, so they do not flip
            # between languages (the first half second is often ambiguous).
            self.language = result.language
        # A partial that loops or hit its token budget is shown (loop cut to one copy) but
        # may not make anything stable.
        tokens, looped = trim_repetition(result.tokens)
        stable, tail = self.policy.update(tokens, trusted=result.finished and not looped)
        self.revision += 1
        tokens = stable + tail
        return Partial(
            utterance=self.utterance,
            revision=self.revision,
            text=self.tok.decode(tokens).strip(),
            stable_text=self.tok.decode(stable).strip(),
            tokens=tokens,
            stable_tokens=len(stable),
            language=self.language or result.language,
            start_ms=_ms(self.start_sample),
            end_ms=_ms(self.start_sample + self._decoded_at),
        )

    def step(self, decoder: PartialDecoder) -> list[Partial]:
        """Decode a partial if one is due.

        Args:
            decoder: runs the job.

        Returns:
            ``[Partial]`` or ``[]``.
        """
        if not self.partial_due():
            return []
        job = self.partial_job()
        covered = self._n
        [res] = decoder.decode_partials([job])
        return [self.on_partial(res, covered)]

    # -- final --------------------------------------------------------------------------

    def on_final(self, transcript: Transcript) -> Final:
        """Close the utterance with a full decode's transcript.

        Args:
            transcript: the final decode of :meth:`audio`.

        Returns:
            The final event.
        """
        self.finished = True
        return Final(
            utterance=self.utterance,
            text=transcript.text,
            tokens=transcript.tokens,
            language=transcript.lang,
            language_prob=transcript.lang_prob,
            no_speech_prob=transcript.no_speech_prob,
            avg_logprob=transcript.avg_logprob,
            start_ms=_ms(self.start_sample),
            end_ms=_ms(self.start_sample + self._n),
        )

    def finalize(self, decoder: PartialDecoder) -> Final:
        """Decode the whole utterance at full accuracy and close it.

        Args:
            decoder: runs the final decode.

        Returns:
            The final event, which replaces this utterance's partials.
        """
        lang = self.language if self._language_given else None
        tr = decoder.decode_final(self.audio(), lang, self.prompt,
                                  self.config.final_beam_size, _ms(self.start_sample))
        return self.on_final(tr)


def run_partials(decoder: PartialDecoder, streams: Sequence[UtteranceStream]) -> list[Partial]:
    """Decode the due partials of several streams in one batched call.

    Args:
        decoder: runs the jobs (one encoder run per window size).
        streams: candidate streams; only those with a partial due are decoded.

    Returns:
        The partial events, in stream order.
    """
    due = [s for s in streams if s.partial_due()]
    if not due:
        return []
    covered = [s.samples for s in due]
    results = decoder.decode_partials([s.partial_job() for s in due])
    return [s.on_partial(r, c) for s, r, c in zip(due, results, covered, strict=True)]
