"""Worker processes against one in-process engine: which layout carries more on 2 cores?

The same fixed job mix, in the same run, through ``run_batch`` from 2 client threads at
once (each thread takes the next job as soon as its previous one returned: a closed
loop that keeps 2 batches in flight, as the scheduler does with 2 worker slots):

  (a) ``inproc``: ``WhisperBackend(threads=2)`` in this process, one batch at a time
      (one runner thread; today's ``voxgate asr`` scheduler runs one batch at a time
      too);
  (b) ``1x2``: ``ProcessBackend``, 1 worker x 2 onnxruntime threads;
  (c) ``2x1``: ``ProcessBackend``, 2 workers x 1 thread each.

All three layouts are alive at once and the timed passes alternate between them, so
load from anything else on the machine falls on all three alike.

Job mix (pool ``en`` of the default pools: base finals, tiny.en partials, lang en),
one job per batch: finals of 2-10 s LibriVox speech (the pocketsphinx-testdata clips
and two concatenations) and partials of 1-3 s (prefixes of the same clips), shuffled
with a fixed seed. Each layout gets one untimed warm-up pass of a few jobs, then
``--repeats`` timed passes of the mix per layout.

Prints jobs/s, per-job latency p50/p95 (the ``run_batch`` call as the client thread
sees it: waiting for a free engine or worker plus the work) overall and per kind,
ratios against (a) measured in the same run, CPU milliseconds per job (this process plus
the layout's workers, from /proc: unlike jobs/s it holds up when other work shares the
cores; the load average is printed with every pass), the RSS of the parent and of each worker
(what a warm standby costs), the cold start of a worker (spawn to ready), and whether
the texts match (a) exactly. Writes ``bench/out/workers.json`` and ``.png``.

Usage::

    .venv/bin/python bench/workers.py            # ~2-3 minutes on 2 cores
    .venv/bin/python bench/workers.py --repeats 1 --quick
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asr.engine import DEFAULT_POOL, DEFAULT_POOLS, WhisperBackend  # noqa: E402
from asr.scheduler import percentile  # noqa: E402
from asr.whisper.audio import read_audio_file  # noqa: E402
from asr.workers import ProcessBackend, WireJob, WorkerConfig  # noqa: E402

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
SR = 16000
POOL = "en"
OUT = ROOT / "bench" / "out"


def job_mix(quick: bool) -> list[WireJob]:
    clips = [read_audio_file(p) for p in sorted(LIBRIVOX.glob("*.wav"))]
    finals = list(clips)  # 3.0-7.1 s
    finals.append(np.concatenate([clips[1], clips[4]]))  # ~6.3 s
    finals.append(np.concatenate([clips[0], clips[1]])[: 10 * SR])  # 10 s
    finals = [f for f in finals if 2 * SR <= f.size <= 10 * SR]
    partials = [c[: int(s * SR)] for c in clips for s in (1.0, 2.0, 3.0)]
    if quick:
        finals, partials = finals[:3], partials[:6]
    jobs = ([WireJob("final", POOL, a, {"lang": "en"}) for a in finals]
            + [WireJob("partial", POOL, a, {"lang": "en"}) for a in partials])
    random.Random(7).shuffle(jobs)
    return jobs


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def drive(run_batch: Callable[[str, Sequence[Any]], list[Any]], jobs: list[WireJob],
          clients: int = 2) -> dict[str, Any]:
    """Run every job once from ``clients`` threads; per-job latency and texts."""
    todo: queue.Queue[tuple[int, WireJob]] = queue.Queue()
    for item in enumerate(jobs):
        todo.put(item)
    lat: dict[int, float] = {}
    texts: dict[int, str] = {}
    errors: list[str] = []

    def client() -> None:
        while True:
            try:
                i, job = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            try:
                (r,) = run_batch(POOL, [job])
            except Exception as exc:  # counted, the run goes on
                errors.append(repr(exc))
                continue
            lat[i] = time.perf_counter() - t0
            texts[i] = r.text if not isinstance(r, BaseException) else repr(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - t0, "lat": lat, "texts": texts,
            "errors": errors}


def cpu_s(pool: ProcessBackend | None) -> float:
    """CPU seconds (user + system) of this process plus ``pool``'s workers so far."""
    t = os.times()
    total = t.user + t.system
    if pool is not None:
        total += sum(w["cpu_s"] for w in pool.health()["workers"])
    return total


