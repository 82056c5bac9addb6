"""The scheduler's policy, sans-IO, on a fake clock (seconds passed in by the test)."""

from __future__ import annotations

import numpy as np
import pytest

from asr.scheduler import Job, SchedulerBusy, SchedulerCore, SchedulerPolicy

AUDIO = np.zeros(16000, np.float32)  # 1 s


def job(kind: str, key: object = "s", utt: int = 0, pool: str = "p") -> Job:
    return Job(kind, pool, AUDIO, key=key, utterance=utt)


def core(**kw: int) -> SchedulerCore:
    return SchedulerCore(SchedulerPolicy(**kw))


def run(c: SchedulerCore, now: float, cost_s: float = 0.1) -> list[Job]:
    """Take one batch and complete it ``cost_s`` later with a result per job."""
    taken = c.next_batch(now)
    assert taken is not None
    _, batch = taken
    c.complete(batch, [f"r{i}" for i in range(len(batch))], now + cost_s, cost_s)
    return batch


def test_priority_lid_then_finals_then_first_partial_then_later_partials() -> None:
    c = core(max_batch=1)
    later = job("partial", "a")
    c.submit(later, 0.0)
    run(c, 0.0)  # a's first partial runs; its next one is a later partial
    later = job("partial", "a")
    first = job("partial", "b")
    final = job("final", "c")
    lid = job("lid", "d")
    for t, j in enumerate([later, first, final, lid]):
        c.submit(j, 0.2 + t * 0.01)
    assert not later.first and first.first
    order = [run(c, 0.3)[0] for _ in range(4)]
    assert order == [lid, final, first, later]
    assert c.next_batch(1.0) is None


def test_finals_oldest_deadline_first_and_only_one_pool_per_batch() -> None:
    c = core()
    f1, f2, f3 = job("final", "a"), job("final", "b", pool="q"), job("final", "c")
    c.submit(f1, 0.0)
    c.submit(f2, 0.1)
    c.submit(f3, 0.2)
    assert run(c, 0.3) == [f1, f3]
    assert run(c, 0.4) == [f2]


def test_first_partial_jumps_ahead_of_older_later_partials() -> None:
    c = core(max_batch=1)
    for key in ("a", "b", "c"):
        c.submit(job("partial", key), 0.0)
        run(c, 0.0)
    olds = [job("partial", k) for k in ("a", "b", "c")]
    for j in olds:
        c.submit(j, 0.2)
    fresh = job("partial", "d")
    c.submit(fresh, 0.25)
    assert run(c, 0.3) == [fresh]


def test_later_partials_do_not_ride_along_with_finals() -> None:
    c = core()
    c.submit(job("partial", "a"), 0.0)
    run(c, 0.0)
    later, final, first = job("partial", "a"), job("final", "b"), job("partial", "c")
    c.submit(later, 0.2)
    c.submit(final, 0.2)
    c.submit(first, 0.2)
    assert run(c, 0.3) == [final, first]
    assert run(c, 0.5) == [later]


def test_partials_never_starve_under_a_steady_stream_of_finals() -> None:
    """Finals arrive faster than the engine clears them (0.15 s each, one every 0.1 s),
    forever. Every utterance still gets a partial within the max gap (plus one batch)."""
    gap_ms, cost = 1000, 0.15
    c = core(max_batch=1, partial_max_gap_ms=gap_ms, max_queued=10_000)
    streams = ["a", "b", "c"]
    last_partial = {}
    now, next_final, n = 0.0, 0.0, 0
    for k in streams:
        c.submit(job("partial", k), now)
        last_partial[k] = now
    worst = 0.0
    while now < 30.0:
        while next_final <= now:
            c.submit(job("final", f"f{n}"), next_final)
            n, next_final = n + 1, next_final + 0.1
        taken = c.next_batch(now)
        assert taken is not None
        _, batch = taken
        now += cost
        c.complete(batch, ["x"] * len(batch), now, cost)
        for j in batch:
            if j.kind == "partial":
                worst = max(worst, now - last_partial[j.key])
                last_partial[j.key] = now
                c.submit(job("partial", j.key), now)  # the stream keeps growing
    assert all(now - t <= gap_ms / 1000 + 2 * cost for t in last_partial.values())
    # the gap, plus the batches ahead of it: starving partials and due finals take
    # turns, so each other stream's partial and a final for each may come first
    assert worst <= gap_ms / 1000 + 2 * len(streams) * cost
    stats = c.statistics()
    assert stats.starved_promotions > 0
    assert stats.jobs_done > 200


