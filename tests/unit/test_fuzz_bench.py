"""``bench/fuzz.py --quick`` end to end: a real gateway and ASR service (stand-in engine)
take 10,000 mutated WebSocket, link and /v1/lid frames, and must neither crash, hang,
log a traceback, nor keep the memory; a normal session before and after still gets its
final. (The full 1,000,000-frame run is done by hand; see bench/README.md.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fuzz_bench_quick_finds_no_crash(tmp_path: Path) -> None:
    name = f"fuzz_test_{tmp_path.name}"
    out = ROOT / "bench" / "results" / f"{name}.json"
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "fuzz.py"), "--quick", "--name", name],
            capture_output=True, text=True, timeout=110, cwd=ROOT)
        data = json.loads(out.read_text())
    finally:
        for suffix in (".json", ".png"):
            (ROOT / "bench" / "results" / f"{name}{suffix}").unlink(missing_ok=True)
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert data["frames_sent"] >= 10_000, report
    # The servers answered with coded errors: every kind of malformed input was seen.
    assert {"BAD_JSON", "ODD_BYTE_COUNT", "BAD_SEQ_HEADER"} <= set(data["ws"]["errors_by_code"])
    assert {"BAD_FRAME", "DUPLICATE_START"} <= set(data["link"]["errors_by_code"])
    assert data["normal_before"]["ok"] and data["normal_after"]["ok"], report
    assert data["crash_count"] == 0 and data["hang_count"] == 0, report
    assert data["undecodable"] == [], report
    assert data["log_problem_counts"] == {"asr": 0, "gateway": 0}, report
    assert data["failures"] == [] and proc.returncode == 0, report
