"""Resume: a seq_header client that loses its connection mid-utterance reconnects with
the same flowId and continues the same session: no audio lost or doubled, utterance
indices and times continue, one recording."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import trio
from trio_websocket import ConnectionClosed

from gateway.client import connect
from stages.vad import VadModel
from tests import speech
from tests.contract import check_event
from tests.integration.test_gateway import start_gateway
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

GOFORWARD = speech.goforward()
SILENCE = np.zeros(16000, dtype=np.int16)
GAP = np.zeros(24000, dtype=np.int16)
AUDIO = np.concatenate([SILENCE, GOFORWARD, GAP, GOFORWARD, SILENCE]).astype(np.int16)
STEP = 320  # 20 ms frames


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


def _frame(i: int) -> bytes:
    return struct.pack("<II", i, i * 20) + AUDIO[i * STEP:(i + 1) * STEP].tobytes()


N_FRAMES = (len(AUDIO) + STEP - 1) // STEP


async def _drain(ws: Any, events: list[dict[str, Any]], stop: str | None = None) -> None:
    try:
        while True:
            events.append(json.loads(await ws.get_message()))
            if stop and events[-1]["type"] == stop:
                return
    except ConnectionClosed:
        return


@pytest.mark.parametrize("shuffle", [False, True])
async def test_reconnect_mid_utterance_resumes_the_same_session(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, shuffle: bool) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine())
    gw = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{port}",
                             resume_window_s=5.0)
    rng = random.Random(7)
    start = json.dumps({"type": "start", "flowId": "res", "features": ["seq_header"]})
    cut = 150  # 3.0 s: inside utterance 0
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []
    with trio.fail_after(40):
        async with connect(gw.ws_url) as ws, trio.open_nursery() as n:
            n.start_soon(_drain, ws, first)
            await ws.send_message(start)
            order = list(range(cut + 10))
            if shuffle:  # 1 % duplicates, local reordering
                for k in range(0, len(order) - 3, 17):
                    order[k], order[k + 2] = order[k + 2], order[k]
                order += rng.sample(order, len(order) // 100)
            for i in order:
                await ws.send_message(_frame(i))
                await trio.sleep(0.002)
            await trio.sleep(0.5)
            # The connection drops (no flush, no close handshake from the client side).
            await ws._stream.aclose()
        async with connect(gw.ws_url) as ws:
            await ws.send_message(start)
            ack = json.loads(await ws.get_message())
            second.append(ack)
            assert ack["type"] == "ack" and ack["session"]["resumed"] is True
            nxt = ack["session"]["next_seq"]
            assert 0 < nxt <= cut + 10
            # Resend from a little before next_seq: those are duplicates, dropped.
            for i in range(max(0, nxt - 5), N_FRAMES):
                await ws.send_message(_frame(i))
            await ws.send_message(json.dumps({"type": "flush"}))
            await _drain(ws, second, stop="end")
    events = first + second
    for e in events:
        check_event(e)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), seqs  # one event stream, continued
    finals = [e for e in events if e["type"] == "asr_final"]
    assert [f["utterance"] for f in finals] == [0, 1]
    assert finals[0]["start_ms"] <= 1800 and finals[1]["start_ms"] >= 4400
    for f in finals:
        assert float(f["text"].split("s ", 1)[0]) * 1000 >= f["end_ms"] - f["start_ms"] - 60
    m = next(e for e in events if e["type"] == "metrics")
    assert m["audio_ms"] == len(AUDIO) // 16  # every sample once: none lost, none doubled
    assert m["utterances"] == 2
    data, _sr = soundfile.read(gw.archive / "res.ogg", dtype="int16")
    assert abs(len(data) - len(AUDIO)) <= 320  # Ogg Opus: whole 20 ms packets
    assert [p.name for p in gw.archive.iterdir() if p.suffix == ".ogg"] == ["res.ogg"]
    gw.shutdown.set()


async def test_the_wait_for_a_reconnect_is_not_cut_by_the_idle_timer(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    """A client away for longer than FLUSH_IDLE_S but within RESUME_WINDOW_S resumes
    (the idle timer once bounded the wait for it)."""
    _, port, _ = await start_asr(nursery, StandInEngine())
    gw = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{port}",
                             resume_window_s=4.0, flush_idle_s=0.5)
    start = json.dumps({"type": "start", "flowId": "away", "features": ["seq_header"]})
    with trio.fail_after(30):
        async with connect(gw.ws_url) as ws, trio.open_nursery() as n:
            n.start_soon(_drain, ws, [])
            await ws.send_message(start)
            for i in range(100):
                await ws.send_message(_frame(i))
            await trio.sleep(0.3)
            await ws._stream.aclose()
        await trio.sleep(1.5)  # 3x the idle timer
        events: list[dict[str, Any]] = []
        async with connect(gw.ws_url) as ws:
            await ws.send_message(start)
            ack = json.loads(await ws.get_message())
            for i in range(ack["session"].get("next_seq", 0), N_FRAMES):
                await ws.send_message(_frame(i))
            await ws.send_message(json.dumps({"type": "flush"}))
            await _drain(ws, events, stop="end")
    assert ack["type"] == "ack" and ack["session"].get("resumed") is True, ack
    m = next(e for e in events if e["type"] == "metrics")
    assert m["audio_ms"] == len(AUDIO) // 16
    assert events[-1]["reason"] == "flush"
    gw.shutdown.set()


async def test_no_resume_after_the_window(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine())
    gw = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{port}",
                             resume_window_s=0.3)
    start = json.dumps({"type": "start", "flowId": "late", "features": ["seq_header"]})
    with trio.fail_after(30):
        async with connect(gw.ws_url) as ws, trio.open_nursery() as n:
            n.start_soon(_drain, ws, [])
            await ws.send_message(start)
            for i in range(100):
                await ws.send_message(_frame(i))
            await trio.sleep(0.3)
            await ws._stream.aclose()
        while not (gw.archive / "late.ogg").exists():
            await trio.sleep(0.05)
        saved = (gw.archive / "late.ogg").read_bytes()
        # The session ended and its recording is saved: the flowId is taken (a new
        # session would replace the recording), a new flowId is not.
        async with connect(gw.ws_url) as ws:
            await ws.send_message(start)
            refused = json.loads(await ws.get_message())
        async with connect(gw.ws_url) as ws:
            await ws.send_message(start.replace('"late"', '"late-2"'))
            ack = json.loads(await ws.get_message())
    check_event(refused)
    assert (refused["type"], refused["code"], refused["fatal"]) == ("error", "FLOW_EXISTS",
                                                                   True)
    assert ack["type"] == "ack" and "resumed" not in ack["session"]
    assert (gw.archive / "late.ogg").read_bytes() == saved
    gw.shutdown.set()


async def test_one_percent_loss_reorder_and_duplicates_keep_the_timeline(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    """1 % of the frames never arrive, others come out of order or twice: the session's
    audio is exactly as long as the client's (lost frames are concealed with silence,
    in place), so times and the recording stay aligned with what was sent."""
    _, port, _ = await start_asr(nursery, StandInEngine())
    gw = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{port}")
    rng = random.Random(11)
    lost = set(rng.sample(range(1, N_FRAMES - 1), N_FRAMES // 100))
    order = [i for i in range(N_FRAMES) if i not in lost]
    for k in range(0, len(order) - 3, 13):
        order[k], order[k + 3] = order[k + 3], order[k]
    for d in rng.sample(order, len(order) // 100):
        order.insert(order.index(d) + 2, d)
    events: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async with connect(gw.ws_url) as ws, trio.open_nursery() as n:
            n.start_soon(_drain, ws, events, "end")
            await ws.send_message(json.dumps({"type": "start", "flowId": "lossy",
                                              "features": ["seq_header"]}))
            for i in order:
                await ws.send_message(_frame(i))
            await ws.send_message(json.dumps({"type": "flush"}))
    for e in events:
        check_event(e)
    assert [f["utterance"] for f in events if f["type"] == "asr_final"] == [0, 1]
    m = next(e for e in events if e["type"] == "metrics")
    assert m["audio_ms"] == len(AUDIO) // 16
    data, _sr = soundfile.read(gw.archive / "lossy.ogg", dtype="int16")
    assert abs(len(data) - len(AUDIO)) <= 320
    expected = AUDIO.copy()
    for i in lost:
        expected[i * STEP:(i + 1) * STEP] = 0
    n = min(len(data), len(expected)) // 1600 * 1600
    env = [np.sqrt(np.mean(x[:n].astype(np.float64).reshape(-1, 1600) ** 2, axis=1))
           for x in (data, expected)]
    assert np.corrcoef(env[0], env[1])[0, 1] > 0.95  # aligned, not shifted
    gw.shutdown.set()
