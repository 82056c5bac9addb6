"""A streaming client for protocol v1: ``voxgate stream``, the tests and ``bench/`` use it.

It sends ``start``, waits for ``ack``, streams PCM16 in ``chunk_ms`` pieces (in real time,
or as fast as the server accepts), honours ``flow`` PAUSE/RESUME, sends ``flush`` and
reads events until ``end``.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

SAMPLE_RATE = 16000


@dataclass
class StreamResult:
    """Everything a streaming run produced, with client-side timing."""

    events: list[dict[str, Any]] = field(default_factory=list)
    arrival_s: list[float] = field(default_factory=list)  # since the first audio byte
    audio_started: float = 0.0

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def transcript(self) -> str:
        return " ".join(e["text"] for e in self.of("asr_final") if e["text"]).strip()


def read_wav(path: str | Path) -> np.ndarray:
    """A 16 kHz mono PCM16 WAV file as int16 (other formats: convert first).

    Raises:
        ValueError: another rate, width or channel count.
    """
    with wave.open(str(path), "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SAMPLE_RATE, 1, 2):
            raise ValueError(f"{path}: need 16 kHz mono 16-bit PCM WAV "
                             f"(got {w.getframerate()} Hz, {w.getnchannels()} ch, "
                             f"{8 * w.getsampwidth()} bit); convert it with sox first")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy()


async def stream_audio(
    url: str,
    audio: np.ndarray,
    *,
    realtime: bool = True,
    chunk_ms: int = 20,
    start: dict[str, Any] | None = None,
    seq_header: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    flush: bool = True,
    timeout_s: float = 120.0,
    speed: float | None = None,
) -> StreamResult:
    """Stream ``audio`` (int16, 16 kHz mono) to ``url`` and collect the events.

    Args:
        start: extra fields merged into the ``start`` message.
        flush: send ``flush`` at the end (False: just stop and wait for idle flush).
        speed: pace at this many times real time (overrides ``realtime``); time held by
            a ``flow PAUSE`` shifts the schedule instead of being caught up.
    """
    result = StreamResult()
    msg: dict[str, Any] = {"type": "start",
                           "audio": {"codec": "pcm_s16le", "sr": SAMPLE_RATE, "channels": 1,
                                     "chunk_ms": chunk_ms}}
    if seq_header:
        msg["features"] = ["seq_header"]
    msg.update(start or {})
    step = SAMPLE_RATE * chunk_ms // 1000
    pace = speed if speed is not None else (1.0 if realtime else 0.0)
    gate = _SendGate()
    ended = trio.Event()
    acked = trio.Event()

    async with connect(url) as ws:
        async def reader() -> None:
            try:
                while True:
                    data = json.loads(await ws.get_message())
                    result.events.append(data)
                    result.arrival_s.append(time.perf_counter() - result.audio_started
                                            if result.audio_started else 0.0)
                    if on_event is not None:
                        on_event(data)
                    if data["type"] == "ack":
                        acked.set()
                    elif data["type"] == "flow":
                        if data["state"] in ("PAUSE", "SLOW_DOWN"):
                            gate.close()
                        elif data["state"] == "RESUME":
                            gate.open()
                    elif data["type"] == "end" or (data["type"] == "error" and data["fatal"]
                                                   and not acked.is_set()):
                        ended.set()
                        acked.set()
                        return
            except ConnectionClosed:
                ended.set()
                acked.set()

        with trio.fail_after(timeout_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await ws.send_message(json.dumps(msg))
                await acked.wait()
                if not ended.is_set():
                    result.audio_started = time.perf_counter()
                    t0 = trio.current_time()
                    for i, pos in enumerate(range(0, len(audio), step)):
                        if ended.is_set():
                            break  # the server ended the session (shutdown, fatal error)
                        held = trio.current_time()
                        await gate.wait()
                        if speed is not None:  # a file paced faster than real time
                            t0 += trio.current_time() - held
                        chunk = audio[pos:pos + step].astype("<i2").tobytes()
                        if seq_header:
                            chunk = struct.pack("<II", i, pos * 1000 // SAMPLE_RATE) + chunk
                        try:
                            await ws.send_message(chunk)
                        except ConnectionClosed:
                            break
                        if pace:
                            await trio.sleep_until(t0 + (pos + step) / SAMPLE_RATE / pace)
                    if flush and not ended.is_set():
                        with contextlib.suppress(ConnectionClosed):
                            await ws.send_message(json.dumps({"type": "flush"}))
                # The reader returns at ``end`` (or when the server closes): no cancel, so
                # the WebSocket closes cleanly on the way out.
    return result


@contextlib.asynccontextmanager
async def connect(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """``open_websocket_url`` that also releases the socket when the server closed first."""
    kwargs.setdefault("max_message_size", 4 * 1024 * 1024)
    async with open_websocket_url(url, **kwargs) as ws:
        yield ws
    _release(ws)


def _release(ws: Any) -> None:
    """Close the client's TCP socket if trio-websocket left it open.

    When the server closes first (as ours does after ``end``), trio-websocket 0.12's
    client reader stops at the server's TCP close without closing its own socket, and
    ``aclose`` returns early because the WebSocket is already closed: the socket lingers
    until garbage collection. Closing the stream it wraps is idempotent.
    """
    stream = getattr(ws, "_stream", None)
    sock = getattr(stream, "socket", None)
    if sock is not None:
        sock.close()


class _SendGate:
    """Flow control: PAUSE closes the gate, RESUME opens it."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()

    def close(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def open(self) -> None:
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()


def format_event(e: dict[str, Any]) -> str | None:
    """One line for a human, or None for events not worth a line."""
    kind = e["type"]
    if kind == "asr_partial":
        return f"  … [{_ts(e['start_ms'])}] {e['text']}"
    if kind == "asr_final":
        return f"  ✔ [{_ts(e['start_ms'])}-{_ts(e['end_ms'])}] ({e['lang']}) {e['text']}"
    if kind == "lid":
        pool = f", recognized on pool {e['pool']}" if "pool" in e else ""
        return (f"  language: {e['lang']} ({e['score']:.2f} on "
                f"{e.get('speech_ms', 0) / 1000:.1f} s of speech{pool})")
    if kind == "record_url":
        return f"  recording: {e['url']} ({e['duration_ms'] / 1000:.1f} s, {e['bytes']} B)"
    if kind == "error":
        return f"  error {e['code']}: {e['message']}"
    if kind == "flow":
        return f"  flow: {e['state']}"
    if kind == "metrics":
        fp = e.get("first_partial_ms")
        return (f"  metrics: audio {e['audio_ms'] / 1000:.1f} s, speech "
                f"{e['speech_ms'] / 1000:.1f} s, {e['utterances']} utterance(s)"
                + (f", first partial {fp} ms" if fp is not None else ""))
    if kind == "end":
        return f"  end ({e['reason']})"
    return None


def _ts(ms: float) -> str:
    return f"{int(ms // 60000):02d}:{(ms % 60000) / 1000:05.2f}"

