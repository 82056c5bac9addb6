"""Whisper decoding against the :class:`~asr.whisper.model.WhisperModel` protocol.

Layers, bottom up:

* :class:`WhisperDecoder` turns cross-attention K/V into tokens: language detection and
  no-speech probability, greedy and beam search (temperature 0), suppress lists, an
  initial prompt (``<|startofprev|>`` ...), a forced prefix (used by streaming), several
  utterances per decoder run.
* :class:`WhisperEngine` adds audio: log-mel, one encoder run per batch, timing and RTF,
  session-time timestamps, long audio in 30 s windows.
* :func:`transcribe_file` is what the ``voxgate transcribe`` command calls.

Search follows OpenAI Whisper's ``DecodingTask`` with ``temperature=0``: suppress blank
and end-of-text at the first sampled position, log-probabilities over the filtered logits,
beam search keeping ``beam_size`` running hypotheses and collecting
``round(beam_size * patience)`` finished ones per utterance, ranking by sum of
log-probabilities over length (``length_penalty=None``) or over the Google NMT penalty.

Per utterance the prompt goes through the decoder in two calls, because the model only
returns the logits of the last position: ``[prompt..., SOT]`` gives the logits *at* SOT
(no-speech probability and language), then ``[lang, task, notimestamps, prefix...]``
gives the first text token's logits. Rows decoded together must have the same prompt and
prefix lengths (the protocol has no padding mask), so a batch is split into groups by
those lengths; the encoder still runs once for the whole batch.
"""

from __future__ import annotations

import functools
import math
import os
import time
import wave
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from asr.whisper import loops
from asr.whisper import mel as melmod
from asr.whisper.model import CrossKV, SelfKV, WhisperModel
from asr.whisper.tokenizer import WhisperTokenizer, load_tokenizer

DEFAULT_MAX_NEW_TOKENS = 224  # Whisper's sample_len: n_text_ctx // 2
SAMPLE_RATE = melmod.SAMPLE_RATE  # Hz
# Token budget per second of audio. Measured output of base and tiny.en (int8): LibriVox
# read speech 3.0-4.0 tokens/s, espeak-ng at 220 wpm 4.1-4.4, cards and digits 1.2-3.7.
# Other languages take up to about twice the tokens per word in Whisper's BPE, so 8/s
# never cuts real speech, while a loop on 5 s of audio stops at 50 tokens, not 224.
BUDGET_TOKENS_PER_S = 8.0
BUDGET_EXTRA_TOKENS = 10  # room for punctuation and a short clip's first word


def token_budget(samples: int, tokens_per_s: float = BUDGET_TOKENS_PER_S,
                 extra: int = BUDGET_EXTRA_TOKENS) -> int:
    """Most tokens a decode of ``samples`` of 16 kHz audio may generate.

    Args:
        samples: audio length in samples.
        tokens_per_s: budget per second of audio.
        extra: added to every budget.

    Returns:
        ``ceil(seconds * tokens_per_s) + extra``, at most Whisper's 224.
    """
    return min(DEFAULT_MAX_NEW_TOKENS, math.ceil(samples / SAMPLE_RATE * tokens_per_s) + extra)


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LanguageResult:
    """Language probabilities at the start-of-transcript position, and no-speech.

    ``top`` holds the ``k`` most likely languages, most likely first.
    """

    lang: str
    prob: float
    top: tuple[tuple[str, float], ...]
    no_speech_prob: float


@dataclass(frozen=True)
class DecodeRequest:
    """What to decode for one utterance (its audio is a row of the cross K/V).

    ``language`` None means detect it (multilingual models; English-only ones are "en").
    ``prefix`` tokens are forced right after ``<|notimestamps|>`` and kept in the output.
    """

    language: str | None = None
    prompt: str | None = None
    prefix: tuple[int, ...] = ()
    max_new_tokens: int | None = None  # None: DecodeOptions.max_new_tokens
    seed: int = 0  # sampling (temperature > 0) draws from its own RNG seeded with this


