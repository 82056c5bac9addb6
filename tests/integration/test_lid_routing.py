"""Language ID and pool routing through the gateway, with the stand-in engine (fast and
deterministic: the test chooses what /v1/lid answers). The stand-in's finals say how much
audio they heard, so a move between pools that lost or doubled audio shows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from gateway.client import StreamResult, stream_audio
from stages.vad import VadModel
from tests import speech
from tests.integration.test_gateway import checked, start_gateway
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(90)

SILENCE = np.zeros(16000, dtype=np.int16)
GAP = np.zeros(24000, dtype=np.int16)


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


def heard_s(final: dict[str, Any]) -> float:
    m = re.match(r"([\d.]+)s ", final["text"])
    assert m, final["text"]
    return float(m.group(1))


async def run(nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
              engine: StandInEngine, audio: np.ndarray, start: dict[str, Any],
              **overrides: Any) -> StreamResult:
    _, port, stop = await start_asr(nursery, engine)
    gw = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{port}",
                             **overrides)
    try:
        return checked(await stream_audio(gw.ws_url, audio, realtime=False, start=start))
    finally:
        gw.shutdown.set()
        stop.set()


def clip() -> np.ndarray:
    return speech.librivox()[1][1]


async def test_english_stays_on_the_en_pool(nursery: trio.Nursery, vad_model: VadModel,
                                            tmp_path: Path) -> None:
    engine = StandInEngine(lid=("en", 0.97))
    audio = np.concatenate([SILENCE, clip(), SILENCE])
    r = await run(nursery, vad_model, tmp_path, engine, audio,
                  {"return": ["lid", "asr", "metrics"]})
    (lid,) = r.of("lid")
    assert lid["lang"] == "en" and lid["pool"] == "en" and lid["score"] == 0.97
    assert lid["speech_ms"] <= 3000
    assert r.of("ack")[0]["session"]["asr_pool"] == "en"
    (final,) = r.of("asr_final")
    assert final["lang"] == "en"
    assert {pool for pool, _ in engine.batches} == {"en", "multi"}  # multi: LID only
    assert all(pool == "en" for pool, n in engine.batches if n and pool != "multi")
    m = r.of("metrics")[0]
    assert m["lang"] == "en" and m["asr_pool"] == "en" and m["stage_ms"]["lid"] > 0


async def test_german_moves_to_multi_without_losing_or_doubling(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    # The same audio on a session that never moves is the reference for what a final
    # should have heard.
    audio = np.concatenate([SILENCE, clip(), GAP, speech.goforward(), SILENCE])
    ref = await run(nursery, vad_model, tmp_path / "ref", StandInEngine(), audio,
                    {"return": ["asr"], "hints": {"user_lang_pref": "en"}})
    engine = StandInEngine(lid=("de", 0.95), lid_delay_s=0.3)
    r = await run(nursery, vad_model, tmp_path / "moved", engine, audio,
                  {"return": ["lid", "asr", "metrics"]})
    (lid,) = r.of("lid")
    assert lid["lang"] == "de" and lid["pool"] == "multi"
    finals = r.of("asr_final")
    assert [f["utterance"] for f in finals] == [0, 1]  # one final each, in order
    assert all(f["lang"] == "de" for f in finals)
    for got, want in zip(finals, ref.of("asr_final"), strict=True):
        assert abs(heard_s(got) - heard_s(want)) <= 0.02, (got["text"], want["text"])
        assert (got["start_ms"], got["end_ms"]) == (want["start_ms"], want["end_ms"])
    kinds = [e["type"] for e in r.events]
    assert kinds.index("lid") < kinds.index("asr_final")
    # partials of one utterance never go back in time
    for u in (0, 1):
        ends = [p["end_ms"] for p in r.of("asr_partial") if p["utterance"] == u]
        assert ends == sorted(ends)
    assert r.of("metrics")[0]["asr_pool"] == "multi"


async def test_a_short_first_utterance_waits_for_lid_then_moves(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    # goforward has ~1.5 s of speech: the first checkpoint (1 s) or the utterance's end
    # asks; the final waits for the answer and comes from the multi pool.
    engine = StandInEngine(lid=("fr", 0.9), lid_delay_s=0.5)
    audio = np.concatenate([SILENCE, speech.goforward(), SILENCE])
    r = await run(nursery, vad_model, tmp_path, engine, audio, {"return": ["lid", "asr"]})
    assert r.of("lid")[0]["lang"] == "fr"
    (final,) = r.of("asr_final")
    assert final["lang"] == "fr"


async def test_a_language_preference_starts_on_its_pool_and_is_not_moved(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    engine = StandInEngine(lid=("en", 0.99))
    audio = np.concatenate([SILENCE, clip(), SILENCE])
    r = await run(nursery, vad_model, tmp_path, engine, audio,
                  {"return": ["lid", "asr"], "hints": {"user_lang_pref": "es"}})
    assert r.of("ack")[0]["session"]["asr_pool"] == "multi"
    assert r.of("lid")[0]["lang"] == "en" and r.of("lid")[0]["pool"] == "multi"
    assert r.of("asr_final")[0]["lang"] == "es"


async def test_an_unsure_lid_is_reported_but_not_routed(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    engine = StandInEngine(lid=("de", 0.3))
    audio = np.concatenate([SILENCE, clip(), SILENCE])
    r = await run(nursery, vad_model, tmp_path, engine, audio, {"return": ["lid", "asr"]})
    (lid,) = r.of("lid")
    assert lid["lang"] == "de" and lid["pool"] == "en" and lid["speech_ms"] == 3000
    assert len(engine.lid_requests) == 2  # 2 s, then 3 s: neither sure enough
    assert r.of("asr_final")[0]["lang"] == "en"


async def test_without_lid_on_the_service_the_session_goes_on(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = StandInEngine()
    monkeypatch.setattr(engine, "lid_pool", lambda: None)  # /v1/lid answers 404
    audio = np.concatenate([SILENCE, clip(), SILENCE])
    r = await run(nursery, vad_model, tmp_path, engine, audio, {"return": ["lid", "asr"]})
    assert not r.of("lid") and not r.of("error")
    assert r.of("asr_final")[0]["lang"] == "en"


async def test_lid_off_when_not_asked_for_and_a_language_is_given(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    engine = StandInEngine()
    audio = np.concatenate([SILENCE, clip(), SILENCE])
    r = await run(nursery, vad_model, tmp_path, engine, audio,
                  {"return": ["asr"], "hints": {"user_lang_pref": "en"}})
    assert not r.of("lid") and not engine.lid_requests
    assert r.of("ack")[0]["session"]["lid"] is False


async def test_denoise_keeps_utterance_timing_and_audio(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    """The denoise stage is delay-compensated: with it on, every utterance reaches
    recognition with exactly the same span and length as with it off."""
    audio = np.concatenate([SILENCE, clip(), GAP, speech.goforward(), SILENCE])
    start = {"return": ["asr", "metrics"], "hints": {"user_lang_pref": "en"}}
    off = await run(nursery, vad_model, tmp_path / "off", StandInEngine(), audio, start,
                    enable_denoise=False)
    on = await run(nursery, vad_model, tmp_path / "on", StandInEngine(), audio, start,
                   enable_denoise=True)
    assert on.of("ack")[0]["session"]["denoise"] is True
    assert off.of("ack")[0]["session"]["denoise"] is False
    spans = [[(heard_s(f), f["start_ms"], f["end_ms"]) for f in r.of("asr_final")]
             for r in (off, on)]
    assert len(spans[0]) == 2 and spans[0] == spans[1]
    assert on.of("metrics")[0]["stage_ms"]["denoise"] > 0
    assert off.of("metrics")[0]["stage_ms"]["denoise"] == 0
