"""ASR service capacity: N concurrent real-time streams of real speech (1, 2, 4, 8, 16).

Starts ``voxgate asr`` as its own process, streams Opus packets over HTTP/2 (link v2) in
real time from N concurrent streams, sends a Finalize at the end of each clip, and
measures per level: partial interval and first-partial latency, final latency after
finalize (p50/p95), server CPU and RSS per stream, and WER of the finals. The peer is the
engine itself: the single-stream offline RTF of ``voxgate transcribe`` on the same
weights, measured in the same run. Reports streams per core at p95 final latency
<= 600 ms. Writes ``bench/out/asr_server.json`` and ``.png``.

    .venv/bin/python bench/asr_server.py [--levels 1,2,4,8,16] [--seconds 15]
        [--partial-model tiny.en] [--partial-window 30]

A/B of server settings in the same run (the machine is shared and noisy, so arms are
interleaved: each repeat runs every level under every arm, a fresh service per run),
e.g. finals degrading to the faster model past capacity, on and off:

    .venv/bin/python bench/asr_server.py --levels 4,8 --seconds 15 --repeats 2 \
        --arm off:degrade_finals=false --arm on:degrade_finals=true
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asr import link
from asr.whisper.normalize import word_errors
from bench.common import (
    OUT,
    VOXGATE,
    cpu_model,
    free_port,
    pct,
    start,
    stop,
    tree_sample,
    write_json,
)
from gateway.h2client import H2Connection, connect
from tests import speech
from tests.linkclient import opus_packets

FINAL_SLA_MS = 600.0


@dataclass
class StreamLog:
    finalize_at: dict[int, float] = field(default_factory=dict)
    first_packet_at: dict[int, float] = field(default_factory=dict)
    partials: dict[int, list[float]] = field(default_factory=dict)
    finals: dict[int, tuple[float, str]] = field(default_factory=dict)
    refs: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    refused: bool = False


def clips() -> list[tuple[np.ndarray, str, list[bytes]]]:
    items = [(speech.goforward(), "go forward ten meters")]
    items += [(a, t) for _, a, t in speech.librivox()]
    items += [(a, t) for _, a, t in speech.cards()]
    return [(a, t, opus_packets(a)) for a, t in items]


async def run_stream(conn: H2Connection, i: int, seconds: float, log: StreamLog,
                     material: list[tuple[np.ndarray, str, list[bytes]]]) -> None:
    h2s = await conn.open_stream("POST", "/v1/recognize",
                                 [("content-type", link.CONTENT_TYPE)])
    await h2s.send(link.encode(link.Start(flow_id=f"bench{i}", lang_hint="en")))
    if await h2s.response() != 200:
        log.refused = True
        return
    dec = link.FrameDecoder(accept=link.SERVER_FRAMES)

    async def reader() -> None:
        while True:
            chunk = await h2s.receive()
            if chunk is None:
                return
            now = time.perf_counter()
            for ev in dec.feed(chunk):
                if not isinstance(ev, link.AsrEvent):
                    continue
                if ev.type == "partial":
                    log.partials.setdefault(ev.utterance, []).append(now)
                elif ev.type == "final":
                    log.finals[ev.utterance] = (now, ev.text)
                elif ev.type == "error":
                    log.errors.append(ev.code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep((i * 0.37) % 1.0)  # streams do not start in lockstep
        t0 = trio.current_time()
        sent_s, seq, pts, utt, k = 0.0, 0, 0, 0, i
        while sent_s < seconds:
            _audio, ref, packets = material[k % len(material)]
            k += 1
            log.refs[utt] = ref
            for p in packets:
                if utt not in log.first_packet_at:
                    log.first_packet_at[utt] = time.perf_counter()
                await h2s.send(link.encode(link.Audio(seq, pts, p)))
                seq += 1
                pts += 20
                sent_s += 0.02
                await trio.sleep_until(t0 + sent_s)
            log.finalize_at[utt] = time.perf_counter()
            await h2s.send(link.encode(link.Finalize()))
            utt += 1
            pts += 500  # half a second of non-speech the gateway would not send
        await h2s.send(link.encode(link.End()))
        await h2s.end()


async def run_level(port: int, n: int, seconds: float, pid: int,
                    material: list[tuple[np.ndarray, str, list[bytes]]]) -> dict[str, object]:
    logs = [StreamLog() for _ in range(n)]
    before = tree_sample(pid)
    peak_rss = before.rss_mb
    async def watch_rss() -> None:
        nonlocal peak_rss
        while True:
            peak_rss = max(peak_rss, tree_sample(pid).rss_mb)
            await trio.sleep(0.5)

    async with connect("127.0.0.1", port) as conn, trio.open_nursery() as outer:
        outer.start_soon(watch_rss)
        with trio.move_on_after(seconds + 90):
            async with trio.open_nursery() as streams:
                for i in range(n):
                    streams.start_soon(run_stream, conn, i, seconds, logs[i], material)
        outer.cancel_scope.cancel()
    after = tree_sample(pid)
    intervals, firsts, finals, errs, words = [], [], [], 0, 0
    for log in logs:
        for u, times in log.partials.items():
            intervals += [1000 * (b - a) for a, b in itertools.pairwise(times)]
            if u in log.first_packet_at:
                firsts.append(1000 * (times[0] - log.first_packet_at[u]))
        for u, (at, text) in log.finals.items():
            if u in log.finalize_at:
                finals.append(1000 * (at - log.finalize_at[u]))
            we = word_errors(log.refs[u], text)
            errs += we.errors
            words += we.ref_words
    cores = (after.cpu_s - before.cpu_s) / (after.at - before.at)
    return {
        "streams": n,
        "refused": sum(log.refused for log in logs),
        "errors": sorted({e for log in logs for e in log.errors}),
        "utterances": sum(len(log.finalize_at) for log in logs),
        "finals": sum(len(log.finals) for log in logs),
        # finals whose utterance got no partial before it (the issue: none over 0.5 s)
        "finals_without_partial": sum(
            1 for log in logs for u, (at, _) in log.finals.items()
            if not any(t < at for t in log.partials.get(u, []))),
        "partial_interval_p50_ms": pct(intervals, 50),
        "partial_interval_p95_ms": pct(intervals, 95),
        "first_partial_p50_ms": pct(firsts, 50),
        "first_partial_p95_ms": pct(firsts, 95),
        "final_latency_p50_ms": pct(finals, 50),
        "final_latency_p95_ms": pct(finals, 95),
        "server_cores": cores,
        "cpu_per_stream": cores / n,
        "rss_mb": peak_rss,
        "rss_per_stream_mb": (peak_rss - before.rss_mb) / n,
        "wer": errs / max(words, 1),
        "final_latencies_ms": finals,
        "first_partials_ms": firsts,
        "word_errors": [errs, words],
    }


def engine_rtf() -> float:
    """Single-stream offline RTF of the same engine (``voxgate transcribe --json``),
    median of three runs on a LibriVox clip, warm-up excluded."""
    clip = str(speech.TESTDATA / "librivox" / "sense_and_sensibility_01_austen_64kb-0870.wav")
    code = ("import json,sys;from asr.whisper.transcribe import transcribe_file as t;"
            f"t({clip!r});print(json.dumps([t({clip!r}).rtf for _ in range(3)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return float(np.median(json.loads(out.strip().splitlines()[-1])))


def _metric(port: int, name: str) -> float:
    """Sum of a counter's samples on the service's /metrics (NaN when unreadable)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _toml_value(value: str) -> str:
    if value in ("true", "false") or value.lstrip("-").replace(".", "", 1).isdigit():
        return value
    return json.dumps(value)


