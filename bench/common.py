"""Helpers shared by the service benchmarks: child processes, /proc readings, stats."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
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
