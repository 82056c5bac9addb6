"""WebSocket-level malformed input over real sockets (issue 12, the fuzzed surface).

A frame that breaks RFC 6455 (a text message that is not UTF-8, reserved bits or
opcodes, an unmasked frame, a lone continuation, a long or fragmented ping) used to make
the gateway drop the socket with no Close frame, no ``end`` and no recording of the audio
already accepted; a ping during the close handshake ended the connection's task with a
traceback. Here the clients are raw sockets that build their frames by hand, against a
gateway on 127.0.0.1 port 0 with the real VAD and an ASR service (stand-in engine)."""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from gateway.config import GatewayConfig
from gateway.server import FAIL_LINGER_S, GatewayPorts, serve
from gateway.vadservice import VadService
from stages.vad import VadModel
from tests import speech
from tests.contract import check_event
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

SILENCE = np.zeros(8000, dtype=np.int16)  # 0.5 s
MASK = b"\x11\x22\x33\x44"


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


@pytest.fixture
async def asr_url(nursery: trio.Nursery) -> AsyncIterator[str]:
    _, port, stop = await start_asr(nursery, StandInEngine())
    yield f"http://127.0.0.1:{port}"
    stop.set()


@dataclass
class Gw:
    ws_port: int
    http_port: int
    records: Path
    shutdown: trio.Event

    async def open_connections(self) -> float:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{self.http_port}/metrics")).text
        line = next(ln for ln in text.splitlines() if ln.startswith("ws_connections_open "))
        return float(line.split()[1])


