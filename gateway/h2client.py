"""A small HTTP/2 client on Trio and h2, full duplex per stream.

httpx cannot read a response while it is still sending the request, and the ASR link
needs exactly that: audio goes up while events come down on the same stream. This client
multiplexes streams over one connection, honours the peer's ``SETTINGS`` (concurrent
stream limit, flow-control windows) and gives each stream bounded receive buffering.

Cleartext uses prior knowledge (h2c); pass an ``ssl.SSLContext`` for TLS with ALPN h2.

The peer is not trusted to be well-behaved: whatever it sends (malformed frames, bytes
that are not HTTP/2, headers that are not UTF-8, a missing ``:status``) fails that
connection and its streams with ``H2ClientError``; nothing it sends raises anything else
out of this module, so a broken or hostile ASR service cannot reach the caller's nursery.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

log = logging.getLogger("voxgate.gateway.h2client")

READ_SIZE = 65536
STREAM_BUFFER_EVENTS = 256  # per-stream receive events held before the reader waits


class H2ClientError(Exception):
    """The connection or a stream failed."""


class StreamReset(H2ClientError):
    """The peer reset the stream."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        super().__init__(f"stream {stream_id} reset by peer (error code {error_code})")
        self.error_code = error_code


@dataclass
class _StreamState:
    send_channel: trio.MemorySendChannel[h2.events.Event]
    receive_channel: trio.MemoryReceiveChannel[h2.events.Event]
    window_open: trio.Event = field(default_factory=trio.Event)


class H2Stream:
    """One request/response exchange. Use from a single task per direction."""

    def __init__(self, conn: H2Connection, stream_id: int, state: _StreamState) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._state = state
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._ended = False
        self._closed_local = False
        self._reset_locally = False

    async def send(self, data: bytes) -> None:
        """Send body bytes, waiting for flow-control window as needed."""
        view = memoryview(data)
        while view:
            n = await self._conn._send_some(self.stream_id, view)
            view = view[n:]

    async def end(self) -> None:
        """End the request body (half-close)."""
        if not self._closed_local:
            self._closed_local = True
            await self._conn._end_stream(self.stream_id)

    async def reset(self) -> None:
        """Abort the stream (RST_STREAM CANCEL)."""
        self._reset_locally = True
        await self._conn._reset_stream(self.stream_id)

    async def response(self) -> int:
        """Wait for the response headers; return the status."""
        while self.status is None:
            event = await self._next()
            if event is None:
                raise H2ClientError(f"stream {self.stream_id} ended before its headers")
            if isinstance(event, h2.events.ResponseReceived):
                # The peer's bytes: never trusted to be UTF-8 or to carry a number.
                self.headers = {bytes(k).decode("utf-8", "replace"):
                                bytes(v).decode("utf-8", "replace") for k, v in event.headers}
                status = self.headers.get(":status", "")
                if not (len(status) == 3 and status.isdigit()):
                    raise H2ClientError(f"stream {self.stream_id}: the peer answered a "
                                        f"malformed :status {status[:20]!r}")
                self.status = int(status)
        return self.status

    async def receive(self) -> bytes | None:
        """The next body chunk, or None at the end of the response."""
        if self.status is None:
            await self.response()
        while True:
            event = await self._next()
            if event is None:
                return None
            if isinstance(event, h2.events.DataReceived):
                await self._conn._ack(self.stream_id, event.flow_controlled_length)
                return bytes(event.data)

    async def _next(self) -> h2.events.Event | None:
        if self._ended:
            return None
        try:
            event = await self._state.receive_channel.receive()
        except trio.EndOfChannel:
            # No END_STREAM came: we reset it ourselves, or the connection went away.
            self._ended = True
            if self._reset_locally:
                return None
            raise H2ClientError(
                f"stream {self.stream_id} lost: {self._conn._error or 'connection closed'}"
            ) from None
        if isinstance(event, h2.events.StreamReset):
            self._ended = True
            raise StreamReset(self.stream_id, int(event.error_code))
        if isinstance(event, h2.events.StreamEnded):
            self._ended = True
            return None
        if isinstance(event, h2.events.ConnectionTerminated):
            self._ended = True
            raise H2ClientError(f"connection terminated: {event.error_code!r}")
        return event


