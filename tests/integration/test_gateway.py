"""The gateway over real sockets: WebSocket protocol v1 end to end, with the real VAD and
archive, and an ASR service (stand-in engine) on loopback. Every event received is
validated against the JSON Schemas in docs/protocol/."""

from __future__ import annotations

import functools
import io
import json
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import numpy as np
import pytest
import soundfile
import trio

from gateway.client import StreamResult, stream_audio
from gateway.client import connect as open_websocket_url
from gateway.config import GatewayConfig
from gateway.server import serve
from gateway.vadservice import VadService
from stages.vad import VadModel
from tests import speech
from tests.contract import check_event
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(90)

SILENCE = np.zeros(16000, dtype=np.int16)
SECRET = "test-secret-of-thirty-two-bytes!"
GOFORWARD = speech.goforward()


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


@dataclass
class Gateway:
    ws_url: str
    http: str
    archive: Path
    shutdown: trio.Event
    cfg: GatewayConfig


async def start_gateway(nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
                        asr_url: str, *, store: Any = None, **overrides: Any) -> Gateway:
    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "archive_fallback_dir": str(tmp_path / "fallback"),
        "asr_urls": asr_url, "flush_idle_s": 1.0, **overrides})
    shutdown = trio.Event()
    ws_port, http_port = await nursery.start(functools.partial(
        serve, cfg, shutdown=shutdown, vad=VadService(vad_model), store=store))
    return Gateway(f"ws://127.0.0.1:{ws_port}/ws/stream", f"http://127.0.0.1:{http_port}",
                   tmp_path / "records", shutdown, cfg)


@pytest.fixture
async def gw(nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path
             ) -> AsyncIterator[Gateway]:
    _, asr_port, asr_stop = await start_asr(nursery, StandInEngine())
    g = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{asr_port}")
    yield g
    g.shutdown.set()
    asr_stop.set()


def checked(result: StreamResult) -> StreamResult:
    for e in result.events:
        check_event(e)
    assert [e["seq"] for e in result.events] == list(range(len(result.events)))
    return result


def _audio(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts).astype(np.int16)


async def test_one_utterance_full_event_sequence(gw: Gateway) -> None:
    audio = _audio(SILENCE, GOFORWARD, SILENCE)
    r = checked(await stream_audio(gw.ws_url, audio, realtime=False,
                                   start={"flowId": "one-utt"}))
    kinds = [e["type"] for e in r.events]
    assert kinds[0] == "ack" and kinds[-3:] == ["record_url", "metrics", "end"]
    (final,) = r.of("asr_final")
    assert final["utterance"] == 0
    # in session time: after the 1 s of leading silence (less pre-roll), ending after
    # the speech (the clip itself has ~0.7 s of silence before "go")
    assert 700 <= final["start_ms"] <= 1800 and 3000 <= final["end_ms"] <= 4800
    assert r.of("end")[0]["reason"] == "flush"
    m = r.of("metrics")[0]
    assert m["audio_ms"] == len(audio) // 16 and m["utterances"] == 1
    assert m["asr_link_codec"] == "opus"


async def test_two_utterances_give_two_finals_in_order(gw: Gateway) -> None:
    gap = np.zeros(24000, dtype=np.int16)  # 1.5 s
    audio = _audio(SILENCE, GOFORWARD, gap, speech.librivox()[1][1], SILENCE)
    r = checked(await stream_audio(gw.ws_url, audio, realtime=False))
    finals = r.of("asr_final")
    assert [f["utterance"] for f in finals] == [0, 1]
    assert finals[0]["end_ms"] <= finals[1]["start_ms"]


