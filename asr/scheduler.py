"""One process-wide inference scheduler: deadlines, priorities and batches, bounded.

Split in two, like the link codec:

* ``SchedulerCore`` is sans-IO: jobs in, batches out, results in. It never awaits and
  never reads a clock (the caller passes ``now`` in seconds), so its policy is tested
  synchronously with a fake clock.
* ``Scheduler`` is the Trio shell: it keeps one ``trio.Event`` per waiting job, takes
  batches from the core when a worker slot is free and runs each in a worker thread
  under a ``CapacityLimiter``.

Policy (why: the issue's targets are a first partial within ~100 ms of CPU at any
admitted load, finals at endpoint + 300 ms, and no utterance without partials):

1. Language ID first: a session's routing, and so its first final, waits on it.
2. Finals, earliest deadline first; a user waits on each.
3. The first partial of a fresh utterance: it is what makes the service feel live.
4. Later partials. They run only when nothing above is queued, and each stream holds at
   most one queued partial (a newer one replaces it), so their cadence stretches with the
   load by itself. They never starve: a partial whose utterance has had no partial for
   ``partial_max_gap_ms`` is promoted ahead of the finals (one per utterance per gap,
   so a bounded cost), ordered by that deadline.

Degrade by policy, not by collapse. Past capacity, first the partials' cadence stretches
(rule 4). Then finals may run on their pool's faster model: when a batch of finals is
taken, the core predicts when each queued final would start, from the measured cost of
a final of its pool and the number of batches in flight (``slots``), earliest deadline
first. If one of them would start more than ``degrade_final_late_ms`` past its deadline,
the pool is past what its full model can do in time, and the finals of that batch that
may degrade (``degradable`` pools) are marked ``degraded``: the engine decodes them with
the pool's partial model (tiny.en for English: 3-4x cheaper than base), counted per pool.
Only past that does the queue fill and a job get ``SchedulerBusy``: past ``max_queued``
jobs a partial is refused; a final or LID job takes the place of the lowest queued
partial instead, and is refused only when none is left.

Later partials use idle time only. With more than one slot, a batch headed by a later
partial (one not past its max gap) starts only when no batch is running
(``later_partials_idle_only``): a first partial, a final or a speculative final that
arrives then finds a free slot instead of waiting out a partial batch it cannot preempt,
and does not share the cores with more than one partial's decode. Past their max gap
later partials are promoted and run like urgent work. Measured at 4 real-time sessions
against letting them take all but one slot: first partial p50/p95 401/774 -> 376/727 ms,
final 979/1451 -> 879/1255 ms, partial gap p95 1127 -> 1313 ms.

Speculative finals. When a stream's audio pauses, the server may ask for its utterance's
final before the gateway's endpoint ends it (``Job.speculative``): if the endpoint comes
with no new audio, that job *is* the final (same audio, same options), already done or
under way, so the final follows the endpoint by the link's latency instead of a decode.
A speculative final ranks below first partials and above later partials, never rides in
a due final's batch, never degrades and counts no deadline miss; it is refused or made
room from like a partial. ``promote`` makes it a plain final when its utterance is cut;
``withdraw`` drops it when the audio grew (speech went on), at no cost if still queued.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

SAMPLE_RATE = 16000


class SchedulerBusy(Exception):
    """The scheduler is at capacity; try later."""


KINDS = ("lid", "final", "partial")


@dataclass(eq=False)
class Job:
    """One recognition request. Identity is the object (``eq=False``), so it can key maps.

    ``audio`` is float32 16 kHz mono. ``key`` identifies the stream and ``utterance`` the
    utterance within it: a newer partial of the same key makes an older queued one stale,
    and a final of utterance n makes queued partials of utterances <= n stale.
    The core fills ``submitted``, ``deadline`` and ``first`` on submit, and ``result`` or
    ``error`` when it is done.
    """

    kind: str  # "lid", "partial" or "final"
    pool: str
    audio: np.ndarray
    key: object
    options: dict[str, Any] = field(default_factory=dict)
    utterance: int = 0
    submitted: float = 0.0  # scheduler clock, s
    deadline: float = math.inf  # scheduler clock, s
    first: bool = False  # the first partial of its utterance
    degraded: bool = False  # a final run on its pool's faster model (the core sets it)
    speculative: bool = False  # a final asked for before its utterance was cut
    result: Any = None
    error: BaseException | None = None
    stale: bool = False
    done: bool = False
    started: float = 0.0  # scheduler clock when its batch began, s (the shell sets it)
    finished: float = 0.0  # and when the batch returned


BatchFn = Callable[[str, Sequence[Job]], Sequence[Any]]


@dataclass(frozen=True)
class SchedulerStats:
    """Counters since start (the metrics layer reads these)."""

    queued: int
    running: int
    batches: int
    jobs_done: int
    partials_dropped: int  # made stale (a newer partial or the final) before running
    busy_rejections: int
    audio_s: float
    compute_s: float
    jobs_failed: int = 0
    deadline_misses: dict[str, int] = field(default_factory=dict)  # kind -> jobs late
    starved_promotions: int = 0  # partials promoted because their max gap ran out
    degraded_finals: dict[str, int] = field(default_factory=dict)  # pool -> finals
    speculative_withdrawn: int = 0  # speculative finals dropped before running
    # Engine wall seconds and jobs run, by what ran: "lid", "final", "partial",
    # "first_partial" or "speculative" (a final asked for at a pause, used or not).
    compute_by_kind: dict[str, float] = field(default_factory=dict)
    jobs_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def rtf(self) -> float:
        return self.compute_s / self.audio_s if self.audio_s else 0.0


@dataclass(frozen=True)
class SchedulerPolicy:
    """The core's knobs, in milliseconds and counts."""

    max_batch: int = 8
    max_queued: int = 64
    # Each growing utterance gets a partial at least this often, whatever the load.
    partial_max_gap_ms: int = 1000
    # Deadlines: what the targets allow the engine once audio is in.
    first_partial_deadline_ms: int = 100
    final_deadline_ms: int = 300
    lid_deadline_ms: int = 500
    # Finals degrade to the pool's faster model when one queued final is predicted to
    # start more than this past its deadline (see the module docstring).
    degrade_finals: bool = True
    degrade_final_late_ms: int = 500
    # Later partials start only when no batch runs (with more than one slot).
    later_partials_idle_only: bool = True

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queued < 1:
            raise ValueError("max_batch and max_queued must be positive")
        if self.degrade_final_late_ms < 0:
            raise ValueError("degrade_final_late_ms must be >= 0")
        if min(self.partial_max_gap_ms, self.first_partial_deadline_ms,
               self.final_deadline_ms, self.lid_deadline_ms) <= 0:
            raise ValueError("deadlines and partial_max_gap_ms must be positive")


