"""The client's protocol logic, sans-IO: what to send, in what order, and when.

``StreamCore`` turns audio pushed in any chunk size into ``chunk_ms`` frames, each with
the ``seq_header`` (``u32 seq | u32 pts_ms``, little-endian), keeps control messages in
order with the audio around them, obeys the server's ``flow`` events, and keeps the
frames it sent for a while so that after a reconnect it can send again whatever the
server did not get. It never touches a socket or reads a clock: the shell passes
``now`` (seconds, any monotonic origin) where timing matters.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

from .events import Ack

SAMPLE_RATE = 16000
BYTES_PER_SAMPLE = 2
SEQ_HEADER = struct.Struct("<II")  # seq, pts_ms
SLOW_DOWN_RATE = 1.0  # after SLOW_DOWN, send at most this many seconds of audio per second


@dataclass(frozen=True)
class Frame:
    """One binary frame: ``pcm`` (PCM16 LE) starting at ``pts_ms`` of session audio."""

    seq: int
    pts_ms: int
    pcm: bytes

    def wire(self, seq_header: bool = True) -> bytes:
        return SEQ_HEADER.pack(self.seq, self.pts_ms) + self.pcm if seq_header else self.pcm

    @property
    def ms(self) -> float:
        return len(self.pcm) / BYTES_PER_SAMPLE * 1000 / SAMPLE_RATE


@dataclass(frozen=True)
class Control:
    """A JSON text message (``finalize``, ``flush``, ``ping``) in its place among frames."""

    message: dict[str, Any]

    def wire(self) -> str:
        return json.dumps(self.message, separators=(",", ":"))


Outgoing = Frame | Control


class ProtocolStateError(RuntimeError):
    """The caller did something the stream's state does not allow (e.g. audio after flush)."""


