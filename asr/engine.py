"""The Whisper backend of the ASR service: pools of models behind the scheduler.

A pool names the model for finals, optionally a faster model and a shorter window for
partials, and the languages it serves. Engines are loaded once per (model, precision)
and shared by the pools that use them. Everything here runs in the scheduler's worker
thread; nothing touches the event loop.
"""

from __future__ import annotations

import logging
import math
import tomllib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .backend import LidResult, Recognition, degrade_model
from .scheduler import Job
from .whisper import mel as melmod
from .whisper.engine import Utterance, WhisperEngine
from .whisper.normalize import normalize_english
from .whisper.search import FallbackPolicy
from .whisper.streaming import (
    EnginePartialDecoder,
    LocalAgreement,
    PartialJob,
    trim_repetition,
    word_boundary,
)
from .whisper.tokenizer import LANGUAGES, WhisperTokenizer

log = logging.getLogger("voxgate.asr.engine")

PARTIAL_TOKENS_PER_S = 8.0  # a partial's token budget: speech is ~3 tokens/s ...
# A stable partial prefix is re-checked by an unforced decode each time the audio has
# grown this much since it was last confirmed (StablePartials).
PARTIAL_RECHECK_GROWTH = 1.5
PARTIAL_EXTRA_TOKENS = 8  # ... so a looping partial stops early instead of at 224

# Whisper's own rule for "this window is silence": a likely no-speech token and a
# decode it was not sure of. Without it, silence comes back as "Thank you." and kin.
NO_SPEECH_PROB = 0.6
LOGPROB_THRESHOLD = -1.0

# Finals that loop or are unsure are decoded again: first with beam search (5), then at
# Whisper's temperatures, best of 5 samples each; what still loops after the last one is
# cut to one copy of the loop. Measured on espeak-ng passages at 190 wpm that loop
# greedily in a window of their own length (base, int8): beam 5 first fixed both (WER
# 88 % -> 0 %, 700 % -> 0 %); sampling alone, best of 5, gave 0 % and 20 %, and cost
# more. On the 29-clip margin corpus it fires on about 1 clip in 30 (bench --margins).
FALLBACK = FallbackPolicy(temperatures=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), best_of=5,
                          retry_beam=5, logprob_min=LOGPROB_THRESHOLD,
                          no_speech_prob=NO_SPEECH_PROB)

# Text Whisper makes up on silence, music and noise (its training subtitles' closing
# lines). A partial that says only this (after normalisation) is not shown: the final,
# decoded with the no-speech rule and a full margin, almost never supports it.
SILENCE_PHRASES = frozenset({
    "thank you", "thanks", "thank you very much", "thanks for watching",
    "thank you for watching", "thank you so much for watching", "thanks for listening",
    "you", "bye", "bye bye", "the end", "please subscribe", "subscribe", "music",
    "applause", "silence", "laughter",
})  # not "okay" or "so": real one-word utterances, which need their partial

WINDOW_STEP_FRAMES = 100  # windows are rounded up to whole seconds, so jobs batch


class UnsupportedLanguage(ValueError):
    """A language code that Whisper does not know (``"xx"``), or not a language code.

    The caller's fault: the server answers it with a coded error for that stream only.
    """


def normalize_language(code: str | None) -> str:
    """A language hint as Whisper's code: ``"en-US"``, ``"EN_us"`` and ``"en"`` -> ``"en"``.

    Args:
        code: a BCP 47-ish tag, Whisper code, ``"auto"``, ``""`` or None.

    Returns:
        The Whisper code, or ``"auto"`` for no hint (None, ``""``, ``"auto"``).

    Raises:
        UnsupportedLanguage: a code that is not one of Whisper's languages.
    """
    if code is None:
        return "auto"
    text = str(code).strip().lower()
    if text in ("", "auto"):
        return "auto"
    primary = text.replace("_", "-").split("-", 1)[0]
    if primary not in LANGUAGES:
        raise UnsupportedLanguage(f"unsupported language {code!r}: not one of Whisper's")
    return primary


