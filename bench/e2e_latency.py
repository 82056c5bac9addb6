"""End-to-end latency as the user sees it, against a streaming peer, in real time.

Starts ``voxgate serve`` (gateway + ASR service, the embedded default) and the
WhisperLive server (``bench/peer_whisperlive.py``: faster-whisper on the same
CTranslate2 base weights), one after the other never at once, and drives each with the
same long-form material at the same concurrency: N WebSocket clients, each streaming at
least two minutes of concatenated LibriVox/pocketsphinx speech (``bench/material.py``:
a different order, pauses of 0.3-2.5 s and a different lead-in per session) in 20 ms
chunks paced in real time. Each system is spoken to in its own protocol; the clocks are
the client's.

Per ground-truth utterance (known from the concatenation plan):

* first partial: arrival of the first partial covering it - the wall time its first
  speech sample was sent;
* final: arrival of its final - the wall time its last speech sample was sent;
* partial gap: time between consecutive partials of an utterance (p95);
* utterances with no partial before their final, and utterances with no final.

A missing partial or final is a miss: it counts as +inf in the percentiles (so a p95
that lands on misses prints ``inf``), and the miss counts are printed. Also: streaming
WER (all finals of a session against the reference of its whole material), offline WER
of ``voxgate transcribe --json`` on the same audio, and CPU cores and peak RSS of each
server's process tree from /proc.

Both language settings run: ``user_lang_pref: auto`` (the default, language ID and its
hold; WhisperLive detects the language itself) and ``en``.

    .venv/bin/python bench/peer_whisperlive.py setup         # once: the peer's venv
    .venv/bin/python bench/e2e_latency.py                    # full: 1,2,4,8,16 sessions
    .venv/bin/python bench/e2e_latency.py --quick            # smoke: 1 session, 20 s
    .venv/bin/python bench/e2e_latency.py --sessions 1,4 --lang en --duration 60

Writes ``bench/out/<name>.json`` and ``.png``. Our figures print as ratios of the
peer's (x < 1: we are faster), beside the SLA of issue 10.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import material as mat
from bench import peer_whisperlive
from bench.common import (
    LOG_PATHS,
    OUT,
    VOXGATE,
    Hyp,
    ProcSample,
    UttTiming,
    cpu_model,
    free_port,
    log_lines,
    match_utterances,
    pct_with_misses,
    start,
    stop,
    tree_sample,
    wait_idle,
    write_json,
)

CHUNK = 320  # samples per WebSocket frame: 20 ms at 16 kHz
ENDPOINT_MS = 700.0  # voxgate's default ENDPOINT_SILENCE_MS, the SLA's reference
# Issue 10's targets, by session count: (first partial p50, p95, final p95), ms.
SLA: dict[int, tuple[float | None, float | None, float | None]] = {
    1: (300.0, 600.0, None),
    4: (400.0, 800.0, ENDPOINT_MS + 300.0),
    8: (None, 1500.0, None),
}
CAPACITY_FINAL_P95_MS = ENDPOINT_MS + 600.0  # the capacity line's criterion
SESSION_STAGGER_S = 0.37  # extra start offset per session, on top of the material's lead
DRAIN_S = 30.0  # after the audio: longest wait for the last events (voxgate's `end`,
# WhisperLive's last segment, which it completes only after ~10 identical re-decodes)


@dataclass
class SessionLog:
    """What one client sent and received."""

    sent_at: list[float] = field(default_factory=list)  # perf_counter per 20 ms chunk
    hyps: list[Hyp] = field(default_factory=list)
    finals: list[str] = field(default_factory=list)  # final texts in order
    errors: list[str] = field(default_factory=list)

    def send_time(self, t_s: float) -> float:
        """Wall time at which the chunk holding stream time ``t_s`` was sent."""
        k = min(max(int(t_s * mat.SR) // CHUNK, 0), len(self.sent_at) - 1)
        return self.sent_at[k]


async def _pace(ws: Any, audio: np.ndarray, log: SessionLog) -> None:
    """Send ``audio`` in 20 ms chunks at real-time pace, recording each send time."""
    t0 = trio.current_time()
    for k, pos in enumerate(range(0, len(audio), CHUNK)):
        await trio.sleep_until(t0 + k * CHUNK / mat.SR)
        log.sent_at.append(time.perf_counter())
        await ws.send_message(audio[pos:pos + CHUNK].astype("<i2").tobytes())


async def voxgate_session(url: str, m: mat.Material, lang: str) -> SessionLog:
    """Protocol v1: start, ack, PCM frames, flush, events until ``end``."""
    log = SessionLog()
    start_msg = {"type": "start", "flowId": f"bench-{uuid.uuid4().hex[:8]}",
                 "audio": {"codec": "pcm_s16le", "sr": mat.SR, "channels": 1, "chunk_ms": 20},
                 "hints": {"user_lang_pref": lang}}
    async with open_websocket_url(url, max_message_size=4 << 20) as ws:
        await ws.send_message(json.dumps(start_msg))
        ack = json.loads(await ws.get_message())
        if ack.get("type") != "ack":
            log.errors.append(str(ack.get("code", ack.get("type"))))
            return log
        done = trio.Event()

        async def reader() -> None:
            try:
                while True:
                    e = json.loads(await ws.get_message())
                    now = time.perf_counter()
                    if e["type"] in ("asr_partial", "asr_final"):
                        final = e["type"] == "asr_final"
                        log.hyps.append(Hyp(final, e["start_ms"] / 1000, e["end_ms"] / 1000,
                                            e["text"], now))
                        if final and e["text"]:
                            log.finals.append(e["text"])
                    elif e["type"] == "error":
                        log.errors.append(e.get("code", "?"))
                    elif e["type"] == "end":
                        break
            except ConnectionClosed:
                pass
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            try:
                await _pace(ws, m.audio, log)
                await ws.send_message(json.dumps({"type": "flush"}))
            except ConnectionClosed:
                log.errors.append("closed")
            with trio.move_on_after(DRAIN_S):
                await done.wait()
            if not done.is_set():
                log.errors.append("no end")
            nursery.cancel_scope.cancel()
    return log


async def peer_session(url: str, m: mat.Material, lang: str) -> SessionLog:
    """WhisperLive's protocol (its ``client.py``): a JSON options message, then raw
    audio (int16 here, declared in ``audio_format``), then ``END_OF_AUDIO``. Each answer
    carries the last few segments; ``completed`` ones are final, the open one is the
    partial. Segment times are seconds of the stream."""
    log = SessionLog()
    uid = uuid.uuid4().hex
    opts = {"uid": uid, "language": None if lang == "auto" else lang, "task": "transcribe",
            "model": "base", "use_vad": True, "audio_format": "int16",
            # Its own client's defaults, spelled out: the peer runs as its users get it.
            "send_last_n_segments": 10, "no_speech_thresh": 0.45, "clip_audio": False,
            "same_output_threshold": 10}
    seen_final: set[tuple[str, str, str]] = set()
    async with open_websocket_url(url, max_message_size=4 << 20) as ws:
        await ws.send_message(json.dumps(opts))
        with trio.fail_after(60):
            while True:
                first = json.loads(await ws.get_message())
                if first.get("message") == "SERVER_READY":
                    break
                if first.get("status") in ("WAIT", "ERROR"):
                    log.errors.append(f"{first['status']}: {first.get('message')}")
                    return log

        open_segment = [False]  # the newest answer still has an uncompleted segment
        answered = trio.Event()  # an answer arrived after the material's audio ended

        async def reader() -> None:
            try:
                while True:
                    msg = json.loads(await ws.get_message())
                    now = time.perf_counter()
                    segments = msg.get("segments", [])
                    for s in segments:
                        key = (s["start"], s["end"], s["text"])
                        if s.get("completed"):
                            if key in seen_final:
                                continue  # re-sent history, not news
                            seen_final.add(key)
                            log.finals.append(s["text"])
                        log.hyps.append(Hyp(bool(s.get("completed")), float(s["start"]),
                                            float(s["end"]), s["text"], now))
                    if segments:
                        open_segment[0] = not all(s.get("completed") for s in segments)
                        if len(log.sent_at) * CHUNK >= len(m.audio):
                            answered.set()
                    if msg.get("status") == "ERROR":
                        log.errors.append(str(msg.get("message")))
            except ConnectionClosed:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            try:
                await _pace(ws, m.audio, log)
                # END_OF_AUDIO makes WhisperLive drop its open segment, so a user keeps
                # the microphone open (silence) until the last segment is completed.
                silence = np.zeros(CHUNK, np.int16)
                t0 = trio.current_time()
                k = 0
                while trio.current_time() - t0 < DRAIN_S and (
                        open_segment[0] or not answered.is_set()):
                    k += 1
                    await ws.send_message(silence.tobytes())
                    await trio.sleep_until(t0 + k * CHUNK / mat.SR)
                await ws.send_message(b"END_OF_AUDIO")
            except ConnectionClosed:
                log.errors.append("closed")
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    return log


async def run_level(kind: str, url: str, materials: list[mat.Material], lang: str
                    ) -> list[SessionLog]:
    logs: list[SessionLog | None] = [None] * len(materials)
    session = voxgate_session if kind == "voxgate" else peer_session

    async def one(i: int) -> None:
        await trio.sleep(i * SESSION_STAGGER_S)
        try:
            logs[i] = await session(url, materials[i], lang)
        except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError, KeyError,
                ValueError) as exc:  # a failed session is a result (all misses), not a crash
            logs[i] = SessionLog(errors=[f"{type(exc).__name__}: {exc}"])

    async with trio.open_nursery() as nursery:
        for i in range(len(materials)):
            nursery.start_soon(one, i)
    return [lg if lg is not None else SessionLog(errors=["no log"]) for lg in logs]


async def _watch_rss(pid: int, peak: list[float], stop_ev: trio.Event) -> None:
    while not stop_ev.is_set():
        peak[0] = max(peak[0], tree_sample(pid).rss_mb)
        with trio.move_on_after(1.0):
            await stop_ev.wait()


async def measured_run(kind: str, url: str, pid: int, materials: list[mat.Material],
                       lang: str) -> tuple[list[SessionLog], ProcSample, ProcSample, float]:
    peak = [0.0]
    stop_ev = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_rss, pid, peak, stop_ev)
        s0 = tree_sample(pid)
        logs = await run_level(kind, url, materials, lang)
        s1 = tree_sample(pid)
        stop_ev.set()
    return logs, s0, s1, peak[0]


def summarize(logs: list[SessionLog], materials: list[mat.Material], s0: ProcSample,
              s1: ProcSample, peak_rss: float) -> dict[str, Any]:
    from asr.whisper.normalize import word_errors

    timings: list[UttTiming] = []
    errs = None
    for lg, m in zip(logs, materials, strict=True):
        e = word_errors(m.reference, " ".join(lg.finals))
        errs = e if errs is None else errs + e
        if not lg.sent_at:
            timings += [UttTiming(u.index, None, None, (), False) for u in m.utterances]
            continue
        timings += match_utterances([(u.onset_s, u.end_s) for u in m.utterances], lg.hyps,
                                    lg.send_time)
    fp = [t.first_partial_ms for t in timings]
    fin = [t.final_ms for t in timings]
    gaps = [g for t in timings for g in t.partial_gaps_ms]
    wall = s1.at - s0.at
    return {
        "utterances": len(timings),
        "first_partial_p50_ms": pct_with_misses(fp, 50),
        "first_partial_p95_ms": pct_with_misses(fp, 95),
        "partial_gap_p95_ms": pct_with_misses(gaps, 95) if gaps else math.nan,
        "final_p50_ms": pct_with_misses(fin, 50),
        "final_p95_ms": pct_with_misses(fin, 95),
        "no_partial_before_final": sum(not t.partial_before_final for t in timings),
        "no_partial": sum(v is None for v in fp),
        "no_final": sum(v is None for v in fin),
        "streaming_wer": errs.wer if errs is not None else math.nan,
        "cpu_cores": (s1.cpu_s - s0.cpu_s) / wall if wall > 0 else math.nan,
        "rss_peak_mb": peak_rss,
        "errors": sorted({e for lg in logs for e in lg.errors}),
        "per_utterance": [asdict(t) for t in timings],
    }


def offline_errors(materials: list[mat.Material], tmp: Path) -> list[Any]:
    """Word errors of ``voxgate transcribe --json --language en`` on each session's audio
    (summed over sessions like the streaming WER, so the two compare like for like)."""
    from asr.whisper.normalize import word_errors

    out = []
    for m in materials:
        path = tmp / f"material-{m.seed}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(mat.SR)
            w.writeframes(m.audio.astype("<i2").tobytes())
        r = subprocess.run([VOXGATE, "transcribe", "--json", "--language", "en", str(path)],
                           capture_output=True, text=True, check=True)
        text = json.loads(r.stdout.strip().splitlines()[-1])["text"]
        path.unlink()  # 4 MB per session, written only for the CLI
        out.append(word_errors(m.reference, text))
    return out


def start_peer(tmp: Path, max_clients: int) -> tuple[subprocess.Popen[str], str]:
    py = peer_whisperlive.peer_python()
    if not py.exists():
        raise FileNotFoundError(f"no peer environment at {py}: run "
                                "`.venv/bin/python bench/peer_whisperlive.py setup` first")
    model_dir = peer_whisperlive.prepare_model_dir("base", tmp / "peer-model")
    port = free_port()
    log = (tmp / "peer.log").open("w")  # lives as long as the process
    # The same thread budget as voxgate's ASR gets: the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 2)}
    proc = subprocess.Popen([str(py), str(Path(peer_whisperlive.__file__)), "serve",
                             "--port", str(port), "--model-dir", str(model_dir),
                             "--max-clients", str(max_clients)],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    LOG_PATHS[proc.pid] = tmp / "peer.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"WhisperLive exited: {(tmp / 'peer.log').read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"ws://127.0.0.1:{port}"
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("WhisperLive did not listen within 60 s")


def fmt(v: float) -> str:
    return "inf" if v == math.inf else ("-" if math.isnan(v) else f"{v:.0f}")


def ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    if math.isinf(a) or math.isinf(b):
        return "inf" if math.isinf(a) and not math.isinf(b) else (
            "0" if math.isinf(b) and not math.isinf(a) else "-")
    return f"{a / b:.2f}"


def sla_cell(n: int, key: str, v: float) -> str:
    target = SLA.get(n)
    idx = {"first_partial_p50_ms": 0, "first_partial_p95_ms": 1, "final_p95_ms": 2}.get(key)
    if target is None or idx is None or target[idx] is None:
        return ""
    t = target[idx]
    assert t is not None
    return f"<={t:.0f} {'ok' if v <= t else 'MISS'}"


COLUMNS = (("first_partial_p50_ms", "1st p50"), ("first_partial_p95_ms", "1st p95"),
           ("partial_gap_p95_ms", "gap p95"), ("final_p50_ms", "fin p50"),
           ("final_p95_ms", "fin p95"))


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\nend to end, real time, client clocks ({cpu_model()}); ms; misses = inf; "
          f"ratio = voxgate / WhisperLive")
    head = (f"{'lang':>4} {'N':>2} {'system':<11}" + "".join(f"{h:>9}" for _, h in COLUMNS)
            + f"{'utt':>5}{'noP<F':>6}{'noFin':>6}{'sWER%':>7}{'oWER%':>7}{'cores':>6}"
            f"{'RSS MB':>8}")
    print(head)
    for r in rows:
        for kind in ("voxgate", "peer"):
            s = r.get(kind)
            if s is None:
                continue
            name = "voxgate" if kind == "voxgate" else "WhisperLive"
            print(f"{r['lang']:>4} {r['sessions']:>2} {name:<11}"
                  + "".join(f"{fmt(s[k]):>9}" for k, _ in COLUMNS)
                  + f"{s['utterances']:>5}{s['no_partial_before_final']:>6}{s['no_final']:>6}"
                  f"{100 * s['streaming_wer']:>7.1f}{100 * r['offline_wer']:>7.1f}"
                  f"{s['cpu_cores']:>6.2f}{s['rss_peak_mb']:>8.0f}"
                  + (f"  errors: {','.join(s['errors'])}" if s["errors"] else ""))
        if r.get("voxgate") and r.get("peer"):
            v, p = r["voxgate"], r["peer"]
            print(f"{'':>4} {'':>2} {'ratio':<11}"
                  + "".join(f"{ratio(v[k], p[k]):>9}" for k, _ in COLUMNS))
        if r.get("voxgate"):
            cells = [f"{h} {sla_cell(r['sessions'], k, r['voxgate'][k])}" for k, h in COLUMNS
                     if sla_cell(r["sessions"], k, r["voxgate"][k])]
            if cells:
                print(f"{'':>4} {'':>2} {'SLA':<11}" + "; ".join(cells))


def capacity(rows: list[dict[str, Any]], kind: str, lang: str) -> int:
    """Most sessions measured with final p95 within the capacity criterion (0: none)."""
    ok = [r["sessions"] for r in rows if r["lang"] == lang and r.get(kind)
          and r[kind]["final_p95_ms"] <= CAPACITY_FINAL_P95_MS]
    return max(ok, default=0)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = sorted({r["lang"] for r in rows})
    fig, axes = plt.subplots(1, len(langs), figsize=(6.5 * len(langs), 4.2), squeeze=False)
    for ax, lang in zip(axes[0], langs, strict=True):
        rs = [r for r in rows if r["lang"] == lang]
        for kind, style in (("voxgate", "-"), ("peer", "--")):
            label = "voxgate" if kind == "voxgate" else "WhisperLive"
            for key, name in (("first_partial_p95_ms", "first partial p95"),
                              ("final_p95_ms", "final p95")):
                pts = [(r["sessions"], r[kind][key]) for r in rs if r.get(kind)]
                # A p95 on misses is infinite: draw it at the top edge, marked x.
                xs = [n for n, _ in pts]
                ys = [min(v, 20000.0) for _, v in pts]
                ax.plot(xs, ys, style, marker="o", label=f"{label} {name}")
                for n, v in pts:
                    if math.isinf(v):
                        ax.plot([n], [20000.0], "kx")
        ax.axhline(600, color="green", ls=":", lw=1, label="SLA first partial p95 (1 session)")
        ax.axhline(CAPACITY_FINAL_P95_MS, color="red", ls=":", lw=1,
                   label="capacity: final p95 <= endpoint + 600 ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent real-time sessions")
        ax.set_ylabel("ms, client clock (x: p95 on misses, infinite)")
        ax.set_title(f"user_lang_pref = {lang}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


ASR_METRICS = ("asr_compute_seconds_by_kind_total", "asr_jobs_by_kind_total",
               "asr_speculative_finals_total", "asr_degraded_finals_total")


def asr_metrics(pid: int) -> dict[str, float]:
    """The ASR service's counters that say where its compute went (``voxgate serve``
    names its ASR port on stderr); empty when it cannot be read."""
    import re
    import urllib.request
    port = next((m.group(1) for ln in log_lines(pid)
                 if (m := re.search(r"ASR on http://127\.0\.0\.1:(\d+)", ln))), None)
    if port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for ln in text.splitlines():
        if ln.startswith(ASR_METRICS):
            name, _, value = ln.rpartition(" ")
            out[name] = out.get(name, 0.0) + float(value)
    return out


def _commit() -> str:
    r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe",
                        "--always", "--dirty"], capture_output=True, text=True, check=False)
    return r.stdout.strip()


def dump_log(lg: SessionLog, m: mat.Material) -> dict[str, Any]:
    """One session's results with arrival times in stream seconds (first chunk = 0)."""
    t0 = lg.sent_at[0] if lg.sent_at else 0.0
    return {"seed": m.seed, "errors": lg.errors,
            "utterances": [[u.onset_s, u.end_s, u.text] for u in m.utterances],
            "hyps": [{"final": h.final, "start_s": h.start_s, "end_s": h.end_s,
                      "text": h.text, "recv_s": round(h.recv_s - t0, 3)} for h in lg.hyps]}


