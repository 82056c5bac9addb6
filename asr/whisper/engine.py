"""Whisper on audio: log-mel, encoder, search, placed in session time.

:class:`WhisperEngine` adds audio to :class:`~asr.whisper.search.WhisperDecoder`: log-mel
and one encoder run per batch (:meth:`WhisperEngine.transcribe_batch`), timing and RTF
(:class:`Timings`), session-time bounds (:class:`Transcript`), and long audio window by
window (seeking by segment timestamps when greedy, independent 30 s windows with beam
search). :func:`get_engine` keeps one loaded engine per model for the process.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from asr.whisper import mel as melmod
from asr.whisper.audio import to_float_audio
from asr.whisper.model import CrossKV, WhisperModel
from asr.whisper.search import (
    DEFAULT_MAX_NEW_TOKENS,
    DecodeOptions,
    DecodeRequest,
    DecodeResult,
    FallbackPolicy,
    LanguageResult,
    WhisperDecoder,
    take_rows,
    token_budget,
)
from asr.whisper.tokenizer import WhisperTokenizer

SAMPLE_RATE = melmod.SAMPLE_RATE  # Hz


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    """Wall time of one transcription, in milliseconds."""

    mel_ms: float
    encode_ms: float
    decode_ms: float
    total_ms: float


@dataclass(frozen=True)
class Transcript:
    """One utterance's transcript, placed in session time.

    ``start_ms``/``end_ms`` are the utterance's bounds in the session (start offset given
    by the caller plus the audio duration). ``rtf`` is total wall time over audio time.
    """

    text: str
    lang: str
    lang_prob: float
    no_speech_prob: float
    start_ms: float
    end_ms: float
    tokens: tuple[int, ...]
    avg_logprob: float
    timings: Timings
    rtf: float
    model: str = ""
    beam_size: int = 1
    temperature: float = 0.0  # of the decode kept (above 0: greedy text looped or was unsure)
    loop_cut: bool = False  # every decode looped; the repeated tail was cut off
    finished: bool = True  # the decode ended on its own, within its token budget

    @property
    def audio_ms(self) -> float:
        return self.end_ms - self.start_ms

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tokens as a list, timings nested)."""
        d = asdict(self)
        d["tokens"] = list(self.tokens)
        d["audio_ms"] = self.audio_ms
        return d


# -- engine -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """One item for :meth:`WhisperEngine.transcribe_batch`."""

    audio: np.ndarray  # 16 kHz mono, int16 or float
    start_ms: float = 0.0
    language: str | None = None
    prompt: str | None = None
    max_new_tokens: int | None = None  # None: token_budget(audio), at most the call's limit
    seed: int = 0  # for fallback sampling: the same utterance always decodes the same