@dataclass(frozen=True)
class DecodeOptions:
    """Search settings shared by the rows of one call."""

    beam_size: int = 1
    patience: float = 1.0
    length_penalty: float | None = None  # None: divide by length, as Whisper's default
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    suppress_blank: bool = True  # no " " or end-of-text as the first token
    task: str = "transcribe"
    # > 0: sample each token from softmax(logits / temperature) instead of searching
    # (beam_size must then be 1); what Whisper falls back to when greedy text loops.
    temperature: float = 0.0
    # Predict segment timestamps (<|t|> text <|t|> ...) under Whisper's timestamp rules,
    # so long audio can seek to the end of the last complete segment (greedy only).
    timestamps: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        if self.timestamps and self.beam_size != 1:
            raise ValueError("timestamps need greedy decoding (beam_size 1)")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.temperature > 0 and self.beam_size != 1:
            raise ValueError("sampling (temperature > 0) needs beam_size 1")
        if not 1 <= self.beam_size <= 16:
            raise ValueError(f"beam_size must be in 1..16, got {self.beam_size}")
        if self.patience < 1.0:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.length_penalty is not None and not 0.0 <= self.length_penalty <= 2.0:
            raise ValueError(f"length_penalty must be in [0, 2], got {self.length_penalty}")
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"unknown task {self.task!r}")


@dataclass(frozen=True)
class DecodeResult:
    """The best hypothesis of one utterance.

    ``tokens`` are text tokens only (prefix included, no control tokens, no end-of-text);
    ``sum_logprob`` covers the sampled tokens and the end-of-text, not a forced prefix.
    """

    tokens: tuple[int, ...]
    text: str
    language: str
    language_prob: float
    no_speech_prob: float
    sum_logprob: float
    avg_logprob: float  # sum_logprob / (sampled tokens + 1), as faster-whisper reports it
    finished: bool  # ended with end-of-text (False: hit the token limit)
    temperature: float = 0.0  # the temperature of the decode that was kept
    loop_cut: bool = False  # no decode came out clean: a repeated tail was cut off
    # With timestamps: every sampled token, timestamps included (``tokens`` has text only).
    timed: tuple[int, ...] = ()

    @property
    def compression_ratio(self) -> float:
        """zlib ratio of the text: above ~2.4 the text repeats itself (a loop)."""
        return loops.compression_ratio(self.text)


@dataclass(frozen=True)
class FallbackPolicy:
    """When a decode is bad and what to try next (OpenAI Whisper's
    ``decode_with_fallback``, plus a token-budget check and a last-resort loop cut).

    A decode needs a fallback when its text compresses too well (a loop), its average
    log-probability is too low (the model was guessing), or it ran out of token budget
    (with a budget proportional to the audio, only a loop does). Audio the model calls
    no-speech with a low log-probability is left alone: the caller empties it.
    """

    # Whisper's own schedule; the first entry is the search given by DecodeOptions.
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    best_of: int = 5  # samples per temperature above 0, best by mean log-probability
    # Before sampling, retry failing rows with beam search of this width at temperature
    # 0 (1: no beam retry). On espeak-ng passages that loop greedily (base, window =
    # audio), beam 5 gave WER 0 % on both where sampling (best of 5) gave 0 % and 20 %.
    retry_beam: int = 5
    compression_ratio_max: float = loops.COMPRESSION_RATIO_MAX
    logprob_min: float = -1.0  # Whisper's logprob_threshold
    no_speech_prob: float = 0.6  # Whisper's no_speech_threshold
    cut_loops: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        if not self.temperatures or any(not 0 <= t <= 2 for t in self.temperatures):
            raise ValueError(f"temperatures must be in [0, 2], got {self.temperatures}")
        if not 1 <= self.best_of <= 16:
            raise ValueError(f"best_of must be in 1..16, got {self.best_of}")
        if not 1 <= self.retry_beam <= 16:
            raise ValueError(f"retry_beam must be in 1..16, got {self.retry_beam}")

    def silent(self, r: DecodeResult | Transcript) -> bool:
        """Whisper's no-speech rule: likely no-speech and an unsure decode."""
        return r.no_speech_prob > self.no_speech_prob and r.avg_logprob < self.logprob_min

    def needs_fallback(self, r: DecodeResult | Transcript) -> bool:
        """Whether ``r`` should be decoded again at the next temperature."""
        if self.silent(r):
            return False
        return (loops.compression_ratio(r.text) > self.compression_ratio_max
                or r.avg_logprob < self.logprob_min or not r.finished)


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


