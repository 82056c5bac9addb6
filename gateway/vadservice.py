"""The process-wide VAD tick: every session's pending windows in one ONNX call per depth.

Sessions feed audio to their ``VadStream`` and ``poke()`` the service. The tick loop wakes,
runs ``VadBatcher.run`` over every stream with a whole window, and hands each session its
decisions through the session's own bounded channel. With no audio pending, the loop
sleeps on an event: no polling.

The batch runs on the event loop itself by default. A worker thread buys nothing when
the gateway has one core (the loop waits for the thread anyway) and costs a thread
hand-off per tick; with 100 sessions a tick is one ONNX call of about 2 ms. Pass
``threaded=True`` to overlap the call with the loop on a machine with a core to spare.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from stages.vad import DEFAULT_GATE_DBFS, VadBatcher, VadModel, VadStream

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
    """One session's registration: its stream, and where its decisions go."""

    stream: VadStream
    results: trio.MemorySendChannel[Any]
    tag: str | None = None  # decisions go as ``(tag, windows)`` (None: bare windows)
    closed: bool = False


@dataclass
class VadStats:
    ticks: int = 0
    windows: int = 0
    gated: int = 0  # windows the RMS silence gate decided without the model
    busy_s: float = 0.0
    failed_ticks: int = 0  # ticks whose batch raised (their sessions were failed)
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

    def register(self, results: trio.MemorySendChannel[Any], *, tag: str | None = None
                 ) -> VadClient:
        """A new session's stream. Its decisions are sent to ``results`` without a
        blocking wait, as ``(tag, windows)`` when ``tag`` is given: a session passes its
        own pipeline's channel, so decisions need no forwarding task (a channel hop per
        tick per session costs ~8 us)."""
        client = VadClient(VadStream(gate_dbfs=self.gate_dbfs), results, tag)
        self._clients.add(client)
        return client

    def unregister(self, client: VadClient) -> None:
        client.closed = True
        self._clients.discard(client)

    def poke(self) -> None:
        """New audio was fed to some stream."""
        self._wake.set()

    def _fail(self, clients: list[VadClient], exc: Exception) -> None:
        self.stats.failed_ticks += 1
        log.error("VAD tick failed for %d session(s): %r", len(clients), exc,
                  exc_info=exc, extra=fields(stage="vad", err_code="INTERNAL"))
        failure = VadFailed(f"{type(exc).__name__}: {exc}"[:200])
        for client in clients:
            client.closed = True
            self._clients.discard(client)
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                     trio.ClosedResourceError):
                client.results.send_nowait(
                    failure if client.tag is None else (client.tag, failure))

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
            for client, decided in zip(ready, results, strict=True):
                if decided and not client.closed:
                    try:
                        client.results.send_nowait(
                            decided if client.tag is None else (client.tag, decided))
                    except (trio.WouldBlock, trio.BrokenResourceError,
                            trio.ClosedResourceError):
                        # A session that cannot take its decisions is being torn down
                        # or hopelessly behind; it notices through its own backlog.
                        client.closed = True
            # Let windows from other sessions gather before the next call (and, inline,
            # give the sessions the loop).
            await trio.sleep(max(0.0, self.min_tick_s - elapsed))
