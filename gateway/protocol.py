"""External WebSocket protocol v1, sans-IO: client text frames in, event objects out.

``parse_text`` turns one upstream JSON text frame into a message dataclass or raises
``ProtocolError`` with a stable code. ``EventWriter`` builds every downstream event with
``type``, ``flowId`` and the per-session ``seq``. The JSON Schemas of all messages are in
``docs/protocol/``; the contract tests validate what the server sends against them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

PROTOCOL_VERSION = 1
FLOW_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
RETURNABLE = frozenset({"lid", "asr", "record_url", "metrics"})
FEATURES = frozenset({"seq_header"})
MAX_TEXT_FRAME_BYTES = 16 * 1024
MAX_HOTWORDS = 100


class ErrorCode(StrEnum):
    """Stable codes of ``error`` events."""

    BAD_JSON = "BAD_JSON"  # a text frame that is not a JSON object
    BAD_REQUEST = "BAD_REQUEST"  # valid JSON, but a field is missing or wrong
    UNKNOWN_MESSAGE = "UNKNOWN_MESSAGE"
    NOT_STARTED = "NOT_STARTED"  # audio or a command before ``start``
    ALREADY_STARTED = "ALREADY_STARTED"
    UNAUTHORIZED = "UNAUTHORIZED"
    UNSUPPORTED_AUDIO = "UNSUPPORTED_AUDIO"
    ODD_BYTE_COUNT = "ODD_BYTE_COUNT"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    BAD_SEQ_HEADER = "BAD_SEQ_HEADER"
    RATE_LIMITED = "RATE_LIMITED"
    BUSY = "BUSY"
    ASR_UNAVAILABLE = "ASR_UNAVAILABLE"
    ARCHIVE_FAILED = "ARCHIVE_FAILED"  # the recording could not be stored (yet); non-fatal
    INTERNAL = "INTERNAL"


# Every downstream event type (the metrics layer pre-creates one series per type).
EVENT_TYPES = ("ack", "lid", "asr_partial", "asr_final", "record_url", "metrics", "end",
               "error", "flow", "pong")
# The codes with which a session is refused at ``start`` (``Session._admit``).
REJECT_CODES = (ErrorCode.UNAUTHORIZED, ErrorCode.BUSY, ErrorCode.BAD_REQUEST)


class OversizedMessage:
    """Stands in the message queue for a WebSocket message longer than the server's
    limit, whose bytes were dropped as they arrived. The session answers it with
    ``FRAME_TOO_LARGE`` and then closes with 1009, instead of the library closing at
    once with no event and the audio already accepted losing its finals."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size  # bytes seen when the limit was crossed
        self.limit = limit


class ProtocolError(Exception):
    """The client broke protocol v1. ``fatal`` errors end the session after the event."""

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = False) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal


@dataclass(frozen=True)
class AudioFormat:
    codec: str = "pcm_s16le"
    sr: int = 16000
    channels: int = 1
    chunk_ms: int = 20


@dataclass(frozen=True)
class Hints:
    domain: str = "default"
    user_lang_pref: str = "auto"
    hotwords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Start:
    """``start``: the first message of every session."""

    flow_id: str
    audio: AudioFormat = AudioFormat()
    returns: frozenset[str] = RETURNABLE
    hints: Hints = Hints()
    token: str = ""
    client_version: str = ""
    features: frozenset[str] = frozenset()
    trace_id: str = ""
    tenant_id: str = ""
    flow_id_generated: bool = False


@dataclass(frozen=True)
class Flush:
    """``flush``: end of audio; finalize, report and close."""


@dataclass(frozen=True)
class Finalize:
    """``finalize``: force an endpoint now, keep the session open."""


@dataclass(frozen=True)
class Ping:
    """``ping``: answered with ``pong`` (echoing ``id`` when given)."""

    id: str | None = None


ClientMessage = Start | Flush | Finalize | Ping


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _get(obj: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = obj.get(key, default)
    if value is default:
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(f"{key} must be a {kind.__name__}")
    return value


def parse_text(text: str | bytes) -> ClientMessage:
    """Parse one upstream text frame.

    Raises:
        ProtocolError: ``BAD_JSON``, ``BAD_REQUEST``, ``UNKNOWN_MESSAGE`` or
            ``UNSUPPORTED_AUDIO``; only ``UNSUPPORTED_AUDIO`` is fatal.
    """
    if len(text) > MAX_TEXT_FRAME_BYTES:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                            f"text frame longer than {MAX_TEXT_FRAME_BYTES} bytes")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "a message must be a JSON object")
    kind = obj.get("type")
    if kind == "start":
        return _parse_start(obj)
    if kind == "flush":
        return Flush()
    if kind == "finalize":
        return Finalize()
    if kind == "ping":
        ident = obj.get("id")
        return Ping(None if ident is None else str(ident)[:128])
    if not isinstance(kind, str):
        raise _bad("a message needs a string 'type'")
    raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type {kind[:40]!r}")