@pytest.fixture
async def gw(nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
             asr_url: str) -> AsyncIterator[Gw]:
    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "archive_fallback_dir": str(tmp_path / "fallback"), "asr_urls": asr_url,
        "flush_idle_s": 2.0, "send_timeout_s": 5.0, "enable_denoise": False})
    shutdown = trio.Event()
    ws_port, http_port = await nursery.start(functools.partial(
        serve, cfg, shutdown=shutdown, vad=VadService(vad_model), ports=GatewayPorts()))
    yield Gw(ws_port, http_port, tmp_path / "records", shutdown)
    shutdown.set()


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
          masked: bool = True) -> bytes:
    """One client frame, built by hand so that it can break the rules."""
    head = bytes([(0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    body = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return head + MASK + body


def text(obj: dict[str, Any]) -> bytes:
    return frame(0x1, json.dumps(obj).encode())


@dataclass
class RawClient:
    """A WebSocket client on a bare socket: it reads the server's (unmasked) frames and
    answers nothing unless told to."""

    stream: trio.SocketStream
    buf: bytes = b""
    events: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    control: list[int] = field(default_factory=list)  # opcodes of other control frames
    eof_at: float | None = None  # time.monotonic() at the server's TCP close
    close_at: float | None = None  # ... and at its Close frame

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all((
            f"GET /ws/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        client = cls(stream)
        while b"\r\n\r\n" not in client.buf:
            data = await stream.receive_some(4096)
            assert data, "closed during the handshake"
            client.buf += data
        head, client.buf = client.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        return client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_until_close(self) -> None:
        """Frames until the server's Close frame (kept in ``close_code``)."""
        while self.close_code is None:
            if not self._parse_one():
                data = await self._receive()
                if not data:
                    return
                self.buf += data

    async def read_to_eof(self) -> None:
        """Frames, then whatever follows, until the server closes the socket."""
        await self.read_until_close()
        while self.eof_at is None:
            data = await self._receive()
            if not data:
                return
            self.buf += data
            while self._parse_one():
                pass

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""  # a reset: closed too, but it may have cost us data
        if not data:
            self.eof_at = time.monotonic()
        return data

    def _parse_one(self) -> bool:
        b = self.buf
        if len(b) < 2:
            return False
        op, n, i = b[0] & 0x0F, b[1] & 0x7F, 2
        assert not b[1] & 0x80, "a server frame must not be masked"
        if n == 126:
            if len(b) < 4:
                return False
            n, i = struct.unpack(">H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return False
            n, i = struct.unpack(">Q", b[2:10])[0], 10
        if len(b) < i + n:
            return False
        payload, self.buf = b[i:i + n], b[i + n:]
        if op == 0x1:
            event = json.loads(payload)
            check_event(event)
            self.events.append(event)
        elif op == 0x8:
            self.close_code = struct.unpack(">H", payload[:2])[0] if payload else 1005
            self.close_at = time.monotonic()
        else:
            self.control.append(op)
        return True

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events]

    def errors(self) -> list[tuple[str, bool]]:
        return [(e["code"], e["fatal"]) for e in self.events if e["type"] == "error"]


async def started(gw: Gw, flow_id: str) -> RawClient:
    client = await RawClient.connect(gw.ws_port)
    await client.send(text({"type": "start", "flowId": flow_id}))
    with trio.fail_after(10):
        while not client.events:
            data = await client._receive()
            assert data, "closed before the ack"
            client.buf += data
            while client._parse_one():
                pass
    assert client.kinds() == ["ack"]
    return client


async def send_audio(client: RawClient, audio: np.ndarray, frame_bytes: int = 3200) -> int:
    """``audio`` in binary frames; returns the bytes sent."""
    pcm = audio.astype("<i2").tobytes()
    for i in range(0, len(pcm), frame_bytes):
        await client.send(frame(0x2, pcm[i:i + frame_bytes]))
    return len(pcm)


def gateway_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info is not None]


@pytest.mark.timeout(90)
async def test_invalid_utf8_after_speech_ends_the_session_then_closes_1007(
        gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    """RFC 6455 8.1: a text message that is not UTF-8 fails the connection with 1007;
    before that, as for any fatal client error, the speech already accepted gets its
    final, its recording, ``metrics`` and ``end``."""
    client = await started(gw, "utf8-speech")
    sent = await send_audio(client, np.concatenate([SILENCE, speech.goforward(), SILENCE]))
    await client.send(frame(0x1, b'{"type":"ping","id":"\xff\xfe"}'))
    with trio.fail_after(40):
        await client.read_to_eof()
    kinds = client.kinds()
    assert client.close_code == 1007, kinds
    assert client.errors() == [("BAD_JSON", True)]
    assert "asr_final" in kinds
    assert kinds[-3:] == ["record_url", "metrics", "end"]
    assert client.events[-1]["reason"] == "error"
    assert client.events[-2]["audio_ms"] == sent // 32  # every sample was kept
    recording = gw.records / "utf8-speech.ogg"
    assert recording.exists() and recording.stat().st_size > 1000
    assert "not valid UTF-8" in next(e["message"] for e in client.events
                                     if e["type"] == "error")
    # The server closed the socket after its Close frame, without our reply.
    assert client.eof_at is not None and client.close_at is not None
    assert client.eof_at - client.close_at < FAIL_LINGER_S + 1.0
    await client.stream.aclose()
    assert gateway_errors(caplog) == []


VIOLATIONS = {
    # name: the frame that breaks RFC 6455 (each after a valid message in the same batch)
    "rsv1_without_extension": frame(0x2, bytes(640), rsv=4),
    "reserved_opcode": frame(0x3, b"x"),
    "reserved_control_opcode": frame(0xB, b""),
    "unmasked": frame(0x2, bytes(640), masked=False),
    "lone_continuation": frame(0x0, bytes(64)),
    "fragmented_ping": frame(0x9, b"p", fin=False),
    "long_ping": frame(0x9, bytes(126)),
    "interleaved_messages": frame(0x2, bytes(64), fin=False) + frame(0x1, b"{}"),
    "close_with_one_byte": frame(0x8, b"\x03"),
    "close_with_reserved_code": frame(0x8, struct.pack(">H", 1004)),
    "close_reason_not_utf8": frame(0x8, struct.pack(">H", 1000) + b"\xff"),
}


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
async def test_protocol_violation_gets_error_end_and_close_1002(
        gw: Gw, caplog: pytest.LogCaptureFixture, name: str) -> None:
    client = await started(gw, f"violation-{name.replace('_', '-')}")
    sent = await send_audio(client, SILENCE)
    await client.send(VIOLATIONS[name])
    with trio.fail_after(20):
        await client.read_to_eof()
    expected = 1007 if name == "close_reason_not_utf8" else 1002
    assert client.close_code == expected, client.kinds()
    assert client.errors() == [("BAD_JSON" if expected == 1007 else "BAD_REQUEST", True)]
    assert client.kinds()[-2:] == ["metrics", "end"]
    assert client.events[-2]["audio_ms"] == sent // 32
    assert client.control == []  # no pong for a broken ping
    await client.stream.aclose()
    assert gateway_errors(caplog) == []


async def test_violation_before_start_is_a_fatal_error_and_a_close(
        gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    client = await RawClient.connect(gw.ws_port)
    await client.send(frame(0x1, b"\xc3\x28"))
    with trio.fail_after(10):
        await client.read_to_eof()
    assert client.close_code == 1007
    assert client.errors() == [("BAD_JSON", True)]
    assert client.kinds() == ["error"]  # no session: no end
    await client.stream.aclose()
    assert gateway_errors(caplog) == []


async def test_a_peer_that_floods_after_a_broken_frame_is_closed_in_time(
        gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    """What follows the broken frame is read and dropped (wsproto would buffer it
    without bound) and the socket is closed FAIL_LINGER_S after the Close frame, though
    the peer never answers it and sends on (64 MiB of junk)."""
    client = await started(gw, "flood")
    await send_audio(client, SILENCE)
    await client.send(frame(0x2, b"\x00\x00", rsv=2))
    junk = os.urandom(64 * 1024)
    sent = 0

    async def flood() -> None:
        nonlocal sent
        try:
            while sent < 64 * 2**20:  # enough to prove it (and to spare the CPU)
                await client.send(junk)
                sent += len(junk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await client.read_to_eof()
            nursery.cancel_scope.cancel()
    assert client.close_code == 1002 and client.kinds()[-1] == "end"
    assert client.eof_at is not None and client.close_at is not None
    assert client.eof_at - client.close_at < FAIL_LINGER_S + 1.0
    # Read on and dropped: far more than the socket buffers on both sides could hold.
    assert sent > 32 * 2**20
    await client.stream.aclose()
    with trio.fail_after(5):
        while await gw.open_connections():
            await trio.sleep(0.05)
    assert gateway_errors(caplog) == []


async def test_a_peer_that_leaves_after_a_broken_frame_frees_its_connection(
        gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    client = await started(gw, "leaver")
    await send_audio(client, SILENCE)
    await client.send(frame(0x1, b"\xff"))
    await client.stream.aclose()
    with trio.fail_after(10):
        while await gw.open_connections():
            await trio.sleep(0.05)
    # The session still ended and recorded what it had.
    with trio.fail_after(10):
        while not (gw.records / "leaver.ogg").exists():
            await trio.sleep(0.05)
    assert gateway_errors(caplog) == []


async def test_pings_during_the_close_handshake_are_not_answered_nor_an_error(
        gw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    """After ``flush`` the server sends ``end`` and its Close frame; pings that arrive
    before the client's Close reply get no pong (RFC 6455 5.5.2: none is due once
    closing; wsproto refuses to send one) and do not fail the connection's task."""
    client = await started(gw, "ping-closing")
    await send_audio(client, SILENCE)
    await client.send(text({"type": "flush"}))
    with trio.fail_after(20):
        await client.read_until_close()
    assert client.close_code == 1000 and client.kinds()[-1] == "end"
    for _ in range(10):
        await client.send(frame(0x9, b"p"))
    await client.send(frame(0x8, struct.pack(">H", 1000)))
    with trio.fail_after(10):
        await client.read_to_eof()
    assert client.control == []
    await client.stream.aclose()
    with trio.fail_after(5):
        while await gw.open_connections():
            await trio.sleep(0.05)
    assert gateway_errors(caplog) == []


async def test_pings_while_open_are_still_answered(gw: Gw) -> None:
    client = await started(gw, "ping-open")
    await client.send(frame(0x9, b"hello"))
    with trio.fail_after(10):
        while 0xA not in client.control:
            data = await client._receive()
            assert data
            client.buf += data
            while client._parse_one():
                pass
    await client.send(text({"type": "flush"}))
    with trio.fail_after(20):
        await client.read_until_close()
    assert client.close_code == 1000
    await client.stream.aclose()