class StreamCore:
    """Args:
        chunk_ms: audio per binary frame (the server reframes anyway; 20 ms matches it).
        max_buffer_ms: audio allowed to wait unsent (while paused or disconnected)
            before ``buffer_full`` tells the producer to wait.
        resume_buffer_ms: audio kept after sending, to send again after a reconnect.
        seq_header: put the 8-byte header on every frame (needed for resume).
    """

    def __init__(self, *, chunk_ms: int = 20, max_buffer_ms: int = 10_000,
                 resume_buffer_ms: int = 30_000, seq_header: bool = True) -> None:
        if not 10 <= chunk_ms <= 1000:
            raise ValueError("chunk_ms must be between 10 and 1000")
        if max_buffer_ms < chunk_ms or resume_buffer_ms < 0:
            raise ValueError("max_buffer_ms must hold a chunk; resume_buffer_ms >= 0")
        self.chunk_ms = chunk_ms
        self.seq_header = seq_header
        self._chunk_bytes = SAMPLE_RATE * chunk_ms // 1000 * BYTES_PER_SAMPLE
        self._max_buffer_ms = max_buffer_ms
        self._resume_ms = resume_buffer_ms
        self._tail = bytearray()  # less than one chunk, waiting for more audio
        self._out: deque[Outgoing] = deque()  # to send, in order
        self._kept: deque[Frame] = deque()  # sent, kept for a resume
        self._kept_ms = 0.0
        self._pending_ms = 0.0
        self._next_seq = 0
        self._samples = 0  # pushed so far: the next frame's pts
        self.flow = "RESUME"
        self._slow_since: float | None = None
        self._slow_sent_ms = 0.0
        self.flushed = False  # flush queued: no more audio
        self.flush_sent = False
        self.connected = False
        self.frames_sent = 0
        self.frames_resent = 0

    # -- the producer's side ---------------------------------------------------------

    def push(self, pcm: bytes) -> None:
        """Queue PCM16 LE 16 kHz mono audio of any length (whole samples).

        Raises:
            ValueError: an odd number of bytes.
            ProtocolStateError: after ``flush``.
        """
        if len(pcm) % BYTES_PER_SAMPLE:
            raise ValueError(f"{len(pcm)} bytes is not whole 16-bit samples")
        if self.flushed:
            raise ProtocolStateError("no audio after flush")
        self._tail += pcm
        whole = len(self._tail) - len(self._tail) % self._chunk_bytes
        for pos in range(0, whole, self._chunk_bytes):
            self._frame(bytes(self._tail[pos:pos + self._chunk_bytes]))
        del self._tail[:whole]

    def finalize(self) -> None:
        """Queue ``finalize`` after all audio pushed so far (a short tail goes first)."""
        if self.flushed:
            raise ProtocolStateError("finalize after flush")
        self._emit_tail()
        self._out.append(Control({"type": "finalize"}))

    def flush(self) -> None:
        """Queue the end of audio: the tail, then ``flush``. Idempotent."""
        if self.flushed:
            return
        self._emit_tail()
        self.flushed = True
        self._out.append(Control({"type": "flush"}))

    def ping(self, ident: str) -> Control:
        """A ``ping`` to send now, ahead of queued audio (keepalive)."""
        return Control({"type": "ping", "id": ident})

    @property
    def buffered_ms(self) -> float:
        """Audio queued and not yet sent."""
        return self._pending_ms

    @property
    def buffer_full(self) -> bool:
        """The producer should wait: more than ``max_buffer_ms`` is waiting."""
        return self._pending_ms >= self._max_buffer_ms

    @property
    def pushed_ms(self) -> float:
        return self._samples * 1000 / SAMPLE_RATE

    # -- the sender's side -----------------------------------------------------------

    def next_outgoing(self, now: float) -> tuple[Outgoing | None, float | None]:
        """What to send next, or why not.

        Returns:
            ``(item, None)``: send ``item`` now, then call ``sent(item, now)``;
            ``(None, wait_s)``: pacing (SLOW_DOWN): ask again after ``wait_s``;
            ``(None, None)``: nothing may be sent until something changes (no data,
            paused, or not connected).
        """
        if not self.connected or not self._out:
            return None, None
        item = self._out[0]
        if isinstance(item, Frame):
            if self.flow in ("PAUSE", "BUSY"):
                return None, None
            if self.flow == "SLOW_DOWN" and self._slow_since is not None:
                allowed_ms = (now - self._slow_since) * 1000 * SLOW_DOWN_RATE
                excess_ms = self._slow_sent_ms - allowed_ms
                if excess_ms > 0.001:  # 1 us: float rounding must not wait forever
                    return None, excess_ms / 1000 / SLOW_DOWN_RATE
        return item, None

    def sent(self, item: Outgoing, now: float) -> None:
        """``item`` (the one ``next_outgoing`` gave) went out on the connection."""
        if not self._out or self._out[0] is not item:
            raise ProtocolStateError("sent() must follow next_outgoing() in order")
        self._out.popleft()
        if isinstance(item, Control):
            if item.message["type"] == "flush":
                self.flush_sent = True
            return
        self._pending_ms -= item.ms
        self.frames_sent += 1
        if self.flow == "SLOW_DOWN":
            self._slow_sent_ms += item.ms
        self._kept.append(item)
        self._kept_ms += item.ms
        while self._kept and self._kept_ms - self._kept[0].ms >= self._resume_ms:
            self._kept_ms -= self._kept.popleft().ms

    # -- the server's side -----------------------------------------------------------

    def on_flow(self, state: str, now: float) -> None:
        """A ``flow`` event: ``PAUSE``/``BUSY`` stop audio, ``SLOW_DOWN`` paces it to real
        time, ``RESUME`` lifts both."""
        if state not in ("BUSY", "PAUSE", "SLOW_DOWN", "RESUME"):
            return  # a newer server's state: ignore rather than guess
        self.flow = state
        if state == "SLOW_DOWN":
            self._slow_since, self._slow_sent_ms = now, 0.0
        else:
            self._slow_since = None

    def on_disconnect(self) -> None:
        """The connection is gone; nothing is sent until the next ``ack``."""
        self.connected = False
        self.flow = "RESUME"
        self._slow_since = None

    def on_ack(self, ack: Ack, *, reconnect: bool) -> bool:
        """The server accepted ``start``. On a reconnect, decide what to send again.

        If the server resumed the session, every kept frame from the ``seq`` it expects
        next (``session.next_seq``; all kept frames when it does not say) is queued again
        ahead of new audio, and so is ``flush`` if it was sent. If it did not, the old
        session is over: the unsent audio starts a new session from ``seq`` 0.

        Returns:
            whether the session was resumed.
        """
        self.connected = True
        if not reconnect:
            return False
        if ack.resumed:
            next_seq = ack.session.get("next_seq")
            again = [f for f in self._kept
                     if not isinstance(next_seq, int) or f.seq >= next_seq]
            if self.flush_sent and not any(isinstance(i, Control)
                                           and i.message["type"] == "flush"
                                           for i in self._out):
                self._out.append(Control({"type": "flush"}))
                self.flush_sent = False
            self._out.extendleft(reversed(again))
            self._pending_ms += sum(f.ms for f in again)
            self.frames_resent += len(again)
            return True
        # A fresh session: renumber what was never sent, from seq 0 and pts 0.
        self._kept.clear()
        self._kept_ms = 0.0
        frames = [i for i in self._out if isinstance(i, Frame)]
        base_pts = frames[0].pts_ms if frames else 0
        renumbered: deque[Outgoing] = deque()
        seq = 0
        for item in self._out:
            if isinstance(item, Frame):
                item = Frame(seq, item.pts_ms - base_pts, item.pcm)
                seq += 1
            renumbered.append(item)
        self._out = renumbered
        self._next_seq = seq
        self._samples = (self._samples - base_pts * SAMPLE_RATE // 1000
                         if frames else 0)
        if self.flush_sent:
            self._out.append(Control({"type": "flush"}))
            self.flush_sent = False
        return False

    # -- internals -------------------------------------------------------------------

    def _emit_tail(self) -> None:
        if self._tail:
            self._frame(bytes(self._tail))
            self._tail.clear()

    def _frame(self, pcm: bytes) -> None:
        frame = Frame(self._next_seq, self._samples * 1000 // SAMPLE_RATE, pcm)
        self._next_seq += 1
        self._samples += len(pcm) // BYTES_PER_SAMPLE
        self._out.append(frame)
        self._pending_ms += frame.ms
