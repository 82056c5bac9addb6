"""Chaos: a starved event loop must not turn a sending client into an idle one.

The idle timer is wall time between messages. When the gateway's loop is blocked (here
by a CPU-bound stretch in the same process, as under overload), the timer runs out while
the client's next frames are already waiting on the socket. The session must read them
and go on, and the recording must hold every sample sent."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pytest
import soundfile
import trio

from gateway.client import connect as open_websocket_url
from stages.vad import VadModel
from tests import speech
from tests.contract import check_event
from tests.integration.test_gateway import start_gateway
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

CHUNK = 320  # samples: 20 ms


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


async def test_starved_loop_with_data_waiting_is_not_idle(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine())
    gw = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{port}",
                             flush_idle_s=1.0)
    audio = speech.goforward()[: 16000 * 3]
    audio = audio[: len(audio) // CHUNK * CHUNK]
    chunks = [audio[i:i + CHUNK].tobytes() for i in range(0, len(audio), CHUNK)]
    events: list[dict] = []

    async def client() -> None:
        # In a thread of its own (its own Trio loop), so it keeps sending in real time
        # while the gateway's loop is blocked.
        async with open_websocket_url(gw.ws_url) as ws:
            await ws.send_message(json.dumps({
                "type": "start", "flowId": "starved",
                "audio": {"codec": "pcm_s16le", "sr": 16000, "channels": 1,
                          "chunk_ms": 20},
                "return": ["record_url", "metrics"]}))
            events.append(json.loads(await ws.get_message()))
            t0 = time.monotonic()
            for i, c in enumerate(chunks):
                await ws.send_message(c)
                await trio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
            await ws.send_message(json.dumps({"type": "flush"}))
            with trio.fail_after(20):
                while events[-1]["type"] != "end":
                    events.append(json.loads(await ws.get_message()))

    async def starve() -> None:
        await trio.sleep(1.0)
        time.sleep(1.6)  # a CPU-bound stretch: longer than FLUSH_IDLE_SEC, no checkpoint

    with trio.fail_after(40):
        async with trio.open_nursery() as n:
            n.start_soon(starve)
            await trio.to_thread.run_sync(functools.partial(trio.run, client))
    for e in events:
        check_event(e)
    assert not [e for e in events if e["type"] == "error"], events
    assert events[-1]["reason"] == "flush", events[-1]
    (m,) = [e for e in events if e["type"] == "metrics"]
    assert m["audio_ms"] == len(audio) // 16
    data, _sr = soundfile.read(gw.archive / "starved.ogg", dtype="int16")
    assert abs(len(data) - len(audio)) <= CHUNK
    gw.shutdown.set()
