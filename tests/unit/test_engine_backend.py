"""The Whisper backend on a scripted fake model: loop fallback for finals, token budgets,
windows sized to the audio, language normalisation and per-job isolation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from asr.backend import Recognition
from asr.engine import (
    PoolSpec,
    UnsupportedLanguage,
    WhisperBackend,
    load_pools,
    normalize_language,
    supported_text,
    window_frames,
)
from asr.scheduler import Job
from asr.whisper.engine import WhisperEngine
from asr.whisper.loops import compression_ratio, cut_loop, find_loop, repeated_ngrams
from asr.whisper.model import CrossKV
from asr.whisper.search import (
    DecodeOptions,
    DecodeRequest,
    FallbackPolicy,
    WhisperDecoder,
    token_budget,
)
from tests.data import fake_whisper as fw

GOOD = fw.text_ids("hello world")
LOOP = fw.text_ids("la ")


def _looping_unless_lucky(hist: tuple[int, ...]) -> dict[int, float]:
    """Greedy takes the loop (0.5 against 0.45 at the first token) and never stops; a
    sample that starts with "h" says "hello world" with confidence."""
    if not hist:
        return {LOOP[0]: np.log(0.5), GOOD[0]: np.log(0.45)}
    if hist[0] == GOOD[0]:
        k = len(hist)
        return {GOOD[k] if k < len(GOOD) else fw.EOT: np.log(0.97)}
    return {LOOP[len(hist) % len(LOOP)]: np.log(0.9999), fw.EOT: np.log(1e-4)}


def _unsure(text: str) -> fw.Script:
    """Spells ``text`` at 0.3 a token, the rest spread over four other letters."""
    ids = fw.text_ids(text)

    def script(hist: tuple[int, ...]) -> dict[int, float]:
        want = ids[len(hist)] if len(hist) < len(ids) else fw.EOT
        return {want: np.log(0.3), **{ord(c): np.log(0.175) for c in "vwxz"}}

    return script


def _always_loops(hist: tuple[int, ...]) -> dict[int, float]:
    return {LOOP[len(hist) % len(LOOP)]: 0.0}


def _tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _backend(model: fw.ScriptedWhisper, **spec: object) -> WhisperBackend:
    pool = PoolSpec(model="fake", **spec)  # type: ignore[arg-type]
    return WhisperBackend(pools_spec={"p": pool}, default_pool="p",
                          _engines={("fake", "int8"): WhisperEngine(model)})


def _final(audio: np.ndarray, lang: str | None = "en", **opts: object) -> Job:
    options: dict[str, object] = {"lang": lang} if lang is not None else {}
    options.update(opts)
    return Job("final", "p", audio, key=None, options=options)


# -- loops --------------------------------------------------------------------------------


def test_compression_ratio_tells_loops() -> None:
    assert compression_ratio("") == 0.0
    assert compression_ratio("He was not an ill-disposed young man.") < 1.5
    looped = "We shall fight on the beaches. " * 12
    assert compression_ratio(looped) > 2.4


@pytest.mark.parametrize(
    ("tokens", "want", "cut"),
    [
        ([9, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], [9, 1, 2, 3], True),
        ([1, 2, 3, 1, 2, 3], [1, 2, 3, 1, 2, 3], False),  # two copies: not a loop
        ([5, 5, 5], [5, 5, 5], False),  # "five five five" is speech
        ([5] * 6, [5], True),
        ([4, 7, *range(10, 18), *range(10, 18), *range(10, 18), 1], [4, 7, *range(10, 18)],
         True),  # a whole sentence said three times
        ([], [], False),
    ],
)
def test_cut_loop(tokens: list[int], want: list[int], cut: bool) -> None:
    assert cut_loop(tokens) == (tuple(want), cut)
    assert (find_loop(tokens) is not None) == cut


def test_repeated_ngrams() -> None:
    words = ["we", "shall", "fight", "we", "shall", "fight", "we", "shall", "fight", "on"]
    assert repeated_ngrams(words, 3) == {("we", "shall", "fight"): 3}
    assert repeated_ngrams(words, 4) == {}


# -- fallback in the decoder --------------------------------------------------------------


def test_fallback_picks_the_non_looping_decode(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    cross = model.add(1, fw.Utt(_looping_unless_lucky))
    dec = WhisperDecoder(model)
    req = DecodeRequest(language="en", max_new_tokens=30, seed=7)
    [greedy] = dec.decode(cross, [req])
    assert greedy.text.startswith("la la la") and not greedy.finished
    sampling = FallbackPolicy(retry_beam=1)
    [res] = dec.decode_with_fallback(cross, [req], policy=sampling)
    assert res.text == "hello world" and res.finished
    assert res.temperature > 0 and not res.loop_cut
    # Seeded: the same request always gives the same answer, alone or in a batch.
    assert dec.decode_with_fallback(cross, [req], policy=sampling) == [res]
    # The default retries with beam search first (here its finished hypotheses are
    # short loops, unsure at the end: they fail too), then samples.
    [beam] = dec.decode_with_fallback(cross, [req])
    assert beam.text == "hello world"
    other = model.add(2, fw.Utt(fw.say("ok")))
    both = CrossKV(np.concatenate([other.k, cross.k], axis=1),
                      np.concatenate([other.v, cross.v], axis=1))
    got = dec.decode_with_fallback(both, [DecodeRequest(language="en"), req], policy=sampling)
    assert [r.text for r in got] == ["ok", "hello world"]
    assert got[0].temperature == 0.0


def test_fallback_last_resort_cuts_the_loop(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    cross = model.add(1, fw.Utt(_always_loops))
    dec = WhisperDecoder(model)
    model.calls.clear()
    [res] = dec.decode_with_fallback(cross, [DecodeRequest(language="en", max_new_tokens=20)],
                                     policy=FallbackPolicy(temperatures=(0.0, 0.5), best_of=2,
                                                           retry_beam=1))
    assert res.loop_cut and res.text == "la "
    # One greedy pass, then one pass of 2 samples: rows 1, then 2.
    assert {c.rows for c in model.calls} == {1, 2}


def test_good_and_silent_decodes_are_not_retried(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    good = model.add(1, fw.Utt(fw.say("fine", p=0.95)))
    dec = WhisperDecoder(model)
    model.calls.clear()
    [res] = dec.decode_with_fallback(good, [DecodeRequest(language="en")])
    assert res.text == "fine" and res.temperature == 0.0
    assert len(model.calls) == 2 + 4  # prompt in two calls, then one per letter
    # Whisper's no-speech rule: unsure text on audio it calls silence is not retried.
    silent = model.add(2, fw.Utt(_unsure("thank you"), no_speech=0.9))
    model.calls.clear()
    [res] = dec.decode_with_fallback(silent, [DecodeRequest(language="en")])
    assert res.temperature == 0.0 and len(model.calls) == 2 + len("thank you")


def test_sampling_options_are_validated(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    cross = model.add(1, fw.Utt(fw.say("x")))
    dec = WhisperDecoder(model)
    for bad in (DecodeOptions(temperature=-0.1), DecodeOptions(temperature=0.5, beam_size=2),
                DecodeOptions(timestamps=True, beam_size=3)):
        with pytest.raises(ValueError):
            dec.decode(cross, [DecodeRequest(language="en")], bad)
    for policy in (FallbackPolicy(best_of=0), FallbackPolicy(retry_beam=0),
                   FallbackPolicy(temperatures=()), FallbackPolicy(temperatures=(0.0, 3.0))):
        with pytest.raises(ValueError):
            dec.decode_with_fallback(cross, [DecodeRequest(language="en")], policy=policy)


# -- finals through the backend -----------------------------------------------------------


def test_backend_final_falls_back_and_keeps_the_budget(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    model.by_frames = lambda n: fw.Utt(_looping_unless_lucky)
    backend = _backend(model, languages=("*",))
    [res] = backend.run_batch("p", [_final(_tone(1.0))])
    assert isinstance(res, Recognition) and res.text == "hello world"
    model.by_frames = lambda n: fw.Utt(_always_loops)
    [res] = backend.run_batch("p", [_final(_tone(1.0))])
    assert isinstance(res, Recognition) and res.text == "la"
    # The budget: 1 s of audio may produce at most token_budget(16000) tokens, whatever
    # the decoder wants; every decode of the fallback respects it.
    budget = token_budget(16000)
    assert budget == 18
    steps = [c for c in model.calls if c.n == 1 and c.p > 0]
    assert max(c.p for c in steps) <= 3 + 1 + budget  # SOT seq + tokens so far


def test_token_budget() -> None:
    assert token_budget(0) == 10
    assert token_budget(16000) == 18
    assert token_budget(16000 * 20) == 170
    assert token_budget(16000 * 30) == 224  # Whisper's cap


def test_final_windows_are_sized_to_the_audio(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    model.by_frames = lambda n: fw.Utt(fw.say("ok"))
    backend = _backend(model, languages=("*",), final_margin_s=5.0, final_min_window_s=8.0)
    model.encode_calls.clear()
    res = backend.run_batch("p", [_final(_tone(s)) for s in (1.0, 20.0, 2.5)])
    assert all(isinstance(r, Recognition) and r.text == "ok" for r in res)
    # 1 s and 2.5 s share the 8 s minimum; 20 s gets 5 s of margin.
    assert sorted(model.encode_calls) == [(1, 80, 2500), (2, 80, 800)]


def test_finals_longer_than_a_window_are_not_cut(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    first, second = _tone(30.0), _tone(5.0, 600.0)
    model.add_audio(first, fw.Utt(fw.say_timed("first")))
    model.add_audio(second, fw.Utt(fw.say_timed("second")))
    backend = _backend(model, languages=("*",))
    [res] = backend.run_batch("p", [_final(np.concatenate([first, second]))])
    assert isinstance(res, Recognition) and res.text == "first second"


@pytest.mark.parametrize(
    ("seconds", "margin", "low", "frames"),
    [(1.0, 5.0, 8.0, 800), (3.0, 5.0, 8.0, 800), (3.2, 5.0, 8.0, 900), (20.0, 5.0, 8.0, 2500),
     (24.9, 5.0, 8.0, 3000), (29.0, 5.0, 8.0, 3000), (40.0, 5.0, 8.0, 3000),
     (1.234, 0.0, 1.0, 200), (0.0, 2.0, 4.0, 400), (10.0, 0.0, 30.0, 3000)],
)
def test_window_frames(seconds: float, margin: float, low: float, frames: int) -> None:
    got = window_frames(int(seconds * 16000), margin, low)
    assert got == frames and got % 2 == 0
    assert got * 160 >= min(int(seconds * 16000), 480000)  # the audio always fits


# -- languages and isolation --------------------------------------------------------------


@pytest.mark.parametrize(("code", "want"), [
    ("en", "en"), ("en-US", "en"), ("EN_us", "en"), (" de-DE ", "de"), ("zh-Hant-TW", "zh"),
    ("haw", "haw"), ("auto", "auto"), ("", "auto"), (None, "auto"), ("AUTO", "auto"),
])
def test_normalize_language(code: str | None, want: str) -> None:
    assert normalize_language(code) == want


@pytest.mark.parametrize("code", ["xx", "english", "e", "en/US", "-en", "12"])
def test_unknown_language_is_refused(code: str) -> None:
    with pytest.raises(UnsupportedLanguage) as info:
        normalize_language(code)
    assert isinstance(info.value, ValueError)


def test_a_bad_language_fails_only_its_job(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    model.by_frames = lambda n: fw.Utt(fw.say("hi there"))
    backend = _backend(model, languages=("*",))
    jobs = [_final(_tone(1.0), "en"), _final(_tone(1.1), "xx"), _final(_tone(1.2), "en-US"),
            Job("partial", "p", _tone(1.3), key=None, options={"lang": "EN_us"}),
            Job("partial", "p", _tone(1.4), key=None, options={"lang": "zz-ZZ"}),
            Job("lid", "p", _tone(1.0), key=None)]
    res = backend.run_batch("p", jobs)
    assert [type(r).__name__ for r in res] == [
        "Recognition", "UnsupportedLanguage", "Recognition", "Recognition",
        "UnsupportedLanguage", "LidResult"]
    assert [r.text for r in res if isinstance(r, Recognition)] == ["hi there"] * 3
    assert "xx" in str(res[1])


def test_any_failing_job_fails_alone(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    model.by_frames = lambda n: fw.Utt(fw.say("hi"))
    backend = _backend(model, languages=("*",))
    broken = np.zeros((2, 8000), np.float32)  # not 1-D: the engine refuses it
    res = backend.run_batch("p", [_final(_tone(1.0)), _final(broken), _final(_tone(2.0))])
    assert isinstance(res[0], Recognition) and isinstance(res[2], Recognition)
    assert isinstance(res[1], ValueError) and "1-D" in str(res[1])
    assert [type(r).__name__ for r in backend.run_batch("p", [Job("other", "p", _tone(1.0),
                                                                  key=None)])] == ["ValueError"]


def test_english_only_model_refuses_other_languages(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path, multilingual=False)
    model.by_frames = lambda n: fw.Utt(fw.say("hi"))
    pool = PoolSpec(model="fake.en", languages=("en",))
    backend = WhisperBackend(pools_spec={"p": pool}, default_pool="p",
                             _engines={("fake.en", "int8"): WhisperEngine(model)})
    res = backend.run_batch("p", [_final(_tone(1.0), "de"), _final(_tone(1.0), "en-GB"),
                                  _final(_tone(1.0), None)])
    assert isinstance(res[0], UnsupportedLanguage)
    assert [r.text for r in res[1:] if isinstance(r, Recognition)] == ["hi", "hi"]


def test_select_pool_normalises_hints(tmp_path: Path) -> None:
    backend = WhisperBackend()
    assert backend.select_pool("en-US", "default") == "en"
    assert backend.select_pool("EN", "") == "en"
    assert backend.select_pool("de-AT", "") == "multi"
    assert backend.select_pool("xx", "") is None
    assert backend.select_pool("auto", "") == "multi"


def test_silence_phrases() -> None:
    for text in (".", "", " ... ", "Thank you.", "thanks for watching!", "You", "Bye."):
        assert not supported_text(text), text
    for text in ("Okay.", "Thank you all.", "Go", "5"):
        assert supported_text(text), text


# -- configuration ------------------------------------------------------------------------


def test_pool_spec_windows_are_validated() -> None:
    spec = PoolSpec(final_margin_s=3.0, final_min_window_s=5.0)
    assert (spec.final_margin_s, spec.final_min_window_s) == (3.0, 5.0)
    legacy = PoolSpec(final_window_s=15.0, partial_window_s=10.0)
    assert legacy.final_min_window_s == 15.0 and legacy.partial_min_window_s == 10.0
    assert replace(legacy, final_min_window_s=6.0).final_min_window_s == 6.0
    assert replace(legacy, final_margin_s=1.0).final_min_window_s == 15.0
    assert PoolSpec(final_window_s=15.0, final_min_window_s=6.0).final_window_s == 6.0
    for bad in ({"final_margin_s": -1.0}, {"partial_margin_s": 31.0},
                {"final_min_window_s": 0.5}, {"partial_min_window_s": 40.0}):
        with pytest.raises(ValueError):
            PoolSpec(**bad)  # type: ignore[arg-type]


def test_load_pools_reads_margins(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text('default = "en"\n[pools.en]\nmodel = "base"\nlanguages = ["en"]\n'
                    "final_margin_s = 4.0\nfinal_min_window_s = 6.0\n"
                    "partial_margin_s = 3.0\npartial_min_window_s = 5.0\n")
    pools, default = load_pools(path)
    spec = pools[default]
    assert (spec.final_margin_s, spec.final_min_window_s, spec.partial_margin_s,
            spec.partial_min_window_s) == (4.0, 6.0, 3.0, 5.0)
    path.write_text('[pools.en]\nmodel = "base"\nfinal_margin_s = -2.0\n')
    with pytest.raises(ValueError, match=r"pool 'en'.*final_margin_s"):
        load_pools(path)
    path.write_text('[pools.en]\nmodel = "base"\nfinal_margin = 2.0\n')
    with pytest.raises(ValueError, match="pool 'en'"):
        load_pools(path)


def test_degraded_finals_run_on_the_pools_faster_model(tmp_path: Path) -> None:
    """A final the scheduler marked ``degraded`` runs on the pool's partial model; the
    others of the same batch on the pool's own model."""
    slow, _ = fw.make(tmp_path / "slow")
    slow.by_frames = lambda n: fw.Utt(fw.say("slow"))
    fast, _ = fw.make(tmp_path / "fast")
    fast.by_frames = lambda n: fw.Utt(fw.say("fast"))
    pool = PoolSpec(model="fake", languages=("en",), partial_model="fake.en")
    backend = WhisperBackend(pools_spec={"p": pool}, default_pool="p",
                             _engines={("fake", "int8"): WhisperEngine(slow),
                                       ("fake.en", "int8"): WhisperEngine(fast)})
    res = backend.run_batch("p", [_final(_tone(1.0)), _final(_tone(1.0), degraded=True)])
    assert [r.text for r in res if isinstance(r, Recognition)] == ["slow", "fast"]


def test_which_pools_may_degrade() -> None:
    from asr.backend import degradable_pools, degrade_model
    from asr.engine import DEFAULT_POOLS, WhisperBackend

    assert degrade_model("base", "tiny.en", ("en",)) == "tiny.en"
    assert degrade_model("base", "tiny.en", ("*",)) is None  # English-only: en pools only
    assert degrade_model("base", "tiny", ("*",)) == "tiny"
    assert degrade_model("base", None, ("en",)) is None
    assert degrade_model("base", "base", ("en",)) is None
    described = WhisperBackend(pools_spec=dict(DEFAULT_POOLS), default_pool="multi").describe()
    assert degradable_pools(described) == frozenset({"en"})
