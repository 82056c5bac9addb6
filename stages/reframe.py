"""Ingest: client binary frames to 20 ms PCM frames, sans-IO.

Two pieces, used in this order by a session:

* ``SeqBuffer`` (only with the ``seq_header`` feature): parses the 8-byte header
  ``u32 seq (LE) | u32 pts_ms (LE)``, drops duplicates, reorders within a window and lets
  a reconnecting client resume without losing or doubling audio.
* ``Reframer``: PCM16 LE in any length to fixed frames of ``frame_samples`` samples,
  numbered in session time (samples). It never loses or duplicates a sample.

Both raise ``IngestError`` (with a stable code) for bad client input and keep their state,
so the session goes on with what it already accepted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16000
FRAME_SAMPLES = 320  # 20 ms at 16 kHz
SEQ_HEADER = struct.Struct("<II")
DEFAULT_MAX_CHUNK_BYTES = 64 * 1024  # 2 s of PCM16 at 16 kHz
DEFAULT_REORDER_WINDOW = 16  # packets held while waiting for a missing one
# The furthest a packet's seq may lie ahead of the next one expected, in packets (5 s of
# 20 ms chunks). A larger jump is refused with BAD_SEQ_HEADER: taken, it would make
# every later packet an old "duplicate", and concealing the gap would conjure up
# silence by the gigabyte.
DEFAULT_MAX_SEQ_AHEAD = 256
_EMPTY = np.zeros(0, dtype=np.int16)
_PCM16 = np.dtype("<i2")  # the wire format, parsed once
_SWAP = not _PCM16.isnative


class IngestError(Exception):
    """Bad audio input from the client. The frame is refused; the session goes on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PcmFrame:
    """One fixed-size frame of int16 samples starting at ``start`` (session samples)."""

    start: int
    samples: npt.NDArray[np.int16]

    @property
    def end(self) -> int:
        return self.start + len(self.samples)


@dataclass(frozen=True)
class ReframerStats:
    bytes_in: int
    samples_in: int
    frames_out: int
    pending_samples: int


