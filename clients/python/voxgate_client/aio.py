"""The async client: one recognition session over one (re)connecting WebSocket.

Runs on asyncio and on Trio alike (anyio)::

    async with voxgate_client.connect("ws://127.0.0.1:8080/ws/stream", lang="en") as s:
        await s.send(pcm_chunk)          # bytes or numpy, any length, any rate
        await s.flush()
        async for event in s:            # until End
            print(event)

A dropped connection is re-opened with the same ``flowId`` and the ``seq_header``
feature; what the server did not get is sent again (``StreamCore``), so no audio is lost
or doubled when the server resumes the session.
"""

from __future__ import annotations

import itertools
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import numpy as np

from . import __version__
from .audio import AudioConverter
from .core import StreamCore
from .events import (
    Ack,
    End,
    Error,
    Event,
    Final,
    Flow,
    Pong,
    Reconnected,
    Reconnecting,
    parse_event,
)
from .transport import ConnectionClosed, HandshakeError, WebSocket

ANSWER_TIMEOUT_S = 10.0  # the server must answer start with ack (or an error) this fast


class StreamError(Exception):
    """The session could not be opened or went on no longer.

    ``error`` is the server's ``error`` event when there was one (its ``code`` is stable).
    """

    def __init__(self, message: str, error: Error | None = None) -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True)
class StreamOptions:
    """Everything about a session except the URL.

    Args:
        flow_id: the session's id (default: the server makes one).
        lang: ``user_lang_pref``: ``auto`` (language ID) or a language code.
        token: a JWT for servers with auth.
        sample_rate: the rate of the audio you will ``send`` (resampled to 16 kHz).
        reconnect: re-open a dropped connection and resume the session.
        resume_window_s: how long to keep trying to reconnect.
        max_buffer_ms: unsent audio held (paused, reconnecting) before ``send`` waits.
        resume_buffer_ms: sent audio kept to send again after a reconnect.
        keepalive_s: ping period; a connection silent for two periods is dropped.
    """

    flow_id: str | None = None
    lang: str = "auto"
    token: str | None = None
    domain: str = "default"
    hotwords: tuple[str, ...] = ()
    returns: tuple[str, ...] = ("lid", "asr", "record_url", "metrics")
    trace_id: str | None = None
    tenant_id: str | None = None
    sample_rate: int = 16000
    chunk_ms: int = 20
    reconnect: bool = True
    resume_window_s: float = 30.0
    max_buffer_ms: int = 10_000
    resume_buffer_ms: int = 30_000
    keepalive_s: float = 15.0
    connect_timeout_s: float = 10.0
    close_timeout_s: float = 60.0
    event_buffer: int = 10_000
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    def start_message(self, flow_id: str | None) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "type": "start",
            "audio": {"codec": "pcm_s16le", "sr": 16000, "channels": 1,
                      "chunk_ms": self.chunk_ms},
            "return": list(self.returns),
            "hints": {"domain": self.domain, "user_lang_pref": self.lang,
                      "hotwords": list(self.hotwords)},
            "features": ["seq_header"],
            "client_version": __version__,
        }
        if flow_id:
            msg["flowId"] = flow_id
        if self.token:
            msg["auth"] = {"token": self.token}
        if self.trace_id:
            msg["trace_id"] = self.trace_id
        if self.tenant_id:
            msg["tenant_id"] = self.tenant_id
        return msg