class SchedulerCore:
    """The scheduling policy, sans-IO. Times are seconds on the caller's clock.

    Args:
        slots: batches in flight at once (the shell's threads: one per inference worker).
        degradable: pools whose finals may run on a faster model when late.
    """

    def __init__(self, policy: SchedulerPolicy | None = None, *, slots: int = 1,
                 degradable: frozenset[str] = frozenset()) -> None:
        if slots < 1:
            raise ValueError("slots must be positive")
        self.policy = policy or SchedulerPolicy()
        self.slots = slots
        self.degradable = degradable
        self._degraded: dict[str, int] = {}
        self._queue: list[Job] = []
        self._seq: dict[Job, int] = {}  # submission order, for stable ties
        self._next_seq = 0
        # (key, utterance) -> (when its last partial completed, or when its first partial
        # was asked for: the max-gap clock of that utterance; whether one completed).
        self._since: dict[tuple[object, int], tuple[float, bool]] = {}
        self._running = 0
        self._batches = 0
        self._done = 0
        self._failed = 0
        self._dropped = 0
        self._busy = 0
        self._promoted = 0
        self._promoted_last = False  # the last batch carried starving partials
        self._withdrawn = 0
        self._compute_by: dict[str, float] = {}
        self._jobs_by: dict[str, int] = {}
        self._misses = dict.fromkeys(KINDS, 0)
        self._audio_s = 0.0
        self._compute_s = 0.0
        # (pool, kind) -> what one job costs, s: a moving average of each batch's time
        # shared among its jobs. It sizes batches (see next_batch).
        self._job_cost_s: dict[tuple[str, str], float] = {}

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    def queued_jobs(self) -> list[Job]:
        return list(self._queue)

    def is_queued(self, job: Job) -> bool:
        """``job`` waits in the queue (not yet taken into a batch)."""
        return job in self._seq

    # -- in -----------------------------------------------------------------------

    def submit(self, job: Job, now: float) -> list[Job]:
        """Queue ``job``.

        Returns:
            Jobs that are done now without running (stale partials it replaced); the
            caller wakes their waiters.

        Raises:
            SchedulerBusy: the queue is full and ``job`` cannot take a partial's place.
            ValueError: an unknown kind.
        """
        if job.kind not in KINDS:
            raise ValueError(f"unknown job kind {job.kind!r}")
        p = self.policy
        finished: list[Job] = []
        job.submitted = now
        if job.kind == "partial":
            finished += self._drop_partials(job.key, lambda u: True)
            since, served = self._since.setdefault((job.key, job.utterance), (now, False))
            # A replacement keeps the clock of the partial it replaced: asking again
            # must not push an utterance's deadline back.
            # ``first``: the utterance has no partial yet, or (set by the caller) none
            # that showed text (the first ones are often on pre-roll and say nothing).
            job.first = job.first or not served
            if not job.first:
                job.deadline = since + p.partial_max_gap_ms / 1000
            else:
                job.deadline = since + p.first_partial_deadline_ms / 1000
        else:
            if job.kind == "final" and not job.speculative:
                finished += self.retire(job.key, job.utterance)
            budget = p.final_deadline_ms if job.kind == "final" else p.lid_deadline_ms
            job.deadline = now + budget / 1000
        if len(self._queue) >= p.max_queued:
            victims = [j for j in self._queue if j.kind == "partial" or j.speculative]
            if job.kind == "partial" or job.speculative or not victims:
                self._busy += 1
                raise SchedulerBusy(f"{len(self._queue)} jobs queued")
            victim = max(victims, key=lambda j: self._order(j, now))
            finished += self._drop(victim)
        self._queue.append(job)
        self._seq[job] = self._next_seq
        self._next_seq += 1
        return finished

    def retire(self, key: object, utterance: int) -> list[Job]:
        """Utterance ``utterance`` of ``key`` is cut: its queued partials (and those of
        earlier utterances) are stale, and their max-gap clocks stop.

        Returns: the partials dropped (done, ``stale``).
        """
        for k in [k for k in self._since if k[0] == key and k[1] <= utterance]:
            del self._since[k]
        return self._drop_partials(key, lambda u: u <= utterance)

    def forget(self, key: object) -> list[Job]:
        """The stream ``key`` ended: drop its queued partials and its state."""
        for k in [k for k in self._since if k[0] == key]:
            del self._since[k]
        return self._drop_partials(key, lambda u: True)

    def promote(self, job: Job, now: float) -> list[Job]:
        """The utterance of the speculative final ``job`` was cut with no new audio: it
        is that utterance's final now, with a final's deadline from ``now`` (when still
        queued). Its stream's queued partials of that utterance and earlier are stale.

        Returns: the partials dropped (done, ``stale``).
        """
        if not job.speculative:
            return []
        job.speculative = False
        if self.is_queued(job):
            job.deadline = now + self.policy.final_deadline_ms / 1000
        return self.retire(job.key, job.utterance)

    def withdraw(self, job: Job) -> list[Job]:
        """The speculative final ``job`` no longer matches its utterance (more audio
        came): drop it if it has not started (done, ``stale``); a running one finishes
        and its waiter ignores the result."""
        if not job.speculative or not self.is_queued(job):
            return []
        self._queue.remove(job)
        del self._seq[job]
        self._withdrawn += 1
        job.stale = True
        job.done = True
        return [job]

    def cancel(self, job: Job) -> None:
        """The waiter of ``job`` went away: forget it if it has not started."""
        if job in self._seq and job in self._queue:
            self._queue.remove(job)
            del self._seq[job]

    def _drop_partials(self, key: object, which: Callable[[int], bool]) -> list[Job]:
        out: list[Job] = []
        for j in [j for j in self._queue
                  if j.kind == "partial" and j.key == key and which(j.utterance)]:
            out += self._drop(j)
        return out

    def _drop(self, job: Job) -> list[Job]:
        self._queue.remove(job)
        del self._seq[job]
        self._dropped += 1
        job.stale = True
        job.done = True
        return [job]

    # -- out ----------------------------------------------------------------------

    def _starving(self, job: Job, now: float) -> bool:
        if job.kind != "partial":
            return False
        since, _ = self._since.get((job.key, job.utterance), (job.submitted, False))
        return now >= since + self.policy.partial_max_gap_ms / 1000

    def _rank(self, job: Job, now: float) -> int:
        # A starving partial goes before the finals: ordering it among them by deadline
        # (plain EDF) starves it whenever finals are backlogged, since their deadlines
        # are then older than any partial's. Its cost is bounded: one partial per
        # growing utterance per max gap. But past capacity every partial starves, and
        # always putting them first starved the finals instead (a stand-in engine at 3 s
        # a batch gave no final at all; 8 real-time sessions on 2 cores, finals p95 13 s).
        # So after a batch with starving partials, a final past its deadline goes first:
        # the two take turns, and the partials' cadence stretches rather than the finals'.
        if job.kind == "lid":
            return 0
        starving = self._starving(job, now)
        due_final = job.kind == "final" and not job.speculative and now >= job.deadline
        if starving or due_final:
            return 1 if starving != self._promoted_last else 2
        if job.kind == "final":
            return 5 if job.speculative else 3
        return 4 if job.first else 6

    def _order(self, job: Job, now: float) -> tuple[int, float, int]:
        return (self._rank(job, now), job.deadline, self._seq[job])

    def next_batch(self, now: float) -> tuple[str, list[Job]] | None:
        """The batch to run next, removed from the queue (None when nothing is queued,
        or when only later partials are and a batch runs: the caller asks again when a
        job arrives or a batch completes).

        One pool per batch. The most urgent job picks the pool; others of that pool join
        in priority order, except later partials, which never ride along with a final
        (they would add their cost to its latency). Every job of a batch waits for the
        whole batch, and on CPU a batch costs about the sum of its jobs, so a batch is
        also kept within the deadline budget of its head's kind (``final_deadline_ms``
        for LID and finals, ``first_partial_deadline_ms`` for partials), as estimated
        from the jobs' measured costs: a fresh utterance's first partial must not wait
        for seven others.
        """
        if not self._queue:
            return None
        ordered = sorted(self._queue, key=lambda j: self._order(j, now))
        head = ordered[0]
        head_rank = self._rank(head, now)
        p = self.policy
        later = head_rank == 6
        if later and p.later_partials_idle_only and self.slots > 1 and self._running:
            return None  # later partials use idle time; free slots wait for urgent work
        budget_ms = (p.final_deadline_ms if head.kind in ("lid", "final")
                     else p.first_partial_deadline_ms)
        budget_s, cost_s = budget_ms / 1000, 0.0
        batch: list[Job] = []
        for j in ordered:
            if len(batch) >= p.max_batch:
                break
            if j.pool != head.pool:
                continue
            rank = self._rank(j, now)
            if rank >= 5 and head_rank < 4:
                continue  # a later partial or a speculative final adds to a final's wait
            job_cost = self._job_cost_s.get((j.pool, j.kind), 0.0)
            if batch and cost_s + job_cost > budget_s + 1e-9:
                continue
            cost_s += job_cost
            if self._starving(j, now):
                self._promoted += 1
            batch.append(j)
        self._promoted_last = any(self._starving(j, now) for j in batch)
        if head.pool in self.degradable and self._finals_late(now) and any(
                j.kind == "final" and not j.speculative for j in batch):
            for j in batch:
                if j.kind == "final" and not j.degraded and not j.speculative:
                    j.degraded = True
                    j.options["degraded"] = True  # what the engine reads
                    self._degraded[j.pool] = self._degraded.get(j.pool, 0) + 1
        for j in batch:
            self._queue.remove(j)
            del self._seq[j]
        self._running += len(batch)
        return head.pool, batch

    def predicted_final_starts(self, now: float) -> list[tuple[Job, float]]:
        """When each queued final would start, earliest deadline first, if finals ran
        back to back on every slot at their pool's measured full-model cost (work
        already running and other kinds left out: a lower bound)."""
        finals = sorted((j for j in self._queue if j.kind == "final" and not j.speculative),
                        key=lambda j: (j.deadline, self._seq[j]))
        out, ahead_s = [], 0.0
        for j in finals:
            out.append((j, now + ahead_s / self.slots))
            ahead_s += self._job_cost_s.get((j.pool, "final"), 0.0)
        return out

    def _finals_late(self, now: float) -> bool:
        """A queued final is predicted to start more than ``degrade_final_late_ms`` past
        its deadline on its full model."""
        p = self.policy
        if not p.degrade_finals:
            return False
        late_s = p.degrade_final_late_ms / 1000
        return any(start > j.deadline + late_s
                   for j, start in self.predicted_final_starts(now))

    def complete(self, batch: Sequence[Job], results: Sequence[Any] | BaseException,
                 now: float, compute_s: float) -> list[Job]:
        """A batch from ``next_batch`` finished.

        Args:
            results: one result per job, where an ``Exception`` instance fails only its
                own job; or one exception that failed the whole batch.
            compute_s: wall time the batch took.

        Returns: the jobs, now done with ``result`` or ``error`` set.
        """
        if not isinstance(results, BaseException) and len(results) != len(batch):
            results = RuntimeError(
                f"the batch function returned {len(results)} results for {len(batch)} jobs")
        for i, j in enumerate(batch):
            r = results if isinstance(results, BaseException) else results[i]
            if isinstance(r, BaseException):
                j.error = r
                self._failed += 1
            else:
                j.result = r
            j.done = True
            if now > j.deadline and not j.speculative:
                self._misses[j.kind] += 1
            if j.kind == "partial" and j.error is None and (j.key, j.utterance) in self._since:
                self._since[(j.key, j.utterance)] = (now, True)
        for j in batch:
            what = "speculative" if j.speculative else \
                "first_partial" if j.kind == "partial" and j.first else j.kind
            self._jobs_by[what] = self._jobs_by.get(what, 0) + 1
            self._compute_by[what] = self._compute_by.get(what, 0.0) + (
                compute_s / len(batch))
        if batch and compute_s > 0:
            share = compute_s / len(batch)
            for j in batch:
                if j.degraded:
                    continue  # a faster model's cost would hide the full model's
                k = (j.pool, j.kind)
                old = self._job_cost_s.get(k)
                self._job_cost_s[k] = share if old is None else 0.7 * old + 0.3 * share
        self._running -= len(batch)
        self._batches += 1
        self._done += len(batch)
        self._compute_s += compute_s
        self._audio_s += sum(len(j.audio) for j in batch) / SAMPLE_RATE
        return list(batch)

    def statistics(self) -> SchedulerStats:
        return SchedulerStats(len(self._queue), self._running, self._batches, self._done,
                              self._dropped, self._busy, self._audio_s, self._compute_s,
                              jobs_failed=self._failed, deadline_misses=dict(self._misses),
                              starved_promotions=self._promoted,
                              degraded_finals=dict(self._degraded),
                              speculative_withdrawn=self._withdrawn,
                              compute_by_kind=dict(self._compute_by),
                              jobs_by_kind=dict(self._jobs_by))