def _parse_start(obj: dict[str, Any]) -> Start:
    flow_id = _get(obj, "flowId", str, None)
    generated = flow_id is None
    if flow_id is None:
        flow_id = uuid.uuid4().hex
    elif not FLOW_ID_RE.match(flow_id):
        raise _bad("flowId must be 1-128 characters of letters, digits and . _ : -")

    audio_obj = _get(obj, "audio", dict, {})
    audio = AudioFormat(
        codec=_get(audio_obj, "codec", str, "pcm_s16le"),
        sr=_get(audio_obj, "sr", int, 16000),
        channels=_get(audio_obj, "channels", int, 1),
        chunk_ms=_get(audio_obj, "chunk_ms", int, 20),
    )
    problems = []
    if audio.codec != "pcm_s16le":
        problems.append(f"codec {audio.codec!r} (only pcm_s16le)")
    if audio.sr != 16000:
        problems.append(f"sr {audio.sr} (only 16000)")
    if audio.channels != 1:
        problems.append(f"channels {audio.channels} (only 1)")
    if problems:
        raise ProtocolError(ErrorCode.UNSUPPORTED_AUDIO,
                            "unsupported audio: " + ", ".join(problems), fatal=True)
    if not 10 <= audio.chunk_ms <= 1000:
        raise _bad("audio.chunk_ms must be between 10 and 1000")

    returns_list = _get(obj, "return", list, None)
    if returns_list is None:
        returns = RETURNABLE
    else:
        unknown = [r for r in returns_list if r not in RETURNABLE]
        if unknown:
            raise _bad(f"return has unknown items {unknown[:5]}")
        returns = frozenset(returns_list)

    hints_obj = _get(obj, "hints", dict, {})
    hotwords = _get(hints_obj, "hotwords", list, [])
    if len(hotwords) > MAX_HOTWORDS or not all(
        isinstance(w, str) and 0 < len(w) <= 64 for w in hotwords
    ):
        raise _bad(f"hints.hotwords must be at most {MAX_HOTWORDS} strings of 1-64 chars")
    hints = Hints(
        domain=_get(hints_obj, "domain", str, "default")[:64],
        user_lang_pref=_get(hints_obj, "user_lang_pref", str, "auto")[:16],
        hotwords=tuple(hotwords),
    )
    auth = _get(obj, "auth", dict, {})
    features_list = _get(obj, "features", list, [])
    # Unknown features are ignored, not refused: newer clients may offer more.
    features = frozenset(f for f in features_list if f in FEATURES)
    return Start(
        flow_id=flow_id,
        audio=audio,
        returns=returns,
        hints=hints,
        token=_get(auth, "token", str, ""),
        client_version=_get(obj, "client_version", str, "")[:64],
        features=features,
        trace_id=_get(obj, "trace_id", str, "")[:128],
        tenant_id=_get(obj, "tenant_id", str, "")[:128],
        flow_id_generated=generated,
    )


@dataclass
class EventWriter:
    """Builds downstream events for one session.

    ``seq`` is stamped by ``stamp`` when an event is actually sent, so it counts the
    events the client receives (a held-back partial that a newer one replaced never
    takes a number).
    """

    flow_id: str
    seq: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "flowId": self.flow_id, **fields}

    def stamp(self, event: dict[str, Any]) -> dict[str, Any]:
        """Give ``event`` the next ``seq`` (call right before sending it)."""
        event["seq"] = self.seq
        event["flowId"] = self.flow_id
        self.seq += 1
        self.counts[event["type"]] = self.counts.get(event["type"], 0) + 1
        return event

    def ack(self, *, session: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
        return self._event("ack", protocol=PROTOCOL_VERSION, session=session, limits=limits)

    def lid(self, lang: str, score: float, *, top: list[tuple[str, float]] | None = None,
            speech_ms: int | None = None, pool: str | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if top:
            extra["top"] = [{"lang": la, "score": round(s, 4)} for la, s in top]
        if speech_ms is not None:
            extra["speech_ms"] = speech_ms
        if pool is not None:
            extra["pool"] = pool
        return self._event("lid", lang=lang, score=round(score, 4), **extra)

    def transcript(self, final: bool, *, utterance: int, text: str, start_ms: int,
                   end_ms: int, lang: str) -> dict[str, Any]:
        return self._event("asr_final" if final else "asr_partial", utterance=utterance,
                           text=text, start_ms=start_ms, end_ms=end_ms, lang=lang)

    def record_url(self, url: str, *, duration_ms: int, size_bytes: int, sha256: str,
                   content_type: str) -> dict[str, Any]:
        return self._event("record_url", url=url, duration_ms=duration_ms, bytes=size_bytes,
                           sha256=sha256, content_type=content_type)

    def metrics(self, values: dict[str, Any]) -> dict[str, Any]:
        return self._event("metrics", **values)

    def end(self, reason: str) -> dict[str, Any]:
        return self._event("end", reason=reason)

    def error(self, code: ErrorCode, message: str, *, fatal: bool) -> dict[str, Any]:
        return self._event("error", code=code.value, message=message, fatal=fatal)

    def flow(self, state: str, *, reason: str = "", retry_after_ms: int | None = None
             ) -> dict[str, Any]:
        extra: dict[str, Any] = {"retry_after_ms": retry_after_ms} if retry_after_ms else {}
        return self._event("flow", state=state, reason=reason, **extra)

    def pong(self, ident: str | None = None) -> dict[str, Any]:
        return self._event("pong", **({"id": ident} if ident is not None else {}))


def dumps(event: dict[str, Any]) -> str:
    """Serialize one event as a compact JSON text frame (``type``, ``flowId``, ``seq``
    first)."""
    head = {k: event[k] for k in ("type", "flowId", "seq") if k in event}
    return json.dumps({**head, **event}, ensure_ascii=False, separators=(",", ":"))
