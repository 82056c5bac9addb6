"""ASR link (v1 to v3): the length-prefixed frame codec between the gateway and the ASR service.

Sans-IO: bytes in, frames out, and frames in, bytes out. Both sides import it; the
HTTP/2 shells only move bytes. The wire format is specified in ``docs/asr-link.md``.

Every frame is ``type: u8 | length: u32 LE | payload[length]``. Control frames carry a
UTF-8 JSON object; audio frames carry ``seq: u32 LE | pts_ms: u32 LE | packet``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import Enum, IntEnum, StrEnum
from typing import Any, ClassVar

VERSION = 4
# Versions this module speaks. v2 adds the ``flow`` event, which a v1 receiver would
# reject as an unknown event type, so the server sends it only on v2 streams (and up).
# v3 adds the ``Discard`` frame, which a v2 server would reject as an unknown frame type,
# so a client sends it only on a stream whose response named v3 (see ``version_of``).
# v4 adds the ``Pause`` frame (a hint that the open utterance's speech paused), sent
# likewise only on a stream whose response named v4.
SUPPORTED_VERSIONS = frozenset({1, 2, 3, 4})
CONTENT_TYPES = {v: f"application/vnd.voxgate.asr-link.v{v}" for v in SUPPORTED_VERSIONS}
CONTENT_TYPE = CONTENT_TYPES[VERSION]
# The version a client puts in ``Start`` by default. v3 changes nothing a Start carries
# or an event a client receives; a v3 client names v3 in its request content type and
# keeps ``version`` 2 in Start, so a v2 server (which refuses a Start of version 3) still
# takes the stream and answers with v2's content type: the client then never sends a
# ``Discard``. The stream's version is the one the response's content type names.
START_VERSION = 2


def version_of(content_type: str | None) -> int | None:
    """The link version a content type names (None: not a link content type we speak)."""
    if content_type is None:
        return None
    value = content_type.split(";", 1)[0].strip().lower()
    for v, ct in CONTENT_TYPES.items():
        if value == ct:
            return v
    return None


HEADER = struct.Struct("<BI")
AUDIO_HEADER = struct.Struct("<II")
DEFAULT_MAX_FRAME_BYTES = 64 * 1024
MAX_HOTWORDS = 100
MAX_HOTWORD_CHARS = 64
MAX_ID_CHARS = 128
MAX_LANG_CHARS = 16  # a BCP 47 tag with a region ("zh-Hant-TW") fits
# W3C traceparent version 00 is 55 characters; later versions may append fields.
MAX_TRACEPARENT_CHARS = 256
U32_MAX = 2**32 - 1


class FrameType(IntEnum):
    """The first byte of every frame."""

    START = 0x01
    AUDIO = 0x02
    FINALIZE = 0x03
    END = 0x04
    AUDIO_PCM = 0x05
    DISCARD = 0x06  # v3
    PAUSE = 0x07  # v4
    EVENT = 0x81


class ErrorCode(StrEnum):
    """Stable error codes carried by ``error`` events on the link."""

    UNKNOWN_FRAME = "UNKNOWN_FRAME"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    TRUNCATED = "TRUNCATED"
    BAD_START = "BAD_START"
    UNSUPPORTED_LANGUAGE = "UNSUPPORTED_LANGUAGE"
    NO_START = "NO_START"
    DUPLICATE_START = "DUPLICATE_START"
    BAD_FRAME = "BAD_FRAME"
    BAD_AUDIO = "BAD_AUDIO"
    BUSY = "BUSY"
    TIMEOUT = "TIMEOUT"
    INTERNAL = "INTERNAL"


class LinkProtocolError(Exception):
    """The peer sent bytes that break link v1. ``fatal`` errors end the stream."""

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal


# --- frames -------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """First frame of a stream: what the audio is and where recognition should run."""

    flow_id: str
    codec: str = "opus"
    sr: int = 16000
    channels: int = 1
    frame_ms: int = 20
    bitrate: int = 20000
    vbr: bool = True
    lang_hint: str = ""
    domain: str = "default"
    hotwords: tuple[str, ...] = ()
    traceparent: str = ""
    version: int = START_VERSION

    CODECS: ClassVar[frozenset[str]] = frozenset({"opus", "pcm"})

    def validate(self) -> None:
        """Check every field against link v1.

        Raises:
            LinkProtocolError: ``BAD_START`` naming the first field that is wrong.
        """
        problems = []
        if self.version not in SUPPORTED_VERSIONS:
            problems.append(f"version {self.version!r} is not supported "
                            f"(want one of {sorted(SUPPORTED_VERSIONS)})")
        if not self.flow_id or len(self.flow_id) > MAX_ID_CHARS:
            problems.append(f"flow_id must be 1..{MAX_ID_CHARS} characters")
        if self.codec not in self.CODECS:
            problems.append(f"codec {self.codec!r} is not one of {sorted(self.CODECS)}")
        if self.sr != 16000:
            problems.append(f"sr {self.sr!r} is not 16000")
        if self.channels != 1:
            problems.append(f"channels {self.channels!r} is not 1")
        if self.frame_ms != 20:
            problems.append(f"frame_ms {self.frame_ms!r} is not 20")
        if not 16000 <= self.bitrate <= 24000:
            problems.append(f"bitrate {self.bitrate!r} is outside 16000..24000")
        if len(self.hotwords) > MAX_HOTWORDS:
            problems.append(f"more than {MAX_HOTWORDS} hotwords")
        if any(len(w) > MAX_HOTWORD_CHARS for w in self.hotwords):
            problems.append(f"a hotword is longer than {MAX_HOTWORD_CHARS} characters")
        if len(self.lang_hint) > MAX_LANG_CHARS or len(self.domain) > MAX_ID_CHARS:
            problems.append(f"lang_hint or domain is too long (at most {MAX_LANG_CHARS} "
                            f"and {MAX_ID_CHARS} characters)")
        if len(self.traceparent) > MAX_TRACEPARENT_CHARS:
            problems.append(f"traceparent is longer than {MAX_TRACEPARENT_CHARS} characters")
        texts = (self.flow_id, self.lang_hint, self.domain, self.traceparent, *self.hotwords)
        if not all(_utf8(t) for t in texts):
            # A lone surrogate passes json.loads but not the tokenizer, the logs or a
            # re-encoding: refuse it here, for this stream only.
            problems.append("a text field is not valid Unicode (lone surrogate)")
        if problems:
            raise LinkProtocolError(ErrorCode.BAD_START, "; ".join(problems), fatal=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "flow_id": self.flow_id,
            "codec": self.codec,
            "sr": self.sr,
            "channels": self.channels,
            "frame_ms": self.frame_ms,
            "bitrate": self.bitrate,
            "vbr": self.vbr,
            "lang_hint": self.lang_hint,
            "domain": self.domain,
            "hotwords": list(self.hotwords),
            "traceparent": self.traceparent,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Start:
        """Build and validate a Start from its JSON object.

        Raises:
            LinkProtocolError: ``BAD_START`` on a missing, mistyped or invalid field.
        """
        types: dict[str, type | tuple[type, ...]] = {
            "version": int, "flow_id": str, "codec": str, "sr": int, "channels": int,
            "frame_ms": int, "bitrate": int, "vbr": bool, "lang_hint": str, "domain": str,
            "hotwords": list, "traceparent": str,
        }
        unknown = set(obj) - set(types)
        if unknown:
            raise LinkProtocolError(
                ErrorCode.BAD_START, f"unknown fields {sorted(unknown)}", fatal=True
            )
        if "flow_id" not in obj:
            raise LinkProtocolError(ErrorCode.BAD_START, "flow_id is required", fatal=True)
        for key, want in types.items():
            if key in obj:
                value = obj[key]
                # bool is an int subclass: a JSON true must not pass as a number.
                if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                    raise LinkProtocolError(
                        ErrorCode.BAD_START, f"{key} has the wrong type", fatal=True
                    )
        hotwords = obj.get("hotwords", [])
        if not all(isinstance(w, str) for w in hotwords):
            raise LinkProtocolError(ErrorCode.BAD_START, "hotwords must be strings", fatal=True)
        kwargs = {k: v for k, v in obj.items() if k != "hotwords"}
        start = cls(hotwords=tuple(hotwords), **kwargs)
        start.validate()
        return start


@dataclass(frozen=True)
class Audio:
    """One 20 ms audio packet: Opus, or PCM16 LE on fallback.

    ``seq`` counts sent packets (a gap means loss); ``pts_ms`` is the packet's start in
    session time (a jump means the gateway skipped non-speech, which is not loss).
    """

    seq: int
    pts_ms: int
    data: bytes
    pcm: bool = False  # PCM16 LE whatever the stream's codec: a packet that failed to encode


@dataclass(frozen=True)
class Finalize:
    """End the current utterance now: the server answers with its ``final``."""

    utterance: int | None = None


@dataclass(frozen=True)
class Discard:
    """(v3) Forget the current utterance: drop its audio and its queued partials, send no
    final. The next audio starts the next utterance, as after a ``Finalize``.

    ``utterance``, when given, is the server's index of the utterance meant; a Discard
    naming another (an utterance already cut) is ignored.
    """

    utterance: int | None = None


@dataclass(frozen=True)
class Pause:
    """(v4) A hint: the open utterance's speech paused, and no more of its audio comes
    unless speech resumes (the gateway's VAD saw silence past the utterance's trailing
    margin). The server may decode the utterance's final now, so that it is ready when
    the ``Finalize`` comes; audio that follows means speech resumed. ``utterance``, when
    given, is the server's index of the utterance meant; a Pause naming another is
    ignored. A server may ignore every Pause.
    """

    utterance: int | None = None


@dataclass(frozen=True)
class End:
    """No more audio on this stream: finalize, send ``end``, close."""


@dataclass(frozen=True)
class AsrEvent:
    """Server to gateway: ``partial``, ``final``, ``end``, ``error`` or (v2) ``flow``.

    ``ts`` is ``(start_ms, end_ms)`` in session time. ``flow`` fires when the stream's
    audio waiting for recognition crosses the server's threshold (``code="BEHIND"``: the
    gateway should slow its client) and when it has drained to half of it (``"OK"``).
    """

    type: str
    flow_id: str
    utterance: int = 0
    text: str = ""
    ts: tuple[int, int] = (0, 0)
    lang: str = ""
    code: str = ""
    message: str = ""
    fatal: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    TYPES: ClassVar[frozenset[str]] = frozenset({"partial", "final", "end", "error", "flow"})
    FLOW_CODES: ClassVar[frozenset[str]] = frozenset({"BEHIND", "OK"})

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "type": self.type,
            "flow_id": self.flow_id,
            "utterance": self.utterance,
            "text": self.text,
            "ts": [self.ts[0], self.ts[1]],
            "lang": self.lang,
        }
        if self.type == "error":
            obj.update(code=self.code, message=self.message, fatal=self.fatal)
        elif self.type == "flow":
            obj.update(code=self.code, message=self.message)
        obj.update(self.extra)
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AsrEvent:
        """Raises: LinkProtocolError ``BAD_FRAME`` when the object is not an AsrEvent."""
        try:
            kind = obj["type"]
            if kind not in cls.TYPES:
                raise ValueError(f"unknown event type {kind!r}")
            if kind == "flow" and obj.get("code") not in cls.FLOW_CODES:
                raise ValueError(f"flow code {obj.get('code')!r} is not one of "
                                 f"{sorted(cls.FLOW_CODES)}")
            ts = obj.get("ts", [0, 0])
            known = {"type", "flow_id", "utterance", "text", "ts", "lang", "code", "message",
                     "fatal"}
            return cls(
                type=kind,
                flow_id=str(obj["flow_id"]),
                utterance=int(obj.get("utterance", 0)),
                text=str(obj.get("text", "")),
                ts=(int(ts[0]), int(ts[1])),
                lang=str(obj.get("lang", "")),
                code=str(obj.get("code", "")),
                message=str(obj.get("message", "")),
                fatal=bool(obj.get("fatal", False)),
                extra={k: v for k, v in obj.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise LinkProtocolError(
                ErrorCode.BAD_FRAME, f"not an AsrEvent: {exc}", fatal=True
            ) from exc


Frame = Start | Audio | Finalize | Discard | Pause | End | AsrEvent


# --- encoding -----------------------------------------------------------------------


def _frame(kind: FrameType, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode(frame: Frame) -> bytes:
    """Serialize one frame.

    Raises:
        ValueError: ``seq`` or ``pts_ms`` outside u32.
    """
    if isinstance(frame, Audio):
        if not (0 <= frame.seq <= U32_MAX and 0 <= frame.pts_ms <= U32_MAX):
            raise ValueError("seq and pts_ms must fit in u32")
        kind = FrameType.AUDIO_PCM if frame.pcm else FrameType.AUDIO
        return _frame(kind, AUDIO_HEADER.pack(frame.seq, frame.pts_ms) + frame.data)
    if isinstance(frame, Start):
        return _frame(FrameType.START, _json(frame.to_json()))
    if isinstance(frame, Finalize | Discard | Pause):
        obj = {} if frame.utterance is None else {"utterance": frame.utterance}
        kind = (FrameType.FINALIZE if isinstance(frame, Finalize) else
                FrameType.DISCARD if isinstance(frame, Discard) else FrameType.PAUSE)
        return _frame(kind, _json(obj))
    if isinstance(frame, End):
        return _frame(FrameType.END, b"")
    return _frame(FrameType.EVENT, _json(frame.to_json()))


def encode_many(frames: list[Frame]) -> bytes:
    """Several frames in one buffer (one HTTP/2 DATA frame carries them all)."""
    return b"".join(encode(f) for f in frames)


# --- decoding -----------------------------------------------------------------------


class FrameDecoder:
    """Reassembles frames from arbitrary byte chunks (a frame may span DATA frames).

    Args:
        max_frame_bytes: the largest payload accepted; a larger one is fatal, since the
            stream can no longer be trusted to be in sync.
        accept: the frame types this side may receive (the server takes client frames,
            the client takes events).
    """

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        accept: frozenset[FrameType] | None = None,
    ) -> None:
        if max_frame_bytes <= 0:
            raise ValueError("max_frame_bytes must be positive")
        self._buf = bytearray()
        self._max = max_frame_bytes
        self._accept = accept if accept is not None else frozenset(FrameType)
        self._broken: LinkProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame that is not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | LinkProtocolError]:
        """Add bytes; return every frame now complete, in order.

        A malformed frame that leaves the stream in sync (a short audio frame) comes
        back in-band as a non-fatal ``LinkProtocolError`` in place of that frame, so the
        frames around it are kept.

        A fatal error poisons the decoder. The frames complete before it in the same
        chunk are still returned (a peer batches frames, and the audio before a broken
        frame was sent in good faith); the error is then raised by the next call, and
        ``broken`` tells it at once.

        Raises:
            LinkProtocolError: a fatal error, with no frame decoded before it in this
                call, or left from the previous call.
        """
        if self._broken is not None:
            raise self._broken
        self._buf += data
        out: list[Frame | LinkProtocolError] = []
        try:
            self._decode(out)
        except LinkProtocolError:
            if not out:
                raise
            # self._broken is set: the next call raises it.
        return out

    @property
    def broken(self) -> LinkProtocolError | None:
        """The fatal error that poisoned the decoder, if any."""
        return self._broken

    def _decode(self, out: list[Frame | LinkProtocolError]) -> None:
        while len(self._buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buf)
            if length > self._max:
                self._broken = LinkProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame of {length} bytes exceeds the limit of {self._max}",
                    fatal=True,
                )
                raise self._broken
            try:
                ftype = FrameType(kind)
            except ValueError:
                self._broken = LinkProtocolError(
                    ErrorCode.UNKNOWN_FRAME, f"unknown frame type 0x{kind:02x}", fatal=True
                )
                raise self._broken from None
            if ftype not in self._accept:
                self._broken = LinkProtocolError(
                    ErrorCode.UNKNOWN_FRAME, f"frame type {ftype.name} not expected here",
                    fatal=True,
                )
                raise self._broken
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[HEADER.size:end])
            del self._buf[:end]
            try:
                out.append(self._parse(ftype, payload))
            except LinkProtocolError as exc:
                if exc.fatal:
                    self._broken = exc
                    raise
                out.append(exc)

    def close(self) -> None:
        """The byte stream ended.

        Raises:
            LinkProtocolError: ``TRUNCATED`` if it ended inside a frame.
        """
        if self._buf and self._broken is None:
            n = len(self._buf)
            self._buf.clear()
            raise LinkProtocolError(
                ErrorCode.TRUNCATED, f"stream ended inside a frame ({n} bytes left)",
                fatal=True,
            )

    @staticmethod
    def _parse(ftype: FrameType, payload: bytes) -> Frame:
        if ftype in (FrameType.AUDIO, FrameType.AUDIO_PCM):
            if len(payload) < AUDIO_HEADER.size:
                raise LinkProtocolError(
                    ErrorCode.BAD_FRAME, "audio frame shorter than its header", fatal=False
                )
            seq, pts_ms = AUDIO_HEADER.unpack_from(payload)
            return Audio(seq, pts_ms, payload[AUDIO_HEADER.size:],
                         pcm=ftype is FrameType.AUDIO_PCM)
        if ftype is FrameType.END:
            return End()
        try:
            obj = json.loads(payload) if payload else {}
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            # ValueError: JSONDecodeError, and also integers past Python's digit limit;
            # RecursionError: arrays nested thousands deep.
            code = ErrorCode.BAD_START if ftype is FrameType.START else ErrorCode.BAD_FRAME
            raise LinkProtocolError(code, f"{ftype.name} is not JSON: {exc}", fatal=True) from exc
        if not isinstance(obj, dict):
            code = ErrorCode.BAD_START if ftype is FrameType.START else ErrorCode.BAD_FRAME
            raise LinkProtocolError(code, f"{ftype.name} must be a JSON object", fatal=True)
        if ftype is FrameType.START:
            return Start.from_json(obj)
        if ftype in (FrameType.FINALIZE, FrameType.DISCARD, FrameType.PAUSE):
            utt = obj.get("utterance")
            if utt is not None and (not isinstance(utt, int) or isinstance(utt, bool)):
                raise LinkProtocolError(
                    ErrorCode.BAD_FRAME, "utterance must be an integer", fatal=False
                )
            if ftype is FrameType.FINALIZE:
                return Finalize(utt)
            return Discard(utt) if ftype is FrameType.DISCARD else Pause(utt)
        return AsrEvent.from_json(obj)


CLIENT_FRAMES = frozenset({FrameType.START, FrameType.AUDIO, FrameType.AUDIO_PCM,
                           FrameType.FINALIZE, FrameType.DISCARD, FrameType.PAUSE,
                           FrameType.END})
# The client frames a stream of each version accepts (below: an unknown frame type).
_NEWER_FRAMES = {FrameType.DISCARD: 3, FrameType.PAUSE: 4}
SERVER_FRAMES = frozenset({FrameType.EVENT})


# --- the receiving side's stream state --------------------------------------------


class StreamState(Enum):
    AWAIT_START = "await_start"
    STREAMING = "streaming"
    ENDED = "ended"


@dataclass(frozen=True)
class AudioIn:
    """Audio to decode, with what the sequence numbers say happened before it.

    ``lost`` is how many packets went missing just before this one (0 normally): the
    shell conceals them (PLC) or recovers the last with FEC from this packet.
    """

    packet: Audio
    lost: int


Inbound = Start | AudioIn | Finalize | Discard | Pause | End | LinkProtocolError

# (state, frame class) -> next state. Pairs that are absent are protocol errors.
_TRANSITIONS: dict[tuple[StreamState, type], StreamState] = {
    (StreamState.AWAIT_START, Start): StreamState.STREAMING,
    (StreamState.STREAMING, Audio): StreamState.STREAMING,
    (StreamState.STREAMING, Finalize): StreamState.STREAMING,
    (StreamState.STREAMING, Discard): StreamState.STREAMING,
    (StreamState.STREAMING, Pause): StreamState.STREAMING,
    (StreamState.STREAMING, End): StreamState.ENDED,
}

_BAD_TRANSITION_CODES: dict[tuple[StreamState, type], ErrorCode] = {
    (StreamState.AWAIT_START, Audio): ErrorCode.NO_START,
    (StreamState.AWAIT_START, Finalize): ErrorCode.NO_START,
    (StreamState.AWAIT_START, Discard): ErrorCode.NO_START,
    (StreamState.AWAIT_START, Pause): ErrorCode.NO_START,
    (StreamState.AWAIT_START, End): ErrorCode.NO_START,
    (StreamState.STREAMING, Start): ErrorCode.DUPLICATE_START,
}


class ServerStream:
    """Server side of one link stream, sans-IO: frames in, validated inputs out.

    Drops duplicate and stale packets by ``seq`` (counted in ``duplicates``) and reports
    gaps as ``AudioIn.lost`` so the shell can run loss concealment.

    ``version`` is the stream's link version (the one its response's content type
    names): below 3 a ``Discard`` frame is an unknown frame type, as on a v2 server,
    and below 4 a ``Pause`` frame.
    """

    MAX_CONCEALED = 5  # packets; a longer gap is a jump, not a loss worth concealing

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 version: int = VERSION) -> None:
        accept = CLIENT_FRAMES - {f for f, v in _NEWER_FRAMES.items() if version < v}
        self.version = version
        self.decoder = FrameDecoder(max_frame_bytes=max_frame_bytes, accept=accept)
        self.state = StreamState.AWAIT_START
        self.start: Start | None = None
        self._next_seq: int | None = None
        self.duplicates = 0
        self.lost = 0

    def receive(self, data: bytes) -> list[Inbound]:
        """Feed body bytes; return what the shell should act on, in order.

        Non-fatal errors (a second Start, a short audio frame) come back in-band; the
        shell reports them and carries on.

        Raises:
            LinkProtocolError: a fatal error: the stream cannot go on.
        """
        out: list[Inbound] = []
        frames = self.decoder.feed(data)
        if self.decoder.broken is not None:
            # Frames before a fatal one in the same chunk come out first; the error
            # follows them in-band, last (the next call raises it).
            frames = [*frames, self.decoder.broken]
        for frame in frames:
            if isinstance(frame, LinkProtocolError):
                out.append(frame)
                continue
            key = (self.state, type(frame))
            if key not in _TRANSITIONS:
                code = _BAD_TRANSITION_CODES.get(key, ErrorCode.BAD_FRAME)
                error = LinkProtocolError(
                    code,
                    f"{type(frame).__name__} is not allowed in state {self.state.value}",
                    fatal=code is not ErrorCode.DUPLICATE_START,
                )
                if error.fatal:
                    raise error
                out.append(error)
                continue
            self.state = _TRANSITIONS[key]
            if isinstance(frame, Start):
                self.start = frame
                out.append(frame)
            elif isinstance(frame, Audio):
                item = self._sequence(frame)
                if item is not None:
                    out.append(item)
            elif isinstance(frame, Finalize | Discard | Pause | End):
                out.append(frame)
        return out

    def _sequence(self, packet: Audio) -> AudioIn | None:
        if self._next_seq is not None and packet.seq < self._next_seq:
            self.duplicates += 1
            return None
        lost = 0 if self._next_seq is None else packet.seq - self._next_seq
        self._next_seq = packet.seq + 1
        self.lost += lost
        return AudioIn(packet, min(lost, self.MAX_CONCEALED))

    def close(self) -> None:
        """The request body ended. Raises LinkProtocolError ``TRUNCATED`` if mid-frame."""
        self.decoder.close()

