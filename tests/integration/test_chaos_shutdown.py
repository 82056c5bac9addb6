"""Shutdown: sessions that cannot finish within the grace period are cancelled, and
their recordings are committed anyway: nothing is deleted on cancellation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import trio

from gateway.client import StreamResult, stream_audio
from stages.vad import VadModel
from tests import speech
from tests.integration.test_gateway import start_gateway
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

GOFORWARD = speech.goforward()
SILENCE = np.zeros(16000, dtype=np.int16)


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


async def test_grace_over_cancels_sessions_but_keeps_their_recordings(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    # Finals take 8 s: no session can finish within a 0.5 s grace.
    _, port, _ = await start_asr(nursery, StandInEngine(delay_s=8.0))
    gw = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{port}",
                             shutdown_grace_s=0.5)
    audio = np.concatenate([SILENCE, GOFORWARD, SILENCE, SILENCE]).astype(np.int16)
    results: list[StreamResult] = []

    async def client(i: int) -> None:
        results.append(await stream_audio(gw.ws_url, audio, realtime=True,
                                          start={"flowId": f"cut{i}"}))

    sent_s = 3.0
    async with trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(client, i)
        await trio.sleep(sent_s)  # mid-utterance, final pending
        gw.shutdown.set()
    for i in range(3):
        path = gw.archive / f"cut{i}.ogg"
        assert path.exists(), list(gw.archive.iterdir())
        data, sr = soundfile.read(path, dtype="int16")
        # What had arrived by the shutdown, give or take the client's pacing.
        assert sr == 16000 and abs(len(data) / 16000 - sent_s) < 0.5, len(data) / 16000
    assert not [p for p in gw.archive.iterdir() if p.name.endswith(".part")]