# -- numerics ---------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32; ``-inf`` entries stay ``-inf``.

    Args:
        logits: ``[B, V]``.

    Returns:
        ``[B, V]`` float32.
    """
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # -inf - m is -inf, fine
        shifted = x - m
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    out: np.ndarray = shifted - lse
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (float64 for stable small probabilities).

    Args:
        logits: ``[B, V]``.

    Returns:
        ``[B, V]`` float64 summing to 1 per row.
    """
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


# -- decoder ----------------------------------------------------------------------------

_KV = TypeVar("_KV", CrossKV, SelfKV)


def take_rows(kv: _KV, rows: np.ndarray) -> _KV:
    """Batch rows ``rows`` (axis 1) of a cache, as C-contiguous copies.

    ``kv.select`` uses fancy indexing, whose result is not C-contiguous; the runtime
    would then copy it on *every* decoder call (for beam 5 on base that was 180 MB per
    step, half the decode time). ``np.take`` lays the copy out contiguously once.

    Args:
        kv: cross or self K/V.
        rows: row indices.

    Returns:
        The same type with the selected rows.
    """
    idx = np.asarray(rows, dtype=np.int64)
    return type(kv)(np.take(kv.k, idx, axis=1), np.take(kv.v, idx, axis=1))



@dataclass
class _Row:
    """Bookkeeping of one utterance inside a decode call."""

    index: int  # position in the caller's request list
    request: DecodeRequest
    prompt_ids: list[int]
    language: str = "en"
    language_prob: float = 1.0
    no_speech_prob: float = 0.0
    sample_len: int = 0


@dataclass
class _Beam:
    """Beam-search state of one utterance."""

    seqs: list[tuple[int, ...]] = field(default_factory=lambda: [()])
    scores: list[float] = field(default_factory=lambda: [0.0])
    finished: dict[tuple[int, ...], float] = field(default_factory=dict)


