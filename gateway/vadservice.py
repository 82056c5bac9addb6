"""The process-wide VAD tick: every session's pending windows in one ONNX call per depth.

Sessions feed audio to their ``VadStream`` and ``poke()`` the service. The tick loop wakes,
runs ``VadBatcher.run`` over every stream with a whole window, and hands each session its
decisions through the session's own bounded channel. With no audio pending, the loop
sleeps on an event: no polling.

The batch runs on the event loop itself by default. A worker thread buys nothing when
the gateway has one core (the loop waits for the thread anyway) and costs a thread
hand-off per tick (~55 us of CPU, measured with the process on one core: ~3 ms a second
at 50-60 ticks a second); with 100 sessions a tick is one ONNX call of about 3 ms
(55 us a window). Pass ``threaded=True`` to overlap the call with the loop on a machine
with a core to spare.

A session that can act on its decisions at once (a sans-IO core) registers a callback
(``on_windows``) instead of a channel: no hop and no task switch per tick per session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from stages.vad import DEFAULT_GATE_DBFS, VadBatcher, VadModel, VadStream, VadWindow

from .logs import fields

log = logging.getLogger("voxgate.gateway.vad")


@dataclass(frozen=True)
class VadFailed:
    """Sent in place of a session's decisions when the tick that held its windows
    failed: those windows are gone, so its stream can no longer follow its audio. The
    session ends (with what it had); the service and every other session go on."""

    error: str


@dataclass(eq=False)
class VadClient:
    """One session's registration: its stream, and where its decisions go (a channel,
    or a callback the tick calls)."""

    stream: VadStream
    results: trio.MemorySendChannel[Any] | None
    tag: str | None = None  # decisions go as ``(tag, windows)`` (None: bare windows)
    closed: bool = False
    on_windows: Callable[[list[VadWindow] | VadFailed], None] | None = None

    def deliver(self, decided: list[VadWindow] | VadFailed) -> None:
        """Hand over one tick's decisions (or the failure) without blocking.

        Raises:
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError: the
                channel cannot take them.
            Exception: whatever the callback raised.
        """
        if self.on_windows is not None:
            self.on_windows(decided)
        elif self.results is not None:
            self.results.send_nowait(decided if self.tag is None else (self.tag, decided))


@dataclass
class VadStats:
    ticks: int = 0
    windows: int = 0
    gated: int = 0  # windows the RMS silence gate decided without the model
    busy_s: float = 0.0
    failed_ticks: int = 0  # ticks whose batch raised (their sessions were failed)
    failed_callbacks: int = 0  # sessions failed because their on_windows raised
    last_tick_ms: float = 0.0
    tick_ms: list[float] = field(default_factory=list)


class VadService:
    """Args:
        model: the shared Silero session.
        min_tick_s: at most one tick per this interval, so windows from many sessions
            gather into one call (16 ms: half a VAD window).
        gate_dbfs: each session's RMS silence gate (``stages.vad.VadStream``); ``None``
            runs the model on every window.
        threaded: run each tick's batch in a worker thread instead of on the loop.
    """

    def __init__(self, model: VadModel | None = None, *, min_tick_s: float = 0.016,
                 on_tick: Callable[[float, int], None] | None = None,
                 gate_dbfs: float | None = DEFAULT_GATE_DBFS,
                 threaded: bool = False) -> None:
        self.on_tick = on_tick  # (tick ms, windows): the metrics layer observes it
        self.batcher = VadBatcher(model or VadModel())
        self.min_tick_s = min_tick_s
        self.gate_dbfs = gate_dbfs
        self.threaded = threaded
        VadStream(gate_dbfs=gate_dbfs)  # validates gate_dbfs now, not at the first session
        self._clients: set[VadClient] = set()
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        self.stats = VadStats()

    def register(self, results: trio.MemorySendChannel[Any] | None = None, *,
                 tag: str | None = None,
                 on_windows: Callable[[list[VadWindow] | VadFailed], None] | None = None,
                 ) -> VadClient:
        """A new session's stream. Its decisions go, once per tick that has any:

        - with ``on_windows``, to that callback, called on the tick's task with the
          windows (or a ``VadFailed``). It must not block (it runs between two ticks of
          every session) and should not raise: an exception unregisters the session and
          sends it a ``VadFailed``. This is the cheapest path: no channel hop and no task
          switch per tick per session (a sans-IO session core takes the windows and
          acts at once).
        - else to ``results`` without a blocking wait, as ``(tag, windows)`` when
          ``tag`` is given: a session passes its own pipeline's channel, so decisions
          need no forwarding task (a channel hop per tick per session costs ~8 us).
        """
        if (results is None) == (on_windows is None):
            raise ValueError("give exactly one of results and on_windows")
        client = VadClient(VadStream(gate_dbfs=self.gate_dbfs), results, tag,
                           on_windows=on_windows)
        self._clients.add(client)
        return client

    def unregister(self, client: VadClient) -> None:
        client.closed = True
        self._clients.discard(client)

    def poke(self) -> None:
        """New audio was fed to some stream."""
        self._wake.set()

    def _fail(self, clients: list[VadClient], exc: Exception, *, tick: bool = True) -> None:
        """Fail ``clients``: their windows are lost (``tick``: the batch raised), or one
        session's callback raised on its decisions."""
        if tick:
            self.stats.failed_ticks += 1
        else:
            self.stats.failed_callbacks += 1
        what = "VAD tick failed" if tick else "a session's VAD callback raised"
        log.error("%s for %d session(s): %r", what, len(clients), exc,
                  exc_info=exc, extra=fields(stage="vad", err_code="INTERNAL"))
        failure = VadFailed(f"{type(exc).__name__}: {exc}"[:200])
        for client in clients:
            client.closed = True
            self._clients.discard(client)
            try:
                client.deliver(failure)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:
                log.exception("a session's VAD callback failed on the failure",
                              extra=fields(stage="vad", err_code="INTERNAL"))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            ready = [c for c in self._clients if c.stream.ready and not c.closed]
            if not ready:
                continue
            streams = [c.stream for c in ready]
            gated0 = self.batcher.gated
            t0 = time.perf_counter()
            try:
                if self.threaded:
                    results = await trio.to_thread.run_sync(
                        self.batcher.run, streams, limiter=self._limiter)
                else:
                    results = self.batcher.run(streams)
            except Exception as exc:
                # A model error must not end the gateway (this loop runs in its top
                # nursery): the sessions of this tick lost windows and are failed, the
                # next tick starts clean.
                self._fail(ready, exc)
                await trio.sleep(self.min_tick_s)
                continue
            elapsed = time.perf_counter() - t0
            windows = sum(len(r) for r in results)
            self.stats.ticks += 1
            self.stats.windows += windows
            self.stats.gated += self.batcher.gated - gated0
            self.stats.busy_s += elapsed
            self.stats.last_tick_ms = elapsed * 1000
            self.stats.tick_ms.append(elapsed * 1000)
            del self.stats.tick_ms[:-1000]
            if self.on_tick is not None:
                self.on_tick(elapsed * 1000, windows)
            broken: list[tuple[VadClient, Exception]] = []
            for client, decided in zip(ready, results, strict=True):
                if decided and not client.closed:
                    try:
                        client.deliver(decided)
                    except (trio.WouldBlock, trio.BrokenResourceError,
                            trio.ClosedResourceError):
                        # A session that cannot take its decisions is being torn down
                        # or hopelessly behind; it notices through its own backlog.
                        client.closed = True
                    except Exception as err:
                        # A callback that raised: that session alone is failed.
                        broken.append((client, err))
            for bad, raised in broken:
                self._fail([bad], raised, tick=False)
            # Let windows from other sessions gather before the next call (and, inline,
            # give the sessions the loop).
            await trio.sleep(max(0.0, self.min_tick_s - elapsed))
