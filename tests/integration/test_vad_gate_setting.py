"""VAD_GATE_DBFS reaches the gateway's VAD service: with the gate on, silent windows are
decided without the model (vad_gated_windows_total counts them); ``off`` runs the model
on every window."""

from __future__ import annotations

import functools
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from gateway.client import stream_audio
from gateway.config import GatewayConfig
from gateway.server import serve
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize(("gate", "gated"), [("off", False), ("-60", True)])
async def test_gate_setting(nursery: trio.Nursery, tmp_path: Path, gate: str,
                            gated: bool) -> None:
    _, asr_port, _ = await start_asr(nursery, StandInEngine())
    cfg = GatewayConfig.load(env={"VAD_GATE_DBFS": gate}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "archive_fallback_dir": str(tmp_path / "fallback"),
        "asr_urls": f"http://127.0.0.1:{asr_port}"})
    shutdown = trio.Event()
    ws_port, http_port = await nursery.start(functools.partial(serve, cfg,
                                                               shutdown=shutdown))
    silence = np.zeros(16000 * 2, dtype=np.int16)
    with trio.fail_after(30):
        r = await stream_audio(f"ws://127.0.0.1:{ws_port}/ws/stream", silence,
                               realtime=False, start={"flowId": f"gate{gate}"})
        assert r.of("end")[0]["reason"] == "flush"
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{http_port}/metrics")).text
    windows = _value(text, "vad_windows_total")
    assert windows >= 2 * 16000 // 512 - 1
    assert (_value(text, "vad_gated_windows_total") == windows) is gated
    if not gated:
        assert _value(text, "vad_gated_windows_total") == 0
    shutdown.set()
