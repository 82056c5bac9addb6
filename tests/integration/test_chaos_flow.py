"""Chaos: a client far faster than real time against a slow recognizer. The ASR says
``flow BEHIND``; the gateway holds the client (``flow PAUSE``) and lets it go on at
``OK`` (``flow RESUME``); nothing accepted is lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import trio

from gateway.client import stream_audio
from stages.vad import VadModel
from tests import speech
from tests.contract import check_event
from tests.integration.test_gateway import start_gateway
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

GOFORWARD = speech.goforward()
GAP = np.zeros(24000, dtype=np.int16)


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


async def test_forty_times_real_time_is_held_and_loses_nothing(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    # Every batch takes 0.25 s: partials fall behind a 40x client at once.
    engine = StandInEngine(delay_s=0.25)
    _, port, _ = await start_asr(nursery, engine, behind_threshold_s=2.0)
    gw = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{port}")
    audio = np.concatenate([GAP, *[np.concatenate([GOFORWARD, GAP]) for _ in range(5)]]
                           ).astype(np.int16)  # about 26 s, 5 utterances
    with trio.fail_after(50):
        r = await stream_audio(gw.ws_url, audio, speed=40.0,
                               start={"flowId": "fast", "return": ["asr", "record_url",
                                                                   "metrics"]})
    for e in r.events:
        check_event(e)
    flows = [e["state"] for e in r.of("flow")]
    assert "PAUSE" in flows, flows
    assert flows.count("PAUSE") == flows.count("RESUME"), flows  # every hold let go
    assert any(e["reason"] == "recognition is behind" for e in r.of("flow")
               if e["state"] == "PAUSE")
    assert not r.of("error")
    finals = r.of("asr_final")
    assert [f["utterance"] for f in finals] == list(range(5))
    for f in finals:  # each heard all of its speech
        heard_ms = float(f["text"].split("s ", 1)[0]) * 1000
        assert heard_ms >= max(2000, f["end_ms"] - f["start_ms"] - 60), f
    m = r.of("metrics")[0]
    assert m["audio_ms"] == len(audio) // 16
    data, _sr = soundfile.read(gw.archive / "fast.ogg", dtype="int16")
    assert abs(len(data) - len(audio)) <= 320
    gw.shutdown.set()
