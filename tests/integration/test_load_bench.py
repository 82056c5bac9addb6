"""bench/load.py's core against an in-process gateway on real sockets: its accounting
(frames sent, recordings fetched over HTTP and counted, every session ended) must agree
with what the gateway archived."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import trio

from bench.common import free_port
from bench.load import (
    SAMPLE_RATE,
    LoadConfig,
    aggregate,
    frame_material,
    material,
    run_load,
    verify_archives,
    ws_binary_frame,
)
from gateway.config import GatewayConfig
from gateway.server import serve
from gateway.vadservice import VadService
from stages.vad import VadModel

pytestmark = pytest.mark.timeout(60)


def test_binary_frame_is_a_masked_websocket_frame() -> None:
    from wsproto.frame_protocol import FrameProtocol, Opcode

    payload = np.arange(320, dtype=np.int16).tobytes()
    server = FrameProtocol(client=False, extensions=[])
    server.receive_bytes(ws_binary_frame(payload, b"\x01\x02\x03\x04"))
    frames = list(server.received_frames())
    assert len(frames) == 1
    assert frames[0].opcode is Opcode.BINARY and frames[0].message_finished
    assert bytes(frames[0].payload) == payload


async def test_load_core_accounting(tmp_path: Path) -> None:
    cfg_gw = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        # nothing listens there: record-only, as the CPU bench runs the gateway
        "asr_urls": f"http://127.0.0.1:{free_port()}"})
    shutdown = trio.Event()
    framed = frame_material(material(), 20)
    async with trio.open_nursery() as nursery:
        ws_port, _ = await nursery.start(functools.partial(
            serve, cfg_gw, shutdown=shutdown, vad=VadService(VadModel())))
        cfg = LoadConfig(url=f"ws://127.0.0.1:{ws_port}/ws/stream", sessions=3, seconds=3.0,
                         ramp_s=0.2, speed=4.0, ping_every_s=0.5, end_timeout_s=20.0,
                         run_id="t")
        with trio.fail_after(40):
            run = await run_load(cfg, framed)
            await trio.to_thread.run_sync(verify_archives, run.sessions)
        shutdown.set()
    agg = aggregate(run)
    per_session = 3 * SAMPLE_RATE // framed.chunk_samples
    assert [r.frames_sent for r in run.sessions] == [per_session] * 3
    assert agg["frames_sent"] == 3 * per_session
    for r in run.sessions:
        assert r.failure is None, r.failure
        assert r.ended and r.end_reason == "flush"
        assert r.events["ack"] == 1 and r.events["record_url"] == 1
        assert r.events["pong"] == len(r.lag_s) > 0
        assert r.archived_samples == r.samples_sent == 3 * SAMPLE_RATE
        assert r.lost_ms == 0
    assert agg["ended"] == 3 and agg["archive_checked"] == 3 and agg["lost_ms_total"] == 0
    assert not agg["errors"]


async def test_soak_core_reconnects_and_accounts(tmp_path: Path) -> None:
    from bench.soak import soak, summarize

    cfg_gw = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "asr_urls": f"http://127.0.0.1:{free_port()}"})
    shutdown = trio.Event()
    framed = frame_material(material(), 20)
    async with trio.open_nursery() as nursery:
        ws_port, _ = await nursery.start(functools.partial(
            serve, cfg_gw, shutdown=shutdown, vad=VadService(VadModel())))
        cfg = LoadConfig(url=f"ws://127.0.0.1:{ws_port}/ws/stream", sessions=2, seconds=1.0,
                         ramp_s=0.1, speed=4.0, ping_every_s=0.2, end_timeout_s=10.0,
                         run_id="s")
        with trio.fail_after(30):
            run = await soak(cfg, framed, minutes=0.05, pid=None)
        shutdown.set()
    s = summarize(run, warmup_s=0.0)
    flows = [r.flow_id for _, r in run.sessions]
    assert len(flows) == len(set(flows)) >= 4  # each reconnect is a new session
    assert s["sessions_run"] == s["ended"] == len(flows)
    assert s["lost_ms_total"] == 0 and s["sessions_without_record"] == 0
    assert not s["errors"] and not s["failures"]
    assert s["audio_sent_s"] == len(flows) * 1.0
