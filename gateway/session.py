"""One client session: its lifecycle and tasks, the Trio shell around
``gateway.core.SessionCore``.

    client socket ──> ingest ──> SessionCore ──> Writer ──> client socket
    VAD service ───> vad task ──┘  │  │  └──> link sender ──> AsrChannel (ASR link)
    AsrChannel events ──> receiver ┘  └──> LID task (/v1/lid) and Archiver (store)

The core decides everything about the stream (ingest, reorder, pacing, flow control,
endpointing, early start, language ID and its hold, routing, what the client is told);
``gateway/lifecycle.py`` decides the rest (before ``start``, admission, the ``ack``, the
archive's errors, the last events). Both are sans-IO and tested synchronously. The I/O is
split by concern: ``admission.py`` (await start, authenticate, admit or refuse),
``writer.py`` (the client socket and the only task writing to it), ``linkdriver.py``
(the link commands over the ``AsrChannel``, its events back), ``archiver.py`` (the
recording), ``context.py`` (what sessions share). This module wires them: it reads
client messages and the clock, calls the core, and performs the actions it returns
without waiting, so one client message is one core call and one hand-off for its
frames. Ingest never waits on recognition: a slow
ASR delays events, never the intake of audio (past a high-water mark the client is told
to PAUSE, and TCP back-pressure does the rest). Time is Trio's clock, so the shell runs
on a MockClock.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import numpy as np
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from native.errors import RNNoiseUnavailableError
from stages.denoise import DenoiseStage
from stages.endpoint import UtteranceCancelled, UtteranceEnded, UtteranceStarted
from stages.lid import LidRequest
from stages.reframe import PcmFrame, SeqBuffer

from . import admission, lifecycle
from . import core as session_core
from .archiver import Archiver
from .asrlink import AsrUnavailable
from .context import GatewayContext as GatewayContext  # re-exported (server, tests)
from .core import (
    AcceptAudio,
    AskLid,
    Boundary,
    CoreConfig,
    SendEvent,
    SessionCore,
    StopIngest,
    lid_answer,
)
from .linkdriver import LinkDriver
from .logs import fields
from .protocol import ErrorCode, EventWriter, OversizedMessage, ProtocolViolation, Start, dumps
from .tracing import SessionTrace
from .vadservice import VadFailed
from .writer import ClientSocket, Writer, intake_waiting

log = logging.getLogger("voxgate.gateway.session")

FINAL_TIMEOUT_S = 15.0  # after flush, the longest we wait for the last finals
SAMPLE_RATE = session_core.SAMPLE_RATE
HIGH_WATER_S = session_core.HIGH_WATER_S
LOW_WATER_S = session_core.LOW_WATER_S
MAX_IDLE_DEFERRALS = session_core.MAX_IDLE_DEFERRALS
LID_HOLD_S = session_core.LID_HOLD_S  # read when a session starts (tests may patch it)
_lid_answer = lid_answer  # the name tests import


class _Closed(Exception):
    """The client is gone."""


class _TimedDenoise:
    """Denoise for the core, timed into the session's stats and the metrics."""

    def __init__(self, stage: DenoiseStage, session: Session) -> None:
        self.stage = stage
        self.session = session

    def feed(self, frame: PcmFrame) -> list[PcmFrame]:
        t0 = time.perf_counter()
        out = self.stage.feed(frame)
        ms = (time.perf_counter() - t0) * 1000
        self.session.stats["denoise_ms"] += ms
        self.session.ctx.metrics.dn_latency.observe(ms)
        return out

    def flush(self) -> list[PcmFrame]:
        return self.stage.flush()


