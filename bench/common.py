"""Helpers shared by the service benchmarks: child processes, /proc readings, stats."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
VOXGATE = str(Path(sys.executable).with_name("voxgate"))
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ProcSample:
    cpu_s: float
    rss_mb: float
    at: float


def proc_sample(pid: int) -> ProcSample:
    """CPU seconds (user+system, threads included) and RSS of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    rss = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return ProcSample(cpu, rss, time.monotonic())


LOG_PATHS: dict[int, Path] = {}  # pid of a started service -> the file with its stderr


def log_lines(pid: int) -> list[str]:
    """The stderr lines a service started by :func:`start` (or registered) wrote so far."""
    path = LOG_PATHS.get(pid)
    if path is None or not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()


def start(args: list[str], ready_line: str, timeout_s: float = 300.0,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a voxgate command; return it and the first stdout line starting with
    ``ready_line``.

    Its stderr (the JSON logs) goes to a file, and its stdout is drained after the ready
    line: a pipe nobody reads fills after a few hundred sessions and blocks the service.
    """
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the process
        "w+", prefix=f"voxgate-bench-{args[0]}-", suffix=".log", delete=False)
    proc = subprocess.Popen([VOXGATE, *args], stdout=subprocess.PIPE, stderr=log_file,
                            text=True, env={**os.environ, **(env or {})})
    LOG_PATHS[proc.pid] = Path(log_file.name)
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    out = proc.stdout
    while time.monotonic() < deadline:
        line = out.readline()
        if not line:
            log_file.seek(0)
            raise RuntimeError(f"{args[0]} exited early: {log_file.read()[-2000:]}")
        if line.startswith(ready_line):
            threading.Thread(target=lambda: [None for _ in out], daemon=True).start()
            return proc, line.strip()
    proc.kill()
    raise TimeoutError(f"{args[0]} not ready after {timeout_s} s")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(2)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def speech_bounds(audio: np.ndarray, frame: int = 320) -> tuple[int, int]:
    """First and last sample of speech by frame energy (20 ms RMS above 10% of the
    clip's loudest frame): a deterministic onset/offset for latency references."""
    n = len(audio) // frame
    rms = np.sqrt(np.mean(audio[: n * frame].astype(np.float64).reshape(n, frame) ** 2, 1))
    loud = np.nonzero(rms > 0.1 * rms.max())[0]
    return int(loud[0]) * frame, int(loud[-1] + 1) * frame


def write_json(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def pct_with_misses(values: Sequence[float | None], q: float) -> float:
    """Percentile ``q`` (0-100, nearest rank) where ``None`` is a miss, counted as +inf.

    A latency that never came is worse than any that did: dropping it would make a
    system that answers half its utterances look fast. Nearest rank (the smallest value
    with at least q % of the sample at or below it) keeps the result a real observation,
    so a percentile that lands on a miss is ``inf``, and one on measured values is one
    of them. An empty sample gives ``nan``.
    """
    if not values:
        return math.nan
    xs = sorted(math.inf if v is None else float(v) for v in values)
    rank = max(math.ceil(q / 100.0 * len(xs)), 1)
    return xs[rank - 1]


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants now alive (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_sample(root: int) -> ProcSample:
    """CPU seconds and RSS summed over a process tree (a server and its workers)."""
    cpu = rss = 0.0
    for pid in tree_pids(root):
        try:
            s = proc_sample(pid)
        except (OSError, IndexError, ValueError):
            continue
        cpu += s.cpu_s
        rss += s.rss_mb
    return ProcSample(cpu, rss, time.monotonic())


@dataclass(frozen=True)
class Hyp:
    """One recognition result as a client received it.

    ``start_s``/``end_s`` are stream audio time (seconds since the first sample sent);
    ``recv_s`` is the client's wall clock (``time.perf_counter``) at arrival.
    """

    final: bool
    start_s: float
    end_s: float
    text: str
    recv_s: float


@dataclass(frozen=True)
class UttTiming:
    """What the user saw of one utterance; ``None`` latencies are misses."""

    index: int
    first_partial_ms: float | None  # first partial covering it - its first speech sample sent
    final_ms: float | None  # its final - its last speech sample sent
    partial_gaps_ms: tuple[float, ...]  # between consecutive partials covering it
    partial_before_final: bool


MIN_OVERLAP_S = 0.05  # a result covers an utterance if their audio spans share this much
END_TOLERANCE_S = 0.3  # a final reaching this close to the utterance's end closes it


def match_utterances(spans: Sequence[tuple[float, float]], hyps: Sequence[Hyp],
                     sent_at: Callable[[float], float]) -> list[UttTiming]:
    """Attribute the results of one session to its ground-truth utterances.

    Args:
        spans: each utterance's speech (onset, end), stream seconds.
        hyps: partials and finals in arrival order.
        sent_at: the wall time (same clock as ``recv_s``) at which the client sent the
            sample at a stream time.

    Returns:
        One timing per utterance. A partial belongs to every utterance its audio span
        overlaps (a peer's segment may run across a pause), but only once it could
        know of it (arrival after the onset was sent). The final of an utterance is the
        first final overlapping it whose span reaches its end (within
        ``END_TOLERANCE_S``); failing that, the last final overlapping it (the
        utterance was split and never closed as a whole); failing that, a miss.
    """
    out = []
    for i, (on, end) in enumerate(spans):
        t_on, t_end = sent_at(on), sent_at(end)

        def covers(h: Hyp, on: float = on, end: float = end) -> bool:
            return min(h.end_s, end) - max(h.start_s, on) >= MIN_OVERLAP_S

        parts = [h.recv_s for h in hyps if not h.final and covers(h) and h.recv_s >= t_on]
        finals = [h for h in hyps if h.final and covers(h) and h.recv_s >= t_on]
        closing = [h for h in finals if h.end_s >= end - END_TOLERANCE_S]
        fin = closing[0] if closing else (finals[-1] if finals else None)
        final_ms = 1000 * (fin.recv_s - t_end) if fin is not None else None
        first_ms = 1000 * (parts[0] - t_on) if parts else None
        gaps = tuple(1000 * (b - a) for a, b in itertools.pairwise(parts))
        before = bool(parts) and (fin is None or parts[0] <= fin.recv_s)
        out.append(UttTiming(i, first_ms, final_ms, gaps, before))
    return out


def wait_idle(root: int, *, max_cores: float = 0.05, window_s: float = 1.0,
              timeout_s: float = 60.0) -> float:
    """Wait until a process tree uses less than ``max_cores`` over ``window_s``.

    A server may still be working for a client that left (a peer's transcription thread
    finishing the last buffer): the next measured run must not pay for it.

    Returns:
        Seconds waited (``timeout_s`` if it never went idle).
    """
    t0 = time.monotonic()
    prev = tree_sample(root)
    while time.monotonic() - t0 < timeout_s:
        time.sleep(window_s)
        cur = tree_sample(root)
        if (cur.cpu_s - prev.cpu_s) / max(cur.at - prev.at, 1e-6) < max_cores:
            return time.monotonic() - t0
        prev = cur
    return timeout_s