def window_frames(samples: int, margin_s: float, min_window_s: float) -> int:
    """Encoder window for ``samples`` of audio: ``clamp(audio + margin, min, 30 s)``.

    The trailing margin of padding is what keeps Whisper from looping: a 20 s utterance
    in a window of exactly 20 s decoded to 188 words instead of 60 (issue 10); with 4 s
    of margin or with 30 s it was right. Rounded up to whole seconds so that jobs of
    nearby lengths share one encoder run.

    Args:
        samples: audio length (16 kHz).
        margin_s: padding after the audio, in seconds.
        min_window_s: the shortest window, in seconds.

    Returns:
        Mel frames (even, at most 3000).
    """
    want = max(min_window_s, samples / melmod.SAMPLE_RATE + margin_s)
    frames = math.ceil(want * 100 / WINDOW_STEP_FRAMES - 1e-9) * WINDOW_STEP_FRAMES
    frames = max(frames, -(-min(samples, melmod.N_SAMPLES) // melmod.HOP_LENGTH))
    return min(melmod.N_FRAMES, frames + frames % 2)


def supported_text(text: str) -> bool:
    """Whether a partial's text is worth showing: not empty, not only punctuation, not
    one of :data:`SILENCE_PHRASES`."""
    norm = normalize_english(text)
    return bool(norm) and norm not in SILENCE_PHRASES


@dataclass(frozen=True)
class PoolSpec:
    """One recognition pool.

    Args:
        model: model for finals (``base`` or ``tiny.en``).
        languages: languages it serves; ``("*",)`` is any (language detected).
        partial_model: model for partials (default: ``model``).
        final_margin_s: padding after a final's audio in its encoder window, seconds.
        final_min_window_s: the shortest encoder window of a final, seconds.
        partial_margin_s: the same for partials.
        partial_min_window_s: the same for partials.
        partial_window_s: legacy name of ``partial_min_window_s`` (the new name wins).
        final_window_s: legacy name of ``final_min_window_s`` (the new name wins).
        precision: ``int8`` or ``fp32``.
        beam_size: beam for finals (partials are always greedy).

    The window of a decode is ``clamp(audio + margin, min_window, 30 s)``
    (:func:`window_frames`); see ``DEFAULT_POOLS`` for the measured defaults.
    """

    model: str = "base"
    languages: tuple[str, ...] = ("*",)
    partial_model: str | None = None
    # Measured with bench/asr_quality.py --margins (29 clips, 276 s: pocketsphinx LibriVox,
    # cards, digits, concatenations up to 26 s, espeak-ng passages; greedy, int8, 2
    # threads; CPU time against the 30 s window in the same run). base finals at +5 s,
    # >= 8 s: WER 3.5-4.0 % against 3.99 % at 30 s, CPU x0.57; +3 s and +4 s: 6.7 %
    # (loops on long clips), +2 s: 9.1 %; +8 s, >= 12 s: 3.8 %, CPU x0.59.
    final_margin_s: float = 5.0
    final_min_window_s: float = 8.0
    # Partials against the 30 s window's text of the same prefix (every 1 s prefix):
    # tiny.en +5 s, >= 8 s: 4.6 % apart, CPU x0.50; +8 s, >= 8 s: 3.5 %, x0.58; +8 s,
    # >= 12 s: 3.4 %, x0.60, but a 1 s first partial then costs 140-220 ms instead of
    # 90-110 ms (2 threads). base (3 s prefixes): +5/8 s 3.8 %, +8/12 s 3.6 %, x0.47.
    partial_margin_s: float = 8.0
    partial_min_window_s: float = 8.0
    # An utterance's first partials (until one showed text; the server marks them
    # ``first``) on 0.5-1.5 s of audio. tiny.en on 1 thread, 33 prefixes of 0.5, 0.8 and
    # 1.1 s (11 clips), window +4 s, >= 5 s against +8 s, >= 8 s: 60-90 ms instead of
    # 105-180 ms (CPU x0.63); the same words in 21 of 33 (6 worse, 2 better, the rest a
    # word apart); a loop either way is cut before it is shown (StablePartials).
    first_partial_margin_s: float = 4.0
    first_partial_min_window_s: float = 5.0
    partial_window_s: float | None = None
    final_window_s: float | None = None
    precision: str = "int8"
    beam_size: int = 1

    def __post_init__(self) -> None:
        if self.model.endswith(".en") and self.languages != ("en",):
            raise ValueError(f"{self.model} is English-only: languages must be ['en']")
        # The legacy names set the minimum window (the margin still applies on top)
        # unless the new name is set too; afterwards both read the same, so that
        # ``dataclasses.replace`` of either keeps working.
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("final", "partial"):
            legacy = getattr(self, f"{name}_window_s")
            low = f"{name}_min_window_s"
            if legacy is not None and getattr(self, low) == defaults[low]:
                object.__setattr__(self, low, float(legacy))
            object.__setattr__(self, f"{name}_window_s", getattr(self, low))
        for name in ("final", "partial", "first_partial"):
            margin = getattr(self, f"{name}_margin_s")
            low = getattr(self, f"{name}_min_window_s")
            if not 0.0 <= margin <= 30.0:
                raise ValueError(f"{name}_margin_s must be between 0 and 30, got {margin}")
            if not 1.0 <= low <= 30.0:
                raise ValueError(f"{name}_min_window_s must be between 1 and 30, got {low}")
        if not 1 <= self.beam_size <= 5:
            raise ValueError("beam_size must be between 1 and 5")


# Chosen with bench/asr_server.py (2 cores, real-time streams; see the project notes):
# English finals on base with tiny.en partials gave the lowest final and first-partial
# latency of the strategies measured. Windows are sized to the audio with a trailing
# margin (PoolSpec defaults; measured with bench/asr_quality.py --margins, see there).
# Language ID runs the encoder on a 10 s window, not 30 s: on this 2-core machine that took
# a request from ~1.5 s to ~0.4 s under load, and on LibriVox speech it answered en at
# 0.88-1.00 from 1 s of speech on either window.
LID_WINDOW_S = 10.0

DEFAULT_POOLS: dict[str, PoolSpec] = {
    "en": PoolSpec(model="base", languages=("en",), partial_model="tiny.en"),
    "multi": PoolSpec(model="base", languages=("*",)),
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
        except (TypeError, ValueError) as exc:
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
    only generates the unstable tail. Early agreement can be a mishearing, so once the
    audio is ``PARTIAL_RECHECK_GROWTH`` times as long as when the stable prefix was last
    confirmed, one decode runs unforced (``prefix_for`` returns no prefix) and, if it
    disagrees, the stable prefix is cut back to what they share: a retraction, rather
    than a wrong prefix kept until the final.
    A hypothesis the final would not support is not shown (``update`` returns ""): one
    on audio Whisper calls no-speech (the backend sends it without tokens), and one that
    is only punctuation or a silence phrase ("Thank you.") and has no stable text yet.
    """

    def __init__(self, tok: WhisperTokenizer,
                 recheck_growth: float | None = PARTIAL_RECHECK_GROWTH) -> None:
        self.tok = tok
        self.policy = LocalAgreement(2, word_boundary(tok), recheck_growth=recheck_growth)
        # The audio (samples) of the decode asked for by ``prefix_for`` when it runs
        # unforced; the next ``update`` is its result (one decode at a time).
        self._unforced_at: int | None = None

    @property
    def prefix(self) -> tuple[int, ...]:
        """The stable tokens (a decode forced with them is not a re-check)."""
        return self.policy.committed

    def prefix_for(self, samples: int) -> tuple[int, ...]:
        """The prefix to force on the next decode, of ``samples`` of audio: the stable
        tokens, or none when a re-check is due (or nothing is stable yet)."""
        unforced = not self.policy.committed or self.policy.recheck_due(samples)
        self._unforced_at = samples if unforced else None
        return () if unforced else self.policy.committed

    @property
    def retractions(self) -> int:
        """Re-checks that cut the stable prefix back."""
        return self.policy.retractions

    def update(self, result: Recognition) -> str:
        """The text to show for this hypothesis ("" for none)."""
        unforced_at, self._unforced_at = self._unforced_at, None
        if not result.tokens:
            return ""  # no-speech, or nothing decoded: nothing the final would back
        tokens, looped = trim_repetition(result.tokens)
        stable, tail = self.policy.update(tokens, trusted=result.finished and not looped,
                                          unforced_at=unforced_at)
        text = self.tok.decode(stable + tail).strip()
        return text if supported_text(text) else ""


def _seed(job: Job) -> int:
    """A job's sampling seed: given, or from its audio (the same audio, the same text)."""
    seed = job.options.get("seed")
    if seed is not None:
        return int(seed)
    return zlib.crc32(np.ascontiguousarray(job.audio).tobytes())


@dataclass
class WhisperBackend:
    """Implements ``asr.backend.Backend`` with the ONNX Whisper engines.

    ``run_batch`` isolates jobs: a job that cannot run (an unknown language, a decode
    that raises) gets its exception in its own slot of the result list, and the other
    jobs of the batch still get their text.
    """

    pools_spec: dict[str, PoolSpec] = field(default_factory=lambda: dict(DEFAULT_POOLS))
    default_pool: str = DEFAULT_POOL
    threads: int = 2
    fallback: FallbackPolicy = FALLBACK
    _engines: dict[tuple[str, str], WhisperEngine] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.default_pool not in self.pools_spec:
            raise ValueError(f"default pool {self.default_pool!r} is not defined")
        self.fallback.validate()

    # -- Backend ---------------------------------------------------------------------

    def pools(self) -> dict[str, tuple[str, ...]]:
        return {name: spec.languages for name, spec in self.pools_spec.items()}

    def select_pool(self, lang_hint: str, domain: str) -> str | None:
        """A pool named by ``domain``, else one serving ``lang_hint``, else the default."""
        if domain and domain != "default":
            return domain if domain in self.pools_spec else None
        try:
            hint = normalize_language(lang_hint)
        except UnsupportedLanguage:
            return None
        if hint != "auto":
            for name, spec in self.pools_spec.items():
                if hint in spec.languages:
                    return name
            for name, spec in self.pools_spec.items():
                if "*" in spec.languages and not spec.model.endswith(".en"):
                    return name
            return None
        return self.default_pool

    def normalize_language(self, code: str) -> str:
        """Whisper's code for a stream's ``lang_hint`` (``asr.backend.LanguageNormalizer``),
        so the server refuses an unknown one at Start with ``UNSUPPORTED_LANGUAGE``
        instead of a pool-less ``BAD_START``.

        Raises:
            UnsupportedLanguage: not one of Whisper's languages.
        """
        return normalize_language(code)

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

    def run_batch(self, pool: str, jobs: Sequence[Job]) -> list[Any]:
        """Run ``jobs`` of ``pool``; a failing job gets its exception in its slot.

        Returns:
            One ``Recognition``, ``LidResult`` or ``Exception`` per job (typed ``Any``
            until ``Backend.run_batch`` in asr/backend.py admits exceptions).
        """
        spec = self.pools_spec[pool]
        out: dict[int, Recognition | LidResult | Exception] = {}
        groups: dict[str, list[int]] = {"final": [], "partial": [], "lid": []}
        for i, job in enumerate(jobs):
            if job.kind not in groups:
                out[i] = ValueError(f"unknown job kind {job.kind!r}")
            else:
                groups[job.kind].append(i)
        for kind, run in (("lid", self._lid), ("final", self._finals),
                          ("partial", self._partials)):
            idx = groups[kind]
            if idx:
                self._isolated(run, spec, jobs, idx, out)
        return [out[i] for i in range(len(jobs))]

    def _isolated(self, run: _Runner, spec: PoolSpec, jobs: Sequence[Job], idx: list[int],
                  out: dict[int, Recognition | LidResult | Exception]) -> None:
        """Run ``idx`` together; if that raises, run each alone so one bad job fails
        alone."""
        try:
            run(spec, jobs, idx, out)
            return
        except Exception as exc:
            if len(idx) == 1:
                log.exception("%s job failed", jobs[idx[0]].kind)
                out[idx[0]] = exc
                return
        for i in idx:
            try:
                run(spec, jobs, [i], out)
            except Exception as exc:
                log.exception("%s job failed alone", jobs[i].kind)
                out[i] = exc

    def _language(self, spec: PoolSpec, model: str, job: Job) -> str | None:
        lang = normalize_language(job.options.get("lang"))
        if lang == "auto":
            return self._fixed_language(spec, model)
        if model.endswith(".en") and lang != "en":
            raise UnsupportedLanguage(f"{model} is English-only, asked for {lang!r}")
        return lang

    def _lid(self, spec: PoolSpec, jobs: Sequence[Job], idx: list[int],
             out: dict[int, Recognition | LidResult | Exception]) -> None:
        engine = self.engine(spec.model, spec.precision)
        for i in idx:
            res = engine.detect_language(jobs[i].audio, top_k=5, min_window_s=LID_WINDOW_S)
            out[i] = LidResult(res.lang, res.prob, res.top, res.no_speech_prob)

    def _valid(self, spec: PoolSpec, model: str, jobs: Sequence[Job], idx: list[int],
               out: dict[int, Recognition | LidResult | Exception]
               ) -> list[tuple[int, str | None]]:
        """The jobs of ``idx`` whose language is valid, with it; the others fail."""
        ok = []
        for i in idx:
            try:
                ok.append((i, self._language(spec, model, jobs[i])))
            except UnsupportedLanguage as exc:
                out[i] = exc
        return ok

    def _finals(self, spec: PoolSpec, jobs: Sequence[Job], idx: list[int],
                out: dict[int, Recognition | LidResult | Exception]) -> None:
        """Finals on the pool's model; those the scheduler marked ``degraded`` (the pool
        is past capacity) on its faster model when it has one (``degrade_model``)."""
        fast = degrade_model(spec.model, spec.partial_model, spec.languages)
        quick = [i for i in idx if fast and jobs[i].options.get("degraded")]
        full = [i for i in idx if i not in quick]
        if full:
            self._finals_on(spec, spec.model, jobs, full, out)
        if quick and fast:
            self._finals_on(spec, fast, jobs, quick, out)

    def _finals_on(self, spec: PoolSpec, model: str, jobs: Sequence[Job], idx: list[int],
                   out: dict[int, Recognition | LidResult | Exception]) -> None:
        engine = self.engine(model, spec.precision)
        by_window: dict[int, list[tuple[int, str | None]]] = {}
        for i, lang in self._valid(spec, model, jobs, idx, out):
            if jobs[i].audio.size > melmod.N_SAMPLES:
                # Longer than one window: decoded window by window, seeking by
                # timestamps, so nothing past 30 s is dropped.
                t = engine.transcribe(jobs[i].audio, language=lang,
                                      prompt=jobs[i].options.get("prompt"),
                                      fallback=self.fallback)
                out[i] = Recognition(t.text, t.lang, t.no_speech_prob, t.tokens)
                continue
            frames = window_frames(jobs[i].audio.size, spec.final_margin_s,
                                   spec.final_min_window_s)
            by_window.setdefault(frames, []).append((i, lang))
        for frames, group in sorted(by_window.items()):
            items = [Utterance(jobs[i].audio, 0.0, lang,
                               jobs[i].options.get("prompt"), seed=_seed(jobs[i]))
                     for i, lang in group]
            results = engine.transcribe_batch(items, beam_size=spec.beam_size,
                                              pad_to_frames=frames, fallback=self.fallback)
            for (i, _), t in zip(group, results, strict=True):
                # Whisper's rule, plus: a silence phrase ("you", "Thank you.") on audio
                # it calls no-speech is what it says on silence, even when sure of it.
                silent = t.no_speech_prob > NO_SPEECH_PROB and (
                    t.avg_logprob < LOGPROB_THRESHOLD or not supported_text(t.text))
                if t.temperature > 0 or t.loop_cut:
                    log.info("final fell back: temperature %.1f, loop cut %s",
                             t.temperature, t.loop_cut)
                out[i] = Recognition("" if silent else t.text, t.lang, t.no_speech_prob,
                                     () if silent else t.tokens)

    def _partials(self, spec: PoolSpec, jobs: Sequence[Job], idx: list[int],
                  out: dict[int, Recognition | LidResult | Exception]) -> None:
        model = spec.partial_model or spec.model
        engine = self.engine(model, spec.precision)
        valid = self._valid(spec, model, jobs, idx, out)
        pjobs = []
        for i, lang in valid:
            job = jobs[i]
            audio = job.audio[: melmod.N_SAMPLES]
            prefix = tuple(job.options.get("prefix", ()))
            budget = int(np.ceil(audio.size / melmod.SAMPLE_RATE * PARTIAL_TOKENS_PER_S))
            first = bool(job.options.get("first"))
            pjobs.append(PartialJob(
                audio=audio,
                window_frames=window_frames(
                    audio.size,
                    spec.first_partial_margin_s if first else spec.partial_margin_s,
                    spec.first_partial_min_window_s if first else spec.partial_min_window_s),
                prefix=prefix, language=lang, prompt=job.options.get("prompt"),
                max_new_tokens=max(1, budget + PARTIAL_EXTRA_TOKENS - len(prefix))))
        if not pjobs:
            return
        results = EnginePartialDecoder(engine).decode_partials(pjobs)
        for (i, _), r in zip(valid, results, strict=True):
            silent = r.no_speech_prob > NO_SPEECH_PROB and r.avg_logprob < LOGPROB_THRESHOLD
            text = r.text.strip()
            if silent or not supported_text(text):
                # Nothing the final would support: no text, and no tokens, so the
                # stable-prefix policy shows nothing either.
                out[i] = Recognition("", r.language, r.no_speech_prob, (), r.finished)
            else:
                out[i] = Recognition(text, r.language, r.no_speech_prob, r.tokens,
                                     r.finished)

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
                       "final_margin_s": s.final_margin_s,
                       "final_min_window_s": s.final_min_window_s,
                       "partial_margin_s": s.partial_margin_s,
                       "partial_min_window_s": s.partial_min_window_s,
                       "first_partial_margin_s": s.first_partial_margin_s,
                       "first_partial_min_window_s": s.first_partial_min_window_s,
                       "precision": s.precision}
                for name, s in self.pools_spec.items()}


_Runner = Callable[[PoolSpec, Sequence[Job], list[int],
                    dict[int, Recognition | LidResult | Exception]], None]

