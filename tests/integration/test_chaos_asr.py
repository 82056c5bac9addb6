"""Chaos: the ASR service dies, stalls or restarts while a session talks; no transcript
is lost. The ASR services are real OS processes (stand-in engine) so they can be
``kill -9``ed and SIGSTOPped; the gateway runs in-process with the real VAD."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from gateway.client import StreamResult, stream_audio
from stages.vad import VadModel
from tests import speech
from tests.contract import check_event
from tests.integration.test_gateway import start_gateway

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SILENCE = np.zeros(16000, dtype=np.int16)
GAP = np.zeros(24000, dtype=np.int16)
GOFORWARD = speech.goforward()
# Two utterances: speech from about 1.7 s to 4.4 s and from 5.9 s to 9.3 s.
AUDIO = np.concatenate([SILENCE, GOFORWARD, GAP, GOFORWARD, SILENCE]).astype(np.int16)

ASR_MAIN = """
import functools, sys, trio
from asr.server import AsrServerConfig, serve
from tests.standin import StandInEngine

async def main():
    cfg = AsrServerConfig(port=int(sys.argv[1]))
    engine = StandInEngine(delay_s=float(sys.argv[2]))
    async with trio.open_nursery() as n:
        app, port = await n.start(functools.partial(serve, engine, cfg))
        await app.ready_event.wait()
        print(port, flush=True)

