"""End-to-end latency through the gateway, in real time, at 1, 4 and 8 sessions.

Starts ``voxgate asr`` and ``voxgate gateway`` as separate processes (so the gateway's CPU
can be measured on its own), streams real speech from N concurrent WebSocket clients in
real time, and measures:

* first-partial latency: from the moment the client sends the first speech frame (the
  speech onset is found in the file by frame energy) to the first ``asr_partial``;
* final latency: from the end of speech to the ``asr_final`` of that utterance;
* gateway CPU per session.

The reference is the seed's SLA (first partial P50 <= 300 ms, P95 <= 600 ms); the table
prints each percentile as a ratio of its SLA. Writes ``bench/out/e2e_latency.json``
and ``.png``.

    .venv/bin/python bench/e2e_latency.py [--levels 1,4,8] [--repeats 2]
        [--partial-model tiny.en] [--partial-window 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    OUT,
    cpu_model,
    free_port,
    pct,
    proc_sample,
    speech_bounds,
    start,
    stop,
    write_json,
)
from gateway.client import stream_audio
from tests import speech

SLA_P50_MS, SLA_P95_MS = 300.0, 600.0
LEAD_S, TAIL_S = 1.0, 1.5  # silence around each clip


def material() -> list[tuple[np.ndarray, int, int]]:
    """Clips with silence around them, and their speech onset/offset in samples."""
    out = []
    clips = [speech.goforward()] + [a for _, a, _ in speech.librivox()]
    for a in clips:
        lead = np.zeros(int(LEAD_S * 16000), np.int16)
        tail = np.zeros(int(TAIL_S * 16000), np.int16)
        x = np.concatenate([lead, a, tail])
        on, off = speech_bounds(a)
        out.append((x, len(lead) + on, len(lead) + off))
    return out


async def one_session(url: str, clip: tuple[np.ndarray, int, int], delay: float
                      ) -> dict[str, Any]:
    audio, onset, offset = clip
    await trio.sleep(delay)
    r = await stream_audio(url, audio, realtime=True,
                           start={"hints": {"user_lang_pref": "en"}})
    onset_s, offset_s = onset / 16000, offset / 16000
    partials = [t for e, t in zip(r.events, r.arrival_s, strict=True)
                if e["type"] == "asr_partial" and e["utterance"] == 0]
    finals = [t for e, t in zip(r.events, r.arrival_s, strict=True)
              if e["type"] == "asr_final" and e["utterance"] == 0]
    return {
        "first_partial_ms": 1000 * (partials[0] - onset_s) if partials else None,
        "final_ms": 1000 * (finals[0] - offset_s) if finals else None,
        "partials": len(partials),
        "errors": [e["code"] for e in r.of("error")],
        "audio_s": len(audio) / 16000,
    }


async def run_level(url: str, n: int, repeats: int, clips: list[tuple[np.ndarray, int, int]]
                    ) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    async def worker(i: int) -> None:
        for k in range(repeats):
            clip = clips[(i + k) % len(clips)]
            results.append(await one_session(url, clip, (i * 0.29) % 1.0))

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(worker, i)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=2, help="sessions per client per level")
    ap.add_argument("--partial-model", default=None)
    ap.add_argument("--partial-window", type=float, default=None)
    ap.add_argument("--final-window", type=float, default=None)
    ap.add_argument("--name", default="e2e_latency")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp())
    asr_port, ws_port, http_port = free_port(), free_port(), free_port()
    # The service's default pools unless a knob is given (sessions ask for English, so
    # they land on the "en" pool).
    asr_args = ["asr", "--port", str(asr_port)]
    if args.partial_model or args.partial_window or args.final_window:
        from asr.engine import DEFAULT_POOLS

        en = DEFAULT_POOLS["en"]
        pool = ['model = "base"', 'languages = ["en"]',
                f"partial_window_s = {args.partial_window or en.partial_window_s}",
                f"final_window_s = {args.final_window or en.final_window_s}"]
        if args.partial_model or en.partial_model:
            pool.append(f'partial_model = "{args.partial_model or en.partial_model}"')
        (tmp / "asr.toml").write_text("default = \"en\"\n[server]\nmax_streams = 64\n"
                                      "[pools.en]\n" + "\n".join(pool) + "\n")
        asr_args += ["--config", str(tmp / "asr.toml")]
    asr, _ = start(asr_args, "voxgate asr: ready on")
    gw, url = start(["gateway", "--port", str(ws_port), "--http-port", str(http_port)],
                    "ws://", env={"ASR_URLS": f"http://127.0.0.1:{asr_port}",
                                  "ARCHIVE_DIR": str(tmp / "records")})
    clips = material()
    levels = []
    try:
        for n in (int(x) for x in args.levels.split(",")):
            g0, a0 = proc_sample(gw.pid), proc_sample(asr.pid)
            t0 = time.monotonic()
            rs = trio.run(run_level, url, n, args.repeats, clips)
            g1, a1 = proc_sample(gw.pid), proc_sample(asr.pid)
            wall = time.monotonic() - t0
            fp = [r["first_partial_ms"] for r in rs if r["first_partial_ms"] is not None]
            fin = [r["final_ms"] for r in rs if r["final_ms"] is not None]
            audio_s = sum(r["audio_s"] for r in rs)
            level = {
                "sessions": n, "runs": len(rs),
                "first_partial_p50_ms": pct(fp, 50), "first_partial_p95_ms": pct(fp, 95),
                "final_p50_ms": pct(fin, 50), "final_p95_ms": pct(fin, 95),
                "missing_partials": len(rs) - len(fp), "missing_finals": len(rs) - len(fin),
                "errors": sorted({c for r in rs for c in r["errors"]}),
                "gateway_cpu_per_session": (g1.cpu_s - g0.cpu_s) / audio_s,
                "gateway_cores": (g1.cpu_s - g0.cpu_s) / wall,
                "asr_cores": (a1.cpu_s - a0.cpu_s) / wall,
                "gateway_rss_mb": g1.rss_mb,
            }
            levels.append(level)
            print(f"N={n}: first partial p50/p95 {level['first_partial_p50_ms']:.0f}/"
                  f"{level['first_partial_p95_ms']:.0f} ms, final p50/p95 "
                  f"{level['final_p50_ms']:.0f}/{level['final_p95_ms']:.0f} ms", flush=True)
    finally:
        stop(gw)
        stop(asr)

    print(f"\nend-to-end latency, real time ({cpu_model()}); SLA first partial "
          f"P50 <= {SLA_P50_MS:.0f} ms, P95 <= {SLA_P95_MS:.0f} ms")
    print(f"{'N':>2} {'1st p50':>8} {'/SLA':>5} {'1st p95':>8} {'/SLA':>5} {'final p50':>9} "
          f"{'final p95':>9} {'gw CPU/session':>14} {'ASR cores':>9} {'miss':>5}")
    for lv in levels:
        print(f"{lv['sessions']:>2} {lv['first_partial_p50_ms']:>8.0f} "
              f"{lv['first_partial_p50_ms'] / SLA_P50_MS:>5.2f} "
              f"{lv['first_partial_p95_ms']:>8.0f} {lv['first_partial_p95_ms'] / SLA_P95_MS:>5.2f}"
              f" {lv['final_p50_ms']:>9.0f} {lv['final_p95_ms']:>9.0f} "
              f"{100 * lv['gateway_cpu_per_session']:>13.2f}% {lv['asr_cores']:>9.2f} "
              f"{lv['missing_partials']:>5}")
    data = {"levels": levels, "sla_p50_ms": SLA_P50_MS, "sla_p95_ms": SLA_P95_MS,
            "cpu": cpu_model(), "partial_model": args.partial_model,
            "partial_window_s": args.partial_window}
    path = write_json(args.name, data)
    plot(levels, OUT / f"{args.name}.png")
    print(f"wrote {path} and {args.name}.png")
    return 0


def plot(levels: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [lv["sessions"] for lv in levels]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("first_partial_p50_ms", "first partial p50"),
                       ("first_partial_p95_ms", "first partial p95"),
                       ("final_p50_ms", "final p50"), ("final_p95_ms", "final p95")):
        ax.plot(n, [lv[key] for lv in levels], marker="o", label=label)
    ax.axhline(SLA_P50_MS, color="green", ls="--", lw=1, label="SLA p50")
    ax.axhline(SLA_P95_MS, color="red", ls="--", lw=1, label="SLA p95")
    ax.set_xlabel("concurrent real-time sessions")
    ax.set_ylabel("ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
