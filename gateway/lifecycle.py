"""A session's decisions around its core, sans-IO: before ``start``, admission, the
``ack``, what the client hears of the archive, and the events that end a session.

``SessionCore`` (``gateway/core.py``) decides an admitted session's stream; this module
decides the rest. Nothing here awaits, reads a clock or touches a socket: the shells
(``gateway/admission.py``, ``gateway/archiver.py``, ``gateway/session.py``) call these
functions and perform the answers. Tested synchronously in
``tests/unit/test_session_lifecycle.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .core import SAMPLE_RATE, oversized
from .protocol import (
    ErrorCode,
    EventWriter,
    OversizedMessage,
    Ping,
    ProtocolError,
    ProtocolViolation,
    Start,
    parse_text,
)

if TYPE_CHECKING:
    from stages.reframe import SeqBuffer

    from .config import GatewayConfig

MAX_TEXT_FRAME_BYTES = 16 * 1024
FRAME_MS = 20

Problem = tuple[ErrorCode, str]


# -- before start ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PreStart:
    """What to do with one client message before ``start``: send ``events`` (in order);
    then, when ``close_code`` is set, close with it (counted as ``rejected`` under
    ``rejected`` when that is set); when ``start`` is set, the session begins."""

    events: tuple[dict[str, Any], ...] = ()
    close_code: int | None = None
    rejected: ErrorCode | None = None
    start: Start | None = None


def before_start(ew: EventWriter, message: str | bytes | OversizedMessage
                 | ProtocolViolation) -> PreStart:
    """The answer to a message that arrives before a valid ``start``: bad messages get
    errors (fatal ones close), audio and other messages a non-fatal NOT_STARTED, a ping
    its pong. A valid ``start`` sets the writer's flowId."""
    if isinstance(message, OversizedMessage):
        return PreStart((ew.error(ErrorCode.FRAME_TOO_LARGE, oversized(message),
                                  fatal=True),), close_code=1009)
    if isinstance(message, ProtocolViolation):
        return PreStart((ew.error(message.error_code, message.message, fatal=True),),
                        close_code=message.close_code)
    if isinstance(message, bytes):
        return PreStart((ew.error(ErrorCode.NOT_STARTED,
                                  "audio before start is not accepted", fatal=False),))
    try:
        msg = parse_text(message)
    except ProtocolError as exc:
        ev = ew.error(exc.code, exc.message, fatal=exc.fatal)
        if exc.fatal:
            return PreStart((ev,), close_code=1008, rejected=exc.code)
        return PreStart((ev,))
    if isinstance(msg, Ping):
        return PreStart((ew.pong(msg.id),))
    if not isinstance(msg, Start):
        return PreStart((ew.error(ErrorCode.NOT_STARTED, "send start first",
                                  fatal=False),))
    ew.flow_id = msg.flow_id
    return PreStart(start=msg)


def start_timeout(ew: EventWriter, timeout_s: float) -> PreStart:
    """No ``start`` within ``START_TIMEOUT_S``."""
    return PreStart((ew.error(ErrorCode.START_TIMEOUT, f"no start within {timeout_s:g} s",
                              fatal=True),), close_code=1008,
                    rejected=ErrorCode.START_TIMEOUT)


# -- admission ---------------------------------------------------------------------------

def resumes(start: Start, tenant: str, parked_tenant: str | None) -> bool:
    """Whether this ``start`` continues a parked session (a reconnect within the window,
    by the same tenant, with ``seq_header``) rather than asking for a new one. Another
    tenant's start, or one without ``seq_header``, finds the flowId taken."""
    return (parked_tenant is not None and parked_tenant == tenant
            and "seq_header" in start.features)


def capacity_problem(flow_id: str, tenant: str, *, shutting_down: bool,
                     flow_live: Callable[[], bool], sessions: int, max_sessions: int,
                     tenant_sessions: Callable[[], int], max_per_tenant: int
                     ) -> Problem | None:
    """Why no session slot can be taken now, or None. ``flow_live`` and
    ``tenant_sessions`` are asked only when their check is reached, in this order (the
    multi-worker flow registry claims a flowId it is asked about)."""
    if shutting_down:
        return ErrorCode.BUSY, "the gateway is shutting down"
    if flow_live():
        # Live here (running or parked): another client must not write into it, nor its
        # tenant start a second recording over it (a resume needs seq_header).
        return ErrorCode.FLOW_EXISTS, f"flowId {flow_id} is in use by a live session"
    if sessions >= max_sessions:
        return ErrorCode.BUSY, f"the gateway is at {max_sessions} sessions"
    if max_per_tenant and tenant:
        n = tenant_sessions()
        if n >= max_per_tenant:
            return ErrorCode.RATE_LIMITED, (f"this tenant has {n} sessions open, the most "
                                            f"allowed is {max_per_tenant}")
    return None


