"""Test helpers: drive the ASR service over a real HTTP/2 connection with link v1 frames."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from asr import link
from gateway.h2client import H2Connection, H2Stream
from native import OpusEncoder


def opus_packets(audio: np.ndarray, bitrate: int = 20000) -> list[bytes]:
    """Encode int16 16 kHz audio into 20 ms Opus packets (the last frame zero-padded)."""
    enc = OpusEncoder(16000, 1, "voip", bitrate=bitrate, vbr=True)
    n = -(-len(audio) // 320) * 320
    padded = np.zeros(n, dtype=np.int16)
    padded[: len(audio)] = audio
    return [enc.encode(padded[i:i + 320]) for i in range(0, n, 320)]


def audio_frames(packets: Sequence[bytes], *, first_seq: int = 0, first_pts_ms: int = 0
                 ) -> list[link.Audio]:
    return [link.Audio(first_seq + i, first_pts_ms + 20 * i, p) for i, p in enumerate(packets)]


@dataclass
class LinkStream:
    """One /v1/recognize stream: ``events`` holds everything received, in order."""

    stream: H2Stream
    decoder: link.FrameDecoder = field(
        default_factory=lambda: link.FrameDecoder(accept=link.SERVER_FRAMES))
    events: list[link.AsrEvent] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    _unread: list[link.AsrEvent] = field(default_factory=list)

    async def send(self, *frames: link.Frame) -> None:
        await self.stream.send(link.encode_many(list(frames)))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def next_event(self) -> link.AsrEvent | None:
        """The next unread event, or None when the response ended."""
        while not self._unread:
            chunk = await self.stream.receive()
            if chunk is None:
                return None
            got = [e for e in self.decoder.feed(chunk) if isinstance(e, link.AsrEvent)]
            now = time.perf_counter()
            self.events += got
            self.times += [now] * len(got)
            self._unread += got
        return self._unread.pop(0)

    async def until(self, kind: str) -> link.AsrEvent:
        """Read until an event of type ``kind`` arrives."""
        while True:
            ev = await self.next_event()
            if ev is None:
                raise AssertionError(f"response ended before a {kind!r} event: {self.events}")
            if ev.type == kind:
                return ev

    async def rest(self) -> list[link.AsrEvent]:
        """Read to the end of the response; return every event received."""
        while await self.next_event() is not None:
            pass
        return self.events


async def open_recognize(conn: H2Connection, start: link.Start | None = None) -> LinkStream:
    stream = await conn.open_stream(
        "POST", "/v1/recognize", [("content-type", link.CONTENT_TYPE)])
    ls = LinkStream(stream)
    if start is not None:
        await ls.send(start)
    return ls
