"""ASR quality and speed: our ONNX Whisper against faster-whisper on the same weights.

Both engines run in the same process and the same run, on the Debian
``pocketsphinx-testdata`` recordings that have transcripts (LibriVox, cards, goforward),
with the same CTranslate2 weights (ours exported to ONNX, theirs read directly), int8
against int8 (ours: the runtime's "int8" export, whose scheme is recorded in the JSON),
the same beam, 30 s windows, 2 threads, temperature 0 without fallback,
no timestamps, no VAD, no conditioning on previous text, language "en". Text is
normalised the same way for both (``asr.whisper.normalize``) before the word error rate.

Timing: one warm-up transcription per engine is excluded; then every clip is timed
``--repeats`` times, alternating which engine goes first so that load from other work
on the machine falls on both. RTF = summed wall time / summed audio time, median over
repeats.

``--partial-windows`` also measures partials with shorter encoder windows: each clip and
its prefixes (every 1 s) are decoded greedily with the window padded to W frames instead
of 3000 and with a partial's token budget (``StreamConfig``), a trailing loop cut to one
copy as a stream shows it (``trim_repetition``), and compared with the
reference (whole clips) and with the 30 s decode of the same prefix (how much a cheap
partial differs from a full-window one).

``--margins 3:5,4:6,5:8`` is a separate study of the encoder windows the service uses
(``asr.engine.window_frames``: ``clamp(audio + margin, minimum, 30 s)``), against the
30 s window measured in the same run, on a larger corpus: every pocketsphinx-testdata
clip (LibriVox, cards, goforward, numbers, something, the 8 kHz TIDIGITS clip),
concatenations of them up to ~25 s, and espeak-ng passages (10-25 s). Each clip is
decoded once as a final would be (greedy, audio-proportional token budget, no fallback,
so a loop shows up as errors; how often the fallback would have fired is counted), and
every 3 s prefix as a partial would be (partial budget, trailing loop cut). It prints
WER against the reference, WER of the same audio against the 30 s window, and
compute / audio (process CPU time, which other work on the machine does not inflate;
wall time and padded window length too), each as a ratio or a difference against the
30 s window; writes
``bench/out/asr_margins.json`` and ``.png``. It does not need faster-whisper.

faster-whisper is a bench-only peer (``pip install faster-whisper``); nothing outside
``bench/`` imports it.

Usage::

    .venv/bin/python bench/asr_quality.py --models base,tiny.en --beam 1 --repeats 3

Writes ``bench/out/asr_quality.json`` and ``bench/out/asr_quality.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asr.engine import (  # noqa: E402
    FALLBACK,
    PARTIAL_EXTRA_TOKENS,
    PARTIAL_TOKENS_PER_S,
    window_frames,
)
from asr.whisper import export, weights  # noqa: E402
from asr.whisper import mel as melmod  # noqa: E402
from asr.whisper.engine import Transcript, Utterance, WhisperEngine  # noqa: E402
from asr.whisper.normalize import WordErrors, normalize_english, word_errors  # noqa: E402
from asr.whisper.search import token_budget  # noqa: E402
from asr.whisper.streaming import trim_repetition  # noqa: E402
from tests import speech  # noqa: E402

OUT = ROOT / "bench" / "out"
THREADS = 2
SR = melmod.SAMPLE_RATE


@dataclass
class Clip:
    set: str
    name: str
    audio: np.ndarray  # int16
    ref: str

    @property
    def seconds(self) -> float:
        return self.audio.size / SR


def load_clips() -> list[Clip]:
    clips = [Clip("librivox", n, a, t) for n, a, t in speech.librivox() if t]
    clips += [Clip("cards", n, a, t) for n, a, t in speech.cards()]
    clips.append(Clip("goforward", "goforward", speech.goforward(), "go forward ten meters"))
    return clips


class Ours:
    label = "voxgate-onnx"

    def __init__(self, model: str, beam: int, precision: str = "int8") -> None:
        self.engine = WhisperEngine.load(model, precision=precision, threads=THREADS)
        self.beam = beam

    def transcribe(self, audio: np.ndarray) -> str:
        return self.engine.transcribe(audio, language="en", beam_size=self.beam).text


class FasterWhisper:
    label = "faster-whisper"

    def __init__(self, model: str, beam: int, workdir: Path) -> None:
        from faster_whisper import WhisperModel

        files = weights.model_files(model)
        # faster-whisper wants one directory with model.bin next to the side files; base's
        # model.bin is the joined copy in our cache, so link everything into one place.
        d = workdir / model
        d.mkdir(parents=True, exist_ok=True)
        for name, src in (("model.bin", files.model_bin), ("config.json", files.config_json),
                          ("tokenizer.json", files.tokenizer_json),
                          ("vocabulary.txt", files.vocabulary_txt)):
            link = d / name
            if not link.exists():
                link.symlink_to(src)
        self.model = WhisperModel(str(d), device="cpu", compute_type="int8",
                                  cpu_threads=THREADS, num_workers=1)
        self.beam = beam

    def transcribe(self, audio: np.ndarray) -> str:
        segments, _ = self.model.transcribe(
            audio.astype(np.float32) / 32768.0,
            language="en",
            beam_size=self.beam,
            without_timestamps=True,
            vad_filter=False,
            condition_on_previous_text=False,
            temperature=0.0,  # same as ours: no temperature fallback
        )
        return "".join(s.text for s in segments).strip()


@dataclass
class EngineResult:
    label: str
    hyps: dict[str, str] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    errors: WordErrors = field(default_factory=lambda: WordErrors(0, 0, 0, 0))
    per_set: dict[str, WordErrors] = field(default_factory=dict)
    rtf_per_repeat: list[float] = field(default_factory=list)

    @property
    def rtf(self) -> float:
        return statistics.median(self.rtf_per_repeat)

    def rtf_best(self, total_audio: float) -> float:
        """Each clip's fastest repeat, summed: less sensitive to load from other work."""
        return sum(min(t) for t in self.times.values()) / total_audio