def summarize(name: str, runs: list[dict[str, Any]], jobs: list[WireJob]
              ) -> dict[str, Any]:
    lat_all = [r["lat"][i] * 1000 for r in runs for i in r["lat"]]
    out: dict[str, Any] = {
        "layout": name,
        "jobs": sum(len(r["lat"]) for r in runs),
        "errors": [e for r in runs for e in r["errors"]],
        "wall_s": sum(r["wall_s"] for r in runs),
        "p50_ms": percentile(lat_all, 50), "p95_ms": percentile(lat_all, 95),
        "max_ms": max(lat_all, default=float("nan")),
        "texts": runs[-1]["texts"],
    }
    out["jobs_per_s"] = out["jobs"] / out["wall_s"]
    for kind in ("final", "partial"):
        ks = [r["lat"][i] * 1000 for r in runs for i in r["lat"] if jobs[i].kind == kind]
        out[f"{kind}_p50_ms"] = percentile(ks, 50)
        out[f"{kind}_p95_ms"] = percentile(ks, 95)
    return out


def inproc_layout() -> tuple[Callable[[str, Sequence[Any]], list[Any]], WhisperBackend]:
    backend = WhisperBackend(dict(DEFAULT_POOLS), DEFAULT_POOL, threads=2)
    # One thread runs every batch, first come first served (as ProcessBackend hands out
    # its workers), like the scheduler with one slot.
    runner = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def one_at_a_time(pool: str, batch: Sequence[Any]) -> list[Any]:
        return list(runner.submit(backend.run_batch, pool, batch).result())

    return one_at_a_time, backend


def worker_layout(workers: int, threads: int) -> ProcessBackend:
    cfg = WorkerConfig(workers=workers, worker_threads=threads, standby_workers=0,
                       job_timeout_s=120.0)
    backend = ProcessBackend.whisper(dict(DEFAULT_POOLS), DEFAULT_POOL, cfg)
    backend.start()
    return backend


