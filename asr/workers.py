"""Recognition in isolated, supervised worker processes (``ProcessBackend``).

Why processes: a segfault or an endless loop inside onnxruntime must cost one job, not
the ASR server and every stream on it; and two single-threaded onnxruntime sessions in
two processes do not share a GIL, an allocator or a thread pool.

How: each worker is a ``spawn``-ed child (never ``fork``: the parent may already run
onnxruntime or Trio threads, and a forked child would inherit their locks mid-state)
that builds the real backend from a picklable factory, warms it up, says ``ready`` and
then answers one batch at a time over its own pipe. A batch crosses the pipe as plain
data (``WireJob``: kind, pool, float32 audio, options), never as the scheduler's ``Job``.

The parent keeps the cheap parts of the ``Backend`` protocol (pools, pool selection,
the partial policy: it needs only the tokenizer) in a *front* object and runs the
supervision:

- ``run_batch`` (called from the scheduler's worker threads, one per batch in flight)
  takes an idle ready worker, sends the batch and waits for the answer, the worker's
  death, or the deadline (``job_timeout_s`` plus ``job_timeout_per_audio_s`` per second
  of audio in the batch), whichever comes first.
- A worker that dies mid-batch (kill -9, segfault) is replaced and the batch is re-run
  once on another worker; a second death fails the batch with ``WorkerCrashed`` (a
  batch that kills every worker it meets must not take the whole pool down with it).
- A worker past its deadline is killed and replaced, and its batch fails with
  ``WorkerHung``; it is *not* re-run: a decode that hung once on this input will most
  likely hang again, and the stream has already waited past its deadline.
- ``standby_workers`` extra processes are loaded and warm. The pool is simply larger
  than the scheduler's concurrency (``workers`` batches at once), so when a worker dies
  the re-run and the next batch find a warm process at once; a cold start is model
  load plus warm-up, seconds, not the < 1 s the service promises. The price is one more
  set of model weights in RAM (bench/workers.py measures it); an idle worker costs no
  CPU (onnxruntime's threads do not spin).
- More than ``crash_loop_restarts`` failures (crashes, hangs, failed starts) within
  ``crash_loop_window_s`` is a crash loop: ``health()["ok"]`` turns false (``/healthz``
  answers 503) and restarts back off.

No orphans: workers are daemonic (multiprocessing terminates them at interpreter exit),
``close()`` asks, then terminates, then kills; and each worker watches a *lifeline* pipe
whose only write end lives in the parent, so when the parent dies in any way (even
SIGKILL) the kernel closes it and the worker exits at once, mid-job or idle.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.connection as mpc
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # at run time only the workers and run_batch need these
    import numpy as np

    from .backend import Backend, LidResult, PartialPolicy, Recognition
    from .engine import PoolSpec
    from .scheduler import Job

log = logging.getLogger("voxgate.asr.workers")

SAMPLE_RATE = 16000  # Hz, the audio of every job
WAIT_FOR_WORKER_S = 30.0  # a batch waits this long for an idle worker before failing
STOP_GRACE_S = 2.0  # close(): time to exit after the stop message, then terminate
CRASH_LOOP_BACKOFF_S = 5.0  # between restarts while crash-looping
_CTX = multiprocessing.get_context("spawn")


class WorkerError(RuntimeError):
    """Base of the errors a batch gets when its worker process fails it."""


class WorkerCrashed(WorkerError):
    """The worker process died while running the batch (twice: it was re-run once)."""


class WorkerHung(WorkerError):
    """The batch ran past its deadline; the worker was killed and replaced."""


class WorkersUnavailable(WorkerError):
    """No worker became ready in time (all dead and restarting, or closed)."""


@dataclass(frozen=True)
class WorkerConfig:
    """Worker-process settings (the ``[workers]`` table of the ASR config).

    Args:
        workers: processes that run batches at once; 0 runs the backend in-process.
            The scheduler should run exactly this many batches at once.
        worker_threads: onnxruntime intra-op threads in each worker.
        standby_workers: extra warm processes, so a crash is answered by a warm worker
            at once instead of a cold start.
        job_timeout_s: the fixed part of a batch's deadline.
        job_timeout_per_audio_s: added to the deadline per second of audio in the batch.
        start_timeout_s: a worker that is not ready this long after its start (model
            load and warm-up) is killed and counted as a failed start.
        crash_loop_restarts: failures tolerated within ``crash_loop_window_s``; one
            more is a crash loop.
        crash_loop_window_s: see ``crash_loop_restarts``.
    """

    # Defaults measured with bench/workers.py on this 2-core machine (2 clients, a 22-job
    # mix of base finals and tiny.en partials, layouts interleaved), in two runs while
    # other engineers' jobs held the load average at ~9-10, so wall-clock figures are
    # noisy. 2 workers x 1 thread against in-process x 2 threads (one batch at a time)
    # and 1 worker x 2 threads, second run then first run:
    #   jobs/s            1.21x / 1.09x       (1x2: 0.97x / 1.16x)
    #   CPU ms per job    254 vs 274 / 257 vs 293   (1x2: 277 / 278)
    #   partial p95 ms    742 vs 2313 / 1097 vs 2505 (1x2: 2326 / 2050)
    #   final p95 ms      2889 vs 2611 / 4635 vs 3028 (1x2: 2780 / 3029)
    # CPU per job is the figure that holds when the cores are shared (a second intra-op
    # thread spends CPU on synchronisation), and at capacity jobs/s is cores / CPU per
    # job. A partial no longer waits behind a final: partial p95 2-3x lower. The cost: a
    # final on one thread is slower (final p95 +11 % / +53 %). The targets are
    # first partials and capacity, so 2 x 1; texts were identical in every layout.
    workers: int = 2
    worker_threads: int = 1
    # A cold worker took 28-44 s from spawn to warm at that load (8 s on a quieter
    # moment: imports, two models, warm-up); the < 1 s failover needs a warm one. Its
    # price: one more ~600 MB RSS (base + tiny.en int8, warm) next to the two workers'
    # ~1.2 GB and the parent's ~150 MB (tokenizers, no models). No CPU while idle.
    standby_workers: int = 1
    # The slowest single job in those runs took 3.1-6.1 s (a final under load ~10);
    # 10 s plus 1 s per second of audio leaves room for that and for batches, and
    # still catches a hang within seconds.
    job_timeout_s: float = 10.0
    job_timeout_per_audio_s: float = 1.0
    start_timeout_s: float = 120.0
    crash_loop_restarts: int = 3
    crash_loop_window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.workers <= 64:
            raise ValueError(f"workers must be between 0 and 64, not {self.workers}")
        if not 1 <= self.worker_threads <= 64:
            raise ValueError(f"worker_threads must be between 1 and 64, "
                             f"not {self.worker_threads}")
        if not 0 <= self.standby_workers <= 8:
            raise ValueError(f"standby_workers must be between 0 and 8, "
                             f"not {self.standby_workers}")
        for name in ("job_timeout_s", "start_timeout_s", "crash_loop_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not self.job_timeout_per_audio_s >= 0:
            raise ValueError("job_timeout_per_audio_s must be >= 0")
        if self.crash_loop_restarts < 1:
            raise ValueError("crash_loop_restarts must be >= 1")

    @classmethod
    def from_dict(cls, table: dict[str, Any], source: str = "[workers]") -> WorkerConfig:
        """A config from a TOML table; unknown keys and wrong types are refused.

        Raises:
            ValueError: naming the key.
        """
        unknown = set(table) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}")
        out: dict[str, Any] = {}
        for key, value in table.items():
            want = int if isinstance(getattr(cls, key), int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    want is int and not isinstance(value, int)):
                raise ValueError(f"{source}: {key} must be {want.__name__}, not {value!r}")
            out[key] = want(value)
        return cls(**out)


@dataclass(frozen=True)
class WireJob:
    """One job as it crosses the process boundary: plain, picklable data.

    It has the attributes the backends read from a scheduler ``Job`` (``kind``,
    ``pool``, ``audio``, ``options``, ``key``), so the worker hands it to the real
    backend as is.
    """

    kind: str
    pool: str
    audio: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)
    key: None = None


@dataclass(frozen=True)
class WorkerStats:
    """Counters of a ``ProcessBackend`` (for metrics).

    ``cpu_s`` is per live worker (user + system seconds, as of its last answer);
    ``retired_cpu_s`` sums the workers that are gone. ``restarts`` counts processes
    started after the initial set.
    """

    workers: int
    standby_workers: int
    ready: int
    busy: int
    starting: int
    batches: int
    jobs: int
    restarts: int
    crashes: int
    hangs: int
    failed_starts: int
    reruns: int
    crash_looping: bool
    last_failover_s: float
    cpu_s: tuple[float, ...]
    retired_cpu_s: float


# -- the child ------------------------------------------------------------------------

def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _portable(value: object) -> object:
    """``value`` if it survives pickling, else (for exceptions) a RuntimeError naming it."""
    try:
        pickle.dumps(value)
    except Exception:
        if isinstance(value, BaseException):
            return RuntimeError(f"{type(value).__name__}: {value}")
        raise
    return value


def _watch_lifeline(lifeline: mpc.Connection) -> None:
    # Blocks until the parent's write end closes, which the kernel does when the parent
    # dies in any way; then the worker must not outlive it, even mid-job.
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()
    os._exit(0)


def _child_main(conn: mpc.Connection, lifeline: mpc.Connection,
                factory: Callable[[], Backend], warm: bool, log_level: int | None) -> None:
    """A worker process: build the backend, say ready, answer batches until told to stop."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True,
                     name="lifeline").start()
    if log_level is not None:
        from .logs import setup

        setup(log_level)
    try:
        backend = factory()
        if warm:
            backend.warmup()
    except Exception as exc:
        conn.send(("failed", repr(exc)))
        return
    conn.send(("ready", os.getpid(), _cpu_s()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        seq, pool, jobs = msg
        try:
            results = backend.run_batch(pool, cast("Sequence[Job]", jobs))
            reply: tuple[Any, ...] = ("ok", seq, [_portable(r) for r in results], _cpu_s())
            data = pickle.dumps(reply)
        except Exception as exc:
            data = pickle.dumps(("error", seq, _portable(exc), _cpu_s()))
        try:
            conn.send_bytes(data)
        except OSError:
            return


# -- the parent -----------------------------------------------------------------------

@dataclass(eq=False)
class _Worker:
    proc: BaseProcess
    conn: mpc.Connection
    lifeline: mpc.Connection
    spawned_at: float
    replacement: bool
    state: str = "starting"  # starting -> idle <-> busy -> dead
    pid: int = 0
    ready_at: float = 0.0
    jobs: int = 0
    cpu_s: float = 0.0


class ProcessBackend:
    """A ``Backend`` whose ``run_batch`` runs in supervised worker processes.

    Args:
        front: answers the cheap calls in the parent (``pools``, ``select_pool``,
            ``lid_pool``, ``partial_policy``); it must not need the models loaded.
        factory: picklable, called in each worker to build the real backend.
        cfg: see ``WorkerConfig`` (``workers`` must be >= 1 here).
        log_level: the workers' JSON log level (None: leave logging unconfigured).

    Call ``warmup()`` (or ``start()`` and ``wait_ready()``) before the first batch, and
    ``close()`` at the end (it is also a context manager). Workers are spawned, and
    spawn re-imports the ``__main__`` module in each: a script that builds a
    ``ProcessBackend`` needs the ``if __name__ == "__main__":`` guard (console scripts
    and ``python -m`` have it).
    """

    def __init__(self, front: Backend, factory: Callable[[], Backend],
                 cfg: WorkerConfig | None = None, *, log_level: int | None = None) -> None:
        cfg = cfg or WorkerConfig()
        if cfg.workers < 1:
            raise ValueError("ProcessBackend needs workers >= 1 (0 means in-process)")
        self.cfg = cfg
        self.front = front
        self._factory = factory
        self._log_level = log_level
        self._cond = threading.Condition()
        self._workers: list[_Worker] = []
        self._waiting: collections.deque[object] = collections.deque()  # _acquire tickets
        self._failures: collections.deque[float] = collections.deque()
        self._wake_r, self._wake_w = _CTX.Pipe(duplex=False)
        self._supervisor: threading.Thread | None = None
        self._closing = False
        self._seq = 0
        self._batches = self._jobs = self._restarts = 0
        self._crashes = self._hangs = self._failed_starts = self._reruns = 0
        self._last_failover_s = 0.0
        self._retired_cpu_s = 0.0
        self._next_spawn_at = 0.0
        self._looping_logged = False

    @classmethod
    def whisper(cls, pools: dict[str, PoolSpec], default_pool: str,
                cfg: WorkerConfig | None = None, *, log_level: int | None = None
                ) -> ProcessBackend:
        """The Whisper engine in workers: the same pools, ``cfg.worker_threads`` each."""
        cfg = cfg or WorkerConfig()
        front = WhisperFront(pools, default_pool)
        factory = functools.partial(_make_whisper, pools, default_pool, cfg.worker_threads)
        return cls(front, factory, cfg, log_level=log_level)

    # -- Backend -------------------------------------------------------------------------

    def pools(self) -> dict[str, tuple[str, ...]]:
        return self.front.pools()

    def select_pool(self, lang_hint: str, domain: str) -> str | None:
        return self.front.select_pool(lang_hint, domain)

    def lid_pool(self) -> str | None:
        return self.front.lid_pool()

    def partial_policy(self, pool: str) -> PartialPolicy | None:
        return self.front.partial_policy(pool)

    def normalize_language(self, code: str) -> str:
        """The front's check of a stream's language hint (``asr.backend.LanguageNormalizer``);
        a front without one passes the code on, and a bad one fails its jobs alone.

        Raises:
            ValueError: the front refuses the code.
        """
        normalize = getattr(self.front, "normalize_language", None)
        return str(normalize(code)) if callable(normalize) else code

    def warmup(self) -> None:
        """Start the workers (each loads and warms its models) and wait until all are ready.

        The front's ``prepare()`` (if it has one) runs first, here: a missing model is
        exported once, not by N workers racing for the cache.

        Raises:
            WorkersUnavailable: they did not all get ready within ``start_timeout_s``.
        """
        prepare = getattr(self.front, "prepare", None)
        if callable(prepare):
            prepare()
        self.start()
        self.wait_ready(self.cfg.start_timeout_s)

    def describe(self) -> dict[str, Any]:
        describe = getattr(self.front, "describe", None)
        return dict(describe()) if callable(describe) else {}

    def run_batch(self, pool: str, jobs: Sequence[Job | WireJob]
                  ) -> list[Recognition | LidResult]:
        """Run ``jobs`` in a worker; blocks the calling (scheduler worker) thread.

        ``jobs`` are the scheduler's ``Job`` objects, or ``WireJob`` (benches, tests).

        Returns:
            One result per job; a job the backend failed alone is its exception
            instance, in its slot.

        Raises:
            WorkerCrashed: the worker died, and so did the one that re-ran the batch.
            WorkerHung: the batch ran past its deadline.
            WorkersUnavailable: no worker was ready within ``WAIT_FOR_WORKER_S``.
            Exception: whatever the backend raised for the whole batch.
        """
        import numpy as np

        wire = [WireJob(j.kind, j.pool, np.asarray(j.audio, dtype=np.float32),
                        dict(j.options)) for j in jobs]
        audio_s = sum(w.audio.size for w in wire) / SAMPLE_RATE
        deadline_s = self.cfg.job_timeout_s + self.cfg.job_timeout_per_audio_s * audio_s
        died_at: float | None = None
        for attempt in (0, 1):
            worker = self._acquire()
            if died_at is not None:
                with self._cond:
                    self._last_failover_s = time.monotonic() - died_at
                    self._reruns += 1
            outcome, payload = self._run_on(worker, pool, wire, deadline_s)
            if outcome == "ok":
                return cast("list[Recognition | LidResult]", payload)
            if outcome == "error":
                raise cast(BaseException, payload)
            if outcome == "hung":
                raise WorkerHung(
                    f"worker {worker.pid} ran a {pool} batch of {len(wire)} jobs "
                    f"({audio_s:.1f} s of audio) past its {deadline_s:.1f} s deadline; "
                    "it was killed and is being replaced")
            died_at = time.monotonic()
            if attempt == 0:
                log.warning("worker %s died mid-batch (%s); re-running the batch once",
                            worker.pid, payload)
        raise WorkerCrashed(f"two workers died running this {pool} batch of "
                            f"{len(wire)} jobs (last: {payload})")

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the supervisor (it spawns the workers); idempotent."""
        with self._cond:
            if self._closing:
                raise WorkersUnavailable("the worker pool is closed")
            if self._supervisor is not None:
                return
            self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                                name="asr-worker-supervisor")
        self._supervisor.start()

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every wanted worker (``workers + standby_workers``) is ready.

        Raises:
            WorkersUnavailable: not within ``timeout_s``, or the pool crash-loops.
        """
        end = time.monotonic() + timeout_s
        with self._cond:
            while self._count("idle", "busy") < self._wanted():
                left = end - time.monotonic()
                if self._closing or left <= 0 or self._crash_looping():
                    raise WorkersUnavailable(
                        f"{self._count('idle', 'busy')} of {self._wanted()} workers ready "
                        f"after {timeout_s:.0f} s ({self._failed_starts} failed starts, "
                        f"{self._crashes} crashes)")
                self._cond.wait(left)

    def close(self) -> None:
        """Stop every worker: ask, wait ``STOP_GRACE_S``, terminate, kill. Idempotent."""
        with self._cond:
            if self._closing and self._supervisor is None:
                return
            self._closing = True
            self._wake()
            self._cond.notify_all()
            supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.join()
        with self._cond:
            workers = list(self._workers)
        for w in workers:
            if w.state == "idle":
                with contextlib.suppress(OSError):
                    w.conn.send(None)
            w.lifeline.close()  # a busy worker sees its lifeline close and exits
        end = time.monotonic() + STOP_GRACE_S
        for w in workers:
            w.proc.join(max(0.0, end - time.monotonic()))
        for w in workers:
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(1.0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(1.0)
        with self._cond:
            for w in workers:
                self._retire(w)
            self._cond.notify_all()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> ProcessBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation ---------------------------------------------------------------------

    def statistics(self) -> WorkerStats:
        with self._cond:
            live = [w for w in self._workers if w.state != "dead"]
            return WorkerStats(
                self.cfg.workers, self.cfg.standby_workers, self._count("idle", "busy"),
                self._count("busy"), self._count("starting"), self._batches, self._jobs,
                self._restarts, self._crashes, self._hangs, self._failed_starts,
                self._reruns, self._crash_looping(), self._last_failover_s,
                tuple(w.cpu_s for w in live), self._retired_cpu_s)

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` reports (never blocks on a worker).

        ``ok`` is false while crash-looping (``reason`` says so), after ``close()``, or
        when started with no worker ready or starting. One hang or crash leaves it true
        (the worker is replaced); the counters show it.
        """
        now = time.monotonic()
        with self._cond:
            looping = self._crash_looping()
            live = [w for w in self._workers if w.state != "dead"]
            workers = [{
                "pid": w.pid or w.proc.pid, "state": w.state, "jobs": w.jobs,
                "cpu_s": round(_proc_cpu_s(w.proc.pid) or w.cpu_s, 3),
                "rss_mb": _proc_rss_mb(w.proc.pid),
                "uptime_s": round(now - w.spawned_at, 3),
                "start_s": round(w.ready_at - w.spawned_at, 3) if w.ready_at else None,
            } for w in live]
            ready = self._count("idle", "busy")
            # Before start() nothing is wrong yet: the models may still be exporting,
            # and a liveness probe must not kill the pod for that.
            started = self._supervisor is not None
            reason = "; ".join(r for r, bad in (
                ("crash-looping", looping), ("closed", self._closing),
                ("no worker ready or starting", started and not live)) if bad)
            ok = not reason
            return {"ok": ok, "reason": reason,
                    "workers": workers, "ready": ready, "wanted": self._wanted(),
                    "restarts": self._restarts, "crashes": self._crashes,
                    "hangs": self._hangs, "failed_starts": self._failed_starts,
                    "reruns": self._reruns, "crash_looping": looping,
                    "last_failover_s": round(self._last_failover_s, 4)}

    # -- internals (call with self._cond held unless said otherwise) --------------------

    def _wanted(self) -> int:
        return self.cfg.workers + self.cfg.standby_workers

    def _count(self, *states: str) -> int:
        return sum(1 for w in self._workers if w.state in states)

    def _crash_looping(self) -> bool:
        cutoff = time.monotonic() - self.cfg.crash_loop_window_s
        while self._failures and self._failures[0] < cutoff:
            self._failures.popleft()
        return len(self._failures) > self.cfg.crash_loop_restarts

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send_bytes(b"!")

    def _failed(self, w: _Worker, kind: str) -> None:
        """Count a failure of ``w`` (crash, hang, failed start), retire it, wake the
        supervisor to replace it."""
        if kind == "crash":
            self._crashes += 1
        elif kind == "hang":
            self._hangs += 1
        else:
            self._failed_starts += 1
        self._failures.append(time.monotonic())
        if self._crash_looping():
            self._next_spawn_at = time.monotonic() + CRASH_LOOP_BACKOFF_S
            if not self._looping_logged:
                self._looping_logged = True
                log.error("ASR workers are crash-looping: %d failures in %.0f s "
                          "(%d crashes, %d hangs, %d failed starts)", len(self._failures),
                          self.cfg.crash_loop_window_s, self._crashes, self._hangs,
                          self._failed_starts)
        else:
            self._looping_logged = False
        self._retire(w)
        self._wake()
        self._cond.notify_all()

    def _retire(self, w: _Worker) -> None:
        if w.state == "dead":
            return
        w.state = "dead"
        self._retired_cpu_s += w.cpu_s
        for c in (w.conn, w.lifeline):
            c.close()
        if w in self._workers:
            self._workers.remove(w)

    def _acquire(self) -> _Worker:
        """An idle ready worker, now marked busy (waits up to ``WAIT_FOR_WORKER_S``).

        First come, first served: a thread that just gave a worker back must not take it
        again ahead of one that has been waiting (a lock or a bare condition would let
        it barge, and a re-run after a crash could wait behind fresh batches).
        """
        end = time.monotonic() + WAIT_FOR_WORKER_S
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            try:
                while True:
                    if self._closing:
                        raise WorkersUnavailable("the worker pool is closed")
                    if self._waiting[0] is ticket:
                        for w in [w for w in self._workers if w.state == "idle"]:
                            if w.proc.is_alive():
                                w.state = "busy"
                                return w
                            self._failed(w, "crash")  # died while idle; sentinel races us
                    left = end - time.monotonic()
                    if left <= 0:
                        raise WorkersUnavailable(
                            f"no ASR worker ready within {WAIT_FOR_WORKER_S:.0f} s "
                            f"({self._count('starting')} starting, crash loop: "
                            f"{self._crash_looping()})")
                    self._cond.wait(left)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may take an idle worker

    def _run_on(self, w: _Worker, pool: str, wire: list[WireJob], deadline_s: float
                ) -> tuple[str, object]:
        """Run one batch on busy worker ``w`` (no lock held while waiting).

        Returns ``("ok", results)``, ``("error", exception)``, ``("hung", None)`` or
        ``("died", why)``.
        """
        with self._cond:
            self._seq += 1
            seq = self._seq
        try:
            w.conn.send((seq, pool, wire))
            ready = mpc.wait([w.conn, w.proc.sentinel], timeout=deadline_s)
            msg = w.conn.recv() if w.conn in ready else None
        except (EOFError, OSError):  # the pipe broke: the worker is dying or dead
            ready, msg = [w.proc.sentinel], None
        if msg is not None and msg[1] == seq:
            with self._cond:
                w.cpu_s = float(msg[3])
                w.jobs += len(wire)
                self._batches += 1
                self._jobs += len(wire)
                if w.state == "busy":
                    w.state = "idle"
                self._cond.notify_all()
            return ("ok", msg[2]) if msg[0] == "ok" else ("error", msg[2])
        if not ready:  # deadline passed: kill it, the supervisor starts another
            _kill(w.proc)
            with self._cond:
                self._failed(w, "hang")
            log.error("worker %s hung on a %s batch past %.1f s: killed", w.pid, pool,
                      deadline_s)
            return "hung", None
        w.proc.join(1.0)
        why = f"exit code {w.proc.exitcode}" if msg is None else f"stray reply {msg[:2]}"
        if w.proc.is_alive():  # a stray reply or a closed pipe from a live process
            _kill(w.proc)
        with self._cond:
            if self._closing:
                self._retire(w)
                raise WorkersUnavailable("the worker pool closed while this batch ran")
            self._failed(w, "crash")
        return "died", why

    def _spawn(self) -> _Worker:
        """Start one worker process (supervisor thread, lock not held)."""
        parent_conn, child_conn = _CTX.Pipe(duplex=True)
        life_r, life_w = _CTX.Pipe(duplex=False)
        proc = _CTX.Process(target=_child_main, name="voxgate-asr-worker", daemon=True,
                            args=(child_conn, life_r, self._factory, True, self._log_level))
        proc.start()
        # Only the child may hold these ends, so that EOF means what it says.
        child_conn.close()
        life_r.close()
        return _Worker(proc, parent_conn, life_w, time.monotonic(), False, pid=proc.pid or 0)

    def _supervise(self) -> None:
        """Keep ``workers + standby_workers`` processes alive; bring starters to ready."""
        first = True
        while True:
            with self._cond:
                if self._closing:
                    return
                live = [w for w in self._workers if w.state != "dead"]
                missing = self._wanted() - len(live)
                delay = max(0.0, self._next_spawn_at - time.monotonic())
            for _ in range(missing if delay == 0 else 0):
                try:
                    w = self._spawn()
                except Exception:
                    log.exception("could not start an ASR worker")
                    with self._cond:
                        self._failures.append(time.monotonic())
                        self._failed_starts += 1
                        self._next_spawn_at = time.monotonic() + CRASH_LOOP_BACKOFF_S
                    break
                with self._cond:
                    w.replacement = not first
                    self._restarts += 0 if first else 1
                    self._workers.append(w)
            first = False
            with self._cond:
                starting = [w for w in self._workers if w.state == "starting"]
                idle = [w for w in self._workers if w.state == "idle"]
            waits: list[Any] = [self._wake_r]
            for w in starting:
                waits += [w.conn, w.proc.sentinel]
            waits += [w.proc.sentinel for w in idle]
            timeout = self.cfg.start_timeout_s
            now = time.monotonic()
            if starting:
                timeout = min(timeout, max(0.0, min(w.spawned_at for w in starting)
                                           + self.cfg.start_timeout_s - now))
            if delay:
                timeout = min(timeout, delay)
            ready = mpc.wait(waits, timeout=timeout)
            if self._wake_r in ready:
                try:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                except (EOFError, OSError):
                    return
            self._check_starting(starting, ready)
            with self._cond:
                for w in idle:
                    if w.proc.sentinel in ready and w.state == "idle":
                        log.error("idle worker %s died (exit code %s)", w.pid,
                                  w.proc.exitcode)
                        self._failed(w, "crash")

    def _check_starting(self, starting: list[_Worker], ready: list[Any]) -> None:
        now = time.monotonic()
        for w in starting:
            msg = None
            if w.conn in ready:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    msg = None
            with self._cond:
                if w.state != "starting":
                    continue
                if msg is not None and msg[0] == "ready":
                    w.state, w.pid, w.cpu_s, w.ready_at = "idle", msg[1], msg[2], now
                    log.info("ASR worker %s ready in %.2f s", w.pid, now - w.spawned_at)
                    self._cond.notify_all()
                    continue
                timed_out = now - w.spawned_at >= self.cfg.start_timeout_s
                if msg is None and w.proc.sentinel not in ready and not timed_out \
                        and w.conn not in ready:
                    continue
                log.error("ASR worker %s failed to start: %s", w.pid,
                          msg[1] if msg else ("timeout" if timed_out else
                                              f"exit code {w.proc.exitcode}"))
                self._failed(w, "start")
            _kill(w.proc)


def _kill(proc: BaseProcess) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(2.0)


def _proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process, from /proc (None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            parts = fh.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _proc_rss_mb(pid: int | None) -> float | None:
    """Resident set size of a live process in MB, from /proc (None elsewhere)."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            pages = int(fh.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)
    except (OSError, IndexError, ValueError):
        return None


# -- the Whisper engine in workers -----------------------------------------------------

def _make_whisper(pools: dict[str, PoolSpec], default_pool: str, threads: int) -> Backend:
    from .engine import WhisperBackend

    return WhisperBackend(pools, default_pool, threads=threads)


class WhisperFront:
    """The parent's side of a Whisper ``ProcessBackend``: pool routing and partial
    policies, with tokenizers but no model sessions (those live in the workers)."""

    def __init__(self, pools: dict[str, PoolSpec], default_pool: str) -> None:
        from .engine import WhisperBackend

        # Never asked to run anything: it loads no engine, it only routes.
        self._routing = WhisperBackend(pools, default_pool)
        self._pools = pools

    def prepare(self) -> None:
        """Export any missing model and load each tokenizer once."""
        for spec in self._pools.values():
            for model in {spec.model, spec.partial_model or spec.model}:
                _tokenizer(model, spec.precision)

    def pools(self) -> dict[str, tuple[str, ...]]:
        return self._routing.pools()

    def select_pool(self, lang_hint: str, domain: str) -> str | None:
        return self._routing.select_pool(lang_hint, domain)

    def lid_pool(self) -> str | None:
        return self._routing.lid_pool()

    def normalize_language(self, code: str) -> str:
        """Whisper's code for ``code`` (``"en-US"`` -> ``"en"``), checked in the parent
        before any audio is sent to a worker.

        Raises:
            ValueError: not one of Whisper's languages (``engine.UnsupportedLanguage``).
        """
        from .engine import normalize_language

        return normalize_language(code)

    def partial_policy(self, pool: str) -> PartialPolicy:
        from .engine import StablePartials

        spec = self._pools[pool]
        return StablePartials(_tokenizer(spec.partial_model or spec.model, spec.precision))

    def run_batch(self, pool: str, jobs: Sequence[Job]) -> list[Recognition | LidResult]:
        raise RuntimeError("WhisperFront does not run models; ProcessBackend's workers do")

    def warmup(self) -> None:
        self.prepare()

    def describe(self) -> dict[str, Any]:
        return self._routing.describe()


@functools.cache
def _tokenizer(model: str, precision: str) -> Any:
    """The model's tokenizer from its cached export, without an onnxruntime session."""
    from .whisper import cache
    from .whisper.ct2 import N_VOCAB_MULTILINGUAL, Ct2Model
    from .whisper.tokenizer import load_tokenizer

    prepared = cache.prepare(model, precision)
    with Ct2Model(prepared.files.model_bin) as ct:
        multilingual = ct.dims().n_vocab >= N_VOCAB_MULTILINGUAL
    return load_tokenizer(str(prepared.files.dir), multilingual)
