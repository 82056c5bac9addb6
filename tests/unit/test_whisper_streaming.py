"""Streaming partials: the local-agreement policy, the production partial path
(``WhisperBackend`` partial jobs shown through ``StablePartials``) on a scripted fake
model, and (slow) the real model on a recording."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asr.backend import Recognition
from asr.engine import PoolSpec, StablePartials, WhisperBackend
from asr.scheduler import Job
from asr.whisper.engine import WhisperEngine
from asr.whisper.normalize import normalize_english
from asr.whisper.streaming import (
    LocalAgreement,
    common_prefix_length,
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


def test_a_recheck_that_disagrees_cuts_the_stable_prefix_back() -> None:
    la = LocalAgreement(2, recheck_growth=1.5)
    assert not la.recheck_due(100)  # nothing stable
    la.update([1, 2, 4], unforced_at=10)
    assert la.update([1, 2, 4, 5], unforced_at=12) == ((1, 2, 4), (5,))
    assert not la.recheck_due(17) and la.recheck_due(18)
    # Forced decodes do not re-check: the schedule stays.
    assert la.update([1, 2, 4, 5, 6]) == ((1, 2, 4, 5), (6,))
    assert la.recheck_due(18)
    # An untrusted unforced decode (it hit its token limit) neither retracts nor confirms.
    assert la.update([1, 3, 3, 3], trusted=False, unforced_at=18) == ((1, 2, 4, 5), ())
    assert la.recheck_due(18)
    # One that agrees confirms: the next re-check is due at 1.5x this audio.
    # (the untrusted one restarted agreement: nothing new is stable yet).
    assert la.update([1, 2, 4, 5, 6, 7], unforced_at=20) == ((1, 2, 4, 5), (6, 7))
    assert not la.recheck_due(29) and la.recheck_due(30)
    # One that disagrees: back to what they share, and its own tail is shown.
    assert la.update([1, 2, 8, 9], unforced_at=30) == ((1, 2), (8, 9))
    assert la.retractions == 1 and not la.recheck_due(44)
    assert la.update([1, 2, 8, 9, 10]) == ((1, 2, 8, 9), (10,))  # agreement goes on
    la.reset()
    assert la.committed == () and not la.recheck_due(1000)
    with pytest.raises(ValueError):
        LocalAgreement(2, recheck_growth=1.0)


def test_a_retraction_ends_on_a_word_boundary() -> None:
    la = LocalAgreement(2, can_cut=lambda toks, k: k < len(toks) and toks[k] % 2 == 0,
                        recheck_growth=2)
    la.update([1, 3, 2, 5, 7], unforced_at=1)
    la.update([1, 3, 2, 5, 7, 9], unforced_at=1)
    assert la.committed == (1, 3)  # the cut before 2 (even)
    la.update([1, 3, 2, 5, 7, 4], unforced_at=1)
    assert la.committed == (1, 3, 2, 5, 7)
    # Shares (1, 3, 2, 5) with it, but a cut before 11 is not allowed: back to (1, 3).
    assert la.update([1, 3, 2, 5, 11, 6], unforced_at=2) == ((1, 3), (2, 5, 11, 6))


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


# -- the production partial path on the fake model -------------------------------------------------

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


def _backend(model: fw.ScriptedWhisper, **spec: object) -> WhisperBackend:
    """The production backend with one pool on the fake model (key ``("fake", "int8")``)."""
    pool = PoolSpec(model="fake", **spec)  # type: ignore[arg-type]
    return WhisperBackend(pools_spec={"p": pool}, default_pool="p",
                          _engines={("fake", "int8"): WhisperEngine(model)})


def _stream(backend: WhisperBackend, audio: np.ndarray, step: int,
            lang: str = "en") -> tuple[list[str], list[tuple[int, ...]]]:
    """What the server does for one utterance: a partial job every ``step`` samples of
    growing audio, forced with the policy's stable prefix, shown through the policy.

    Returns:
        The texts shown ("" = no partial sent) and the stable prefix after each.
    """
    policy = backend.partial_policy("p")
    assert isinstance(policy, StablePartials)
    shown, prefixes = [], []
    for end in range(step, audio.size + 1, step):
        job = Job("partial", "p", audio[:end], key=None,
                  options={"lang": lang, "prefix": policy.prefix_for(end)})
        [res] = backend.run_batch("p", [job])
        assert isinstance(res, Recognition)
        shown.append(policy.update(res))
        prefixes.append(policy.prefix)
    return shown, prefixes


def test_stable_partials_grow_and_never_retract(fake: fw.ScriptedWhisper) -> None:
    backend = _backend(fake, languages=("*",))
    shown, prefixes = _stream(backend, _tone(2.6), 1600)
    for a, b in itertools.pairwise(prefixes):
        assert b[: len(a)] == a  # stable tokens only grow
    tok = backend.engine("fake", "int8").tok
    for text, prefix in zip(shown, prefixes, strict=True):
        assert text.startswith(tok.decode(prefix).strip())
    assert tok.decode(prefixes[-1]).startswith("go forward")
    assert shown[-1] == SENTENCE
    final = backend.run_batch("p", [Job("final", "p", _tone(2.6), key=None,
                                        options={"lang": "en"})])[0]
    assert isinstance(final, Recognition) and final.text == SENTENCE


MISHEARD, HEARD = "How do you marry the more", "Had he married a more amiable woman"


def _misheard_early(n_frames: int) -> fw.Utt:
    """tiny.en on the start of a LibriVox clip: wrong on under 2 s, right after; the
    text revealed in proportion to the audio (3 s for all of it)."""
    text = MISHEARD if n_frames < 200 else HEARD
    return fw.Utt(fw.say(text[:n_frames * len(HEARD) // 300], p=0.95))


@pytest.mark.parametrize("recheck", [True, False])
def test_an_early_mishearing_is_retracted_by_a_recheck(tmp_path: Path, recheck: bool
                                                       ) -> None:
    model, _ = fw.make(tmp_path)
    model.by_frames = _misheard_early
    backend = _backend(model, languages=("*",))
    if not recheck:
        backend.partial_policy = lambda pool: StablePartials(  # type: ignore[method-assign]
            backend.engine("fake", "int8").tok, recheck_growth=None)
    shown, _ = _stream(backend, _tone(4.0), 4000)
    assert shown[6] == "How do you marry the"  # two decodes agreed on "How do you marry"
    if recheck:
        # Re-checked unforced as the audio grew 1.5x; the one at 2 s disagrees.
        assert all(s.startswith("Had he married a more") for s in shown[7:]), shown
    else:
        assert shown[-1].startswith("How do you marry"), shown  # forced to the end


def test_stable_prefix_is_forced_not_redecoded(fake: fw.ScriptedWhisper) -> None:
    backend = _backend(fake, languages=("*",))
    policy = backend.partial_policy("p")
    for sec in (1.5, 2.0):
        [r] = backend.run_batch("p", [Job("partial", "p", _tone(sec), key=None,
                                          options={"lang": "en", "prefix": policy.prefix})])
        policy.update(r)
    assert policy.prefix  # something became stable
    fake.calls.clear()
    [r] = backend.run_batch("p", [Job("partial", "p", _tone(2.5), key=None,
                                      options={"lang": "en", "prefix": policy.prefix})])
    assert isinstance(r, Recognition)
    # Second prompt call = language, task, notimestamps + the stable tokens.
    assert fake.calls[1].n == 3 + len(policy.prefix)
    # Then only the tail is generated, one step per token.
    assert len(fake.calls) == 2 + len(r.tokens) - len(policy.prefix)


def test_partial_window_has_a_margin_and_budget(fake: fw.ScriptedWhisper) -> None:
    backend = _backend(fake, languages=("*",), partial_margin_s=2.0, partial_min_window_s=4.0)
    for sec, frames in ((1.0, 400), (3.2, 600), (11.0, 1300), (29.0, 3000)):
        fake.encode_calls.clear()
        backend.run_batch("p", [Job("partial", "p", _tone(sec), key=None)])
        assert fake.encode_calls == [(1, 80, frames)], sec


def test_partials_of_a_batch_share_windows(fake: fw.ScriptedWhisper) -> None:
    backend = _backend(fake, languages=("*",), partial_margin_s=2.0, partial_min_window_s=4.0)
    fake.encode_calls.clear()
    jobs = [Job("partial", "p", _tone(s), key=None, options={"lang": "en"})
            for s in (1.0, 1.5, 6.0)]
    res = backend.run_batch("p", jobs)
    assert [isinstance(r, Recognition) and r.text for r in res] == [
        "go forward", "go forward ten", SENTENCE]
    # 1 s and 1.5 s pad to the 4 s minimum together; 6 s + 2 s margin runs alone.
    assert sorted(fake.encode_calls) == [(1, 80, 800), (2, 80, 400)]


@pytest.mark.parametrize("said", [".", "...", "Thank you.", " thanks for watching!",
                                  "you", "Bye."])
def test_unsupported_partials_are_suppressed(tmp_path: Path, said: str) -> None:
    model, _ = fw.make(tmp_path)
    model.by_frames = lambda n: fw.Utt(fw.say(said, p=0.95))
    backend = _backend(model, languages=("*",))
    [r] = backend.run_batch("p", [Job("partial", "p", _tone(1.0), key=None)])
    assert isinstance(r, Recognition) and r.text == "" and r.tokens == ()
    shown, _ = _stream(backend, _tone(1.5), 8000)
    assert shown == ["", "", ""]


def test_partial_on_no_speech_is_suppressed(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    # Whisper's no-speech rule: likely no-speech and an unsure decode.
    model.by_frames = lambda n: fw.Utt(fw.say("Hello there", p=0.3), no_speech=0.9)
    backend = _backend(model, languages=("*",))
    shown, _ = _stream(backend, _tone(1.0), 8000)
    assert shown == ["", ""]
    # The same text said confidently is shown.
    model.by_frames = lambda n: fw.Utt(fw.say("Hello there", p=0.95), no_speech=0.9)
    assert _stream(backend, _tone(1.0), 8000)[0][-1] == "Hello there"


def test_a_real_word_after_a_silence_phrase_is_shown(tmp_path: Path) -> None:
    model, _ = fw.make(tmp_path)
    model.by_frames = lambda n: fw.Utt(fw.say("thank you" if n < 100 else "thank you all"))
    backend = _backend(model, languages=("*",))
    shown, _ = _stream(backend, _tone(2.0), 8000)
    assert shown[0] == "" and shown[-1] == "thank you all"


@settings(max_examples=20, deadline=None)
@given(chunks=st.lists(st.integers(400, 12000), min_size=1, max_size=10))
def test_stream_never_retracts(tmp_path_factory: pytest.TempPathFactory,
                               chunks: Sequence[int]) -> None:
    model, _ = fw.make(tmp_path_factory.mktemp("s"))
    model.by_frames = _growing
    backend = _backend(model, languages=("*",))
    tok = backend.engine("fake", "int8").tok
    policy = backend.partial_policy("p")
    audio = _tone(sum(chunks) / 16000)
    end, prev = 0, ""
    for n in chunks:
        end += n
        [r] = backend.run_batch("p", [Job("partial", "p", audio[:end], key=None,
                                          options={"lang": "en", "prefix": policy.prefix})])
        assert isinstance(r, Recognition)
        text = policy.update(r)
        stable = tok.decode(policy.prefix).strip()
        assert stable.startswith(prev) and (not text or text.startswith(stable))
        prev = stable


# -- the real model -----------------------------------------------------------------------


@pytest.mark.slow
def test_stream_goforward_real(whisper_engine: Callable[..., WhisperEngine]) -> None:
    from tests import speech

    backend = WhisperBackend(
        pools_spec={"p": PoolSpec(model="tiny.en", languages=("en",))}, default_pool="p",
        _engines={("tiny.en", "int8"): whisper_engine("tiny.en")})
    audio = speech.goforward().astype(np.float32) / 32768
    shown, prefixes = _stream(backend, audio, 8000)
    assert len(shown) == audio.size // 8000
    for a, b in itertools.pairwise(prefixes):
        assert b[: len(a)] == a
    assert normalize_english(shown[-1]) == "go forward ten meters"


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
    backend = _backend(model, languages=("*",))
    shown, prefixes = _stream(backend, _tone(1.5), 8000)
    assert shown == ["ten"] * 3
    assert all(p == () for p in prefixes)
