"""Decoding against a scripted fake model (``tests/data/fake_whisper.py``), and the real
models in ``slow`` tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asr.whisper.audio import read_audio_file
from asr.whisper.engine import Utterance, WhisperEngine
from asr.whisper.model import CrossKV
from asr.whisper.normalize import normalize_english, word_errors
from asr.whisper.search import DecodeOptions, DecodeRequest, WhisperDecoder, log_softmax
from tests.data import fake_whisper as fw


def _stack(crosses: list[CrossKV]) -> CrossKV:
    return CrossKV(np.concatenate([c.k for c in crosses], axis=1),
                   np.concatenate([c.v for c in crosses], axis=1))


@pytest.fixture
def fake(tmp_path: Path) -> fw.ScriptedWhisper:
    return fw.make(tmp_path)[0]


def test_log_softmax_keeps_minus_inf() -> None:
    x = np.array([[0.0, -np.inf, 1.0]], np.float32)
    lp = log_softmax(x)
    assert lp[0, 1] == -np.inf
    assert np.exp(lp).sum() == pytest.approx(1.0)


def test_greedy_follows_the_script(fake: fw.ScriptedWhisper) -> None:
    cross = fake.add(1, fw.Utt(fw.say("hello")))
    dec = WhisperDecoder(fake)
    [res] = dec.decode(cross, [DecodeRequest(language="en")])
    assert res.text == "hello"
    assert res.finished and res.language == "en"
    assert res.tokens == tuple(fw.text_ids("hello"))
    # 5 letters and the end, each at about 0.9.
    assert res.sum_logprob == pytest.approx(6 * np.log(0.9), abs=1e-3)
    assert res.avg_logprob == pytest.approx(res.sum_logprob / 6)
    # Prompt in two calls ([SOT], then language/task/notimestamps), then one per token.
    assert [(c.n, c.p) for c in fake.calls[:3]] == [(1, 0), (3, 1), (1, 4)]
    assert len(fake.calls) == 2 + 5


def test_language_detection_and_no_speech(fake: fw.ScriptedWhisper) -> None:
    cross = _stack([fake.add(1, fw.Utt(fw.say("ja"), lang="de", no_speech=0.2)),
                    fake.add(2, fw.Utt(fw.say("oui"), lang="fr", no_speech=0.5))])
    dec = WhisperDecoder(fake)
    langs = dec.detect_language(cross, top_k=2)
    assert [r.lang for r in langs] == ["de", "fr"]
    assert langs[0].prob == pytest.approx(0.9, abs=1e-3)
    assert langs[0].top[1] == ("en", pytest.approx(0.1, abs=1e-3))  # the runner-up
    assert [r.no_speech_prob for r in langs] == [pytest.approx(0.2, abs=1e-3),
                                                 pytest.approx(0.5, abs=1e-3)]
    res = dec.decode(cross, [DecodeRequest(), DecodeRequest()])
    assert [(r.language, r.text) for r in res] == [("de", "ja"), ("fr", "oui")]
    assert res[1].no_speech_prob == pytest.approx(0.5, abs=1e-3)
    # The detected language's token is what the decoder was fed after SOT.
    forced = dec.decode(cross, [DecodeRequest(language="en"), DecodeRequest(language="fr")])
    assert forced[0].language == "en"
    assert forced[0].language_prob == pytest.approx(0.1, abs=1e-3)


def test_english_only_model(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path, multilingual=False)
    cross = model.add(1, fw.Utt(fw.say("hi"), lang="de"))
    dec = WhisperDecoder(model)
    [res] = dec.decode(cross, [DecodeRequest()])
    assert (res.language, res.language_prob, res.text) == ("en", 1.0, "hi")
    # [SOT], then only <|notimestamps|>: English-only models have no language/task tokens.
    assert [(c.n, c.p) for c in model.calls[:2]] == [(1, 0), (1, 1)]
    with pytest.raises(ValueError):
        dec.decode(cross, [DecodeRequest(language="de")])


def test_suppression(fake: fw.ScriptedWhisper) -> None:
    script = fw.table({
        # First step: blank and end-of-text are the favourites, but suppressed at begin.
        (): {fw.BLANK: 0.5, fw.EOT: 0.3, ord("a"): 0.2},
        # Then a non-speech symbol, a control token and a timestamp beat "b".
        (ord("a"),): {fw.SUPPRESSED: 0.3, fw.SOT_PREV: 0.2, fw.TIMESTAMP: 0.2,
                      fw.LANG["de"]: 0.2, ord("b"): 0.1},
        # A blank later on is fine.
        (ord("a"), ord("b")): {fw.BLANK: 1.0},
    })
    cross = fake.add(1, fw.Utt(script))
    [res] = WhisperDecoder(fake).decode(cross, [DecodeRequest(language="en")])
    assert res.text == "ab "
    # Log-probabilities are over what is left after suppression: "a" is certain.
    assert res.sum_logprob == pytest.approx(0.0, abs=1e-3)


def test_beam_search_beats_greedy(fake: fw.ScriptedWhisper) -> None:
    a, b, c, x, y, z = (ord(ch) for ch in "abcxyz")
    script = fw.table({
        (): {a: 0.5, b: 0.4, c: 0.1},
        (a,): {x: 0.34, y: 0.33, z: 0.33},
        (b,): {c: 0.98, x: 0.02},
    })
    cross = fake.add(1, fw.Utt(script))
    dec = WhisperDecoder(fake)
    [greedy] = dec.decode(cross, [DecodeRequest(language="en")])
    assert greedy.text == "ax"
    for beam in (2, 3, 5):
        [res] = dec.decode(cross, [DecodeRequest(language="en")], DecodeOptions(beam_size=beam))
        assert res.text == "bc", beam
        assert res.sum_logprob == pytest.approx(np.log(0.4 * 0.98), abs=1e-3)


def test_beam_length_normalisation(fake: fw.ScriptedWhisper) -> None:
    # "a" then end: log(.6) over 1 token. "bcd" then end: log(.4) over 3 tokens wins
    # when divided by length, loses on the raw sum (length_penalty=0 keeps the raw sum).
    # Stray paths never end, so that only these two can finish.
    a, b, c, d, z = (ord(ch) for ch in "abcdz")
    script = fw.table({(): {a: 0.6, b: 0.4}, (a,): {fw.EOT: 1.0}, (b,): {c: 1.0},
                       (b, c): {d: 1.0}, (b, c, d): {fw.EOT: 1.0}}, default={z: 1.0})
    cross = fake.add(1, fw.Utt(script))
    dec = WhisperDecoder(fake)
    req = [DecodeRequest(language="en")]
    assert dec.decode(cross, req, DecodeOptions(beam_size=2))[0].text == "bcd"
    assert dec.decode(cross, req, DecodeOptions(beam_size=2, length_penalty=0.0))[0].text == "a"


def test_token_limit(fake: fw.ScriptedWhisper) -> None:
    cross = fake.add(1, fw.Utt(lambda hist: {ord("a"): 0.0}))
    dec = WhisperDecoder(fake)
    for beam in (1, 3):
        [res] = dec.decode(cross, [DecodeRequest(language="en", max_new_tokens=7)],
                           DecodeOptions(beam_size=beam))
        assert res.text == "a" * 7 and not res.finished
    # Never past n_text_ctx // 2 (32 for the fake), whatever is asked.
    [res] = dec.decode(cross, [DecodeRequest(language="en")], DecodeOptions(max_new_tokens=500))
    assert len(res.tokens) == 32


def test_prompt_is_fed_before_sot_and_biases(fake: fw.ScriptedWhisper) -> None:
    cross = fake.add(1, fw.Utt(fw.say("sebra"), biased={"zebra": fw.say("zebra")}))
    dec = WhisperDecoder(fake)
    assert dec.decode(cross, [DecodeRequest(language="en")])[0].text == "sebra"
    fake.calls.clear()
    [res] = dec.decode(cross, [DecodeRequest(language="en", prompt="zebra, lion")])
    assert res.text == "zebra"
    # <|startofprev|> + " zebra, lion" + <|startoftranscript|> in the first call.
    assert fake.calls[0].n == 1 + len(" zebra, lion") + 1
    # A prompt longer than the context keeps its most recent tokens (n_text_ctx//2 - 1).
    [res] = dec.decode(cross, [DecodeRequest(language="en", prompt="x" * 200 + " zebra")])
    assert res.text == "zebra"


def test_prompt_does_not_sway_language_detection(fake: fw.ScriptedWhisper) -> None:
    cross = fake.add(1, fw.Utt(fw.say("ja"), lang="de"))
    [res] = WhisperDecoder(fake).decode(cross, [DecodeRequest(prompt="some words")])
    assert res.language == "de"


def test_forced_prefix(fake: fw.ScriptedWhisper) -> None:
    cross = fake.add(1, fw.Utt(fw.say("hello world")))
    dec = WhisperDecoder(fake)
    prefix = tuple(fw.text_ids("hello"))
    fake.calls.clear()
    [res] = dec.decode(cross, [DecodeRequest(language="en", prefix=prefix)])
    assert res.text == "hello world"
    assert res.tokens[:5] == prefix
    # The prefix goes in with the task tokens, in one call.
    assert fake.calls[1].n == 3 + 5
    assert len(fake.calls) == 2 + len(" world")
    with pytest.raises(ValueError):
        dec.decode(cross, [DecodeRequest(language="en", prefix=(fw.EOT,))])


@pytest.mark.parametrize("beam", [1, 2, 4])
def test_batch_equals_individual(fake: fw.ScriptedWhisper, beam: int) -> None:
    utts = [fw.Utt(fw.say("a")), fw.Utt(fw.say("a much longer one"), lang="de"),
            fw.Utt(fw.say("mid size"), lang="fr", no_speech=0.3)]
    crosses = [fake.add(i + 1, u) for i, u in enumerate(utts)]
    dec = WhisperDecoder(fake)
    opts = DecodeOptions(beam_size=beam)
    single = [dec.decode(c, [DecodeRequest()], opts)[0] for c in crosses]
    fake.calls.clear()
    batch = dec.decode(_stack(crosses), [DecodeRequest()] * 3, opts)
    assert batch == single
    rows = [c.rows for c in fake.calls]
    assert rows[:2] == [3, 3]  # the prompt, for all rows at once
    assert max(rows) <= 3 * beam
    if beam == 1:
        # One decoder run per step for all rows; finished rows leave the batch.
        assert len(fake.calls) == 2 + len("a much longer one")
        assert rows == sorted(rows, reverse=True) and rows[-1] == 1


def test_batch_with_different_prompt_lengths(fake: fw.ScriptedWhisper) -> None:
    crosses = [fake.add(1, fw.Utt(fw.say("one"))), fake.add(2, fw.Utt(fw.say("two")))]
    dec = WhisperDecoder(fake)
    reqs = [DecodeRequest(language="en", prompt="long prompt here"),
            DecodeRequest(language="en")]
    batch = dec.decode(_stack(crosses), reqs)
    single = [dec.decode(c, [r])[0] for c, r in zip(crosses, reqs, strict=True)]
    assert batch == single
    assert [r.text for r in batch] == ["one", "two"]


def test_options_are_validated(fake: fw.ScriptedWhisper) -> None:
    cross = fake.add(1, fw.Utt(fw.say("x")))
    dec = WhisperDecoder(fake)
    for bad in (DecodeOptions(beam_size=0), DecodeOptions(patience=0.5),
                DecodeOptions(max_new_tokens=0), DecodeOptions(task="summarise")):
        with pytest.raises(ValueError):
            dec.decode(cross, [DecodeRequest(language="en")], bad)
    with pytest.raises(ValueError):
        dec.decode(cross, [DecodeRequest(), DecodeRequest()])  # 2 requests, 1 row
    with pytest.raises(ValueError):
        dec.decode(cross, [DecodeRequest(language="xx")])


# -- property: batching never changes results --------------------------------------------

def _random_script(seed: int) -> fw.Script:
    letters = [ord(c) for c in "abcde "]

    def script(hist: tuple[int, ...]) -> dict[int, float]:
        rng = np.random.default_rng(abs(hash((seed, hist))) % (2**32))
        p = rng.dirichlet(np.ones(len(letters) + 1))
        p[-1] += len(hist) / 8  # ends more and more likely
        p /= p.sum()
        return {t: float(v) for t, v in zip([*letters, fw.EOT], p, strict=True)}

    return lambda hist: {t: float(np.log(v)) for t, v in script(hist).items()}


@settings(max_examples=25, deadline=None)
@given(seeds=st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
       beam=st.integers(1, 4))
def test_batching_is_invisible(tmp_path_factory: pytest.TempPathFactory, seeds: list[int],
                               beam: int) -> None:
    model, _ = fw.make(tmp_path_factory.mktemp("v"))
    crosses = [model.add(i + 1, fw.Utt(_random_script(s))) for i, s in enumerate(seeds)]
    dec = WhisperDecoder(model)
    opts = DecodeOptions(beam_size=beam, max_new_tokens=12)
    reqs = [DecodeRequest(language="en")] * len(seeds)
    batch = dec.decode(_stack(crosses), reqs, opts)
    single = [dec.decode(c, reqs[:1], opts)[0] for c in crosses]
    assert batch == single
    for r in batch:
        assert all(t < fw.EOT for t in r.tokens)
        assert 1 <= len(r.tokens) <= 12


# -- engine: audio in, transcripts in session time out ------------------------------------

def _tone(freq: float, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_engine_transcribe_and_timestamps(fake: fw.ScriptedWhisper) -> None:
    audio = _tone(440, 2.0)
    fake.add_audio(audio, fw.Utt(fw.say("tone")))
    eng = WhisperEngine(fake)
    tr = eng.transcribe(audio, start_ms=12_500.0)
    assert tr.text == "tone" and tr.lang == "en"
    assert (tr.start_ms, tr.end_ms) == (12_500.0, 14_500.0)
    assert tr.audio_ms == 2000.0 and tr.rtf > 0
    assert fake.encode_calls == [(1, 80, 3000)]  # padded to 30 s
    pcm = np.round(audio * 32767).astype(np.int16)
    fake.add_audio(pcm, fw.Utt(fw.say("pcm")))
    assert eng.transcribe(pcm).text == "pcm"  # int16 accepted
    d = tr.to_dict()
    json.dumps(d)
    assert d["text"] == "tone" and d["timings"]["total_ms"] > 0 and d["audio_ms"] == 2000.0


def test_engine_batch_equals_individual(fake: fw.ScriptedWhisper) -> None:
    clips = [_tone(300, 1.0), _tone(500, 2.5), _tone(700, 0.5)]
    for clip, text in zip(clips, ["low", "middle tone", "hi"], strict=True):
        fake.add_audio(clip, fw.Utt(fw.say(text)))
    eng = WhisperEngine(fake)
    single = [eng.transcribe(c, start_ms=1000.0 * i) for i, c in enumerate(clips)]
    fake.encode_calls.clear()
    batch = eng.transcribe_batch([Utterance(c, 1000.0 * i) for i, c in enumerate(clips)])
    assert fake.encode_calls == [(3, 80, 3000)]  # one encoder run
    assert [t.text for t in batch] == [t.text for t in single] == ["low", "middle tone", "hi"]
    assert [(t.start_ms, t.end_ms) for t in batch] == [(t.start_ms, t.end_ms) for t in single]


def test_engine_long_audio_in_windows(fake: fw.ScriptedWhisper) -> None:
    first, second = _tone(300, 30.0), _tone(600, 5.0)
    fake.add_audio(first, fw.Utt(fw.say_timed("first"), lang="de"))
    fake.add_audio(second, fw.Utt(fw.say_timed("second"), lang="fr"))
    tr = WhisperEngine(fake).transcribe(np.concatenate([first, second]), start_ms=100.0)
    assert tr.text == "first second"
    assert tr.lang == "de"  # from the first window, for all of them
    assert (tr.start_ms, tr.end_ms) == (100.0, 35_100.0)
    with pytest.raises(ValueError):
        WhisperEngine(fake).transcribe_batch([np.concatenate([first, second])])


def test_timestamp_rules(fake: fw.ScriptedWhisper) -> None:
    ts = fw.TIMESTAMP
    dec = WhisperDecoder(fake)
    opts = DecodeOptions(timestamps=True)
    # The script would start with text: the rules force a timestamp first.
    cross = fake.add(1, fw.Utt(fw.say_ids([*fw.text_ids("hi"), ts + 1])))
    [res] = dec.decode(cross, [DecodeRequest(language="en")], opts)
    assert res.timed[0] >= ts and res.text == ""  # text after a lone first stamp: none
    # A well-formed timed script comes through; text tokens and timed tokens apart.
    cross = fake.add(2, fw.Utt(fw.say_timed("hi")))
    [res] = dec.decode(cross, [DecodeRequest(language="en")], opts)
    assert res.text == "hi" and res.timed == (ts, *fw.text_ids("hi"), ts + 1)
    # Timestamps never go back: after <|0.02|> text, <|0.00|> is not allowed.
    cross = fake.add(3, fw.Utt(fw.say_ids([ts + 1, ord("a"), ts, ord("b")])))
    [res] = dec.decode(cross, [DecodeRequest(language="en")], opts)
    assert ts not in res.timed[1:]
    with pytest.raises(ValueError):
        dec.decode(cross, [DecodeRequest(language="en")],
                   DecodeOptions(timestamps=True, beam_size=2))


@pytest.mark.parametrize(
    ("timed", "last", "keep", "advance"),
    [
        # <|0|> a <|1.0|><|1.0|> b <|2.0|> end: ends on a lone stamp, keep all.
        ([0, 1, 50, 50, 2, 100], False, 6, 480000),
        # <|0|> a <|1.0|><|1.0|> b (cut by the window): seek to 1.0 s, drop "b".
        ([0, 1, 50, 50, 2], False, 3, 16000),
        ([0, 1, 50, 50, 2], True, 5, 480000),  # the last window keeps everything
        ([0, 1, 2], False, 3, 480000),  # no pair: the whole window
        ([1, 2], False, 2, 480000),  # no stamps at all
    ],
)
def test_long_audio_seeks_to_the_last_complete_segment(
        fake: fw.ScriptedWhisper, timed: list[int], last: bool, keep: int,
        advance: int) -> None:
    eng = WhisperEngine(fake)
    ts = eng.tok.special.timestamp_begin
    # Offsets >= 0 in ``timed`` below 10 are text tokens; others are timestamps.
    toks = [t + ts if t == 0 or t >= 50 else t for t in timed]
    got, adv = eng._complete_segments(toks, 480000, last)
    assert (len(got), adv) == (keep, advance)


def test_read_audio_file(tmp_path: Path) -> None:
    import wave

    x = (_tone(440, 0.5) * 32767).astype(np.int16)
    p = tmp_path / "a.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.repeat(x[::2], 2).tobytes())
    y = read_audio_file(p)
    assert y.dtype == np.float32 and abs(y.size - 8000) <= 1
    assert np.abs(y).max() == pytest.approx(0.3, abs=0.02)
    raw = tmp_path / "a.raw"
    raw.write_bytes(x.tobytes())
    np.testing.assert_allclose(read_audio_file(raw), x / 32768.0)


# -- the real models --------------------------------------------------------------------


@pytest.fixture
def whisper_base(whisper_engine: Callable[..., WhisperEngine]) -> WhisperEngine:
    return whisper_engine("base")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["base", "tiny.en"])
def test_goforward(whisper_engine: Callable[..., WhisperEngine], name: str) -> None:
    from tests import speech

    tr = whisper_engine(name).transcribe(speech.goforward(), start_ms=500.0)
    assert normalize_english(tr.text) == "go forward ten meters"
    assert tr.lang == "en" and tr.no_speech_prob < 0.5
    assert tr.start_ms == 500.0 and tr.end_ms == pytest.approx(500.0 + 2786.25)


@pytest.mark.slow
def test_language_detection_real(whisper_base: WhisperEngine) -> None:
    from tests import speech

    for _, audio, _ in speech.librivox()[:2]:
        assert whisper_base.detect_language(audio).lang == "en"
    de = speech.espeak("Guten Morgen, wie geht es Ihnen heute? Das Wetter ist schön.", "de")
    fr = speech.espeak("Bonjour, comment allez-vous aujourd'hui? Il fait très beau.", "fr")
    got_de = whisper_base.detect_language(de)
    got_fr = whisper_base.detect_language(fr)
    assert got_de.lang == "de", got_de.top
    assert got_fr.lang == "fr", got_fr.top


@pytest.mark.slow
def test_batch_of_three_equals_individual_real(whisper_base: WhisperEngine) -> None:
    from tests import speech

    clips = [speech.goforward(), speech.cards()[4][1], speech.librivox()[1][1]]
    single = [whisper_base.transcribe(c, language="en") for c in clips]
    batch = whisper_base.transcribe_batch([Utterance(c, language="en") for c in clips])
    assert [t.tokens for t in batch] == [t.tokens for t in single]


def test_transcribe_file_with_fake_engine(
    fake: fw.ScriptedWhisper, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asr.whisper import transcribe

    audio = (_tone(440, 1.0) * 32767).astype(np.int16)
    fake.add_audio(audio.astype(np.float32) / 32768.0, fw.Utt(fw.say("from file")))
    engine = WhisperEngine(fake)
    # transcribe_file looks get_engine up in its own module's namespace.
    monkeypatch.setattr(transcribe, "get_engine", lambda *a, **k: engine)
    raw = tmp_path / "clip.raw"
    raw.write_bytes(audio.tobytes())
    tr = transcribe.transcribe_file(raw, model="fake", beam=2)
    assert tr.text == "from file" and tr.beam_size == 2
    assert json.loads(json.dumps(tr.to_dict()))["lang"] == "en"


@pytest.mark.slow
def test_transcribe_file_real() -> None:
    from asr.whisper.transcribe import transcribe_file
    from tests import speech

    tr = transcribe_file(speech.TESTDATA / "goforward.raw", model="tiny.en")
    assert normalize_english(tr.text) == "go forward ten meters"
    d = tr.to_dict()
    assert d["model"] == "tiny.en" and d["rtf"] > 0 and d["timings"]["encode_ms"] > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_long_audio_keeps_the_words_at_the_window_boundary(
        whisper_engine: Callable[..., WhisperEngine]) -> None:
    """42 s: the five LibriVox clips then an espeak-ng list; 30 s falls inside the list.
    Measured (base, int8): independent 30 s windows 3.3 % WER (words at the boundary
    lost), seeking by the last complete segment 1.7 %; tiny.en 15 % and 5.8 %."""
    from tests import speech

    gap = np.zeros(4800, np.int16)
    listing = ("For the trip we need a tent, a stove, a lamp, a map, a rope, a knife, a pan, "
               "a cup, a plate, a spoon, a fork, a towel, a hat, a coat, a pair of boots "
               "and a pair of socks, and a bag to carry it all.")
    clips = [(a, t) for _, a, t in speech.librivox()] + [(speech.espeak(listing), listing)]
    x = np.concatenate([y for a, _ in clips for y in (a, gap)]).astype(np.float32) / 32768
    ref = " ".join(t for _, t in clips)
    assert 40 < x.size / 16000 < 45
    tr = whisper_engine("base").transcribe(x, language="en")
    assert word_errors(ref, tr.text).wer <= 0.03, tr.text
    # The words around 30 s are there, once.
    said = normalize_english(tr.text)
    assert said.count("a knife a pan a cup") == 1, said
