"""A session's client socket and the only task that writes to it.

``ClientSocket`` is the session's current WebSocket: a client that resumes after a
disconnect brings a new one, and whoever waits on the old one learns of it.
``Writer`` sends the session's events in order, each within ``SEND_TIMEOUT_S`` (past it
the connection is aborted: a client that does not read must not hold a task, a slot or
its buffers), holds partials back to ``PARTIAL_INTERVAL_MS``, and, with resume, keeps an
event for the client's next socket instead of losing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import socket
import struct
import sys
import termios
from collections.abc import Callable
from typing import Any

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from .config import GatewayConfig
from .logs import fields
from .metrics import GatewayMetrics
from .protocol import EventWriter, dumps

log = logging.getLogger("voxgate.gateway.session")

EVENT_QUEUE = 1024  # events a client may leave unread before new ones are dropped


class ClientSocket:
    """The session's current client WebSocket (replaced when the client resumes)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.given_up = False  # no new socket will come (the wait for one ended)
        self._changed = trio.Event()

    def replace(self, ws: WebSocketConnection) -> None:
        """A reconnect brought ``ws``: everyone waiting on the old socket wakes."""
        self.ws = ws
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def give_up(self) -> None:
        """No socket will replace the current one (resume timed out, the session ended)."""
        self.given_up = True
        self._changed.set()

    async def replaced(self, ws: WebSocketConnection) -> None:
        """Return once ``ws`` is no longer the current socket."""
        while self.ws is ws:
            await self._changed.wait()

    async def back(self, ws: WebSocketConnection) -> bool:
        """Wait until ``ws`` is replaced (True) or the wait for a new socket has ended
        (False)."""
        while self.ws is ws and not self.given_up:
            await self._changed.wait()
        return self.ws is not ws


class Writer:
    """The session's events to its client, in order, from a bounded queue."""

    def __init__(self, sock: ClientSocket, ew: EventWriter, cfg: GatewayConfig,
                 metrics: GatewayMetrics, *, resumable: Callable[[], bool]) -> None:
        self.sock = sock
        self.ew = ew
        self.cfg = cfg
        self.metrics = metrics
        self.resumable = resumable  # whether a lost socket may come back
        self._in, self._out = trio.open_memory_channel[dict[str, Any]](EVENT_QUEUE)
        self.done = trio.Event()
        self.dropped = 0

    def emit(self, event: dict[str, Any]) -> None:
        """Queue ``event`` without waiting."""
        try:
            self._in.send_nowait(event)
        except trio.WouldBlock:
            # The client has not read 1024 events: it is not reading at all. What it
            # would miss it could not have read anyway; say so in the log (the 1st,
            # 2nd, 4th, 8th... drop: a flood must not flood the log too).
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:
                log.warning("%s: client is not reading; dropped a %s event (%d so far)",
                            self.ew.flow_id, event["type"], self.dropped)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def close_input(self) -> None:
        """No more events: the writer sends what is queued and returns."""
        self._in.close()

    async def send_now(self, event: dict[str, Any]) -> None:
        """Send at once, outside the queue (before the writer runs: refusals)."""
        if await self.send_on(self.sock.ws, dumps(self.ew.stamp(event))):
            self.metrics.egress_events.labels(event["type"]).inc()

    async def send_on(self, ws: WebSocketConnection, data: str) -> bool:
        """Send ``data`` within SEND_TIMEOUT_S; past it the connection is aborted.
        Returns whether it was sent; False when the client is gone."""
        with trio.move_on_after(self.cfg.send_timeout_s) as scope:
            try:
                await ws.send_message(data)
            except ConnectionClosed:
                return False
            return True
        if scope.cancelled_caught:
            log.info("a send took longer than SEND_TIMEOUT_S (%g s): connection aborted",
                     self.cfg.send_timeout_s, extra=fields(flowId=self.ew.flow_id,
                                                           stage="session"))
            await abort(ws)
        return False

    async def run(self) -> None:
        """The only task that writes to the socket; holds back partials to the interval."""
        interval = self.cfg.partial_interval_ms / 1000
        last_partial = -math.inf
        pending: dict[str, Any] | None = None
        try:
            while True:
                event: dict[str, Any] | None = None
                wait = (math.inf if pending is None
                        else last_partial + interval - trio.current_time())
                with trio.move_on_after(max(0.0, wait)):
                    try:
                        event = await self._out.receive()
                    except trio.EndOfChannel:
                        if pending is not None:
                            await self._write(pending)
                        return
                if event is None:  # the held partial's time has come
                    assert pending is not None
                    await self._write(pending)
                    last_partial, pending = trio.current_time(), None
                    continue
                if event["type"] == "asr_partial":
                    if trio.current_time() - last_partial >= interval and pending is None:
                        await self._write(event)
                        last_partial = trio.current_time()
                    else:
                        pending = event  # a newer partial replaces the held one
                    continue
                if (event["type"] == "asr_final" and pending is not None
                        and pending["utterance"] == event["utterance"]):
                    pending = None  # the final replaces its partials
                await self._write(event)
        except ConnectionClosed:
            pass
        finally:
            self.done.set()

    async def _write(self, event: dict[str, Any]) -> None:
        data = dumps(self.ew.stamp(event))
        while True:
            ws = self.sock.ws
            if not await self.send_on(ws, data):
                # Gone (or aborted after SEND_TIMEOUT_S). With resume, the event waits
                # for the client's next socket (sent again with the same seq: the client
                # may have had it).
                if not self.resumable() or not await self.sock.back(ws):
                    raise ConnectionClosed(CloseReason(1006, "the client is gone"))
                continue
            self.metrics.egress_events.labels(event["type"]).inc()
            return

    async def close(self, code: int) -> None:
        """Close the WebSocket; a client that does not answer the closing handshake
        within SEND_TIMEOUT_S has its connection aborted."""
        ws = self.sock.ws
        with trio.move_on_after(self.cfg.send_timeout_s) as scope:
            with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
                await ws.aclose(code)
        if scope.cancelled_caught:
            await abort(ws)