def test_finals_do_not_starve_when_every_partial_is_starving() -> None:
    """Past capacity (3 s a batch) every partial starves; the due finals still get at
    least every other batch, so the partials' cadence stretches, not the finals'."""
    cost = 3.0
    c = core(max_batch=1, partial_max_gap_ms=1000, max_queued=10_000)
    now = 0.0
    for k in "abcd":
        c.submit(job("partial", k), now)
    finals = [job("final", f"f{i}") for i in range(5)]
    for f in finals:
        c.submit(f, now)
    kinds = []
    for _ in range(12):
        batch = run(c, now, cost)
        now += cost
        kinds.append(batch[0].kind)
        for j in batch:
            if j.kind == "partial":
                c.submit(job("partial", j.key), now)  # the streams keep growing
    assert all(f.done for f in finals), kinds
    assert kinds[:10].count("final") == 5 and "partial" in kinds[:2], kinds


def test_newer_partial_of_a_stream_makes_the_queued_one_stale() -> None:
    c = core()
    old, new = job("partial", "a"), job("partial", "a")
    c.submit(old, 0.0)
    assert c.submit(new, 0.1) == [old]
    assert old.stale and old.done and c.queued == 1
    assert new.first  # still the first partial of utterance 0: its clock kept going
    assert c.statistics().partials_dropped == 1


def test_final_retires_partials_of_its_utterance_but_not_of_the_next() -> None:
    c = core()
    p0 = job("partial", "a", utt=0)
    c.submit(p0, 0.0)
    assert c.retire("a", 0) == [p0]
    p1 = job("partial", "a", utt=1)
    c.submit(p1, 0.1)
    assert c.submit(job("final", "a", utt=0), 0.2) == []
    assert not p1.stale and c.queued == 2


def test_busy_refuses_partials_and_finals_evict_partials() -> None:
    c = core(max_queued=2)
    pa, pb = job("partial", "a"), job("partial", "b")
    c.submit(pa, 0.0)
    c.submit(pb, 0.1)
    with pytest.raises(SchedulerBusy):
        c.submit(job("partial", "c"), 0.2)
    fa = job("final", "x")
    assert c.submit(fa, 0.3) == [pb]  # the least urgent partial made room
    c.submit(job("final", "y"), 0.3)
    with pytest.raises(SchedulerBusy):
        c.submit(job("final", "z"), 0.4)
    assert c.statistics().busy_rejections == 2


def test_one_failing_job_fails_only_itself() -> None:
    c = core()
    jobs = [job("final", k) for k in "abc"]
    for j in jobs:
        c.submit(j, 0.0)
    taken = c.next_batch(0.0)
    assert taken is not None
    boom = ValueError("unsupported language 'xx'")
    c.complete(taken[1], ["A", boom, "C"], 0.1, 0.1)
    assert [j.result for j in jobs] == ["A", None, "C"]
    assert [j.error for j in jobs] == [None, boom, None]
    assert all(j.done for j in jobs)
    assert c.statistics().jobs_failed == 1


def test_whole_batch_failure_and_wrong_count_fail_every_job() -> None:
    c = core()
    jobs = [job("final", k) for k in "ab"]
    for j in jobs:
        c.submit(j, 0.0)
    taken = c.next_batch(0.0)
    assert taken is not None
    c.complete(taken[1], ["only one"], 0.1, 0.1)
    assert all(isinstance(j.error, RuntimeError) for j in jobs)
    j3 = job("final", "c")
    c.submit(j3, 0.2)
    err = OSError("engine died")
    c.complete(run_take(c, 0.2), err, 0.3, 0.1)
    assert j3.error is err and j3.result is None
    s = c.statistics()
    assert (s.jobs_failed, s.jobs_done, s.running, s.queued) == (3, 3, 0, 0)


def run_take(c: SchedulerCore, now: float) -> list[Job]:
    taken = c.next_batch(now)
    assert taken is not None
    return taken[1]


