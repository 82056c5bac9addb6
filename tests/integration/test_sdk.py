"""The client SDK (``clients/python``, package ``voxgate_client``) over real sockets.

Against the real gateway (real VAD and archive, stand-in ASR engine on loopback) in all
three styles (Trio, asyncio, synchronous), and against a scripted WebSocket server for
what the gateway cannot be made to do on cue: PAUSE/RESUME/SLOW_DOWN, a dropped
connection with resume, a server that goes silent.
"""

from __future__ import annotations

import asyncio
import functools
import json
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import pytest
import trio
import voxgate_client as vc
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from gateway.config import GatewayConfig
from gateway.server import serve
from gateway.vadservice import VadService
from stages.vad import VadModel
from tests import speech
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

SECRET = "sdk-test-secret-of-32-bytes-long"
SILENCE = np.zeros(16000, dtype=np.int16)


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


@pytest.fixture
async def gateway(nursery: trio.Nursery, vad_model: VadModel,
                  tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await gateway(**overrides) -> ws_url``: a real gateway on a stand-in ASR."""
    _, asr_port, asr_stop = await start_asr(nursery, StandInEngine())
    stops: list[trio.Event] = [asr_stop]

    async def start(**overrides: Any) -> str:
        cfg = GatewayConfig.load(env={}, overrides={
            "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
            "asr_urls": f"http://127.0.0.1:{asr_port}", "flush_idle_s": 2.0, **overrides})
        stop = trio.Event()
        stops.append(stop)
        ws_port, _ = await nursery.start(functools.partial(
            serve, cfg, shutdown=stop, vad=VadService(vad_model)))
        return f"ws://127.0.0.1:{ws_port}/ws/stream"

    yield start
    for s in stops:
        s.set()


def utterance_audio() -> np.ndarray:
    return np.concatenate([SILENCE, speech.goforward(), SILENCE]).astype(np.int16)


def kinds(events: list[vc.Event]) -> list[str]:
    return [type(e).__name__ for e in events]


async def test_trio_style_any_chunk_size(gateway: Callable[..., Any]) -> None:
    url = await gateway()
    audio = utterance_audio()
    events: list[vc.Event] = []
    async with vc.connect(url, lang="en", flow_id="sdk-trio") as s:
        assert s.ack is not None and s.ack.session["features"] == ["seq_header"]
        raw = audio.tobytes()
        for pos in range(0, len(raw), 1234):  # odd sizes: the SDK frames them
            await s.send(raw[pos:pos + 1234])
        await s.flush()
        async for event in s:
            events.append(event)
    names = kinds(events)
    assert names[0] == "Ack" and names[-3:] == ["RecordUrl", "Metrics", "End"]
    (final,) = [e for e in events if isinstance(e, vc.Final)]
    assert final.flow_id == "sdk-trio" and final.text
    metrics = next(e for e in events if isinstance(e, vc.Metrics))
    assert metrics.audio_ms == len(audio) // 16  # every sample arrived, none twice
    rec = next(e for e in events if isinstance(e, vc.RecordUrl))
    # Signed and expiring (RECORDS_URL_TTL_S): the path, then exp and sig.
    path, _, query = rec.url.partition("?")
    assert path.endswith("/records/sdk-trio.ogg") and "sig=" in query and "exp=" in query


async def test_asyncio_style(gateway: Callable[..., Any]) -> None:
    url = await gateway()
    audio = utterance_audio().astype(np.float32) / 32768  # float input

    async def main() -> list[vc.Event]:
        async with vc.connect(url, lang="en") as s:
            await s.send(audio)
            await s.flush()
            return [e async for e in s]

    events = await trio.to_thread.run_sync(asyncio.run, main())
    assert sum(isinstance(e, vc.Final) for e in events) == 1
    assert next(e for e in events if isinstance(e, vc.Metrics)).audio_ms == len(audio) // 16


async def test_sync_style_with_resampling_and_callback(gateway: Callable[..., Any]) -> None:
    url = await gateway()
    audio16 = utterance_audio()
    # the same speech at 44.1 kHz, pushed in 10 ms pieces: the SDK resamples it
    t_in = np.arange(len(audio16)) / 16000
    t_out = np.arange(int(len(audio16) * 44100 / 16000)) / 44100
    audio44 = np.interp(t_out, t_in, audio16.astype(np.float64)).astype(np.int16)
    seen: list[str] = []

    def run() -> list[vc.Event]:
        with vc.SyncStream(url, sample_rate=44100, lang="en",
                           on_event=lambda e: seen.append(type(e).__name__)) as s:
            for pos in range(0, len(audio44), 441):
                s.send(audio44[pos:pos + 441])
            return s.wait(timeout_s=30)

    events = await trio.to_thread.run_sync(run)
    assert seen == kinds(events) and seen[-1] == "End"
    assert sum(isinstance(e, vc.Final) for e in events) == 1
    metrics = next(e for e in events if isinstance(e, vc.Metrics))
    assert abs(metrics.audio_ms - len(audio16) // 16) <= 20


async def test_stream_file_and_auth(gateway: Callable[..., Any], tmp_path: Path) -> None:
    url = await gateway(auth_jwt_secret=SECRET)
    path = tmp_path / "one.wav"
    import wave
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(utterance_audio().tobytes())
    good = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    events = await vc.stream_file(url, path, realtime=False, token=good, lang="en")
    assert isinstance(events[-1], vc.End) and any(isinstance(e, vc.Final) for e in events)
    bad = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256")
    with pytest.raises(vc.StreamError) as info:
        await vc.stream_file(url, path, realtime=False, token=bad)
    assert info.value.error is not None and info.value.error.code == "UNAUTHORIZED"


# -- a scripted server ------------------------------------------------------------------


@dataclass
class Script:
    """What the scripted server saw: per connection, (arrival time, seq, pcm) and texts."""

    connections: list[list[tuple[float, int, bytes]]] = field(default_factory=list)
    texts: list[dict[str, Any]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)


async def scripted_server(nursery: trio.Nursery,
                          behaviour: Callable[..., Any]) -> tuple[str, Script]:
    script = Script()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        frames: list[tuple[float, int, bytes]] = []
        script.connections.append(frames)
        n = len(script.connections)
        seq = 0

        async def send(kind: str, **body: Any) -> None:
            nonlocal seq
            await ws.send_message(json.dumps({"type": kind, "flowId": "scripted",
                                              "seq": seq, **body}))
            seq += 1

        try:
            start = json.loads(await ws.get_message())
            script.starts.append(start)
            await behaviour(n, ws, send, frames, script)
        except ConnectionClosed:
            pass

    servers = await nursery.start(functools.partial(serve_websocket, handler, "127.0.0.1",
                                                    0, None))
    return f"ws://127.0.0.1:{servers.port}/ws/stream", script


async def read_until_flush(ws: Any, frames: list[tuple[float, int, bytes]],
                           script: Script, *, stop_after: int | None = None) -> bool:
    """Record frames until ``flush`` (True) or ``stop_after`` frames (False)."""
    while True:
        message = await ws.get_message()
        if isinstance(message, bytes):
            seq, _pts = struct.unpack_from("<II", message)
            frames.append((trio.current_time(), seq, message[8:]))
            if stop_after is not None and len(frames) >= stop_after:
                return False
        else:
            obj = json.loads(message)
            script.texts.append(obj)
            if obj["type"] == "flush":
                return True


async def test_pause_resume_and_slow_down_are_obeyed(nursery: trio.Nursery) -> None:
    async def behaviour(n: int, ws: Any, send: Any, frames: list[Any], script: Script
                        ) -> None:
        await send("ack", protocol=1, session={"features": ["seq_header"]}, limits={})
        await read_until_flush(ws, frames, script, stop_after=10)
        await send("flow", state="PAUSE")
        await trio.sleep(0.2)  # frames already in flight may still land
        paused_count = len(frames)
        await trio.sleep(0.5)
        assert len(frames) == paused_count, "frames arrived while paused"
        await send("flow", state="SLOW_DOWN")
        await read_until_flush(ws, frames, script, stop_after=paused_count + 25)
        await send("flow", state="RESUME")
        await read_until_flush(ws, frames, script)
        await send("end", reason="flush")

    url, script = await scripted_server(nursery, behaviour)
    audio = (np.arange(16000 * 3) % 200).astype(np.int16)  # 3 s = 150 frames
    async with vc.connect(url, max_buffer_ms=60_000) as s:
        await s.send(audio)
        await s.flush()
        events = [e async for e in s]
    assert isinstance(events[-1], vc.End)
    (frames,) = script.connections
    assert [seq for _, seq, _ in frames] == list(range(150))
    assert b"".join(pcm for _, _, pcm in frames) == audio.tobytes()
    # SLOW_DOWN: about real time (25 frames of 20 ms: ~0.5 s), not as fast as possible
    slow = [t for t, seq, _ in frames if 10 <= seq < 35]
    pause_gap = max(b - a for a, b in zip([t for t, _, _ in frames][:-1],
                                          [t for t, _, _ in frames][1:], strict=True))
    assert pause_gap >= 0.5
    assert slow[-1] - slow[0] >= 0.3


async def test_dropped_connection_resumes_without_loss_or_doubling(
        nursery: trio.Nursery) -> None:
    async def behaviour(n: int, ws: Any, send: Any, frames: list[Any], script: Script
                        ) -> None:
        if n == 1:
            await send("ack", protocol=1, session={"features": ["seq_header"]}, limits={})
            await read_until_flush(ws, frames, script, stop_after=40)
            await send("asr_final", utterance=0, text="zero", start_ms=0, end_ms=500,
                       lang="en")
            await trio.sleep(0.1)
            await ws.aclose()  # as if the network dropped
            return
        have = sorted({seq for c in script.connections[:-1] for _, seq, _ in c})
        next_seq = len(have) - 5  # pretend the last 5 frames never reached us
        await send("ack", protocol=1, limits={},
                   session={"features": ["seq_header"], "resumed": True,
                            "next_seq": next_seq})
        await send("asr_final", utterance=0, text="zero", start_ms=0, end_ms=500,
                   lang="en")  # a repeat the client must not deliver twice
        await read_until_flush(ws, frames, script)
        await send("asr_final", utterance=1, text="one", start_ms=500, end_ms=900,
                   lang="en")
        await send("end", reason="flush")

    url, script = await scripted_server(nursery, behaviour)
    audio = (np.arange(16000 * 2) % 300).astype(np.int16)  # 100 frames
    async with vc.connect(url, resume_window_s=5) as s:
        async def produce() -> None:
            for pos in range(0, len(audio), 320):
                await s.send(audio[pos:pos + 320])
                await trio.sleep(0.002)
            await s.flush()

        nursery.start_soon(produce)
        events = [e async for e in s]
    assert kinds(events).count("Reconnected") == 1
    assert [e.text for e in events if isinstance(e, vc.Final)] == ["zero", "one"]
    assert script.starts[1]["flowId"] == "scripted"  # the same session asked for
    first, second = script.connections
    resent_from = second[0][1]
    assert resent_from == len(first) - 5
    got: dict[int, bytes] = {}
    for _, seq, pcm in first[:resent_from] + second:
        assert seq not in got, f"seq {seq} doubled"
        got[seq] = pcm
    assert b"".join(got[k] for k in sorted(got)) == audio.tobytes()


async def test_a_silent_server_is_detected_and_the_client_reconnects(
        nursery: trio.Nursery) -> None:
    async def behaviour(n: int, ws: Any, send: Any, frames: list[Any], script: Script
                        ) -> None:
        await send("ack", protocol=1, limits={},
                   session={"features": ["seq_header"], "resumed": n > 1})
        if n == 1:
            await trio.sleep(30)  # never answers pings, never reads
            return
        await read_until_flush(ws, frames, script)
        await send("end", reason="flush")

    url, script = await scripted_server(nursery, behaviour)
    with trio.fail_after(10):
        async with vc.connect(url, keepalive_s=0.2) as s:
            await s.send(np.zeros(3200, np.int16))
            events: list[vc.Event] = []
            async for e in s:
                events.append(e)
                if isinstance(e, vc.Reconnected):
                    await s.flush()
    assert "Reconnecting" in kinds(events) and isinstance(events[-1], vc.End)
    assert len(script.connections) == 2


async def test_voxgate_stream_command_reads_stdin_and_wav(gateway: Callable[..., Any],
                                                          tmp_path: Path) -> None:
    import sys
    import wave

    url = await gateway()
    audio = utterance_audio()
    voxgate = [sys.executable, "-c", "from gateway.cli import main; raise SystemExit(main())"]
    raw = await trio.run_process([*voxgate, "stream", "-", "--fast", "--url", url, "--json",
                                  "--flow-id", "cli-stdin"],
                                 stdin=audio.tobytes(), capture_stdout=True,
                                 capture_stderr=True, check=False)
    assert raw.returncode == 0, raw.stderr.decode()
    lines = [json.loads(x) for x in raw.stdout.decode().splitlines()]
    names = [x["event"] for x in lines]
    assert names[0] == "Ack" and names[-1] == "End" and "Final" in names
    assert next(x for x in lines if x["event"] == "Metrics")["audio_ms"] == len(audio) // 16
    path = tmp_path / "stereo44k.wav"
    stereo = np.repeat(np.interp(np.arange(len(audio) * 44100 // 16000) * 16000 / 44100,
                                 np.arange(len(audio)), audio).astype(np.int16)[:, None],
                       2, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(stereo.tobytes())
    text = await trio.run_process([*voxgate, "stream", str(path), "--fast", "--url", url],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert text.returncode == 0, text.stderr.decode()
    out = text.stdout.decode()
    assert "✔" in out and "recording: http" in out and "end (flush)" in out


async def test_sdk_resumes_a_real_gateway_session_without_loss(
        gateway: Callable[..., Any], tmp_path: Path) -> None:
    """The connection drops mid-utterance; the SDK reconnects with the same flowId and
    the gateway continues the session: one final per utterance, one recording, every
    sample in it exactly once."""
    import io

    import httpx
    import soundfile

    url = await gateway()
    audio = np.concatenate([SILENCE, speech.goforward(), SILENCE, speech.goforward(),
                            SILENCE]).astype(np.int16)
    events: list[vc.Event] = []
    async with vc.connect(url, lang="en", flow_id="sdk-resume") as s:

        async def produce() -> None:
            t0 = trio.current_time()
            step = 1600  # 100 ms, at 4x real time
            for pos in range(0, len(audio), step):
                await s.send(audio[pos:pos + step])
                if pos == 3 * 16000:  # inside the first utterance
                    await s.abort_connection()
                await trio.sleep_until(t0 + (pos + step) / 16000 / 4)
            await s.flush()

        async with trio.open_nursery() as n:
            n.start_soon(produce)
            async for event in s:
                events.append(event)
    names = kinds(events)
    assert "Reconnecting" in names
    reconnected = [e for e in events if isinstance(e, vc.Reconnected)]
    assert len(reconnected) == 1 and reconnected[0].resumed
    finals = [e for e in events if isinstance(e, vc.Final)]
    assert [f.utterance for f in finals] == [0, 1]
    metrics = next(e for e in events if isinstance(e, vc.Metrics))
    assert metrics.audio_ms == len(audio) // 16
    rec = next(e for e in events if isinstance(e, vc.RecordUrl))
    async with httpx.AsyncClient() as client:
        body = (await client.get(rec.url)).content
    decoded, _ = soundfile.read(io.BytesIO(body), dtype="int16")
    assert abs(len(decoded) - len(audio)) <= 320


async def test_sdk_is_held_by_a_real_gateway_when_recognition_falls_behind(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    """40x real time against a slow recognizer: the gateway says PAUSE, the SDK holds
    its audio (bounded buffer, ``send`` waits), RESUME lets it go; nothing is lost."""
    engine = StandInEngine(delay_s=0.25)  # every batch 0.25 s: partials fall behind
    _, asr_port, asr_stop = await start_asr(nursery, engine, behind_threshold_s=2.0)
    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "asr_urls": f"http://127.0.0.1:{asr_port}"})
    stop = trio.Event()
    ws_port, _ = await nursery.start(functools.partial(
        serve, cfg, shutdown=stop, vad=VadService(vad_model)))
    gap = np.zeros(24000, dtype=np.int16)
    audio = np.concatenate([gap, *[np.concatenate([speech.goforward(), gap])
                                   for _ in range(5)]]).astype(np.int16)  # ~26 s
    events: list[vc.Event] = []
    held: list[float] = []
    with trio.fail_after(50):
        async with vc.connect(f"ws://127.0.0.1:{ws_port}/ws/stream", lang="en",
                              max_buffer_ms=2000) as s:

            async def produce() -> None:
                t0 = trio.current_time()
                step = 320
                for pos in range(0, len(audio), step):
                    before = trio.current_time()
                    await s.send(audio[pos:pos + step])
                    held.append(trio.current_time() - before)
                    await trio.sleep_until(t0 + (pos + step) / 16000 / 40)
                await s.flush()

            async with trio.open_nursery() as n:
                n.start_soon(produce)
                async for event in s:
                    events.append(event)
    flows = [e.state for e in events if isinstance(e, vc.Flow)]
    assert "PAUSE" in flows and flows.count("PAUSE") == flows.count("RESUME"), flows
    assert max(held) > 0.1  # send() waited while the buffer was full: bounded memory
    assert not [e for e in events if isinstance(e, vc.Error)]
    assert [e.utterance for e in events if isinstance(e, vc.Final)] == list(range(5))
    assert next(e for e in events if isinstance(e, vc.Metrics)).audio_ms == len(audio) // 16
    stop.set()
    asr_stop.set()


async def test_the_page_at_root_names_the_gateways_websocket_port(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    import httpx

    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path), "asr_urls": "http://127.0.0.1:9"})
    stop = trio.Event()
    ws_port, http_port = await nursery.start(functools.partial(
        serve, cfg, shutdown=stop, vad=VadService(vad_model)))
    async with httpx.AsyncClient() as client:
        page = await client.get(f"http://127.0.0.1:{http_port}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'<meta name="voxgate-ws-port" content="{ws_port}">' in page.text
    stop.set()
