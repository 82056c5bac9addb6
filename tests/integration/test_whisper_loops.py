"""Finals on repetitive speech must not loop (issue 10), with the real models.

Passages with strongly repetitive phrasing (anaphora, counting, a list), synthesized
with espeak-ng at 190 words a minute and 16 kHz, are decoded as a final through
``WhisperBackend.run_batch`` with the production default pools, and compared with the
offline decode of the same audio in Whisper's own 30 s window. In a window of exactly
their own length (the old finals), greedy base loops on two of them: "We shall never
surrender." 12 times (WER 88 %) and "25" 100 times (WER 700 %). The loop guards alone
(no margin) must catch that too. Silence and low noise give no text at all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from asr.backend import Recognition
from asr.engine import DEFAULT_POOLS, PoolSpec, WhisperBackend
from asr.scheduler import Job
from asr.whisper.engine import WhisperEngine
from asr.whisper.loops import repeated_ngrams
from asr.whisper.normalize import normalize_english, word_errors
from tests import speech

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WPM = 190  # fast enough that the old windows made base loop

PASSAGES = {
    "anaphora": (
        "We shall go on to the end. We shall fight in France, we shall fight on the seas "
        "and oceans, we shall fight with growing confidence and growing strength in the "
        "air. We shall fight on the beaches, we shall fight on the landing grounds, we "
        "shall fight in the fields and in the streets, we shall fight in the hills. We "
        "shall never surrender."
    ),
    "counting": (
        "One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, "
        "thirteen, fourteen, fifteen, sixteen, seventeen, eighteen, nineteen, twenty, "
        "twenty one, twenty two, twenty three, twenty four, twenty five."
    ),
    "list": (
        "For the trip we need a tent, a stove, a lamp, a map, a rope, a knife, a pan, a "
        "cup, a plate, a spoon, a fork, a towel, a hat, a coat, a pair of boots and a "
        "pair of socks, and a bag to carry it all."
    ),
}


@pytest.fixture(scope="module")
def backend(whisper_engine: Callable[..., WhisperEngine]) -> WhisperBackend:
    """The production pools on the session's shared engines (loaded once)."""
    engines = {(m, "int8"): whisper_engine(m) for m in ("base", "tiny.en")}
    return WhisperBackend(pools_spec=dict(DEFAULT_POOLS), _engines=engines)


def _loops(ref: str, hyp: str) -> dict[tuple[str, ...], int]:
    """4-grams the hypothesis repeats more often than the reference says them."""
    ref_counts = repeated_ngrams(normalize_english(ref).split(), 4, min_count=1)
    return {g: c for g, c in repeated_ngrams(normalize_english(hyp).split(), 4).items()
            if c > ref_counts.get(g, 0) + 1}


def _audios() -> dict[str, np.ndarray]:
    return {name: speech.espeak(text, speed_wpm=WPM).astype(np.float32) / 32768.0
            for name, text in PASSAGES.items()}


def test_repetitive_passages_do_not_loop(backend: WhisperBackend,
                                         whisper_engine: Callable[..., WhisperEngine]
                                         ) -> None:
    audios = _audios()
    for name, audio in audios.items():
        assert 10.0 <= audio.size / 16000 <= 28.0, (name, audio.size / 16000)
    jobs = [Job("final", "en", audio, key=None, options={"lang": "en"})
            for audio in audios.values()]
    finals = backend.run_batch("en", jobs)
    offline = whisper_engine("base")
    totals = [0, 0, 0]  # our errors, offline errors, reference words
    texts: list[tuple[str, int, int, str]] = []
    for (name, text), audio, res in zip(PASSAGES.items(), audios.values(), finals,
                                        strict=True):
        assert isinstance(res, Recognition), res
        assert not _loops(text, res.text), (name, res.text)
        ref_words = len(normalize_english(text).split())
        assert len(normalize_english(res.text).split()) <= 1.2 * ref_words, (name, res.text)
        full = offline.transcribe(audio, language="en")  # Whisper's own 30 s window
        ours, theirs = word_errors(text, res.text), word_errors(text, full.text)
        # One passage is 40-60 words, so one word is 2 points: allow 3 words each ...
        assert ours.errors <= theirs.errors + 3, (name, ours, theirs, res.text, full.text)
        totals[0] += ours.errors
        totals[1] += theirs.errors
        totals[2] += ours.ref_words
        texts.append((name, ours.errors, theirs.errors, res.text))
    # ... and stay within 3 points of WER of the offline decode on all the passages
    # together (4 words of 144). Here the finals lose 1 word to offline's 1; one CI run
    # (another machine) lost 4. The 2-point bound is held on minutes of
    # long-form speech by bench/asr_quality.py, where one word is not 0.7 points.
    assert totals[0] <= totals[1] + 0.03 * totals[2], (totals, texts)


def test_guards_alone_stop_the_loop(whisper_engine: Callable[..., WhisperEngine]) -> None:
    """The old window (exactly the audio) loops greedily; fallback must catch it."""
    no_margin = WhisperBackend(
        pools_spec={"en": PoolSpec(model="base", languages=("en",), final_margin_s=0.0,
                                   final_min_window_s=1.0)},
        default_pool="en", _engines={("base", "int8"): whisper_engine("base")})
    text = PASSAGES["counting"]
    [res] = no_margin.run_batch("en", [Job("final", "en", _audios()["counting"], key=None,
                                           options={"lang": "en"})])
    assert isinstance(res, Recognition), res
    assert not _loops(text, res.text), res.text
    # Greedy alone: WER 7.0 ("25" a hundred times). With the fallback: 0.0 when the
    # beam-5 retry passes its checks, 0.2 when it does not and a sample wins (a stray
    # "25 24 25", no loop); which one happens varies between runs (onnxruntime's
    # multi-threaded sums move the beam's log-probability across the threshold).
    assert word_errors(text, res.text).wer <= 0.25, res.text


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_silence_and_noise_give_no_text(backend: WhisperBackend, kind: str) -> None:
    rng = np.random.default_rng(3)
    audio = (np.zeros(32000, np.float32) if kind == "silence"
             else (0.003 * rng.standard_normal(32000)).astype(np.float32))
    [final] = backend.run_batch("en", [Job("final", "en", audio, key=None,
                                           options={"lang": "en"})])
    assert isinstance(final, Recognition) and final.text == ""
    policy = backend.partial_policy("en")
    for end in (8000, 16000, 24000, 32000):
        [part] = backend.run_batch("en", [Job("partial", "en", audio[:end], key=None,
                                              options={"lang": "en",
                                                       "prefix": policy.prefix})])
        assert isinstance(part, Recognition)
        assert policy.update(part) == "", (end, part.text)
