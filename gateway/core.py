"""One session's logic, sans-IO: events in (methods), actions out (``drain()``).

``SessionCore`` decides everything a session decides and does nothing itself: no trio,
no sockets, no clock reads (every method that needs the time takes ``now``, seconds on
the shell's clock; audio time is in samples). ``gateway/session.py`` is the shell that
reads the socket, calls the core, and performs what ``drain()`` returns, in order:

    client message ──> SessionCore ──> SendEvent (to the client)
    VAD windows    ──>             ──> AcceptAudio (frames to VAD and the archive)
    link events    ──>             ──> LinkBegin/Confirm/Cancel/Audio/Finalize/Move/End
    LID answers    ──>             ──> AskLid
    timer ticks    ──>             ──> StopIngest

One client message is one call, and all the frames it carries go out in one
``AcceptAudio`` and (for an open utterance) one ``LinkAudio``: no per-frame hand-off.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from stages.endpoint import (
    EndpointConfig,
    GateEvent,
    SendFrame,
    SpeechFeeder,
    SpeechPaused,
    UtteranceCancelled,
    UtteranceEnded,
    UtteranceStarted,
    UtteranceTentative,
)
from stages.lid import LidDecision, LidPlanner, LidRequest
from stages.reframe import IngestError, PcmFrame, Reframer, SeqBuffer
from stages.vad import WINDOW_SAMPLES, VadWindow

from .config import GatewayConfig
from .logs import fields
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
    parse_text,
)

log = logging.getLogger("voxgate.gateway.session")

SAMPLE_RATE = 16000
HIGH_WATER_S = 5.0  # audio not yet through VAD before the client is told to PAUSE
LOW_WATER_S = 1.0
IDLE_RECHECK_S = 0.5  # a starved loop's idle timer looks again after this long
# ... at most this many times in a row without new audio: a client that keeps a message
# always waiting (duplicates, pings) is not thereby active.
MAX_IDLE_DEFERRALS = 10
ASR_QUEUE_HIGH_FRAMES = 250  # 5 s of frames waiting for the ASR link: PAUSE
ASR_QUEUE_LOW_FRAMES = 50
LID_HOLD_S = 2.0  # an utterance's final waits at most this long for a pending LID answer
LID_ROUTE_MIN_SCORE = 0.4  # a decision less sure than this is reported but not routed on


# -- actions ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SendEvent:
    """Send this event to the client (the shell stamps and throttles it)."""

    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AcceptAudio:
    """Audio accepted, in order and exactly once: feed it to VAD and the archive."""

    frames: tuple[PcmFrame, ...]


@dataclass(frozen=True, slots=True)
class LinkBegin:
    """Recognition of utterance ``utterance`` starts (``tentative``: an early start)."""

    utterance: int
    tentative: bool = False


@dataclass(frozen=True, slots=True)
class LinkConfirm:
    """The open tentative utterance is speech after all."""


@dataclass(frozen=True, slots=True)
class LinkCancel:
    """Withdraw the open tentative utterance (a false start)."""


@dataclass(frozen=True, slots=True)
class LinkPause:
    """The open utterance's speech paused (a hint: its final may be decoded now)."""

    utterance: int


@dataclass(frozen=True, slots=True)
class LinkAudio:
    """Frames of the open utterance, for recognition (one DATA frame)."""

    frames: tuple[SendFrame, ...]


@dataclass(frozen=True, slots=True)
class LinkFinalize:
    """Utterance ``utterance`` has ended: ask for its final."""

    utterance: int


@dataclass(frozen=True, slots=True)
class LinkMove:
    """Recognize on ``pool`` with ``lang`` from now on (report ``move_failed`` if it
    cannot). With no stream open yet, the first one opens there."""

    pool: str
    lang: str
    old_pool: str = ""
    old_lang: str = ""


@dataclass(frozen=True, slots=True)
class LinkEnd:
    """No more audio for recognition."""


