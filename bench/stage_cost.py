"""Gateway CPU per session, stage by stage, on real speech.

Run from the repository root: ``.venv/bin/python bench/stage_cost.py``.  Prints the
tables, and writes ``bench/out/stage_cost.json`` (and ``stage_cost.png`` when
matplotlib is installed).

Every stage is driven in-process through its sans-IO class, the way
``gateway/session.py`` drives it, on one recording: the LibriVox clips of
``tests.speech.librivox()`` in a row, each followed by an equal gap so the whole lasts
``--seconds`` (60 s by default; the clips are about 25 s of it).  The gaps are low-level
Gaussian noise (``GAP_RMS``), not digital zero, which the encoders would code for
next to nothing.  The stages:

1. reframe: ``Reframer`` fed 20 ms client chunks (640 bytes);
2. VAD: ``VadStream.feed`` per frame and ``VadBatcher.run`` every 32 ms of audio with
   the packaged Silero model, for one session alone (batch of 1) and for 8 and 32
   sessions sharing each tick (cost per session); the sessions' frames arrive at
   staggered phases and each session starts at a different point of the recording;
3. endpointer + speech gate: ``Endpointer`` and ``SpeechGate`` on the frames and the
   batch-1 VAD decisions, in the order the session's pipeline sees them;
4. denoise: ``DenoiseStage`` on the frames the gate sends, flushed at each utterance end;
5. ASR link: ``native.OpusEncoder`` (16 kHz voip, 20 kbit/s VBR, complexity 5, as
   ``gateway.asrlink.AsrStream``) on the frames the gate sends;
6. archive: ``ArchiveEncoder`` on all the audio, 20 ms at a time, then ``close``.

Language ID runs on the ASR service, not the gateway: one ``/v1/lid`` call is timed as
``WhisperEngine.detect_language`` (base int8, 2 threads, as the service loads it) on the
first 3 s of the recording (speech), with the service's 10 s encoder window and with the
full 30 s window, only when the exported model is already in the cache.  A session
makes one to three such calls (checkpoints at 1, 2 and 3 s of speech); the earlier ones
carry less audio but are padded to the same 10 s window, so each is costed as the 3 s one.

Optional sweeps (what the defaults were chosen from):

* ``--archive-sweep``: the archive's encoder path and complexity 0-5 (libopusenc at
  48 kHz as before, libopus 16 kHz ``audio`` = CELT as now, and ``voip`` = SILK), each
  as CPU per audio second and quality proxies of the decoded clips against the input:
  waveform correlation, SNR, log-spectral distance (20 ms frames, loudest 70%);
* ``--gate-sweep``: the VAD's RMS silence gate at several levels: the share of windows
  it decides, and whether the endpointer's utterances stay identical to the ungated ones.

Each figure is the best of ``--repeats`` runs: CPU time of the whole process
(``time.process_time``, so the LID's second thread counts) and, separately, wall time
(``time.perf_counter``).  The CPU minimum is the run least disturbed by other
processes; wall time also counts time other processes held the core.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for bench.common and tests.speech when run as a script

from bench.common import OUT, cpu_model, write_json  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from native.opus import OpusEncoder, opus_version  # noqa: E402
from stages.archive import ArchiveEncoder  # noqa: E402
from stages.denoise import DenoiseStage  # noqa: E402
from stages.endpoint import (  # noqa: E402
    EndpointConfig,
    Endpointer,
    GateEvent,
    SendFrame,
    SpeechGate,
    UtteranceEnded,
)
from stages.reframe import FRAME_SAMPLES, SAMPLE_RATE, PcmFrame, Reframer  # noqa: E402
from stages.vad import VadBatcher, VadModel, VadStream, VadWindow  # noqa: E402
from tests import speech  # noqa: E402

FRAME_MS = FRAME_SAMPLES * 1000 // SAMPLE_RATE  # 20
CHUNK_BYTES = 2 * FRAME_SAMPLES  # one 20 ms client chunk of PCM16
TICK_MS = 32  # VAD tick: one Silero window of audio
BATCHES = (8, 32)  # concurrent sessions sharing a VAD tick
LINK_BITRATE = 20000  # bit/s, GatewayConfig.asr_link_bitrate default
GAP_RMS = 30.0  # int16 units, about -61 dBFS: a quiet room between clips
LID_SPEECH_S = 3.0  # GatewayConfig.lid_first_n_s: the most speech a LID call carries
LID_WINDOW_S = 10.0  # asr.engine.LID_WINDOW_S
LID_CALLS = (1, 3)  # per session: a sure answer at the first checkpoint .. all three
LID_THREADS = 2  # as the ASR service loads its engines

# -- the recording ---------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    audio: npt.NDArray[np.int16]
    clip_samples: int  # samples that come from the clips (the rest is gap)
    clips: int

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def recording(seconds: float) -> Recording:
    """The LibriVox clips, each followed by an equal gap, ``seconds`` long in all (whole
    20 ms frames); speech first, so the first 3 s are what LID would hear."""
    clips = [a for _, a, _ in speech.librivox()]
    speech_n = sum(len(c) for c in clips)
    total = max(int(seconds * SAMPLE_RATE), speech_n) // FRAME_SAMPLES * FRAME_SAMPLES
    gap = max(0, total - speech_n) // len(clips)  # --seconds shorter than the clips: none
    rng = np.random.default_rng(0)
    parts: list[npt.NDArray[np.int16]] = []
    for c in clips:
        parts.append(c)
        parts.append(np.round(rng.normal(0.0, GAP_RMS, gap)).astype(np.int16))
    audio = np.concatenate(parts)
    pad = total - len(audio)
    if pad > 0:
        audio = np.concatenate((audio, np.zeros(pad, np.int16)))
    return Recording(np.ascontiguousarray(audio[:total]), speech_n, len(clips))


# -- timing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    cpu_s: float
    wall_s: float


def best_of(setup: Callable[[], Callable[[], object]], repeats: int) -> Timing:
    """Best CPU and best wall time of ``setup()()`` over ``repeats`` runs; ``setup`` (new
    stage objects) is not timed."""
    cpu = wall = math.inf
    for _ in range(repeats):
        run = setup()
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        run()
        c1, t1 = time.process_time(), time.perf_counter()
        cpu, wall = min(cpu, c1 - c0), min(wall, t1 - t0)
    return Timing(cpu, wall)


# -- stages ----------------------------------------------------------------------------


def reframe_setup(chunks: list[bytes]) -> Callable[[], object]:
    r = Reframer()

    def run() -> None:
        for c in chunks:
            r.feed(c)
        r.flush()

    return run


def vad_setup(
    model: VadModel, samples: npt.NDArray[np.int16], sessions: int,
    record: list[list[VadWindow]] | None = None,
) -> Callable[[], object]:
    """``sessions`` streams ticked together every ``TICK_MS`` of audio; stream ``s`` gets
    its frames ``s/sessions`` of a frame late and starts ``s/sessions`` of the way into
    the recording. ``record``: each tick's decisions of stream 0, for the endpointer."""
    n = len(samples)
    batcher = VadBatcher(model)
    streams = [VadStream() for _ in range(sessions)]
    phase_ms = [s * FRAME_MS / sessions for s in range(sessions)]
    offset = [s * n // sessions for s in range(sessions)]
    ticks = math.ceil((n * FRAME_MS + FRAME_MS) / TICK_MS) + 1
    # frames of stream s arrived by tick k: frame j lands at (j + 1) * 20 ms + phase
    arrived = [
        [min(n, max(0, math.floor((k * TICK_MS - phase_ms[s]) / FRAME_MS))) for k in
         range(ticks + 1)]
        for s in range(sessions)
    ]

    def run() -> None:
        fed = [0] * sessions
        for k in range(1, ticks + 1):
            for s, st in enumerate(streams):
                upto, off = arrived[s][k], offset[s]
                for j in range(fed[s], upto):
                    st.feed(samples[(j + off) % n])
                fed[s] = upto
            ready = [st for st in streams if st.ready]
            if not ready:
                if record is not None:
                    record.append([])
                continue
            results = batcher.run(ready)
            if record is not None:
                record.append(results[0] if ready[0] is streams[0] else [])

    return run


Step = tuple[str, Any]  # ("frame", PcmFrame) or ("vad", list[VadWindow])


def pipeline_steps(frames: list[PcmFrame], tick_windows: list[list[VadWindow]]) -> list[Step]:
    """What the session's pipeline task receives, in order: each tick's new frames, then
    that tick's VAD decisions (batch-1 schedule, phase 0)."""
    steps: list[Step] = []
    fed = 0
    for k, windows in enumerate(tick_windows, start=1):
        upto = min(len(frames), k * TICK_MS // FRAME_MS)
        steps += [("frame", f) for f in frames[fed:upto]]
        fed = upto
        if windows:
            steps.append(("vad", windows))
    steps += [("frame", f) for f in frames[fed:]]
    return steps


def endpoint_config() -> tuple[EndpointConfig, int]:
    """The session's endpointer settings from the gateway defaults, and its pre-roll."""
    c = GatewayConfig()
    return EndpointConfig(
        threshold=c.vad_threshold,
        neg_threshold=max(0.05, c.vad_threshold - 0.15),
        min_speech_ms=c.vad_min_speech_ms,
        endpoint_silence_ms=c.endpoint_silence_ms,
        preroll_ms=c.preroll_ms,
        max_utterance_s=c.max_utterance_s,
    ), c.preroll_ms


def endpoint_setup(steps: list[Step], out: list[GateEvent] | None = None
                   ) -> Callable[[], object]:
    cfg, preroll = endpoint_config()
    ep, gate = Endpointer(cfg), SpeechGate(preroll)
    sink: list[GateEvent] = [] if out is None else out

    def run() -> None:
        for kind, item in steps:
            if kind == "frame":
                sink.extend(gate.frame(item))
                continue
            for w in item:
                for e in ep.feed(w):
                    sink.extend(gate.boundary(e, ep.sendable, ep.horizon))
            sink.extend(gate.trim(ep.sendable, ep.horizon))
        for e in ep.force("flush"):
            sink.extend(gate.boundary(e, ep.sendable, ep.horizon))

    return run


def denoise_setup(gate_out: list[GateEvent]) -> Callable[[], object]:
    stage = DenoiseStage()

    def run() -> None:
        for ev in gate_out:
            if isinstance(ev, SendFrame):
                stage.feed(ev.frame)
            elif isinstance(ev, UtteranceEnded):
                stage.flush()
        stage.flush()
        stage.close()

    return run


def opus_setup(speech_frames: list[npt.NDArray[np.int16]]) -> Callable[[], object]:
    enc = OpusEncoder(16000, 1, "voip", bitrate=LINK_BITRATE, vbr=True, complexity=5)

    def run() -> None:
        for f in speech_frames:
            enc.encode(f)
        enc.close()

    return run


def archive_setup(frames: list[PcmFrame]) -> Callable[[], object]:
    enc = ArchiveEncoder()

    def run() -> None:
        for f in frames:
            enc.feed(f.samples)
        enc.close()

    return run


def lid_rows(audio: npt.NDArray[np.int16], repeats: int) -> tuple[list[dict[str, Any]], str]:
    """One ``/v1/lid`` call on the first 3 s, 10 s window and 30 s window; empty (and why)
    when the exported model is not in the cache."""
    from asr.whisper import cache, weights
    from asr.whisper.engine import WhisperEngine
    from asr.whisper.runtime import load_model

    try:
        engine = WhisperEngine(load_model("base", "int8", LID_THREADS, allow_export=False))
    except (cache.CacheError, weights.WeightsError) as exc:
        return [], f"skipped: {exc}"
    clip = audio[: int(LID_SPEECH_S * SAMPLE_RATE)]
    rows = []
    windows: tuple[tuple[str, float | None], ...] = (
        (f"{LID_WINDOW_S:g} s window", LID_WINDOW_S), ("30 s window", None))
    for label, window in windows:

        def setup(w: float | None = window) -> Callable[[], object]:
            return lambda: engine.detect_language(clip, min_window_s=w)

        engine.detect_language(clip, min_window_s=window)  # warm: the service is warm too
        t = best_of(setup, repeats)
        lang = engine.detect_language(clip, min_window_s=window)
        rows.append({
            "case": f"LID base int8, {LID_SPEECH_S:g} s of speech, {label}",
            "window_s": window if window is not None else 30.0,
            "cpu_ms_per_call": round(t.cpu_s * 1000, 1),
            "wall_ms_per_call": round(t.wall_s * 1000, 1),
            "lang": f"{lang.lang} {lang.prob:.2f}",
        })
    return rows, "base int8, 2 threads"


# -- sweeps ----------------------------------------------------------------------------


def _lsd_db(x: npt.NDArray[np.int16], y: npt.NDArray[np.int16]) -> float:
    """Log-spectral distance over 20 ms Hann frames, the loudest 70% of frames of x."""
    n = min(len(x), len(y)) // FRAME_SAMPLES * FRAME_SAMPLES
    win = np.hanning(FRAME_SAMPLES)
    fx = np.abs(np.fft.rfft(x[:n].reshape(-1, FRAME_SAMPLES) * win, axis=1)) + 1e-3
    fy = np.abs(np.fft.rfft(y[:n].reshape(-1, FRAME_SAMPLES) * win, axis=1)) + 1e-3
    e = (fx ** 2).sum(1)
    keep = e > np.percentile(e, 30)
    return float(np.mean(np.sqrt(np.mean((20 * np.log10(fx[keep] / fy[keep])) ** 2, 1))))


def archive_sweep(repeats: int) -> list[dict[str, Any]]:
    """CPU and quality proxies of the archive's candidate encoders on the clips."""
    import io

    import soundfile

    from native import OggOpusMuxer, OggOpusWriter

    clip = np.concatenate([a for _, a, _ in speech.librivox()])
    secs = len(clip) / SAMPLE_RATE
    chunks = [np.ascontiguousarray(clip[i:i + FRAME_SAMPLES])
              for i in range(0, len(clip), FRAME_SAMPLES)]

    def libopusenc(cx: int) -> Callable[[], bytes]:
        def run() -> bytes:
            w = OggOpusWriter(SAMPLE_RATE, 1, bitrate=24000, complexity=cx, signal="voice",
                              frame_ms=60, max_page_ms=1000)
            out = b"".join(w.write(c) for c in chunks) + w.finish()
            w.close()
            return out
        return run

    def libopus16k(app: str, cx: int) -> Callable[[], bytes]:
        def run() -> bytes:
            enc = OpusEncoder(SAMPLE_RATE, 1, app, bitrate=24000, vbr=True,  # type: ignore[arg-type]
                              complexity=cx)
            mux = OggOpusMuxer(SAMPLE_RATE, pre_skip=enc.lookahead)
            out = [mux.headers()]
            x = np.concatenate((clip, np.zeros(2 * 960, np.int16)))
            for i in range(0, len(x) - 959, 960):
                out.append(mux.packet(enc.encode(np.ascontiguousarray(x[i:i + 960])), 960))
            out.append(mux.finish(len(clip)))
            enc.close()
            return b"".join(out)
        return run

    rows = []
    cases: list[tuple[str, int, Callable[[], bytes]]] = []
    for cx in range(6):
        cases.append(("libopusenc 48 kHz SILK (before)", cx, libopusenc(cx)))
        cases.append(("libopus 16 kHz audio/CELT (now)", cx, libopus16k("audio", cx)))
        cases.append(("libopus 16 kHz voip/SILK", cx, libopus16k("voip", cx)))
    for name, cx, run in cases:
        t = best_of(lambda run=run: run, repeats)
        blob = run()
        dec, _ = soundfile.read(io.BytesIO(blob), dtype="int16")
        n = min(len(dec), len(clip))
        x, y = clip[:n].astype(np.float64), dec[:n].astype(np.float64)
        rows.append({
            "case": name, "complexity": cx,
            "cpu_ms_per_audio_s": round(t.cpu_s * 1000 / secs, 3),
            "kbps": round(len(blob) * 8 / secs / 1000, 1),
            "corr": round(float(np.corrcoef(x, y)[0, 1]), 4),
            "snr_db": round(float(10 * np.log10((x ** 2).sum() / ((x - y) ** 2).sum())), 2),
            "lsd_db": round(_lsd_db(clip[:n], dec[:n]), 2),
            "decoded_samples_exact": len(dec) == len(clip),
        })
    return rows


def gate_sweep(model: VadModel, gates: tuple[float, ...] = (-45, -50, -55, -60, -65)
               ) -> dict[str, Any]:
    """The RMS gate against the ungated VAD on the clips with -61 dBFS pauses."""
    from bench.load import material

    audio = material()
    cfg, _ = endpoint_config()

    cpu: dict[float | None, float] = {}

    def run(gate: float | None) -> tuple[list[Any], list[VadWindow], int]:
        st = VadStream(gate_dbfs=gate)
        for i in range(0, len(audio) - FRAME_SAMPLES + 1, FRAME_SAMPLES):
            st.feed(audio[i:i + FRAME_SAMPLES])
        c0 = time.process_time()
        windows = VadBatcher(model).run([st])[0]
        cpu[gate] = (time.process_time() - c0) * 1000 / (len(audio) / SAMPLE_RATE)
        ep = Endpointer(cfg)
        return [e for w in windows for e in ep.feed(w)], windows, st.gated

    ref, windows, _ = run(None)
    probs = np.array([w.prob for w in windows])
    n = len(probs)
    x = audio[:n * 512].astype(np.float64).reshape(n, 512) / 32768
    dbfs = 10 * np.log10((x ** 2).mean(1) + 1e-20)
    rows = []
    for g in gates:
        evs, _, gated = run(g)
        rows.append({"gate_dbfs": g, "gated_share": round(gated / n, 4),
                     "same_utterances": evs == ref,
                     "vad_cpu_ms_per_audio_s": round(cpu[g], 3)})
    return {"quietest_speech_window_dbfs": round(float(dbfs[probs >= cfg.neg_threshold].min()),
                                                 1),
            "median_pause_window_dbfs": round(float(np.median(dbfs[probs < 0.1])), 1),
            "utterance_events": len(ref), "ungated_vad_cpu_ms_per_audio_s": round(cpu[None], 3),
            "rows": rows}


# -- output ----------------------------------------------------------------------------


def stage_row(name: str, t: Timing, audio_s: float, speech_s: float | None = None
              ) -> dict[str, Any]:
    cpu_ms_s = t.cpu_s * 1000 / audio_s
    return {
        "case": name,
        "cpu_ms_per_audio_s": round(cpu_ms_s, 4),
        "core_pct": round(cpu_ms_s / 10, 4),  # ms per s -> % of one core, real time
        "wall_ms_per_audio_s": round(t.wall_s * 1000 / audio_s, 4),
        "cpu_ms_per_speech_s": (round(t.cpu_s * 1000 / speech_s, 4) if speech_s else None),
    }


def fmt(v: float | None, width: int = 10, digits: int = 3) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def print_stages(rows: list[dict[str, Any]], total: float) -> None:
    width = max(len(r["case"]) for r in rows)
    print(f"{'stage':<{width}}  {'CPU ms/s':>10}  {'% core':>10}  {'wall ms/s':>10}  "
          f"{'of total':>10}  {'ms/s speech':>11}")
    for r in rows:
        share = r.get("share_of_total")
        print(f"{r['case']:<{width}}  {fmt(r['cpu_ms_per_audio_s'])}  {fmt(r['core_pct'])}  "
              f"{fmt(r['wall_ms_per_audio_s'])}  "
              f"{'' if share is None else f'{share * 100:>9.1f}%':>10}  "
              f"{fmt(r['cpu_ms_per_speech_s'], 11)}")
    print(f"{'total, stages 1-6':<{width}}  {fmt(total)}  {fmt(total / 10)}")


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lid = result["lid"]
    stages = result["stages"] + result["vad_batched"]
    fig, axes = plt.subplots(
        1, 2 if lid else 1, figsize=(13 if lid else 9, 5), constrained_layout=True,
        gridspec_kw={"width_ratios": [3, 1]} if lid else None, squeeze=False,
    )
    ax = axes[0][0]
    y = np.arange(len(stages))
    colors = ["C0"] * len(result["stages"]) + ["C1"] * len(result["vad_batched"])
    ax.barh(y, [r["core_pct"] for r in stages], color=colors)
    for yi, r in zip(y, stages, strict=True):
        ax.text(r["core_pct"], yi, f" {r['core_pct']:.3g}%", va="center", fontsize=8)
    ax.set_yticks(y, [r["case"] for r in stages])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("% of one core per real-time session (log)")
    ax.set_title(f"gateway CPU per session, {result['meta']['audio_s']:.0f} s of audio, "
                 f"{result['meta']['clip_fraction'] * 100:.0f}% speech")
    if lid:
        bx = axes[0][1]
        yb = np.arange(len(lid))
        bx.barh(yb - 0.2, [r["cpu_ms_per_call"] for r in lid], 0.4, label="CPU")
        bx.barh(yb + 0.2, [r["wall_ms_per_call"] for r in lid], 0.4, label="wall")
        bx.set_yticks(yb, [f"{r['window_s']:g} s window" for r in lid])
        bx.invert_yaxis()
        bx.set_xlabel("ms per /v1/lid call")
        bx.set_title("language ID (ASR service)")
        bx.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="recording length (s)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the best is kept")
    parser.add_argument("--no-lid", action="store_true", help="skip the language ID rows")
    parser.add_argument("--name", default="stage_cost", help="output file name stem")
    parser.add_argument("--archive-sweep", action="store_true",
                        help="archive encoder paths and complexity 0-5: CPU and quality")
    parser.add_argument("--gate-sweep", action="store_true",
                        help="VAD RMS silence gate levels against the ungated VAD")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    t_start = time.perf_counter()
    rec = recording(args.seconds)
    audio_s = rec.seconds
    chunks = [rec.audio[i:i + FRAME_SAMPLES].tobytes()
              for i in range(0, len(rec.audio), FRAME_SAMPLES)]
    reframer = Reframer()
    frames = [f for c in chunks for f in reframer.feed(c)]
    samples = np.stack([f.samples for f in frames])
    reps = args.repeats

    t_reframe = best_of(lambda: reframe_setup(chunks), reps)

    model = VadModel()
    t_vad: dict[int, Timing] = {}
    tick_windows: list[list[VadWindow]] = []
    vad_setup(model, samples, 1, tick_windows)()  # warm-up, and the decisions to endpoint
    for b in (1, *BATCHES):

        def setup(b: int = b) -> Callable[[], object]:
            return vad_setup(model, samples, b)

        t_vad[b] = best_of(setup, reps)

    steps = pipeline_steps(frames, tick_windows)
    gate_out: list[GateEvent] = []
    endpoint_setup(steps, gate_out)()
    t_endpoint = best_of(lambda: endpoint_setup(steps), reps)
    sent = [ev.frame for ev in gate_out if isinstance(ev, SendFrame)]
    utterances = sum(isinstance(ev, UtteranceEnded) for ev in gate_out)
    sent_s = len(sent) * FRAME_SAMPLES / SAMPLE_RATE

    t_denoise = best_of(lambda: denoise_setup(gate_out), reps)
    t_opus = best_of(lambda: opus_setup([f.samples for f in sent]), reps)
    t_archive = best_of(lambda: archive_setup(frames), reps)

    stages = [
        stage_row("1 reframe (20 ms chunks)", t_reframe, audio_s),
        stage_row("2 VAD Silero, per session (batch 1)", t_vad[1], audio_s),
        stage_row("3 endpointer + speech gate", t_endpoint, audio_s),
        stage_row("4 denoise (gate's frames)", t_denoise, audio_s, sent_s),
        stage_row(f"5 ASR link Opus {LINK_BITRATE // 1000}k c5 (gate's frames)", t_opus,
                  audio_s, sent_s),
        stage_row("6 archive Ogg Opus (all audio)", t_archive, audio_s),
    ]
    total = sum(r["cpu_ms_per_audio_s"] for r in stages)
    for r in stages:
        r["share_of_total"] = round(r["cpu_ms_per_audio_s"] / total, 4)
    vad1 = stages[1]["cpu_ms_per_audio_s"]
    vad_batched = []
    for b in BATCHES:
        t = Timing(t_vad[b].cpu_s / b, t_vad[b].wall_s / b)
        r = stage_row(f"2 VAD Silero, batched across {b} sessions", t, audio_s)
        r["batch1_over_batched"] = round(vad1 / r["cpu_ms_per_audio_s"], 2)
        r["total_with_this_vad_ms_per_s"] = round(total - vad1 + r["cpu_ms_per_audio_s"], 4)
        vad_batched.append(r)

    lid: list[dict[str, Any]] = []
    lid_note = "skipped: --no-lid"
    if not args.no_lid:
        lid, lid_note = lid_rows(rec.audio, reps)

    result: dict[str, Any] = {
        "meta": {
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "libopus": opus_version(),
            "audio_s": round(audio_s, 2),
            "clips": rec.clips,
            "clip_s": round(rec.clip_samples / SAMPLE_RATE, 2),
            "clip_fraction": round(rec.clip_samples / len(rec.audio), 4),
            "gate_sent_s": round(sent_s, 2),
            "gate_fraction": round(sent_s / audio_s, 4),
            "utterances": utterances,
            "vad_tick_ms": TICK_MS,
            "repeats": reps,
            "lid": lid_note,
            "units": "CPU (process_time) and wall ms per second of session audio, best of "
                     "repeats; % core = CPU ms per s / 10",
        },
        "stages": stages,
        "total_cpu_ms_per_audio_s": round(total, 4),
        "total_core_pct": round(total / 10, 4),
        "vad_batched": vad_batched,
        "lid": lid,
    }

    print(f"gateway stage cost per session ({cpu_model()}, {platform.python_version()}), "
          f"best of {reps}")
    clip_s = rec.clip_samples / SAMPLE_RATE
    print(f"recording: {audio_s:.1f} s = {rec.clips} LibriVox clips ({clip_s:.1f} s, "
          f"{clip_s / audio_s * 100:.0f}% speech) + gaps; the gate sent "
          f"{sent_s:.1f} s ({sent_s / audio_s * 100:.0f}%) in {utterances} utterances")
    print("CPU ms/s: CPU ms per second of session audio; % core: of one core per real-time "
          "session;\nms/s speech: CPU ms per second of the frames the gate sent\n")
    print_stages(stages, total)

    print("\npeer in the same run: VAD per session alone vs sharing each 32 ms tick")
    width = max(len(r["case"]) for r in vad_batched)
    print(f"{'':<{width}}  {'CPU ms/s':>10}  {'% core':>10}  {'batch1/this':>11}  "
          f"{'total 1-6':>10}")
    for r in vad_batched:
        print(f"{r['case']:<{width}}  {fmt(r['cpu_ms_per_audio_s'])}  {fmt(r['core_pct'])}  "
              f"{r['batch1_over_batched']:>10.2f}x  {fmt(r['total_with_this_vad_ms_per_s'])}")

    print(f"\nlanguage ID on the ASR service, one /v1/lid call ({lid_note})")
    if lid:
        width = max(len(r["case"]) for r in lid)
        print(f"{'':<{width}}  {'CPU ms':>8}  {'wall ms':>8}  lang")
        for r in lid:
            print(f"{r['case']:<{width}}  {r['cpu_ms_per_call']:>8.1f}  "
                  f"{r['wall_ms_per_call']:>8.1f}  {r['lang']}")
        short, full = lid
        ratio = short["cpu_ms_per_call"] / full["cpu_ms_per_call"]
        result["lid_10s_over_30s_cpu"] = round(ratio, 3)
        session_ms = total * audio_s
        lo, hi = (n * short["cpu_ms_per_call"] for n in LID_CALLS)
        print(f"peer: 10 s window / 30 s window CPU = {ratio:.2f}")
        print(f"per session ({LID_CALLS[0]}-{LID_CALLS[1]} calls): {lo:.0f}-{hi:.0f} ms CPU on "
              f"the ASR service, vs {session_ms:.0f} ms of gateway CPU (stages 1-6) for this "
              f"{audio_s:.0f} s session")

    if args.archive_sweep:
        result["archive_sweep"] = archive_sweep(reps)
        print("\narchive encoder sweep (24 kbit/s, the clips in 20 ms chunks)")
        print(f"{'case':<34} {'cx':>2} {'CPU ms/s':>8} {'kbps':>5} {'corr':>6} "
              f"{'SNR dB':>6} {'LSD dB':>6}")
        for r in result["archive_sweep"]:
            print(f"{r['case']:<34} {r['complexity']:>2} {r['cpu_ms_per_audio_s']:>8.2f} "
                  f"{r['kbps']:>5.1f} {r['corr']:>6.3f} {r['snr_db']:>6.1f} "
                  f"{r['lsd_db']:>6.2f}")
    if args.gate_sweep:
        g = gate_sweep(model)
        result["gate_sweep"] = g
        print(f"\nVAD RMS gate: quietest window scored as speech "
              f"{g['quietest_speech_window_dbfs']} dBFS, median pause "
              f"{g['median_pause_window_dbfs']} dBFS, {g['utterance_events']} endpointer events; "
              f"VAD batch 1 ungated {g['ungated_vad_cpu_ms_per_audio_s']:.2f} CPU ms/s")
        for r in g["rows"]:
            print(f"  gate {r['gate_dbfs']:>4} dBFS: {r['gated_share'] * 100:5.1f}% of windows "
                  f"gated, utterances {'identical' if r['same_utterances'] else 'CHANGED'}, "
                  f"VAD {r['vad_cpu_ms_per_audio_s']:.2f} CPU ms/s")

    path = write_json(args.name, result)
    wrote = [str(path)]
    if plot(result, OUT / f"{args.name}.png"):
        wrote.append(str(OUT / f"{args.name}.png"))
    else:
        print("(matplotlib not installed: no PNG; `pip install -e .[bench]`)")
    print(f"\nwrote {', '.join(wrote)} in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
