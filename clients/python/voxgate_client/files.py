"""Stream a WAV file (or any array) through a session, paced like a live source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from .aio import connect
from .audio import read_wav
from .events import Event


async def stream_file(url: str, path: str | Path | None = None, *,
                      audio: np.ndarray | None = None, sample_rate: int = 16000,
                      realtime: bool = True, chunk_ms: int = 20,
                      on_event: Callable[[Event], None] | None = None,
                      **options: Any) -> list[Event]:
    """Send a WAV file (or ``audio`` at ``sample_rate``) and return every event until End.

    Args:
        realtime: pace the audio at one second per second (a live source); False sends
            as fast as the server's flow control allows.
        **options: the fields of ``StreamOptions``.
    """
    if path is not None:
        audio, sample_rate = read_wav(path)
    if audio is None:
        raise ValueError("give a path or audio")
    events: list[Event] = []
    step = max(1, sample_rate * chunk_ms // 1000)
    async with connect(url, sample_rate=sample_rate, chunk_ms=chunk_ms, **options) as s:

        async def produce() -> None:
            t0 = anyio.current_time()
            for pos in range(0, len(audio), step):
                await s.send(audio[pos:pos + step])
                if realtime:
                    await anyio.sleep_until(t0 + (pos + step) / sample_rate)
            await s.flush()

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            async for event in s:
                events.append(event)
                if on_event is not None:
                    on_event(event)
    return events
