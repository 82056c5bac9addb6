"""The language-ID planner: when it asks, what it sends, when an answer is the decision."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.lid import LidDecision, LidPlanner, LidRequest

SR = 16000


def speech(seconds: float, start: int = 0) -> np.ndarray:
    n = int(seconds * SR)
    return ((np.arange(start, start + n) % 2000) - 1000).astype(np.int16)


def test_asks_at_the_first_checkpoint_and_a_sure_answer_decides() -> None:
    p = LidPlanner(3.0, 0.7, checkpoints_s=(1.0, 2.0))
    assert p.speech(speech(0.98)) is None
    req = p.speech(speech(0.04))
    assert isinstance(req, LidRequest) and req.speech_ms == 1020 and not req.last
    # under 2 s of speech, 0.8 is not enough: the answer must reach 0.95
    assert p.answer("zh", 0.86, [("zh", 0.86), ("fr", 0.05)]) is None
    req = p.speech(speech(1.0))
    assert isinstance(req, LidRequest) and req.speech_ms == 2020
    d = p.answer("de", 0.83, [("de", 0.83), ("nl", 0.03)])
    assert isinstance(d, LidDecision) and d.lang == "de" and d.sure and d.speech_ms == 2020
    assert p.done and p.speech(speech(3)) is None and p.pause() is None


def test_unsure_answers_ask_again_and_the_whole_window_is_final() -> None:
    p = LidPlanner(3.0, 0.7, checkpoints_s=(1.0, 2.0))
    first = p.speech(speech(1.0))
    assert first is not None
    assert p.speech(speech(1.5)) is None  # 2 s passed while in flight: due
    nxt = p.answer("en", 0.4)
    assert isinstance(nxt, LidRequest) and nxt.speech_ms == 2500
    assert p.answer("en", 0.5) is None  # not sure, nothing new: wait for speech
    last = p.speech(speech(5.0))  # only 0.5 s more is taken: the window is full
    assert isinstance(last, LidRequest) and last.last and last.speech_ms == 3000
    d = p.answer("en", 0.55)
    assert isinstance(d, LidDecision) and d.lang == "en" and not d.sure


def test_the_window_decision_pools_answers_weighted_by_speech() -> None:
    # What Whisper base said on synthetic German at 1, 2 and 3 s of speech.
    p = LidPlanner(3.0, 0.8, checkpoints_s=(1.0, 2.0))
    assert p.speech(speech(1.0)) is not None
    assert p.answer("en", 0.57, [("en", 0.57), ("de", 0.20)]) is None
    assert p.speech(speech(1.0)) is not None
    assert p.answer("de", 0.37, [("de", 0.37), ("en", 0.28)]) is None
    assert p.speech(speech(1.0)) is not None
    d = p.answer("de", 0.79, [("de", 0.79), ("en", 0.03)])
    assert isinstance(d, LidDecision) and d.lang == "de" and not d.sure
    assert d.score == pytest.approx((0.20 * 1 + 0.37 * 2 + 0.79 * 3) / 6)
    assert d.speech_ms == 3000 and d.top[0][0] == "de"


def test_pause_asks_with_short_speech_and_finish_decides_on_the_best() -> None:
    p = LidPlanner(3.0, 0.9, checkpoints_s=(1.0, 2.0))
    assert p.speech(speech(0.3)) is None
    assert p.pause() is None  # under min_speech
    p.speech(speech(0.4))
    req = p.pause()
    assert req is not None and req.speech_ms == 700
    assert p.answer("fr", 0.6) is None
    d = p.finish()
    assert isinstance(d, LidDecision) and d.lang == "fr" and d.score == 0.6


def test_finish_asks_a_last_time_and_failure_ends_lid() -> None:
    p = LidPlanner(3.0, 0.7, checkpoints_s=(1.0, 2.0))
    p.speech(speech(0.6))
    req = p.finish()
    assert isinstance(req, LidRequest) and req.last
    assert p.error() is None and p.failed and p.done


def test_finish_while_in_flight_makes_that_answer_final() -> None:
    p = LidPlanner(3.0, 0.99, checkpoints_s=(1.0, 2.0))
    assert p.speech(speech(1.2)) is not None
    assert p.finish() is None
    d = p.answer("es", 0.5)
    assert isinstance(d, LidDecision) and d.lang == "es"


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.integers(1, 12000), min_size=1, max_size=40),
       scores=st.lists(st.floats(0, 1), min_size=1, max_size=10),
       first_n=st.floats(0.5, 5))
def test_requests_are_prefixes_of_the_speech_and_never_exceed_the_window(
        chunks: list[int], scores: list[float], first_n: float) -> None:
    p = LidPlanner(first_n, 0.8)
    fed: list[np.ndarray] = []
    pos = 0
    answers = iter(scores)
    pending: LidRequest | None = None
    for n in chunks:
        x = speech(n / SR, pos)
        pos += n
        fed.append(x)
        got = p.speech(x)
        if got is not None:
            assert pending is None
            pending = got
        if pending is not None:
            whole = np.concatenate(fed)
            assert len(pending.pcm) <= p.limit
            assert np.array_equal(pending.pcm, whole[: len(pending.pcm)])
            score = next(answers, 0.9)
            out = p.answer("en", score)
            pending = out if isinstance(out, LidRequest) else None
            if isinstance(out, LidDecision):
                assert score >= 0.8 or out.speech_ms * SR // 1000 >= p.limit - 16
    if not p.done and pending is None:
        out = p.finish()
        if isinstance(out, LidRequest):
            assert isinstance(p.answer("en", 0.1), LidDecision)
    # whatever happened, a session with enough speech ends with a decision
    if pos >= p.min_speech:
        assert p.done


def test_finish_while_in_flight_asks_once_more_when_speech_came_after() -> None:
    p = LidPlanner(3.0, 0.9)  # default checkpoint: 2 s, then the 3 s window
    assert p.speech(speech(1.0)) is None
    first = p.speech(speech(1.2))
    assert first is not None and first.speech_ms == 2200
    assert p.speech(speech(0.5)) is None  # in flight
    assert p.finish() is None
    again = p.answer("de", 0.4)
    assert isinstance(again, LidRequest) and again.last and again.speech_ms == 2700
    d = p.answer("de", 0.6)
    assert isinstance(d, LidDecision) and d.lang == "de" and d.speech_ms == 2700