async def test_finalize_forces_an_endpoint_and_keeps_the_session(gw: Gateway) -> None:
    events: list[dict[str, Any]] = []
    async with open_websocket_url(gw.ws_url) as ws:
        await ws.send_message(json.dumps({"type": "start"}))
        events.append(json.loads(await ws.get_message()))
        for i in range(0, 16000 + 24000, 320):  # 1 s silence + 1.5 s of speech
            await ws.send_message(_audio(SILENCE, GOFORWARD)[i:i + 320].tobytes())
        await trio.sleep(0.5)
        await ws.send_message(json.dumps({"type": "finalize"}))
        while True:
            events.append(json.loads(await ws.get_message()))
            if events[-1]["type"] == "asr_final":
                break
        # the session is still open: more audio, then flush
        await ws.send_message(_audio(GOFORWARD, SILENCE).tobytes()[:64000])
        await ws.send_message(json.dumps({"type": "flush"}))
        while events[-1]["type"] != "end":
            events.append(json.loads(await ws.get_message()))
    for e in events:
        check_event(e)
    assert events[-1]["reason"] == "flush"
    assert len([e for e in events if e["type"] == "asr_final"]) == 2


async def test_idle_flush(gw: Gateway) -> None:
    t0 = time.perf_counter()
    r = checked(await stream_audio(gw.ws_url, _audio(SILENCE, GOFORWARD), realtime=False,
                                   flush=False))
    assert r.of("end")[0]["reason"] == "idle"
    assert len(r.of("asr_final")) == 1
    assert time.perf_counter() - t0 >= gw.cfg.flush_idle_s


async def test_disconnect_is_an_implicit_flush_and_keeps_the_recording(gw: Gateway) -> None:
    async with open_websocket_url(gw.ws_url) as ws:
        await ws.send_message(json.dumps({"type": "start", "flowId": "gone"}))
        await ws.get_message()
        await ws.send_message(_audio(SILENCE, GOFORWARD).tobytes()[:60000])
    with trio.fail_after(20):
        while not (gw.archive / "gone.ogg").exists():
            await trio.sleep(0.05)
    data, sr = soundfile.read(gw.archive / "gone.ogg", dtype="int16")
    assert sr == 16000 and abs(len(data) - 30000) <= 320


def _pcm(n: int) -> bytes:
    return GOFORWARD[:n].tobytes()


@pytest.mark.parametrize(
    ("features", "bad", "code"),
    [
        ([], ("text", "{oops"), "BAD_JSON"),
        ([], ("text", '{"type":"nonsense"}'), "UNKNOWN_MESSAGE"),
        ([], ("bytes", b"\x01\x02\x03"), "ODD_BYTE_COUNT"),
        # over MAX_FRAME_BYTES (64 KiB) but within the WebSocket limit (+ the 8-byte
        # seq header): refused whole, not fatal
        ([], ("bytes", b"\x00" * (65536 + 4)), "FRAME_TOO_LARGE"),
        ([], ("text", '{"type":"start"}'), "ALREADY_STARTED"),
        (["seq_header"], ("bytes", b"\x01\x02"), "BAD_SEQ_HEADER"),
    ],
)
async def test_malformed_input_gets_its_code_and_the_session_goes_on(
    gw: Gateway, features: list[str], bad: tuple[str, Any], code: str
) -> None:
    audio = _audio(SILENCE, GOFORWARD, SILENCE)
    chunks = [audio[i:i + 3200].tobytes() for i in range(0, len(audio), 3200)]
    events: list[dict[str, Any]] = []
    async with open_websocket_url(gw.ws_url, max_message_size=1 << 22) as ws:
        await ws.send_message(json.dumps({"type": "start", "features": features}))
        events.append(json.loads(await ws.get_message()))
        for i, c in enumerate(chunks):
            if features:
                c = struct.pack("<II", i, i * 100) + c
            await ws.send_message(c)
            if i == len(chunks) // 2:
                _kind, payload = bad
                await ws.send_message(payload)
        await ws.send_message(json.dumps({"type": "flush"}))
        while not events or events[-1]["type"] != "end":
            events.append(json.loads(await ws.get_message()))
    for e in events:
        check_event(e)
    errors = [e for e in events if e["type"] == "error"]
    assert [(e["code"], e["fatal"]) for e in errors] == [(code, False)]
    (_final,) = [e for e in events if e["type"] == "asr_final"]
    metrics = next(e for e in events if e["type"] == "metrics")
    assert metrics["audio_ms"] == len(audio) // 16  # no accepted audio was lost


