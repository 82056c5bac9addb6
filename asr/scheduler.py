"""One process-wide inference scheduler: batches work across streams, bounded everywhere.

Streams submit jobs (a partial or a final of one utterance). A single runner task takes
what is ready, finals first, groups it into batches per pool, and runs each batch in a
worker thread under a ``CapacityLimiter`` sized to the cores. Nothing queues without
bound: past ``max_queued`` jobs a submit fails with ``SchedulerBusy``; a partial that a
newer request of the same stream has made stale is dropped before it costs anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio


class SchedulerBusy(Exception):
    """The scheduler is at capacity; try later."""


_RANK = {"lid": 0, "final": 1, "partial": 2}


@dataclass(eq=False)
class Job:
    """One recognition request.

    ``audio`` is float32 16 kHz mono. ``key`` identifies the stream: a newer partial of
    the same key makes an older queued one stale.
    """

    kind: str  # "partial" or "final"
    pool: str
    audio: np.ndarray
    key: object
    options: dict[str, Any] = field(default_factory=dict)
    submitted: float = field(default_factory=time.perf_counter)
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    stale: bool = False


BatchFn = Callable[[str, Sequence[Job]], list[Any]]


@dataclass(frozen=True)
class SchedulerStats:
    queued: int
    running: int
    batches: int
    jobs_done: int
    partials_dropped: int
    busy_rejections: int
    audio_s: float
    compute_s: float

    @property
    def rtf(self) -> float:
        return self.compute_s / self.audio_s if self.audio_s else 0.0


class Scheduler:
    """Args:
        run_batch: ``(pool, jobs) -> results`` run in a worker thread; one result per job.
        max_batch: jobs per batch.
        max_queued: jobs waiting, beyond which ``submit`` raises ``SchedulerBusy``.
        threads: batches in flight at once (each uses the engine's own intra-op threads).
    """

    def __init__(self, run_batch: BatchFn, *, max_batch: int = 8, max_queued: int = 64,
                 threads: int = 1) -> None:
        if max_batch < 1 or max_queued < 1 or threads < 1:
            raise ValueError("max_batch, max_queued and threads must be positive")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_queued = max_queued
        self._limiter = trio.CapacityLimiter(threads)
        self._queue: list[Job] = []
        self._latest_partial: dict[object, Job] = {}
        self._wakeup = trio.Event()
        self._running = 0
        self._batches = 0
        self._done = 0
        self._dropped = 0
        self._busy = 0
        self._audio_s = 0.0
        self._compute_s = 0.0
        self.latencies_ms: list[float] = []  # recent final latencies, for metrics

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return len(self._queue) + self._running

    def load(self) -> float:
        """Queued plus running jobs, relative to one full batch (1.0 = one batch waiting)."""
        return (len(self._queue) + self._running) / self.max_batch

    async def submit(self, job: Job) -> Any:
        """Queue ``job`` and wait for its result.

        Raises:
            SchedulerBusy: the queue is full (finals still get in while partials are
                dropped to make room).
            Exception: whatever the batch function raised for this batch.
        """
        if len(self._queue) >= self.max_queued:
            victim = next((j for j in self._queue if j.kind == "partial"), None)
            if job.kind in ("final", "lid") and victim is not None:
                self._drop(victim)
            else:
                self._busy += 1
                raise SchedulerBusy(f"{len(self._queue)} jobs queued")
        if job.kind == "partial":
            older = self._latest_partial.get(job.key)
            if older is not None and not older.done.is_set():
                self._drop(older)
            self._latest_partial[job.key] = job
        else:
            older = self._latest_partial.pop(job.key, None)
            if older is not None and not older.done.is_set():
                self._drop(older)
        self._queue.append(job)
        self._wakeup.set()
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _drop(self, job: Job) -> None:
        job.stale = True
        if job in self._queue:
            self._queue.remove(job)
            self._dropped += 1
        job.done.set()

    def _take_batch(self) -> tuple[str, list[Job]]:
        # Language ID first (a session's routing, and its first final, wait on it), then
        # finals (a user waits on each), then partials; oldest first within a kind.
        self._queue.sort(key=lambda j: (_RANK.get(j.kind, 2), j.submitted))
        pool = self._queue[0].pool
        batch = [j for j in self._queue if j.pool == pool][: self.max_batch]
        for j in batch:
            self._queue.remove(j)
        return pool, batch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The runner: start it once in the service's nursery."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                while not self._queue:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                # The limiter is held on behalf of the batch, not of this task: the
                # batch's own task releases it when the thread returns.
                token = object()
                await self._limiter.acquire_on_behalf_of(token)
                if not self._queue:
                    self._limiter.release_on_behalf_of(token)
                    continue
                pool, batch = self._take_batch()
                self._running += len(batch)
                nursery.start_soon(self._execute, pool, batch, token)

    async def _execute(self, pool: str, batch: list[Job], token: object) -> None:
        try:
            t0 = time.perf_counter()
            try:
                results = await trio.to_thread.run_sync(self._run_batch, pool, batch)
                if len(results) != len(batch):
                    raise RuntimeError("the batch function returned the wrong count")
            except Exception as exc:  # every job of the batch learns why
                for j in batch:
                    j.error = exc
            else:
                for j, r in zip(batch, results, strict=True):
                    j.result = r
            elapsed = time.perf_counter() - t0
            self._batches += 1
            self._done += len(batch)
            self._compute_s += elapsed
            self._audio_s += sum(len(j.audio) for j in batch) / 16000
            now = time.perf_counter()
            for j in batch:
                if j.kind == "final":
                    self.latencies_ms.append((now - j.submitted) * 1000)
            del self.latencies_ms[:-1000]
        finally:
            self._running -= len(batch)
            self._limiter.release_on_behalf_of(token)
            for j in batch:
                j.done.set()

    def statistics(self) -> SchedulerStats:
        return SchedulerStats(len(self._queue), self._running, self._batches, self._done,
                              self._dropped, self._busy, self._audio_s, self._compute_s)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN when empty."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