def run_arms(args: argparse.Namespace, levels: list[int], pools: str) -> int:
    """Every level under every arm, ``--repeats`` times, interleaved; pooled figures."""
    arms: list[tuple[str, str]] = []
    for spec in args.arm:
        name, _, settings = spec.partition(":")
        lines = "".join(f"{k.strip()} = {_toml_value(v.strip())}\n" for k, v in
                        (kv.split("=", 1) for kv in settings.split(",") if kv))
        arms.append((name, lines))
    pooled: dict[tuple[str, int], dict[str, list[float]]] = {}
    material = clips()
    for r in range(args.repeats):
        for n in levels:
            for name, lines in arms:
                port = free_port()
                cfg = Path(tempfile.mkdtemp()) / "asr.toml"
                cfg.write_text('default = "en"\n[server]\nmax_streams = 64\n' + lines
                               + pools)
                proc, _ = start(["asr", "--port", str(port), "--config", str(cfg)],
                                "voxgate asr: ready on")
                try:
                    res = trio.run(run_level, port, n, args.seconds, proc.pid, material)
                    degraded = _metric(port, "asr_degraded_finals_total")
                finally:
                    stop(proc)
                acc = pooled.setdefault((name, n), {"fin": [], "first": [], "deg": [],
                                                    "err": [], "words": [], "cores": []})
                acc["fin"] += res["final_latencies_ms"]  # type: ignore[operator]
                acc["first"] += res["first_partials_ms"]  # type: ignore[operator]
                acc["deg"].append(degraded)
                e, w = res["word_errors"]  # type: ignore[misc]
                acc["err"].append(e)
                acc["words"].append(w)
                acc["cores"].append(float(res["server_cores"]))  # type: ignore[arg-type]
                print(f"repeat {r} N={n:>2} {name:>8}: final p50/p95 "
                      f"{res['final_latency_p50_ms']:.0f}/{res['final_latency_p95_ms']:.0f} ms,"
                      f" degraded {degraded:.0f} of {res['finals']}, WER {res['wer']:.3f}, "
                      f"cores {res['server_cores']:.2f}", flush=True)
    print(f"\npooled over {args.repeats} repeats ({cpu_model()}):")
    print(f"{'arm':>8} {'N':>3} {'finals':>6} {'fin p50':>8} {'fin p95':>8} "
          f"{'1st p50':>8} {'1st p95':>8} {'degraded':>8} {'WER %':>6} {'cores':>6}")
    rows = []
    for (name, n), acc in sorted(pooled.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        wer = 100 * sum(acc["err"]) / max(sum(acc["words"]), 1)
        row = {"arm": name, "streams": n, "finals": len(acc["fin"]),
               "final_p50_ms": pct(acc["fin"], 50), "final_p95_ms": pct(acc["fin"], 95),
               "first_partial_p50_ms": pct(acc["first"], 50),
               "first_partial_p95_ms": pct(acc["first"], 95),
               "degraded": sum(acc["deg"]), "wer_pct": wer,
               "cores": float(np.mean(acc["cores"]))}
        rows.append(row)
        print(f"{name:>8} {n:>3} {row['finals']:>6} {row['final_p50_ms']:>8.0f} "
              f"{row['final_p95_ms']:>8.0f} {row['first_partial_p50_ms']:>8.0f} "
              f"{row['first_partial_p95_ms']:>8.0f} {row['degraded']:>8.0f} {wer:>6.1f} "
              f"{row['cores']:>6.2f}")
    path = write_json(args.name, {"arms": [a for a, _ in arms], "repeats": args.repeats,
                                  "seconds": args.seconds, "rows": rows,
                                  "cpu": cpu_model()})
    print(f"wrote {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--seconds", type=float, default=15.0, help="audio per stream per level")
    ap.add_argument("--model", default=None,
                    help="model for finals (en pool; default: the server's default pool)")
    ap.add_argument("--partial-model", default=None, help="model for partials (en pool)")
    ap.add_argument("--partial-window", type=float, default=None,
                    help="partial window in seconds (default: the pool's)")
    ap.add_argument("--final-window", type=float, default=None,
                    help="final window in seconds (default: the pool's, 30)")
    ap.add_argument("--partial-max-gap-ms", type=int, default=None,
                    help="server partial_max_gap_ms (default: the server's, 1000)")
    ap.add_argument("--name", default="asr_server")
    ap.add_argument("--arm", action="append", default=[],
                    help="NAME:key=value,... [server] settings of one arm of an A/B "
                    "(repeat the option per arm)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the arms")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    port = free_port()
    cfg = Path(tempfile.mkdtemp()) / "asr.toml"
    from asr.engine import DEFAULT_POOLS

    en = DEFAULT_POOLS["en"]
    pool = [f'model = "{args.model or en.model}"', 'languages = ["en"]',
            f"final_window_s = {args.final_window or en.final_window_s}",
            f"partial_window_s = {args.partial_window or en.partial_window_s}"]
    if args.model is None and not args.partial_model and en.partial_model:
        pool.append(f'partial_model = "{en.partial_model}"')
    if args.partial_model:
        pool.append(f'partial_model = "{args.partial_model}"')
    if args.arm:
        return run_arms(args, levels, "[pools.en]\n" + "\n".join(pool)
                        + "\n[pools.multi]\nmodel = \"base\"\n")
    server = "max_streams = 64\n"
    if args.partial_max_gap_ms is not None:
        server += f"partial_max_gap_ms = {args.partial_max_gap_ms}\n"
    cfg.write_text("default = \"en\"\n[server]\n" + server + "[pools.en]\n"
                   + "\n".join(pool) + "\n[pools.multi]\nmodel = \"base\"\n")
    print(f"starting {VOXGATE} asr on port {port} ({cfg.read_text().count(chr(10))} "
          "config lines) ...", flush=True)
    proc, _ = start(["asr", "--port", str(port), "--config", str(cfg)], "voxgate asr: ready on")
    material = clips()
    results = []
    try:
        for n in levels:
            r = trio.run(run_level, port, n, args.seconds, proc.pid, material)
            results.append(r)
            print(f"N={n:>2}: final p50/p95 {r['final_latency_p50_ms']:.0f}/"
                  f"{r['final_latency_p95_ms']:.0f} ms, partial interval p50/p95 "
                  f"{r['partial_interval_p50_ms']:.0f}/{r['partial_interval_p95_ms']:.0f} ms,"
                  f" cores {r['server_cores']:.2f}, finals without a partial "
                  f"{r['finals_without_partial']}/{r['finals']}", flush=True)
    finally:
        stop(proc)
    rtf = engine_rtf()
    ok = [r for r in results if r["final_latency_p95_ms"] <= FINAL_SLA_MS
          and not r["refused"]]
    best = max((int(r["streams"]) for r in ok), default=0)
    cores = os.cpu_count() or 1
    header = (f"{'N':>3} {'final p50':>9} {'final p95':>9} {'1st part p50':>12} "
              f"{'1st part p95':>12} {'part int p50':>12} {'part int p95':>12} "
              f"{'cores':>6} {'cpu/strm':>8} {'RSS MB':>7} {'MB/strm':>7} {'WER':>6}")
    print()
    print(f"ASR service, real-time streams of real speech ({cpu_model()}, {cores} cores)")
    print(header)
    for r in results:
        print(f"{r['streams']:>3} {r['final_latency_p50_ms']:>9.0f} "
              f"{r['final_latency_p95_ms']:>9.0f} {r['first_partial_p50_ms']:>12.0f} "
              f"{r['first_partial_p95_ms']:>12.0f} {r['partial_interval_p50_ms']:>12.0f} "
              f"{r['partial_interval_p95_ms']:>12.0f} {r['server_cores']:>6.2f} "
              f"{r['cpu_per_stream']:>8.3f} {r['rss_mb']:>7.0f} "
              f"{r['rss_per_stream_mb']:>7.1f} {r['wer']:>6.3f}")
    print(f"\nstreams per core at p95 final latency <= {FINAL_SLA_MS:.0f} ms: "
          f"{best / cores:.1f} ({best} streams on {cores} cores)")
    print(f"single-stream engine RTF (voxgate transcribe, same weights, "
          f"{cores} threads): {rtf:.3f}")
    data = {"levels": results, "engine_rtf": rtf, "model": args.model,
            "streams_per_core": best / cores,
            "cores": cores, "cpu": cpu_model(), "partial_model": args.partial_model,
            "partial_window_s": args.partial_window, "final_window_s": args.final_window,
            "final_sla_ms": FINAL_SLA_MS}
    path = write_json(args.name, data)
    plot(results, OUT / f"{args.name}.png")
    print(f"wrote {path} and {args.name}.png")
    return 0


def plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["streams"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("final_latency_p50_ms", "final p50"),
                       ("final_latency_p95_ms", "final p95"),
                       ("first_partial_p95_ms", "first partial p95"),
                       ("partial_interval_p95_ms", "partial interval p95")):
        a.plot(n, [r[key] for r in results], marker="o", label=label)
    a.axhline(FINAL_SLA_MS, color="grey", ls="--", lw=1)
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrent real-time streams")
    a.set_ylabel("ms")
    a.legend()
    a.set_title("latency")
    b.plot(n, [r["server_cores"] for r in results], marker="o", label="server cores used")
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrent real-time streams")
    b.set_ylabel("cores")
    b.set_title("ASR service CPU")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
