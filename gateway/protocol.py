"""External WebSocket protocol v1, sans-IO: client text frames in, event objects out.

``parse_text`` turns one upstream JSON text frame into a message dataclass or raises
``ProtocolError`` with a stable code. ``EventWriter`` builds every downstream event with
``type``, ``flowId`` and the per-session ``seq``. The JSON Schemas of all messages are in
``docs/protocol/``; the contract tests validate what the server sends against them.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

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
    RATE_LIMITED = "RATE_LIMITED"  # a per-tenant or per-address cap, or the message rate
    BUSY = "BUSY"
    START_TIMEOUT = "START_TIMEOUT"  # no valid start within START_TIMEOUT_S; fatal
    FLOW_EXISTS = "FLOW_EXISTS"  # the flowId is live here, or saved for this tenant; fatal
    UNSUPPORTED_LANGUAGE = "UNSUPPORTED_LANGUAGE"  # hints.user_lang_pref; fatal
    ASR_UNAVAILABLE = "ASR_UNAVAILABLE"
    ARCHIVE_FAILED = "ARCHIVE_FAILED"  # the recording could not be stored (yet); non-fatal
    INTERNAL = "INTERNAL"


# Every downstream event type (the metrics layer pre-creates one series per type).
EVENT_TYPES = ("ack", "lid", "asr_partial", "asr_final", "record_url", "metrics", "end",
               "error", "flow", "pong")
# The codes with which a session is refused at ``start`` (``Session._admit``).
REJECT_CODES = (ErrorCode.UNAUTHORIZED, ErrorCode.BUSY, ErrorCode.BAD_REQUEST,
                ErrorCode.RATE_LIMITED, ErrorCode.FLOW_EXISTS, ErrorCode.UNSUPPORTED_LANGUAGE,
                ErrorCode.START_TIMEOUT)

# Whisper's language codes (a copy of ``asr.whisper.tokenizer.LANGUAGES``' keys, which a
# unit test keeps equal): the gateway refuses any other ``user_lang_pref`` at ``start``,
# so that a client's string never reaches a decoder that would fail on it (and fail the
# other sessions batched with it).
WHISPER_LANGUAGES = frozenset({
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar",
    "sv", "it", "id", "hi", "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu",
    "ta", "no", "th", "ur", "hr", "bg", "lt", "la", "mi", "ml", "cy", "sk", "te", "fa",
    "lv", "bn", "sr", "az", "sl", "kn", "et", "mk", "br", "eu", "is", "hy", "ne", "mn",
    "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si", "km", "sn", "yo", "so", "af", "oc",
    "ka", "be", "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn",
    "mt", "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln", "ha", "ba", "jw",
    "su", "yue",
})
# ISO 639-1 codes that Whisper spells otherwise (deprecated or macro-language codes).
LANGUAGE_ALIASES = {"iw": "he", "in": "id", "jv": "jw", "nb": "no", "fil": "tl"}
MAX_JSON_DEPTH = 32  # nesting of a client message; protocol v1 needs 3


def normalize_language(pref: str) -> str | None:
    """A client's language tag as a Whisper code: ``en-US``, ``EN``, ``en_GB`` -> ``en``,
    ``zh-Hans`` -> ``zh``; ``""`` and ``auto`` -> ``auto``. None when Whisper has no such
    language (the caller refuses it: an unknown code must never reach a decoder)."""
    tag = pref.strip().lower().replace("_", "-")
    if tag in ("", "auto"):
        return "auto"
    base = tag.split("-", 1)[0]
    base = LANGUAGE_ALIASES.get(base, base)
    return base if base in WHISPER_LANGUAGES else None


def printable(value: str, limit: int = 24) -> str:
    """``value`` made safe to echo in an error message: truncated and escaped (a client's
    string must not inject text, control characters or a megabyte into logs)."""
    short = repr(value[:limit])[1:-1]  # control characters escaped
    text = short.encode("ascii", "backslashreplace").decode("ascii")
    return text + ("..." if len(value) > limit else "")


class OversizedMessage:
    """Stands in the message queue for a WebSocket message longer than the server's
    limit, whose bytes were dropped as they arrived. The session answers it with
    ``FRAME_TOO_LARGE`` and then closes with 1009, instead of the library closing at
    once with no event and the audio already accepted losing its finals."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size  # bytes seen when the limit was crossed
        self.limit = limit