@pytest.mark.parametrize(
    ("first", "code", "fatal"),
    [
        (b"\x00\x00" * 320, "NOT_STARTED", False),
        ('{"type":"start","audio":{"sr":8000}}', "UNSUPPORTED_AUDIO", True),
        ('{"type":"flush"}', "NOT_STARTED", False),
        ("not json", "BAD_JSON", False),
    ],
)
async def test_before_start(gw: Gateway, first: str | bytes, code: str, fatal: bool) -> None:
    async with open_websocket_url(gw.ws_url) as ws:
        await ws.send_message(first)
        ev = json.loads(await ws.get_message())
        check_event(ev)
        assert (ev["type"], ev["code"], ev["fatal"]) == ("error", code, fatal)
        if not fatal:  # a proper start still works
            await ws.send_message(json.dumps({"type": "start"}))
            assert json.loads(await ws.get_message())["type"] == "ack"


async def test_ping_pong(gw: Gateway) -> None:
    async with open_websocket_url(gw.ws_url) as ws:
        await ws.send_message(json.dumps({"type": "start"}))
        await ws.get_message()
        await ws.send_message(json.dumps({"type": "ping", "id": "p1"}))
        ev = json.loads(await ws.get_message())
        check_event(ev)
        assert ev["type"] == "pong" and ev["id"] == "p1"
        await ws.ping(b"hb")  # WebSocket-level ping is answered by the library


async def test_seq_header_reorders_and_drops_duplicates(gw: Gateway) -> None:
    audio = _audio(SILENCE, GOFORWARD, SILENCE)
    chunks = [audio[i:i + 320].tobytes() for i in range(0, len(audio), 320)]
    frames = [struct.pack("<II", i, i * 20) + c for i, c in enumerate(chunks)]
    order = list(range(len(frames)))
    for i in range(0, len(order) - 3, 7):  # swap neighbours, re-send some
        order[i], order[i + 2] = order[i + 2], order[i]
    order += order[100:110]
    events: list[dict[str, Any]] = []
    async with open_websocket_url(gw.ws_url) as ws:
        await ws.send_message(json.dumps({"type": "start", "features": ["seq_header"]}))
        events.append(json.loads(await ws.get_message()))
        assert events[0]["session"]["features"] == ["seq_header"]
        for i in order:
            await ws.send_message(frames[i])
        await ws.send_message(json.dumps({"type": "flush"}))
        while events[-1]["type"] != "end":
            events.append(json.loads(await ws.get_message()))
    metrics = next(e for e in events if e["type"] == "metrics")
    assert metrics["audio_ms"] == len(audio) // 16
    assert len([e for e in events if e["type"] == "asr_final"]) == 1


