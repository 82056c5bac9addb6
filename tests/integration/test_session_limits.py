"""Issue 12, per session, over real sockets: admission (a slot only once admitted, the
start deadline, the per-tenant cap), who owns a flowId (live, parked, saved), the
message rate, the maximum duration, send and close deadlines, languages, LID answers,
and the smaller holes (deep JSON, duplicates and crumbs that held a session open, a
failing VAD tick). Real gateway, real VAD, the stand-in ASR engine on loopback."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage

from gateway.client import connect, stream_audio
from gateway.records import record_key
from gateway.session import _lid_answer
from gateway.vadservice import VadService
from stages.vad import VadModel
from tests import speech
from tests.contract import check_event
from tests.integration.test_gateway import Gateway, checked, start_gateway
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(90)

SECRET = "test-secret-of-thirty-two-bytes!"
GOFORWARD = speech.goforward()
SILENCE = np.zeros(16000, dtype=np.int16)
AUDIO = np.concatenate([SILENCE, GOFORWARD, SILENCE]).astype(np.int16)


def token(tenant: str, sub: str = "user") -> str:
    return jwt.encode({"sub": sub, "tenant": tenant, "exp": int(time.time()) + 300},
                      SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


@pytest.fixture
async def asr_url(nursery: trio.Nursery) -> AsyncIterator[str]:
    _, port, stop = await start_asr(nursery, StandInEngine())
    yield f"http://127.0.0.1:{port}"
    stop.set()


async def gateway(nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str,
                  **overrides: Any) -> Gateway:
    return await start_gateway(nursery, vad_model, tmp_path, asr_url, **overrides)


async def events_until_end(ws: WebSocketConnection, events: list[dict[str, Any]]) -> None:
    """Read events into ``events`` until ``end`` or the close."""
    try:
        while not events or events[-1]["type"] != "end":
            events.append(json.loads(await ws.get_message()))
    except ConnectionClosed:
        pass


async def first_event(url: str, start: dict[str, Any]) -> dict[str, Any]:
    async with connect(url) as ws:
        await ws.send_message(json.dumps({"type": "start", **start}))
        ev: dict[str, Any] = json.loads(await ws.get_message())
    check_event(ev)
    return ev


def _frames(audio: np.ndarray, step: int = 320, *, seq: bool = False) -> list[bytes]:
    out = []
    for i in range(0, len(audio), step):
        chunk = audio[i:i + step].tobytes()
        out.append(struct.pack("<II", i // step, i // 16) + chunk if seq else chunk)
    return out


# -- admission ------------------------------------------------------------------------

async def test_sockets_waiting_for_start_hold_no_slot(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """Finding 2: every accepted socket counted as a session before start, so idle
    sockets locked real clients out with BUSY."""
    g = await gateway(nursery, vad_model, tmp_path, asr_url, max_sessions=1)
    with trio.fail_after(30):
        async with connect(g.ws_url), connect(g.ws_url), connect(g.ws_url):
            r = checked(await stream_audio(g.ws_url, AUDIO, realtime=False))
            assert not r.of("error") and r.of("end")[0]["reason"] == "flush"
            # the one slot is taken now: the next admitted session is refused
            async with connect(g.ws_url) as first:
                await first.send_message(json.dumps({"type": "start"}))
                assert json.loads(await first.get_message())["type"] == "ack"
                ev = await first_event(g.ws_url, {})
                assert (ev["type"], ev["state"]) == ("flow", "BUSY")
    g.shutdown.set()


@pytest.mark.timeout(60)
async def test_201_silent_sockets_lock_no_one_out_and_are_closed(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """Finding 2, as the review found it: 201 sockets that open the WebSocket, send no
    start and never answer the closing handshake. A real client is still admitted, and
    each of them is dropped after START_TIMEOUT_S plus SEND_TIMEOUT_S."""
    g = await gateway(nursery, vad_model, tmp_path, asr_url, max_sessions=200,
                      start_timeout_s=2.0, send_timeout_s=0.5)
    port = int(g.ws_url.rsplit(":", 1)[1].split("/")[0])
    silent: list[trio.SocketStream] = []
    with trio.fail_after(45):
        for _ in range(201):
            stream, _ws = await _raw_ws(port)
            silent.append(stream)
        t0 = time.monotonic()
        r = checked(await stream_audio(g.ws_url, AUDIO[:16000], realtime=False))
        assert r.of("ack") and not r.of("error")

        async def until_closed(stream: trio.SocketStream) -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some(65536):  # the START_TIMEOUT error
                    pass

        async with trio.open_nursery() as n:
            for stream in silent:
                n.start_soon(until_closed, stream)
        elapsed = time.monotonic() - t0
        for stream in silent:
            await stream.aclose()
    assert elapsed <= 2.0 + 0.5 + 5.0
    g.shutdown.set()


async def test_no_start_within_the_deadline_is_start_timeout(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    g = await gateway(nursery, vad_model, tmp_path, asr_url, start_timeout_s=0.5)
    with trio.fail_after(10):
        async with connect(g.ws_url) as ws:
            t0 = time.monotonic()
            ev = json.loads(await ws.get_message())
            waited = time.monotonic() - t0
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
    check_event(ev)
    assert (ev["type"], ev["code"], ev["fatal"]) == ("error", "START_TIMEOUT", True)
    assert 0.4 <= waited <= 3.0
    g.shutdown.set()


async def test_per_tenant_session_cap_is_rate_limited(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    g = await gateway(nursery, vad_model, tmp_path, asr_url, auth_jwt_secret=SECRET,
                      max_sessions_per_tenant=1)
    with trio.fail_after(30):
        async with connect(g.ws_url) as first:
            await first.send_message(json.dumps(
                {"type": "start", "auth": {"token": token("acme")}}))
            assert json.loads(await first.get_message())["type"] == "ack"
            second = await first_event(g.ws_url, {"auth": {"token": token("acme", "u2")}})
            other = await first_event(g.ws_url, {"auth": {"token": token("globex")}})
    assert (second["type"], second["code"], second["fatal"]) == ("error", "RATE_LIMITED",
                                                                  True)
    assert other["type"] == "ack"
    g.shutdown.set()


async def test_bad_token_is_unauthorized_and_takes_no_slot(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    g = await gateway(nursery, vad_model, tmp_path, asr_url, auth_jwt_secret=SECRET,
                      max_sessions=1)
    forged = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, "y" * 32,
                        algorithm="HS256")
    with trio.fail_after(30):
        for _ in range(3):
            ev = await first_event(g.ws_url, {"auth": {"token": forged}})
            assert (ev["code"], ev["fatal"]) == ("UNAUTHORIZED", True)
        ev = await first_event(g.ws_url, {"auth": {"token": token("acme")}})
    assert ev["type"] == "ack"
    g.shutdown.set()


# -- who owns a flowId ----------------------------------------------------------------

async def test_a_live_flow_id_cannot_be_taken(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """Finding 1: a second session with the same flowId replaced the first one's
    recording, whoever sent it."""
    g = await gateway(nursery, vad_model, tmp_path, asr_url, auth_jwt_secret=SECRET)
    with trio.fail_after(30):
        async with connect(g.ws_url) as ws:
            await ws.send_message(json.dumps({"type": "start", "flowId": "shared",
                                              "auth": {"token": token("acme")}}))
            assert json.loads(await ws.get_message())["type"] == "ack"
            intruder = await first_event(g.ws_url, {"flowId": "shared",
                                                    "auth": {"token": token("globex")}})
            twice = await first_event(g.ws_url, {"flowId": "shared",
                                                 "auth": {"token": token("acme")}})
            await ws.send_message(json.dumps({"type": "ping", "id": "still"}))
            assert json.loads(await ws.get_message())["type"] == "pong"
    for ev in (intruder, twice):
        assert (ev["type"], ev["code"], ev["fatal"]) == ("error", "FLOW_EXISTS", True)
    g.shutdown.set()


async def test_a_parked_session_resumes_only_for_its_tenant(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    g = await gateway(nursery, vad_model, tmp_path, asr_url, auth_jwt_secret=SECRET,
                      resume_window_s=10.0)
    frames = _frames(AUDIO, seq=True)
    start = {"type": "start", "flowId": "parked", "features": ["seq_header"]}
    with trio.fail_after(40):
        async with connect(g.ws_url) as ws:
            await ws.send_message(json.dumps({**start, "auth": {"token": token("acme")}}))
            assert json.loads(await ws.get_message())["type"] == "ack"
            for f in frames[:50]:
                await ws.send_message(f)
            await trio.sleep(0.3)
            await ws._stream.aclose()  # the connection drops: the session is parked
        await trio.sleep(0.3)
        intruder = await first_event(g.ws_url, {**start, "auth": {"token": token("globex")}})
        events: list[dict[str, Any]] = []
        async with connect(g.ws_url) as ws:
            await ws.send_message(json.dumps({**start, "auth": {"token": token("acme")}}))
            ack = json.loads(await ws.get_message())
            for f in frames[ack["session"]["next_seq"]:]:
                await ws.send_message(f)
            await ws.send_message(json.dumps({"type": "flush"}))
            await events_until_end(ws, events)
    assert (intruder["type"], intruder["code"]) == ("error", "FLOW_EXISTS")
    assert ack["type"] == "ack" and ack["session"]["resumed"] is True
    assert events[-1]["type"] == "end"
    m = next(e for e in events if e["type"] == "metrics")
    assert m["audio_ms"] == len(AUDIO) // 16  # one session, nothing lost or doubled
    g.shutdown.set()


async def test_a_saved_recording_is_the_tenants_and_never_replaced(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    g = await gateway(nursery, vad_model, tmp_path, asr_url, auth_jwt_secret=SECRET)
    with trio.fail_after(40):
        a = checked(await stream_audio(g.ws_url, AUDIO, realtime=False, start={
            "flowId": "meeting-1", "auth": {"token": token("acme")}}))
        saved = g.archive / record_key("meeting-1", "acme")
        assert a.of("record_url") and saved.exists()
        before = saved.read_bytes()
        again = await first_event(g.ws_url, {"flowId": "meeting-1",
                                             "auth": {"token": token("acme", "u2")}})
        b = checked(await stream_audio(g.ws_url, AUDIO[:16000], realtime=False, start={
            "flowId": "meeting-1", "auth": {"token": token("globex")}}))
    assert (again["type"], again["code"], again["fatal"]) == ("error", "FLOW_EXISTS", True)
    assert b.of("end")[0]["reason"] == "flush" and not b.of("error")
    assert saved.read_bytes() == before  # acme's recording is untouched
    assert (g.archive / record_key("meeting-1", "globex")).exists()
    assert not (g.archive / "meeting-1.ogg").exists()
    url_a, url_b = a.of("record_url")[0]["url"], b.of("record_url")[0]["url"]
    assert "/records/acme/meeting-1.ogg" in url_a and "/records/globex/" in url_b
    g.shutdown.set()


async def test_record_url_is_signed_and_unsigned_is_refused(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    g = await gateway(nursery, vad_model, tmp_path, asr_url)
    with trio.fail_after(40):
        r = checked(await stream_audio(g.ws_url, AUDIO, realtime=False,
                                       start={"flowId": "signed-1"}))
        url = r.of("record_url")[0]["url"]
        async with httpx.AsyncClient() as client:
            signed = await client.get(url)
            unsigned = await client.get(url.split("?", 1)[0])
            head = await client.head(url.split("?", 1)[0])
    assert url.startswith(f"{g.http}/records/signed-1.ogg?") and "sig=" in url
    assert signed.status_code == 200 and len(signed.content) == r.of("record_url")[0]["bytes"]
    assert unsigned.status_code == 403 and head.status_code == 403
    g.shutdown.set()


# -- limits in a session --------------------------------------------------------------

async def test_messages_over_the_rate_are_paced_and_none_is_lost(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """A client far over MAX_MESSAGES_PER_S is read at that rate (TCP pushes back on
    it), told so with a non-fatal RATE_LIMITED, and loses nothing."""
    g = await gateway(nursery, vad_model, tmp_path, asr_url, max_messages_per_s=20)
    frames = _frames(AUDIO[:16000 * 2], seq=True)  # 100 frames of 20 ms, sent at once
    events: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async with connect(g.ws_url) as ws:
            await ws.send_message(json.dumps({"type": "start", "features": ["seq_header"]}))
            events.append(json.loads(await ws.get_message()))
            t0 = time.monotonic()
            for f in frames:
                await ws.send_message(f)
            await ws.send_message(json.dumps({"type": "flush"}))
            await events_until_end(ws, events)
            elapsed = time.monotonic() - t0
    for e in events:
        check_event(e)
    errors = [e for e in events if e["type"] == "error"]
    assert errors and all((e["code"], e["fatal"]) == ("RATE_LIMITED", False) for e in errors)
    assert len(errors) <= 4  # at most one a second
    assert "nothing was dropped" in errors[0]["message"]
    m = next(e for e in events if e["type"] == "metrics")
    assert m["audio_ms"] == 2000  # every frame accepted
    # the 2 s burst (40 messages, the start among them), then 20 a second
    assert elapsed >= (101 - 40) / 20 - 0.3
    assert events[-1]["reason"] == "flush"
    g.shutdown.set()


async def test_max_session_duration_ends_like_a_flush(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    g = await gateway(nursery, vad_model, tmp_path, asr_url, max_session_s=2.0,
                      flush_idle_s=30.0)
    audio = np.concatenate([GOFORWARD, SILENCE, SILENCE, SILENCE]).astype(np.int16)
    with trio.fail_after(30):
        r = checked(await stream_audio(g.ws_url, audio, realtime=True, flush=False,
                                       start={"flowId": "long-one"}))
    assert r.of("end")[0]["reason"] == "max_duration"
    assert r.of("asr_final") and r.of("record_url") and r.of("metrics")
    assert 1800 <= r.of("metrics")[0]["audio_ms"] <= 2600
    assert (g.archive / "long-one.ogg").exists()
    g.shutdown.set()


async def _raw_ws(port: int) -> tuple[trio.SocketStream, WSConnection]:
    """A WebSocket client over a bare TCP stream, which answers nothing on its own (a
    library client would answer the closing handshake)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/ws/stream")))
    while True:
        ws.receive_data(await stream.receive_some(65536))
        if any(isinstance(e, AcceptConnection) for e in ws.events()):
            return stream, ws