class Stream:
    """A session; made by ``connect``. ``send``/``finalize``/``flush`` from any task,
    events by ``async for`` (one reader)."""

    def __init__(self, url: str, options: StreamOptions) -> None:
        self.url = url
        self.options = options
        self.core = StreamCore(chunk_ms=options.chunk_ms, max_buffer_ms=options.max_buffer_ms,
                               resume_buffer_ms=options.resume_buffer_ms)
        self.flow_id = options.flow_id or ""
        self.ack: Ack | None = None
        self.reconnects = 0
        self.ended = False
        self._converter = AudioConverter(options.sample_rate)
        self._ws: WebSocket | None = None
        self._wake = anyio.Event()
        self._space = anyio.Event()
        self._failure: StreamError | None = None
        self._finals: set[int] = set()
        self._ping_ids = itertools.count()
        self._last_heard = 0.0
        self._discard = False
        self._done = anyio.Event()  # the connection task has finished (ended or failed)
        self._events_in, self._events_out = anyio.create_memory_object_stream[Event](
            options.event_buffer)

    # -- the producer's API ------------------------------------------------------------

    async def send(self, audio: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Queue audio (PCM16 LE bytes, or an int16/float numpy array, at the options'
        ``sample_rate``). Waits while more than ``max_buffer_ms`` is unsent.

        Raises:
            StreamError: the session failed or ended.
        """
        self._check()
        self.core.push(self._converter.convert(audio))
        self._kick()
        while self.core.buffer_full:
            self._check()
            self._space = anyio.Event()
            await self._space.wait()

    async def finalize(self) -> None:
        """Force an endpoint after the audio sent so far; the session stays open."""
        self._check()
        self.core.push(self._converter.finish())
        self.core.finalize()
        self._kick()

    async def flush(self) -> None:
        """End of audio: the server finalizes, sends what remains, then ``End``."""
        if self.ended or self.core.flushed:
            return
        self._check()
        self.core.push(self._converter.finish())
        self.core.flush()
        self._kick()

    async def abort_connection(self) -> None:
        """Drop the connection as a network failure would (the client then resumes)."""
        if self._ws is not None:
            await self._ws.abort()

    # -- events --------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def events(self) -> AsyncIterator[Event]:
        """Every event until ``End`` (inclusive).

        Raises:
            StreamError: the connection was lost for good, or a fatal error.
        """
        async for event in self._events_out:
            yield event
            if isinstance(event, End):
                return
        if self._failure is not None:
            raise self._failure

    # -- internals -----------------------------------------------------------------------

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self.ended:
            raise StreamError("the session has ended")

    def _kick(self) -> None:
        self._wake.set()

    async def _publish(self, event: Event) -> None:
        if not self._discard:
            await self._events_in.send(event)

    async def _open(self, *, reconnect: bool) -> WebSocket:
        """Connect, send ``start``, and wait for ``ack``."""
        headers = [("user-agent", f"voxgate-client/{__version__}")]
        ws = await WebSocket.connect(self.url, ssl_context=self.options.ssl_context,
                                     headers=headers,
                                     timeout_s=self.options.connect_timeout_s)
        try:
            await ws.send(json.dumps(self.options.start_message(self.flow_id or None)))
            with anyio.fail_after(ANSWER_TIMEOUT_S):
                while True:
                    message = await ws.receive()
                    if isinstance(message, bytes):
                        continue
                    event = parse_event(json.loads(message))
                    if isinstance(event, Ack):
                        break
                    if isinstance(event, Error) and event.fatal:
                        raise StreamError(f"{event.code}: {event.message}", event)
                    if isinstance(event, Flow) and event.state == "BUSY":
                        raise StreamError(f"server busy: {event.reason}")
                    await self._publish(event)
        except BaseException:
            await ws.abort()
            raise
        self.flow_id = event.flow_id
        resumed = self.core.on_ack(event, reconnect=reconnect)
        self._last_heard = anyio.current_time()
        if reconnect:
            await self._publish(Reconnected(self.flow_id, resumed=resumed))
        else:
            self.ack = event
            await self._publish(event)
        self._ws = ws
        return ws

    async def _run(self, ws: WebSocket) -> None:
        """Serve connections until ``End`` or a final failure."""
        try:
            while True:
                cause = await self._serve(ws)
                if self.ended:
                    return
                ws = await self._reconnect(cause)
        except StreamError as exc:
            self._failure = exc
        finally:
            self._space.set()
            self._events_in.close()
            self._done.set()

    async def _reconnect(self, cause: str) -> WebSocket:
        self.core.on_disconnect()
        if not self.options.reconnect:
            raise StreamError(f"connection lost: {cause}")
        deadline = anyio.current_time() + self.options.resume_window_s
        delay = 0.1
        for attempt in itertools.count(1):
            await self._publish(Reconnecting(self.flow_id, attempt=attempt, cause=cause))
            try:
                ws = await self._open(reconnect=True)
            except StreamError as exc:
                if exc.error is not None:
                    raise  # the server said no: retrying will not help
                cause = str(exc)
            except (OSError, TimeoutError, ConnectionClosed) as exc:
                cause = str(exc) or type(exc).__name__
            else:
                self.reconnects += 1
                return ws
            if anyio.current_time() + delay > deadline:
                raise StreamError(f"could not reconnect within "
                                  f"{self.options.resume_window_s:g} s: {cause}")
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    async def _serve(self, ws: WebSocket) -> str:
        """Run one connection; return why it ended ('' after ``End``)."""
        cause = ""

        async def reader(scope: anyio.CancelScope) -> None:
            nonlocal cause
            try:
                while True:
                    message = await ws.receive()
                    self._last_heard = anyio.current_time()
                    if isinstance(message, bytes):
                        continue
                    event = parse_event(json.loads(message))
                    if isinstance(event, Flow):
                        self.core.on_flow(event.state, anyio.current_time())
                        self._kick()
                    elif isinstance(event, Final):
                        if event.utterance in self._finals:
                            continue  # already delivered before a reconnect
                        self._finals.add(event.utterance)
                    elif isinstance(event, Pong):
                        continue
                    await self._publish(event)
                    if isinstance(event, End):
                        self.ended = True
                        scope.cancel()
                        return
            except ConnectionClosed as exc:
                cause = str(exc)
                scope.cancel()

        async def writer(scope: anyio.CancelScope) -> None:
            nonlocal cause
            try:
                while True:
                    now = anyio.current_time()
                    item, wait_s = self.core.next_outgoing(now)
                    if item is None:
                        self._wake = anyio.Event()
                        with anyio.move_on_after(wait_s if wait_s is not None else 3600):
                            await self._wake.wait()
                        continue
                    await ws.send(item.wire())
                    self.core.sent(item, now)
                    if not self.core.buffer_full:
                        self._space.set()
            except ConnectionClosed as exc:
                cause = str(exc)
                scope.cancel()

        async def keepalive(scope: anyio.CancelScope) -> None:
            nonlocal cause
            period = self.options.keepalive_s
            try:
                while True:
                    await anyio.sleep(period)
                    if anyio.current_time() - self._last_heard > 2 * period:
                        cause = f"no answer for {2 * period:g} s"
                        await ws.abort()
                        scope.cancel()
                        return
                    await ws.send(self.core.ping(f"k{next(self._ping_ids)}").wire())
            except ConnectionClosed as exc:
                cause = str(exc)
                scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader, tg.cancel_scope)
                tg.start_soon(writer, tg.cancel_scope)
                tg.start_soon(keepalive, tg.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                if self.ended:
                    await ws.aclose()
                else:
                    await ws.abort()
        return cause or "connection closed"


@asynccontextmanager
async def connect(url: str, **options: Any) -> AsyncIterator[Stream]:
    """Open a session at ``url`` (``ws://…/ws/stream``); keyword arguments are the fields
    of ``StreamOptions``.

    Leaving the block normally flushes the session and waits (up to
    ``close_timeout_s``) for ``End``, so nothing sent is lost; leaving it with an
    exception drops the connection.

    Raises:
        StreamError: the server refused the session (its ``error`` event attached).
        HandshakeError: the server refused the WebSocket upgrade.
        OSError, TimeoutError: the connection failed.
    """
    stream = Stream(url, StreamOptions(**options))
    try:
        ws = await stream._open(reconnect=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream._run, ws)
            try:
                yield stream
            except BaseException:
                tg.cancel_scope.cancel()
                raise
            if not stream.ended and stream._failure is None:
                stream._discard = True  # nobody reads events any more
                with anyio.move_on_after(stream.options.close_timeout_s):
                    await stream.flush()
            # Let the connection close politely after End (bounded), then stop.
            with anyio.move_on_after(stream.options.close_timeout_s):
                await stream._done.wait()
            tg.cancel_scope.cancel()
    finally:
        stream._events_in.close()
        stream._events_out.close()
        if stream._ws is not None:
            with anyio.CancelScope(shield=True):
                await stream._ws.abort()


__all__ = ["HandshakeError", "Stream", "StreamError", "StreamOptions", "connect"]