class Session:
    def __init__(self, ctx: GatewayContext, ws: WebSocketConnection) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.sock = ClientSocket(ws)
        self.start: Start | None = None
        self.ew = EventWriter("")
        self.writer = Writer(self.sock, self.ew, ctx.cfg, ctx.metrics,
                             resumable=lambda: self.seqbuf is not None)
        self.flow_id = ""
        self.tenant = ""  # who owns the flowId and recording (from the token)
        self.record_key = ""  # the recording's store key, scoped by tenant
        self.core: SessionCore | None = None  # once admitted
        self._admitted = False  # holds a session slot (counted toward MAX_SESSIONS)
        self._stop_reason: str | None = None  # why ingest was stopped from elsewhere
        self.reason = "flush"
        self._close_code = 1000
        self.archiver: Archiver | None = None  # when recordings are stored
        # VAD decisions come by a call on the VAD tick (no channel hop, no task switch).
        self._vad_client = ctx.vad.register(on_windows=self._on_vad)
        self._drained = trio.Event()  # the core told ASR to end
        self._finished = trio.Event()  # run() is over (an adopting handler waits on it)
        self.resumes = 0
        self.asr_link: LinkDriver | None = None  # once admitted
        self._resume = trio.Event()  # set when the core lets the client go on
        self._lid_decided = trio.Event()
        self._timer_wake = trio.Event()
        self._timer_at = math.inf
        self._ingest_scope = trio.CancelScope()
        self._stats: dict[str, Any] = {}
        self.trace: SessionTrace | None = None  # its spans, once admitted
        self.denoise: DenoiseStage | None = None
        self._lid_in, self._lid_out = trio.open_memory_channel[LidRequest](8)

    @property
    def ws(self) -> WebSocketConnection:
        """The client's current socket (a resume replaces it)."""
        return self.sock.ws

    @property
    def stats(self) -> dict[str, Any]:
        return self.core.stats if self.core is not None else self._stats

    @property
    def close_code(self) -> int:
        """1009 after a message over the limit, 1002/1007 (RFC 6455)."""
        return self.core.close_code if self.core is not None else self._close_code

    @close_code.setter
    def close_code(self, code: int) -> None:
        if self.core is not None:
            self.core.close_code = code
        self._close_code = code

    @property
    def seqbuf(self) -> SeqBuffer | None:
        return self.core.seqbuf if self.core is not None else None

    @property
    def first_partial_ms(self) -> float | None:
        return self.core.first_partial_ms if self.core is not None else None

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except _Closed:
            pass
        except Exception:
            # A bug in one session must not pass silently, nor take the server down.
            log.exception("session %s failed", self.flow_id, extra=fields(
                flowId=self.flow_id, stage="session", err_code="INTERNAL"))
            with contextlib.suppress(Exception):
                await self.writer.send_now(self.ew.error(
                    ErrorCode.INTERNAL, "the session failed", fatal=True))
                await self.writer.close(1011)
        finally:
            if self.trace is not None:
                self.trace.close(self.reason, failed=self.reason == "error")
            self._finished.set()
            self.sock.give_up()
            if self._admitted:
                self.ctx.sessions.discard(self)
                self.ctx.metrics.active_sessions.dec()
                if self.ctx.flows.get(self.flow_id) is self:
                    del self.ctx.flows[self.flow_id]
            if self.ctx.parked.get(self.flow_id) is self:
                del self.ctx.parked[self.flow_id]
            if self.ctx.shutting_down.is_set() and not self.ctx.sessions:
                self.ctx.drained.set()
            self.ctx.vad.unregister(self._vad_client)
            if self.denoise is not None:
                self.denoise.close()
            if self.asr_link is not None:
                await self.asr_link.aclose()

    async def _run(self) -> None:
        ctx = self.ctx
        start = await admission.await_start(ctx, self.writer)
        if start is None:
            return
        self.start, self.flow_id = start, start.flow_id
        tenant = await admission.authenticate(ctx, self.writer, start)
        if tenant is None:
            return
        self.tenant = tenant
        parked = ctx.parked.get(start.flow_id)
        if lifecycle.resumes(start, tenant, parked.tenant if parked is not None else None):
            assert parked is not None
            await parked.adopt(self.ws)  # that session goes on over this socket
            return
        key = await admission.admit(ctx, self.writer, start, tenant)
        if key is None:
            return
        self._take_slot(key)  # no await since the last capacity check
        self._setup_stages()
        assert self.trace is not None
        token = self.trace.attach()  # the session's tasks (and their logs) are in its span
        try:
            await self._run_admitted()
        finally:
            self.trace.detach(token)

    def _take_slot(self, key: str) -> None:
        assert self.start is not None
        self._admitted = True
        self.record_key = key
        self.ctx.sessions.add(self)
        self.ctx.flows[self.flow_id] = self
        self.ctx.metrics.active_sessions.inc()
        self.ctx.metrics.sessions.inc()
        self.trace = SessionTrace(self.flow_id, self.start.trace_id,
                                  tenant_id=self.tenant or self.start.tenant_id)
        log.info("session started", extra=fields(
            flowId=self.flow_id, stage="session", sr=SAMPLE_RATE,
            asr_link_codec=self.cfg.asr_link_codec))

    async def _run_admitted(self) -> None:
        assert self.core is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.writer.run)
            self.writer.emit(self._ack_event())
            if self.core.lid is not None:
                nursery.start_soon(self._lid_task)
            assert self.asr_link is not None
            nursery.start_soon(self.asr_link.run, nursery)
            nursery.start_soon(self._timer_task)
            if self.cfg.enable_compress and self.ctx.store is not None:
                self.archiver = Archiver(
                    self.ctx, self.flow_id, self.tenant, ew=self.ew, emit=self.writer.emit,
                    error=self._error, stats=self.stats, trace=self.trace)
                nursery.start_soon(self.archiver.run)
            reason = await self._ingest()
            self.reason = reason
            await self._finish(reason)
            nursery.cancel_scope.cancel()

    def _setup_stages(self) -> None:
        """Denoise and the core (language ID, the starting route), from the config and
        ``start``."""
        assert self.start is not None
        if self.cfg.enable_denoise:
            try:
                self.denoise = DenoiseStage()
            except RNNoiseUnavailableError as exc:
                log.warning("denoise is off: %s", exc)
        self.core = SessionCore(
            CoreConfig.from_gateway(self.cfg, lid_hold_s=LID_HOLD_S), self.start,
            trio.current_time(), ew=self.ew,
            denoise=_TimedDenoise(self.denoise, self) if self.denoise is not None else None,
            metrics=self.ctx.metrics)
        self.core.close_code = self._close_code
        self.asr_link = LinkDriver(self.ctx, self.core, self.start, self.trace, self._perform)
        if self.core.lid_decided:
            self._lid_decided.set()

    def _ack_event(self, *, resumed: bool = False) -> dict[str, Any]:
        assert self.start is not None and self.core is not None
        return lifecycle.ack_event(
            self.ew, self.cfg, self.start, seqbuf=self.core.seqbuf,
            denoise=self.denoise is not None, lid=self.core.lid is not None,
            asr_pool=self.core.route_pool,
            record=self.cfg.enable_compress and self.ctx.store is not None,
            trace_id=self.trace.trace_id if self.trace is not None else "",
            resumed=resumed)

    # -- resume ---------------------------------------------------------------------

    def _resumable(self) -> bool:
        return lifecycle.may_park(seq_header=self.seqbuf is not None,
                                  resume_window_s=self.cfg.resume_window_s,
                                  shutting_down=self.ctx.shutting_down.is_set())

    async def _park(self) -> bool:
        """The client went away: wait ``resume_window_s`` for it to reconnect with the
        same flowId and ``seq_header``. Everything else goes on meanwhile (finals are
        queued for the new socket). Returns whether it came back."""
        assert self.core is not None
        ws = self.ws
        self.ctx.parked[self.flow_id] = self
        log.info("client disconnected; waiting %.0f s for it to resume",
                 self.cfg.resume_window_s, extra=fields(flowId=self.flow_id,
                                                        stage="session"))
        try:
            with trio.move_on_after(self.cfg.resume_window_s):
                await self.sock.replaced(ws)
        finally:
            if self.ctx.parked.get(self.flow_id) is self:
                del self.ctx.parked[self.flow_id]
            if self.ws is ws:  # timed out, or shutdown: the writer stops waiting too
                self.sock.give_up()
        if self.ws is ws:
            return False
        self.core.touch(trio.current_time())
        return True

    async def adopt(self, ws: WebSocketConnection) -> None:
        """Continue this parked session over ``ws`` (a reconnect): an ``ack`` with
        ``resumed`` and ``next_seq`` (the first seq the client must send again), then
        the events queued meanwhile. Returns when the session ends."""
        if self.ctx.parked.get(self.flow_id) is self:
            del self.ctx.parked[self.flow_id]
        self.resumes += 1
        self.sock.ws = ws  # events sent from now on go there, after this ack
        await self.writer.send_on(ws, dumps(self.ew.stamp(self._ack_event(resumed=True))))
        self.sock.replace(ws)  # wakes the writer and ingest, waiting on the old one
        log.info("client resumed at seq %s", self.seqbuf.next_seq if self.seqbuf else None,
                 extra=fields(flowId=self.flow_id, stage="session"))
        await self._finished.wait()

    # -- performing the core's actions ----------------------------------------------

    def _perform(self) -> None:
        """Do what the core decided, in order and without waiting (so no other task
        can get between a call to the core and its actions)."""
        core = self.core
        assert core is not None
        link: list[Any] = []
        for a in core.drain():
            if isinstance(a, SendEvent):
                self.writer.emit(a.event)
            elif isinstance(a, AcceptAudio):
                self._accept(a.frames)
            elif isinstance(a, Boundary):
                self._boundary(a.event)
            elif isinstance(a, AskLid):
                try:
                    self._lid_in.send_nowait(a.request)
                except (trio.WouldBlock, trio.ClosedResourceError):  # pragma: no cover
                    log.warning("%s: language ID request dropped", self.flow_id)
            elif isinstance(a, StopIngest):
                self._stop(a.reason)
            else:
                link.append(a)
        if link:
            assert self.asr_link is not None
            self.asr_link.send(link)
        if not core.paused:
            self._resume.set()
        if core.drained:
            self._drained.set()
        if core.lid_over:
            self._lid_decided.set()
        if core.next_timer() != self._timer_at:
            self._timer_wake.set()

    def _accept(self, frames: tuple[PcmFrame, ...]) -> None:
        """Accepted audio: to VAD (one poke per message) and the archive encoder."""
        # The frames are contiguous: VAD and the encoder take them as one run.
        samples = (frames[0].samples if len(frames) == 1
                   else np.concatenate([f.samples for f in frames]))
        self._vad_client.stream.feed(samples)
        self.ctx.vad.poke()
        if self.archiver is not None:
            self.archiver.feed(samples)

    def _boundary(self, ev: Any) -> None:
        if self.trace is None:
            return
        if isinstance(ev, UtteranceStarted):
            self.trace.utterance_started(ev.index)
        elif isinstance(ev, UtteranceEnded | UtteranceCancelled):
            self.trace.utterance_ended(
                ev.index, cancelled=isinstance(ev, UtteranceCancelled))

    # -- ingest ---------------------------------------------------------------------

    def stop_ingest(self) -> None:
        """Graceful shutdown: stop taking audio; the session then finishes its finals."""
        self._ingest_scope.cancel()

    async def _ingest(self) -> str:
        """Read client frames until flush, disconnect, idle, the session's maximum
        duration, a fatal error or shutdown; return why."""
        with self._ingest_scope:
            if self.ctx.shutting_down.is_set():
                self._ingest_scope.cancel()
            return await self._ingest_loop()
        return self._stop_reason or "server_shutdown"

    def _stop(self, reason: str) -> None:
        """End ingest from another task (the session then finishes as after a flush)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._ingest_scope.cancel()

    async def _ingest_loop(self) -> str:
        core = self.core
        assert core is not None
        while True:
            if core.paused:
                # Held (flow PAUSE): a held client is not idle. MAX_SESSION_S still holds.
                with trio.move_on_at(core.deadline):
                    while core.paused:
                        self._resume = trio.Event()
                        await self._resume.wait()
                core.touch(trio.current_time())
            message: str | bytes | OversizedMessage | ProtocolViolation | None = None
            closed = False
            # One cancel scope for a run of messages, its deadline moved after each (the
            # core's idle and duration timers): a scope per message cost ~7 % of the
            # gateway's CPU at 100 sessions.
            with trio.CancelScope(deadline=core.ingest_deadline()) as scope:
                while True:
                    try:
                        message = await self.ws.get_message()
                    except ConnectionClosed:
                        closed = True
                        break
                    now = trio.current_time()
                    if now >= core.deadline:
                        break
                    if not isinstance(message, OversizedMessage | ProtocolViolation):
                        wait = core.pace(now)
                        if wait > 0:
                            # Paced, not refused: nothing the client sent is dropped, and
                            # until the wait is over the next message stays unread, so
                            # TCP slows the client. The wait is not idleness.
                            self._perform()
                            scope.deadline = math.inf
                            await trio.sleep(wait)
                    reason = core.message(message, now)
                    self._perform()
                    if reason is not None:
                        return reason
                    message = None
                    if core.paused:
                        break
                    scope.deadline = core.ingest_deadline()
            if closed:
                # The wait for a reconnect has its own bound (RESUME_WINDOW_S), not the
                # idle timer's.
                if self._resumable() and await self._park():
                    continue
                return "disconnect"
            if core.paused and message is None and not scope.cancelled_caught:
                continue
            now = trio.current_time()
            # The timer is Trio's clock, and a starved event loop lets it run out while
            # the client's frames sit unread: that client is not idle (the core looks
            # again a little later, a few times).
            waiting = now < core.deadline and intake_waiting(self.ws)
            reason = core.idle_tick(now, waiting)
            if reason is not None:
                return reason
            self._perform()

    # -- the tasks that feed the core -----------------------------------------------

    def _on_vad(self, decided: Any) -> None:
        """VAD decisions of one tick, given to the core on the VAD service's task (see
        ``VadService.register``: this must not block; what it raises fails only this
        session's VAD)."""
        core = self.core
        if core is None:  # not admitted: no audio was fed, nothing to decide
            return
        if isinstance(decided, VadFailed):
            core.vad_failure(trio.current_time())
        else:
            core.vad(decided, trio.current_time())
        self._perform()

    async def _timer_task(self) -> None:
        """The core's timers (the LID hold of a final)."""
        core = self.core
        assert core is not None
        while True:
            wake = self._timer_wake
            self._timer_at = core.next_timer()
            with trio.move_on_at(self._timer_at):
                await wake.wait()
            if wake.is_set():
                self._timer_wake = trio.Event()
            core.tick(trio.current_time())
            self._perform()

    async def _lid_task(self) -> None:
        """Send the core's requests to ``/v1/lid`` (one at a time) and feed back the
        answers; runs beside recognition, which goes on on the starting pool meanwhile."""
        core = self.core
        assert core is not None
        lid_pool = self.cfg.route("*")
        async for req in self._lid_out:
            t0 = time.perf_counter()
            try:
                answer = await self.ctx.pools.lid(lid_pool, req.pcm.astype("<i2").tobytes())
            except AsrUnavailable as exc:
                log.warning("%s: language ID failed: %s", self.flow_id, exc)
                core.lid_failed(trio.current_time())
                self._perform()
                continue
            ms = (time.perf_counter() - t0) * 1000
            self.stats["lid_ms"] += ms
            self.ctx.metrics.lid_latency.observe(ms)
            core.lid_answer(answer, trio.current_time())
            self._perform()

    # -- the end of a session -------------------------------------------------------

    async def _finish(self, reason: str) -> None:
        core = self.core
        assert core is not None
        core.finish(trio.current_time())
        self._perform()
        wait_s = lifecycle.final_wait_s(FINAL_TIMEOUT_S, self.cfg.asr_failover_budget_s)
        assert self.asr_link is not None
        with trio.move_on_after(wait_s), _shield_if(reason == "server_shutdown"):
            await self._drained.wait()
            await self.asr_link.done.wait()
        if not self._lid_decided.is_set():
            with trio.move_on_after(core.cfg.lid_hold_s):  # the lid event comes before end
                await self._lid_decided.wait()
        archiver = self.archiver
        if archiver is not None:
            archiver.end_input()
            with trio.move_on_after(FINAL_TIMEOUT_S):
                await archiver.done.wait()
        m = core.session_metrics(self.cfg.asr_link_codec)
        for event in lifecycle.end_events(
                self.ew, reason, core.returns, metrics=m,
                archive=archiver.result if archiver is not None else None):
            self.writer.emit(event)
        self.writer.close_input()
        log.info("session ended: %s", reason, extra=fields(
            flowId=self.flow_id, stage="session", seq=self.ew.seq, sr=SAMPLE_RATE,
            ns=m["audio_ms"] * 1_000_000, bytes_in=m["bytes_in"],
            bytes_out=self.stats["link_bytes"], asr_link_codec=self.cfg.asr_link_codec,
            latency_ms=m["first_partial_ms"], lang=core.lang or None))
        with trio.move_on_after(5):
            await self.writer.done.wait()
        await self.writer.close(self.close_code)

    def _error(self, code: ErrorCode, message: str, fatal: bool) -> None:
        self.ctx.metrics.errors.labels(code.value).inc()
        log.info("error sent: %s", message, extra=fields(
            flowId=self.flow_id, stage="session", err_code=code.value))
        self.writer.emit(self.ew.error(code, message, fatal=fatal))


@contextlib.contextmanager
def _shield_if(flag: bool) -> Any:
    with trio.CancelScope(shield=flag) as scope:
        yield scope