trio.run(main)
"""


class AsrProcess:
    """A stand-in ASR service in its own process."""

    def __init__(self, port: int = 0, delay_s: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ASR_MAIN, str(port), str(delay_s)], cwd=ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()  # SIGKILL: no GOAWAY, no FIN from the application
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


@pytest.fixture
async def asr_procs() -> AsyncIterator[list[AsrProcess]]:
    procs: list[AsrProcess] = []
    yield procs
    for p in procs:
        p.kill()


async def _start(procs: list[AsrProcess], port: int = 0, delay_s: float = 0.0
                 ) -> AsrProcess:
    p = await trio.to_thread.run_sync(AsrProcess, port, delay_s)
    procs.append(p)
    return p


def _heard_s(final: dict[str, Any]) -> float:
    return float(final["text"].split("s ", 1)[0])


def _check(r: StreamResult) -> list[dict[str, Any]]:
    """Exactly one final per utterance, in order, each for all of its audio."""
    for e in r.events:
        check_event(e)
    finals = r.of("asr_final")
    assert [f["utterance"] for f in finals] == [0, 1], r.events
    # Utterance 0 starts at its onset (not where the failure struck), and the service
    # heard all of it: the replay carried the audio from the first packet on.
    assert finals[0]["start_ms"] <= 1800
    for f in finals:
        assert _heard_s(f) * 1000 >= f["end_ms"] - f["start_ms"] - 60, f
        assert _heard_s(f) >= 2.0, f
    assert not [e for e in r.of("error") if e["code"] != "ASR_UNAVAILABLE"]
    assert not r.of("error"), r.of("error")
    return finals


async def _metric(http: str, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{http}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def _stream_while(gw_url: str, action: Any, at_s: float) -> StreamResult:
    """Stream AUDIO in real time; run ``action`` ``at_s`` seconds in."""
    result: list[StreamResult] = []

    async def client() -> None:
        result.append(await stream_audio(gw_url, AUDIO, realtime=True,
                                         start={"return": ["asr", "metrics"]}))

    async with trio.open_nursery() as n:
        n.start_soon(client)
        await trio.sleep(at_s)
        await action()
    return result[0]


async def test_kill_9_mid_utterance_with_two_endpoints(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
        asr_procs: list[AsrProcess]) -> None:
    a = await _start(asr_procs)
    b = await _start(asr_procs)
    # The first stream of a fresh gateway goes to the first endpoint: a.
    gw = await start_gateway(nursery, vad_model, tmp_path, f"{a.url},{b.url}")

    async def kill_a() -> None:
        a.kill()

    r = await _stream_while(gw.ws_url, kill_a, 2.8)  # mid-utterance 0
    _check(r)
    assert await _metric(gw.http, "asr_link_failovers_total") >= 1
    assert await _metric(gw.http, "asr_link_breaker_opened_total") >= 1
    gw.shutdown.set()


async def test_kill_9_and_restart_after_5_s_single_endpoint(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
        asr_procs: list[AsrProcess]) -> None:
    a = await _start(asr_procs)
    port = a.port
    gw = await start_gateway(nursery, vad_model, tmp_path, a.url)
    restarted: list[float] = []

    async def kill_and_restart_later() -> None:
        a.kill()

        async def restart() -> None:
            await trio.sleep(5.0)
            await _start(asr_procs, port)
            restarted.append(time.monotonic())

        nursery.start_soon(restart)

    r = await _stream_while(gw.ws_url, kill_and_restart_later, 2.8)
    assert restarted, "the session ended before the service came back"
    _check(r)
    assert await _metric(gw.http, "asr_link_failovers_total") >= 1
    gw.shutdown.set()


async def test_stalled_endpoint_is_detected_by_ping_and_failed_over(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
        asr_procs: list[AsrProcess]) -> None:
    a = await _start(asr_procs)
    b = await _start(asr_procs)
    gw = await start_gateway(nursery, vad_model, tmp_path, f"{a.url},{b.url}")
    stopped: list[float] = []

    async def stop_a() -> None:
        a.proc.send_signal(signal.SIGSTOP)  # no reset, no FIN: it just stops answering
        stopped.append(trio.current_time())

    result: list[StreamResult] = []
    async with trio.open_nursery() as n:
        async def client() -> None:
            result.append(await stream_audio(gw.ws_url, AUDIO, realtime=True,
                                             start={"return": ["asr", "metrics"]}))
        n.start_soon(client)
        await trio.sleep(2.8)
        await stop_a()
        with trio.fail_after(6):  # the bound is asserted below, with the time it took
            while await _metric(gw.http, "asr_link_ping_timeouts_total") < 1:
                await trio.sleep(0.05)
        detected = trio.current_time() - stopped[0]
    _check(result[0])
    # PING every 0.25 s, unanswered for 1.5 s: 1.75 s at most, plus this poll's slack.
    assert detected <= 2.5
    assert await _metric(gw.http, "asr_link_failovers_total") >= 1
    gw.shutdown.set()


async def test_overdue_final_fails_over_to_a_healthy_endpoint(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
        asr_procs: list[AsrProcess]) -> None:
    # a answers PINGs but its engine takes 20 s a batch: only the final deadline tells.
    a = await _start(asr_procs, delay_s=20.0)
    b = await _start(asr_procs)
    gw = await start_gateway(nursery, vad_model, tmp_path, f"{a.url},{b.url}",
                             asr_final_deadline_s=2.0)

    async def nothing() -> None:
        pass

    r = await _stream_while(gw.ws_url, nothing, 0.0)
    _check(r)
    assert await _metric(gw.http, "asr_link_failovers_total") >= 1
    assert await _metric(gw.http, "asr_link_ping_timeouts_total") == 0
    gw.shutdown.set()


async def test_a_slow_only_endpoint_is_given_time_not_failed_over_to_itself(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
        asr_procs: list[AsrProcess]) -> None:
    # One endpoint whose every batch takes 3 s, past a 2 s final deadline. Failing the
    # stream over would only send the same utterances to the same busy service again
    # (each replay restarting the wait); with no other endpoint the gateway waits longer.
    a = await _start(asr_procs, delay_s=3.0)
    gw = await start_gateway(nursery, vad_model, tmp_path, a.url, asr_final_deadline_s=2.0)

    async def nothing() -> None:
        pass

    r = await _stream_while(gw.ws_url, nothing, 0.0)
    _check(r)
    assert await _metric(gw.http, "asr_link_failovers_total") == 0
    gw.shutdown.set()