@dataclass(frozen=True, slots=True)
class AskLid:
    """Ask the language ID service about this speech; report ``lid_answer`` or
    ``lid_failed``."""

    request: LidRequest


@dataclass(frozen=True, slots=True)
class Boundary:
    """An utterance boundary (``UtteranceStarted`` ...), for the shell's trace spans."""

    event: Any


@dataclass(frozen=True, slots=True)
class StopIngest:
    """Stop reading the client: the session finishes as after a flush."""

    reason: str


Action = (SendEvent | AcceptAudio | LinkBegin | LinkConfirm | LinkCancel | LinkAudio
          | LinkFinalize | LinkPause | LinkMove | LinkEnd | AskLid | Boundary | StopIngest)
LINK_ACTIONS = (LinkBegin, LinkConfirm, LinkCancel, LinkAudio, LinkFinalize, LinkPause,
                LinkMove, LinkEnd)


@dataclass(frozen=True, slots=True)
class _RouteTo:
    """A language ID decision's move, in link order (resolved when it leaves)."""

    lang: str


class Denoiser(Protocol):
    def feed(self, frame: PcmFrame) -> list[PcmFrame]: ...
    def flush(self) -> list[PcmFrame]: ...


class Metrics(Protocol):
    """What the core counts in ``GatewayMetrics`` (in-memory counters, no I/O)."""

    errors: Any
    ingress_bytes: Any
    idle_deferred: Any
    final_latency: Any
    first_partial: Any


@dataclass(frozen=True)
class CoreConfig:
    """The session knobs the core reads (from ``GatewayConfig``)."""

    max_frame_bytes: int = 64 * 1024
    max_messages_per_s: float = 200.0
    flush_idle_s: float = 5.0
    max_session_s: float = 3600.0
    default_lang: str = "en"
    route: Any = None  # lang -> pool name (``GatewayConfig.route``)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    lid_first_n_s: float = 3.0
    lid_min_score: float = 0.7
    lid_hold_s: float = LID_HOLD_S

    @classmethod
    def from_gateway(cls, cfg: GatewayConfig, *, lid_hold_s: float = LID_HOLD_S
                     ) -> CoreConfig:
        return cls(
            max_frame_bytes=cfg.max_frame_bytes, max_messages_per_s=cfg.max_messages_per_s,
            flush_idle_s=cfg.flush_idle_s, max_session_s=cfg.max_session_s,
            default_lang=cfg.asr_default_lang, route=cfg.route,
            endpoint=EndpointConfig(
                threshold=cfg.vad_threshold,
                neg_threshold=max(0.05, cfg.vad_threshold - 0.15),
                min_speech_ms=cfg.vad_min_speech_ms,
                endpoint_silence_ms=cfg.endpoint_silence_ms,
                preroll_ms=cfg.preroll_ms,
                max_utterance_s=cfg.max_utterance_s,
                early_start=cfg.early_start),
            lid_first_n_s=cfg.lid_first_n_s, lid_min_score=cfg.lid_min_score,
            lid_hold_s=lid_hold_s)

    def pool(self, lang: str) -> str:
        return "default" if self.route is None else str(self.route(lang))