async def abort(ws: WebSocketConnection) -> None:
    """Drop a connection without the closing handshake: close its stream (a task stuck
    sending on it wakes with an error) and mark the WebSocket closed, so that
    ``get_message`` and ``send_message`` raise ``ConnectionClosed``. trio-websocket has
    no public call for it; ``_abort_web_socket`` is what it does itself when the stream
    breaks under it (``test_send_timeout_*`` fails if a release changes that)."""
    stream = getattr(ws, "_stream", None)
    sock = _socket_of(stream)
    if sock is not None:
        # Linger 0: the close is a reset, and the kernel drops what the client never
        # read, instead of keeping it (and the socket) until the client's window opens.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if stream is not None:
        await trio.aclose_forcefully(stream)
    abort_ws = getattr(ws, "_abort_web_socket", None)
    if abort_ws is not None:
        with contextlib.suppress(Exception):
            await abort_ws()


def intake_waiting(ws: WebSocketConnection) -> bool:
    """Whether client data is waiting to be read: a message in the WebSocket's queue, or
    bytes in the socket's receive buffer."""
    recv = getattr(ws, "_recv_channel", None)
    if recv is not None and recv.statistics().current_buffer_used:
        return True
    return _unread_bytes(getattr(ws, "_stream", None)) > 0


def _socket_of(stream: Any) -> Any:
    """The socket under a trio SocketStream, possibly wrapped in TLS; None if none."""
    for _ in range(4):  # SSLStream -> SocketStream
        if stream is None or hasattr(stream, "socket"):
            break
        stream = getattr(stream, "transport_stream", None)
    return getattr(stream, "socket", None)


def _unread_bytes(stream: Any) -> int:
    """Bytes waiting in the kernel receive buffer under ``stream``; 0 when that cannot
    be told."""
    sock = _socket_of(stream)
    if sock is None:
        return 0
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(buf, sys.byteorder, signed=True)
