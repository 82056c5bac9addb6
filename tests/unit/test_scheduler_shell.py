"""The scheduler's Trio shell: real worker threads, waiters, cancellation."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest
import trio
import trio.testing

from asr.scheduler import Job, Scheduler, SchedulerBusy

AUDIO = np.zeros(1600, np.float32)


def engine(pool: str, jobs: Sequence[Job]) -> list[object]:
    """Fails a job whose language is unknown, as the Whisper engine now may."""
    return [ValueError(f"unsupported language {j.options['lang']!r}")
            if j.options.get("lang") == "xx" else f"{j.kind}:{j.key}" for j in jobs]


@pytest.mark.timeout(10)
async def test_a_failing_job_fails_only_its_own_waiter(nursery: trio.Nursery) -> None:
    gate = threading.Event()

    def gated(pool: str, jobs: Sequence[Job]) -> list[object]:
        gate.wait(5)
        return engine(pool, jobs)

    s = Scheduler(gated, max_batch=8)
    await nursery.start(s.run)
    blocker = Job("final", "p", AUDIO, key="blocker")
    results: dict[str, object] = {}

    async def one(j: Job) -> None:
        try:
            results[str(j.key)] = await s.submit(j)
        except ValueError as exc:
            results[str(j.key)] = exc

    nursery.start_soon(one, blocker)
    await trio.testing.wait_all_tasks_blocked()
    jobs = [Job("final", "p", AUDIO, key=k, options={"lang": lang})
            for k, lang in (("a", "en"), ("b", "xx"), ("c", "de"))]
    async with trio.open_nursery() as inner:
        for j in jobs:
            inner.start_soon(one, j)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert results["a"] == "final:a" and results["c"] == "final:c"
    assert isinstance(results["b"], ValueError)
    stats = s.statistics()
    assert stats.batches == 2 and stats.jobs_failed == 1 and stats.jobs_done == 4
    assert len(s.latencies_ms) == 4


@pytest.mark.timeout(10)
async def test_stale_partial_returns_none_and_busy_is_raised(nursery: trio.Nursery) -> None:
    gate = threading.Event()

    def gated(pool: str, jobs: Sequence[Job]) -> list[object]:
        gate.wait(5)
        return engine(pool, jobs)

    s = Scheduler(gated, max_batch=1, max_queued=1)
    await nursery.start(s.run)
    got: list[object] = []

    async def submit(j: Job) -> None:
        got.append(await s.submit(j))

    nursery.start_soon(submit, Job("final", "p", AUDIO, key="running"))
    await trio.testing.wait_all_tasks_blocked()
    old = Job("partial", "p", AUDIO, key="s")
    nursery.start_soon(submit, old)
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(SchedulerBusy):
        await s.submit(Job("partial", "p", AUDIO, key="other"))
    s.retire("s", 0)  # the utterance was cut: its queued partial is stale at once
    await trio.testing.wait_all_tasks_blocked()
    assert old.stale and got == [None]
    gate.set()
    with trio.fail_after(5):
        while len(got) < 2:
            await trio.sleep(0.01)
    assert got[1] == "final:running"


@pytest.mark.timeout(10)
async def test_a_cancelled_waiter_costs_nothing(nursery: trio.Nursery) -> None:
    gate = threading.Event()
    ran: list[object] = []

    def gated(pool: str, jobs: Sequence[Job]) -> list[object]:
        gate.wait(5)
        ran.extend(j.key for j in jobs)
        return engine(pool, jobs)

    s = Scheduler(gated, max_batch=1)
    await nursery.start(s.run)
    nursery.start_soon(s.submit, Job("final", "p", AUDIO, key="first"))
    await trio.testing.wait_all_tasks_blocked()
    with trio.move_on_after(0.05):
        await s.submit(Job("final", "p", AUDIO, key="gone"))
    assert s.queued == 0
    gate.set()
    with trio.fail_after(5):
        while s.pending:
            await trio.sleep(0.01)
    assert ran == ["first"]


@pytest.mark.timeout(10)
async def test_degraded_finals_reach_the_engine_as_an_option(nursery: trio.Nursery) -> None:
    """The shell's threads are the core's slots, and a final the core degrades carries
    ``options["degraded"]`` into the batch function (the engine reads it)."""
    seen: list[tuple[str, bool]] = []

    def slow(pool: str, jobs: Sequence[Job]) -> list[object]:
        seen.extend((str(j.key), bool(j.options.get("degraded"))) for j in jobs)
        return [f"{j.kind}:{j.key}" for j in jobs]

    s = Scheduler(slow, max_batch=1, threads=2)
    assert s.core.slots == 2
    s.core.degradable = frozenset({"p"})
    s.core._job_cost_s[("p", "final")] = 10.0  # measured: a final takes 10 s
    await nursery.start(s.run)
    async with trio.open_nursery() as inner:
        for k in "abcd":  # the fourth would start 10 s late on two slots
            inner.start_soon(s.submit, Job("final", "p", AUDIO, key=k))
    marked = sum(d for _, d in seen)
    assert marked >= 1 and s.statistics().degraded_finals == {"p": marked}