class WhisperDecoder:
    """Token search for one loaded model (stateless between calls).

    Args:
        model: anything implementing :class:`~asr.whisper.model.WhisperModel`.
        tokenizer: defaults to the one in ``model.model_dir``.
    """

    def __init__(self, model: WhisperModel, tokenizer: WhisperTokenizer | None = None) -> None:
        self.model = model
        self.tok = tokenizer or load_tokenizer(str(model.model_dir), model.multilingual)
        if self.tok.n_vocab != model.dims.n_vocab:
            raise ValueError(
                f"tokenizer has {self.tok.n_vocab} tokens, model {model.dims.n_vocab}"
            )
        if self.tok.multilingual != model.multilingual:
            raise ValueError("tokenizer and model disagree on multilinguality")
        n = self.tok.n_vocab
        sp = self.tok.special
        # Text must never contain control or timestamp tokens (we decode without
        # timestamps), only end-of-text; plus the checkpoint's non-speech symbols.
        mask = np.zeros(n, dtype=bool)
        mask[list(self.tok.suppress_ids)] = True
        mask[sp.eot + 1 :] = True
        self._suppress = np.where(mask, -np.inf, 0.0).astype(np.float32)
        begin = mask.copy()
        begin[list(self.tok.suppress_ids_begin)] = True
        self._suppress_begin = np.where(begin, -np.inf, 0.0).astype(np.float32)
        ts = sp.timestamp_begin
        self._ts_begin = ts
        # Timestamp mode: timestamps may be sampled, <|notimestamps|> may not.
        self._suppress_ts = self._suppress.copy()
        self._suppress_ts[ts:] = 0.0
        self._suppress_ts_begin = self._suppress_begin.copy()
        self._suppress_ts_begin[ts:] = 0.0
        self._lang_ids = np.array(list(sp.languages.values()), dtype=np.int64)
        self._lang_codes = list(sp.languages)
        self.n_text_ctx = model.dims.n_text_ctx

    # -- language ------------------------------------------------------------------------

    def _language_from_logits(self, logits: np.ndarray, top_k: int) -> list[LanguageResult]:
        """Language and no-speech probabilities from logits at the SOT position."""
        probs = softmax(logits)
        no_speech = probs[:, self.tok.special.no_speech]
        out = []
        for b in range(logits.shape[0]):
            if not self.tok.multilingual:
                out.append(LanguageResult("en", 1.0, (("en", 1.0),), float(no_speech[b])))
                continue
            lp = softmax(logits[b : b + 1, self._lang_ids])[0]
            order = np.argsort(-lp)[: max(1, top_k)]
            top = tuple((self._lang_codes[i], float(lp[i])) for i in order)
            out.append(LanguageResult(top[0][0], top[0][1], top, float(no_speech[b])))
        return out

    def detect_language(self, cross: CrossKV, top_k: int = 5) -> list[LanguageResult]:
        """Language probabilities from the decoder's output at ``[SOT]`` alone.

        Args:
            cross: encoder output for ``B`` utterances.
            top_k: how many languages to return per utterance.

        Returns:
            One result per row; English-only models always say "en" with probability 1.
        """
        b = cross.k.shape[1]
        tokens = np.full((b, 1), self.tok.special.sot, dtype=np.int64)
        logits, _ = self.model.decode(tokens, None, cross)
        return self._language_from_logits(logits, top_k)

    # -- search --------------------------------------------------------------------------

    def decode(
        self,
        cross: CrossKV,
        requests: Sequence[DecodeRequest],
        options: DecodeOptions | None = None,
    ) -> list[DecodeResult]:
        """Decode every row of ``cross``.

        Args:
            cross: encoder output, one row per request.
            requests: per-utterance language, prompt, prefix and token limit.
            options: search settings (greedy by default).

        Returns:
            One result per request, in order.

        Raises:
            ValueError: bad options, a row count mismatch, an unknown language, or a prompt
                and prefix too long for the text context.
        """
        opts = options or DecodeOptions()
        opts.validate()
        n_rows = cross.k.shape[1]
        if len(requests) != n_rows:
            raise ValueError(f"{len(requests)} requests for {n_rows} encoded rows")
        rows = [self._plan(i, r, opts) for i, r in enumerate(requests)]
        # The protocol needs equal token counts per call: group rows by prompt and prefix
        # lengths and decode each group on its own (usually there is one group).
        groups: dict[tuple[int, int], list[_Row]] = {}
        for row in rows:
            groups.setdefault((len(row.prompt_ids), len(row.request.prefix)), []).append(row)
        results: list[DecodeResult | None] = [None] * n_rows
        for group in groups.values():
            idx = np.array([r.index for r in group], dtype=np.int64)
            sub = cross if len(group) == n_rows else take_rows(cross, idx)
            for row, res in zip(group, self._decode_group(sub, group, opts), strict=True):
                results[row.index] = res
        return [r for r in results if r is not None]

    def decode_with_fallback(
        self,
        cross: CrossKV,
        requests: Sequence[DecodeRequest],
        options: DecodeOptions | None = None,
        policy: FallbackPolicy | None = None,
    ) -> list[DecodeResult]:
        """Decode every row; rows whose text loops or is unsure are decoded again.

        The first pass is ``options`` as given (greedy or beam); then, for rows that
        failed, beam search of ``policy.retry_beam`` at temperature 0. Each later
        temperature samples ``policy.best_of`` candidates per failing row (seeded from the row's
        ``seed``, so the same request always gives the same text) and keeps the most
        likely one that passes (else the most likely). A row that passes stops there. A
        row that never passes keeps, like faster-whisper, the most likely candidate that
        does not loop and ended on its own (else the most likely that does not loop, else
        the most likely of all), and a loop left in it is cut to one copy. The encoder output
        is reused by every pass.

        Args:
            cross: encoder output, one row per request.
            requests: per-utterance language, prompt, prefix, token limit and seed.
            options: search settings of the first pass.
            policy: thresholds and temperatures.

        Returns:
            One result per request, in order; ``temperature`` says which pass won.
        """
        opts = options or DecodeOptions()
        pol = policy or FallbackPolicy()
        pol.validate()
        first = replace(opts, temperature=pol.temperatures[0],
                        beam_size=opts.beam_size if pol.temperatures[0] == 0 else 1)
        results = self.decode(cross, requests, first)
        tried: dict[int, list[DecodeResult]] = {
            i: [r] for i, r in enumerate(results) if pol.needs_fallback(r)}
        pending = list(tried)
        steps: list[tuple[float, int]] = []
        if pol.retry_beam > first.beam_size and not opts.timestamps:
            steps.append((0.0, pol.retry_beam))
        steps += [(t, opts.beam_size if t == 0 else 1) for t in pol.temperatures[1:]]
        for ti, (temp, beam) in enumerate(steps, start=1):
            if not pending:
                break
            n = pol.best_of if temp > 0 else 1
            rows = [i for i in pending for _ in range(n)]
            reqs = [replace(requests[i], seed=(requests[i].seed * 1_000_003 + ti * 101 + k))
                    for i in pending for k in range(n)]
            sub = take_rows(cross, np.array(rows))
            cand = self.decode(sub, reqs, replace(opts, temperature=temp, beam_size=beam))
            still = []
            for j, i in enumerate(pending):
                # A sample that passes beats any that does not (a loop is often the
                # most likely text: that is why greedy fell into it).
                best = max(cand[j * n : (j + 1) * n],
                           key=lambda r: (not pol.needs_fallback(r), r.avg_logprob))
                best = replace(best, temperature=temp)
                tried[i].append(best)
                if pol.needs_fallback(best):
                    still.append(i)
                else:
                    results[i] = best
            pending = still
        for i in pending:
            cands = tried[i]
            clean = [r for r in cands if r.compression_ratio <= pol.compression_ratio_max]
            ended = [r for r in clean if r.finished]
            best = max(ended or clean or cands, key=lambda r: r.avg_logprob)
            if pol.cut_loops and (best.compression_ratio > pol.compression_ratio_max
                                  or not best.finished):
                tokens, cut = loops.cut_loop(best.tokens)
                if cut:
                    best = replace(best, tokens=tokens, text=self.tok.decode(tokens),
                                   loop_cut=True)
            results[i] = best
        return results

    def _plan(self, index: int, req: DecodeRequest, opts: DecodeOptions) -> _Row:
        if req.language is not None:
            # Validate early: the SOT sequence needs it after the first call.
            self.tok.sot_sequence(req.language, opts.task)
        prompt_ids: list[int] = []
        if req.prompt:
            prompt_ids = self.tok.prompt_tokens(req.prompt, self.n_text_ctx // 2 - 1)
        for t in req.prefix:
            if not 0 <= t < self.tok.eot:
                raise ValueError(f"prefix token {t} is not a text token")
        sot_len = len(self.tok.sot_sequence("en" if self.tok.multilingual else None))
        used = len(prompt_ids) + sot_len + len(req.prefix)
        want = req.max_new_tokens if req.max_new_tokens is not None else opts.max_new_tokens
        sample_len = min(want, self.n_text_ctx // 2, self.n_text_ctx - used)
        if sample_len < 1:
            raise ValueError(f"prompt and prefix ({used} tokens) leave no room to decode")
        return _Row(index, req, prompt_ids, sample_len=sample_len)

    def _prefill(
        self, cross: CrossKV, group: list[_Row], opts: DecodeOptions
    ) -> tuple[np.ndarray, SelfKV]:
        """Run prompt, SOT, language, task and prefix; fill language and no-speech."""
        sp = self.tok.special
        first = np.array([[*r.prompt_ids, sp.sot] for r in group], dtype=np.int64)
        logits_sot, cache = self.model.decode(first, None, cross)
        detected = self._language_from_logits(logits_sot, top_k=1)
        need_lang = [
            i for i, r in enumerate(group) if r.request.language is None and self.tok.multilingual
        ]
        if need_lang and any(r.prompt_ids for r in group):
            # Like Whisper, detect from [SOT] alone so a prompt cannot sway the language.
            sub = take_rows(cross, np.array(need_lang)) if len(need_lang) < len(group) else cross
            for i, res in zip(need_lang, self.detect_language(sub, top_k=1), strict=True):
                detected[i] = LanguageResult(res.lang, res.prob, res.top,
                                             detected[i].no_speech_prob)
        for i, (row, det) in enumerate(zip(group, detected, strict=True)):
            row.no_speech_prob = det.no_speech_prob
            if not self.tok.multilingual:
                row.language, row.language_prob = "en", 1.0
            elif row.request.language is None:
                row.language, row.language_prob = det.lang, det.prob
            else:
                # A given language still gets its probability, for the caller's logs.
                row.language = row.request.language
                lp = softmax(logits_sot[i : i + 1, self._lang_ids])
                row.language_prob = float(lp[0, self._lang_codes.index(row.language)])
        second = np.array(
            [
                [*self.tok.sot_sequence(r.language if self.tok.multilingual else None,
                                        opts.task)[1 : -1 if opts.timestamps else None],
                 *r.request.prefix]
                for r in group
            ],
            dtype=np.int64,
        )
        if second.shape[1] == 0:
            # English-only with timestamps: the logits at SOT are the first token's.
            return logits_sot, cache
        return self.model.decode(second, cache, cross)

    def _filtered_logprobs(self, logits: np.ndarray, begin: np.ndarray) -> np.ndarray:
        """Log-probabilities after suppression; ``begin[i]`` marks rows at their first
        sampled token, where blank and end-of-text are also suppressed."""
        masked = logits + self._suppress
        if begin.any():
            masked[begin] = logits[begin] + self._suppress_begin
        return log_softmax(masked)

    def _timestamp_logprobs(self, logits: np.ndarray, begin: np.ndarray,
                            histories: Sequence[Sequence[int]]) -> np.ndarray:
        """Log-probabilities under Whisper's timestamp rules (``ApplyTimestampRules``).

        Timestamps come in pairs that close one segment and open the next, never go
        back, the first token is a timestamp of at most 1 s, and when the timestamps
        together are likelier than any text token, a timestamp it is.
        """
        ts, eot = self._ts_begin, self.tok.eot
        masked = logits + self._suppress_ts
        if begin.any():
            masked[begin] = logits[begin] + self._suppress_ts_begin
        for k, seq in enumerate(histories):
            last_ts = len(seq) >= 1 and seq[-1] >= ts
            prev_ts = len(seq) < 2 or seq[-2] >= ts
            if last_ts:
                if prev_ts:
                    masked[k, ts:] = -np.inf  # a pair just closed: text (or the end) next
                else:
                    masked[k, :eot] = -np.inf  # one timestamp: another, or the end
            stamps = [t for t in seq if t >= ts]
            if stamps:
                floor = stamps[-1] if last_ts and not prev_ts else stamps[-1] + 1
                masked[k, ts:floor] = -np.inf
            if not seq:
                masked[k, :ts] = -np.inf
                masked[k, ts + 50 + 1 :] = -np.inf  # Whisper's max_initial_timestamp, 1 s
        lp = log_softmax(masked)
        with np.errstate(divide="ignore"):
            for k in range(lp.shape[0]):
                stamp_lp = np.logaddexp.reduce(lp[k, ts:].astype(np.float64))
                if stamp_lp > lp[k, :ts].max():
                    masked[k, :ts] = -np.inf
        return log_softmax(masked)

    def _decode_group(
        self, cross: CrossKV, group: list[_Row], opts: DecodeOptions
    ) -> list[DecodeResult]:
        logits, cache = self._prefill(cross, group, opts)
        if opts.beam_size == 1:
            return self._greedy(logits, cache, cross, group, opts)
        return self._beam(logits, cache, cross, group, opts)

    def _result(self, row: _Row, sampled: Sequence[int], sum_lp: float) -> DecodeResult:
        eot = self.tok.eot
        finished = bool(sampled) and sampled[-1] == eot
        text_tokens = tuple(row.request.prefix) + tuple(t for t in sampled if t < eot)
        timed = tuple(t for t in sampled if t != eot) if any(
            t > eot for t in sampled) else ()
        n_sampled = len(sampled) - (1 if finished else 0)
        return DecodeResult(
            timed=timed,
            tokens=text_tokens,
            text=self.tok.decode(text_tokens),
            language=row.language,
            language_prob=row.language_prob,
            no_speech_prob=row.no_speech_prob,
            sum_logprob=sum_lp,
            avg_logprob=sum_lp / (n_sampled + 1),
            finished=finished,
        )

    def _greedy(
        self,
        logits: np.ndarray,
        cache: SelfKV,
        cross: CrossKV,
        group: list[_Row],
        opts: DecodeOptions,
    ) -> list[DecodeResult]:
        eot = self.tok.eot
        n = len(group)
        sampled: list[list[int]] = [[] for _ in range(n)]
        sum_lp = np.zeros(n, dtype=np.float64)
        alive = np.arange(n)  # group rows still decoding, in cache/cross row order
        suppress_begin = np.array(
            [opts.suppress_blank and not r.request.prefix for r in group], dtype=bool
        )
        rngs = [np.random.default_rng(r.request.seed) for r in group]
        step = 0
        while True:
            if opts.timestamps:
                lp = self._timestamp_logprobs(logits, suppress_begin[alive] & (step == 0),
                                              [sampled[i] for i in alive])
            else:
                lp = self._filtered_logprobs(logits, suppress_begin[alive] & (step == 0))
            if opts.temperature > 0:
                # One RNG per row: a row's sample does not depend on its batch mates.
                probs = softmax(lp / opts.temperature)
                nxt = np.array([rngs[row_i].choice(probs.shape[1], p=probs[j])
                                for j, row_i in enumerate(alive)], dtype=np.int64)
            else:
                nxt = lp.argmax(axis=-1)
            keep = []
            for j, row_i in enumerate(alive):
                t = int(nxt[j])
                sampled[row_i].append(t)
                sum_lp[row_i] += float(lp[j, t])
                if t != eot and len(sampled[row_i]) < group[row_i].sample_len:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(alive):
                # Drop finished rows: their share of every later step is wasted work,
                # which outweighs one copy of the remaining rows' cross K/V.
                k = np.array(keep)
                cache, cross = take_rows(cache, k), take_rows(cross, k)
                alive, nxt = alive[k], nxt[k]
            logits, cache = self.model.decode(nxt[:, None].astype(np.int64), cache, cross)
            step += 1
        return [self._result(group[i], sampled[i], float(sum_lp[i])) for i in range(n)]

    def _beam(
        self,
        logits: np.ndarray,
        cache: SelfKV,
        cross: CrossKV,
        group: list[_Row],
        opts: DecodeOptions,
    ) -> list[DecodeResult]:
        eot = self.tok.eot
        beam = opts.beam_size
        max_candidates = round(beam * opts.patience)
        states = [_Beam() for _ in group]
        # Row layout: utterance u owns rows [start_u, start_u + len(states[u].seqs)).
        active = list(range(len(group)))
        cross_utts = list(active)  # which utterance each cross row belongs to
        step = 0
        while True:
            begin = np.array(
                [opts.suppress_blank and not group[u].request.prefix and step == 0
                 for u in active for _ in states[u].seqs],
                dtype=bool,
            )
            lp = self._filtered_logprobs(logits, begin)
            r0 = 0
            next_active: list[int] = []
            src_rows: list[int] = []
            next_tokens: list[int] = []
            for u in active:
                st = states[u]
                n_rows = len(st.seqs)
                cands: dict[tuple[int, ...], tuple[float, int]] = {}
                for j in range(n_rows):
                    row_lp = lp[r0 + j]
                    top = np.argpartition(-row_lp, beam)[: beam + 1]
                    for t in top:
                        score = st.scores[j] + float(row_lp[t])
                        if not math.isfinite(score):
                            continue
                        seq = (*st.seqs[j], int(t))
                        # Equal sequences come from equal parents only at the first step.
                        if seq not in cands or cands[seq][0] < score:
                            cands[seq] = (score, r0 + j)
                ranked = sorted(cands.items(), key=lambda kv: kv[1][0], reverse=True)
                running: list[tuple[tuple[int, ...], float, int]] = []
                newly: list[tuple[tuple[int, ...], float]] = []
                for seq, (score, src) in ranked:
                    if seq[-1] == eot:
                        newly.append((seq, score))
                    else:
                        running.append((seq, score, src))
                        if len(running) == beam:
                            break
                for seq, score in newly:
                    if len(st.finished) >= max_candidates:
                        break
                    st.finished[seq] = score
                st.seqs = [s for s, _, _ in running]
                st.scores = [sc for _, sc, _ in running]
                r0 += n_rows
                done = len(st.finished) >= max_candidates or not running
                if not done and len(st.seqs[0]) < group[u].sample_len:
                    next_active.append(u)
                    src_rows.extend(src for _, _, src in running)
                    next_tokens.extend(s[-1] for s, _, _ in running)
            if not next_active:
                break
            cache = take_rows(cache, np.array(src_rows))
            want_utts = [u for u in next_active for _ in states[u].seqs]
            if want_utts != cross_utts:
                # Cross K/V only change when utterances finish or beams first fan out;
                # reordering beams inside one utterance leaves them as they are.
                first_row: dict[int, int] = {}
                for i, u in enumerate(cross_utts):
                    first_row.setdefault(u, i)
                cross = take_rows(cross, np.array([first_row[u] for u in want_utts]))
                cross_utts = want_utts
            tokens = np.array(next_tokens, dtype=np.int64)[:, None]
            logits, cache = self.model.decode(tokens, cache, cross)
            active = next_active
            step += 1
        out = []
        for u, row in enumerate(group):
            st = states[u]
            finished = dict(st.finished)
            if len(finished) < beam:
                # Not enough ended in time: rank the running hypotheses too.
                for seq, score in sorted(zip(st.seqs, st.scores, strict=True),
                                         key=lambda x: x[1], reverse=True):
                    finished.setdefault(seq, score)
                    if len(finished) >= beam:
                        break
            best = max(finished.items(), key=lambda kv: self._rank(kv[0], kv[1], opts))
            out.append(self._result(row, best[0], best[1]))
        return out

    def _rank(self, seq: tuple[int, ...], score: float, opts: DecodeOptions) -> float:
        length = len(seq) - (1 if seq and seq[-1] == self.tok.eot else 0)
        if opts.length_penalty is None:
            return score / max(length, 1)
        return float(score / (((5 + length) / 6) ** opts.length_penalty))


# -- engine -----------------------------------------------------------------------------


def to_float_audio(audio: np.ndarray) -> np.ndarray:
    """int16 or float samples to float32 in [-1, 1].

    Args:
        audio: 1-D samples.

    Returns:
        float32 samples.

    Raises:
        ValueError: not 1-D, or not int16/float.
    """
    a = np.asarray(audio)
    if a.ndim != 1:
        raise ValueError(f"audio must be 1-D, got shape {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32, copy=False)
    raise ValueError(f"audio must be int16 or float, got {a.dtype}")


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


# -- files ------------------------------------------------------------------------------


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling through the spectrum (files only, not the live path)."""
    if sr_in == sr_out or x.size == 0:
        return x
    m = max(1, round(x.size * sr_out / sr_in))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(spec.size, m // 2 + 1)
    out_spec = np.zeros(m // 2 + 1, dtype=np.complex128)
    out_spec[:keep] = spec[:keep]
    y = np.fft.irfft(out_spec, n=m) * (m / x.size)
    return y.astype(np.float32)


def read_audio_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a PCM WAV file (any rate, channels averaged) or headerless 16 kHz PCM16
    (``.raw``/``.pcm``) into float32 16 kHz mono.

    Args:
        path: the file.

    Returns:
        float32 samples at 16 kHz.

    Raises:
        ValueError: an unsupported WAV encoding.
        OSError: the file cannot be read.
    """
    p = Path(path)
    if p.suffix.lower() in (".raw", ".pcm"):
        return np.frombuffer(p.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
    try:
        with wave.open(str(p), "rb") as w:
            sr, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            data = w.readframes(w.getnframes())
    except wave.Error as e:
        raise ValueError(f"{p}: not a PCM WAV file ({e})") from None
    if width == 1:
        x = (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    elif width == 4:
        x = np.frombuffer(data, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{p}: unsupported sample width {width}")
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return _resample(x, sr, SAMPLE_RATE)


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


def transcribe_file(
    path: str | os.PathLike[str],
    model: str = "base",
    beam: int = 1,
    *,
    language: str | None = None,
    prompt: str | None = None,
    precision: str = "int8",
    threads: int = 2,
) -> Transcript:
    """Transcribe an audio file with a packaged model (what ``voxgate transcribe`` runs).

    Args:
        path: WAV (any PCM rate/channels) or headerless 16 kHz PCM16 ``.raw``.
        model: ``"base"`` or ``"tiny.en"``.
        beam: beam width (1 = greedy).
        language: language code, or None to detect.
        prompt: initial prompt / hotwords.
        precision: ``"int8"`` or ``"fp32"``.
        threads: onnxruntime intra-op threads.

    Returns:
        The transcript; ``.to_dict()`` is JSON-serialisable (language, timings, RTF).
    """
    audio = read_audio_file(path)
    engine = get_engine(model, precision, threads)
    # Whisper's own temperature fallback, as the reference transcribe does: a file has
    # no partials to hide a looping window behind.
    return engine.transcribe(audio, language=language, beam_size=beam, prompt=prompt,
                             fallback=FallbackPolicy())
