"""A WebSocket client connection: the wsproto state machine over an anyio byte stream.

anyio makes the same code run on asyncio and on Trio. One task may receive while others
send; sends are serialised by a lock. Pings from the server are answered here.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

READ_BYTES = 65536


class ConnectionClosed(Exception):
    """The WebSocket is closed (``code`` and ``reason`` from the close frame, or 1006)."""

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class HandshakeError(ConnectionClosed):
    """The server refused the WebSocket upgrade (an HTTP status instead of 101)."""

    def __init__(self, status: int, body: bytes = b"") -> None:
        super().__init__(1006, f"HTTP {status}")
        self.status = status
        self.body = body


class WebSocket:
    """One open WebSocket; use ``connect`` to make one."""

    def __init__(self, stream: anyio.abc.ByteStream, ws: WSConnection,
                 max_message_bytes: int) -> None:
        self._stream = stream
        self._ws = ws
        self._max = max_message_bytes
        self._send_lock = anyio.Lock()
        self._messages: deque[str | bytes] = deque()
        self._parts: list[str | bytes] = []
        self._size = 0
        self._closed: ConnectionClosed | None = None

    @classmethod
    async def connect(cls, url: str, *, ssl_context: ssl.SSLContext | None = None,
                      headers: list[tuple[str, str]] | None = None,
                      timeout_s: float = 10.0,
                      max_message_bytes: int = 4 * 1024 * 1024) -> WebSocket:
        """Open ``ws://`` or ``wss://`` ``url``.

        Raises:
            ValueError: not a ws/wss URL.
            HandshakeError: the server answered the upgrade with an HTTP error.
            OSError, TimeoutError: the connection failed.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        with anyio.fail_after(timeout_s):
            stream: anyio.abc.ByteStream
            if secure:
                stream = await anyio.connect_tcp(
                    parts.hostname, port, tls=True,
                    ssl_context=ssl_context or ssl.create_default_context(),
                    tls_hostname=parts.hostname)
            else:
                stream = await anyio.connect_tcp(parts.hostname, port)
            ws = WSConnection(ConnectionType.CLIENT)
            try:
                await stream.send(ws.send(Request(host=host, target=target,
                                                  extra_headers=[(k.encode(), v.encode())
                                                                 for k, v in headers or []])))
                conn = cls(stream, ws, max_message_bytes)
                await conn._handshake()
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise
        return conn

    async def _handshake(self) -> None:
        status, body = 0, b""
        while True:
            data = await self._read()
            self._ws.receive_data(data or None)
            for event in self._ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise HandshakeError(status)
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise HandshakeError(status, body)
            if not data:
                raise ConnectionClosed(1006, "closed during the handshake")

    async def _read(self) -> bytes:
        try:
            return await self._stream.receive(READ_BYTES)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            return b""

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        async with self._send_lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._closed = self._closed or ConnectionClosed(1006, str(exc))
                raise self._closed from exc

    async def send(self, message: str | bytes) -> None:
        """Send one text (``str``) or binary (``bytes``) message.

        Raises:
            ConnectionClosed: the connection is closed.
        """
        if self._closed is not None:
            raise self._closed
        event = TextMessage(message) if isinstance(message, str) else BytesMessage(message)
        try:
            data = self._ws.send(event)
        except LocalProtocolError as exc:
            raise ConnectionClosed(1006, str(exc)) from exc
        await self._write(data)

    async def receive(self) -> str | bytes:
        """The next whole message.

        Raises:
            ConnectionClosed: the server closed (after answering its close) or the
                connection broke.
        """
        while not self._messages:
            if self._closed is not None:
                raise self._closed
            data = await self._read()
            self._ws.receive_data(data or None)
            for event in self._ws.events():
                await self._handle(event)
            if not data and self._closed is None:
                self._closed = ConnectionClosed(1006, "the connection broke")
        return self._messages.popleft()

    async def _handle(self, event: Any) -> None:
        if isinstance(event, (TextMessage, BytesMessage)):
            self._parts.append(bytes(event.data) if isinstance(event.data, bytearray)
                               else event.data)
            self._size += len(event.data)
            if self._size > self._max:
                await self.aclose(1009, "message too big")
                raise ConnectionClosed(1009, "message too big")
            if event.message_finished:
                joined: str | bytes = ("".join(p for p in self._parts if isinstance(p, str))
                                       if isinstance(event, TextMessage)
                                       else b"".join(p for p in self._parts
                                                     if isinstance(p, bytes)))
                self._messages.append(joined)
                self._parts, self._size = [], 0
        elif isinstance(event, Ping):
            await self._write(self._ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self._closed = ConnectionClosed(event.code, event.reason or "")
            if self._ws.state is ConnectionState.REMOTE_CLOSING:  # not on a dropped socket
                with contextlib.suppress(ConnectionClosed):
                    await self._write(self._ws.send(event.response()))
            await anyio.aclose_forcefully(self._stream)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close politely (close frame, then the socket); safe to call more than once."""
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason)
            try:
                with anyio.move_on_after(2, shield=True):
                    await self._write(self._ws.send(CloseConnection(code=code,
                                                                    reason=reason)))
            except (ConnectionClosed, LocalProtocolError):
                pass
        await anyio.aclose_forcefully(self._stream)

    async def abort(self) -> None:
        """Drop the TCP connection without a close frame (as a network failure would)."""
        self._closed = self._closed or ConnectionClosed(1006, "aborted")
        await anyio.aclose_forcefully(self._stream)
