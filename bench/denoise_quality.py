"""Does RNNoise help Whisper? WER through the whole path with and without denoise.

Mixes noise into the LibriVox recordings (``tests/speech.py``; ``--sets`` adds the
cards clips) at each ``--snrs`` level and streams every mixture through the full path
twice, in the same run: once to a gateway with ``ENABLE_DENOISE=true`` and once to one
with ``ENABLE_DENOISE=false``, both in front of one ``voxgate asr`` running the real
Whisper engine with its default pools (English: ``base`` finals). Audio is sent as fast
as the gateway takes it (WER does not depend on pacing: VAD and endpointing run on the
raw audio, so both arms cut the same utterances, and a final is a fresh decode of its
utterance). Clean speech is the control.

Noise (seeded; ``--seeds`` draws several realisations per clip):

* ``pink``: Gaussian noise with a 1/f spectrum.
* ``babble``: twelve talkers summed: the four other LibriVox clips twice each (the
  same reader as the target: the hardest case for a denoiser and for the recogniser)
  and four espeak-ng voices, each looped from a random offset and scaled to the same
  power. With fewer talkers the background is intelligible and the recogniser
  transcribes it (hundreds of % WER from insertions).

SNR is the power of the clean clip over the power of the noise, both over the clip;
the noise also covers the 0.5 s of lead and tail around it. WER uses the project's
normalisation (``asr.whisper.normalize.word_errors``), summed over the clips of a
condition.

The denoise stage's CPU cost is measured directly too: :class:`stages.denoise.DenoiseStage`
over every mixture (all of it treated as speech), with the calling thread's CPU clock;
reported as ms of CPU per second of audio and % of one core, with the per-frame latency.
The gateways' own CPU (from /proc) per second of audio is printed beside it: their
difference is what denoise costs inside the gateway.

    .venv/bin/python bench/denoise_quality.py [--snrs 0,5,10] [--noises pink,babble]
        [--seeds 1] [--sets librivox] [--concurrency 2]

Writes ``bench/out/denoise_quality.json`` and ``.png``. The defaults take about 4
minutes on 2 vCPUs; ``--seeds 3 --sets librivox,cards`` (190 mixtures, 843 s of audio
per arm) took 574 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asr.whisper.normalize import WordErrors, normalize_english, word_errors
from bench.common import OUT, cpu_model, free_port, pct, proc_sample, start, stop, write_json
from gateway.client import stream_audio
from stages.denoise import DenoiseStage
from stages.reframe import FRAME_SAMPLES, PcmFrame
from tests import speech

SR = 16000
LEAD_S = TAIL_S = 0.5  # noise-only audio around each clip
BABBLE_VOICES = ("en-us", "en-gb-scotland", "en-029", "en-gb-x-rp")
BABBLE_COPIES = 2  # each other LibriVox clip joins the babble this many times
BABBLE_TEXT = (
    "The committee will meet again on Thursday to review the budget for the coming "
    "year, and every department has been asked to send its figures before noon. "
    "Nobody expected the weather to turn so quickly, but by the afternoon the harbour "
    "was full of boats waiting for the storm to pass."
)
ARMS = ("off", "on")  # ENABLE_DENOISE false / true
SESSION_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Clip:
    name: str
    audio: np.ndarray  # int16, 16 kHz
    ref: str


@dataclass(frozen=True)
class Item:
    """One mixture to recognise: a clip under one condition and noise seed."""

    condition: str  # "clean", "pink 5 dB", ...
    noise: str
    snr_db: float | None
    seed: int
    clip: Clip
    audio: np.ndarray  # int16, with lead and tail


def load_clips(sets: list[str]) -> list[Clip]:
    clips: list[Clip] = []
    if "librivox" in sets:
        clips += [Clip(n, a, t) for n, a, t in speech.librivox() if t]
    if "cards" in sets:
        clips += [Clip(f"cards-{n}", a, t) for n, a, t in speech.cards()]
    return clips


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    return np.fft.irfft(spec, n)


def babble_noise(n: int, rng: np.random.Generator, exclude: str) -> np.ndarray:
    """Twelve talkers: the LibriVox clips other than *exclude*, twice each from different
    offsets, and four espeak-ng voices."""
    talkers = [a for name, a, _ in speech.librivox() if name != exclude] * BABBLE_COPIES
    talkers += [speech.espeak(BABBLE_TEXT, voice=v, speed_wpm=165) for v in BABBLE_VOICES]
    out = np.zeros(n)
    for t in talkers:
        t = t.astype(np.float64)
        t /= np.sqrt(np.mean(t**2))
        looped = np.resize(np.roll(t, int(rng.integers(len(t)))), n)  # np.resize repeats
        out += looped
    return out


def mixture(clip: Clip, noise: str, snr_db: float | None, seed: int) -> np.ndarray:
    lead, tail = np.zeros(int(LEAD_S * SR)), np.zeros(int(TAIL_S * SR))
    x = np.concatenate([lead, clip.audio.astype(np.float64), tail])
    if noise != "clean":
        assert snr_db is not None
        rng = np.random.default_rng([seed, sum(map(ord, clip.name)), int(snr_db)])
        nz = pink_noise(len(x), rng) if noise == "pink" else babble_noise(len(x), rng,
                                                                          clip.name)
        p_speech = np.mean(clip.audio.astype(np.float64) ** 2)
        x += nz * np.sqrt(p_speech / np.mean(nz**2) / 10 ** (snr_db / 10))
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def build_items(clips: list[Clip], noises: list[str], snrs: list[float], seeds: int
                ) -> list[Item]:
    items = [Item("clean", "clean", None, 0, c, mixture(c, "clean", None, 0)) for c in clips]
    for noise in noises:
        for snr in snrs:
            for seed in range(seeds):
                items += [Item(f"{noise} {snr:g} dB", noise, snr, seed, c,
                               mixture(c, noise, snr, seed)) for c in clips]
    return items


# -- the full path ------------------------------------------------------------------------


def drain(proc: subprocess.Popen[str]) -> deque[str]:
    """Read a started service's stdout and stderr for as long as it runs, keeping the
    last lines: its JSON logs would otherwise fill the pipe after a few hundred
    sessions and block it."""
    tail: deque[str] = deque(maxlen=200)

    def pump(stream: Any) -> None:
        for line in stream:
            tail.append(line)

    for stream in (proc.stdout, proc.stderr):
        threading.Thread(target=pump, args=(stream,), daemon=True).start()
    return tail


async def recognise(urls: dict[str, str], items: list[Item], concurrency: int
                    ) -> list[dict[str, Any]]:
    """Every item through both gateways; both arms of an item run side by side."""
    limiter = trio.CapacityLimiter(concurrency)
    results: list[dict[str, Any]] = []
    done = [0]

    async def one(i: int, item: Item, arm: str) -> None:
        async with limiter:
            t0 = time.monotonic()
            try:
                r = await stream_audio(urls[arm], item.audio, realtime=False,
                                       timeout_s=SESSION_TIMEOUT_S, start={
                                           "hints": {"user_lang_pref": "en"},
                                           "return": ["asr", "metrics"]})
            except (trio.TooSlowError, OSError) as exc:
                results.append({"index": i, "arm": arm, "condition": item.condition,
                                "clip": item.clip.name, "seed": item.seed,
                                "failed": f"{type(exc).__name__}: {exc}"})
                print(f"  {item.condition} {item.clip.name} {arm}: FAILED {exc!r}",
                      flush=True)
                return
            wall = time.monotonic() - t0
            done[0] += 1
            if done[0] % 40 == 0:
                print(f"  {done[0]} sessions done", flush=True)
        acks = r.of("ack")
        applied = bool(acks and acks[0]["session"].get("denoise"))
        if applied != (arm == "on"):
            raise RuntimeError(f"gateway for arm {arm!r} reports denoise={applied}: is "
                               "ENABLE_DENOISE wired in gateway/session.py?")
        metrics = (r.of("metrics") or [{}])[0]
        hyp = r.transcript
        we = word_errors(item.clip.ref, hyp)
        if not r.of("end"):
            print(f"  {item.condition} {item.clip.name} {arm}: no end event "
                  f"{r.of('error')}", flush=True)
        results.append({
            "failed": None if r.of("end") else f"no end event: {r.of('error')}",
            "index": i, "arm": arm, "condition": item.condition, "clip": item.clip.name,
            "seed": item.seed, "hyp": hyp, "norm": normalize_english(hyp),
            "errors": we.errors, "ref_words": we.ref_words, "wer": we.wer,
            "sub": we.substitutions, "del": we.deletions, "ins": we.insertions,
            "utterances": len(r.of("asr_final")),
            "client_errors": [e["code"] for e in r.of("error")],
            "audio_s": len(item.audio) / SR, "wall_s": wall,
            "speech_ms": metrics.get("speech_ms"),
            "denoise_ms": metrics.get("stage_ms", {}).get("denoise"),
        })

    async with trio.open_nursery() as nursery:
        for i, item in enumerate(items):
            for arm in (ARMS if i % 2 == 0 else ARMS[::-1]):
                nursery.start_soon(one, i, item, arm)
    return sorted(results, key=lambda r: (r["index"], r["arm"]))


def wer_table(items: list[Item], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """WER per condition and arm, over the mixtures both arms finished."""
    failed = {r["index"] for r in results if r["failed"]}
    rows = []
    for cond in dict.fromkeys(it.condition for it in items):
        row: dict[str, Any] = {"condition": cond, "failed_mixtures": len(
            {i for i in failed if items[i].condition == cond})}
        for arm in ARMS:
            total = WordErrors(0, 0, 0, 0)
            for r in results:
                if r["condition"] == cond and r["arm"] == arm and r["index"] not in failed:
                    total = total + WordErrors(r["sub"], r["del"], r["ins"], r["ref_words"])
            row[f"wer_{arm}"] = total.wer
            row[f"errors_{arm}"] = total.errors
            row[f"sdi_{arm}"] = (total.substitutions, total.deletions, total.insertions)
            row["ref_words"] = total.ref_words
        # Per mixture: does denoise cost or save words? (a sign test's counts)
        by_index: dict[int, dict[str, int]] = {}
        for r in results:
            if r["condition"] == cond and r["index"] not in failed:
                by_index.setdefault(r["index"], {})[r["arm"]] = r["errors"]
        row["on_better"] = sum(e["on"] < e["off"] for e in by_index.values())
        row["on_worse"] = sum(e["on"] > e["off"] for e in by_index.values())
        row["mixtures"] = len(by_index)
        row["delta_points"] = 100 * (row["wer_on"] - row["wer_off"])
        row["on_over_off"] = row["wer_on"] / row["wer_off"] if row["wer_off"] else None
        rows.append(row)
    return rows


# -- the stage's own cost -------------------------------------------------------------------


def stage_cost(items: list[Item], repeats: int, audio_s_max: float) -> dict[str, Any]:
    """DenoiseStage over about *audio_s_max* of the mixtures (spread over the
    conditions), one utterance each, one stage per repeat; CPU is the calling thread's."""
    total = sum(len(i.audio) for i in items) / SR
    items = items[:: max(1, int(total // audio_s_max))]
    per_repeat = []
    frame_ms: list[float] = []
    audio_s = 0.0
    for _ in range(repeats):
        audio_s = 0.0
        with DenoiseStage() as stage:
            for item in items:
                x = item.audio
                n = len(x) // FRAME_SAMPLES
                for k in range(n):
                    stage.feed(PcmFrame(k * FRAME_SAMPLES,
                                        x[k * FRAME_SAMPLES:(k + 1) * FRAME_SAMPLES]))
                    frame_ms.append(stage.statistics().last_frame_ms)
                stage.flush()
                audio_s += n * FRAME_SAMPLES / SR
            s = stage.statistics()
        per_repeat.append({"cpu_s": s.cpu_s, "wall_s": s.wall_s, "frames": s.frames_processed,
                           "cpu_ms_per_audio_s": s.cpu_s * 1000 / audio_s})
    best = min(p["cpu_ms_per_audio_s"] for p in per_repeat)
    med = statistics.median(p["cpu_ms_per_audio_s"] for p in per_repeat)
    return {
        "audio_s_per_repeat": audio_s, "repeats": per_repeat,
        "cpu_ms_per_audio_s_best": best, "cpu_ms_per_audio_s_median": med,
        "core_pct_median": med / 10,
        "frame_ms_p50": pct(frame_ms, 50), "frame_ms_p99": pct(frame_ms, 99),
        "delay_ms": DenoiseStage.delay_ms,
        "hold_ms": DenoiseStage.hold_frames * FRAME_SAMPLES * 1000 / SR,
    }


# -- main ---------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snrs", default="0,5,10", help="SNR levels in dB")
    ap.add_argument("--noises", default="pink,babble")
    ap.add_argument("--seeds", type=int, default=1, help="noise realisations per clip")
    ap.add_argument("--sets", default="librivox", help="librivox and/or cards")
    ap.add_argument("--clips", type=int, default=0, help="use only the first N clips")
    ap.add_argument("--concurrency", type=int, default=2, help="sessions in flight")
    ap.add_argument("--cpu-repeats", type=int, default=3)
    ap.add_argument("--cpu-audio-s", type=float, default=120.0,
                    help="audio the stage's own CPU cost is measured on, per repeat")
    ap.add_argument("--name", default="denoise_quality")
    args = ap.parse_args()

    t_start = time.monotonic()
    clips = load_clips(args.sets.split(","))
    if args.clips:
        clips = clips[: args.clips]
    snrs = [float(s) for s in args.snrs.split(",")]
    items = build_items(clips, args.noises.split(","), snrs, args.seeds)
    print(f"{len(clips)} clips ({sum(len(c.audio) for c in clips) / SR:.1f} s, "
          f"{sum(len(c.ref.split()) for c in clips)} words), {len(items)} mixtures, "
          f"{sum(len(i.audio) for i in items) / SR:.0f} s of audio per arm", flush=True)

    cost = stage_cost(items, args.cpu_repeats, args.cpu_audio_s)
    print(f"stage: {cost['cpu_ms_per_audio_s_median']:.1f} ms CPU per s of audio "
          f"({cost['core_pct_median']:.2f}% of a core), frame p50/p99 "
          f"{cost['frame_ms_p50']:.2f}/{cost['frame_ms_p99']:.2f} ms", flush=True)

    tmp = Path(tempfile.mkdtemp())
    asr_port = free_port()
    asr, _ = start(["asr", "--port", str(asr_port)], "voxgate asr: ready on")
    logs = {"asr": drain(asr)}
    gateways: dict[str, Any] = {}
    urls: dict[str, str] = {}
    try:
        for arm in ARMS:
            proc, url = start(
                ["gateway", "--port", str(free_port()), "--http-port", str(free_port())],
                "ws://", env={"ASR_URLS": f"http://127.0.0.1:{asr_port}",
                              "ENABLE_DENOISE": "true" if arm == "on" else "false",
                              "ENABLE_COMPRESS": "false",
                              "ARCHIVE_DIR": str(tmp / f"records-{arm}")})
            gateways[arm], urls[arm] = proc, url
            logs[arm] = drain(proc)
        before = {arm: proc_sample(p.pid) for arm, p in gateways.items()}
        t0 = time.monotonic()
        results = trio.run(recognise, urls, items, args.concurrency)
        wall = time.monotonic() - t0
        after = {arm: proc_sample(p.pid) for arm, p in gateways.items()}
    finally:
        for proc in gateways.values():
            stop(proc)
        stop(asr)

    audio_s = sum(len(i.audio) for i in items) / SR
    gw_cpu = {arm: (after[arm].cpu_s - before[arm].cpu_s) * 1000 / audio_s for arm in ARMS}
    cost["session_audio_s_mean"] = audio_s / len(items)
    cost["cpu_ms_per_session_mean"] = cost["cpu_ms_per_audio_s_median"] * audio_s / len(items)
    ok = [r for r in results if not r["failed"]]
    speech_s = {arm: sum((r["speech_ms"] or 0) for r in ok if r["arm"] == arm) / 1000
                for arm in ARMS}
    dn_ms = [r["denoise_ms"] for r in ok if r["arm"] == "on" and r["denoise_ms"]]
    rows = wer_table(items, results)
    runtime = time.monotonic() - t_start
    print_table(rows, cost, gw_cpu, speech_s, dn_ms, audio_s, wall, runtime)

    data = {
        "command": " ".join(sys.argv), "runtime_s": runtime, "recognition_wall_s": wall,
        "cpu": cpu_model(), "clips": [c.name for c in clips], "snrs_db": snrs,
        "noises": args.noises.split(","), "seeds": args.seeds, "audio_s_per_arm": audio_s,
        "table": rows, "stage_cost": cost,
        "gateway_cpu_ms_per_audio_s": gw_cpu, "gateway_speech_s": speech_s,
        "gateway_denoise_ms_total": sum(dn_ms) if dn_ms else None,
        "sessions": results,
        "failed_sessions": len(results) - len(ok),
        "service_log_tails": {k: list(v)[-20:] for k, v in logs.items()},
    }
    path = write_json(args.name, data)
    plot(rows, OUT / f"{args.name}.png")
    print(f"wrote {path} and {args.name}.png")
    return 0


def print_table(rows: list[dict[str, Any]], cost: dict[str, Any], gw_cpu: dict[str, float],
                speech_s: dict[str, float], dn_ms: list[float], audio_s: float, wall: float,
                runtime: float) -> None:
    print(f"\nWER through gateway + ASR service (Whisper base), denoise off vs on "
          f"({cpu_model()})")
    print(f"{'condition':<14} {'words':>5} {'WER off':>8} {'WER on':>8} {'delta':>7} "
          f"{'on/off':>7}  {'S/D/I off':>11} {'S/D/I on':>11} {'better/worse/n':>15}")
    for r in rows:
        ratio = "-" if r["on_over_off"] is None else f"{r['on_over_off']:.2f}"
        sdi = ["/".join(map(str, r[f"sdi_{arm}"])) for arm in ARMS]
        bw = f"{r['on_better']}/{r['on_worse']}/{r['mixtures']}"
        failed = f"  ({r['failed_mixtures']} failed)" if r["failed_mixtures"] else ""
        print(f"{r['condition']:<14} {r['ref_words']:>5} {100 * r['wer_off']:>7.1f}% "
              f"{100 * r['wer_on']:>7.1f}% {r['delta_points']:>+6.1f}p {ratio:>7}  "
              f"{sdi[0]:>11} {sdi[1]:>11} {bw:>15}{failed}")
    print("delta: WER on minus WER off, in points; on/off: ratio (below 1: denoise helps); "
          "S/D/I: substituted, deleted, inserted words; better/worse/n: mixtures where "
          "denoise saved / cost words, of n")
    print(f"\ndenoise cost, measured on DenoiseStage: {cost['cpu_ms_per_audio_s_median']:.1f} "
          f"ms CPU per s of audio (best {cost['cpu_ms_per_audio_s_best']:.1f}) = "
          f"{cost['core_pct_median']:.2f}% of a core per session while it speaks; "
          f"per frame p50 {cost['frame_ms_p50']:.2f} ms, p99 {cost['frame_ms_p99']:.2f} ms; "
          f"delay {cost['delay_ms']:.1f} ms (frames held {cost['hold_ms']:.0f} ms); "
          f"{cost['cpu_ms_per_session_mean']:.0f} ms CPU for a mean session of "
          f"{cost['session_audio_s_mean']:.1f} s, all of it speech")
    on_speech = speech_s["on"] or float("nan")
    if dn_ms:
        print(f"in the gateway: denoise {sum(dn_ms) / 1000:.2f} s wall over "
              f"{on_speech:.1f} s of gated speech = {sum(dn_ms) / on_speech:.1f} ms per s "
              "of speech")
    print(f"gateway process CPU per s of audio: off {gw_cpu['off']:.1f} ms, on "
          f"{gw_cpu['on']:.1f} ms (on/off {gw_cpu['on'] / gw_cpu['off']:.2f}; difference "
          f"{gw_cpu['on'] - gw_cpu['off']:+.1f} ms)")
    print(f"{audio_s:.0f} s of audio per arm recognised in {wall:.0f} s; whole run "
          f"{runtime:.0f} s")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4))
    ax.bar(x - 0.2, [100 * r["wer_off"] for r in rows], 0.4, label="denoise off")
    ax.bar(x + 0.2, [100 * r["wer_on"] for r in rows], 0.4, label="denoise on")
    ax.set_xticks(x, [r["condition"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("WER %")
    ax.set_title("Whisper base through the gateway, RNNoise off/on")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
