"""Whisper token search against the :class:`~asr.whisper.model.WhisperModel` protocol.

:class:`WhisperDecoder` turns cross-attention K/V into tokens: language detection and
no-speech probability, greedy and beam search (temperature 0), temperature sampling and
the fallback between them (:class:`FallbackPolicy`), suppress lists, an initial prompt
(``<|startofprev|>`` ...), a forced prefix (used by streaming), timestamp rules, several
utterances per decoder run. Audio never enters here: :mod:`asr.whisper.engine` runs the
log-mel and the encoder and hands this module the encoder output.

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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

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


class Judged(Protocol):
    """What :class:`FallbackPolicy` judges: a :class:`DecodeResult`, or a transcript
    built from one (``asr.whisper.engine.Transcript``, which this module must not import:
    the engine is built on the search)."""

    @property
    def text(self) -> str: ...
    @property
    def no_speech_prob(self) -> float: ...
    @property
    def avg_logprob(self) -> float: ...
    @property
    def finished(self) -> bool: ...


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

    def silent(self, r: Judged) -> bool:
        """Whisper's no-speech rule: likely no-speech and an unsure decode."""
        return r.no_speech_prob > self.no_speech_prob and r.avg_logprob < self.logprob_min

    def needs_fallback(self, r: Judged) -> bool:
        """Whether ``r`` should be decoded again at the next temperature."""
        if self.silent(r):
            return False
        return (loops.compression_ratio(r.text) > self.compression_ratio_max
                or r.avg_logprob < self.logprob_min or not r.finished)


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
