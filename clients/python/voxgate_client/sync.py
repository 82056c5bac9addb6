"""The synchronous client: the async ``Stream`` run in a background event loop.

For plain threaded code::

    with voxgate_client.SyncStream(url, lang="en", on_event=print) as s:
        for chunk in microphone():
            s.send(chunk)
        s.flush()
        transcript = s.wait()        # every event until End

``on_event`` is called from the client's own thread; ``events()`` iterates the same
events in the caller's thread.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import anyio.from_thread
import numpy as np

from .aio import Stream, StreamError, connect
from .events import End, Event

_DONE = object()


class SyncStream:
    """Args:
        url: ``ws://…/ws/stream``.
        on_event: called with every event, in the client's thread.
        **options: the fields of ``StreamOptions``.
    """

    def __init__(self, url: str, *, on_event: Callable[[Event], None] | None = None,
                 **options: Any) -> None:
        self.url = url
        self._options = options
        self._on_event = on_event
        self._queue: queue.Queue[Any] = queue.Queue()
        self._portal_cm: AbstractContextManager[anyio.from_thread.BlockingPortal] | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._session_cm: AbstractContextManager[Stream] | None = None
        self._stream: Stream | None = None

    def __enter__(self) -> SyncStream:
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        try:
            self._session_cm = self._portal.wrap_async_context_manager(
                connect(self.url, **self._options))
            self._stream = self._session_cm.__enter__()
            self._portal.start_task_soon(self._pump)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._portal_cm is not None and self._session_cm is not None
        try:
            self._session_cm.__exit__(exc_type, exc, tb)
        finally:
            self._portal_cm.__exit__(None, None, None)

    async def _pump(self) -> None:
        assert self._stream is not None
        try:
            async for event in self._stream:
                if self._on_event is not None:
                    self._on_event(event)
                self._queue.put(event)
        except StreamError as exc:
            self._queue.put(exc)
        finally:
            self._queue.put(_DONE)

    @property
    def stream(self) -> Stream:
        if self._stream is None:
            raise RuntimeError("use SyncStream in a with block")
        return self._stream

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._portal is None:
            raise RuntimeError("use SyncStream in a with block")
        return self._portal.call(fn, *args)

    @property
    def flow_id(self) -> str:
        return self.stream.flow_id

    def send(self, audio: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Queue audio; blocks while more than ``max_buffer_ms`` is unsent."""
        self._call(self.stream.send, audio)

    def finalize(self) -> None:
        self._call(self.stream.finalize)

    def flush(self) -> None:
        self._call(self.stream.flush)

    def events(self, timeout_s: float | None = None) -> Iterator[Event]:
        """Events as they come, until ``End``.

        Raises:
            StreamError: the session failed.
            queue.Empty: no event for ``timeout_s``.
        """
        while True:
            item = self._queue.get(timeout=timeout_s)
            if item is _DONE:
                return
            if isinstance(item, StreamError):
                raise item
            yield item
            if isinstance(item, End):
                return

    def wait(self, timeout_s: float | None = None) -> list[Event]:
        """Flush, then every remaining event until ``End``."""
        self.flush()
        return list(self.events(timeout_s))
