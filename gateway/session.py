"""One client session: a Trio nursery that owns every task of the session.

    ingest ──frames──> pipeline (VAD decisions, endpointer, speech gate) ──> asr sender
       │                    ^                                                   │
       ├──> VAD service ────┘ (batched across sessions)            ASR link stream
       └──> archive (Ogg Opus, the whole session)                           │
    writer <── events (ack, asr_partial throttled, asr_final, ...) <── asr receiver

The stages are sans-IO (``stages/``); this module only moves data between them, keeps
time, and talks to sockets. Ingest never waits on recognition: a slow ASR delays events,
never the intake of audio (past a high-water mark the client is told to PAUSE, and TCP
back-pressure does the rest).
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

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from asr import link
from native.errors import RNNoiseUnavailableError
from stages.archive import CONTENT_TYPE, ArchiveEncoder
from stages.denoise import DenoiseStage
from stages.endpoint import (
    EndpointConfig,
    Endpointer,
    SendFrame,
    SpeechGate,
    UtteranceCancelled,
    UtteranceEnded,
    UtteranceStarted,
    UtteranceTentative,
)
from stages.lid import LidDecision, LidPlanner, LidRequest
from stages.reframe import IngestError, PcmFrame, Reframer, SeqBuffer

from .asrlink import UNAVAILABLE, AsrChannel, AsrPools, AsrUnavailable, FailoverPolicy
from .config import GatewayConfig
from .logs import fields
from .metrics import GatewayMetrics
from .protocol import (
    WHISPER_LANGUAGES,
    ErrorCode,
    EventWriter,
    Finalize,
    Flush,
    MessageRate,
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
HIGH_WATER_S = 5.0  # audio not yet through VAD before the client is told to PAUSE
LOW_WATER_S = 1.0
IDLE_RECHECK_S = 0.5  # a starved loop's idle timer looks again after this long
# ... at most this many times in a row without new audio: a client that keeps a message
# always waiting (duplicates, pings) is not thereby active.
MAX_IDLE_DEFERRALS = 10
SALVAGE_S = 5.0  # a cancelled session's recording gets this long to be committed
ASR_QUEUE_HIGH_FRAMES = 250  # 5 s of frames waiting for the ASR link: PAUSE
ASR_QUEUE_LOW_FRAMES = 50
SAMPLE_RATE = 16000
LID_HOLD_S = 2.0  # an utterance's final waits at most this long for a pending LID answer
LID_ROUTE_MIN_SCORE = 0.4  # a decision less sure than this is reported but not routed on


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


@dataclass
class _Utt:
    index: int
    start_sample: int
    end_sample: int | None = None


class _Closed(Exception):
    """The client is gone."""


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
        self._admitted = False  # holds a session slot (counted toward MAX_SESSIONS)
        self._deadline = math.inf  # time.monotonic() at which MAX_SESSION_S ends it
        self._stop_reason: str | None = None  # why ingest was stopped from elsewhere
        self._vad_failed = False
        self._fresh_samples = 0  # new audio since the idle timer was last reset
        self._deferrals = 0  # idle checks put off since then (see _ingest_loop)
        self.rate = MessageRate(self.cfg.max_messages_per_s)
        self._dropped_events = 0  # events the client was too far behind to be sent
        self.reason = "flush"
        self.close_code = 1000  # 1009 after a message over the limit, 1002/1007 (RFC 6455)
        self.reframer = Reframer(max_chunk_bytes=self.cfg.max_frame_bytes)
        self.seqbuf: SeqBuffer | None = None
        self.endpointer = Endpointer(EndpointConfig(
            threshold=self.cfg.vad_threshold,
            neg_threshold=max(0.05, self.cfg.vad_threshold - 0.15),
            min_speech_ms=self.cfg.vad_min_speech_ms,
            endpoint_silence_ms=self.cfg.endpoint_silence_ms,
            preroll_ms=self.cfg.preroll_ms,
            max_utterance_s=self.cfg.max_utterance_s,
            early_start=self.cfg.early_start,
        ))
        self.gate = SpeechGate(self.cfg.preroll_ms)
        self._events_in, self._events_out = trio.open_memory_channel[dict[str, Any]](1024)
        self._pipe_in, self._pipe_out = trio.open_memory_channel[Any](4096)
        self._asr_in, self._asr_out = trio.open_memory_channel[Any](4096)
        # Ogg page bytes (about one a second) and a final None, for the archive task.
        self._archive_in, self._archive_out = trio.open_memory_channel[bytes | None](4096)
        # The encoder runs inline in ingest (no I/O, ~26 us a frame): a channel hop per
        # frame to a task of its own cost more than the encoding.
        self._archive_enc: ArchiveEncoder | None = None
        self._page_ms = 0.0  # encode time since the last page left
        self._vad_client = ctx.vad.register(self._pipe_in, tag="vad")
        self._vad_fed = 0  # samples given to VAD
        self._drained = trio.Event()  # the pipeline handled flush and told ASR to end
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
        self._ended_at: dict[int, float] = {}  # utterance -> when it ended, until its final
        self._open_utt: _Utt | None = None
        self._skip_utterance = False  # ASR refused this utterance: record only
        self._paused = False
        self._resume = trio.Event()
        self._asr_behind = False  # the ASR service said flow BEHIND (until OK)
        self._tentative = False  # an early-started utterance is open, not yet confirmed
        self._lid_hold: list[Any] | None = None  # its frames, for LID once confirmed
        self._ingest_scope = trio.CancelScope()
        self._last_audio = time.monotonic()
        self._first_speech_sent: float | None = None
        self.first_partial_ms: float | None = None
        self.stats: dict[str, Any] = {"bytes_in": 0, "speech_samples": 0, "utterances": 0,
                                      "compress_ms": 0.0, "pcm_to_opus_fail": 0,
                                      "link_bytes": 0, "false_starts": 0}
        self._lang = ""
        self.trace: SessionTrace | None = None  # its spans, once admitted
        self.denoise: DenoiseStage | None = None
        self.lid: LidPlanner | None = None
        self._lid_route = False  # LID may move recognition (user_lang_pref is auto)
        self._lid_decided = trio.Event()
        self._lid_answered = trio.Event()  # set at every answer (or failure)
        self._lid_target: str | None = None  # the language LID routes to, once decided
        self._lid_settled = False  # no move can come any more: stop keeping packets
        self._lid_in, self._lid_out = trio.open_memory_channel[LidRequest](8)
        self._route_lang = ""  # lang_hint of the recognition stream
        self._route_pool = "default"
        self.stats["denoise_ms"] = 0.0
        self.stats["lid_ms"] = 0.0

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
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            self._ack()
            nursery.start_soon(self._pipeline)
            if self.lid is not None:
                nursery.start_soon(self._lid_task, nursery)
            nursery.start_soon(self._asr_sender, nursery)
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
                        ErrorCode.FRAME_TOO_LARGE, _oversized(message), fatal=True))
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
        self._deadline = time.monotonic() + self.cfg.max_session_s
        self.trace = SessionTrace(self.flow_id, self.start.trace_id,
                                  tenant_id=self.tenant or self.start.tenant_id)
        log.info("session started", extra=fields(
            flowId=self.flow_id, stage="session", sr=SAMPLE_RATE,
            asr_link_codec=self.cfg.asr_link_codec))
        if "seq_header" in self.start.features:
            self.seqbuf = SeqBuffer(conceal=True)
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
        """Denoise, language ID and the starting route, from the config and ``start``."""
        assert self.start is not None
        if self.cfg.enable_denoise:
            try:
                self.denoise = DenoiseStage()
            except RNNoiseUnavailableError as exc:
                log.warning("denoise is off: %s", exc)
        pref = self.start.hints.user_lang_pref
        auto = pref in ("", "auto")
        self._route_lang = self.cfg.asr_default_lang if auto else pref
        self._route_pool = self.cfg.route(self._route_lang)
        self._lid_route = auto and "asr" in self._returns()
        if self._lid_route or "lid" in self._returns():
            self.lid = LidPlanner(self.cfg.lid_first_n_s, self.cfg.lid_min_score)
        else:
            self._lid_decided.set()

    def _ack(self) -> None:
        self._emit(self._ack_event())

    def _ack_event(self, *, resumed: bool = False) -> dict[str, Any]:
        assert self.start is not None
        c = self.cfg
        extra: dict[str, Any] = {}
        if resumed and self.seqbuf is not None:
            extra = {"resumed": True, "next_seq": self.seqbuf.next_seq}
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
                "lid": self.lid is not None, "asr_pool": self._route_pool,
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
                "reorder_window": self.seqbuf.window if self.seqbuf else 0,
                "max_seq_ahead": self.seqbuf.max_ahead if self.seqbuf else 0,
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
        self._last_audio = time.monotonic()
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
        while True:
            if self._paused:
                # Held (flow PAUSE from anywhere, e.g. the ASR said BEHIND while we
                # waited for a frame): a held client is not idle. MAX_SESSION_S still
                # holds.
                with trio.move_on_at(_trio_deadline(self._deadline)):
                    await self._resume.wait()
                self._last_audio = time.monotonic()
            deadline = min(self._last_audio + self.cfg.flush_idle_s, self._deadline)
            message: str | bytes | OversizedMessage | ProtocolViolation | None = None
            with trio.move_on_at(_trio_deadline(deadline)) as idle:
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed:
                    if self._resumable() and await self._park():
                        continue
                    return "disconnect"
            if time.monotonic() >= self._deadline:
                log.info("session reached MAX_SESSION_S (%g s)", self.cfg.max_session_s,
                         extra=fields(flowId=self.flow_id, stage="session"))
                return "max_duration"
            if (idle.cancelled_caught and self._deferrals < MAX_IDLE_DEFERRALS
                    and self._intake_waiting()):
                # The timer is wall time, and a starved event loop lets it run out while
                # the client's frames sit unread: that client is not idle. Look again a
                # little later (by then the waiting message has been read, and audio
                # resets the timer; a lone ping does not).
                self.ctx.metrics.idle_deferred.inc()
                self._deferrals += 1
                self._last_audio = (time.monotonic() - self.cfg.flush_idle_s
                                    + IDLE_RECHECK_S)
                continue
            if idle.cancelled_caught or message is None:
                return "idle"
            if isinstance(message, OversizedMessage):
                # Fatal, but the audio already accepted is finalized and recorded first.
                self._error(ErrorCode.FRAME_TOO_LARGE, _oversized(message), True)
                self.close_code = 1009
                return "error"
            if isinstance(message, ProtocolViolation):
                # The WebSocket parser has stopped at a broken frame: nothing more can be
                # read, but what was accepted is finalized and recorded before the close.
                self._error(message.error_code, message.message, True)
                self.close_code = message.close_code
                return "error"
            verdict = self.rate.take(time.monotonic())
            if verdict.wait_s > 0:
                # Paced, not refused: nothing the client sent is dropped, and until the
                # wait is over the next message stays unread, so TCP slows the client.
                self._paced(verdict)
                await trio.sleep(verdict.wait_s)
            if isinstance(message, bytes):
                await self._audio(message)
                continue
            try:
                msg = parse_text(message)
            except ProtocolError as exc:
                self._error(exc.code, exc.message, exc.fatal)
                if exc.fatal:
                    return "error"
                continue
            if isinstance(msg, Flush):
                return "flush"
            if isinstance(msg, Finalize):
                await self._pipe_in.send(("finalize",))
            elif isinstance(msg, Ping):
                self._emit(self.ew.pong(msg.id))
            elif isinstance(msg, Start):
                self._error(ErrorCode.ALREADY_STARTED, "the session has started", False)

    def _paced(self, verdict: Any) -> None:
        """At most one non-fatal ``RATE_LIMITED`` a second tells a client that it is
        over MAX_MESSAGES_PER_S and is being read more slowly."""
        self.stats["rate_paced"] = self.stats.get("rate_paced", 0) + 1
        if verdict.notify:
            self._error(ErrorCode.RATE_LIMITED, (
                f"over {self.cfg.max_messages_per_s:g} messages a second: this connection "
                f"is read at that rate ({verdict.paced} message(s) waited since the last "
                "notice); nothing was dropped. Send larger frames to go faster"), False)

    def _intake_waiting(self) -> bool:
        """Whether client data is waiting to be read or handled: a message in the
        WebSocket's queue, bytes in the socket's receive buffer, or frames this
        session's pipeline has not taken yet."""
        recv = getattr(self.ws, "_recv_channel", None)
        if recv is not None and recv.statistics().current_buffer_used:
            return True
        if self._pipe_out.statistics().current_buffer_used:
            return True
        return _unread_bytes(getattr(self.ws, "_stream", None)) > 0

    async def _audio(self, data: bytes) -> None:
        payloads = [data]
        if self.seqbuf is not None:
            try:
                seq, _pts, payload = SeqBuffer.parse(data)
            except IngestError as exc:
                self._error(ErrorCode(exc.code), exc.message, False)
                return
            # Check the payload before the buffer takes it: a bad one must not leave a
            # hole the buffer waits for.
            if len(payload) % 2 or len(payload) > self.cfg.max_frame_bytes:
                code = "ODD_BYTE_COUNT" if len(payload) % 2 else "FRAME_TOO_LARGE"
                self._error(ErrorCode(code), f"seq {seq}: payload of {len(payload)} bytes "
                            "refused", False)
                return
            try:
                payloads = self.seqbuf.feed(seq, payload)
            except IngestError as exc:
                self._error(ErrorCode(exc.code), exc.message, False)
                return
        frames: list[PcmFrame] = []
        for p in payloads:
            try:
                frames += self.reframer.feed(p)
            except IngestError as exc:
                self._error(ErrorCode(exc.code), exc.message, False)
                return
            self.stats["bytes_in"] += len(p)
            self.ctx.metrics.ingress_bytes.inc(len(p))
            self._fresh_samples += len(p) // 2
        # Only new audio is activity, and only a frame's worth of it: duplicates, empty
        # frames and a sample every few seconds must not hold a session open forever.
        if self._fresh_samples >= self.reframer.frame_samples:
            self._fresh_samples = self._deferrals = 0
            self._last_audio = time.monotonic()
        await self._take(frames)

    async def _take(self, frames: list[PcmFrame]) -> None:
        for f in frames:
            self._vad_client.stream.feed(f.samples)
            self._vad_fed += len(f.samples)
            await self._pipe_in.send(("frame", f))
            if self._archive_enc is not None:
                await self._archive_feed(f)
        if frames:
            self.ctx.vad.poke()
        await self._backpressure()

    async def _archive_feed(self, f: PcmFrame) -> None:
        enc = self._archive_enc
        assert enc is not None
        if enc.closed:  # cancelled mid-ingest, the salvage closed it: nothing to add
            return
        t0 = time.perf_counter()
        data = enc.feed(f.samples)
        ms = (time.perf_counter() - t0) * 1000
        self.stats["compress_ms"] += ms
        self._page_ms += ms
        if data:
            self.ctx.metrics.compress_latency.observe(self._page_ms)
            self._page_ms = 0.0
            await self._archive_in.send(data)

    async def _backpressure(self) -> None:
        """Hold the client (stop reading: TCP pushes back) while something downstream is
        behind; what was accepted stays queued, nothing is dropped."""
        if not self._paused:
            reason = self._pressure()
            if reason is not None:
                self._paused = True
                self._resume = trio.Event()
                self._emit(self.ew.flow("PAUSE", reason=reason,
                                        retry_after_ms=int(LOW_WATER_S * 1000)))
        if self._paused:
            await self._resume.wait()
            # Time spent held is not the client's idleness.
            self._last_audio = time.monotonic()

    def _pressure(self) -> str | None:
        """Why the client should be held now, or None."""
        if (not self._vad_failed
                and (self._vad_fed - self.endpointer.position) / SAMPLE_RATE > HIGH_WATER_S):
            return "audio is arriving faster than it is processed"
        if self._asr_behind:
            return "recognition is behind"
        if self._asr_out.statistics().current_buffer_used > ASR_QUEUE_HIGH_FRAMES:
            return "the link to recognition is behind"
        return None

    def _check_resume(self) -> None:
        if not self._paused or self._asr_behind:
            return
        behind = (self._vad_fed - self.endpointer.position) / SAMPLE_RATE
        if (behind < LOW_WATER_S
                and self._asr_out.statistics().current_buffer_used < ASR_QUEUE_LOW_FRAMES):
            self._paused = False
            self._resume.set()
            self._emit(self.ew.flow("RESUME"))

    def _on_asr_flow(self, code: str) -> None:
        """The ASR service's ``flow`` event: BEHIND holds the client until OK."""
        behind = code == "BEHIND"
        if behind == self._asr_behind:
            return
        self._asr_behind = behind
        log.info("recognition flow %s", code, extra=fields(flowId=self.flow_id, stage="asr"))
        if not behind:
            self._check_resume()
        elif not self._paused:
            # Ingest is the one that waits; it finds the pause at its next frame.
            self._paused = True
            self._resume = trio.Event()
            self._emit(self.ew.flow("PAUSE", reason="recognition is behind",
                                    retry_after_ms=int(LOW_WATER_S * 1000)))

    # -- VAD decisions and the pipeline ---------------------------------------------

    async def _pipeline(self) -> None:
        flushing = False
        async for item in self._pipe_out:
            kind = item[0]
            if kind == "frame":
                for ev in self.gate.frame(item[1]):
                    await self._gate_out(ev)
            elif kind == "vad" and isinstance(item[1], VadFailed):
                self._vad_failed = True
                self._paused = False  # nothing downstream will catch up: let it finish
                self._resume.set()
                self._error(ErrorCode.INTERNAL, "voice activity detection failed for this "
                            "session; it ends with what it had", True)
                self._stop("error")
            elif kind == "vad":
                for w in item[1]:
                    for ep in self.endpointer.feed(w):
                        for ev in self.gate.boundary(ep, self.endpointer.sendable,
                                                     self.endpointer.horizon):
                            await self._gate_out(ev)
                for ev in self.gate.trim(self.endpointer.sendable, self.endpointer.horizon):
                    await self._gate_out(ev)
                self._check_resume()
            elif kind == "finalize":
                await self._force("client")
            elif kind == "flush":
                flushing = True
            if flushing and self._vad_caught_up():
                await self._force("flush")
                if self.lid is not None:
                    self._lid_next(self.lid.finish())
                await self._asr_in.send(("end",))
                self._drained.set()
                return

    def _vad_caught_up(self) -> bool:
        if self._vad_failed:  # no more decisions will come: finish on what there is
            return True
        whole = self._vad_fed // 512 * 512
        return self.endpointer.position >= whole

    async def _force(self, reason: str) -> None:
        for ep in self.endpointer.force(reason):
            for ev in self.gate.boundary(ep, self.endpointer.sendable,
                                         self.endpointer.horizon):
                await self._gate_out(ev)

    async def _gate_out(self, ev: Any) -> None:
        """Speech from the gate: through denoise (delay-compensated, so frames keep their
        session time) and language ID, to the ASR sender."""
        if isinstance(ev, SendFrame):
            if self._lid_hold is not None:
                self._lid_hold.append(ev.frame.samples)  # until the start is confirmed
            elif self.lid is not None:  # LID hears the speech as it came, not denoised
                self._lid_next(self.lid.speech(ev.frame.samples))
            frames = [ev.frame] if self.denoise is None else self._denoise(ev.frame)
            for f in frames:
                await self._asr_in.send(SendFrame(ev.utterance, f))
            return
        if isinstance(ev, (UtteranceStarted, UtteranceEnded, UtteranceCancelled)):
            what = {UtteranceStarted: "started", UtteranceEnded: "ended",
                    UtteranceCancelled: "withdrawn (false start)"}[type(ev)]
            log.info("utterance %d %s", ev.index, what, extra=fields(
                flowId=self.flow_id, stage="endpoint", utterance=ev.index, sr=SAMPLE_RATE,
                ns=(ev.end - ev.start) if isinstance(ev, UtteranceEnded) else None))
        if self.trace is not None:
            if isinstance(ev, UtteranceStarted):
                self.trace.utterance_started(ev.index)
            elif isinstance(ev, (UtteranceEnded, UtteranceCancelled)):
                self.trace.utterance_ended(ev.index,
                                           cancelled=isinstance(ev, UtteranceCancelled))
        if isinstance(ev, UtteranceTentative) and self.lid is not None:
            self._lid_hold = []
        elif isinstance(ev, UtteranceStarted) and self._lid_hold is not None:
            held, self._lid_hold = self._lid_hold, None
            for samples in held:
                assert self.lid is not None
                self._lid_next(self.lid.speech(samples))
        elif isinstance(ev, UtteranceCancelled):
            # A false start: LID never hears it (its frames come again as the next
            # utterance's pre-roll), and denoise's delayed frames of it go nowhere.
            self._lid_hold = None
            if self.denoise is not None:
                self.denoise.flush()
        if isinstance(ev, UtteranceEnded):
            if self.denoise is not None:
                for f in self.denoise.flush():
                    await self._asr_in.send(SendFrame(ev.index, f))
            if self.lid is not None:
                self._lid_next(self.lid.pause())
        await self._asr_in.send(ev)

    def _denoise(self, frame: PcmFrame) -> list[PcmFrame]:
        assert self.denoise is not None
        t0 = time.perf_counter()
        out = self.denoise.feed(frame)
        ms = (time.perf_counter() - t0) * 1000
        self.stats["denoise_ms"] += ms
        self.ctx.metrics.dn_latency.observe(ms)
        return out

    # -- language ID ----------------------------------------------------------------

    def _lid_next(self, step: LidRequest | LidDecision | None) -> None:
        if isinstance(step, LidRequest):
            try:
                self._lid_in.send_nowait(step)
            except (trio.WouldBlock, trio.ClosedResourceError):  # pragma: no cover
                log.warning("%s: language ID request dropped", self.flow_id)
        elif isinstance(step, LidDecision):
            self._lid_decision(step)

    async def _lid_task(self, nursery: trio.Nursery) -> None:
        """Send the planner's requests to ``/v1/lid`` (one at a time) and feed back the
        answers; runs beside recognition, which goes on on the starting pool meanwhile."""
        assert self.lid is not None
        lid_pool = self.cfg.route("*")
        async for req in self._lid_out:
            t0 = time.perf_counter()
            try:
                answer = await self.ctx.pools.lid(lid_pool, req.pcm.astype("<i2").tobytes())
            except AsrUnavailable as exc:
                log.warning("%s: language ID failed: %s", self.flow_id, exc)
                self._lid_next(self.lid.error())
                if self.lid.failed:
                    self._lid_settled = True
                    self._lid_decided.set()
                self._lid_answered.set()
                continue
            ms = (time.perf_counter() - t0) * 1000
            self.stats["lid_ms"] += ms
            self.ctx.metrics.lid_latency.observe(ms)
            parsed = _lid_answer(answer)
            if parsed is None:
                # The ASR service's answer is input too: a language we do not know or a
                # score that is not a number counts as a failed request, never a crash.
                log.warning("%s: language ID answer refused: %.200r", self.flow_id, answer)
                self._lid_next(self.lid.error())
                if self.lid.failed:
                    self._lid_settled = True
                    self._lid_decided.set()
            else:
                self._lid_next(self.lid.answer(*parsed))
            self._lid_answered.set()

    def _lid_decision(self, d: LidDecision) -> None:
        self._lang = d.lang
        routed = self._lid_route and d.score >= LID_ROUTE_MIN_SCORE
        self._lid_target = d.lang if routed else None
        pool = self.cfg.route(d.lang) if routed else self._route_pool
        log.info("language %s (%.2f) on %d ms of speech; recognition on pool %s", d.lang,
                 d.score, d.speech_ms, pool, extra=fields(
                     flowId=self.flow_id, stage="lid", lang=d.lang))
        if "lid" in self._returns():
            self._emit(self.ew.lid(d.lang, d.score, top=list(d.top[:3]),
                                   speech_ms=d.speech_ms, pool=pool))
        if routed:
            # The move happens in the sender, after the frames queued before it; until
            # then their packets are still kept for the replay.
            try:
                self._asr_in.send_nowait(("route", d.lang))
            except (trio.WouldBlock, trio.ClosedResourceError):
                self._lid_settled = True
        else:
            self._lid_settled = True
        self._lid_decided.set()

    def _may_move(self) -> bool:
        return self._lid_route and not self._lid_settled

    # -- the ASR link ---------------------------------------------------------------

    async def _asr_sender(self, nursery: trio.Nursery) -> None:
        try:
            while True:
                item = await self._asr_out.receive()
                if isinstance(item, SendFrame):
                    batch = [item]
                    while True:  # everything queued now goes in one DATA frame
                        try:
                            nxt = self._asr_out.receive_nowait()
                        except trio.WouldBlock:
                            break
                        if not isinstance(nxt, SendFrame):
                            await self._send_frames(batch)
                            batch = []
                            await self._asr_control(nxt, nursery)
                            if nxt == ("end",):
                                return
                            break
                        batch.append(nxt)
                    if batch:
                        await self._send_frames(batch)
                    if self._paused:
                        self._check_resume()
                else:
                    await self._asr_control(item, nursery)
                    if item == ("end",):
                        return
        finally:
            if self._channel is None:
                self._asr_done.set()

    async def _asr_control(self, item: Any, nursery: trio.Nursery) -> None:
        if isinstance(item, UtteranceTentative):
            # Early start: the stream opens and audio flows ~min_speech before VAD
            # confirms; a false start is withdrawn (UtteranceCancelled).
            self._tentative = "asr" in self._returns()
            self._skip_utterance = not self._tentative
            if self._tentative:
                (await self._ensure_channel(nursery)).begin(item.index, tentative=True)
            return
        if isinstance(item, UtteranceCancelled):
            if self._tentative and self._channel is not None:
                await self._channel.cancel()
            self._tentative = False
            self._skip_utterance = True
            self.stats["false_starts"] += 1
            return
        if isinstance(item, UtteranceStarted):
            self.stats["utterances"] += 1
            self._open_utt = _Utt(item.index, item.start)
            self._skip_utterance = "asr" not in self._returns()
            if self._skip_utterance:
                return
            channel = await self._ensure_channel(nursery)
            if self._tentative:
                channel.confirm()
            else:
                channel.begin(item.index)
            self._tentative = False
        elif isinstance(item, UtteranceEnded):
            if self._open_utt is not None:
                self._open_utt.end_sample = item.end
                self._ended_at[self._open_utt.index] = time.perf_counter()
            self._open_utt = None
            self.stats["speech_samples"] += item.end - item.start
            if self._channel is None or self._skip_utterance:
                return
            if (self._may_move() and self.lid is not None and self.lid.waiting):
                # A final now would be in the assumed language, and an answer that may
                # decide it is on its way: wait for it (not for more speech).
                with trio.move_on_after(LID_HOLD_S):
                    while self.lid.waiting and not self._lid_decided.is_set():
                        await self._lid_answered.wait()
                        self._lid_answered = trio.Event()
                if self._lid_target is not None:
                    # Move before the Finalize, so the old stream never finalizes it.
                    await self._move(self._lid_target)
            await self._channel.finalize()
        elif isinstance(item, tuple) and item[0] == "route":
            await self._move(item[1])
            self._lid_settled = True
        elif item == ("end",):
            if self._channel is not None:
                await self._channel.end()
            else:
                self._asr_done.set()

    def _link_start(self) -> link.Start:
        assert self.start is not None
        hints = self.start.hints
        return link.Start(
            flow_id=self.flow_id, codec=self.cfg.asr_link_codec,
            bitrate=self.cfg.asr_link_bitrate, lang_hint=self._route_lang,
            domain=hints.domain or "default", hotwords=hints.hotwords,
            traceparent=(self.trace.asr_traceparent(self._route_pool)
                         if self.trace is not None else ""),
        )

    async def _move(self, lang: str) -> bool:
        """Recognize ``lang`` from now on: if that is another pool (or another language
        hint), the channel opens a stream there and replays the utterances still waiting
        for their final; the old stream's events are ignored from then on. Finals already
        sent stand; none is sent twice (an utterance is replayed only while its final is
        missing). Returns whether a live stream moved."""
        pool = self.cfg.route(lang)
        if (pool, lang) == (self._route_pool, self._route_lang):
            return False
        old_pool, old_lang = self._route_pool, self._route_lang
        self._route_pool, self._route_lang = pool, lang
        if self._channel is None:
            return False  # the first utterance opens on the new route
        t0 = time.perf_counter()
        pending = self._channel.pending_utterances
        try:
            moved = await self._channel.move(pool, self._link_start())
        except AsrUnavailable as exc:
            self._route_pool, self._route_lang = old_pool, old_lang
            # The cause names internal hosts and TLS details: the log gets it, the
            # client a summary.
            log.warning("could not move recognition to pool %s: %s", pool, exc,
                        extra=fields(flowId=self.flow_id, stage="asr", lang=lang,
                                     err_code="ASR_UNAVAILABLE"))
            self._error(ErrorCode.ASR_UNAVAILABLE, f"could not move recognition to pool "
                        f"{pool!r} for {lang!r}, staying on {old_pool!r}", False)
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
                self.ctx.pools, self._route_pool, self._link_start(),
                codec=c.asr_link_codec, bitrate=c.asr_link_bitrate,
                complexity=c.asr_link_opus_complexity,
                policy=FailoverPolicy(final_deadline_s=c.asr_final_deadline_s,
                                      budget_s=c.asr_failover_budget_s))
            await nursery.start(self._channel.run)
            nursery.start_soon(self._asr_receiver, self._channel)
        return self._channel

    async def _send_frames(self, batch: list[SendFrame]) -> None:
        if self._channel is None or self._skip_utterance:
            return
        if self._first_speech_sent is None:
            self._first_speech_sent = time.perf_counter()
        before = self._channel.opus_failures
        sent_before = self.ctx.pools.counters.bytes_sent
        await self._channel.send_audio(
            [(f.frame.samples, f.frame.start * 1000 // SAMPLE_RATE) for f in batch])
        self.stats["link_bytes"] += self.ctx.pools.counters.bytes_sent - sent_before
        if self._channel.opus_failures > before:
            failed = self._channel.opus_failures - before
            self.stats["pcm_to_opus_fail"] += failed
            self.ctx.metrics.pcm_to_opus_fail.inc(failed)

    async def _asr_receiver(self, channel: AsrChannel) -> None:
        try:
            async with contextlib.aclosing(channel.events()) as events:
                async for ev in events:
                    if ev.type in ("partial", "final"):
                        self._transcript(ev)
                    elif ev.type == "flow":
                        self._on_asr_flow(ev.code)
                    elif ev.type == "error" and ev.code == UNAVAILABLE:
                        # ev.message names ASR hosts, ports and TLS failures: for the
                        # log, not for the client.
                        log.warning("recognition unavailable: %s", ev.message,
                                    extra=fields(flowId=self.flow_id, stage="asr",
                                                 err_code="ASR_UNAVAILABLE"))
                        self._error(ErrorCode.ASR_UNAVAILABLE,
                                    "recognition is unavailable, recording only (the "
                                    "gateway's log has the cause under this flowId)",
                                    False)
                    elif ev.type == "error":
                        code = (ErrorCode.BUSY if ev.code == "BUSY" else
                                ErrorCode.ASR_UNAVAILABLE if ev.fatal else ErrorCode.INTERNAL)
                        self._error(code, f"recognition: {ev.code}: {ev.message}", False)
        finally:
            self._asr_done.set()

    def _transcript(self, ev: link.AsrEvent) -> None:
        final = ev.type == "final"
        if final:
            ended_at = self._ended_at.pop(ev.utterance, None)
            if ended_at is not None:
                self.ctx.metrics.final_latency.observe(
                    (time.perf_counter() - ended_at) * 1000)
        elif self.first_partial_ms is None and self._first_speech_sent is not None:
            self.first_partial_ms = (time.perf_counter() - self._first_speech_sent) * 1000
            self.ctx.metrics.first_partial.observe(self.first_partial_ms)
        self._lang = ev.lang or self._lang
        self._emit(self.ew.transcript(final, utterance=ev.utterance, text=ev.text,
                                      start_ms=ev.ts[0], end_ms=ev.ts[1], lang=ev.lang))

    def _returns(self) -> frozenset[str]:
        assert self.start is not None
        return self.start.returns

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
        await self._take(self.reframer.flush())
        if self.seqbuf is not None:
            for p in self.seqbuf.flush():
                await self._take(self.reframer.feed(p))
            await self._take(self.reframer.flush())
        self.ctx.vad.poke()
        await self._pipe_in.send(("flush",))
        # A stream failing at the end is retried for up to the failover budget.
        final_wait_s = FINAL_TIMEOUT_S + self.cfg.asr_failover_budget_s
        with trio.move_on_after(final_wait_s), _shield_if(reason == "server_shutdown"):
            await self._drained.wait()
            while True:  # the event is replaced when a new stream opens after it fired
                done = self._asr_done
                await done.wait()
                if done is self._asr_done:
                    break
        if self.lid is not None and not self._lid_decided.is_set():
            with trio.move_on_after(LID_HOLD_S):  # the lid event comes before end
                await self._lid_decided.wait()
        if self.cfg.enable_compress and self.ctx.store is not None:
            await self._archive_in.send(None)
        with trio.move_on_after(FINAL_TIMEOUT_S):
            await self._archive_done.wait()
        if self._archive_result is not None and "record_url" in self._returns():
            r = self._archive_result
            self._emit(self.ew.record_url(r["url"], duration_ms=r["duration_ms"],
                                          size_bytes=r["size_bytes"], sha256=r["sha256"],
                                          content_type=r["content_type"]))
        if "metrics" in self._returns():
            self._emit(self.ew.metrics(self._metrics()))
        self._emit(self.ew.end(reason))
        self._events_in.close()
        m = self._metrics()
        log.info("session ended: %s", reason, extra=fields(
            flowId=self.flow_id, stage="session", seq=self.ew.seq, sr=SAMPLE_RATE,
            ns=m["audio_ms"] * 1_000_000, bytes_in=m["bytes_in"],
            bytes_out=self.stats["link_bytes"], asr_link_codec=self.cfg.asr_link_codec,
            latency_ms=m["first_partial_ms"], lang=self._lang or None))
        with trio.move_on_after(5):
            await self._writer_done.wait()
        await self._close(self.close_code)

    def _metrics(self) -> dict[str, Any]:
        audio_ms = self.reframer.samples_in * 1000 // SAMPLE_RATE
        return {
            "audio_ms": audio_ms,
            "speech_ms": self.stats["speech_samples"] * 1000 // SAMPLE_RATE,
            "utterances": self.stats["utterances"],
            "false_starts": self.stats["false_starts"],
            "bytes_in": self.stats["bytes_in"],
            "asr_link_codec": self.cfg.asr_link_codec,
            "pcm_to_opus_fail": self.stats["pcm_to_opus_fail"],
            "first_partial_ms": None if self.first_partial_ms is None
            else round(self.first_partial_ms),
            "stage_ms": {"compress": round(self.stats["compress_ms"], 2),
                         "denoise": round(self.stats["denoise_ms"], 2),
                         "lid": round(self.stats["lid_ms"], 2)},
            "asr_pool": self._route_pool,
            **({"lang": self._lang} if self._lang else {}),
        }

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
                wait = math.inf if pending is None else last_partial + interval - time.monotonic()
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
                    last_partial, pending = time.monotonic(), None
                    continue
                if event["type"] == "asr_partial":
                    if time.monotonic() - last_partial >= interval and pending is None:
                        await self._write(event)
                        last_partial = time.monotonic()
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


def _lid_answer(answer: Any) -> tuple[str, float, list[tuple[str, float]]] | None:
    """``(lang, score, top)`` from a ``/v1/lid`` answer, or None when it is not one: a
    ``lang`` outside Whisper's languages, a missing, non-numeric or out-of-range score.
    Entries of ``top`` that are not valid are left out."""
    if not isinstance(answer, dict):
        return None
    lang, score = answer.get("lang"), _score(answer.get("score"))
    if not isinstance(lang, str) or lang not in WHISPER_LANGUAGES or score is None:
        return None
    top: list[tuple[str, float]] = []
    raw_top = answer.get("top")
    for t in raw_top[:10] if isinstance(raw_top, list) else []:
        if isinstance(t, dict) and t.get("lang") in WHISPER_LANGUAGES:
            s = _score(t.get("score"))
            if s is not None:
                top.append((str(t["lang"]), s))
    return lang, score, top


def _score(value: Any) -> float | None:
    """A probability in [0, 1], or None (bools, strings, NaN and the like)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if 0.0 <= v <= 1.0 else None


def _oversized(message: OversizedMessage) -> str:
    return (f"a message of more than {message.limit} bytes (at least {message.size}) "
            "is refused; the session ends with what it had")


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


def _trio_deadline(monotonic_deadline: float) -> float:
    """A ``time.monotonic`` deadline on Trio's clock."""
    return trio.current_time() + (monotonic_deadline - time.monotonic())


@contextlib.contextmanager
def _shield_if(flag: bool) -> Any:
    with trio.CancelScope(shield=flag) as scope:
        yield scope

