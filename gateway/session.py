"""One client session: the Trio shell around ``gateway.core.SessionCore``.

    client socket ──> ingest ──> SessionCore ──> writer ──> client socket
    VAD service ───> vad task ──┘  │  │  └──> link sender ──> AsrChannel (ASR link)
    AsrChannel events ──> receiver ┘  └──> LID task (/v1/lid) and archive task (store)

The core decides everything (ingest, reorder, pacing, flow control, endpointing, early
start, language ID and its hold, routing, what the client is told); it is sans-IO and
tested synchronously. This module reads sockets and the clock, calls the core, and
performs the actions it returns: sends events, feeds VAD and the archive encoder, drives
the ASR channel, asks LID, stores the recording, keeps the timers. Every action is
performed without waiting, so one client message is one core call and one hand-off
for its frames. Ingest never waits on recognition: a slow ASR delays events, never the
intake of audio (past a high-water mark the client is told to PAUSE, and TCP
back-pressure does the rest). Time is Trio's clock, so the shell runs on a MockClock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import socket
import struct
import sys
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from asr import link
from native.errors import RNNoiseUnavailableError
from stages.archive import CONTENT_TYPE, ArchiveEncoder
from stages.denoise import DenoiseStage
from stages.endpoint import UtteranceCancelled, UtteranceEnded, UtteranceStarted
from stages.lid import LidRequest
from stages.reframe import PcmFrame, SeqBuffer

from . import core as session_core
from .asrlink import AsrChannel, AsrPools, AsrUnavailable, FailoverPolicy
from .config import GatewayConfig
from .core import (
    AcceptAudio,
    AskLid,
    Boundary,
    CoreConfig,
    LinkAudio,
    LinkBegin,
    LinkCancel,
    LinkConfirm,
    LinkEnd,
    LinkFinalize,
    LinkMove,
    SendEvent,
    SessionCore,
    StopIngest,
    lid_answer,
    oversized,
)
from .logs import fields
from .metrics import GatewayMetrics
from .protocol import (
    ErrorCode,
    EventWriter,
    OversizedMessage,
    Ping,
    ProtocolError,
    ProtocolViolation,
    Start,
    dumps,
    parse_text,
)
from .records import (
    ArchiveRetrier,
    ArchiveSink,
    RecordStore,
    default_fallback_dir,
    record_key,
)
from .tracing import SessionTrace
from .vadservice import VadFailed, VadService

if TYPE_CHECKING:
    from .auth import Authenticator
    from .signing import UrlSigner

log = logging.getLogger("voxgate.gateway.session")

FINAL_TIMEOUT_S = 15.0  # after flush, the longest we wait for the last finals
SALVAGE_S = 5.0  # a cancelled session's recording gets this long to be committed
SAMPLE_RATE = session_core.SAMPLE_RATE
HIGH_WATER_S = session_core.HIGH_WATER_S
LOW_WATER_S = session_core.LOW_WATER_S
MAX_IDLE_DEFERRALS = session_core.MAX_IDLE_DEFERRALS
LID_HOLD_S = session_core.LID_HOLD_S  # read when a session starts (tests may patch it)
_lid_answer = lid_answer  # the name tests import


@dataclass
class GatewayContext:
    """Process-wide parts every session uses."""

    cfg: GatewayConfig
    vad: VadService
    pools: AsrPools
    metrics: GatewayMetrics
    store: RecordStore | None
    public_base: str
    shutting_down: trio.Event = field(default_factory=trio.Event)
    drained: trio.Event = field(default_factory=trio.Event)  # shutting down, no sessions
    sessions: set[Session] = field(default_factory=set)
    fallback_dir: Path = field(default_factory=default_fallback_dir)
    # flowId -> a session whose client disconnected, waiting RESUME_WINDOW_S for it
    parked: dict[str, Session] = field(default_factory=dict)
    archive_retrier: ArchiveRetrier | None = None
    # Verifies start.auth.token (None: no authentication; then no tenant either).
    auth: Authenticator | None = None
    # Signs record_url (None: plain URLs, for a store no one else can reach).
    signer: UrlSigner | None = None
    # flowId -> its admitted session (parked ones included): a flowId is live once.
    flows: dict[str, Session] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.auth is None and (self.cfg.auth_jwt_secret or self.cfg.auth_jwt_keys_file):
            # A gateway configured for authentication never runs without it, whoever
            # built this context.
            from .auth import Authenticator

            self.auth = Authenticator.from_config(self.cfg)


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
        self.ws = ws
        self.start: Start | None = None
        self.ew = EventWriter("")
        self.flow_id = ""
        self.tenant = ""  # who owns the flowId and recording (from the token)
        self.record_key = ""  # the recording's store key, scoped by tenant
        self.core: SessionCore | None = None  # once admitted
        self._admitted = False  # holds a session slot (counted toward MAX_SESSIONS)
        self._stop_reason: str | None = None  # why ingest was stopped from elsewhere
        self.reason = "flush"
        self._close_code = 1000
        self._events_in, self._events_out = trio.open_memory_channel[dict[str, Any]](1024)
        # Lists of link commands, in order, for the link sender (bounded by the core's
        # flow control on the frames waiting for the link).
        self._link_in, self._link_out = trio.open_memory_channel[list[Any]](math.inf)
        # VAD decisions, as ("vad", windows) or ("vad", VadFailed), one item a tick.
        self._vad_in, self._vad_out = trio.open_memory_channel[Any](4096)
        # Ogg page bytes (about one a second) and a final None, for the archive task.
        self._archive_in, self._archive_out = trio.open_memory_channel[bytes | None](
            math.inf)
        # The encoder runs inline (no I/O, ~26 us a frame): a channel hop per frame to a
        # task of its own cost more than the encoding.
        self._archive_enc: ArchiveEncoder | None = None
        self._page_ms = 0.0  # encode time since the last page left
        self._vad_client = ctx.vad.register(self._vad_in, tag="vad")
        self._drained = trio.Event()  # the core told ASR to end
        self._asr_done = trio.Event()
        self._writer_done = trio.Event()
        self._archive_result: dict[str, Any] | None = None
        self._archive_told = False  # the client has its ARCHIVE_FAILED
        self._ws_changed = trio.Event()  # a reconnect adopted, or the wait for one ended
        self._resume_given_up = False
        self._finished = trio.Event()  # run() is over (an adopting handler waits on it)
        self.resumes = 0
        self._archive_done = trio.Event()
        self._channel: AsrChannel | None = None
        self._link_pool = "default"  # the route the ASR channel is on
        self._link_lang = ""
        self._resume = trio.Event()  # set when the core lets the client go on
        self._lid_decided = trio.Event()
        self._timer_wake = trio.Event()
        self._timer_at = math.inf
        self._ingest_scope = trio.CancelScope()
        self._dropped_events = 0
        self._stats: dict[str, Any] = {}
        self.trace: SessionTrace | None = None  # its spans, once admitted
        self.denoise: DenoiseStage | None = None
        self._lid_in, self._lid_out = trio.open_memory_channel[LidRequest](8)

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
                await self._send_now(self.ew.error(ErrorCode.INTERNAL, "the session failed",
                                                   fatal=True))
                await self._close(1011)
        finally:
            if self.trace is not None:
                self.trace.close(self.reason, failed=self.reason == "error")
            self._finished.set()
            self._resume_given_up = True
            self._ws_changed.set()
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
            if self._channel is not None:
                with trio.CancelScope(shield=True):
                    await self._channel.aclose()

    async def _run(self) -> None:
        start = await self._await_start()
        if start is None:
            return
        self.start = start
        tenant = await self._authenticate()
        if tenant is None:
            return
        self.tenant = tenant
        parked = self.ctx.parked.get(start.flow_id)
        if (parked is not None and parked.tenant == tenant
                and "seq_header" in start.features):
            # A reconnect within the window, by the same tenant: that session goes on
            # over this socket. (Another tenant's start finds the flowId taken.)
            await parked.adopt(self.ws)
            return
        if not await self._admit():
            return
        self._setup_stages()
        assert self.trace is not None
        token = self.trace.attach()  # the session's tasks (and their logs) are in its span
        try:
            await self._run_admitted()
        finally:
            self.trace.detach(token)

    async def _run_admitted(self) -> None:
        assert self.core is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            self._ack()
            nursery.start_soon(self._vad_task)
            if self.core.lid is not None:
                nursery.start_soon(self._lid_task)
            nursery.start_soon(self._link_sender, nursery)
            nursery.start_soon(self._timer_task)
            if self.cfg.enable_compress and self.ctx.store is not None:
                self._archive_enc = ArchiveEncoder(
                    complexity=self.cfg.archive_opus_complexity)
                nursery.start_soon(self._archive, self._archive_enc)
            else:
                self._archive_done.set()
            reason = await self._ingest()
            self.reason = reason
            await self._finish(reason)
            nursery.cancel_scope.cancel()

    async def _await_start(self) -> Start | None:
        """Read until a valid ``start``; earlier bad messages get non-fatal errors. A
        connection that sends none within ``START_TIMEOUT_S`` is closed: until then it
        holds a socket but no session slot (it is not counted toward MAX_SESSIONS)."""
        with trio.move_on_after(self.cfg.start_timeout_s):
            while True:
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed:
                    return None
                if isinstance(message, OversizedMessage):
                    await self._send_now(self.ew.error(
                        ErrorCode.FRAME_TOO_LARGE, oversized(message), fatal=True))
                    await self._close(1009)
                    return None
                if isinstance(message, ProtocolViolation):
                    await self._send_now(self.ew.error(
                        message.error_code, message.message, fatal=True))
                    await self._close(message.close_code)
                    return None
                if isinstance(message, bytes):
                    await self._send_now(self.ew.error(
                        ErrorCode.NOT_STARTED, "audio before start is not accepted",
                        fatal=False))
                    continue
                try:
                    msg = parse_text(message)
                except ProtocolError as exc:
                    await self._send_now(self.ew.error(exc.code, exc.message, fatal=exc.fatal))
                    if exc.fatal:
                        self.ctx.metrics.rejected.labels(exc.code.value).inc()
                        await self._close(1008)
                        return None
                    continue
                if not isinstance(msg, Start):
                    if isinstance(msg, Ping):
                        await self._send_now(self.ew.pong(msg.id))
                    else:
                        await self._send_now(self.ew.error(
                            ErrorCode.NOT_STARTED, "send start first", fatal=False))
                    continue
                self.flow_id = msg.flow_id
                self.ew.flow_id = msg.flow_id
                return msg
        self.ctx.metrics.rejected.labels(ErrorCode.START_TIMEOUT.value).inc()
        await self._send_now(self.ew.error(
            ErrorCode.START_TIMEOUT, f"no start within {self.cfg.start_timeout_s:g} s",
            fatal=True))
        await self._close(1008)
        return None

    async def _refuse(self, code: ErrorCode, message: str) -> None:
        """Refuse the session at ``start``: a fatal error, ``end``, close."""
        self.ctx.metrics.rejected.labels(code.value).inc()
        log.info("session refused: %s", message, extra=fields(
            flowId=self.flow_id, stage="session", err_code=code.value))
        await self._send_now(self.ew.error(code, message, fatal=True))
        await self._send_now(self.ew.end("error"))
        await self._close(1008)

    async def _authenticate(self) -> str | None:
        """Verify ``start.auth.token`` when authentication is configured; return the
        tenant that owns this session's flowId and recording (the token's ``tenant``
        claim, else ``sub``), ``""`` without authentication (``start.tenant_id`` is the
        client's word: it labels traces but never scopes storage), or None when refused.
        """
        assert self.start is not None
        if self.ctx.auth is None:
            return ""
        from .auth import AuthError

        try:
            claims = self.ctx.auth.verify(self.start.token)
        except AuthError as exc:
            await self._refuse(ErrorCode.UNAUTHORIZED, str(exc))
            return None
        return claims.tenant

    async def _admit(self) -> bool:
        """Take a session slot for this flowId, or refuse it. Checks that await (the
        store) come first; the slot is then taken with no await in between, so two
        starts of one flowId cannot both pass."""
        assert self.start is not None
        problem: tuple[ErrorCode, str] | None = self._capacity_problem()
        key = ""
        if problem is None:
            try:
                key = record_key(self.flow_id, self.tenant)
            except ValueError as exc:
                problem = (ErrorCode.BAD_REQUEST, str(exc))
        if (problem is None and not self.start.flow_id_generated
                and self.ctx.store is not None and self.cfg.enable_compress):
            problem = await self._saved_problem(key)
        if problem is None:
            problem = self._capacity_problem()  # again: the store check awaited
        if problem is not None:
            if problem[0] is ErrorCode.BUSY and not self.ctx.shutting_down.is_set():
                await self._send_now(self.ew.flow("BUSY", reason="capacity",
                                                  retry_after_ms=1000))
            await self._refuse(*problem)
            return False
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
        return True

    def _capacity_problem(self) -> tuple[ErrorCode, str] | None:
        """Why no slot can be taken now (no await: see ``_admit``), or None."""
        ctx, cfg = self.ctx, self.cfg
        if ctx.shutting_down.is_set():
            return ErrorCode.BUSY, "the gateway is shutting down"
        if self.flow_id in ctx.flows:
            # Live here (running or parked): another client must not write into it, nor
            # its tenant start a second recording over it (a resume needs seq_header).
            return ErrorCode.FLOW_EXISTS, (f"flowId {self.flow_id} is in use by a live "
                                           "session")
        if len(ctx.sessions) >= cfg.max_sessions:
            return ErrorCode.BUSY, f"the gateway is at {cfg.max_sessions} sessions"
        cap = cfg.max_sessions_per_tenant
        if cap and self.tenant:
            n = sum(1 for s in ctx.sessions if s.tenant == self.tenant)
            if n >= cap:
                return ErrorCode.RATE_LIMITED, (f"this tenant has {n} sessions open, the "
                                                f"most allowed is {cap}")
        return None

    async def _saved_problem(self, key: str) -> tuple[ErrorCode, str] | None:
        """FLOW_EXISTS when this tenant already has a recording under ``key``: a new
        session would replace it. A store that cannot say lets the session start (it is
        the same tenant's own recording at stake, and a start must not hang on it)."""
        assert self.ctx.store is not None
        try:
            with trio.fail_after(self.cfg.send_timeout_s):
                saved = await self.ctx.store.exists(key)
        except Exception as exc:  # the store's errors vary (OSError, S3, timeouts)
            log.warning("could not check for a saved recording %s: %r", key, exc,
                        extra=fields(flowId=self.flow_id, stage="archive"))
            return None
        if saved:
            return ErrorCode.FLOW_EXISTS, (f"flowId {self.flow_id} already has a saved "
                                           "recording; use a new flowId")
        return None

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
        self._link_pool, self._link_lang = self.core.route_pool, self.core.route_lang
        if self.core.lid_decided:
            self._lid_decided.set()

    def _ack(self) -> None:
        self._emit(self._ack_event())

    def _ack_event(self, *, resumed: bool = False) -> dict[str, Any]:
        assert self.start is not None and self.core is not None
        c = self.cfg
        seqbuf = self.core.seqbuf
        extra: dict[str, Any] = {}
        if resumed and seqbuf is not None:
            extra = {"resumed": True, "next_seq": seqbuf.next_seq}
        return self.ew.ack(
            session={
                **extra,
                "features": sorted(self.start.features),
                "return": sorted(self.start.returns),
                "asr_link_codec": c.asr_link_codec, "frame_ms": 20, "sr": SAMPLE_RATE,
                "partial_interval_ms": c.partial_interval_ms,
                "endpoint_silence_ms": c.endpoint_silence_ms,
                "flush_idle_ms": int(c.flush_idle_s * 1000),
                "denoise": self.denoise is not None,
                "lid": self.core.lid is not None, "asr_pool": self.core.route_pool,
                "record": c.enable_compress and self.ctx.store is not None,
                "lang_pref": self.start.hints.user_lang_pref,
                "flowId_generated": self.start.flow_id_generated,
                **({"trace_id": self.trace.trace_id}
                   if self.trace is not None and self.trace.trace_id else {}),
            },
            limits={
                "max_frame_bytes": c.max_frame_bytes,
                "max_text_frame_bytes": 16 * 1024,
                "max_utterance_ms": int(c.max_utterance_s * 1000),
                "reorder_window": seqbuf.window if seqbuf else 0,
                "max_seq_ahead": seqbuf.max_ahead if seqbuf else 0,
                "max_messages_per_s": c.max_messages_per_s,
                "max_session_ms": int(c.max_session_s * 1000),
            },
        )

    # -- resume ---------------------------------------------------------------------

    def _resumable(self) -> bool:
        return (self.seqbuf is not None and self.cfg.resume_window_s > 0
                and not self.ctx.shutting_down.is_set())

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
                while self.ws is ws:
                    await self._ws_changed.wait()
        finally:
            if self.ctx.parked.get(self.flow_id) is self:
                del self.ctx.parked[self.flow_id]
            if self.ws is ws:  # timed out, or shutdown: the writer stops waiting too
                self._resume_given_up = True
                self._ws_changed.set()
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
        self.ws = ws
        await self._send_on(ws, dumps(self.ew.stamp(self._ack_event(resumed=True))))
        changed, self._ws_changed = self._ws_changed, trio.Event()
        changed.set()
        log.info("client resumed at seq %s", self.seqbuf.next_seq if self.seqbuf else None,
                 extra=fields(flowId=self.flow_id, stage="session"))
        await self._finished.wait()

    async def _socket_back(self, ws: WebSocketConnection) -> bool:
        """The writer's side of a disconnect: wait until ingest has a new socket (True)
        or has given up on one (False)."""
        while self.ws is ws and not self._resume_given_up:
            await self._ws_changed.wait()
        return self.ws is not ws

    # -- performing the core's actions ----------------------------------------------

    def _perform(self) -> None:
        """Do what the core decided, in order and without waiting (so no other task
        can get between a call to the core and its actions)."""
        core = self.core
        assert core is not None
        link: list[Any] = []
        for a in core.drain():
            if isinstance(a, SendEvent):
                self._emit(a.event)
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
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                self._link_in.send_nowait(link)
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
        enc = self._archive_enc
        if enc is None or enc.closed:  # cancelled mid-ingest, the salvage closed it
            return
        t0 = time.perf_counter()
        data = enc.feed(samples)
        ms = (time.perf_counter() - t0) * 1000
        self.stats["compress_ms"] += ms
        self._page_ms += ms
        if data:
            self.ctx.metrics.compress_latency.observe(self._page_ms)
            self._page_ms = 0.0
            self._archive_in.send_nowait(data)

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
            with trio.move_on_at(core.ingest_deadline()):
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed:
                    if self._resumable() and await self._park():
                        continue
                    return "disconnect"
            now = trio.current_time()
            if message is None or now >= core.deadline:
                # The timer is Trio's clock, and a starved event loop lets it run out
                # while the client's frames sit unread: that client is not idle (the
                # core looks again a little later, a few times).
                waiting = now < core.deadline and self._intake_waiting()
                reason = core.idle_tick(now, waiting)
                if reason is not None:
                    return reason
                self._perform()
                continue
            if not isinstance(message, OversizedMessage | ProtocolViolation):
                wait = core.pace(now)
                if wait > 0:
                    # Paced, not refused: nothing the client sent is dropped, and until
                    # the wait is over the next message stays unread, so TCP slows the
                    # client.
                    self._perform()
                    await trio.sleep(wait)
            reason = core.message(message, now)
            self._perform()
            if reason is not None:
                return reason

    def _intake_waiting(self) -> bool:
        """Whether client data is waiting to be read: a message in the WebSocket's
        queue, or bytes in the socket's receive buffer."""
        recv = getattr(self.ws, "_recv_channel", None)
        if recv is not None and recv.statistics().current_buffer_used:
            return True
        return _unread_bytes(getattr(self.ws, "_stream", None)) > 0

    # -- the tasks that feed the core -----------------------------------------------

    async def _vad_task(self) -> None:
        """VAD decisions (one item per VAD tick) into the core."""
        core = self.core
        assert core is not None
        async for _tag, decided in self._vad_out:
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

    # -- the ASR link ---------------------------------------------------------------

    async def _link_sender(self, nursery: trio.Nursery) -> None:
        """Perform the core's link commands in order; the audio of everything queued
        now goes in one DATA frame."""
        try:
            while True:
                cmds = await self._link_out.receive()
                while True:  # take what else is queued: consecutive audio is joined
                    try:
                        cmds += self._link_out.receive_nowait()
                    except trio.WouldBlock:
                        break
                audio: list[Any] = []
                for cmd in cmds:
                    if type(cmd) is LinkAudio:
                        audio += cmd.frames
                        continue
                    if audio:
                        await self._send_frames(audio)
                        audio = []
                    if await self._link_command(cmd, nursery):
                        return
                if audio:
                    await self._send_frames(audio)
        finally:
            if self._channel is None:
                self._asr_done.set()

    async def _link_command(self, cmd: Any, nursery: trio.Nursery) -> bool:
        """Perform one command; True after the last (``LinkEnd``)."""
        kind = type(cmd)
        if kind is LinkBegin:
            (await self._ensure_channel(nursery)).begin(cmd.utterance,
                                                        tentative=cmd.tentative)
        elif kind is LinkConfirm:
            (await self._ensure_channel(nursery)).confirm()
        elif kind is LinkCancel:
            if self._channel is not None:
                await self._channel.cancel()
        elif kind is LinkFinalize:
            if self._channel is not None:
                await self._channel.finalize()
        elif kind is LinkMove:
            await self._move(cmd)
        elif kind is LinkEnd:
            if self._channel is not None:
                await self._channel.end()
            else:
                self._asr_done.set()
            return True
        return False

    def _link_start(self) -> link.Start:
        assert self.start is not None
        hints = self.start.hints
        return link.Start(
            flow_id=self.flow_id, codec=self.cfg.asr_link_codec,
            bitrate=self.cfg.asr_link_bitrate, lang_hint=self._link_lang,
            domain=hints.domain or "default", hotwords=hints.hotwords,
            traceparent=(self.trace.asr_traceparent(self._link_pool)
                         if self.trace is not None else ""),
        )

    async def _move(self, cmd: LinkMove) -> bool:
        """Recognize ``cmd.lang`` from now on: if that is another pool (or another
        language hint), the channel opens a stream there and replays the utterances
        still waiting for their final; the old stream's events are ignored from then on.
        Finals already sent stand; none is sent twice (an utterance is replayed only
        while its final is missing). Returns whether a live stream moved."""
        pool, lang = cmd.pool, cmd.lang
        if (pool, lang) == (self._link_pool, self._link_lang):
            return False
        old_pool, old_lang = self._link_pool, self._link_lang
        self._link_pool, self._link_lang = pool, lang
        if self._channel is None:
            return False  # the first utterance opens on the new route
        t0 = time.perf_counter()
        pending = self._channel.pending_utterances
        try:
            moved = await self._channel.move(pool, self._link_start())
        except AsrUnavailable as exc:
            self._link_pool, self._link_lang = old_pool, old_lang
            # The cause names internal hosts and TLS details: the log gets it, the
            # client a summary.
            log.warning("could not move recognition to pool %s: %s", pool, exc,
                        extra=fields(flowId=self.flow_id, stage="asr", lang=lang,
                                     err_code="ASR_UNAVAILABLE"))
            assert self.core is not None
            self.core.move_failed(pool, lang, old_pool, old_lang)
            self._perform()
            return False
        log.info("recognition moved from pool %s to %s (%s), utterances %s replayed in "
                 "%.0f ms", old_pool, pool, lang, pending, (time.perf_counter() - t0) * 1000,
                 extra=fields(flowId=self.flow_id, stage="lid", lang=lang))
        return moved

    async def _ensure_channel(self, nursery: trio.Nursery) -> AsrChannel:
        """The session's recognition channel, made at the first utterance; it outlives
        every stream failure (see ``AsrChannel``)."""
        if self._channel is None:
            c = self.cfg
            self._channel = AsrChannel(
                self.ctx.pools, self._link_pool, self._link_start(),
                codec=c.asr_link_codec, bitrate=c.asr_link_bitrate,
                complexity=c.asr_link_opus_complexity,
                policy=FailoverPolicy(final_deadline_s=c.asr_final_deadline_s,
                                      budget_s=c.asr_failover_budget_s))
            await nursery.start(self._channel.run)
            nursery.start_soon(self._asr_receiver, self._channel)
        return self._channel

    async def _send_frames(self, batch: list[Any]) -> None:
        core = self.core
        assert core is not None
        if self._channel is not None:
            before = self._channel.opus_failures
            sent_before = self.ctx.pools.counters.bytes_sent
            await self._channel.send_audio(
                [(f.frame.samples, f.frame.start * 1000 // SAMPLE_RATE) for f in batch])
            self.stats["link_bytes"] += self.ctx.pools.counters.bytes_sent - sent_before
            if self._channel.opus_failures > before:
                failed = self._channel.opus_failures - before
                self.stats["pcm_to_opus_fail"] += failed
                self.ctx.metrics.pcm_to_opus_fail.inc(failed)
        core.link_sent(len(batch))
        self._perform()

    async def _asr_receiver(self, channel: AsrChannel) -> None:
        core = self.core
        assert core is not None
        try:
            async with contextlib.aclosing(channel.events()) as events:
                async for ev in events:
                    core.link_event(ev, trio.current_time())
                    self._perform()
        finally:
            self._asr_done.set()

    # -- archive --------------------------------------------------------------------

    async def _archive(self, encoder: ArchiveEncoder) -> None:
        """Store the session's recording as ingest encodes it (pages in, tail at the
        end). A failing store never stops this task from draining its queue (that would
        freeze ingest): the recording goes on into a local fallback and is stored later
        (``ArchiveSink``, ``ArchiveRetrier``); the client gets one non-fatal
        ``ARCHIVE_FAILED``."""
        assert self.ctx.store is not None
        sink = ArchiveSink(self.ctx.store, self.flow_id, self.ctx.fallback_dir,
                           tenant=self.tenant)
        committed = tail_done = False
        try:
            self._archive_problem(await sink.open())
            async for data in self._archive_out:
                if data is None:
                    break
                self._archive_problem(await sink.write(data))
            tail, result = encoder.close()
            tail_done = True
            self._archive_problem(await sink.write(tail))
            span = self.trace.archive_commit(sink.key) if self.trace is not None else None
            t_commit = time.perf_counter()
            try:
                stored, problem = await sink.commit()
                if span is not None:
                    span.set_attribute("voxgate.stored", stored is not None)
                log.info("recording %s", "committed" if stored is not None else "not stored",
                         extra=fields(flowId=self.flow_id, stage="archive",
                                      bytes_out=result.bytes,
                                      latency_ms=round((time.perf_counter() - t_commit)
                                                       * 1000, 1),
                                      err_code=None if stored is not None
                                      else "ARCHIVE_FAILED"))
            finally:
                if span is not None:
                    span.end()
            committed = True
            url = self._record_url(sink.key)
            if stored is None:
                self._archive_problem(problem or "the recording could not be stored",
                                      always=True, url=url)
                if self.ctx.archive_retrier is not None:
                    self.ctx.archive_retrier.poke()
                return
            self._archive_result = {
                "url": url, "duration_ms": result.duration_ms, "size_bytes": result.bytes,
                "sha256": result.sha256, "content_type": CONTENT_TYPE,
            }
        except ValueError as exc:
            log.exception("archive failed for %s", self.flow_id)
            self._error(ErrorCode.INTERNAL, f"recording failed: {exc}", False)
            with trio.CancelScope(shield=True):
                await sink.abort()
            committed = True
        finally:
            if not committed:
                # Cancelled (shutdown grace over, a crash elsewhere): keep what was
                # heard, never delete it.
                await self._salvage(encoder, sink, tail_done)
            self._archive_done.set()

    def _record_url(self, key: str) -> str:
        """The recording's absolute URL: signed and expiring when a signer is set (the
        store holds people's voices; the link is the only way in)."""
        path = f"/records/{key}"
        if self.ctx.signer is not None:
            path = self.ctx.signer.sign(path)
        return f"{self.ctx.public_base}{path}"

    async def _salvage(self, encoder: ArchiveEncoder, sink: ArchiveSink, tail_done: bool
                       ) -> None:
        """Close and commit the recording of the audio received so far (what is still
        queued included), shielded and bounded; a store that cannot take it in time
        leaves it in the fallback folder."""
        with trio.CancelScope(shield=True), trio.move_on_after(SALVAGE_S):
            try:
                while not tail_done:
                    data = self._archive_out.receive_nowait()
                    if data is None:
                        break
                    await sink.write(data)
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                pass
            try:
                if not tail_done:
                    tail, _result = encoder.close()
                    await sink.write(tail)
                stored, problem = await sink.commit()
            except (OSError, ValueError) as exc:
                log.error("recording of %s could not be salvaged: %s", self.flow_id, exc)
                return
            log.info("recording of %s committed on cancellation: %s", self.flow_id,
                     stored.key if stored else problem, extra=fields(
                         flowId=self.flow_id, stage="archive"))
            if stored is None and self.ctx.archive_retrier is not None:
                self.ctx.archive_retrier.poke()

    def _archive_problem(self, problem: str | None, *, always: bool = False,
                         url: str = "") -> None:
        """One ``ARCHIVE_FAILED`` when the store first fails; one more at the end if the
        recording could not be stored (it names where it will appear)."""
        if problem is None or (self._archive_told and not always):
            return
        self._archive_told = True
        self.ctx.metrics.errors.labels(ErrorCode.ARCHIVE_FAILED.value).inc()
        where = f" (it will appear at {url})" if url and "kept" in problem else ""
        self._emit(self.ew.error(ErrorCode.ARCHIVE_FAILED, f"recording: {problem}{where}",
                                 fatal=False))

    # -- the end of a session -------------------------------------------------------

    async def _finish(self, reason: str) -> None:
        core = self.core
        assert core is not None
        core.finish(trio.current_time())
        self._perform()
        # A stream failing at the end is retried for up to the failover budget.
        final_wait_s = FINAL_TIMEOUT_S + self.cfg.asr_failover_budget_s
        with trio.move_on_after(final_wait_s), _shield_if(reason == "server_shutdown"):
            await self._drained.wait()
            while True:  # the event is replaced when a new stream opens after it fired
                done = self._asr_done
                await done.wait()
                if done is self._asr_done:
                    break
        if not self._lid_decided.is_set():
            with trio.move_on_after(core.cfg.lid_hold_s):  # the lid event comes before end
                await self._lid_decided.wait()
        if self.cfg.enable_compress and self.ctx.store is not None:
            self._archive_in.send_nowait(None)
        with trio.move_on_after(FINAL_TIMEOUT_S):
            await self._archive_done.wait()
        returns = core.returns
        if self._archive_result is not None and "record_url" in returns:
            r = self._archive_result
            self._emit(self.ew.record_url(r["url"], duration_ms=r["duration_ms"],
                                          size_bytes=r["size_bytes"], sha256=r["sha256"],
                                          content_type=r["content_type"]))
        m = core.session_metrics(self.cfg.asr_link_codec)
        if "metrics" in returns:
            self._emit(self.ew.metrics(m))
        self._emit(self.ew.end(reason))
        self._events_in.close()
        log.info("session ended: %s", reason, extra=fields(
            flowId=self.flow_id, stage="session", seq=self.ew.seq, sr=SAMPLE_RATE,
            ns=m["audio_ms"] * 1_000_000, bytes_in=m["bytes_in"],
            bytes_out=self.stats["link_bytes"], asr_link_codec=self.cfg.asr_link_codec,
            latency_ms=m["first_partial_ms"], lang=core.lang or None))
        with trio.move_on_after(5):
            await self._writer_done.wait()
        await self._close(self.close_code)

    # -- events out -----------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        try:
            self._events_in.send_nowait(event)
        except trio.WouldBlock:
            # The client has not read 1024 events: it is not reading at all. What it
            # would miss it could not have read anyway; say so in the log (the 1st,
            # 2nd, 4th, 8th... drop: a flood must not flood the log too).
            self._dropped_events += 1
            if self._dropped_events & (self._dropped_events - 1) == 0:
                log.warning("%s: client is not reading; dropped a %s event (%d so far)",
                            self.flow_id, event["type"], self._dropped_events)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _error(self, code: ErrorCode, message: str, fatal: bool) -> None:
        self.ctx.metrics.errors.labels(code.value).inc()
        log.info("error sent: %s", message, extra=fields(
            flowId=self.flow_id, stage="session", err_code=code.value))
        self._emit(self.ew.error(code, message, fatal=fatal))

    async def _send_now(self, event: dict[str, Any]) -> None:
        """Before the writer runs (refusals before the session starts)."""
        if await self._send_on(self.ws, dumps(self.ew.stamp(event))):
            self.ctx.metrics.egress_events.labels(event["type"]).inc()

    async def _send_on(self, ws: WebSocketConnection, data: str) -> bool:
        """Send ``data`` within SEND_TIMEOUT_S; past it the connection is aborted (a
        client that does not read must not hold a task, a slot or its buffers).
        Returns whether it was sent; False when the client is gone."""
        with trio.move_on_after(self.cfg.send_timeout_s) as scope:
            try:
                await ws.send_message(data)
            except ConnectionClosed:
                return False
            return True
        if scope.cancelled_caught:
            log.info("a send took longer than SEND_TIMEOUT_S (%g s): connection aborted",
                     self.cfg.send_timeout_s, extra=fields(flowId=self.flow_id,
                                                           stage="session"))
            await _abort(ws)
        return False

    async def _writer(self) -> None:
        """The only task that writes to the socket; holds back partials to the interval."""
        interval = self.cfg.partial_interval_ms / 1000
        last_partial = -math.inf
        pending: dict[str, Any] | None = None
        try:
            while True:
                event: dict[str, Any] | None = None
                wait = (math.inf if pending is None
                        else last_partial + interval - trio.current_time())
                with trio.move_on_after(max(0.0, wait)):
                    try:
                        event = await self._events_out.receive()
                    except trio.EndOfChannel:
                        if pending is not None:
                            await self._write(pending)
                        return
                if event is None:  # the held partial's time has come
                    assert pending is not None
                    await self._write(pending)
                    last_partial, pending = trio.current_time(), None
                    continue
                if event["type"] == "asr_partial":
                    if trio.current_time() - last_partial >= interval and pending is None:
                        await self._write(event)
                        last_partial = trio.current_time()
                    else:
                        pending = event  # a newer partial replaces the held one
                    continue
                if (event["type"] == "asr_final" and pending is not None
                        and pending["utterance"] == event["utterance"]):
                    pending = None  # the final replaces its partials
                await self._write(event)
        except ConnectionClosed:
            pass
        finally:
            self._writer_done.set()

    async def _write(self, event: dict[str, Any]) -> None:
        data = dumps(self.ew.stamp(event))
        while True:
            ws = self.ws
            if not await self._send_on(ws, data):
                # Gone (or aborted after SEND_TIMEOUT_S). With resume, the event waits
                # for the client's next socket (sent again with the same seq: the client
                # may have had it).
                if self.seqbuf is None or not await self._socket_back(ws):
                    raise ConnectionClosed(CloseReason(1006, "the client is gone"))
                continue
            self.ctx.metrics.egress_events.labels(event["type"]).inc()
            return

    async def _close(self, code: int) -> None:
        """Close the WebSocket; a client that does not answer the closing handshake
        within SEND_TIMEOUT_S has its connection aborted."""
        ws = self.ws
        with trio.move_on_after(self.cfg.send_timeout_s) as scope:
            with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
                await ws.aclose(code)
        if scope.cancelled_caught:
            await _abort(ws)


async def _abort(ws: WebSocketConnection) -> None:
    """Drop a connection without the closing handshake: close its stream (a task stuck
    sending on it wakes with an error) and mark the WebSocket closed, so that
    ``get_message`` and ``send_message`` raise ``ConnectionClosed``. trio-websocket has
    no public call for it; ``_abort_web_socket`` is what it does itself when the stream
    breaks under it (``test_send_timeout_*`` fails if a release changes that)."""
    stream = getattr(ws, "_stream", None)
    inner = stream
    for _ in range(4):  # SSLStream -> SocketStream
        if inner is None or hasattr(inner, "socket"):
            break
        inner = getattr(inner, "transport_stream", None)
    sock = getattr(inner, "socket", None)
    if sock is not None:
        # Linger 0: the close is a reset, and the kernel drops what the client never
        # read, instead of keeping it (and the socket) until the client's window opens.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if stream is not None:
        await trio.aclose_forcefully(stream)
    abort = getattr(ws, "_abort_web_socket", None)
    if abort is not None:
        with contextlib.suppress(Exception):
            await abort()


def _unread_bytes(stream: Any) -> int:
    """Bytes waiting in the kernel receive buffer under ``stream`` (a trio
    SocketStream, possibly wrapped in TLS); 0 when that cannot be told."""
    for _ in range(4):  # SSLStream -> SocketStream
        if stream is None or hasattr(stream, "socket"):
            break
        stream = getattr(stream, "transport_stream", None)
    sock = getattr(stream, "socket", None)
    if sock is None:
        return 0
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(buf, sys.byteorder, signed=True)


@contextlib.contextmanager
def _shield_if(flag: bool) -> Any:
    with trio.CancelScope(shield=flag) as scope:
        yield scope

