"""Connection-level admission over real sockets (issue 12, finding 2): the handshake
deadline, MAX_CONNECTIONS (503 at the handshake), MAX_SESSIONS_PER_IP (RATE_LIMITED),
forced closes of peers that never answer, the WebSocket message limit, and METRICS_PORT.

The attackers here are raw TCP sockets speaking just enough HTTP to upgrade; the real
clients are trio-websocket. Everything runs on 127.0.0.1, port 0, with an ASR service
(stand-in engine) and the real VAD."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed

from gateway.client import connect, stream_audio
from gateway.config import GatewayConfig
from gateway.server import Admission, ConnectionTable, GatewayPorts, serve, ws_message_limit
from gateway.vadservice import VadService
from stages.vad import VadModel
from tests.contract import check_event
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

SILENCE = np.zeros(8000, dtype=np.int16)  # 0.5 s


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


@dataclass
class Gw:
    ws_port: int
    http_port: int
    ports: GatewayPorts
    shutdown: trio.Event

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws/stream"


@pytest.fixture
async def asr_url(nursery: trio.Nursery) -> AsyncIterator[str]:
    _, port, stop = await start_asr(nursery, StandInEngine())
    yield f"http://127.0.0.1:{port}"
    stop.set()


async def start(nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str,
                **overrides: Any) -> Gw:
    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "archive_fallback_dir": str(tmp_path / "fallback"), "asr_urls": asr_url,
        "flush_idle_s": 1.0, **overrides})
    shutdown = trio.Event()
    ports = GatewayPorts()
    ws_port, http_port = await nursery.start(functools.partial(
        serve, cfg, shutdown=shutdown, vad=VadService(vad_model), ports=ports))
    return Gw(ws_port, http_port, ports, shutdown)


async def raw_upgrade(port: int, path: str = "/ws/stream"
                      ) -> tuple[trio.SocketStream, int, dict[str, str]]:
    """A WebSocket handshake by hand: the stream, the status and the headers. After a
    101 the caller owns a socket that the server sees as an open WebSocket."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all((
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(1)  # no further: the rest is the caller's
        if not data:
            break
        head += data
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0] else 0
    headers = {k.strip().lower(): v.strip() for k, v in
               (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return stream, status, headers


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the socket (never answering its
    close frame)."""
    out = b""
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:  # a reset also counts as closed
            return out
        if not data:
            return out
        out += data


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmasked server frames: (opcode, payload)."""
    out, i = [], 0
    while i + 2 <= len(data):
        op, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = struct.unpack(">H", data[i:i + 2])[0], i + 2
        elif n == 127:
            n, i = struct.unpack(">Q", data[i:i + 8])[0], i + 8
        out.append((op, data[i:i + n]))
        i += n
    return out


async def open_connections(gw: Gw) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(
            f"http://127.0.0.1:{gw.ports.metrics or gw.http_port}/metrics")).text
    line = next(ln for ln in text.splitlines() if ln.startswith("ws_connections_open "))
    return float(line.split()[1])


async def test_idle_sockets_cannot_lock_out_a_real_client(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """The review's attack, scaled down: MAX_CONNECTIONS-1 sockets that upgrade, never
    send start and never answer the close. A real client still gets a session at once,
    one more connection gets 503, and the idle sockets are closed by the server within
    START_TIMEOUT_S + SEND_TIMEOUT_S."""
    start_s, send_s = 1.0, 1.0
    gw = await start(nursery, vad_model, tmp_path, asr_url, max_connections=20,
                     max_sessions=5, start_timeout_s=start_s, send_timeout_s=send_s)
    idle = []
    t0 = time.monotonic()
    for _ in range(19):
        stream, status, _ = await raw_upgrade(gw.ws_port)
        assert status == 101
        idle.append(stream)
    twentieth, status, _ = await raw_upgrade(gw.ws_port)
    assert status == 101
    refused, status, headers = await raw_upgrade(gw.ws_port)  # the 21st
    assert (status, headers["retry-after"]) == (503, "5")
    assert (await read_to_eof(refused)).endswith(b"connections\n")  # and closed
    await refused.aclose()
    await twentieth.aclose()
    # 19 idle sockets and this client make 20: at the cap, not over it; and the idle
    # ones are not sessions, so MAX_SESSIONS=5 does not make it BUSY.
    acked: list[float] = []
    r = await stream_audio(gw.ws_url, SILENCE, realtime=False, timeout_s=20, on_event=(
        lambda e: acked.append(time.monotonic() - t0) if e["type"] == "ack" else None))
    kinds = [e["type"] for e in r.events]
    assert kinds[0] == "ack" and kinds[-1] == "end", kinds
    assert not r.of("error")
    assert acked[0] < start_s  # admitted while all 19 were still open
    closed_after: list[float] = []
    received: list[bytes] = []

    async def wait_closed(stream: trio.SocketStream) -> None:
        received.append(await read_to_eof(stream))
        closed_after.append(time.monotonic() - t0)
        await stream.aclose()

    with trio.fail_after(start_s + send_s + 5):
        async with trio.open_nursery() as n:
            for s in idle:
                n.start_soon(wait_closed, s)
    assert max(closed_after) <= start_s + send_s + 1.5, closed_after
    for data in received:  # each got its coded error and a close frame first
        (text_op, payload), (close_op, _) = frames(data)[-2:]
        assert (text_op, close_op) == (0x1, 0x8)
        event = json.loads(payload)
        check_event(event)
        assert event["type"] == "error" and event["fatal"]
    with trio.fail_after(5):
        while await open_connections(gw) != 0:
            await trio.sleep(0.05)
    gw.shutdown.set()


async def test_over_max_connections_is_refused_at_the_handshake(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    gw = await start(nursery, vad_model, tmp_path, asr_url, max_connections=3)
    held = [(await raw_upgrade(gw.ws_port))[0] for _ in range(3)]
    for _ in range(2):  # refused, closed, and refused again: a refusal holds no place
        stream, status, headers = await raw_upgrade(gw.ws_port)
        assert status == 503 and headers["retry-after"] == "5"
        assert (await read_to_eof(stream)).endswith(b"too many connections\n")
        await stream.aclose()
    await held.pop().aclose()  # a place frees up
    with trio.fail_after(5):
        while await open_connections(gw) != 2:
            await trio.sleep(0.02)
    r = await stream_audio(gw.ws_url, SILENCE, realtime=False, timeout_s=20)
    assert [e["type"] for e in r.events][-1] == "end" and not r.of("error")
    for s in held:
        await s.aclose()
    gw.shutdown.set()


async def test_over_max_sessions_per_ip_gets_rate_limited(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    gw = await start(nursery, vad_model, tmp_path, asr_url, max_sessions_per_ip=2,
                     send_timeout_s=1.0)
    held = [(await raw_upgrade(gw.ws_port))[0] for _ in range(2)]
    # One that never answers the close: told, then dropped after SEND_TIMEOUT_S.
    mute, status, _ = await raw_upgrade(gw.ws_port)
    assert status == 101
    t0 = time.monotonic()
    with trio.fail_after(3):
        (text_op, payload), (close_op, close) = frames(await read_to_eof(mute))
    assert 0.8 <= time.monotonic() - t0 <= 3.0  # SEND_TIMEOUT_S 1 s, slack for a busy CI
    assert (text_op, close_op, struct.unpack(">H", close[:2])[0]) == (0x1, 0x8, 1008)
    assert json.loads(payload)["code"] == "RATE_LIMITED"
    await mute.aclose()
    async with connect(gw.ws_url) as ws:
        with trio.fail_after(5):
            event = json.loads(await ws.get_message())
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
    check_event(event)
    assert (event["type"], event["code"], event["fatal"]) == ("error", "RATE_LIMITED", True)
    assert info.value.reason.code == 1008
    await held.pop().aclose()
    with trio.fail_after(5):
        while await open_connections(gw) != 1:
            await trio.sleep(0.02)
    r = await stream_audio(gw.ws_url, SILENCE, realtime=False, timeout_s=20)
    assert [e["type"] for e in r.events][-1] == "end" and not r.of("error")
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{gw.http_port}/metrics")).text
    assert "ws_connections_rate_limited_total 2.0" in metrics
    for s in held:
        await s.aclose()
    gw.shutdown.set()


async def test_one_address_cannot_fill_the_gateway(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """With MAX_SESSIONS_PER_IP, an address that opens many sockets and never upgrades
    holds at most twice its cap (the rest are closed at the accept) and does not count
    against MAX_CONNECTIONS beyond its cap: a client at another address still gets in."""
    gw = await start(nursery, vad_model, tmp_path, asr_url, max_connections=4,
                     max_sessions_per_ip=2, start_timeout_s=2.0)
    attacker = [await trio.open_tcp_stream("127.0.0.1", gw.ws_port,
                                           local_address="127.0.0.2") for _ in range(10)]
    with trio.fail_after(2):
        while await open_connections(gw) != 4:
            await trio.sleep(0.02)
    # 6 of them were closed at once, before any deadline
    eof: list[bool] = []

    async def closed_soon(s: trio.SocketStream) -> None:
        with trio.move_on_after(0.5), contextlib.suppress(trio.BrokenResourceError):
            if await s.receive_some(10) == b"":
                eof.append(True)

    async with trio.open_nursery() as n:
        for s in attacker:
            n.start_soon(closed_soon, s)
    assert len(eof) == 6
    # counted: 2 of the attacker's 4, this one, and the client's session: 4, not over
    held = [(await raw_upgrade(gw.ws_port))[0]]
    r = await stream_audio(gw.ws_url, SILENCE, realtime=False, timeout_s=20)
    assert [e["type"] for e in r.events][-1] == "end" and not r.of("error")
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{gw.http_port}/metrics")).text
    assert "ws_connections_dropped_total 6.0" in metrics
    for s in attacker + held:
        await s.aclose()
    gw.shutdown.set()


async def test_tcp_that_never_upgrades_is_dropped(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """Silent sockets and a half-sent request are closed at the handshake deadline (they
    held a place until then); one that hangs up frees its place at once."""
    gw = await start(nursery, vad_model, tmp_path, asr_url, start_timeout_s=1.0)
    silent = await trio.open_tcp_stream("127.0.0.1", gw.ws_port)
    partial = await trio.open_tcp_stream("127.0.0.1", gw.ws_port)
    await partial.send_all(b"GET /ws/stream HTTP/1.1\r\nHost: x\r\n")
    quitter = await trio.open_tcp_stream("127.0.0.1", gw.ws_port)
    with trio.fail_after(2):
        while await open_connections(gw) != 3:
            await trio.sleep(0.02)
    await quitter.aclose()
    t0 = time.monotonic()
    with trio.fail_after(0.8):  # before the 1 s deadline
        while await open_connections(gw) != 2:
            await trio.sleep(0.02)
    with trio.fail_after(3):
        assert await read_to_eof(silent) == b""
        assert await read_to_eof(partial) == b""
    assert time.monotonic() - t0 <= 2.5  # the 1 s deadline, slack for a busy CI
    assert await open_connections(gw) == 0
    for s in (silent, partial):
        await s.aclose()
    gw.shutdown.set()


async def test_websocket_message_limit_is_the_frame_limit_plus_header(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """MAX_FRAME_BYTES of audio behind a seq header is taken; one byte more than that in
    one message is FRAME_TOO_LARGE (fatal, close 1009) without being buffered."""
    # never below the text-frame limit: a start with a long token must still be read
    assert ws_message_limit(GatewayConfig(max_frame_bytes=6400)) == 16 * 1024
    assert ws_message_limit(GatewayConfig()) == 65536 + 8
    gw = await start(nursery, vad_model, tmp_path, asr_url)
    limit = 65536 + 8
    events: list[dict[str, Any]] = []
    async with connect(gw.ws_url) as ws:
        await ws.send_message(json.dumps({"type": "start", "flowId": "limit",
                                          "features": ["seq_header"]}))
        events.append(json.loads(await ws.get_message()))
        await ws.send_message(struct.pack("<II", 0, 0) + bytes(limit - 8))
        await ws.send_message(bytes(limit + 1))
        with trio.fail_after(20):
            try:
                while True:
                    events.append(json.loads(await ws.get_message()))
            except ConnectionClosed as exc:
                code = exc.reason.code
    for e in events:
        check_event(e)
    assert code == 1009
    errors = [(e["code"], e["fatal"]) for e in events if e["type"] == "error"]
    assert errors == [("FRAME_TOO_LARGE", True)]
    metrics = next(e for e in events if e["type"] == "metrics")
    assert metrics["audio_ms"] == (limit - 8) // 32  # the full frame was kept
    gw.shutdown.set()


async def test_metrics_port_serves_metrics_alone(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    gw = await start(nursery, vad_model, tmp_path, asr_url, metrics_port=0)
    assert gw.ports.metrics not in (None, gw.http_port, gw.ws_port)
    assert (gw.ports.ws, gw.ports.http) == (gw.ws_port, gw.http_port)
    async with httpx.AsyncClient() as client:
        m = await client.get(f"http://127.0.0.1:{gw.ports.metrics}/metrics")
        assert m.status_code == 200 and "orchestrator_active_sessions" in m.text
        assert (await client.get(f"http://127.0.0.1:{gw.ports.metrics}/healthz")
                ).status_code == 200
        assert (await client.get(f"http://127.0.0.1:{gw.ports.metrics}/records/x.ogg")
                ).status_code == 404
        main = await client.get(f"http://127.0.0.1:{gw.http_port}/metrics")
        assert main.status_code == 404
        assert (await client.get(f"http://127.0.0.1:{gw.http_port}/healthz")
                ).status_code == 200
    gw.shutdown.set()


def test_connection_table_counts_and_decides() -> None:
    t = ConnectionTable(max_connections=3, max_per_ip=2)
    for ip in ("a", "a", "b"):
        assert t.opened(ip)
    assert [t.admit("a"), t.admit("b")] == [Admission.OK] * 2
    assert t.opened("c")
    assert t.admit("c") is Admission.FULL  # the global cap comes first
    t.closed("c")
    assert t.opened("a")  # a's third: over its cap, and not counted against the others
    assert (t.open, t.counted) == (4, 3)
    assert t.admit("a") is Admission.RATE_LIMITED and t.admit("b") is Admission.OK
    assert t.opened("a") and not t.opened("a")  # twice the cap: closed at the accept
    assert (t.open, t.counted, t.dropped) == (5, 3, 1)
    for _ in range(4):
        t.closed("a")
    t.closed("b")
    assert (t.open, t.counted, t.per_ip) == (0, 0, {})
    assert (t.refused_full, t.refused_rate_limited) == (1, 1)
    with pytest.raises(ValueError, match="none open"):
        t.closed("a")


def test_connection_table_without_a_per_address_cap() -> None:
    t = ConnectionTable(max_connections=2)
    assert all(t.opened("a") for _ in range(3))
    assert t.admit("a") is Admission.FULL and (t.open, t.counted) == (3, 3)