class SessionCore:
    """An admitted session's decisions. ``now`` is seconds on the caller's clock."""

    def __init__(self, cfg: CoreConfig, start: Start, now: float, *,
                 ew: EventWriter | None = None, seq_header: bool | None = None,
                 denoise: Denoiser | None = None, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.start = start
        self.flow_id = start.flow_id
        self.ew = ew or EventWriter(start.flow_id)
        self.metrics = metrics
        self.denoise = denoise
        self.returns = start.returns
        self._asr = "asr" in self.returns
        self.reframer = Reframer(max_chunk_bytes=cfg.max_frame_bytes)
        if seq_header is None:
            seq_header = "seq_header" in start.features
        self.seqbuf: SeqBuffer | None = SeqBuffer(conceal=True) if seq_header else None
        self.rate = MessageRate(cfg.max_messages_per_s)
        self.feeder = SpeechFeeder(cfg.endpoint)
        self._out: list[Action] = []
        self._link: list[Any] = []  # link commands of this call, in order
        self._audio: list[SendFrame] = []  # frames for recognition, batched
        # time
        self.deadline = now + cfg.max_session_s
        self._last_audio = now
        self._fresh_samples = 0
        self._deferrals = 0
        self.stop_reason: str | None = None
        self.close_code = 1000  # 1009 after a message over the limit, 1002/1007 (RFC 6455)
        self._now = now
        # flow control
        self.paused = False
        self.asr_behind = False
        self.vad_failed = False
        self.vad_fed = 0  # samples handed to VAD
        self.link_backlog = 0  # frames for recognition the shell has not sent yet
        # pipeline
        self.flushing = False
        self.drained = False  # told recognition to end
        self._tentative = False
        self._skip = False  # this utterance is recorded, not recognized
        self._ended_at: dict[int, float] = {}
        self._first_speech_sent: float | None = None
        self.first_partial_ms: float | None = None
        # language ID and the route
        pref = start.hints.user_lang_pref
        auto = pref in ("", "auto")
        self.route_lang = cfg.default_lang if auto else pref
        self.route_pool = cfg.pool(self.route_lang)
        self._lid_route = auto and self._asr
        self.lid: LidPlanner | None = None
        if self._lid_route or "lid" in self.returns:
            self.lid = LidPlanner(cfg.lid_first_n_s, cfg.lid_min_score)
        self.lid_decided = self.lid is None
        self._lid_target: str | None = None
        self._lid_settled = False
        self._lid_hold: list[Any] | None = None  # a tentative utterance's speech
        self._hold_until: float | None = None  # a final waits for LID until then
        self._held: list[Any] = []  # link commands behind that final
        self.lang = ""
        self.dropped_events = 0
        self.stats: dict[str, Any] = {
            "bytes_in": 0, "speech_samples": 0, "utterances": 0, "compress_ms": 0.0,
            "pcm_to_opus_fail": 0, "link_bytes": 0, "false_starts": 0,
            "denoise_ms": 0.0, "lid_ms": 0.0}

    # -- out --------------------------------------------------------------------------

    def drain(self) -> list[Action]:
        """The actions decided since the last call, in the order to perform them."""
        self._flush_link()
        out, self._out = self._out, []
        return out

    def _emit(self, event: dict[str, Any]) -> None:
        self._out.append(SendEvent(event))

    def error(self, code: ErrorCode, message: str, fatal: bool) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(code.value).inc()
        log.info("error sent: %s", message, extra=fields(
            flowId=self.flow_id, stage="session", err_code=code.value))
        self._emit(self.ew.error(code, message, fatal=fatal))

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._out.append(StopIngest(reason))

    # -- time -------------------------------------------------------------------------

    def ingest_deadline(self) -> float:
        """When ``idle_tick`` is due if no message comes."""
        return min(self._last_audio + self.cfg.flush_idle_s, self.deadline)

    def touch(self, now: float) -> None:
        """Time the client spent held (paused, or away and back) is not idleness."""
        self._last_audio = now

    def idle_tick(self, now: float, intake_waiting: bool = False) -> str | None:
        """The ingest deadline passed with no message: ``"max_duration"``, ``"idle"``, or
        None when the idle check is put off (``intake_waiting``: the client's data is
        waiting unread, the event loop is starved, the client is not idle)."""
        if now >= self.deadline:
            self._log_max()
            return "max_duration"
        if intake_waiting and self._deferrals < MAX_IDLE_DEFERRALS:
            if self.metrics is not None:
                self.metrics.idle_deferred.inc()
            self._deferrals += 1
            self._last_audio = now - self.cfg.flush_idle_s + IDLE_RECHECK_S
            return None
        return "idle"

    def _log_max(self) -> None:
        log.info("session reached MAX_SESSION_S (%g s)", self.cfg.max_session_s,
                 extra=fields(flowId=self.flow_id, stage="session"))

    def next_timer(self) -> float:
        """When ``tick`` has something to do (``math.inf``: nothing)."""
        return math.inf if self._hold_until is None else self._hold_until

    def tick(self, now: float) -> None:
        """Timers: a final held for language ID past ``lid_hold_s`` goes on."""
        if self._hold_until is not None and now >= self._hold_until:
            self._release_hold()

    # -- the client -------------------------------------------------------------------

    def pace(self, now: float) -> float:
        """A message arrived: how long to wait before handling it (MAX_MESSAGES_PER_S);
        at most one non-fatal ``RATE_LIMITED`` a second says so."""
        verdict = self.rate.take(now)
        if verdict.wait_s > 0:
            self.stats["rate_paced"] = self.stats.get("rate_paced", 0) + 1
            if verdict.notify:
                self.error(ErrorCode.RATE_LIMITED, (
                    f"over {self.cfg.max_messages_per_s:g} messages a second: this "
                    f"connection is read at that rate ({verdict.paced} message(s) waited "
                    "since the last notice); nothing was dropped. Send larger frames to "
                    "go faster"), False)
        return verdict.wait_s

    def message(self, message: str | bytes | OversizedMessage | ProtocolViolation,
                now: float) -> str | None:
        """One client message (after ``pace``). Returns why ingest ends, or None.
        A fatal message sets ``close_code``."""
        if now >= self.deadline:
            self._log_max()
            return "max_duration"
        if isinstance(message, bytes):
            self.audio(message, now)
            return None
        if isinstance(message, OversizedMessage):
            # Fatal, but the audio already accepted is finalized and recorded first.
            self.error(ErrorCode.FRAME_TOO_LARGE, oversized(message), True)
            self.close_code = 1009
            return "error"
        if isinstance(message, ProtocolViolation):
            # The WebSocket parser stopped at a broken frame: nothing more can be read,
            # but what was accepted is finalized and recorded before the close.
            self.error(message.error_code, message.message, True)
            self.close_code = message.close_code
            return "error"
        try:
            msg = parse_text(message)
        except ProtocolError as exc:
            self.error(exc.code, exc.message, exc.fatal)
            return "error" if exc.fatal else None
        if isinstance(msg, Flush):
            return "flush"
        if isinstance(msg, Finalize):
            self._gate(self.feeder.force("client"), now)
        elif isinstance(msg, Ping):
            self._emit(self.ew.pong(msg.id))
        elif isinstance(msg, Start):
            self.error(ErrorCode.ALREADY_STARTED, "the session has started", False)
        return None

    def audio(self, data: bytes, now: float) -> None:
        """A binary message: seq header, reorder, reframe; the frames go on at once."""
        payloads = [data]
        if self.seqbuf is not None:
            try:
                seq, _pts, payload = SeqBuffer.parse(data)
            except IngestError as exc:
                self.error(ErrorCode(exc.code), exc.message, False)
                return
            # Check the payload before the buffer takes it: a bad one must not leave a
            # hole the buffer waits for.
            if len(payload) % 2 or len(payload) > self.cfg.max_frame_bytes:
                code = "ODD_BYTE_COUNT" if len(payload) % 2 else "FRAME_TOO_LARGE"
                self.error(ErrorCode(code), f"seq {seq}: payload of {len(payload)} bytes "
                           "refused", False)
                return
            try:
                payloads = self.seqbuf.feed(seq, payload)
            except IngestError as exc:
                self.error(ErrorCode(exc.code), exc.message, False)
                return
        frames: list[PcmFrame] = []
        for p in payloads:
            try:
                frames += self.reframer.feed(p)
            except IngestError as exc:
                self.error(ErrorCode(exc.code), exc.message, False)
                return
            self.stats["bytes_in"] += len(p)
            if self.metrics is not None:
                self.metrics.ingress_bytes.inc(len(p))
            self._fresh_samples += len(p) // 2
        # Only new audio is activity, and only a frame's worth of it: duplicates, empty
        # frames and a sample every few seconds must not hold a session open forever.
        if self._fresh_samples >= self.reframer.frame_samples:
            self._fresh_samples = self._deferrals = 0
            self._last_audio = now
        self._take(frames, now)

    def _take(self, frames: list[PcmFrame], now: float) -> None:
        if not frames:
            return
        self._out.append(AcceptAudio(tuple(frames)))
        feeder = self.feeder
        for f in frames:
            self.vad_fed += len(f.samples)
            out = feeder.frame(f)
            if out:
                self._gate(out, now)
        self._backpressure()

    def finish(self, now: float) -> None:
        """Ingest is over (flush, disconnect, idle, ...): what the reframer and the
        reorder buffer still hold is accepted, then recognition ends once VAD has
        decided all of it (``drained``)."""
        self._take(self.reframer.flush(), now)
        if self.seqbuf is not None:
            for p in self.seqbuf.flush():
                self._take(self.reframer.feed(p), now)
            self._take(self.reframer.flush(), now)
        self.flushing = True
        self._maybe_drain(now)

    def disconnected(self, now: float) -> None:
        """The client's socket is gone (it may come back: ``touch`` when it does)."""
        self._last_audio = now

    # -- flow control -----------------------------------------------------------------

    def _behind_s(self) -> float:
        return (self.vad_fed - self.feeder.position) / SAMPLE_RATE

    def _pressure(self) -> str | None:
        if not self.vad_failed and self._behind_s() > HIGH_WATER_S:
            return "audio is arriving faster than it is processed"
        if self.asr_behind:
            return "recognition is behind"
        if self.link_backlog > ASR_QUEUE_HIGH_FRAMES:
            return "the link to recognition is behind"
        return None

    def _pause(self, reason: str) -> None:
        self.paused = True
        self._emit(self.ew.flow("PAUSE", reason=reason,
                                retry_after_ms=int(LOW_WATER_S * 1000)))

    def _backpressure(self) -> None:
        """Hold the client (the shell stops reading: TCP pushes back) while something
        downstream is behind; what was accepted stays queued, nothing is dropped."""
        if not self.paused:
            reason = self._pressure()
            if reason is not None:
                self._pause(reason)

    def _check_resume(self) -> None:
        if not self.paused or self.asr_behind:
            return
        if self._behind_s() < LOW_WATER_S and self.link_backlog < ASR_QUEUE_LOW_FRAMES:
            self.paused = False
            self._emit(self.ew.flow("RESUME"))

    def link_sent(self, frames: int) -> None:
        """The shell sent ``frames`` of the ``LinkAudio`` frames to recognition."""
        self.link_backlog -= frames
        self._check_resume()

    # -- VAD --------------------------------------------------------------------------

    def vad(self, windows: list[VadWindow], now: float) -> None:
        """VAD decided these windows of this session's audio."""
        self._gate(self.feeder.windows(windows), now)
        self._check_resume()
        self._maybe_drain(now)

    def vad_failure(self, now: float) -> None:
        """VAD lost this session's windows: it ends with what it had."""
        self.vad_failed = True
        self.paused = False  # nothing downstream will catch up: let it finish
        self.error(ErrorCode.INTERNAL, "voice activity detection failed for this "
                   "session; it ends with what it had", True)
        self._stop("error")
        self._maybe_drain(now)

    def vad_caught_up(self) -> bool:
        if self.vad_failed:  # no more decisions will come: finish on what there is
            return True
        return self.feeder.position >= self.vad_fed // WINDOW_SAMPLES * WINDOW_SAMPLES

    def _maybe_drain(self, now: float) -> None:
        if self.flushing and not self.drained and self.vad_caught_up():
            self._gate(self.feeder.force("flush"), now)
            if self.lid is not None:
                self._lid_next(self.lid.finish())
            self._link_cmd(LinkEnd())
            self.drained = True

    # -- the pipeline: speech to recognition ------------------------------------------

    def _gate(self, events: list[GateEvent], now: float) -> None:
        self._now = now
        for ev in events:
            if isinstance(ev, SendFrame):
                self._speech(ev)
            elif isinstance(ev, SpeechPaused):
                # Denoise holds the utterance's last frames back until it ends, so the
                # hint would come before them: it goes only without denoise. Nor while
                # language ID may still move the utterance to another pool: its final
                # is held for the answer, and a decode on this stream would be wasted.
                if not self._skip and self.denoise is None and not (
                        self._may_move() and self.lid is not None and not self.lid.done):
                    self._link_cmd(LinkPause(ev.index))
            else:
                self._boundary(ev, now)

    def _speech(self, ev: SendFrame) -> None:
        samples = ev.frame.samples
        if self._lid_hold is not None:
            self._lid_hold.append(samples)  # until the start is confirmed
        elif self.lid is not None and not self.lid.done:
            # LID hears the speech as it came, not denoised
            self._lid_next(self.lid.speech(samples))
        if self._skip:
            if self.denoise is not None:
                self.denoise.feed(ev.frame)  # keeps its delay line in step
            return
        if self.denoise is None:
            self._audio.append(ev)
        else:
            for f in self.denoise.feed(ev.frame):
                self._audio.append(SendFrame(ev.utterance, f))

    def _boundary(self, ev: Any, now: float) -> None:
        what = {UtteranceStarted: "started", UtteranceEnded: "ended",
                UtteranceCancelled: "withdrawn (false start)"}.get(type(ev))
        if what is not None:
            log.info("utterance %d %s", ev.index, what, extra=fields(
                flowId=self.flow_id, stage="endpoint", utterance=ev.index,
                sr=SAMPLE_RATE,
                ns=(ev.end - ev.start) if isinstance(ev, UtteranceEnded) else None))
        self._out.append(Boundary(ev))
        if isinstance(ev, UtteranceTentative):
            if self.lid is not None:
                self._lid_hold = []
            # Early start: the stream opens and audio flows ~min_speech before VAD
            # confirms; a false start is withdrawn (UtteranceCancelled).
            self._tentative = self._asr
            self._skip = not self._tentative
            if self._tentative:
                self._link_cmd(LinkBegin(ev.index, tentative=True))
        elif isinstance(ev, UtteranceCancelled):
            # A false start: LID never hears it (its frames come again as the next
            # utterance's pre-roll), and denoise's delayed frames of it go nowhere.
            self._lid_hold = None
            if self.denoise is not None:
                self.denoise.flush()
            if self._tentative:
                self._link_cmd(LinkCancel())
            self._tentative = False
            self._skip = True
            self.stats["false_starts"] += 1
        elif isinstance(ev, UtteranceStarted):
            if self._lid_hold is not None:
                held, self._lid_hold = self._lid_hold, None
                for samples in held:
                    assert self.lid is not None
                    if not self.lid.done:
                        self._lid_next(self.lid.speech(samples))
            self.stats["utterances"] += 1
            self._skip = not self._asr
            if not self._skip:
                self._link_cmd(LinkConfirm() if self._tentative else LinkBegin(ev.index))
            self._tentative = False
        elif isinstance(ev, UtteranceEnded):
            if self.denoise is not None:
                for f in self.denoise.flush():
                    if not self._skip:
                        self._audio.append(SendFrame(ev.index, f))
            if self.lid is not None:
                self._lid_next(self.lid.pause())
            self.stats["speech_samples"] += ev.end - ev.start
            if self._skip:
                return
            self._ended_at[ev.index] = now
            if (self._may_move() and self.lid is not None and self.lid.waiting
                    and self._hold_until is None):
                # A final now would be in the assumed language, and an answer that may
                # decide it is on its way: wait for it (not for more speech).
                self._flush_audio()
                self._hold_until = now + self.cfg.lid_hold_s
                self._held.append(LinkFinalize(ev.index))
                return
            self._link_cmd(LinkFinalize(ev.index))

    def _flush_audio(self) -> None:
        if self._audio:
            frames, self._audio = tuple(self._audio), []
            self.link_backlog += len(frames)
            if self._first_speech_sent is None:
                self._first_speech_sent = self._now
            (self._held if self._hold_until is not None else self._link).append(
                LinkAudio(frames))

    def _link_cmd(self, cmd: Any) -> None:
        self._flush_audio()
        (self._held if self._hold_until is not None else self._link).append(cmd)

    def _flush_link(self) -> None:
        self._flush_audio()
        for cmd in self._link:
            if isinstance(cmd, _RouteTo):
                move = self._route(cmd.lang)
                self._lid_settled = True
                if move is not None:
                    self._out.append(move)
            else:
                self._out.append(cmd)
        self._link = []

    def _release_hold(self) -> None:
        """The final held for language ID goes: moved first when LID decided a route
        (so the old stream never finalizes it), then what queued behind it."""
        self._flush_audio()  # audio that came meanwhile stays behind the final
        self._hold_until = None
        self._flush_link()
        if self._lid_target is not None:
            move = self._route(self._lid_target)
            if move is not None:
                self._out.append(move)
        held, self._held = self._held, []
        self._link = held
        self._flush_link()

    def _route(self, lang: str) -> LinkMove | None:
        pool = self.cfg.pool(lang)
        if (pool, lang) == (self.route_pool, self.route_lang):
            return None
        old_pool, old_lang = self.route_pool, self.route_lang
        self.route_pool, self.route_lang = pool, lang
        return LinkMove(pool, lang, old_pool, old_lang)

    def move_failed(self, pool: str, lang: str, old_pool: str, old_lang: str) -> None:
        """The shell could not move recognition to ``pool``: it stays where it was."""
        if (self.route_pool, self.route_lang) == (pool, lang):
            self.route_pool, self.route_lang = old_pool, old_lang
        self.error(ErrorCode.ASR_UNAVAILABLE, f"could not move recognition to pool "
                   f"{pool!r} for {lang!r}, staying on {old_pool!r}", False)

    # -- language ID ------------------------------------------------------------------

    def _may_move(self) -> bool:
        return self._lid_route and not self._lid_settled

    def _lid_next(self, step: LidRequest | LidDecision | None) -> None:
        if isinstance(step, LidRequest):
            self._out.append(AskLid(step))
        elif isinstance(step, LidDecision):
            self._lid_decision(step)

    def _lid_decision(self, d: LidDecision) -> None:
        self.lang = d.lang
        routed = self._lid_route and d.score >= LID_ROUTE_MIN_SCORE
        self._lid_target = d.lang if routed else None
        pool = self.cfg.pool(d.lang) if routed else self.route_pool
        log.info("language %s (%.2f) on %d ms of speech; recognition on pool %s", d.lang,
                 d.score, d.speech_ms, pool, extra=fields(
                     flowId=self.flow_id, stage="lid", lang=d.lang))
        if "lid" in self.returns:
            self._emit(self.ew.lid(d.lang, d.score, top=list(d.top[:3]),
                                   speech_ms=d.speech_ms, pool=pool))
        if routed:
            # The move goes in link order, after the frames queued before it.
            self._link_cmd(_RouteTo(d.lang))
        else:
            self._lid_settled = True
        self.lid_decided = True

    @property
    def lid_over(self) -> bool:
        """No language ID decision is to come: decided, failed, or the session has
        ended with no request in flight (too little speech to ask about)."""
        return self.lid_decided or (self.drained and self.lid is not None
                                    and not self.lid.waiting)

    def lid_answer(self, answer: Any, now: float) -> None:
        """The language ID service answered the request in flight."""
        assert self.lid is not None
        parsed = lid_answer(answer)
        if parsed is None:
            # The ASR service's answer is input too: a language we do not know or a
            # score that is not a number counts as a failed request, never a crash.
            log.warning("%s: language ID answer refused: %.200r", self.flow_id, answer)
            self.lid_failed(now)
            return
        self._lid_next(self.lid.answer(*parsed))
        self._lid_answered(now)

    def lid_failed(self, now: float) -> None:
        """The request in flight failed (one failure ends language ID)."""
        assert self.lid is not None
        self._lid_next(self.lid.error())
        if self.lid.failed:
            self._lid_settled = True
            self.lid_decided = True
        self._lid_answered(now)

    def _lid_answered(self, now: float) -> None:
        if self._hold_until is not None and (self.lid_decided or self.lid is None
                                             or not self.lid.waiting):
            self._release_hold()

    # -- recognition's events ---------------------------------------------------------

    def link_event(self, ev: Any, now: float) -> None:
        """An event of the recognition channel (``asr.link.AsrEvent``)."""
        if ev.type in ("partial", "final"):
            self._transcript(ev, now)
        elif ev.type == "flow":
            self.asr_flow(ev.code)
        elif ev.type == "error" and ev.code == "UNAVAILABLE":
            # ev.message names ASR hosts, ports and TLS failures: for the log, not for
            # the client.
            log.warning("recognition unavailable: %s", ev.message, extra=fields(
                flowId=self.flow_id, stage="asr", err_code="ASR_UNAVAILABLE"))
            self.error(ErrorCode.ASR_UNAVAILABLE, "recognition is unavailable, recording "
                       "only (the gateway's log has the cause under this flowId)", False)
        elif ev.type == "error":
            code = (ErrorCode.BUSY if ev.code == "BUSY" else
                    ErrorCode.ASR_UNAVAILABLE if ev.fatal else ErrorCode.INTERNAL)
            self.error(code, f"recognition: {ev.code}: {ev.message}", False)

    def _transcript(self, ev: Any, now: float) -> None:
        final = ev.type == "final"
        if final:
            ended_at = self._ended_at.pop(ev.utterance, None)
            if ended_at is not None and self.metrics is not None:
                self.metrics.final_latency.observe((now - ended_at) * 1000)
        elif self.first_partial_ms is None and self._first_speech_sent is not None:
            self.first_partial_ms = (now - self._first_speech_sent) * 1000
            if self.metrics is not None:
                self.metrics.first_partial.observe(self.first_partial_ms)
        self.lang = ev.lang or self.lang
        self._emit(self.ew.transcript(final, utterance=ev.utterance, text=ev.text,
                                      start_ms=ev.ts[0], end_ms=ev.ts[1], lang=ev.lang))

    def asr_flow(self, code: str) -> None:
        """The ASR service's ``flow``: BEHIND holds the client until OK."""
        behind = code == "BEHIND"
        if behind == self.asr_behind:
            return
        self.asr_behind = behind
        log.info("recognition flow %s", code, extra=fields(flowId=self.flow_id, stage="asr"))
        if not behind:
            self._check_resume()
        elif not self.paused:
            self._pause("recognition is behind")

    # -- the end ----------------------------------------------------------------------

    def session_metrics(self, codec: str) -> dict[str, Any]:
        s = self.stats
        return {
            "audio_ms": self.reframer.samples_in * 1000 // SAMPLE_RATE,
            "speech_ms": s["speech_samples"] * 1000 // SAMPLE_RATE,
            "utterances": s["utterances"],
            "false_starts": s["false_starts"],
            "bytes_in": s["bytes_in"],
            "asr_link_codec": codec,
            "pcm_to_opus_fail": s["pcm_to_opus_fail"],
            "first_partial_ms": None if self.first_partial_ms is None
            else round(self.first_partial_ms),
            "stage_ms": {"compress": round(s["compress_ms"], 2),
                         "denoise": round(s["denoise_ms"], 2),
                         "lid": round(s["lid_ms"], 2)},
            "asr_pool": self.route_pool,
            **({"lang": self.lang} if self.lang else {}),
        }


def oversized(message: OversizedMessage) -> str:
    return (f"a message of more than {message.limit} bytes (at least {message.size}) "
            "is refused; the session ends with what it had")


def lid_answer(answer: Any) -> tuple[str, float, list[tuple[str, float]]] | None:
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
