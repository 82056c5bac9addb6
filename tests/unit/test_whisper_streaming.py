"""Streaming partials: the local-agreement policy, utterance streams on a scripted fake
model, and (slow) the real model on a recording."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asr.whisper.decoding import WhisperEngine
from asr.whisper.normalize import normalize_english
from asr.whisper.streaming import (
    EnginePartialDecoder,
    LocalAgreement,
    Partial,
    StreamConfig,
    UtteranceStream,
    common_prefix_length,
    run_partials,
    trim_repetition,
    word_boundary,
)
from asr.whisper.tokenizer import WhisperTokenizer
from tests.data import fake_whisper as fw

# -- the policy ----------------------------------------------------------------------------


def test_common_prefix_length() -> None:
    assert common_prefix_length([]) == 0
    assert common_prefix_length([(1, 2, 3), (1, 2, 4), (1, 2)]) == 2
    assert common_prefix_length([(1,), (2,)]) == 0
    assert common_prefix_length([(5, 6)]) == 2


def test_agreement_of_two() -> None:
    la = LocalAgreement(2)
    assert la.update([1, 2, 3]) == ((), (1, 2, 3))  # nothing to agree with yet
    assert la.update([1, 2, 4, 5]) == ((1, 2), (4, 5))
    assert la.update([1, 2, 4, 6]) == ((1, 2, 4), (6,))
    # A hypothesis that contradicts the stable part cannot retract it.
    assert la.update([1, 9]) == ((1, 2, 4), ())
    assert la.update([1, 2, 4, 6, 7]) == ((1, 2, 4), (6, 7))  # agreement restarted
    assert la.update([1, 2, 4, 6, 7]) == ((1, 2, 4, 6, 7), ())


def test_agreement_of_three_and_one() -> None:
    la = LocalAgreement(3)
    la.update([1, 2])
    assert la.update([1, 2]) == ((), (1, 2))
    assert la.update([1, 3]) == ((1,), (3,))
    one = LocalAgreement(1)
    assert one.update([4, 5]) == ((4, 5), ())
    with pytest.raises(ValueError):
        LocalAgreement(0)


def test_untrusted_hypotheses_do_not_commit() -> None:
    la = LocalAgreement(2)
    la.update([1, 2, 3])
    assert la.update([1, 2, 3, 3, 3], trusted=False) == ((), (1, 2, 3, 3, 3))
    assert la.update([1, 2, 3, 4]) == ((1, 2, 3), (4,))


def test_cut_back_to_allowed_boundaries() -> None:
    la = LocalAgreement(2, can_cut=lambda toks, k: k < len(toks) and toks[k] % 2 == 0)
    la.update([1, 3, 5, 2, 7])
    # They agree on 4 tokens; the cut is only allowed before an even token (index 3).
    assert la.update([1, 3, 5, 2, 9]) == ((1, 3, 5), (2, 9))


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> WhisperTokenizer:
    return fw.make(tmp_path_factory.mktemp("tok"))[1]


def test_word_boundary(tok: WhisperTokenizer) -> None:
    cut = word_boundary(tok)
    ids = tok.encode("go forward ten")
    assert cut(ids, 2)  # before " forward"
    assert not cut(ids, 4)  # inside "forward"
    assert not cut(ids, len(ids))  # the audio may end mid-word
    e = tok.encode("é é")  # two bytes each: no cut inside the character
    assert not cut(e, 1) and cut(e, 2)


# Hypotheses as texts over a small alphabet, so that words and shared prefixes happen.
texts = st.lists(st.text(alphabet="ab é", max_size=12), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(hyps=texts, n=st.integers(1, 3), trusted=st.lists(st.booleans(), min_size=12,
                                                          max_size=12))
def test_stable_text_never_retracts(tok: WhisperTokenizer, hyps: list[str], n: int,
                                    trusted: list[bool]) -> None:
    la = LocalAgreement(n, word_boundary(tok))
    prev_stable = ""
    prev_tokens: tuple[int, ...] = ()
    for h, t in zip(hyps, trusted, strict=False):
        stable, tail = la.update(tok.encode(h), trusted=t)
        assert stable[: len(prev_tokens)] == prev_tokens
        text = tok.decode(stable)
        assert text.startswith(prev_stable)
        assert tok.decode(stable + tail).startswith(text)
        assert "\ufffd" not in text
        prev_stable, prev_tokens = text, stable


# -- utterance streams on the fake model -------------------------------------------------

SENTENCE = "go forward ten meters"


def _growing(n_frames: int) -> fw.Utt:
    """Text revealed in proportion to the audio (2 s for the sentence), with the word
    being spoken sometimes misheard ("fore" for "forward")."""
    chars = min(len(SENTENCE), n_frames * len(SENTENCE) // 200)
    text = SENTENCE[:chars]
    if text.endswith(" for"):
        text = text[:-3] + "fore"
    return fw.Utt(fw.say(text, p=0.95))


def _tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def fake(tmp_path: Path) -> fw.ScriptedWhisper:
    model, _ = fw.make(tmp_path)
    model.by_frames = _growing
    return model


def _stream_all(stream: UtteranceStream, dec: EnginePartialDecoder, audio: np.ndarray,
                chunk: int) -> list[Partial]:
    out: list[Partial] = []
    for i in range(0, audio.size, chunk):
        stream.feed(audio[i : i + chunk])
        out += stream.step(dec)
    return out


def test_stream_partials_and_final(fake: fw.ScriptedWhisper) -> None:
    eng = WhisperEngine(fake)
    dec = EnginePartialDecoder(eng)
    s = UtteranceStream(7, eng.tok, start_sample=16000, language="en")
    partials = _stream_all(s, dec, _tone(2.6), 1600)
    # One partial per 0.5 s of audio.
    assert [p.revision for p in partials] == [1, 2, 3, 4, 5]
    assert [p.end_ms for p in partials] == [1500.0, 2000.0, 2500.0, 3000.0, 3500.0]
    assert all(p.utterance == 7 and p.start_ms == 1000.0 for p in partials)
    stables = [p.stable_text for p in partials]
    for a, b in itertools.pairwise(stables):
        assert b.startswith(a)
    for p in partials:
        assert p.text.startswith(p.stable_text)
    assert stables[-1].startswith("go forward")
    assert partials[-1].text == SENTENCE
    final = s.finalize(dec)
    assert (final.utterance, final.text) == (7, SENTENCE)
    assert (final.start_ms, final.end_ms) == (1000.0, 1000.0 + 2600.0)
    with pytest.raises(RuntimeError):
        s.feed(_tone(0.1))


def test_stable_prefix_is_forced_not_redecoded(fake: fw.ScriptedWhisper) -> None:
    eng = WhisperEngine(fake)
    dec = EnginePartialDecoder(eng)
    s = UtteranceStream(1, eng.tok, language="en")
    _stream_all(s, dec, _tone(2.0), 8000)
    assert s.policy.committed  # something became stable
    fake.calls.clear()
    s.feed(_tone(0.5))
    [p] = s.step(dec)
    # Second prompt call = language, task, notimestamps + the stable tokens.
    assert fake.calls[1].n == 3 + p.stable_tokens
    # Then only the tail is generated, one step per token.
    assert len(fake.calls) == 2 + len(p.tokens) - p.stable_tokens


def test_stream_window_and_budget(fake: fw.ScriptedWhisper) -> None:
    eng = WhisperEngine(fake)
    cfg = StreamConfig(partial_window_frames=1000, tokens_per_second=4, extra_tokens=2)
    s = UtteranceStream(1, eng.tok, language="en", config=cfg)
    s.feed(_tone(1.0))
    job = s.partial_job()
    assert job.window_frames == 1000 and job.max_new_tokens == 6
    s.feed(_tone(11.0))
    assert s.partial_job().window_frames == 1200  # grows with the audio, stays even
    for bad in (StreamConfig(partial_window_frames=4000), StreamConfig(agreement=0)):
        with pytest.raises(ValueError):
            UtteranceStream(1, eng.tok, config=bad)


def test_language_is_kept_for_partials(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    model.by_frames = lambda n: fw.Utt(fw.say("ja"), lang="de")
    eng = WhisperEngine(model)
    dec = EnginePartialDecoder(eng)
    s = UtteranceStream(1, eng.tok)
    [p] = _stream_all(s, dec, _tone(0.5), 8000)
    assert p.language == "de" and s.partial_job().language == "de"
    assert s.finalize(dec).language == "de"
    # Below the lock probability (the fake says 0.9) partials keep detecting.
    unsure = UtteranceStream(2, eng.tok, config=StreamConfig(language_lock_prob=0.95))
    [p] = _stream_all(unsure, dec, _tone(0.5), 8000)
    assert p.language == "de" and unsure.partial_job().language is None


def test_run_partials_batches_streams(fake: fw.ScriptedWhisper) -> None:
    eng = WhisperEngine(fake)
    dec = EnginePartialDecoder(eng)
    streams = [UtteranceStream(i, eng.tok, language="en") for i in range(3)]
    for s, sec in zip(streams, (1.0, 1.5, 0.2), strict=True):
        s.feed(_tone(sec))
    fake.encode_calls.clear()
    events = run_partials(dec, streams)
    assert [e.utterance for e in events] == [0, 1]  # the third has too little audio
    assert fake.encode_calls == [(2, 80, 3000)]
    assert run_partials(dec, streams) == []  # nothing new since


@settings(max_examples=20, deadline=None)
@given(chunks=st.lists(st.integers(400, 12000), min_size=1, max_size=10),
       force=st.booleans())
def test_stream_never_retracts(tmp_path_factory: pytest.TempPathFactory,
                               chunks: Sequence[int], force: bool) -> None:
    model, _ = fw.make(tmp_path_factory.mktemp("s"))
    model.by_frames = _growing
    eng = WhisperEngine(model)
    dec = EnginePartialDecoder(eng)
    s = UtteranceStream(1, eng.tok, language="en", config=StreamConfig(force_prefix=force))
    prev = ""
    for n in chunks:
        s.feed(_tone(n / 16000))
        for p in s.step(dec):
            assert p.stable_text.startswith(prev) and p.text.startswith(p.stable_text)
            prev = p.stable_text


# -- the real model -----------------------------------------------------------------------


@pytest.mark.slow
def test_stream_goforward_real(whisper_engine: Callable[..., WhisperEngine]) -> None:
    from tests import speech

    eng = whisper_engine("tiny.en")
    dec = EnginePartialDecoder(eng)
    s = UtteranceStream(1, eng.tok, config=StreamConfig(partial_interval_samples=8000))
    audio = speech.goforward()
    partials = _stream_all(s, dec, audio, 1600)
    assert len(partials) == audio.size // 8000
    for a, b in itertools.pairwise(partials):
        assert b.stable_text.startswith(a.stable_text)
    assert normalize_english(s.finalize(dec).text) == "go forward ten meters"


@pytest.mark.parametrize(
    ("tokens", "want", "looped"),
    [
        ([1, 2, 3, 4, 3, 4, 3, 4], [1, 2, 3, 4], True),
        ([7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1], [7, 1, 2, 3, 1], True),  # ends mid-copy
        ([7, 1, 2, 3, 1, 2, 3, 1], [7, 1, 2, 3, 1, 2, 3, 1], False),  # two copies only
        ([5, 5], [5, 5], False),  # "five five" is speech, not a loop
        ([5, 5, 5], [5], True),
        ([1, 2, 3], [1, 2, 3], False),
        ([], [], False),
    ],
)
def test_trim_repetition(tokens: list[int], want: list[int], looped: bool) -> None:
    assert trim_repetition(tokens) == (tuple(want), looped)


def test_looping_partial_is_trimmed_and_not_trusted(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    loop = fw.text_ids("ten ")  # the token budget (12+ tokens) fits 3+ copies
    model.by_frames = lambda n: fw.Utt(lambda hist: {loop[len(hist) % len(loop)]: 0.0})
    eng = WhisperEngine(model)
    dec = EnginePartialDecoder(eng)
    s = UtteranceStream(1, eng.tok, language="en")
    partials = _stream_all(s, dec, _tone(1.5), 8000)
    assert [p.text for p in partials] == ["ten"] * 3
    assert all(p.stable_text == "" for p in partials)