def _finite(x: Any) -> Any:
    """JSON has no infinity: a miss-dominated percentile is written as "inf"."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("nan" if math.isnan(x) else "-inf")
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,2,4,8,16", help="concurrency levels")
    ap.add_argument("--lang", default="auto,en", help="user_lang_pref values to run")
    ap.add_argument("--duration", type=float, default=125.0,
                    help="seconds of material per session (>= 120 for the issue's figures)")
    ap.add_argument("--systems", default="voxgate,peer", help="voxgate and/or peer")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (about 2-3 min): 1 session, 20 s of material, both "
                         "langs and systems")
    ap.add_argument("--no-offline", action="store_true", help="skip the offline WER")
    ap.add_argument("--dump-events", action="store_true",
                    help="also write every partial/final each session received to "
                         "bench/out/<name>-events.json")
    ap.add_argument("--name", default="e2e_latency")
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.duration = "1", 20.0
        if args.name == "e2e_latency":
            args.name = "e2e_latency_quick"  # never overwrite a full run's figures
    levels = [int(x) for x in args.sessions.split(",")]
    langs = args.lang.split(",")
    systems = args.systems.split(",")
    t_start = time.monotonic()
    if "peer" in systems and not peer_whisperlive.peer_python().exists():
        print(f"no peer environment at {peer_whisperlive.peer_python()}: run "
              "`.venv/bin/python bench/peer_whisperlive.py setup` (or --systems voxgate)",
              file=sys.stderr)
        return 2

    clips = mat.corpus()
    materials = [mat.plan(clips, min_duration_s=args.duration, seed=i) for i in range(max(levels))]
    tmp = Path(tempfile.mkdtemp(prefix="e2e-latency-"))
    print(f"material: {len(materials)} sessions x {materials[0].duration_s:.0f} s "
          f"({materials[0].speech_s:.0f} s speech, {len(materials[0].utterances)} utterances)",
          flush=True)
    offline = [] if args.no_offline else offline_errors(materials, tmp)
    if offline:
        print(f"offline WER per session: {', '.join(f'{100 * e.wer:.1f}%' for e in offline)}",
              flush=True)

    def offline_wer(n: int) -> float:
        return sum(offline[1:n], offline[0]).wer if offline else math.nan

    rows: list[dict[str, Any]] = [
        {"lang": lang, "sessions": n, "offline_wer": offline_wer(n)}
        for lang in langs for n in levels]
    events: list[dict[str, Any]] = []
    for kind in systems:
        if kind == "voxgate":
            proc, url = start(["serve", "--port", "0", "--http-port", "0"], "ws://",
                              env={"ARCHIVE_DIR": str(tmp / "records")})
        else:
            proc, url = start_peer(tmp, max(levels) + 4)
        try:
            for r in rows:
                ms = materials[:r["sessions"]]
                busy_s = wait_idle(proc.pid)  # leftovers of the previous run
                seen = len(log_lines(proc.pid))
                m0 = asr_metrics(proc.pid) if kind == "voxgate" else {}
                logs, s0, s1, peak = trio.run(measured_run, kind, url, proc.pid, ms, r["lang"])
                r[kind] = summarize(logs, ms, s0, s1, peak)
                if m0:  # what the ASR service did during the run: counter deltas
                    m1 = asr_metrics(proc.pid)
                    r[kind]["asr"] = {k: round(v - m0.get(k, 0.0), 3) for k, v in m1.items()
                                      if v - m0.get(k, 0.0)}
                    print("  asr: " + ", ".join(
                        f"{k.replace('asr_', '').replace('_total', '')} {v:g}"
                        for k, v in sorted(r[kind]["asr"].items())), flush=True)
                if args.dump_events:
                    events.append({"system": kind, "lang": r["lang"], "sessions": r["sessions"],
                                   "logs": [dump_log(lg, m) for lg, m in zip(logs, ms,
                                                                             strict=True)]})
                # The server's own complaints during the run (stream failovers, errors).
                bad = [ln for ln in log_lines(proc.pid)[seen:]
                       if any(w in ln.lower() for w in ("warning", "error", "traceback"))]
                r[kind]["server_warnings"] = len(bad)
                r[kind]["server_warning_sample"] = bad[:5]
                r[kind]["idle_wait_before_s"] = busy_s
                s = r[kind]
                print(f"{kind} lang={r['lang']} N={r['sessions']}: first partial p50/p95 "
                      f"{fmt(s['first_partial_p50_ms'])}/{fmt(s['first_partial_p95_ms'])} ms, "
                      f"final p50/p95 {fmt(s['final_p50_ms'])}/{fmt(s['final_p95_ms'])} ms, "
                      f"no final {s['no_final']}/{s['utterances']}, "
                      f"WER {100 * s['streaming_wer']:.1f}% {s['errors'] or ''}"
                      + (f" ({s['server_warnings']} warning lines in {LOG_PATHS[proc.pid]})"
                         if s["server_warnings"] else ""), flush=True)
        finally:
            stop(proc)

    print_table(rows)
    names = {"voxgate": "voxgate", "peer": "WhisperLive"}
    for lang in langs:
        print(f"capacity (lang={lang}, most sessions of {levels} with final p95 <= "
              f"{CAPACITY_FINAL_P95_MS:.0f} ms): "
              + ", ".join(f"{names[k]} {capacity(rows, k, lang)}" for k in systems))
    elapsed = time.monotonic() - t_start
    data = {"rows": rows, "sla": {str(k): v for k, v in SLA.items()},
            "endpoint_ms": ENDPOINT_MS, "capacity_final_p95_ms": CAPACITY_FINAL_P95_MS,
            "capacity": {lang: {k: capacity(rows, k, lang) for k in systems} for lang in langs},
            "duration_s": args.duration, "material_s": materials[0].duration_s,
            "cpu": cpu_model(), "elapsed_s": elapsed, "commit": _commit(),
            "peer": f"{peer_whisperlive.WHISPER_LIVE} as shipped (faster-whisper backend, "
                    "int8, beam 5, temperature fallback, its Silero VAD filter, one shared "
                    "model), on the same CTranslate2 base weights"}
    path = write_json(args.name, _finite(data))
    if args.dump_events:
        write_json(f"{args.name}-events", _finite({"events": events}))
    plot(rows, OUT / f"{args.name}.png")
    print(f"wrote {path} and {args.name}.png in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