def bench_model(model: str, beam: int, repeats: int, clips: list[Clip], workdir: Path,
                precision: str = "int8") -> dict[str, Any]:
    engines: list[Ours | FasterWhisper] = [Ours(model, beam, precision),
                                           FasterWhisper(model, beam, workdir)]
    results = [EngineResult(e.label) for e in engines]
    for e in engines:  # warm-up, not timed
        e.transcribe(clips[0].audio)
    total_audio = sum(c.seconds for c in clips)
    for rep in range(repeats):
        spent = [0.0, 0.0]
        for ci, clip in enumerate(clips):
            order = [0, 1] if (rep + ci) % 2 == 0 else [1, 0]
            for k in order:
                t0 = time.perf_counter()
                text = engines[k].transcribe(clip.audio)
                dt = time.perf_counter() - t0
                spent[k] += dt
                results[k].times.setdefault(clip.name, []).append(dt)
                if rep == 0:
                    results[k].hyps[clip.name] = text
        for k in (0, 1):
            results[k].rtf_per_repeat.append(spent[k] / total_audio)
    for r in results:
        for clip in clips:
            we = word_errors(clip.ref, r.hyps[clip.name])
            r.errors = r.errors + we
            r.per_set[clip.set] = r.per_set.get(clip.set, WordErrors(0, 0, 0, 0)) + we
    ours, theirs = results
    return {
        "model": model,
        "precision": precision,
        "beam": beam,
        "repeats": repeats,
        "audio_s": total_audio,
        "engines": {
            r.label: {
                "wer": r.errors.wer,
                "errors": r.errors.errors,
                "ref_words": r.errors.ref_words,
                "wer_per_set": {k: v.wer for k, v in r.per_set.items()},
                "rtf": r.rtf,
                "rtf_best": r.rtf_best(total_audio),
                "rtf_per_repeat": r.rtf_per_repeat,
                "clips": {
                    c.name: {"hyp": r.hyps[c.name], "norm": normalize_english(r.hyps[c.name]),
                             "ref": normalize_english(c.ref),
                             "wer": word_errors(c.ref, r.hyps[c.name]).wer,
                             "median_s": statistics.median(r.times[c.name]),
                             "audio_s": c.seconds}
                    for c in clips
                },
            }
            for r in results
        },
        "wer_diff_points": 100.0 * (ours.errors.wer - theirs.errors.wer),
        "rtf_ratio": ours.rtf / theirs.rtf,
        "rtf_best_ratio": ours.rtf_best(total_audio) / theirs.rtf_best(total_audio),
    }