async def test_a_client_that_never_answers_the_close_is_aborted(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """Finding 2: closes had no deadline, so a client that never answered the closing
    handshake held its task and socket forever."""
    g = await gateway(nursery, vad_model, tmp_path, asr_url, send_timeout_s=0.5)
    port = int(g.ws_url.rsplit(":", 1)[1].split("/")[0])
    with trio.fail_after(15):
        stream, ws = await _raw_ws(port)
        start = {"type": "start", "audio": {"sr": 8000}}  # refused: the server closes
        await stream.send_all(ws.send(TextMessage(data=json.dumps(start))))
        t0 = time.monotonic()
        got = b""
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset: aborted
                break
            if not data:  # EOF: aborted
                break
            got += data
        elapsed = time.monotonic() - t0
        await stream.aclose()
    assert b"UNSUPPORTED_AUDIO" in got
    assert elapsed <= 5.0
    g.shutdown.set()


async def test_a_client_that_does_not_read_is_dropped_after_the_send_deadline(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """A client that stops reading fills the socket buffers; the writer's send must
    give up after SEND_TIMEOUT_S and drop the connection, not hold the session."""
    g = await gateway(nursery, vad_model, tmp_path, asr_url, send_timeout_s=0.5,
                      max_messages_per_s=100000, flush_idle_s=60.0)
    port = int(g.ws_url.rsplit(":", 1)[1].split("/")[0])
    with trio.fail_after(40):
        stream, ws = await _raw_ws(port)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stream.send_all(ws.send(TextMessage(data=json.dumps({"type": "start"}))))
        ping = ws.send(TextMessage(data=json.dumps({"type": "ping", "id": "x" * 100})))
        with trio.move_on_after(4):  # pongs pile up unread
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await stream.send_all(ping * 50)
                    await trio.sleep(0)
        # Now read: what the server had sent, then the end of the connection (before
        # the fix the writer waited forever and the session, idle for 60 s, stayed).
        closed = False
        with trio.move_on_after(10):
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            closed = True
        await stream.aclose()
    assert closed
    g.shutdown.set()


async def test_a_resumable_session_aborted_for_a_slow_reader_can_resume(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """The send deadline treats the client as gone; a seq_header session then waits for
    its resume as after any disconnect."""
    g = await gateway(nursery, vad_model, tmp_path, asr_url, send_timeout_s=0.5,
                      max_messages_per_s=100000, resume_window_s=10.0)
    port = int(g.ws_url.rsplit(":", 1)[1].split("/")[0])
    frames = _frames(AUDIO, seq=True)
    start = {"type": "start", "flowId": "slow-reader", "features": ["seq_header"]}
    events: list[dict[str, Any]] = []
    with trio.fail_after(40):
        stream, ws = await _raw_ws(port)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stream.send_all(ws.send(TextMessage(data=json.dumps(start))))
        for f in frames[:40]:
            await stream.send_all(ws.send(BytesMessage(data=f)))
        ping = ws.send(TextMessage(data=json.dumps({"type": "ping", "id": "x" * 100})))
        with trio.move_on_after(4), contextlib.suppress(trio.BrokenResourceError):
            while True:
                await stream.send_all(ping * 50)
                await trio.sleep(0)
        await stream.aclose()
        async with connect(g.ws_url) as again:
            await again.send_message(json.dumps(start))
            while True:
                ack = json.loads(await again.get_message())
                if ack["type"] == "ack":
                    break
            for f in frames[ack["session"]["next_seq"]:]:
                await again.send_message(f)
            await again.send_message(json.dumps({"type": "flush"}))
            await events_until_end(again, events)
    assert ack["session"]["resumed"] is True and ack["session"]["next_seq"] == 40
    assert events[-1]["type"] == "end" and events[-1]["reason"] == "flush"
    m = next(e for e in events if e["type"] == "metrics")
    assert m["audio_ms"] == len(AUDIO) // 16
    g.shutdown.set()


# -- languages and LID answers --------------------------------------------------------

async def test_language_is_normalised_or_refused_at_start(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """Finding 3: an unknown user_lang_pref reached the decoder and failed its batch."""
    g = await gateway(nursery, vad_model, tmp_path, asr_url)
    with trio.fail_after(30):
        ok = await first_event(g.ws_url, {"hints": {"user_lang_pref": "en-US"}})
        bad = await first_event(g.ws_url, {"hints": {"user_lang_pref": "xx\u202e<b>"}})
    assert ok["type"] == "ack" and ok["session"]["lang_pref"] == "en"
    assert (bad["type"], bad["code"], bad["fatal"]) == ("error", "UNSUPPORTED_LANGUAGE", True)
    assert "\u202e" not in bad["message"]
    g.shutdown.set()


async def test_a_lid_answer_outside_the_whitelist_does_not_move_recognition(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine(lid=("xx", 0.99)))
    g = await gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{port}")
    with trio.fail_after(30):
        r = checked(await stream_audio(g.ws_url, AUDIO, realtime=False))
    assert not [e for e in r.of("lid") if e["lang"] == "xx"]
    (final,) = r.of("asr_final")
    assert final["lang"] == "en" and final["text"]
    assert r.of("end")[0]["reason"] == "flush" and not r.of("error")
    g.shutdown.set()


@pytest.mark.parametrize("answer", [
    {"lang": "en"}, {"lang": "en", "score": "high"}, {"lang": "en", "score": float("nan")},
    {"lang": "en", "score": True}, {"lang": "xx", "score": 0.9}, {"lang": 7, "score": 0.9},
    {"score": 0.9}, [], "en", None, {"lang": "en", "score": 1.5},
])
def test_lid_answers_that_are_not_answers_are_refused(answer: Any) -> None:
    assert _lid_answer(answer) is None


def test_lid_answer_keeps_the_valid_top_entries() -> None:
    got = _lid_answer({"lang": "de", "score": 0.8,
                       "top": [{"lang": "de", "score": 0.8}, {"lang": "zz", "score": 0.1},
                               {"lang": "en", "score": "x"}, "junk", {"lang": "fr",
                                                                      "score": 0.05}]})
    assert got == ("de", 0.8, [("de", 0.8), ("fr", 0.05)])


# -- the smaller holes ----------------------------------------------------------------

async def test_deeply_nested_json_is_bad_json_and_the_session_goes_on(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """Finding 6: a 16 KiB run of '[' raised RecursionError and ended the session."""
    g = await gateway(nursery, vad_model, tmp_path, asr_url)
    events: list[dict[str, Any]] = []
    frames = _frames(AUDIO, 3200)
    with trio.fail_after(30):
        async with connect(g.ws_url) as ws:
            await ws.send_message(json.dumps({"type": "start", "flowId": "nested"}))
            for i, f in enumerate(frames):
                await ws.send_message(f)
                if i == len(frames) // 2:
                    await ws.send_message("[" * 16384)
            await ws.send_message(json.dumps({"type": "flush"}))
            await events_until_end(ws, events)
    for e in events:
        check_event(e)
    errors = [e for e in events if e["type"] == "error"]
    assert [(e["code"], e["fatal"]) for e in errors] == [("BAD_JSON", False)]
    assert events[-1]["reason"] == "flush"
    assert any(e["type"] == "asr_final" for e in events)
    rec = next(e for e in events if e["type"] == "record_url")
    assert abs(rec["duration_ms"] - len(AUDIO) // 16) <= 20
    g.shutdown.set()


async def test_a_huge_seq_jump_is_refused_and_later_audio_is_kept(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    g = await gateway(nursery, vad_model, tmp_path, asr_url)
    frames = _frames(AUDIO, seq=True)
    events: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async with connect(g.ws_url) as ws:
            await ws.send_message(json.dumps({"type": "start", "features": ["seq_header"]}))
            for i, f in enumerate(frames):
                await ws.send_message(f)
                if i == 10:
                    await ws.send_message(struct.pack("<II", 2**32 - 1, 0) + b"\0" * 640)
            await ws.send_message(json.dumps({"type": "flush"}))
            await events_until_end(ws, events)
    errors = [e for e in events if e["type"] == "error"]
    assert [(e["code"], e["fatal"]) for e in errors] == [("BAD_SEQ_HEADER", False)]
    m = next(e for e in events if e["type"] == "metrics")
    assert m["audio_ms"] == len(AUDIO) // 16
    assert len([e for e in events if e["type"] == "asr_final"]) == 1
    g.shutdown.set()


@pytest.mark.parametrize("kind", ["duplicates", "crumbs", "empty"])
async def test_only_new_audio_keeps_a_session_open(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str,
        kind: str) -> None:
    """Finding 6: duplicates (and any frame) reset the idle timer, so 2 bytes every few
    seconds held a session, and its slot, forever."""
    g = await gateway(nursery, vad_model, tmp_path, asr_url, flush_idle_s=1.0)
    seq = kind == "duplicates"
    frames = _frames(AUDIO[:16000], seq=seq)
    events: list[dict[str, Any]] = []
    with trio.fail_after(25):
        async with connect(g.ws_url) as ws, trio.open_nursery() as n:
            n.start_soon(events_until_end, ws, events)
            start = {"type": "start", **({"features": ["seq_header"]} if seq else {})}
            await ws.send_message(json.dumps(start))
            for f in frames:
                await ws.send_message(f)
            t0 = time.monotonic()
            keep = {"duplicates": frames[3], "crumbs": b"\x01\x00", "empty": b""}[kind]
            with trio.move_on_after(12):
                while not events or events[-1]["type"] != "end":
                    await ws.send_message(keep)
                    await trio.sleep(0.25)
            ended = time.monotonic() - t0
    assert events[-1]["type"] == "end" and events[-1]["reason"] == "idle"
    # FLUSH_IDLE_SEC, plus at most MAX_IDLE_DEFERRALS looks again (0.5 s each) while a
    # message is waiting; before the fix the session never ended
    assert ended <= 1.0 + 5.0 + 1.0
    g.shutdown.set()


class _FailingVad:
    """The real Silero model, except that call number ``fail_at`` raises."""

    def __init__(self, model: VadModel, fail_at: int) -> None:
        self.model = model
        self.calls = 0
        self.fail_at = fail_at

    def run(self, windows: Any, state: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("onnxruntime: simulated failure")
        return self.model.run(windows, state)


async def test_a_failing_vad_tick_fails_its_session_not_the_gateway(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, asr_url: str) -> None:
    """Finding 6: an exception in the VAD tick reached the top-level nursery and ended
    the gateway."""
    from gateway.config import GatewayConfig
    from gateway.server import serve

    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "archive_fallback_dir": str(tmp_path / "fallback"), "asr_urls": asr_url,
        "flush_idle_s": 1.0})
    shutdown = trio.Event()
    vad = VadService(_FailingVad(vad_model, fail_at=3), gate_dbfs=None)  # type: ignore[arg-type]
    ws_port, _http = await nursery.start(lambda task_status: serve(
        cfg, shutdown=shutdown, vad=vad, store=None, task_status=task_status))
    url = f"ws://127.0.0.1:{ws_port}/ws/stream"
    with trio.fail_after(40):
        hit = await stream_audio(url, AUDIO, realtime=False, start={"flowId": "hit"})
        after = checked(await stream_audio(url, AUDIO, realtime=False))
    for e in hit.events:
        check_event(e)
    assert [(e["code"], e["fatal"]) for e in hit.of("error")] == [("INTERNAL", True)]
    assert hit.of("end")[0]["reason"] == "error"
    assert not after.of("error") and len(after.of("asr_final")) == 1
    assert vad.stats.failed_ticks == 1
    shutdown.set()


@pytest.mark.parametrize("threaded", [False, True])
async def test_vad_service_survives_a_failing_tick(vad_model: VadModel, threaded: bool
                                                   ) -> None:
    """The tick loop itself: the failed tick's client gets ``VadFailed`` and is dropped,
    the loop goes on, and a client registered afterwards gets its decisions."""
    from gateway.vadservice import VadFailed

    vad = VadService(_FailingVad(vad_model, fail_at=1), gate_dbfs=None,  # type: ignore[arg-type]
                     threaded=threaded)
    speechy = GOFORWARD[16000:16000 + 2048]
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(vad.run)
            send1, recv1 = trio.open_memory_channel[Any](8)
            hit = vad.register(send1)
            hit.stream.feed(speechy)
            vad.poke()
            assert isinstance(await recv1.receive(), VadFailed)
            assert hit.closed and vad.stats.failed_ticks == 1
            send2, recv2 = trio.open_memory_channel[Any](8)
            ok = vad.register(send2)
            ok.stream.feed(speechy)
            vad.poke()
            windows = await recv2.receive()
            assert len(windows) == 4 and not isinstance(windows, VadFailed)
            n.cancel_scope.cancel()