CLOSE_PROTOCOL_ERROR = 1002  # RFC 6455 7.4.1: a frame that breaks the protocol
CLOSE_INVALID_PAYLOAD = 1007  # RFC 6455 7.4.1: a text message that is not UTF-8


@dataclass(frozen=True)
class ProtocolViolation:
    """Stands in the message queue for the frame at which the client broke RFC 6455
    (a text message that is not UTF-8, reserved bits or opcodes, an unmasked frame, a
    long or fragmented control frame, a lone continuation...). The WebSocket parser
    stops there, so the connection must be failed; but as for any other fatal client
    error, the session first finalizes and records the audio it accepted and sends
    ``error`` and ``end``, then closes with ``close_code`` (RFC 6455 7.1.7, 8.1)."""

    close_code: int  # the parser's verdict: 1007 (bad UTF-8) or 1002 (anything else)
    reason: str  # the parser's words for it, e.g. "Invalid UTF-8 in text message"

    @property
    def error_code(self) -> ErrorCode:
        """A text message that is not UTF-8 cannot be JSON (``BAD_JSON``); any other
        broken frame is a malformed request (``BAD_REQUEST``). Fatal in both cases."""
        if self.close_code == CLOSE_INVALID_PAYLOAD:
            return ErrorCode.BAD_JSON
        return ErrorCode.BAD_REQUEST

    @property
    def message(self) -> str:
        """The error event's text: what was wrong, and that the session ended."""
        what = ("a text message that is not valid UTF-8"
                if self.close_code == CLOSE_INVALID_PAYLOAD
                else "a WebSocket frame that breaks RFC 6455")
        return (f"{what} ({printable(self.reason, 120)}); the connection is closed with "
                f"{self.close_code} after the session ends with what it had")


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
    if isinstance(value, str) and not _unicode(value):
        raise _bad(f"{key} must be valid Unicode (a lone surrogate escape is not)")
    return value