def _budget(samples: int) -> int:
    # The token budget a streaming partial gets (asr.engine), so that a window that
    # sends the decoder into a loop costs what it would cost in service.
    return math.ceil(samples / SR * PARTIAL_TOKENS_PER_S) + PARTIAL_EXTRA_TOKENS


def _as_partial(engine: WhisperEngine, tr: Transcript) -> str:
    # What a stream would show: a trailing loop cut to one copy (streaming.trim_repetition).
    return engine.tok.decode(trim_repetition(tr.tokens)[0]).strip()


def bench_partial_windows(model: str, windows: list[int], clips: list[Clip],
                          precision: str = "int8") -> dict[str, Any]:
    engine = WhisperEngine.load(model, precision=precision, threads=THREADS)
    engine.transcribe(clips[0].audio, language="en")  # warm-up
    out: dict[str, Any] = {}
    prefixes = [(c, n) for c in clips for n in range(SR, c.audio.size, SR)]
    full_window: dict[tuple[str, int], str] = {}
    for w in sorted(windows, reverse=True):
        vs_ref = WordErrors(0, 0, 0, 0)
        vs_full = WordErrors(0, 0, 0, 0)
        spent = 0.0
        audio_s = 0.0
        for clip in clips:
            frames = min(melmod.N_FRAMES, max(w, -(-clip.audio.size // melmod.HOP_LENGTH)))
            t0 = time.perf_counter()
            [tr] = engine.transcribe_batch([Utterance(clip.audio, language="en")],
                                           pad_to_frames=frames + frames % 2,
                                           max_new_tokens=_budget(clip.audio.size))
            spent += time.perf_counter() - t0
            audio_s += clip.seconds
            vs_ref = vs_ref + word_errors(clip.ref, _as_partial(engine, tr))
        for clip, n in prefixes:
            x = clip.audio[:n]
            frames = min(melmod.N_FRAMES, max(w, -(-n // melmod.HOP_LENGTH)))
            [tr] = engine.transcribe_batch([Utterance(x, language="en")],
                                           pad_to_frames=frames + frames % 2,
                                           max_new_tokens=_budget(n))
            key = (clip.name, n)
            text = _as_partial(engine, tr)
            if w == melmod.N_FRAMES:
                full_window[key] = text
            vs_full = vs_full + word_errors(full_window[key], text)
        out[str(w)] = {
            "window_s": w / 100,
            "wer_full_clips": vs_ref.wer,
            "rtf_full_clips": spent / audio_s,
            "prefixes": len(prefixes),
            "wer_prefixes_vs_30s_window": vs_full.wer,
        }
    return out


ESPEAK_PASSAGES = [
    "We shall fight on the beaches, we shall fight on the landing grounds, we shall fight "
    "in the fields and in the streets, we shall fight in the hills; we shall never "
    "surrender.",
    "The morning train left the station at seven. It crossed the river, passed the old "
    "mill and the farms beyond it, and reached the coast a little after noon, where the "
    "passengers stepped out into the wind.",
    "One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen, "
    "fourteen, fifteen, sixteen, seventeen, eighteen, nineteen, twenty.",
    "Please buy apples, bread, butter, cheese, eggs, flour, milk, onions, potatoes, rice, "
    "salt, sugar and tea, and do not forget the coffee for the office.",
    "If the weather holds, we will walk to the lake, eat by the water, and come back "
    "before dark. If it rains, we will stay in, read, and cook something warm.",
]


def _tidigits() -> Clip | None:
    """The TIDIGITS clip is headerless PCM16 at 8 kHz: resampled to 16 kHz with sox."""
    import subprocess

    path = speech.TESTDATA / "tidigits" / "dhd.2934z.raw"
    if not path.exists():
        return None
    raw = subprocess.run(["sox", "-t", "raw", "-r", "8000", "-e", "signed-integer", "-b",
                          "16", "-c", "1", str(path), "-t", "raw", "-r", str(SR), "-"],
                         check=True, capture_output=True).stdout
    return Clip("tidigits", "dhd.2934z", np.frombuffer(raw, "<i2").copy(),
                "two nine three four zero")


def load_margin_corpus() -> list[Clip]:
    """All pocketsphinx clips, concatenations up to ~25 s, and espeak-ng passages."""
    clips = load_clips()
    for name, ref in (("numbers", ""), ("something", "go somewhere and do something")):
        clips.append(Clip("raw", name, speech.read_raw(speech.TESTDATA / f"{name}.raw"), ref))
    tid = _tidigits()
    if tid is not None:
        clips.append(tid)
    gap = np.zeros(int(0.3 * SR), np.int16)  # a breath between sentences

    def concat(set_: str, name: str, parts: list[Clip]) -> Clip:
        audio = np.concatenate([x for p in parts for x in (p.audio, gap)][:-1])
        return Clip(set_, name, audio, " ".join(p.ref for p in parts))

    libri = [c for c in clips if c.set == "librivox"]
    cards = [c for c in clips if c.set == "cards"]
    clips.append(concat("concat", "librivox-1-3", libri[:3]))
    clips.append(concat("concat", "librivox-2-5", libri[1:]))
    clips.append(concat("concat", "librivox-all", libri))
    clips.append(concat("concat", "cards-all", cards))
    clips.append(concat("concat", "cards-libri", cards[:3] + libri[2:4]))
    for i, text in enumerate(ESPEAK_PASSAGES):
        clips.append(Clip("espeak", f"espeak-{i}", speech.espeak(text), text))
        clips.append(Clip("espeak", f"espeak-{i}-slow", speech.espeak(text, speed_wpm=120),
                          text))
    return [c for c in clips if c.audio.size <= melmod.N_SAMPLES]


def _decode(engine: WhisperEngine, audio: np.ndarray, frames: int,
            budget: int) -> tuple[Transcript, float, float]:
    """One decode; its wall time and its process CPU time (all threads), in s. CPU time
    is what the window costs whatever else the machine runs; wall time is not."""
    t0, c0 = time.perf_counter(), time.process_time()
    [tr] = engine.transcribe_batch([Utterance(audio, language="en", max_new_tokens=budget)],
                                   pad_to_frames=frames, max_new_tokens=budget)
    return tr, time.perf_counter() - t0, time.process_time() - c0


def bench_margins(model: str, settings: list[tuple[float, float]], clips: list[Clip],
                  precision: str = "int8", prefix_step_s: float = 3.0) -> dict[str, Any]:
    """Finals on whole clips and partials on prefixes, per (margin, minimum) setting,
    against the 30 s window in the same run (the first setting measured)."""
    engine = WhisperEngine.load(model, precision=precision, threads=THREADS)
    engine.transcribe(clips[0].audio, language="en")  # warm-up
    step = int(prefix_step_s * SR)
    prefixes = [(c, n) for c in clips for n in range(step, c.audio.size, step)]
    base_final: dict[str, str] = {}
    base_partial: dict[tuple[str, int], str] = {}
    out: dict[str, Any] = {}
    for margin, low in [(30.0, 30.0), *settings]:
        label = "30 s" if margin >= 30 else f"+{margin:g} s, >= {low:g} s"
        vs_ref = WordErrors(0, 0, 0, 0)
        vs_30 = WordErrors(0, 0, 0, 0)
        p_vs_30 = WordErrors(0, 0, 0, 0)
        spent = audio_s = p_spent = p_audio = cpu = p_cpu = window_s = p_window_s = 0.0
        fallbacks = loops_seen = 0
        per_set: dict[str, WordErrors] = {}
        for clip in clips:
            frames = window_frames(clip.audio.size, margin, low)
            tr, dt, dc = _decode(engine, clip.audio, frames, token_budget(clip.audio.size))
            spent, cpu, window_s = spent + dt, cpu + dc, window_s + frames / 100
            audio_s += clip.seconds
            if FALLBACK.needs_fallback(tr):
                fallbacks += 1
            if tr.tokens and trim_repetition(tr.tokens, max_period=32)[1]:
                loops_seen += 1
            if margin >= 30:
                base_final[clip.name] = tr.text
            vs_30 = vs_30 + word_errors(base_final[clip.name], tr.text)
            if clip.ref:
                e = word_errors(clip.ref, tr.text)
                vs_ref = vs_ref + e
                per_set[clip.set] = per_set.get(clip.set, WordErrors(0, 0, 0, 0)) + e
        for clip, n in prefixes:
            frames = window_frames(n, margin, low)
            tr, dt, dc = _decode(engine, clip.audio[:n], frames, _budget(n))
            p_spent, p_cpu, p_window_s = p_spent + dt, p_cpu + dc, p_window_s + frames / 100
            p_audio += n / SR
            text = _as_partial(engine, tr)
            if margin >= 30:
                base_partial[(clip.name, n)] = text
            p_vs_30 = p_vs_30 + word_errors(base_partial[(clip.name, n)], text)
        out[label] = {
            "margin_s": margin, "min_window_s": low,
            "wer_vs_reference": vs_ref.wer,
            "wer_per_set": {k: v.wer for k, v in per_set.items()},
            "wer_finals_vs_30s": vs_30.wer,
            "finals_compute_per_audio": spent / audio_s,
            "finals_cpu_per_audio": cpu / audio_s,
            "finals_window_per_audio": window_s / audio_s,
            "partials_cpu_per_audio": p_cpu / max(p_audio, 1e-9),
            "partials_window_per_audio": p_window_s / max(p_audio, 1e-9),
            "fallback_would_fire": fallbacks, "loops": loops_seen,
            "wer_partials_vs_30s": p_vs_30.wer,
            "partials_compute_per_audio": p_spent / max(p_audio, 1e-9),
            "clips": len(clips), "prefixes": len(prefixes),
        }
        print_margin_row(model, label, out[label], out.get("30 s"), flush=True)
    return out


def print_margin_row(model: str, label: str, r: dict[str, Any], base: dict[str, Any] | None,
                     flush: bool = False) -> None:
    b = base or r
    print(f"{model:8} {label:16} WER ref {100 * r['wer_vs_reference']:6.2f} % "
          f"({100 * (r['wer_vs_reference'] - b['wer_vs_reference']):+5.2f})  "
          f"finals vs 30 s {100 * r['wer_finals_vs_30s']:6.2f} %  "
          f"CPU/audio {r['finals_cpu_per_audio']:.3f} "
          f"(x{r['finals_cpu_per_audio'] / b['finals_cpu_per_audio']:.2f}) "
          f"wall x{r['finals_compute_per_audio'] / b['finals_compute_per_audio']:.2f} "
          f"window x{r['finals_window_per_audio'] / b['finals_window_per_audio']:.2f}  "
          f"fallback {r['fallback_would_fire']:2d} loops {r['loops']:2d} | "
          f"partials vs 30 s {100 * r['wer_partials_vs_30s']:6.2f} %  CPU/audio "
          f"{r['partials_cpu_per_audio']:.3f} "
          f"(x{r['partials_cpu_per_audio'] / b['partials_cpu_per_audio']:.2f}) "
          f"window x{r['partials_window_per_audio'] / b['partials_window_per_audio']:.2f}",
          flush=flush)


def plot_margins(res: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, rows in res.items():
        for ax, kind in ((axes[0], "finals"), (axes[1], "partials")):
            xs = [r[f"{kind}_cpu_per_audio"] for r in rows.values()]
            key = "wer_vs_reference" if kind == "finals" else "wer_partials_vs_30s"
            ys = [100 * r[key] for r in rows.values()]
            ax.plot(xs, ys, "o", label=model)
            for (label, _), x, y in zip(rows.items(), xs, ys, strict=True):
                ax.annotate(label, (x, y), fontsize=6)
    axes[0].set_title("finals: WER vs reference")
    axes[1].set_title("partials (3 s prefixes): WER vs the 30 s window")
    for ax in axes:
        ax.set_xlabel("CPU / audio (process CPU s per audio s, 2 threads)")
        ax.set_ylabel("WER %")
        ax.legend()
    fig.suptitle("Encoder window = clamp(audio + margin, minimum, 30 s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def margins_main(args: argparse.Namespace) -> int:
    """Run the window study (``--margins``)."""
    settings = []
    for item in args.margins.split(","):
        margin, _, low = item.partition(":")
        settings.append((float(margin), float(low or margin)))
    clips = load_margin_corpus()
    print(f"{len(clips)} clips, {sum(c.seconds for c in clips):.1f} s of audio "
          f"({sum(bool(c.ref) for c in clips)} with references); {args.precision}, "
          f"{THREADS} threads, greedy", flush=True)
    res = {m: bench_margins(m, settings, clips, args.precision, args.prefix_step)
           for m in args.models.split(",") if m}
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"bench": "asr_quality --margins", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
              "precision": args.precision, "threads": THREADS,
              "corpus": [{"set": c.set, "name": c.name, "audio_s": c.seconds} for c in clips],
              "models": res}
    (args.out / "asr_margins.json").write_text(json.dumps(report, indent=2))
    plot_margins(res, args.out / "asr_margins.png")
    print(f"wrote {args.out / 'asr_margins.json'} and {args.out / 'asr_margins.png'}")
    return 0


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(f"{'model':8} {'engine':15} {'WER %':>7} {'RTF':>7} {'RTF best':>8}   (ours "
          f"{rows[0]['precision']} vs int8, beam {rows[0]['beam']}, {THREADS} threads, 30 s "
          f"windows, {rows[0]['repeats']} repeats)")
    for r in rows:
        for label, e in r["engines"].items():
            print(f"{r['model']:8} {label:15} {100 * e['wer']:7.2f} {e['rtf']:7.4f} "
                  f"{e['rtf_best']:8.4f}")
        print(f"{r['model']:8} {'ours/theirs':15} {r['wer_diff_points']:+7.2f} "
              f"{r['rtf_ratio']:7.3f} {r['rtf_best_ratio']:8.3f}   (WER: difference in "
              "points; RTF: ratio)")
    print("RTF = median over repeats of wall time / audio time; RTF best = each clip's "
          "fastest repeat")
    print()


def print_partials(model: str, res: dict[str, Any]) -> None:
    print(f"partials, {model}: window  WER(full clips)  RTF(full clips)  "
          f"WER(prefixes vs 30 s window)")
    for w, r in res.items():
        print(f"{'':18}{int(w) / 100:5.0f} s {100 * r['wer_full_clips']:10.2f} % "
              f"{r['rtf_full_clips']:14.4f} {100 * r['wer_prefixes_vs_30s_window']:18.2f} %")
    print()


def plot(rows: list[dict[str, Any]], partials: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 3 if partials else 2
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4))
    models = [r["model"] for r in rows]
    labels = list(rows[0]["engines"])
    x = np.arange(len(models))
    for k, label in enumerate(labels):
        axes[0].bar(x + (k - 0.5) * 0.38, [100 * r["engines"][label]["wer"] for r in rows],
                    0.38, label=label)
        axes[1].bar(x + (k - 0.5) * 0.38, [r["engines"][label]["rtf"] for r in rows],
                    0.38, label=label)
    for ax, title in ((axes[0], "WER % (lower is better)"), (axes[1], "RTF (lower is better)")):
        ax.set_xticks(x, models)
        ax.set_title(title)
        ax.legend()
    top = max(e["rtf"] for r in rows for e in r["engines"].values())
    axes[1].set_ylim(0, top * 1.2)
    for i, r in enumerate(rows):
        axes[1].annotate(f"ours/theirs x{r['rtf_ratio']:.2f}", (i, top * 1.05), ha="center")
    if partials:
        ax = axes[2]
        for model, res in partials.items():
            ws = [int(w) / 100 for w in res]
            ax.plot(ws, [100 * v["wer_prefixes_vs_30s_window"] for v in res.values()], "o-",
                    label=f"{model}: WER vs 30 s window")
            ax.plot(ws, [100 * v["wer_full_clips"] for v in res.values()], "s--",
                    label=f"{model}: WER vs reference")
        ax.set_xlabel("partial window (s)")
        ax.set_title("Partials with shorter windows")
        ax.legend(fontsize=7)
    fig.suptitle(f"voxgate ONNX Whisper vs faster-whisper (int8, {THREADS} threads, "
                 f"beam {rows[0]['beam']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="base,tiny.en")
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="int8", choices=export.PRECISIONS,
                    help="our export to run (faster-whisper always runs int8)")
    ap.add_argument("--partial-windows", default="",
                    help="comma-separated mel frame counts, e.g. 3000,1000,500 (off if empty)")
    ap.add_argument("--margins", default="",
                    help="window study instead: margin:minimum seconds, e.g. 3:5,4:6,5:8")
    ap.add_argument("--prefix-step", type=float, default=3.0,
                    help="--margins: seconds between the prefixes decoded as partials")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.margins:
        return margins_main(args)
    models = [m for m in args.models.split(",") if m]
    windows = [int(w) for w in args.partial_windows.split(",") if w]
    if windows and melmod.N_FRAMES not in windows:
        windows.append(melmod.N_FRAMES)  # the baseline partials are compared against
    clips = load_clips()
    print(f"{len(clips)} clips, {sum(c.seconds for c in clips):.1f} s of audio; "
          f"models {models}, beam {args.beam}, {args.repeats} repeats", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fw-models-") as tmp:
        for m in models:
            rows.append(bench_model(m, args.beam, args.repeats, clips, Path(tmp),
                                    args.precision))
            print_table(rows[-1:])
    partials: dict[str, dict[str, Any]] = {}
    for m in models if windows else []:
        partials[m] = bench_partial_windows(m, windows, clips, args.precision)
        print_partials(m, partials[m])
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": "asr_quality",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "settings": {"precision": {"ours": args.precision,
                                   "ours_scheme": {"int8": export.INT8_SCHEME,
                                                   "int8dyn": export.INT8DYN_SCHEME,
                                                   "fp32": "fp32"}[args.precision],
                                   "faster-whisper": "int8 (CTranslate2 compute_type)"},
                     "threads": THREADS, "beam": args.beam,
                     "window": "30 s (ours: audio zero-padded; faster-whisper: features "
                               "zero-padded, its own way)",
                     "temperature": 0.0, "language": "en", "timestamps": False,
                     "vad": False, "condition_on_previous_text": False},
        "models": rows,
        "partial_windows": partials,
    }
    (args.out / "asr_quality.json").write_text(json.dumps(report, indent=2))
    plot(rows, partials, args.out / "asr_quality.png")
    print(f"wrote {args.out / 'asr_quality.json'} and {args.out / 'asr_quality.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