def plot(results: list[dict[str, Any]], loads: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layout"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(names, [r["jobs_per_s"] for r in results], color="tab:blue")
    axes[0].set_title("throughput (jobs/s, higher is better)")
    axes[1].bar(names, [r["cpu_ms_per_job"] for r in results], color="tab:gray")
    axes[1].set_title("CPU ms per job (lower is better)")
    x = np.arange(len(names))
    for k, (kind, color) in enumerate((("final", "tab:orange"), ("partial", "tab:green"))):
        axes[2].bar(x + (k - 0.5) * 0.4, [r[f"{kind}_p50_ms"] for r in results], 0.4,
                    color=color, label=f"{kind} p50")
        axes[2].plot(x + (k - 0.5) * 0.4, [r[f"{kind}_p95_ms"] for r in results], "v",
                     color=color, markeredgecolor="black", label=f"{kind} p95")
    axes[2].set_xticks(x, names)
    axes[2].set_title("latency per job (ms, 2 clients)")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"bench/workers.py on {os.cpu_count()} cores, load average during the "
                 f"passes {min(loads):.1f}-{max(loads):.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="timed passes of the mix")
    ap.add_argument("--quick", action="store_true", help="a third of the mix")
    args = ap.parse_args()
    jobs = job_mix(args.quick)
    audio_s = sum(j.audio.size for j in jobs) / SR
    print(f"mix: {sum(j.kind == 'final' for j in jobs)} finals, "
          f"{sum(j.kind == 'partial' for j in jobs)} partials, {audio_s:.1f} s of audio; "
          f"{args.repeats} passes per layout, 2 client threads", flush=True)
    # Every layout lives at once (an idle one costs no CPU: onnxruntime does not spin),
    # and the timed passes alternate between them, so load from anything else on the
    # machine falls on all three alike.
    rss0 = rss_mb(os.getpid())
    loads: list[float] = []  # the 1-minute load average after each pass
    pools = {"workers 2x1": worker_layout(2, 1), "workers 1x2": worker_layout(1, 2)}
    t0 = time.perf_counter()
    for b in pools.values():
        b.warmup()  # both pools load at once: start() already spawned every worker
    pools_ready_s = time.perf_counter() - t0
    rss_front = rss_mb(os.getpid())
    inproc, engine = inproc_layout()
    layouts: dict[str, Callable[[str, Sequence[Any]], list[Any]]] = {
        "inproc 1x2": inproc, **{k: b.run_batch for k, b in pools.items()}}
    try:
        for fn in layouts.values():
            drive(fn, jobs[:4])  # warm-up: first-call costs of each model and shape
        rss_inproc = rss_mb(os.getpid())
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in layouts}
        order = list(layouts)
        cpu: dict[str, float] = dict.fromkeys(layouts, 0.0)
        for rep in range(args.repeats):
            for name in order[rep % 3:] + order[: rep % 3]:
                c0 = cpu_s(pools.get(name))
                runs[name].append(drive(layouts[name], jobs))
                cpu[name] += cpu_s(pools.get(name)) - c0
                loads.append(os.getloadavg()[0])
                print(f"  pass {rep + 1} {name}: {runs[name][-1]['wall_s']:.1f} s wall, "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
        results = [summarize(k, runs[k], jobs) for k in layouts]
        for r in results:
            r["cpu_s"] = cpu[r["layout"]]
            r["cpu_ms_per_job"] = 1000 * cpu[r["layout"]] / r["jobs"]
        results[0]["rss_mb"] = {"process (models loaded)": rss_inproc,
                                "before loading": rss0}
        for r, b in zip(results[1:], pools.values(), strict=True):
            health = b.health()
            r["rss_mb"] = {"parent (tokenizers, no models)": rss_front,
                           **{f"worker{i}": w["rss_mb"]
                              for i, w in enumerate(health["workers"])}}
            r["worker_cpu_s"] = [w["cpu_s"] for w in health["workers"]]
            r["worker_start_s"] = [w["start_s"] for w in health["workers"]]
            r["pools_ready_s"] = pools_ready_s
    finally:
        for b in pools.values():
            b.close()
    del engine
    base = results[0]
    print(f"\n{'layout':<14}{'jobs/s':>8}{'x(a)':>7}{'p50 ms':>8}{'p95 ms':>8}"
          f"{'fin p50':>9}{'fin p95':>9}{'par p50':>9}{'par p95':>9}{'x(a) p95':>9}"
          f"{'cpu ms/job':>11}{'same text':>11}  rss MB")
    for r in results:
        same = sum(r["texts"].get(i) == t for i, t in base["texts"].items())
        r["same_text_as_inproc"] = f"{same}/{len(base['texts'])}"
        r["ratio_jobs_per_s"] = r["jobs_per_s"] / base["jobs_per_s"]
        r["ratio_p95"] = r["p95_ms"] / base["p95_ms"]
        rss = " ".join(f"{k}={v:.0f}" for k, v in r["rss_mb"].items())
        print(f"{r['layout']:<14}{r['jobs_per_s']:8.2f}{r['ratio_jobs_per_s']:7.2f}"
              f"{r['p50_ms']:8.0f}{r['p95_ms']:8.0f}{r['final_p50_ms']:9.0f}"
              f"{r['final_p95_ms']:9.0f}{r['partial_p50_ms']:9.0f}{r['partial_p95_ms']:9.0f}"
              f"{r['ratio_p95']:9.2f}{r['cpu_ms_per_job']:11.0f}"
              f"{r['same_text_as_inproc']:>11}  {rss}")
        if r["errors"]:
            print(f"  errors: {r['errors'][:3]}")
        if "worker_start_s" in r:
            print(f"  worker cold start (spawn to warm) s: {r['worker_start_s']}, "
                  f"worker CPU s: {r['worker_cpu_s']}")
    OUT.mkdir(parents=True, exist_ok=True)
    for r in results:
        r["texts"] = {str(k): v for k, v in r["texts"].items()}
    (OUT / "workers.json").write_text(json.dumps(
        {"cores": os.cpu_count(), "load_average": loads, "repeats": args.repeats,
         "audio_s": audio_s, "jobs_in_mix": len(jobs), "results": results}, indent=1))
    plot(results, loads, OUT / "workers.png")
    print(f"\nwrote {OUT / 'workers.json'} and {OUT / 'workers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