class Scheduler:
    """The Trio shell around ``SchedulerCore``.

    Args:
        run_batch: ``(pool, jobs) -> results`` run in a worker thread; one result per
            job, an ``Exception`` instance in a slot failing only that job.
        threads: batches in flight at once (each uses the engine's own intra-op threads).
        policy: the core's knobs; ``max_batch`` and ``max_queued`` are shortcuts.
    """

    def __init__(self, run_batch: BatchFn, *, max_batch: int = 8, max_queued: int = 64,
                 threads: int = 1, policy: SchedulerPolicy | None = None) -> None:
        if threads < 1:
            raise ValueError("threads must be positive")
        self.core = SchedulerCore(policy or SchedulerPolicy(max_batch=max_batch,
                                                            max_queued=max_queued),
                                  slots=threads)
        self._run_batch = run_batch
        self._limiter = trio.CapacityLimiter(threads)
        self._waiters: dict[Job, trio.Event] = {}
        self._wakeup = trio.Event()
        self.latencies_ms: list[float] = []  # recent final latencies, for metrics

    @property
    def max_batch(self) -> int:
        return self.core.policy.max_batch

    @property
    def max_queued(self) -> int:
        return self.core.policy.max_queued

    @property
    def queued(self) -> int:
        return self.core.queued

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self.core.queued + self.core.running

    def load(self) -> float:
        """Queued plus running jobs, relative to one full batch (1.0 = one batch waiting)."""
        return self.pending / self.max_batch

    def _wake(self, jobs: Sequence[Job]) -> None:
        for j in jobs:
            ev = self._waiters.pop(j, None)
            if ev is not None:
                ev.set()

    def is_queued(self, job: Job) -> bool:
        return self.core.is_queued(job)

    def retire(self, key: object, utterance: int) -> None:
        """See ``SchedulerCore.retire``."""
        self._wake(self.core.retire(key, utterance))

    def forget(self, key: object) -> None:
        """See ``SchedulerCore.forget``."""
        self._wake(self.core.forget(key))

    def promote(self, job: Job) -> None:
        """See ``SchedulerCore.promote``."""
        self._wake(self.core.promote(job, trio.current_time()))
        self._wakeup.set()

    def withdraw(self, job: Job) -> None:
        """See ``SchedulerCore.withdraw``."""
        self._wake(self.core.withdraw(job))

    async def submit(self, job: Job) -> Any:
        """Queue ``job`` and wait for its result (None with ``job.stale`` when dropped).

        Raises:
            SchedulerBusy: the queue is full (finals still get in while partials are
                dropped to make room).
            Exception: what the batch function raised for the batch or put in this
                job's slot.
        """
        done = trio.Event()
        self._wake(self.core.submit(job, trio.current_time()))
        self._waiters[job] = done
        self._wakeup.set()
        try:
            await done.wait()
        finally:
            if not job.done:  # cancelled while queued: it must not cost anything
                self._waiters.pop(job, None)
                self.core.cancel(job)
        if job.error is not None:
            raise job.error
        return job.result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The runner: start it once in the service's nursery."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                while not self.core.queued:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                # The limiter is held on behalf of the batch, not of this task: the
                # batch's own task releases it when the thread returns.
                token = object()
                await self._limiter.acquire_on_behalf_of(token)
                # Choose only now that a slot is free, so the choice sees every job
                # that arrived while the previous batch ran.
                taken = self.core.next_batch(trio.current_time())
                if taken is None:
                    # Only later partials wait, and a batch runs: ask again when a job
                    # arrives or a batch completes.
                    self._limiter.release_on_behalf_of(token)
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                pool, batch = taken
                nursery.start_soon(self._execute, pool, batch, token)

    async def _execute(self, pool: str, batch: list[Job], token: object) -> None:
        results: Sequence[Any] | BaseException
        t0 = time.perf_counter()
        begun = trio.current_time()
        for j in batch:
            j.started = begun
        try:
            try:
                results = await trio.to_thread.run_sync(self._run_batch, pool, batch)
            except Exception as exc:  # every job of the batch learns why
                results = exc
            now = trio.current_time()
            for j in batch:
                j.finished = now
            self.core.complete(batch, results, now, time.perf_counter() - t0)
            for j in batch:
                if j.kind == "final" and not j.speculative:
                    self.latencies_ms.append((now - j.submitted) * 1000)
            del self.latencies_ms[:-1000]
        finally:
            if not all(j.done for j in batch):  # cancelled mid-batch: release the waiters
                self.core.complete([j for j in batch if not j.done],
                                   RuntimeError("the scheduler stopped"),
                                   trio.current_time(), 0.0)
            self._limiter.release_on_behalf_of(token)
            self._wake(batch)
            self._wakeup.set()

    def statistics(self) -> SchedulerStats:
        return self.core.statistics()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN when empty."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