def test_deadline_accounting() -> None:
    c = core(final_deadline_ms=300, first_partial_deadline_ms=100, lid_deadline_ms=500,
             partial_max_gap_ms=1000)
    f_ok, f_late, lid, part = (job("final", "a"), job("final", "b"), job("lid", "c"),
                               job("partial", "d"))
    c.submit(f_ok, 10.0)
    c.submit(f_late, 10.0)
    c.submit(lid, 10.0)
    c.submit(part, 10.0)
    assert (f_ok.deadline, lid.deadline, part.deadline) == pytest.approx((10.3, 10.5, 10.1))
    c.complete(run_take(c, 10.0), ["x"] * 4, 10.2, 0.2)  # all four in one batch at 10.2
    s = c.statistics()
    assert s.deadline_misses == {"lid": 0, "final": 0, "partial": 1}
    later = job("partial", "d")
    c.submit(later, 10.3)
    assert later.deadline == pytest.approx(11.2)  # max gap from the last partial's answer
    c.submit(f_late, 20.0)
    c.complete(run_take(c, 20.0), ["x", "y"], 21.0, 1.0)
    assert c.statistics().deadline_misses == {"lid": 0, "final": 1, "partial": 2}


def test_cancel_and_forget_leave_nothing_behind() -> None:
    c = core()
    p, f = job("partial", "a"), job("final", "b")
    c.submit(p, 0.0)
    c.submit(f, 0.0)
    c.cancel(f)
    assert c.forget("a") == [p]
    assert c.queued == 0 and c.next_batch(1.0) is None
    assert not c._since  # no per-utterance clock outlives its stream


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SchedulerPolicy(max_batch=0)
    with pytest.raises(ValueError):
        SchedulerPolicy(partial_max_gap_ms=0)
    with pytest.raises(ValueError):
        core().submit(job("nope"), 0.0)


def test_batches_stay_within_their_heads_deadline_budget() -> None:
    c = core(first_partial_deadline_ms=100, final_deadline_ms=300)
    # Nothing measured yet: a batch fills up to max_batch.
    for k in "ab":
        c.submit(job("partial", k), 0.0)
    assert len(run(c, 0.0, cost_s=0.12)) == 2  # 60 ms per partial, measured
    c.submit(job("final", "x"), 1.0)
    c.complete(run_take(c, 1.0), ["x"], 1.1, 0.1)  # 100 ms per final
    fresh = [job("partial", k) for k in "cdef"]
    for j in fresh:
        c.submit(j, 2.0)
    assert run_take(c, 2.0) == fresh[:1]  # a second 60 ms partial would pass 100 ms
    c.forget("d"), c.forget("e"), c.forget("f")
    finals = [job("final", k) for k in "uvwyz"]
    for j in finals:
        c.submit(j, 3.0)
    batch = run_take(c, 3.0)
    assert batch == finals[:3]  # 3 x 100 ms fill the final's 300 ms budget


def test_finals_degrade_only_when_a_queued_final_is_predicted_late() -> None:
    """Past capacity (finals predicted to start past deadline + degrade_final_late_ms at
    the measured full-model cost), a degradable pool's finals run on its faster model,
    counted per pool; within capacity, never; and a pool that cannot degrade does not."""
    c = SchedulerCore(SchedulerPolicy(max_batch=1, final_deadline_ms=300,
                                      degrade_final_late_ms=500),
                      slots=2, degradable=frozenset({"en"}))
    # Measure what a final of "en" costs: 0.4 s.
    f0 = job("final", "a", pool="en")
    c.submit(f0, 0.0)
    run(c, 0.0, cost_s=0.4)
    assert not f0.degraded and "degraded" not in f0.options
    # Three finals at once on two slots: the last starts at 0.4 s, within 0.3 + 0.5 s.
    fs = [job("final", k, pool="en") for k in "bcd"]
    for f in fs:
        c.submit(f, 1.0)
    assert [round(t - 1.0, 3) for _, t in c.predicted_final_starts(1.0)] == [0.0, 0.2, 0.4]
    for _ in fs:
        run(c, 1.0, cost_s=0.4)
    assert not any(f.degraded for f in fs)
    # Eight at once: the last would start 1.4 s in, 0.6 s past its slack: degrade.
    fs = [job("final", f"k{i}", pool="en") for i in range(8)]
    for f in fs:
        c.submit(f, 2.0)
    (first,) = run(c, 2.0, cost_s=0.1)
    assert first.degraded and first.options["degraded"] is True
    assert c.statistics().degraded_finals == {"en": 1}
    # The degraded run's 0.1 s does not hide the full model's cost from the prediction.
    assert c.predicted_final_starts(2.1)[-1][1] == pytest.approx(2.1 + 6 * 0.4 / 2)
    # It stops once what is left fits (the last of n starts (n - 1) x 0.2 s on):
    # seven queued, three more run degraded, then the full model again.
    done = [run(c, 2.1 + 0.01 * i, cost_s=0.1)[0] for i in range(7)]
    assert [f.degraded for f in done] == [True] * 3 + [False] * 4
    assert c.statistics().degraded_finals == {"en": 4}


