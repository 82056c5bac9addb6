"""Soak: N sessions for T minutes, each one connect / stream / flush / reconnect, repeated.

    .venv/bin/python bench/soak.py --spawn --sessions 20 --minutes 5 --pin
    .venv/bin/python bench/soak.py --url ws://HOST:PORT/ws/stream --pid PID --minutes 120

Each of the N workers streams the utterance-rich material of ``bench/load.py`` (the
LibriVox clips with pauses, ``--clip-s`` long from a point that differs per worker) in
real time, flushes, waits for ``end``, and reconnects at once with a new ``flowId``,
until ``--minutes`` have passed. Reported: sessions run, errors by code, sessions
without ``end``, lost audio (``record_url.duration_ms`` against the audio sent, every
session), gateway RSS growth per hour (least-squares line over the samples after the
first ``--warmup-s``), and latency drift: the line through ``flush`` -> ``end`` and
ping -> pong (ingest lag) against time. Writes ``bench/out/<name>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OUT, cpu_model, pct, proc_sample, stop  # noqa: E402
from bench.load import (  # noqa: E402
    Counters,
    Framed,
    LoadConfig,
    SessionResult,
    frame_material,
    material,
    run_session,
    set_affinity,
    spawn_gateway,
)

SAMPLE_EVERY_S = 2.0


@dataclasses.dataclass
class SoakRun:
    sessions: list[tuple[float, SessionResult]]  # (flush time since start, result)
    samples: list[tuple[float, float, float]]  # (t, gateway CPU s, RSS MB)
    wall_s: float
    tree: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (t, MB)


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants (``voxgate serve`` and its inference
    workers), MB."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        with contextlib.suppress(OSError):
            total += proc_sample(p).rss_mb
    return total


async def soak(cfg: LoadConfig, framed: Framed, minutes: float, pid: int | None
               ) -> SoakRun:
    counters = Counters()
    done: list[tuple[float, SessionResult]] = []
    samples: list[tuple[float, float, float]] = []
    tree: list[tuple[float, float]] = []
    t0 = trio.current_time()
    stop_at = t0 + minutes * 60

    async def monitor() -> None:
        while True:
            if pid:
                s = proc_sample(pid)
                samples.append((trio.current_time() - t0, s.cpu_s, s.rss_mb))
                tree.append((trio.current_time() - t0, tree_rss_mb(pid)))
            await trio.sleep(SAMPLE_EVERY_S)

    async def worker(w: int) -> None:
        await trio.sleep(w * cfg.ramp_s / max(1, cfg.sessions))
        k = 0
        while trio.current_time() < stop_at:
            c = dataclasses.replace(cfg, run_id=f"{cfg.run_id}-w{w:03d}-{k:05d}")
            r = await run_session(c, framed, (w * 7 + k * 3) % cfg.sessions, counters)
            flushed = trio.current_time() - t0 - (r.flush_to_end_s or 0.0)
            done.append((flushed, r))
            k += 1
            if r.failure is not None:
                await trio.sleep(1.0)  # do not spin on a refusing gateway

    async with trio.open_nursery() as outer:
        outer.start_soon(monitor)
        async with trio.open_nursery() as nursery:
            for w in range(cfg.sessions):
                nursery.start_soon(worker, w)
        outer.cancel_scope.cancel()
    return SoakRun(done, samples, trio.current_time() - t0, tree)


def slope_per_hour(t: list[float], y: list[float]) -> float | None:
    """Least-squares slope of ``y`` against ``t`` (s), per hour."""
    if len(t) < 3 or max(t) - min(t) <= 0:
        return None
    return float(np.polyfit(np.asarray(t), np.asarray(y), 1)[0] * 3600)


def summarize(run: SoakRun, warmup_s: float) -> dict[str, Any]:
    rs = [r for _, r in run.sessions]
    errors: Counter[str] = Counter()
    for r in rs:
        errors.update(r.errors)
    lost = [r.lost_ms for r in rs]
    f2e = [(t, r.flush_to_end_s * 1000) for t, r in run.sessions
           if r.flush_to_end_s is not None]
    lag = [(a, b * 1000) for r in rs for a, b in r.lag_s]
    lag_t0 = min((a for a, _ in lag), default=0.0)
    lag = [(a - lag_t0, b) for a, b in lag]
    warm = [(t, m) for t, _, m in run.samples if t >= warmup_s]
    out: dict[str, Any] = {
        "sessions_run": len(rs),
        "ended": sum(r.ended for r in rs),
        "failures": dict(Counter(r.failure.split(":")[0] for r in rs if r.failure)),
        "errors": dict(errors),
        "audio_sent_s": round(sum(r.samples_sent for r in rs) / 16000, 1),
        "lost_ms_total": sum(x for x in lost if x),
        "sessions_with_loss": sum(1 for x in lost if x),
        "sessions_without_record": sum(1 for x in lost if x is None),
        "flush_to_end_ms": {"p50": round(pct([b for _, b in f2e], 50), 1),
                            "p99": round(pct([b for _, b in f2e], 99), 1),
                            "max": round(pct([b for _, b in f2e], 100), 1)},
        "flush_to_end_drift_ms_per_h": _r(slope_per_hour([t for t, _ in f2e],
                                                         [b for _, b in f2e])),
        "ingest_lag_ms": {"p50": round(pct([b for _, b in lag], 50), 1),
                          "p99": round(pct([b for _, b in lag], 99), 1)},
        "ingest_lag_drift_ms_per_h": _r(slope_per_hour([t for t, _ in lag],
                                                       [b for _, b in lag])),
        "wall_s": round(run.wall_s, 1),
    }
    if run.samples:
        out["gw_rss_mb"] = {"first": round(run.samples[0][2], 1),
                            "last": round(run.samples[-1][2], 1),
                            "max": round(max(m for _, _, m in run.samples), 1)}
        out["gw_rss_growth_mb_per_h"] = _r(slope_per_hour([t for t, _ in warm],
                                                          [m for _, m in warm]))
        out["rss_fit_from_s"] = warmup_s
        cpu = run.samples[-1][1] - run.samples[0][1]
        span = run.samples[-1][0] - run.samples[0][0]
        out["gw_cores_mean"] = round(cpu / span, 3) if span > 0 else None
    finals = [f for r in rs for f in r.finals]
    if finals:  # with recognition (--with-asr)
        long = [f for f in finals if f[1] > 500]
        out["asr"] = {
            "finals": len(finals),
            "finals_over_500ms": len(long),
            "over_500ms_without_a_partial_first": sum(1 for f in long if not f[2]),
            "sessions_ended_without_their_finals": sum(
                1 for r in rs if r.events.get("asr_partial") and not r.finals),
        }
    if run.tree:
        warm_tree = [(t, m) for t, m in run.tree if t >= warmup_s]
        out["tree_rss_mb"] = {"first": round(run.tree[0][1], 1),
                              "after_warmup": round(warm_tree[0][1], 1) if warm_tree else None,
                              "last": round(run.tree[-1][1], 1),
                              "max": round(max(m for _, m in run.tree), 1)}
        growth = slope_per_hour([t for t, _ in warm_tree], [m for _, m in warm_tree])
        out["tree_rss_growth_mb_per_h"] = _r(growth)
        if growth is not None and warm_tree:
            out["tree_rss_growth_pct_per_h"] = round(100 * growth / warm_tree[0][1], 2)
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def plot(run: SoakRun, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5), constrained_layout=True)
    if run.samples:
        ax[0].plot([t / 60 for t, _, _ in run.samples], [m for _, _, m in run.samples])
    ax[0].set_xlabel("min")
    ax[0].set_ylabel("gateway RSS (MB)")
    ax[0].set_title(f"RSS growth {summary.get('gw_rss_growth_mb_per_h')} MB/h")
    f2e = [(t, r.flush_to_end_s * 1000) for t, r in run.sessions
           if r.flush_to_end_s is not None]
    ax[1].plot([t / 60 for t, _ in f2e], [b for _, b in f2e], ".", ms=3)
    ax[1].set_xlabel("min (at flush)")
    ax[1].set_ylabel("flush -> end (ms)")
    ax[1].set_title(f"drift {summary['flush_to_end_drift_ms_per_h']} ms/h")
    lag = [(a, b * 1000) for _, r in run.sessions for a, b in r.lag_s]
    if lag:
        t0 = min(a for a, _ in lag)
        ax[2].plot([(a - t0) / 60 for a, _ in lag], [b for _, b in lag], ".", ms=1)
    ax[2].set_xlabel("min")
    ax[2].set_ylabel("ping -> pong (ms): ingest lag")
    ax[2].set_title(f"drift {summary['ingest_lag_drift_ms_per_h']} ms/h")
    fig.suptitle(f"soak: {summary['sessions_run']} sessions, {summary['lost_ms_total']} ms "
                 f"lost, errors {summary['errors'] or 'none'}")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url")
    p.add_argument("--spawn", action="store_true",
                   help="start a record-only `voxgate gateway` and measure it")
    p.add_argument("--with-asr", action="store_true", help="with --spawn: `voxgate serve`")
    p.add_argument("--pid", type=int)
    p.add_argument("--sessions", type=int, default=10, help="concurrent workers")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--clip-s", type=float, default=30.0, help="audio per session, s")
    p.add_argument("--ramp-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=60.0,
                   help="RSS samples before this are left out of the growth fit")
    p.add_argument("--pin", action="store_true")
    p.add_argument("--name", default="soak")
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.spawn):
        p.error("give exactly one of --url and --spawn")

    proc = None
    pid, url = args.pid, args.url
    tmp = tempfile.TemporaryDirectory(prefix="voxgate-soak-")
    try:
        if args.spawn:
            proc, url = spawn_gateway(args.with_asr, tmp.name, args.sessions + 50)
            pid = proc.pid
        if args.pin and pid:
            set_affinity(pid, {0})
            set_affinity(os.getpid(), {1})
        returns = ("record_url", "metrics") + (("asr",) if args.with_asr else ())
        cfg = LoadConfig(url=url, sessions=args.sessions, seconds=args.clip_s,
                         ramp_s=args.ramp_s, returns=returns,
                         run_id=f"soak{int(time.time())}")
        framed = frame_material(material(), cfg.chunk_ms)
        run = trio.run(soak, cfg, framed, args.minutes, pid)
    finally:
        if proc is not None:
            stop(proc)
        tmp.cleanup()
    summary = summarize(run, args.warmup_s)
    for k, v in summary.items():
        print(f"{k:<30} {v}")
    OUT.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": {"cpu": cpu_model(), "python": platform.python_version(), "url": url,
                 "sessions": args.sessions, "minutes": args.minutes, "clip_s": args.clip_s,
                 "shared_machine": True},
        "summary": summary,
        "samples": run.samples,
        "tree_rss": run.tree,
        "sessions": [{"flush_at_s": round(t, 2), **r.summary()} for t, r in run.sessions
                     if not math.isnan(t)],
    }
    (OUT / f"{args.name}.json").write_text(json.dumps(data, indent=1))
    plot(run, summary, OUT / f"{args.name}.png")
    print(f"wrote {OUT / args.name}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
