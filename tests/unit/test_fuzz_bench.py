"""``bench/fuzz.py --quick`` end to end: a real gateway and ASR service (stand-in engine)
take 10,000 mutated WebSocket, link and /v1/lid frames, and must neither crash, hang,
log a traceback, nor keep the memory; a normal session before and after still gets its
final. (The full 1,000,000-frame run is done by hand; see bench/README.md.)"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, int]:
    name = f"fuzz_test_{tmp_path_factory.mktemp('fuzz').name}"
    out = ROOT / "bench" / "results" / f"{name}.json"
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "fuzz.py"), "--quick", "--name", name],
            capture_output=True, text=True, timeout=110, cwd=ROOT)
        data = json.loads(out.read_text())
    finally:
        for suffix in (".json", ".png"):
            (ROOT / "bench" / "results" / f"{name}{suffix}").unlink(missing_ok=True)
    return data, proc.stdout[-4000:] + proc.stderr[-2000:], proc.returncode


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fuzz_bench_quick_finds_no_crash(quick_run: tuple[dict[str, Any], str, int]) -> None:
    data, report, _ = quick_run
    assert data["frames_sent"] >= 10_000, report
    # The servers answered with coded errors: every kind of malformed input was seen.
    assert {"BAD_JSON", "ODD_BYTE_COUNT", "BAD_SEQ_HEADER"} <= set(data["ws"]["errors_by_code"])
    assert {"BAD_FRAME", "DUPLICATE_START"} <= set(data["link"]["errors_by_code"])
    for check in ("no_crash", "no_hang", "decodable", "clean_logs", "normal_sessions",
                  "rss_back", "all_sent", "coded_errors"):
        assert data["checks"][check] == "", report
    assert data["crash_count"] == 0 and data["log_problem_counts"] == {"asr": 0, "gateway": 0}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fuzz_bench_quick_every_connection_ends_with_a_close_frame(
        quick_run: tuple[dict[str, Any], str, int]) -> None:
    data, report, returncode = quick_run
    assert data["checks"]["close_frames"] == "", data["samples"]
    assert data["failures"] == [] and returncode == 0, report


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_invalid_utf8_text_frame_gets_close_1007_after_the_session_ends(
        tmp_path: Path) -> None:
    """The minimal case behind most of the bench's dropped connections: one text frame
    that is not UTF-8, after ``start`` and some audio. RFC 6455 (8.1) wants the
    connection failed with a Close frame 1007; the session's ``end`` should come first,
    as for any other fatal client error, so the audio already accepted is not lost."""
    import random

    import trio

    sys.path.insert(0, str(ROOT))
    from bench import fuzz
    from bench.common import VOXGATE

    asr = fuzz.spawn("asr", [sys.executable, str(ROOT / "bench" / "fuzz.py"),
                             "--asr-standin"], "asr http://", {})
    gw = None
    try:
        gw = fuzz.spawn("gateway", [VOXGATE, "gateway", "--host", "127.0.0.1",
                                    "--port", "0", "--http-port", "0"], "ws://",
                        {"ASR_URLS": asr.line.split(" ", 1)[1], "ARCHIVE_DIR": str(tmp_path),
                         "PUBLIC_BASE": "", "ENABLE_DENOISE": "false"})
        port = int(gw.line.rsplit(":", 1)[1].split("/")[0])
        ws = await fuzz.WsClient.connect("127.0.0.1", port, None)
        assert ws is not None
        rng = random.Random(0)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ws.reader, None)
                await ws.send_text(fuzz.valid_start("utf8-probe", False, "en"))
                while not ws.events:
                    await trio.sleep(0.05)
                for _ in range(25):
                    await ws.send_raw(fuzz._ws_frame(0x2, bytes(640), rng))
                await ws.send_raw(fuzz._ws_frame(0x1, b'{"type":"ping","id":"\xff"}', rng))
                await ws.closed.wait()
                nursery.cancel_scope.cancel()
        await ws.aclose()
        kinds = [e.get("type") for e in ws.events]
        assert kinds[0] == "ack"
        assert ws.close_code == 1007, f"closed without a close frame; events {kinds}"
        assert "end" in kinds
    finally:
        for svc in (gw, asr):
            if svc is not None:
                fuzz.stop(svc)
                svc.log.unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_websocket_ping_during_the_close_handshake_is_no_error(tmp_path: Path) -> None:
    """The bench's other finding, minimal: after ``flush`` the server sends ``end`` and a
    Close frame; a ping that arrives before the client's Close reply made trio-websocket
    send a pong in state LOCAL_CLOSING, and the LocalProtocolError ended the connection
    handler with a traceback in the log ("connection from ... failed")."""
    import random

    import trio

    sys.path.insert(0, str(ROOT))
    from bench import fuzz
    from bench.common import VOXGATE

    asr = fuzz.spawn("asr", [sys.executable, str(ROOT / "bench" / "fuzz.py"),
                             "--asr-standin"], "asr http://", {})
    gw = None
    try:
        gw = fuzz.spawn("gateway", [VOXGATE, "gateway", "--host", "127.0.0.1",
                                    "--port", "0", "--http-port", "0"], "ws://",
                        {"ASR_URLS": asr.line.split(" ", 1)[1], "ARCHIVE_DIR": str(tmp_path),
                         "PUBLIC_BASE": "", "ENABLE_DENOISE": "false"})
        port = int(gw.line.rsplit(":", 1)[1].split("/")[0])
        rng = random.Random(0)
        for attempt in range(3):
            ws = await fuzz.WsClient.connect("127.0.0.1", port, None)
            assert ws is not None
            ws.reply_close = False  # hold the Close reply back while pinging
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ws.reader, None)
                    await ws.send_text(fuzz.valid_start(f"ping-close-{attempt}", False, "en"))
                    for _ in range(10):
                        await ws.send_raw(fuzz._ws_frame(0x2, bytes(640), rng))
                    await ws.send_text('{"type":"flush"}')
                    await ws.closed.wait()  # the server's Close came (not answered yet)
                    ws.closed = trio.Event()  # let send_raw write on
                    for _ in range(20):
                        await ws.send_raw(fuzz._ws_frame(0x9, b"p", rng))
                        await trio.sleep(0.005)
                    await ws.send_raw(fuzz._ws_frame(0x8, struct.pack("!H", 1000), rng))
                    await trio.sleep(0.3)
                    nursery.cancel_scope.cancel()
            await ws.aclose()
            assert ws.close_code == 1000
        await trio.sleep(0.5)
        problems = gw.problems()
        assert problems == [], problems[0]
    finally:
        for svc in (gw, asr):
            if svc is not None:
                fuzz.stop(svc)
                svc.log.unlink(missing_ok=True)