def test_finals_of_a_pool_that_cannot_degrade_or_with_degrade_off_never_do() -> None:
    for degradable, on in ((frozenset(), True), (frozenset({"p"}), False)):
        c = SchedulerCore(SchedulerPolicy(max_batch=1, degrade_finals=on),
                          degradable=degradable)
        c.submit(job("final", "a"), 0.0)
        run(c, 0.0, cost_s=1.0)
        fs = [job("final", k) for k in "bcdefgh"]
        for f in fs:
            c.submit(f, 1.0)
        assert [run(c, 5.0)[0].degraded for _ in fs] == [False] * 7
        assert c.statistics().degraded_finals == {}


def test_a_caller_marked_first_partial_keeps_first_rank_after_an_empty_one() -> None:
    """The first partial often decodes only pre-roll and shows nothing: the next one the
    caller still calls first ranks as a first partial, with its short deadline."""
    c = core(max_batch=1)
    c.submit(job("partial", "a"), 0.0)
    run(c, 0.0)
    again = Job("partial", "p", AUDIO, key="a", first=True)
    later = job("partial", "b")
    c.submit(job("partial", "b"), 0.0)
    run(c, 0.0)
    c.submit(later, 0.2)
    c.submit(again, 0.3)
    assert again.first and not later.first
    assert again.deadline == pytest.approx(0.1 + 0.1)
    assert run(c, 0.35) == [again]


def test_assembler_asks_often_until_a_partial_is_shown_and_discard_uses_the_index() -> None:
    """The utterance assembler (asr/stream.py) that feeds the core: nothing before
    ``min_partial_ms``; every ``first_partial_interval_ms`` until the shell says a partial
    was shown, then every ``partial_interval_ms``; ``discard`` drops the audio and uses
    the index up only when there was audio."""
    from asr.stream import PartialDue, UtteranceAssembler

    a = UtteranceAssembler(partial_interval_ms=250, first_partial_interval_ms=100,
                           min_partial_ms=500)
    frame = np.zeros(320, np.int16)  # 20 ms

    def feed(ms: int) -> list[int]:
        """Feed ``ms`` of audio; the times (ms into it) a partial was due."""
        due = []
        for t in range(0, ms, 20):
            if any(isinstance(x, PartialDue) for x in a.add(frame, t)):
                due.append(t + 20)
                a.partial_requested()
        return due

    assert feed(480) == []
    assert feed(320) == [20, 120, 220, 320]  # from 500 ms on, every 100 ms
    a.partial_shown()
    assert feed(540) == [260, 520]  # 250 ms, in whole 20 ms frames
    assert a.discard() and a.index == 1 and a.samples == 0 and not a.shown
    assert not a.discard() and a.index == 1
    assert feed(620) == [500, 600]  # a fresh utterance asks often again


def spec(key: object = "s", utt: int = 0) -> Job:
    return Job("final", "p", AUDIO, key=key, utterance=utt, speculative=True)


def test_a_speculative_final_ranks_below_first_partials_and_above_later_ones() -> None:
    c = core(max_batch=1)
    c.submit(job("partial", "a"), 0.0)
    run(c, 0.0)  # a's next partial is a later one
    later, first, early = job("partial", "a"), job("partial", "b"), spec("c")
    final = job("final", "d")
    for t, j in enumerate([later, early, first, final]):
        c.submit(j, 0.2 + t * 0.01)
    order = [run(c, 0.25)[0] for _ in range(4)]
    assert order == [final, first, early, later]


def test_a_speculative_final_keeps_its_streams_partials_and_never_rides_with_a_due_final(
) -> None:
    c = core()
    p = job("partial", "a")
    c.submit(p, 0.0)
    early = spec("a")
    c.submit(early, 0.01)
    assert c.is_queued(p) and not p.stale  # the utterance goes on: its partial stays
    f = job("final", "b")
    c.submit(f, 0.02)
    batch = run(c, 0.5)  # f is due; the speculative one would add to its wait
    assert batch[0] is f and early not in batch and c.is_queued(early)