async def test_record_url_fetch_range_and_decode(gw: Gateway) -> None:
    audio = _audio(SILENCE, GOFORWARD, SILENCE)
    r = checked(await stream_audio(gw.ws_url, audio, realtime=False,
                                   start={"flowId": "rec-1"}))
    rec = r.of("record_url")[0]
    assert rec["url"].startswith(f"{gw.http}/records/rec-1.ogg?")  # signed
    async with httpx.AsyncClient() as client:
        full = await client.get(rec["url"])
        assert full.status_code == 200 and full.headers["content-type"] == "audio/ogg"
        assert len(full.content) == rec["bytes"]
        part = await client.get(rec["url"], headers={"range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == full.content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{rec['bytes']}"
        bad = await client.get(rec["url"], headers={"range": "bytes=99999999-"})
        assert bad.status_code == 416
        assert (await client.get(f"{gw.http}/records/..%2Fetc.ogg")).status_code in (403, 404)
    decoded, _sr = soundfile.read(io.BytesIO(full.content), dtype="int16")
    assert abs(len(decoded) - len(audio)) <= 320  # within 20 ms
    assert abs(rec["duration_ms"] - len(audio) // 16) <= 20


async def test_asr_down_still_records_and_says_so(nursery: trio.Nursery, vad_model: VadModel,
                                                  tmp_path: Path) -> None:
    g = await start_gateway(nursery, vad_model, tmp_path, "http://127.0.0.1:9")
    r = checked(await stream_audio(g.ws_url, _audio(SILENCE, GOFORWARD, SILENCE),
                                   realtime=False))
    assert [e["code"] for e in r.of("error")] == ["ASR_UNAVAILABLE"]
    assert r.of("record_url") and r.of("end")[0]["reason"] == "flush"
    g.shutdown.set()


async def test_auth(nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    _, asr_port, _ = await start_asr(nursery, StandInEngine())
    g = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{asr_port}",
                            auth_jwt_secret=SECRET)
    good = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    bad = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256")
    r = checked(await stream_audio(g.ws_url, SILENCE, realtime=False,
                                   start={"auth": {"token": bad}}))
    assert [(e["code"], e["fatal"]) for e in r.of("error")] == [("UNAUTHORIZED", True)]
    r = checked(await stream_audio(g.ws_url, SILENCE, realtime=False,
                                   start={"auth": {"token": good}}))
    assert r.of("ack") and not r.of("error")
    g.shutdown.set()


async def test_fifty_concurrent_sessions(nursery: trio.Nursery, vad_model: VadModel,
                                         tmp_path: Path) -> None:
    _, asr_port, _ = await start_asr(nursery, StandInEngine(), max_streams=64)
    gw = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{asr_port}")
    audio = _audio(SILENCE[:8000], GOFORWARD, SILENCE)
    results: list[StreamResult] = []

    async def one(i: int) -> None:
        results.append(await stream_audio(gw.ws_url, audio, realtime=True,
                                          start={"flowId": f"c{i}"}))

    async with trio.open_nursery() as n:
        for i in range(50):
            n.start_soon(one, i)
    assert len(results) == 50
    for r in results:
        checked(r)
        assert len(r.of("asr_final")) == 1 and r.of("end")[0]["reason"] == "flush"
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{gw.http}/metrics")).text
    assert "orchestrator_active_sessions 0.0" in text
    assert "egress_events_total" in text and "ingress_bytes_total" in text
    gw.shutdown.set()


async def test_graceful_shutdown_ends_sessions_with_their_finals(
    nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path
) -> None:
    _, asr_port, _ = await start_asr(nursery, StandInEngine())
    g = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{asr_port}")
    result: list[StreamResult] = []

    async def client() -> None:
        result.append(await stream_audio(g.ws_url, _audio(SILENCE, GOFORWARD, SILENCE,
                                                          SILENCE, SILENCE), realtime=True))

    async with trio.open_nursery() as n:
        n.start_soon(client)
        await trio.sleep(3.0)  # mid-speech tail
        g.shutdown.set()
    r = checked(result[0])
    assert r.of("end")[0]["reason"] == "server_shutdown"
    assert len(r.of("asr_final")) == 1


async def test_busy_when_at_max_sessions(nursery: trio.Nursery, vad_model: VadModel,
                                         tmp_path: Path) -> None:
    _, asr_port, _ = await start_asr(nursery, StandInEngine())
    g = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{asr_port}",
                            max_sessions=1)
    async with open_websocket_url(g.ws_url) as first:
        await first.send_message(json.dumps({"type": "start"}))
        assert json.loads(await first.get_message())["type"] == "ack"
        r = checked(await stream_audio(g.ws_url, SILENCE, realtime=False))
        assert [e["code"] for e in r.of("error")] == ["BUSY"]
        assert r.of("flow")[0]["state"] == "BUSY"
    g.shutdown.set()


async def test_asr_stream_reaped_while_quiet_is_reopened_for_the_next_utterance(
    nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path
) -> None:
    # The ASR service ends streams that send nothing for 0.5 s; the gateway sends audio
    # only during speech, so the 2 s pause between utterances gets the stream reaped.
    _, asr_port, _ = await start_asr(nursery, StandInEngine(), stream_idle_timeout_s=0.5)
    g = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{asr_port}")
    gap = np.zeros(32000, dtype=np.int16)
    r = checked(await stream_audio(g.ws_url, _audio(SILENCE[:8000], GOFORWARD, gap, GOFORWARD,
                                                    SILENCE), realtime=True))
    assert [f["utterance"] for f in r.of("asr_final")] == [0, 1]
    assert all(f["text"] for f in r.of("asr_final"))
    assert not r.of("error")
    g.shutdown.set()


async def test_oversized_frame_gets_its_error_then_close_1009_and_keeps_the_audio(
        gw: Gateway) -> None:
    """A binary message over the WebSocket limit (8 MiB against 64 KiB + 8): the accepted
    audio still gets its final and its recording, the error comes before the close, and
    the close code is 1009."""
    from trio_websocket import ConnectionClosed

    audio = _audio(SILENCE, GOFORWARD, SILENCE)
    events: list[dict[str, Any]] = []
    async with open_websocket_url(gw.ws_url, max_message_size=1 << 22) as ws:
        await ws.send_message(json.dumps({"type": "start", "flowId": "big-frame"}))
        events.append(json.loads(await ws.get_message()))
        for i in range(0, len(audio), 3200):
            await ws.send_message(audio[i:i + 3200].tobytes())
        await ws.send_message(b"\x00" * (8 << 20))
        with trio.fail_after(30):
            try:
                while True:
                    events.append(json.loads(await ws.get_message()))
            except ConnectionClosed as exc:
                code = exc.reason.code
    assert code == 1009
    for e in events:
        check_event(e)
    kinds = [e["type"] for e in events]
    errors = [e for e in events if e["type"] == "error"]
    assert [(e["code"], e["fatal"]) for e in errors] == [("FRAME_TOO_LARGE", True)]
    assert kinds[-1] == "end" and events[-1]["reason"] == "error"
    assert "asr_final" in kinds and "record_url" in kinds
    assert next(e for e in events if e["type"] == "metrics")["audio_ms"] == len(audio) // 16
    data, _sr = soundfile.read(gw.archive / "big-frame.ogg", dtype="int16")
    assert abs(len(data) - len(audio)) <= 320


async def test_early_start_false_start_is_withdrawn_and_costs_no_final(
        gw: Gateway) -> None:
    """A 150 ms snippet of speech starts an utterance early (the stream opens, audio
    flows); VAD does not confirm it, so it is withdrawn: no final, no index used. The
    real utterance after it is index 0 and heard whole."""
    snippet = GOFORWARD[12800:15200]
    audio = _audio(SILENCE, snippet, SILENCE, GOFORWARD, SILENCE)
    r = checked(await stream_audio(gw.ws_url, audio, realtime=False,
                                   start={"return": ["asr", "metrics"]}))
    (final,) = r.of("asr_final")
    assert final["utterance"] == 0 and final["start_ms"] >= 2000
    heard_ms = float(final["text"].split("s ", 1)[0]) * 1000
    assert heard_ms >= final["end_ms"] - final["start_ms"] - 60
    m = r.of("metrics")[0]
    assert m["false_starts"] == 1 and m["utterances"] == 1
    assert not r.of("error")
    # A partial of the withdrawn start may have been passed on; it had index 0 too, so
    # the real utterance's final replaced it.
    assert all(p["utterance"] == 0 for p in r.of("asr_partial"))