class Reframer:
    """PCM16 LE bytes of any even length in, ``frame_samples`` frames out.

    Args:
        frame_samples: samples per output frame (320 = 20 ms at 16 kHz).
        max_chunk_bytes: a larger client frame is refused with ``FRAME_TOO_LARGE``.
    """

    def __init__(
        self,
        frame_samples: int = FRAME_SAMPLES,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        if frame_samples <= 0:
            raise ValueError("frame_samples must be positive")
        if max_chunk_bytes < 2:
            raise ValueError("max_chunk_bytes must be at least 2")
        self.frame_samples = frame_samples
        self.max_chunk_bytes = max_chunk_bytes
        self._pending = _EMPTY
        self._next_start = 0  # session sample index of the next frame out
        self._bytes_in = 0
        self._frames_out = 0

    def feed(self, data: bytes) -> list[PcmFrame]:
        """Accept one client binary frame; return the frames now complete.

        Raises:
            IngestError: ``ODD_BYTE_COUNT`` or ``FRAME_TOO_LARGE``; nothing is accepted
                from that chunk and earlier audio is untouched.
        """
        if len(data) > self.max_chunk_bytes:
            raise IngestError(
                "FRAME_TOO_LARGE",
                f"binary frame of {len(data)} bytes exceeds {self.max_chunk_bytes}",
            )
        if len(data) % 2:
            raise IngestError(
                "ODD_BYTE_COUNT",
                f"binary frame of {len(data)} bytes is not whole PCM16 samples",
            )
        self._bytes_in += len(data)
        samples = np.frombuffer(data, dtype=_PCM16)
        if _SWAP:  # a big-endian host: to native order
            samples = samples.astype(np.int16)
        fs = self.frame_samples
        pending = self._pending
        if len(pending):
            buf = np.concatenate((pending, samples))
        elif len(samples) == fs:  # the common case: one client chunk is one frame
            self._frames_out += 1
            start = self._next_start
            self._next_start = start + fs
            return [PcmFrame(start, samples.copy())]
        else:
            buf = samples
        n_frames = len(buf) // fs
        whole = n_frames * fs
        # one copy for all the frames (each a view of it), one for the remainder
        frames = buf[:whole].copy() if buf is samples else buf[:whole]
        start = self._next_start
        out = [PcmFrame(start + i * fs, frames[i * fs:(i + 1) * fs]) for i in range(n_frames)]
        self._next_start = start + whole
        self._pending = buf[whole:].copy() if len(buf) > whole else _EMPTY
        self._frames_out += n_frames
        return out

    def flush(self) -> list[PcmFrame]:
        """End of audio: the remainder, zero-padded to a whole frame (none if empty).

        The padding is silence after the client's last sample; ``end`` of the returned
        frame therefore lies up to one frame past the audio sent.
        """
        if not len(self._pending):
            return []
        frame = np.zeros(self.frame_samples, dtype=np.int16)
        frame[: len(self._pending)] = self._pending
        self._pending = _EMPTY
        out = PcmFrame(self._next_start, frame)
        self._next_start += self.frame_samples
        self._frames_out += 1
        return [out]

    @property
    def samples_in(self) -> int:
        return self._bytes_in // 2

    def statistics(self) -> ReframerStats:
        return ReframerStats(self._bytes_in, self.samples_in, self._frames_out,
                             len(self._pending))


@dataclass(frozen=True)
class SeqStats:
    received: int
    duplicates: int
    reordered: int
    lost: int
    held: int
    refused: int = 0  # packets too far ahead (BAD_SEQ_HEADER)


class SeqBuffer:
    """Orders ``seq_header`` frames: duplicates dropped, reordering within a window.

    Payloads come out in ``seq`` order. A missing ``seq`` is waited for until
    ``window`` later packets are held; then it is declared lost and skipped. The buffer
    remembers the next ``seq`` it expects, so a client that reconnects and re-sends
    from an earlier ``seq`` (resume) neither loses nor doubles audio. A packet more
    than ``max_ahead`` past the next expected ``seq`` is refused (``BAD_SEQ_HEADER``)
    and changes nothing, so a gap (and its concealment) is never longer than that.

    Args:
        window: packets held while waiting for a gap to fill.
        first_seq: the ``seq`` the first packet must carry (0 for a new session).
        conceal: a lost packet becomes zeros as long as the packet before it (clients
            send fixed-size chunks), so the session's time, and the recording, stay
            aligned with the client's audio instead of closing up around the gap.
        max_ahead: the largest accepted ``seq - next_seq``; at least ``window``.
    """

    def __init__(self, window: int = DEFAULT_REORDER_WINDOW, *, first_seq: int = 0,
                 conceal: bool = False, max_ahead: int = DEFAULT_MAX_SEQ_AHEAD) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if max_ahead < window:
            raise ValueError("max_ahead must be at least window")
        self.window = window
        self.max_ahead = max_ahead
        self.conceal = conceal
        self._last_len = 0
        self.next_seq = first_seq
        self._held: dict[int, bytes] = {}
        self._received = 0
        self._duplicates = 0
        self._reordered = 0
        self._lost = 0
        self._refused = 0

    @staticmethod
    def parse(frame: bytes) -> tuple[int, int, bytes]:
        """Split a client binary frame into ``(seq, pts_ms, payload)``.

        Raises:
            IngestError: ``BAD_SEQ_HEADER`` when the frame is shorter than the header.
        """
        if len(frame) < SEQ_HEADER.size:
            raise IngestError(
                "BAD_SEQ_HEADER",
                f"binary frame of {len(frame)} bytes is shorter than the 8-byte seq header",
            )
        seq, pts_ms = SEQ_HEADER.unpack_from(frame)
        return seq, pts_ms, frame[SEQ_HEADER.size:]

    def feed(self, seq: int, payload: bytes) -> list[bytes]:
        """Accept one packet; return the payloads now deliverable, in order.

        Raises:
            IngestError: ``BAD_SEQ_HEADER`` for a ``seq`` more than ``max_ahead`` past
                the next one expected; the buffer is unchanged.
        """
        if seq - self.next_seq > self.max_ahead:
            self._refused += 1
            raise IngestError(
                "BAD_SEQ_HEADER",
                f"seq {seq} is more than {self.max_ahead} ahead of the next expected "
                f"({self.next_seq}); the packet is refused")
        self._received += 1
        if seq < self.next_seq or seq in self._held:
            self._duplicates += 1
            return []
        if seq != self.next_seq:
            self._reordered += 1
        self._held[seq] = payload
        out = self._drain()
        while len(self._held) > self.window:
            out += self._skip_gap()  # give up on the gap
        return out

    def flush(self) -> list[bytes]:
        """End of audio: everything held, in order, past gaps (counted as lost)."""
        out: list[bytes] = []
        while self._held:
            out += self._skip_gap()
        return out

    def _skip_gap(self) -> list[bytes]:
        """Skip to the oldest packet held (concealing the gap if asked), and drain."""
        oldest = min(self._held)
        gap = oldest - self.next_seq
        self._lost += gap
        size = self._last_len or len(self._held[oldest])
        out = [bytes(size)] * gap if self.conceal else []
        self.next_seq = oldest
        return out + self._drain()

    def _drain(self) -> list[bytes]:
        out = []
        while self.next_seq in self._held:
            payload = self._held.pop(self.next_seq)
            self._last_len = len(payload)
            out.append(payload)
            self.next_seq += 1
        return out

    def statistics(self) -> SeqStats:
        return SeqStats(self._received, self._duplicates, self._reordered, self._lost,
                        len(self._held), self._refused)
