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


GATEWAY_MAIN = """
import trio
from gateway.config import GatewayConfig
from gateway.main import run_gateway
trio.run(run_gateway, GatewayConfig.load())
"""


async def test_sigterm_finishes_every_session_and_commits_every_recording(
        tmp_path: Path) -> None:
    """A real gateway process gets SIGTERM with three sessions mid-utterance: each gets
    its final, record_url and end{server_shutdown}, every recording is committed, and the
    process exits cleanly within the grace period."""
    import os
    import signal
    import subprocess
    import sys

    from tests.integration.test_chaos_asr import ROOT, AsrProcess

    asr = await trio.to_thread.run_sync(AsrProcess)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VOXGATE_PORT": "0",
           "VOXGATE_HTTP_PORT": "0", "ASR_URLS": asr.url,
           "ARCHIVE_DIR": str(tmp_path / "records"),
           "ARCHIVE_FALLBACK_DIR": str(tmp_path / "fallback"), "SHUTDOWN_GRACE_S": "15"}
    gw = subprocess.Popen([sys.executable, "-c", GATEWAY_MAIN], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert gw.stdout is not None
        await trio.to_thread.run_sync(gw.stdout.readline)
        ws_url = (await trio.to_thread.run_sync(gw.stdout.readline)).strip()
        assert ws_url.startswith("ws://"), ws_url
        audio = np.concatenate([SILENCE, GOFORWARD, SILENCE, SILENCE]).astype(np.int16)
        results: list[StreamResult] = []

        async def client(i: int) -> None:
            results.append(await stream_audio(ws_url, audio, realtime=True,
                                              start={"flowId": f"term{i}"}))

        with trio.fail_after(40):
            async with trio.open_nursery() as n:
                for i in range(3):
                    n.start_soon(client, i)
                await trio.sleep(3.0)  # mid-utterance
                gw.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(gw.wait)
        assert code == 0
        assert len(results) == 3
        for r in results:
            assert r.of("end")[0]["reason"] == "server_shutdown"
            assert [f["utterance"] for f in r.of("asr_final")] == [0]
            assert r.of("record_url")
        for i in range(3):
            data, _sr = soundfile.read(tmp_path / "records" / f"term{i}.ogg", dtype="int16")
            assert 2.5 < len(data) / 16000 < 3.6
    finally:
        if gw.poll() is None:
            gw.kill()
            gw.wait()
        if gw.stdout is not None:
            gw.stdout.close()
        asr.kill()
