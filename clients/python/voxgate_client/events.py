"""Typed events of voxgate protocol v1, as the client receives them.

Each server event is a frozen dataclass; ``parse_event`` turns one JSON object into one.
Following the protocol's compatibility rule, fields a class does not know are kept in
``extra`` and event types it does not know become ``UnknownEvent``: a newer server never
breaks an older client.

Two events come from the client itself, never from the server: ``Reconnecting`` (the
connection dropped and the client is trying again) and ``Reconnected`` (it is back;
``resumed`` says whether the server continued the same session).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """Common fields: the session's ``flow_id`` and the event's per-session ``seq``."""

    flow_id: str = ""
    seq: int = -1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Ack(Event):
    """The server accepted ``start``: the session's settings and limits."""

    session: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)

    @property
    def resumed(self) -> bool:
        """The server continued an earlier connection's session (same flowId)."""
        return bool(self.session.get("resumed", False))


@dataclass(frozen=True)
class Lid(Event):
    """Language identification decided: the language and how sure it is."""

    lang: str = ""
    score: float = 0.0
    top: tuple[tuple[str, float], ...] = ()
    pool: str = ""


@dataclass(frozen=True)
class Partial(Event):
    """An interim hypothesis for utterance ``utterance``; later ones replace it."""

    utterance: int = 0
    text: str = ""
    start_ms: int = 0
    end_ms: int = 0
    lang: str = ""


@dataclass(frozen=True)
class Final(Event):
    """The final text of utterance ``utterance`` (exactly one per utterance)."""

    utterance: int = 0
    text: str = ""
    start_ms: int = 0
    end_ms: int = 0
    lang: str = ""


@dataclass(frozen=True)
class RecordUrl(Event):
    """The archived recording of the whole session."""

    url: str = ""
    duration_ms: int = 0
    bytes: int = 0
    sha256: str = ""
    content_type: str = ""


@dataclass(frozen=True)
class Metrics(Event):
    """Session figures sent before ``end`` (audio, speech, utterances, stage costs)."""

    audio_ms: int = 0
    speech_ms: int = 0
    utterances: int = 0
    first_partial_ms: int | None = None


@dataclass(frozen=True)
class End(Event):
    """The session is over; nothing follows. ``reason``: flush, disconnect, idle, ..."""

    reason: str = ""


@dataclass(frozen=True)
class Error(Event):
    """Something was wrong; ``code`` is stable, ``fatal`` says whether the session ends."""

    code: str = ""
    message: str = ""
    fatal: bool = False


@dataclass(frozen=True)
class Flow(Event):
    """Backpressure: ``BUSY``, ``PAUSE``, ``SLOW_DOWN`` or ``RESUME``."""

    state: str = ""
    reason: str = ""
    retry_after_ms: int | None = None


@dataclass(frozen=True)
class Pong(Event):
    """The answer to a ``ping``."""

    id: str = ""


@dataclass(frozen=True)
class UnknownEvent(Event):
    """An event type this client does not know (a newer server); ``raw`` is all of it."""

    type: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reconnecting(Event):
    """Client-side: the connection dropped; the client is reconnecting (attempt n)."""

    attempt: int = 0
    cause: str = ""


@dataclass(frozen=True)
class Reconnected(Event):
    """Client-side: connected again; ``resumed`` is False if the server started afresh."""

    resumed: bool = False


ServerEvent = Ack | Lid | Partial | Final | RecordUrl | Metrics | End | Error | Flow | Pong

_TYPES: dict[str, type[Event]] = {
    "ack": Ack, "lid": Lid, "asr_partial": Partial, "asr_final": Final,
    "record_url": RecordUrl, "metrics": Metrics, "end": End, "error": Error,
    "flow": Flow, "pong": Pong,
}


def parse_event(obj: dict[str, Any]) -> Event:
    """One server event from its JSON object.

    Raises:
        ValueError: ``obj`` is not an object with a string ``type``.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ValueError("an event is a JSON object with a string 'type'")
    kind = obj["type"]
    flow_id, seq = str(obj.get("flowId", "")), int(obj.get("seq", -1))
    cls = _TYPES.get(kind)
    if cls is None:
        return UnknownEvent(flow_id, seq, type=kind, raw=dict(obj))
    names = {f.name for f in dataclasses.fields(cls)} - {"flow_id", "seq", "extra"}
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in obj.items():
        if key in ("type", "flowId", "seq"):
            continue
        if key in names:
            values[key] = value
        else:
            extra[key] = value
    if cls is Lid and "top" in values:
        values["top"] = tuple((str(t.get("lang", "")), float(t.get("score", 0.0)))
                              for t in values["top"] if isinstance(t, dict))
    return cls(flow_id, seq, extra, **values)