class H2Connection:
    """An HTTP/2 client connection. Create with ``connect`` (an async context manager)."""

    def __init__(self, stream: trio.abc.Stream, authority: str, scheme: str) -> None:
        self._stream = stream
        self.authority = authority
        self.scheme = scheme
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        # No server push: nothing here would read a pushed stream, and its flow-control
        # window would never be returned. h2's own defaults otherwise.
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE:
                h2.connection.H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self._send_lock = trio.Lock()
        self._streams: dict[int, _StreamState] = {}
        self._window_changed = trio.Event()
        self._slots_changed = trio.Event()
        self.closed = False
        self._closed_event = trio.Event()
        self._error: BaseException | None = None
        self._ready = trio.Event()  # the peer's SETTINGS came, or the connection failed
        self._reader_done = trio.Event()
        self._read_error: H2ClientError | None = None  # why the reader stopped, if it knows
        self._pings: dict[bytes, trio.Event] = {}
        self.last_received = trio.current_time()  # when bytes last came from the peer
        self._ping_count = 0

    @property
    def max_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams or 2**31)

    @property
    def open_streams(self) -> int:
        # h2's own count: a stream we finished with may still count against the peer's
        # limit until its END_STREAM/RST has been exchanged.
        return max(len(self._streams), int(self._h2.open_outbound_streams))

    @property
    def available(self) -> bool:
        """Open, and below the peer's concurrent-stream limit."""
        return not self.closed and self.open_streams < self.max_streams

    async def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(exc)
                raise H2ClientError(f"connection lost: {exc}") from exc

    async def _start(self) -> None:
        self._h2.initiate_connection()
        # A large connection window: many streams share it and each returns its credit.
        self._h2.increment_flow_control_window(2**24)
        async with self._send_lock:
            await self._flush()

    async def _handshake(self, timeout_s: float) -> H2ClientError | None:
        """Send our preface and wait for the peer's SETTINGS; return why not, if not.

        Only a peer that answered SETTINGS is an HTTP/2 server that accepted us. With
        TLS 1.3 the server judges our client certificate after the handshake has
        completed on our side; its refusal (an alert, or just a close) arrives here, so
        a refused certificate is a connect error that says so, not a stream lost later.
        """
        try:
            with trio.fail_after(timeout_s):
                try:
                    await self._start()
                except H2ClientError:
                    # The peer hung up: the reader may still read why (a TLS alert).
                    with trio.move_on_after(0.5):
                        await self._reader_done.wait()
                await self._ready.wait()
        except trio.TooSlowError:
            return H2ClientError(f"{self.authority} sent no HTTP/2 SETTINGS within "
                                 f"{timeout_s:g} s")
        if self.closed:
            error = self._read_error or H2ClientError(
                f"{self.authority} closed the connection: {self._error}")
            if self.scheme == "https":
                # A TLS server that negotiated h2 and then hangs up before its SETTINGS
                # has, in practice, refused our client certificate (hypercorn on trio
                # closes without sending the TLS alert that would say so).
                error = H2ClientError(
                    f"{error} (the server ended the TLS connection before HTTP/2 began: "
                    f"it may have refused our client certificate, or wanted one)")
            return error
        return None

    async def _reader(self) -> None:
        """Read and dispatch until the connection ends. Never raises (but Cancelled):
        whatever the peer sends, the worst outcome is this connection failing, and its
        streams with it (the caller fails them over as for a dead peer)."""
        try:
            while True:
                data = await self._stream.receive_some(READ_SIZE)
                if not data:
                    break
                self.last_received = trio.current_time()
                events = self._h2.receive_data(data)
                # h2 checks a frame's length against our SETTINGS_MAX_FRAME_SIZE only
                # once the whole frame is in: a peer announcing 16 MiB would be waited
                # for (and buffered) first. What stays buffered is one incomplete frame,
                # whose 24-bit length leads its header.
                pending = getattr(self._h2.incoming_buffer, "_data", b"")
                if (len(pending) >= 9 and int.from_bytes(pending[:3], "big")
                        > self._h2.max_inbound_frame_size):
                    raise H2ClientError(f"{self.authority} sent a frame larger than "
                                        f"{self._h2.max_inbound_frame_size} bytes")
                for event in events:
                    self._dispatch(event)
                async with self._send_lock:
                    await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._read_error = H2ClientError(f"connection to {self.authority} lost: "
                                             f"{_reason(exc)}")
            self._fail(self._read_error)
        except h2.exceptions.H2Error as exc:
            # The peer broke the protocol: say GOAWAY (best effort), fail every stream.
            self._read_error = H2ClientError(
                f"HTTP/2 protocol error from {self.authority}: {type(exc).__name__}: {exc}")
            self._fail(self._read_error)
            with suppress(Exception), trio.move_on_after(0.5):
                async with self._send_lock:
                    self._h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                    await self._stream.send_all(self._h2.data_to_send())
        except H2ClientError as exc:
            self._fail(exc)
        except Exception as exc:
            # A malformed frame h2 did not anticipate (hyperframe, hpack or a bug in our
            # dispatch): fail this connection, never the gateway.
            log.warning("ASR connection %s failed on bad input: %r", self.authority, exc)
            self._read_error = H2ClientError(f"bad data from {self.authority}: "
                                             f"{type(exc).__name__}: {exc}")
            self._fail(self._read_error)
        finally:
            self._fail(H2ClientError(f"connection to {self.authority} closed by peer"))
            self._reader_done.set()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self._ready.set()
        if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_changed.set()
            self._window_changed = trio.Event()
            self._slots_changed.set()
            self._slots_changed = trio.Event()
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            self._fail(H2ClientError(f"GOAWAY {event.error_code!r}"))
            return
        if isinstance(event, h2.events.PingAckReceived):
            waiter = self._pings.pop(bytes(event.ping_data), None)
            if waiter is not None:
                waiter.set()
            return
        stream_id = getattr(event, "stream_id", None)
        if stream_id is None or stream_id not in self._streams:
            return
        state = self._streams[stream_id]
        try:
            # Never wait here: one stream whose owner stopped reading would stall every
            # stream on the connection. A full buffer costs that stream, not the others.
            state.send_channel.send_nowait(event)
        except trio.WouldBlock:
            with suppress(h2.exceptions.H2Error):  # the stream may be closed already
                self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self._forget(stream_id)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the stream's owner went away
        if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            self._forget(stream_id)

    def _forget(self, stream_id: int) -> None:
        state = self._streams.pop(stream_id, None)
        if state is not None:
            state.send_channel.close()
            self._slots_changed.set()
            self._slots_changed = trio.Event()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self.closed = True
        self._closed_event.set()
        self._ready.set()
        for stream_id in list(self._streams):
            self._forget(stream_id)
        self._window_changed.set()
        self._slots_changed.set()

    async def open_stream(
        self, method: str, path: str, headers: list[tuple[str, str]] | None = None,
        *, end_stream: bool = False,
    ) -> H2Stream:
        """Start a request; waits while the peer's concurrent-stream limit is reached.

        Raises:
            H2ClientError: the connection is closed.
        """
        while not self.available:
            if self.closed:
                raise H2ClientError(f"connection is closed: {self._error}")
            await self._slots_changed.wait()
        async with self._send_lock:
            if self.closed:
                raise H2ClientError(f"connection is closed: {self._error}")
            try:
                stream_id = self._h2.get_next_available_stream_id()
            except h2.exceptions.H2Error as exc:  # stream ids used up, or GOAWAY state
                raise H2ClientError(f"no new stream on {self.authority}: {exc}") from exc
            send, receive = trio.open_memory_channel[h2.events.Event](STREAM_BUFFER_EVENTS)
            state = _StreamState(send, receive)
            self._streams[stream_id] = state
            hdrs = [(":method", method), (":scheme", self.scheme),
                    (":authority", self.authority), (":path", path), *(headers or [])]
            try:
                self._h2.send_headers(stream_id, hdrs, end_stream=end_stream)
            except h2.exceptions.TooManyStreamsError as exc:
                self._forget(stream_id)
                raise H2ClientError(f"the peer's stream limit is reached: {exc}") from exc
            except h2.exceptions.H2Error as exc:  # the connection state is closed
                self._forget(stream_id)
                raise H2ClientError(f"cannot open a stream on {self.authority}: "
                                    f"{exc}") from exc
            await self._flush()
        stream = H2Stream(self, stream_id, state)
        stream._closed_local = end_stream
        return stream

    async def _send_some(self, stream_id: int, data: memoryview) -> int:
        """Send as much of ``data`` as the windows allow now (waiting for at least one
        byte of window); return how much was sent. The window is read and spent under the
        send lock, so concurrent streams never overdraw the shared connection window."""
        while True:
            if self.closed:
                raise H2ClientError(f"connection is closed: {self._error}")
            window_changed = self._window_changed
            async with self._send_lock:
                try:
                    window = self._h2.local_flow_control_window(stream_id)
                    n = min(len(data), window, self._h2.max_outbound_frame_size)
                    if n > 0:
                        self._h2.send_data(stream_id, bytes(data[:n]))
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError,
                        KeyError) as exc:
                    raise H2ClientError(f"stream {stream_id} is closed") from exc
                if n > 0:
                    await self._flush()
                    return n
            await window_changed.wait()

    async def _end_stream(self, stream_id: int) -> None:
        async with self._send_lock:
            try:
                self._h2.end_stream(stream_id)
            except h2.exceptions.StreamClosedError:
                return
            except h2.exceptions.ProtocolError as exc:  # the connection is closed
                raise H2ClientError(f"stream {stream_id}: {exc}") from exc
            await self._flush()

    async def _reset_stream(self, stream_id: int) -> None:
        async with self._send_lock:
            # A closed connection (peer gone) cannot send RST_STREAM, nor needs to.
            with suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            self._forget(stream_id)
            if not self.closed:
                await self._flush()

    async def _ack(self, stream_id: int, length: int) -> None:
        if length <= 0:
            return
        async with self._send_lock:
            try:
                self._h2.acknowledge_received_data(length, stream_id)
            except h2.exceptions.StreamClosedError:
                return
            except h2.exceptions.ProtocolError as exc:  # the connection is closed
                raise H2ClientError(f"stream {stream_id}: {exc}") from exc
            await self._flush()

    async def ping(self, timeout_s: float) -> bool:
        """Send an HTTP/2 PING; return whether its ACK came within ``timeout_s``.

        A peer that is stopped (SIGSTOP), wedged, or behind a proxy that stopped
        forwarding keeps its TCP connection open and never resets a stream; only an
        unanswered PING tells. The send is inside the timeout too: a send blocked on a
        full socket buffer is the same symptom.
        """
        if self.closed:
            return False
        self._ping_count += 1
        data = self._ping_count.to_bytes(8, "big")
        answered = trio.Event()
        self._pings[data] = answered
        try:
            with trio.move_on_after(timeout_s):
                async with self._send_lock:
                    self._h2.ping(data)
                    await self._flush()
                await answered.wait()
            return answered.is_set()
        except (H2ClientError, h2.exceptions.H2Error):
            return False
        finally:
            self._pings.pop(data, None)

    def unread_bytes(self) -> bool:
        """Whether the kernel holds bytes from the peer that the reader has not read yet
        (a peek, never a read). An unanswered PING with bytes waiting means our own
        event loop is behind, not the peer stalled."""
        stream = self._stream
        raw = getattr(stream, "transport_stream", stream)
        sock = getattr(raw, "socket", None)
        if sock is None:
            return False
        try:
            with socket.socket(fileno=os.dup(sock.fileno())) as dup:
                return bool(dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False

    def fail(self, reason: str) -> None:
        """Declare the connection dead (e.g. PING unanswered): every stream on it fails
        at once; the owner then closes the socket."""
        self._fail(H2ClientError(reason))

    async def wait_closed(self) -> None:
        """Return once the connection is closed or failed."""
        await self._closed_event.wait()

    async def aclose(self) -> None:
        """Say GOAWAY if the peer can still hear it, then close the socket, always."""
        if self._error is None:
            self._error = H2ClientError(f"connection to {self.authority} closed")
        self.closed = True
        self._closed_event.set()
        try:
            with trio.move_on_after(0.5):
                async with self._send_lock:
                    self._h2.close_connection()
                    await self._flush()
        except (H2ClientError, h2.exceptions.H2Error):
            pass
        finally:
            await trio.aclose_forcefully(self._stream)


@asynccontextmanager
async def connect(
    host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
    connect_timeout_s: float = 5.0,
) -> AsyncIterator[H2Connection]:
    """Open an HTTP/2 connection (the peer has answered our SETTINGS with its own);
    closes it (and its reader task) on exit.

    Raises:
        H2ClientError: cannot connect, the TLS handshake failed or did not negotiate h2,
            or the peer refused or never spoke HTTP/2 (the message says which).
    """
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(connect_timeout_s):
            stream = tcp = await trio.open_tcp_stream(host, port)
            if ssl_context is not None:
                ssl_context.set_alpn_protocols(["h2"])
                stream = tls = trio.SSLStream(tcp, ssl_context, server_hostname=host)
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    raise H2ClientError(f"TLS handshake with {host}:{port} failed: "
                                        f"{_reason(exc)}") from exc
                if tls.selected_alpn_protocol() != "h2":
                    raise H2ClientError(f"{host}:{port} did not negotiate h2 over TLS")
    except (OSError, trio.TooSlowError, H2ClientError) as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, H2ClientError):
            raise
        raise H2ClientError(f"cannot connect to {host}:{port}: "
                            f"{exc or type(exc).__name__}") from exc
    assert stream is not None
    conn = H2Connection(stream, f"{host}:{port}", "https" if ssl_context else "http")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._reader)
        # Raised after the nursery, not in it (where it would become an ExceptionGroup).
        problem = await conn._handshake(connect_timeout_s)
        try:
            if problem is None:
                yield conn
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()
            nursery.cancel_scope.cancel()
    if problem is not None:
        raise problem


def _reason(exc: BaseException) -> str:
    """The useful part of a transport error: trio wraps the ``ssl.SSLError`` that names
    the TLS alert (``certificate required``, ``unknown ca``) in a BrokenResourceError."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        return str(cause) or type(cause).__name__
    return str(exc) or type(exc).__name__