def _unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8. JSON may escape a lone surrogate ("\\ud800");
    such a string would fail later, on the ASR link or in a log line, not here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_text(text: str | bytes) -> ClientMessage:
    """Parse one upstream text frame.

    Raises:
        ProtocolError: ``BAD_JSON`` (also for JSON nested deeper than
            ``MAX_JSON_DEPTH``), ``BAD_REQUEST``, ``UNKNOWN_MESSAGE``, ``FRAME_TOO_LARGE``,
            ``UNSUPPORTED_AUDIO`` or ``UNSUPPORTED_LANGUAGE``; only the last two are
            fatal.
    """
    if len(text) > MAX_TEXT_FRAME_BYTES:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                            f"text frame longer than {MAX_TEXT_FRAME_BYTES} bytes")
    try:
        obj = json.loads(text)
    except RecursionError as exc:
        # json.loads recurses once per level: a run of "[" used to end the session.
        raise ProtocolError(ErrorCode.BAD_JSON, "JSON nested too deep") from exc
    except ValueError as exc:
        # JSONDecodeError, UnicodeDecodeError, and an integer of more than 4300 digits
        # (Python's int-from-string limit).
        raise ProtocolError(ErrorCode.BAD_JSON, f"not JSON: {str(exc)[:120]}") from exc
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if (data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH
            and _json_depth(data) > MAX_JSON_DEPTH):
        # Parsed, but whatever later walks it recursively (repr in an error message,
        # a log) would hit the recursion limit in turn. No v1 message nests past 3.
        raise ProtocolError(ErrorCode.BAD_JSON, f"JSON nested deeper than {MAX_JSON_DEPTH}")
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
        if ident is not None and not isinstance(ident, (str, int, float)):
            raise _bad("ping id must be a string or a number")
        ping_id = None if ident is None else str(ident)[:128]
        if ping_id is not None and not _unicode(ping_id):
            raise _bad("ping id must be valid Unicode")
        return Ping(ping_id)
    if not isinstance(kind, str):
        raise _bad("a message needs a string 'type'")
    raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type {kind[:40]!r}")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as int8
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _json_depth(data: bytes) -> int:
    """How deep the arrays and objects of *valid* JSON ``data`` nest, in C-speed passes
    (no Python loop per byte: a 16 KiB frame of ``[]`` costs ~0.1 ms, not 1 ms). The
    strings go first (on valid JSON the pattern is linear: every string ends)."""
    steps = _JSON_STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKETS)
    if not steps:
        return 0
    return int(np.cumsum(np.frombuffer(steps, dtype=np.int8), dtype=np.int32).max())


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
        unknown = [r for r in returns_list if not isinstance(r, str) or r not in RETURNABLE]
        if unknown:
            raise _bad(f"return has unknown items: {printable(str(unknown), 80)}")
        returns = frozenset(returns_list)

    hints_obj = _get(obj, "hints", dict, {})
    hotwords = _get(hints_obj, "hotwords", list, [])
    if len(hotwords) > MAX_HOTWORDS or not all(
        isinstance(w, str) and 0 < len(w) <= 64 and _unicode(w) for w in hotwords
    ):
        raise _bad(f"hints.hotwords must be at most {MAX_HOTWORDS} strings of 1-64 chars")
    pref = _get(hints_obj, "user_lang_pref", str, "auto")
    lang = normalize_language(pref[:32])
    if lang is None or len(pref) > 32:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_LANGUAGE,
            f"hints.user_lang_pref '{printable(pref)}' is not a language this service "
            "recognizes (a Whisper language code such as en, de, zh, or auto)", fatal=True)
    hints = Hints(
        domain=_get(hints_obj, "domain", str, "default")[:64],
        user_lang_pref=lang,
        hotwords=tuple(hotwords),
    )
    auth = _get(obj, "auth", dict, {})
    features_list = _get(obj, "features", list, [])
    # Unknown features are ignored, not refused: newer clients may offer more.
    features = frozenset(f for f in features_list if isinstance(f, str) and f in FEATURES)
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


@dataclass(frozen=True)
class RateVerdict:
    """What ``MessageRate.take`` decided about one client message."""

    wait_s: float = 0.0  # sleep this long before handling it (and reading the next)
    notify: bool = False  # paced, and time to say so (at most once per notice_s)
    paced: int = 0  # messages paced since the last notice (this one included)


class MessageRate:
    """MAX_MESSAGES_PER_S for one session, sans-IO (the caller passes the time).

    A token bucket holding ``burst_s`` seconds of messages: a client may send in bursts
    while its 2 s average stays under ``per_s``. Past it the client is paced, not
    refused: the session waits ``wait_s`` before it handles the message and reads the
    next one, so TCP pushes back on the client. Nothing it sent is dropped (a file
    uploaded faster than real time in small frames loses no audio), and a flood of tiny
    messages costs the server at most ``per_s`` messages a second, however fast it is
    sent.
    """

    def __init__(self, per_s: float, *, burst_s: float = 2.0, notice_s: float = 1.0
                 ) -> None:
        if per_s <= 0 or burst_s <= 0:
            raise ValueError("per_s and burst_s must be positive")
        self.per_s = per_s
        self.capacity = max(1.0, per_s * burst_s)
        self.notice_s = notice_s
        self._tokens = self.capacity
        self._at: float | None = None  # when _tokens was last right
        self._last_notice = -math.inf
        self._paced = 0

    def take(self, now: float) -> RateVerdict:
        """Count one message arriving at ``now`` (seconds, any monotonic clock)."""
        if self._at is not None and now > self._at:
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.per_s)
        self._at = max(now, self._at or now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return RateVerdict()
        # Wait for the next token to drip in, and spend it on this message.
        wait = (1.0 - self._tokens) / self.per_s
        self._tokens = 0.0
        self._at += wait
        self._paced += 1
        if now - self._last_notice >= self.notice_s:
            self._last_notice = now
            paced, self._paced = self._paced, 0
            return RateVerdict(wait, notify=True, paced=paced)
        return RateVerdict(wait)


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
