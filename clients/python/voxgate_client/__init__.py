"""voxgate_client: stream audio to a voxgate gateway, get typed events back.

Three styles over one implementation: ``connect`` (async, on asyncio or Trio),
``SyncStream`` (plain threads), and ``stream_file`` (a WAV file, start to end).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .aio import HandshakeError, Stream, StreamError, StreamOptions, connect
from .events import (
    Ack,
    End,
    Error,
    Event,
    Final,
    Flow,
    Lid,
    Metrics,
    Partial,
    Pong,
    Reconnected,
    Reconnecting,
    RecordUrl,
    UnknownEvent,
    parse_event,
)
from .files import stream_file
from .sync import SyncStream

__all__ = [
    "Ack", "End", "Error", "Event", "Final", "Flow", "HandshakeError", "Lid", "Metrics",
    "Partial", "Pong", "Reconnected", "Reconnecting", "RecordUrl", "Stream", "StreamError",
    "StreamOptions", "SyncStream", "UnknownEvent", "__version__", "connect", "parse_event",
    "stream_file",
]
