"""Language ID and routing with the real engine: English recordings stay on the ``en``
pool; German, French and Spanish (espeak-ng) move to ``multi``, and the events show it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import gateway.session
from asr.engine import WhisperBackend
from asr.server import AsrServerConfig, serve
from asr.whisper.engine import WhisperEngine
from gateway.client import StreamResult, stream_audio
from gateway.config import GatewayConfig
from gateway.server import serve as serve_gateway
from gateway.vadservice import VadService
from stages.vad import VadModel
from tests import speech
from tests.contract import check_event

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SENTENCES = {
    "de": "Guten Morgen, ich möchte heute mit dem Zug nach Berlin fahren und meine "
          "Familie besuchen.",
    "fr": "Bonjour, je voudrais réserver une table pour deux personnes ce soir au "
          "restaurant.",
    "es": "Buenos días, quiero comprar dos billetes de tren para ir a Madrid mañana por "
          "la tarde.",
}

# Whisper base identifies espeak-ng's French poorly: of four sentences at 130 and 160 wpm,
# most came out as zh, th, ja or la on 1-3 s of speech; this one, at 130 wpm, is fr at
# 0.94 on 2 s but zh at 0.35 on 1 s, so the answer depends on which lengths of speech the
# requests carry, which depends on timing. The test is expected to fail sometimes (xfail).
WPM = {"de": 150, "fr": 130, "es": 150}


@pytest.fixture(scope="module")
def backend(whisper_engine: Callable[..., WhisperEngine]) -> WhisperBackend:
    b = WhisperBackend()
    b._engines[("base", "int8")] = whisper_engine("base", "int8")
    b._engines[("tiny.en", "int8")] = whisper_engine("tiny.en", "int8")
    return b


async def _start(nursery: trio.Nursery, backend: WhisperBackend, tmp_path: Path) -> str:
    app, asr_port = await nursery.start(functools.partial(
        serve, backend, AsrServerConfig(port=0), warmup=False))
    await app.ready_event.wait()
    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path),
        "asr_urls": f"http://127.0.0.1:{asr_port}"})
    ws_port, _ = await nursery.start(functools.partial(
        serve_gateway, cfg, vad=VadService(VadModel())))
    return f"ws://127.0.0.1:{ws_port}/ws/stream"


async def _stream(url: str, audio: np.ndarray) -> StreamResult:
    silence = np.zeros(8000, dtype=np.int16)
    r = await stream_audio(url, np.concatenate([silence, audio, silence]), realtime=False,
                           start={"return": ["lid", "asr", "metrics"]})
    for e in r.events:
        check_event(e)
    return r


def _one_final_each(r: StreamResult) -> list[dict[str, Any]]:
    finals = r.of("asr_final")
    assert [f["utterance"] for f in finals] == list(range(len(finals))), finals
    assert finals and all(f["text"].strip() for f in finals)
    return finals


async def test_english_is_identified_and_stays_on_the_en_pool(
        nursery: trio.Nursery, backend: WhisperBackend, tmp_path: Path) -> None:
    url = await _start(nursery, backend, tmp_path)
    for name, audio, _ref in speech.librivox()[:2]:
        r = await _stream(url, audio)
        (lid,) = r.of("lid")
        assert (lid["lang"], lid["pool"]) == ("en", "en"), (name, lid)
        assert lid["score"] >= 0.8
        assert all(f["lang"] == "en" for f in _one_final_each(r))
        assert r.of("metrics")[0]["asr_pool"] == "en"


@pytest.mark.parametrize("lang", [
    "de", "es",
    pytest.param("fr", marks=pytest.mark.xfail(
        reason="Whisper base calls espeak-ng's French zh/th/vi on 1-3 s of it, depending on "
               "which checkpoints the answers fall on; French routing is tested with the "
               "stand-in engine (test_lid_routing.py)", strict=False)),
])
async def test_other_languages_move_to_the_multi_pool(
        nursery: trio.Nursery, backend: WhisperBackend, tmp_path: Path, lang: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An utterance's final waits at most LID_HOLD_S for a language ID answer in flight,
    # then goes on the starting pool. With the whole clip sent at once, a loaded 2-core
    # machine answered LID in 4.3 s, past the 2 s hold, and the German final came back
    # from the English pool (translated). This test is about where recognition goes once
    # LID has decided, so it waits for the answer; the hold's bound is tested with the
    # stand-in engine (test_lid_routing.py).
    monkeypatch.setattr(gateway.session, "LID_HOLD_S", 30.0)
    url = await _start(nursery, backend, tmp_path)
    r = await _stream(url, speech.espeak(SENTENCES[lang], voice=lang, speed_wpm=WPM[lang]))
    (lid,) = r.of("lid")
    assert (lid["lang"], lid["pool"]) == (lang, "multi"), (lid["top"], lid["speech_ms"])
    kinds = [e["type"] for e in r.events]
    finals = _one_final_each(r)
    assert kinds.index("lid") < kinds.index("asr_final")
    assert all(f["lang"] == lang for f in finals), finals
    m = r.of("metrics")[0]
    assert m["asr_pool"] == "multi" and m["lang"] == lang
    # Recognized in the language, not translated to English: some of the sentence's
    # longer words come back. (Whisper base on synthetic French gets few right: "bouchou,
    # je vous n'en ai ... au restaurant"; German and Spanish get most.)
    said = " ".join(f["text"] for f in finals).lower()
    words = [w.strip(",.").lower() for w in SENTENCES[lang].split() if len(w) > 4]
    assert sum(w in said for w in words) >= (1 if lang == "fr" else len(words) // 2), said
