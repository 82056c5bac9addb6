"""The pure parts of bench/e2e_latency.py: percentiles that count misses, matching
results to ground-truth utterances, and the material's plan."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import material as mat
from bench.common import Hyp, match_utterances, pct_with_misses


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([100.0, 200.0, 300.0, 400.0], 50, 200.0),
        ([100.0, 200.0, 300.0, 400.0], 95, 400.0),
        ([100.0, 200.0, 300.0, None], 50, 200.0),
        ([100.0, 200.0, 300.0, None], 95, math.inf),  # the miss is the worst value
        ([None, None, 50.0], 50, math.inf),
        ([7.0], 0, 7.0),
        (list(range(1, 101)) + [None] * 4, 95, 99.0),  # 4 % misses stay under p95...
        (list(range(1, 101)) + [None] * 6, 95, math.inf),  # ...6 % do not
    ],
)
def test_percentile_counts_misses_as_infinite(values: list[float | None], q: float,
                                              expected: float) -> None:
    assert pct_with_misses(values, q) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(pct_with_misses([], 50))


def sent_at(t_s: float) -> float:
    """A client that sent stream time t at wall time 100 + t."""
    return 100.0 + t_s


def test_partials_and_finals_are_matched_by_audio_span() -> None:
    spans = [(1.0, 3.0), (5.0, 6.0)]
    hyps = [
        Hyp(False, 0.7, 1.4, "he", 101.3),  # 300 ms after the onset was sent
        Hyp(False, 0.7, 2.0, "he might", 101.8),
        Hyp(False, 0.7, 2.6, "he might even", 102.4),
        Hyp(True, 0.7, 3.4, "he might even be", 104.1),  # 1.1 s after the end was sent
        Hyp(False, 4.8, 5.5, "four", 105.9),
        Hyp(True, 4.8, 6.2, "four queen", 106.8),
    ]
    a, b = match_utterances(spans, hyps, sent_at)
    assert a.first_partial_ms == pytest.approx(300)
    assert a.final_ms == pytest.approx(1100)
    assert a.partial_gaps_ms == pytest.approx((500, 600))
    assert a.partial_before_final
    assert b.first_partial_ms == pytest.approx(900)
    assert b.final_ms == pytest.approx(800)
    assert b.partial_gaps_ms == ()


def test_missing_partial_and_final_are_misses() -> None:
    spans = [(1.0, 2.0), (4.0, 5.0)]
    hyps = [Hyp(True, 0.8, 2.1, "one", 102.9)]  # a final without a partial
    a, b = match_utterances(spans, hyps, sent_at)
    assert a.first_partial_ms is None
    assert not a.partial_before_final
    assert a.final_ms == pytest.approx(900)
    assert (b.first_partial_ms, b.final_ms, b.partial_before_final) == (None, None, False)


def test_a_result_from_before_the_onset_is_not_credited() -> None:
    # A previous utterance's partial whose span grazes the next onset, received before
    # that onset was even sent, cannot be the next utterance's first partial.
    spans = [(3.0, 4.0)]
    hyps = [Hyp(False, 1.0, 3.2, "old", 102.5), Hyp(False, 2.9, 3.5, "new", 103.7)]
    (u,) = match_utterances(spans, hyps, sent_at)
    assert u.first_partial_ms == pytest.approx(700)


def test_split_utterance_is_final_when_its_end_is_covered() -> None:
    # The system cut one utterance in two: its final is the one that reaches its end.
    spans = [(1.0, 6.0)]
    hyps = [Hyp(False, 1.0, 2.0, "a", 101.5), Hyp(True, 1.0, 3.0, "a b", 104.0),
            Hyp(True, 3.5, 6.1, "c d", 107.0)]
    (u,) = match_utterances(spans, hyps, sent_at)
    assert u.final_ms == pytest.approx(1000)


def test_final_that_never_reaches_the_end_takes_the_last_overlapping_one() -> None:
    spans = [(1.0, 6.0)]
    hyps = [Hyp(True, 1.0, 3.0, "a b", 104.0), Hyp(True, 3.0, 5.0, "c", 106.5)]
    (u,) = match_utterances(spans, hyps, sent_at)
    assert u.final_ms == pytest.approx(500)


def clip(name: str, speech_s: float, text: str) -> mat.Clip:
    """Half a second of quiet, speech_s of tone, half a second of quiet."""
    q = np.zeros(8000, np.int16)
    tone = (8000 * np.sin(np.arange(int(speech_s * mat.SR)) / 5)).astype(np.int16)
    return mat.Clip(name, np.concatenate([q, tone, q]), text, 8000, 8000 + len(tone))


def test_plan_places_every_utterance_where_its_speech_is() -> None:
    clips = [clip("a", 1.0, "alpha"), clip("b", 2.0, "bravo charlie")]
    m = mat.plan(clips, min_duration_s=30, seed=3)
    assert m.duration_s >= 30
    again, other = (mat.plan(clips, min_duration_s=30, seed=s) for s in (3, 4))
    assert np.array_equal(again.audio, m.audio) and again.utterances == m.utterances
    assert other.utterances[0].onset != m.utterances[0].onset  # sessions not in lockstep
    loud = np.abs(m.audio.astype(np.int32)) > 1000
    for u in m.utterances:
        assert loud[u.onset:u.onset + 160].any()  # speech starts at the onset...
        assert not loud[u.onset - 400:u.onset - 40].any()  # ...not before
        assert loud[u.end - 160:u.end].any()
        assert not loud[u.end + 40:u.end + 400].any()
    gaps = [b.onset - a.end for a, b in zip(m.utterances, m.utterances[1:], strict=False)]
    assert min(gaps) >= mat.MERGE_GAP_S * mat.SR  # closer clips were merged
    words = sum(len(u.text.split()) for u in m.utterances)
    assert words == len(m.reference.split())
    assert not loud[-int(mat.TAIL_S * mat.SR):].any()


def test_merge_joins_clips_closer_than_the_gap() -> None:
    spans = [(0, 100, "a"), (150, 300, "b"), (1000, 1100, "c")]
    got = mat.merge(spans, gap=100)
    assert [(u.onset, u.end, u.text) for u in got] == [(0, 300, "a b"), (1000, 1100, "c")]
    assert [u.index for u in got] == [0, 1]


def test_plan_rejects_nothing_to_play() -> None:
    with pytest.raises(ValueError):
        mat.plan([], min_duration_s=10, seed=0)


def test_send_time_is_the_send_of_the_chunk_holding_the_sample() -> None:
    from bench.e2e_latency import SessionLog

    log = SessionLog(sent_at=[10.0, 10.02, 10.05, 10.06])  # 20 ms chunks, one late
    assert log.send_time(0.0) == 10.0
    assert log.send_time(0.019) == 10.0
    assert log.send_time(0.045) == 10.05  # sample 720 is in chunk 2
    assert log.send_time(9.0) == 10.06  # past what was sent: the last send


def test_capacity_is_the_most_sessions_within_the_final_p95_bound() -> None:
    from bench.e2e_latency import CAPACITY_FINAL_P95_MS, capacity

    def row(n: int, p95: float) -> dict[str, object]:
        return {"lang": "en", "sessions": n, "voxgate": {"final_p95_ms": p95}}

    ok, over = CAPACITY_FINAL_P95_MS - 1, CAPACITY_FINAL_P95_MS + 1
    rows = [row(1, ok), row(4, ok), row(8, over), row(16, math.inf)]
    assert capacity(rows, "voxgate", "en") == 4
    assert capacity(rows, "voxgate", "auto") == 0
    assert capacity([row(1, math.inf)], "voxgate", "en") == 0