class WhisperEngine:
    """Audio in, :class:`Transcript` out.

    Args:
        model: a loaded model (``runtime.load_model``) or any protocol implementation.
        tokenizer: defaults to the model's.
    """

    def __init__(self, model: WhisperModel, tokenizer: WhisperTokenizer | None = None) -> None:
        self.model = model
        self.decoder = WhisperDecoder(model, tokenizer)
        self.tok = self.decoder.tok

    @classmethod
    def load(cls, name: str = "base", precision: str = "int8", threads: int = 2) -> WhisperEngine:
        """Load a packaged checkpoint through the ONNX runtime.

        Args:
            name: ``"base"`` or ``"tiny.en"``.
            precision: ``"int8"`` or ``"fp32"``.
            threads: onnxruntime intra-op threads.

        Returns:
            The engine.
        """
        from asr.whisper import runtime

        return cls(runtime.load_model(name=name, precision=precision, threads=threads))

    @property
    def max_frames(self) -> int:
        """Mel frames in one encoder window (3000 = 30 s)."""
        return 2 * self.model.dims.n_audio_ctx

    def encode(
        self, audios: Sequence[np.ndarray], pad_to_frames: int | None = None
    ) -> tuple[CrossKV, float, float]:
        """Log-mel and encoder for a batch of clips, each at most one window long.

        Args:
            audios: float32 clips.
            pad_to_frames: mel frames per row (even); default one full window (30 s).

        Returns:
            Cross K/V, and the mel and encoder wall times in ms.
        """
        frames = pad_to_frames or self.max_frames
        if frames % 2:
            frames += 1  # the encoder's stride-2 conv needs an even count
        t0 = time.perf_counter()
        mel = melmod.log_mel_batch(audios, pad_to_frames=frames, n_mels=self.model.dims.n_mels)
        t1 = time.perf_counter()
        cross = self.model.encode(mel)
        t2 = time.perf_counter()
        return cross, (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def detect_language(self, audio: np.ndarray, top_k: int = 5,
                        min_window_s: float | None = None) -> LanguageResult:
        """Language and no-speech probabilities of the first 30 s of ``audio``.

        Args:
            audio: 16 kHz mono, int16 or float.
            top_k: languages to return.
            min_window_s: run the encoder on a window this long (or the audio's length if
                longer) instead of 30 s. Language ID on a few seconds of speech is about
                3x cheaper on a 10 s window and as accurate on real speech (see
                ``LID_WINDOW_S`` in ``asr/engine.py``).

        Returns:
            The result (always "en" for English-only models).
        """
        x = to_float_audio(audio)[: melmod.N_SAMPLES]
        frames = None
        if min_window_s is not None:
            need = max(int(min_window_s * 100), -(-len(x) // 160))
            frames = min(self.max_frames, need + need % 2)
        cross, _, _ = self.encode([x], pad_to_frames=frames)
        return self.decoder.detect_language(cross, top_k)[0]

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None = None,
        beam_size: int = 1,
        prompt: str | None = None,
        start_ms: float = 0.0,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        fallback: FallbackPolicy | None = None,
    ) -> Transcript:
        """Transcribe one utterance. Longer audio than one window is decoded window by
        window with timestamps, each window starting where the last complete segment of
        the one before ended (greedy), or in independent 30 s windows (beam); the
        language is taken from the first window when not given.

        Args:
            audio: 16 kHz mono, int16 or float.
            language: language code, or None to detect (English-only models: "en").
            beam_size: 1 for greedy, up to 5 (or more) for beam search.
            prompt: initial prompt / hotwords to condition on.
            start_ms: the utterance's start in session time.
            max_new_tokens: token limit per 30 s window (each window also gets a budget
                proportional to its audio).
            fallback: re-decode windows whose text loops or is unsure; None: once.

        Returns:
            The transcript.
        """
        x = to_float_audio(audio)
        n = melmod.N_SAMPLES
        if x.size <= n:
            return self.transcribe_batch(
                [Utterance(x, start_ms, language, prompt)], beam_size=beam_size,
                max_new_tokens=max_new_tokens, fallback=fallback,
            )[0]
        if beam_size == 1:
            return self._transcribe_seeking(x, language, prompt, start_ms, max_new_tokens,
                                            fallback)
        # Beam search has no timestamp rules here: independent 30 s windows (no
        # conditioning on the previous text), one batch, one language for all of them.
        # A word that straddles a window boundary can be lost.
        windows = [
            Utterance(x[i : i + n], start_ms + i / SAMPLE_RATE * 1e3, language,
                      prompt if i == 0 else None)
            for i in range(0, x.size, n)
        ]
        parts = self._transcribe_rows(windows, beam_size, max_new_tokens, self.max_frames,
                                      language_from_first=True, fallback=fallback)
        first = parts[0]
        audio_ms = x.size / SAMPLE_RATE * 1e3
        return Transcript(
            text=" ".join(p.text for p in parts if p.text),
            lang=first.lang,
            lang_prob=first.lang_prob,
            no_speech_prob=min(p.no_speech_prob for p in parts),
            start_ms=start_ms,
            end_ms=start_ms + audio_ms,
            tokens=tuple(t for p in parts for t in p.tokens),
            avg_logprob=float(np.mean([p.avg_logprob for p in parts])),
            timings=first.timings,
            rtf=first.timings.total_ms / audio_ms,
            model=self.model.name,
            beam_size=beam_size,
            temperature=max(p.temperature for p in parts),
            loop_cut=any(p.loop_cut for p in parts),
            finished=all(p.finished for p in parts),
        )

    def _transcribe_seeking(self, x: np.ndarray, language: str | None, prompt: str | None,
                            start_ms: float, max_new_tokens: int,
                            fallback: FallbackPolicy | None) -> Transcript:
        """Long audio the reference way: decode a 30 s window with timestamps, keep its
        complete segments, and start the next window where the last complete segment
        ended, so no word is cut in two at a window boundary."""
        n = melmod.N_SAMPLES
        t0 = time.perf_counter()
        seek = 0
        lang = language
        parts: list[DecodeResult] = []
        texts: list[str] = []
        mel_ms = enc_ms = 0.0
        while seek < x.size:
            window = x[seek : seek + n]
            cross, m_ms, e_ms = self.encode([window], self.max_frames)
            mel_ms, enc_ms = mel_ms + m_ms, enc_ms + e_ms
            if lang is None and self.tok.multilingual:
                # Whisper picks the language of long audio from its first window.
                lang = self.decoder.detect_language(cross, top_k=1)[0].lang
            req = DecodeRequest(language=lang, prompt=prompt if seek == 0 else None,
                                max_new_tokens=min(max_new_tokens, token_budget(window.size)),
                                seed=seek)
            opts = DecodeOptions(max_new_tokens=max_new_tokens, timestamps=True)
            if fallback is None:
                [r] = self.decoder.decode(cross, [req], opts)
            else:
                [r] = self.decoder.decode_with_fallback(cross, [req], opts, fallback)
            last = seek + n >= x.size
            keep, advance = self._complete_segments(r.timed or r.tokens, window.size, last)
            text_tokens = tuple(t for t in keep if t < self.tok.eot)
            if fallback is not None and fallback.silent(r):
                text_tokens = ()
            parts.append(replace(r, tokens=text_tokens))
            texts.append(self.tok.decode(text_tokens).strip())
            seek += advance
        total_ms = (time.perf_counter() - t0) * 1e3
        timings = Timings(mel_ms, enc_ms, total_ms - mel_ms - enc_ms, total_ms)
        audio_ms = x.size / SAMPLE_RATE * 1e3
        first = parts[0]
        return Transcript(
            text=" ".join(t for t in texts if t),
            lang=first.language,
            lang_prob=first.language_prob,
            no_speech_prob=min(p.no_speech_prob for p in parts),
            start_ms=start_ms,
            end_ms=start_ms + audio_ms,
            tokens=tuple(t for p in parts for t in p.tokens),
            avg_logprob=float(np.mean([p.avg_logprob for p in parts])),
            timings=timings,
            rtf=total_ms / audio_ms,
            model=self.model.name,
            beam_size=1,
            temperature=max(p.temperature for p in parts),
            loop_cut=any(p.loop_cut for p in parts),
            finished=all(p.finished for p in parts),
        )

    def _complete_segments(self, timed: Sequence[int], window_samples: int,
                           last: bool) -> tuple[tuple[int, ...], int]:
        """The tokens of a window's complete segments and how far to seek (samples).

        Whisper's rule: a window that ends on a lone timestamp ended its last segment
        with the audio, so all of it is kept and the next window starts after it.
        Otherwise the text after the last closed pair of timestamps may be cut by the
        window's end: it is dropped, and the next window starts at that timestamp.
        """
        ts = self.tok.special.timestamp_begin
        toks = tuple(timed)
        is_ts = [t >= ts for t in toks]
        pairs = [i + 1 for i in range(len(toks) - 1) if is_ts[i] and is_ts[i + 1]]
        single_end = len(toks) >= 2 and is_ts[-1] and not is_ts[-2]
        if last or not pairs or single_end:
            return toks, window_samples
        end = pairs[-1]
        stamp = toks[end - 1] - ts  # the timestamp that closed the last complete segment
        advance = stamp * 2 * melmod.HOP_LENGTH  # one timestamp step is 0.02 s
        if advance <= 0:
            return toks, window_samples
        return toks[:end], min(advance, window_samples)

    def transcribe_batch(
        self,
        utterances: Sequence[Utterance | np.ndarray],
        *,
        beam_size: int = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        pad_to_frames: int | None = None,
        fallback: FallbackPolicy | None = None,
    ) -> list[Transcript]:
        """Transcribe several utterances (each at most 30 s) in one encoder run and one
        decoder run per step.

        Args:
            utterances: clips, or :class:`Utterance` items with their own start offset,
                language, prompt, token budget and seed.
            beam_size: beam width (1 = greedy).
            max_new_tokens: token limit per utterance (each also gets a budget
                proportional to its audio, :func:`token_budget`).
            pad_to_frames: mel frames per row; default a full 30 s window (the accurate
                setting; shorter windows need a trailing margin, see ``asr.engine``).
            fallback: re-decode text that loops or is unsure
                (:meth:`WhisperDecoder.decode_with_fallback`); None decodes once.

        Returns:
            One transcript per utterance, in order. Timings are the batch's, shared.

        Raises:
            ValueError: an utterance longer than one window, or bad options.
        """
        items = [u if isinstance(u, Utterance) else Utterance(u) for u in utterances]
        if not items:
            return []
        return self._transcribe_rows(items, beam_size, max_new_tokens,
                                     pad_to_frames or self.max_frames, fallback=fallback)

    def _transcribe_rows(
        self,
        items: Sequence[Utterance],
        beam_size: int,
        max_new_tokens: int,
        frames: int,
        *,
        language_from_first: bool = False,
        fallback: FallbackPolicy | None = None,
    ) -> list[Transcript]:
        audios = [to_float_audio(u.audio) for u in items]
        for a in audios:
            if a.size > frames * melmod.HOP_LENGTH:
                raise ValueError(
                    f"utterance of {a.size} samples is longer than one window; use transcribe()"
                )
        t0 = time.perf_counter()
        cross, mel_ms, enc_ms = self.encode(audios, frames)
        t1 = time.perf_counter()
        languages = [u.language for u in items]
        if language_from_first and languages[0] is None and self.tok.multilingual:
            # Whisper picks the language of long audio from its first window.
            lang = self.decoder.detect_language(take_rows(cross, np.array([0])), top_k=1)[0].lang
            languages = [lang] * len(items)
        requests = [
            DecodeRequest(language=lang, prompt=u.prompt, seed=u.seed,
                          max_new_tokens=min(max_new_tokens, u.max_new_tokens
                                             or token_budget(a.size)))
            for u, lang, a in zip(items, languages, audios, strict=True)]
        options = DecodeOptions(beam_size=beam_size, max_new_tokens=max_new_tokens)
        if fallback is None:
            results = self.decoder.decode(cross, requests, options)
        else:
            results = self.decoder.decode_with_fallback(cross, requests, options, fallback)
        t2 = time.perf_counter()
        total_ms = (t2 - t0) * 1e3
        timings = Timings(mel_ms, enc_ms, (t2 - t1) * 1e3, total_ms)
        audio_ms_total = sum(a.size for a in audios) / SAMPLE_RATE * 1e3
        out = []
        for u, a, r in zip(items, audios, results, strict=True):
            audio_ms = a.size / SAMPLE_RATE * 1e3
            out.append(
                Transcript(
                    text=r.text.strip(),
                    lang=r.language,
                    lang_prob=r.language_prob,
                    no_speech_prob=r.no_speech_prob,
                    start_ms=u.start_ms,
                    end_ms=u.start_ms + audio_ms,
                    tokens=r.tokens,
                    avg_logprob=r.avg_logprob,
                    timings=timings,
                    rtf=total_ms / max(audio_ms_total, 1e-9),
                    model=self.model.name,
                    beam_size=beam_size,
                    temperature=r.temperature,
                    loop_cut=r.loop_cut,
                    finished=r.finished,
                )
            )
        return out


@functools.cache
def _engine(model: str, precision: str, threads: int) -> WhisperEngine:
    return WhisperEngine.load(model, precision=precision, threads=threads)


def get_engine(model: str = "base", precision: str = "int8", threads: int = 2) -> WhisperEngine:
    """A process-wide engine per (model, precision, threads), loaded on first use.

    Args:
        model: ``"base"`` or ``"tiny.en"``.
        precision: ``"int8"`` or ``"fp32"``.
        threads: onnxruntime intra-op threads.

    Returns:
        The shared engine.
    """
    return _engine(model, precision, threads)