def test_promote_makes_a_queued_speculative_final_a_due_final_and_retires_partials() -> None:
    c = core(final_deadline_ms=300)
    early = spec("a", utt=2)
    c.submit(early, 0.0)
    p = job("partial", "a", utt=2)
    c.submit(p, 0.5)
    dropped = c.promote(early, 1.0)
    assert dropped == [p] and p.stale
    assert not early.speculative and early.deadline == pytest.approx(1.3)
    c.submit(job("partial", "b"), 1.0)
    assert run(c, 1.0)[0] is early  # a final now, ahead of a first partial
    assert c.promote(early, 2.0) == []  # only once


def test_withdraw_drops_a_queued_speculative_final_at_no_cost() -> None:
    c = core()
    early = spec("a")
    c.submit(early, 0.0)
    assert c.withdraw(early) == [early]
    assert early.stale and early.done and not c.is_queued(early)
    assert c.next_batch(0.1) is None
    assert c.statistics().speculative_withdrawn == 1
    assert c.statistics().partials_dropped == 0
    running = spec("b")
    c.submit(running, 0.0)
    taken = c.next_batch(0.0)
    assert taken is not None and taken[1] == [running]
    assert c.withdraw(running) == []  # it runs; its waiter ignores the result
    c.complete([running], ["r"], 0.2, 0.2)
    assert running.result == "r"


def test_speculative_finals_never_degrade_miss_a_deadline_or_crowd_out_finals() -> None:
    c = SchedulerCore(SchedulerPolicy(max_queued=2, degrade_final_late_ms=0,
                                      final_deadline_ms=100), degradable=frozenset({"p"}))
    c.submit(job("final", "x"), 0.0)
    run(c, 0.0, cost_s=1.0)  # a final costs 1 s: every queued final is late
    early = spec("a")
    c.submit(early, 1.0)
    c.submit(job("final", "b"), 1.0)
    with pytest.raises(SchedulerBusy):
        c.submit(spec("c"), 1.0)  # refused as a partial is
    f = job("final", "d")
    c.submit(f, 1.0)  # a final takes the speculative one's place
    assert early.stale and not c.is_queued(early)
    e2 = spec("e")
    c2 = SchedulerCore(SchedulerPolicy(degrade_final_late_ms=0, final_deadline_ms=100),
                       degradable=frozenset({"p"}))
    c2.submit(job("final", "x"), 0.0)
    run(c2, 0.0, cost_s=1.0)
    c2.submit(e2, 1.0)
    misses = c2.statistics().deadline_misses["final"]
    batch = run(c2, 5.0, cost_s=1.0)
    assert batch == [e2] and not e2.degraded
    assert c2.statistics().deadline_misses["final"] == misses


def test_later_partials_start_only_when_no_batch_runs() -> None:
    c = SchedulerCore(SchedulerPolicy(max_batch=1), slots=2)
    for key in ("a", "b", "c"):
        c.submit(job("partial", key), 0.0)
        run(c, 0.0)  # each stream's next partial is a later one
    for key in ("a", "b"):
        c.submit(job("partial", key), 0.2)
    taken = c.next_batch(0.2)
    assert taken is not None and taken[1][0].key == "a"  # the engine was idle
    assert c.next_batch(0.2) is None  # one runs: the free slot waits for urgent work
    first = job("partial", "d")
    c.submit(first, 0.25)
    assert c.next_batch(0.25) == ("p", [first])  # urgent work takes it at once
    c.complete(taken[1], ["r"], 0.3, 0.1)
    assert c.next_batch(0.3) is None  # d's first partial still runs
    c.complete([first], ["r"], 0.35, 0.1)
    again = c.next_batch(0.35)
    assert again is not None and again[1][0].key == "b"
    # A later partial past its max gap is promoted and runs beside another batch.
    c.submit(job("partial", "c"), 0.4)
    assert c.next_batch(0.5) is None
    starving = c.next_batch(1.2)
    assert starving is not None and starving[1][0].key == "c"
    # Off, or with one slot, later partials take any free slot.
    c1 = SchedulerCore(SchedulerPolicy(max_batch=1, later_partials_idle_only=False), slots=2)
    for key in ("a", "b"):
        c1.submit(job("partial", key), 0.0)
        run(c1, 0.0)
    for key in ("a", "b"):
        c1.submit(job("partial", key), 0.2)
    assert c1.next_batch(0.2) is not None and c1.next_batch(0.2) is not None