def saved_problem(flow_id: str, saved: bool) -> Problem | None:
    """FLOW_EXISTS when the tenant already has a recording under this flowId."""
    if saved:
        return ErrorCode.FLOW_EXISTS, (f"flowId {flow_id} already has a saved recording; "
                                       "use a new flowId")
    return None


def refusal(ew: EventWriter, problem: Problem, *, shutting_down: bool
            ) -> tuple[dict[str, Any], ...]:
    """The events that refuse a session at ``start`` (then the socket closes with 1008):
    a ``flow`` BUSY with a retry hint when the gateway is full (not when it is going
    away), the fatal error, ``end``."""
    code, message = problem
    events: list[dict[str, Any]] = []
    if code is ErrorCode.BUSY and not shutting_down:
        events.append(ew.flow("BUSY", reason="capacity", retry_after_ms=1000))
    events.append(ew.error(code, message, fatal=True))
    events.append(ew.end("error"))
    return tuple(events)


def may_park(*, seq_header: bool, resume_window_s: float, shutting_down: bool) -> bool:
    """Whether a session whose client went away waits for it to resume: only with
    ``seq_header`` (the client can say what it sends again), a resume window, and not
    while the gateway shuts down."""
    return seq_header and resume_window_s > 0 and not shutting_down


# -- the ack -----------------------------------------------------------------------------

def ack_event(ew: EventWriter, cfg: GatewayConfig, start: Start, *,
              seqbuf: SeqBuffer | None, denoise: bool, lid: bool, asr_pool: str,
              record: bool, trace_id: str = "", resumed: bool = False) -> dict[str, Any]:
    """The ``ack`` of an admitted session; after a resume it carries ``resumed`` and
    ``next_seq`` (the first seq the client must send again)."""
    extra: dict[str, Any] = {}
    if resumed and seqbuf is not None:
        extra = {"resumed": True, "next_seq": seqbuf.next_seq}
    return ew.ack(
        session={
            **extra,
            "features": sorted(start.features),
            "return": sorted(start.returns),
            "asr_link_codec": cfg.asr_link_codec, "frame_ms": FRAME_MS, "sr": SAMPLE_RATE,
            "partial_interval_ms": cfg.partial_interval_ms,
            "endpoint_silence_ms": cfg.endpoint_silence_ms,
            "flush_idle_ms": int(cfg.flush_idle_s * 1000),
            "denoise": denoise, "lid": lid, "asr_pool": asr_pool, "record": record,
            "lang_pref": start.hints.user_lang_pref,
            "flowId_generated": start.flow_id_generated,
            **({"trace_id": trace_id} if trace_id else {}),
        },
        limits={
            "max_frame_bytes": cfg.max_frame_bytes,
            "max_text_frame_bytes": MAX_TEXT_FRAME_BYTES,
            "max_utterance_ms": int(cfg.max_utterance_s * 1000),
            "reorder_window": seqbuf.window if seqbuf else 0,
            "max_seq_ahead": seqbuf.max_ahead if seqbuf else 0,
            "max_messages_per_s": cfg.max_messages_per_s,
            "max_session_ms": int(cfg.max_session_s * 1000),
        },
    )


# -- the archive, as the client hears of it ----------------------------------------------

class ArchiveReport:
    """What the client is told of its recording's store: one ``ARCHIVE_FAILED`` when the
    store first fails, and one more at the end if the recording could not be stored
    (naming where it will appear when it was kept for a later store)."""

    def __init__(self) -> None:
        self.told = False

    def problem(self, problem: str | None, *, final: bool = False, url: str = ""
                ) -> str | None:
        """The message of the ``ARCHIVE_FAILED`` to send for ``problem`` (None: send
        nothing). ``final`` is the verdict at the commit, always told."""
        if problem is None or (self.told and not final):
            return None
        self.told = True
        where = f" (it will appear at {url})" if url and "kept" in problem else ""
        return f"recording: {problem}{where}"


# -- the end -----------------------------------------------------------------------------

def final_wait_s(final_timeout_s: float, failover_budget_s: float) -> float:
    """How long the end waits for the last finals: a stream failing at the end is
    retried for up to the failover budget."""
    return final_timeout_s + failover_budget_s


def end_events(ew: EventWriter, reason: str, returns: Iterable[str], *,
               archive: dict[str, Any] | None, metrics: dict[str, Any]
               ) -> list[dict[str, Any]]:
    """The last events of a session, in order: ``record_url`` (when the recording was
    stored and the client asked for it), ``metrics`` (when asked for), ``end``."""
    wanted = set(returns)
    events: list[dict[str, Any]] = []
    if archive is not None and "record_url" in wanted:
        events.append(ew.record_url(archive["url"], duration_ms=archive["duration_ms"],
                                    size_bytes=archive["size_bytes"],
                                    sha256=archive["sha256"],
                                    content_type=archive["content_type"]))
    if "metrics" in wanted:
        events.append(ew.metrics(metrics))
    events.append(ew.end(reason))
    return events

