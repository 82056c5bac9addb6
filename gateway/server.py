"""The gateway process: WebSocket sessions, the VAD tick, ASR pools and the HTTP side.

``serve`` is startable (``task_status.started((ws_port, http_port))``) so tests and
``bench/`` run it on port 0 inside a nursery; pass a ``GatewayPorts`` to also learn the
metrics port. Setting ``shutdown`` drains: no new sessions, ingest stops, every session
finishes its finals and sends ``end{reason:"server_shutdown"}``.

Connection-level defences live here, before any session code runs: a deadline on the
WebSocket (and TLS) handshake, a cap on open connections (503 at the handshake), a cap per
client address (``RATE_LIMITED``), the WebSocket library's message limit, and a deadline
on every send and close, after which the socket is closed without waiting for the peer.
A frame that breaks RFC 6455 is a fatal client error like any other: the session ends
with what it had (``error``, finals, ``end``), then the Close carries 1007 or 1002.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hmac
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    connect_websocket,
)
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage

from asr.server import install_hypercorn_guard

from .asrlink import AsrPools
from .auth import Authenticator
from .config import GatewayConfig
from .httpapp import METRICS_TYPE, GatewayHttpApp, _reply, metrics_app
from .metrics import GatewayMetrics
from .protocol import (
    MAX_TEXT_FRAME_BYTES,
    ErrorCode,
    EventWriter,
    OversizedMessage,
    ProtocolError,
    ProtocolViolation,
    Start,
    dumps,
    parse_text,
)
from .records import ArchiveRetrier, RecordStore, default_fallback_dir, store_from_config
from .s3store import S3Store
from .session import GatewayContext, Session
from .signing import UrlSigner
from .vadservice import VadService

if TYPE_CHECKING:
    from .supervisor import WorkerLink

log = logging.getLogger("voxgate.gateway")

WS_PATH = "/ws/stream"
SEQ_HEADER_BYTES = 8  # u32 seq | u32 pts_ms in front of each binary frame (seq_header)
RETRY_AFTER_FULL_S = 5  # the retry-after of a 503 for MAX_CONNECTIONS, s
CLOSE_POLICY = 1008  # WebSocket close code of a refusal (as the session's refusals)
FAIL_LINGER_S = 1.0  # after the Close of a failed connection: reading on for the peer's, s


def ws_message_limit(cfg: GatewayConfig) -> int:
    """The WebSocket library's ``max_message_size``, bytes.

    The largest binary frame a client may send (``MAX_FRAME_BYTES``) plus its seq header,
    so that nobody can make the gateway buffer more than that per connection; never below
    the text-frame limit, so a ``start`` with a long JWT is still read and answered by
    the parser. A longer message is dropped as it arrives (see ``_Connection``) and the
    session answers it with a fatal ``FRAME_TOO_LARGE`` and close code 1009.
    """
    return max(cfg.max_frame_bytes + SEQ_HEADER_BYTES, MAX_TEXT_FRAME_BYTES)


@dataclass
class GatewayPorts:
    """Where a running gateway listens; ``serve(ports=...)`` fills it in before it reports
    started (``task_status`` keeps its ``(ws_port, http_port)`` shape for old callers)."""

    ws: int = 0
    http: int = 0
    metrics: int | None = None  # METRICS_PORT's bound port; None: /metrics is on ``http``
    tls: bool = False  # wss:// and https://


class Admission(enum.Enum):
    """What the connection table says about a connection whose handshake completed."""

    OK = "ok"
    FULL = "full"  # over MAX_CONNECTIONS: refused at the handshake with 503
    RATE_LIMITED = "rate_limited"  # over MAX_SESSIONS_PER_IP: accepted, told, closed


@dataclass
class ConnectionTable:
    """Open client connections, in total and per client address (sans-IO).

    A connection counts from the TCP accept until its socket is closed, whether or not it
    completed the handshake or was admitted as a session: a socket costs the gateway the
    same either way, and the handshake and ``start`` deadlines bound how long one that does
    nothing can hold its place.

    With a per-address cap (MAX_SESSIONS_PER_IP), the cap on open connections counts at
    most that many of each address, so one address's surplus (refused anyway) cannot
    push other clients over MAX_CONNECTIONS; and an address with twice its cap open gets
    further sockets closed at the accept, so it cannot hold an unbounded number of them
    by never finishing the handshake.
    """

    max_connections: int
    max_per_ip: int = 0  # 0: no cap
    open: int = 0
    per_ip: dict[str, int] = field(default_factory=dict)
    counted: int = 0  # what MAX_CONNECTIONS is checked against: sum of min(n, max_per_ip)
    # With --workers: connections per address over the whole instance (a SharedCounts),
    # which MAX_SESSIONS_PER_IP is checked against; None: this process's ``per_ip``.
    shared: Any = None
    refused_full: int = 0  # 503s for MAX_CONNECTIONS
    refused_rate_limited: int = 0  # RATE_LIMITED for MAX_SESSIONS_PER_IP
    dropped: int = 0  # closed at the accept: twice MAX_SESSIONS_PER_IP open already

    def opened(self, ip: str) -> bool:
        """Count a new connection of ``ip``; False (and not counted) when it must be
        closed at once, without a handshake."""
        n = self.per_ip.get(ip, 0)
        if self.max_per_ip and self._of(ip) >= 2 * self.max_per_ip:
            self.dropped += 1
            return False
        if self.max_per_ip and self.shared is not None:
            self.shared.add(ip)
        self.per_ip[ip] = n + 1
        self.open += 1
        if not self.max_per_ip or n + 1 <= self.max_per_ip:
            self.counted += 1
        return True

    def closed(self, ip: str) -> None:
        """Forget one connection of ``ip`` (one that ``opened`` counted).

        Raises:
            ValueError: ``ip`` has no open connection (a bookkeeping bug).
        """
        n = self.per_ip.get(ip, 0)
        if n <= 0:
            raise ValueError(f"closed a connection of {ip!r}, which has none open")
        if n == 1:
            del self.per_ip[ip]
        else:
            self.per_ip[ip] = n - 1
        if self.max_per_ip and self.shared is not None:
            self.shared.remove(ip)
        self.open -= 1
        if not self.max_per_ip or n <= self.max_per_ip:
            self.counted -= 1

    def admit(self, ip: str) -> Admission:
        """Decide for a connection of ``ip`` that is already counted (the cap on open
        connections first: past it, nobody gets in, whatever their address)."""
        if self.counted > self.max_connections:
            self.refused_full += 1
            return Admission.FULL
        if self.max_per_ip and self._of(ip) > self.max_per_ip:
            self.refused_rate_limited += 1
            return Admission.RATE_LIMITED
        return Admission.OK

    def _of(self, ip: str) -> int:
        """Open connections of ``ip`` that its cap counts (the instance's with
        ``shared``)."""
        if self.shared is not None:
            return int(self.shared.count(ip))
        return self.per_ip.get(ip, 0)


def server_ssl_context(cfg: GatewayConfig) -> ssl.SSLContext | None:
    """The TLS context of the public side (wss://), or None without TLS_CERT_FILE.

    Raises:
        ValueError: the certificate or the key cannot be loaded (named in the message).
    """
    if not cfg.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])  # a WebSocket upgrade is HTTP/1.1
    try:
        ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"TLS_CERT_FILE/TLS_KEY_FILE ({cfg.tls_cert_file}, "
                         f"{cfg.tls_key_file}) cannot be loaded: {exc}") from exc
    return ctx


async def serve(
    cfg: GatewayConfig,
    *,
    shutdown: trio.Event | None = None,
    vad: VadService | None = None,
    store: RecordStore | None = None,
    ports: GatewayPorts | None = None,
    worker: WorkerLink | None = None,
    task_status: trio.TaskStatus[tuple[int, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until ``shutdown`` is set; then drain the sessions.

    Args:
        ports: filled in with every bound port (metrics included) before ``task_status``
            reports ``(ws_port, http_port)``.
        worker: run as one worker of ``voxgate gateway --workers N``: serve the sockets
            the supervisor bound, keep flowIds in the instance's registry, relay a
            connection whose flowId another worker holds, and answer ``/metrics`` for
            the whole instance (see ``gateway.supervisor``).

    Raises:
        ValueError: a TLS certificate or key (public side or ASR link), or the JWT key
            file, cannot be loaded: at startup, before any port is bound.
        FileNotFoundError: AUTH_JWT_KEYS_FILE does not exist.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve as hyper_serve

    shutdown = trio.Event() if shutdown is None else shutdown
    ports = ports if ports is not None else GatewayPorts()
    tls = server_ssl_context(cfg)  # first: a bad certificate stops us before any bind
    ports.tls = tls is not None
    metrics = GatewayMetrics()
    auth = Authenticator.from_config(cfg)
    pools = AsrPools.from_config(cfg)
    # One signer for the sessions (which sign record_url) and the HTTP app (which checks
    # it): with no RECORDS_URL_KEY its key is random, so both must hold this one object.
    signer = UrlSigner.from_config(cfg)
    store = store if store is not None else store_from_config(cfg)
    fallback_dir = (Path(cfg.archive_fallback_dir) if cfg.archive_fallback_dir
                    else default_fallback_dir())
    retrier = (ArchiveRetrier(store, fallback_dir, interval_s=cfg.archive_retry_interval_s)
               if store is not None else None)
    vad = vad or VadService(gate_dbfs=cfg.vad_gate_dbfs)
    vad.on_tick = lambda ms, _windows: metrics.vad_latency.observe(ms)
    table = ConnectionTable(cfg.max_connections, cfg.max_sessions_per_ip)
    if worker is not None:
        from .supervisor import SharedCounts

        table.shared = SharedCounts(worker)

    async with trio.open_nursery() as nursery:
        await nursery.start(pools.run)
        await nursery.start(vad.run)
        ready = {"ok": False}

        install_hypercorn_guard()
        http_stop = trio.Event()

        async def http_trigger() -> None:
            await http_stop.wait()

        hc = _hypercorn_config(Config(), cfg.host, cfg.http_port,
                               fd=worker.http_fd if worker is not None else None)
        if tls is not None:
            hc.certfile, hc.keyfile = cfg.tls_cert_file, cfg.tls_key_file
            # as the WebSocket port: a socket that never completes TLS goes (60 s default)
            hc.ssl_handshake_timeout = cfg.start_timeout_s
        http_app = GatewayHttpApp(store=store, metrics=metrics.render,
                                  ready=lambda: ready["ok"], web_origins=_web_origins(cfg),
                                  signer=signer, serve_metrics=cfg.metrics_port is None)
        asgi: Any = http_app
        if worker is not None and cfg.metrics_port is None:
            asgi = _InstanceMetrics(http_app, worker, metrics)
        binds = await nursery.start(functools.partial(
            hyper_serve, asgi, hc, shutdown_trigger=http_trigger))
        http_port = ports.http = _bound_port(binds)
        scheme = "https" if tls is not None else "http"
        public_base = cfg.public_base.rstrip("/") or f"{scheme}://{cfg.host}:{http_port}"
        ctx = GatewayContext(cfg, vad, pools, metrics, store, public_base,
                             fallback_dir=fallback_dir, archive_retrier=retrier,
                             auth=auth, signer=signer)
        if worker is not None:
            from .supervisor import SharedFlows

            ctx.flows = SharedFlows(worker)
        if retrier is not None:
            await nursery.start(retrier.run)  # also stores what an earlier run left
            metrics.counter_fn("archive_fallback_stored", "recordings stored from the "
                               "local fallback after the store failed",
                               lambda: float(retrier.stored))
        _register_metrics(metrics, vad, pools, store, table)

        relays = _Relays()
        async with trio.open_nursery() as sessions:
            async def handler(request: WebSocketRequest, admission: Admission) -> None:
                ws: WebSocketConnection | None = None
                with trio.move_on_after(cfg.send_timeout_s):
                    ws = await _handshake(request, admission, ctx.shutting_down.is_set())
                if ws is None:
                    return
                if admission is Admission.RATE_LIMITED:
                    await _refuse_rate_limited(ws, metrics, cfg.max_sessions_per_ip)
                    return
                conn = cast(_Connection, ws)
                if worker is not None:
                    conn.flow_owner = worker.owner_port
                await Session(ctx, ws).run()
                if conn.relay_to is not None:
                    port, start = conn.relay_to
                    conn.relay_to = None
                    assert worker is not None
                    log.info("relaying a connection to the worker on port %d, which "
                             "holds its flowId", port)
                    with relays.one():
                        relayed = await _relay(conn, port, start, worker.secret, cfg)
                    if not relayed:  # the owner is gone: this worker decides
                        conn.pushback.append(start)
                        await Session(ctx, ws).run()

            listeners: list[Any]
            if worker is not None:
                listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(
                    socket.socket(fileno=worker.ws_fd)))]
                if tls is not None:
                    listeners = [trio.SSLListener(listener, tls, https_compatible=True)
                                 for listener in listeners]
            elif tls is not None:
                listeners = await trio.open_ssl_over_tcp_listeners(
                    cfg.port, tls, host=cfg.host, https_compatible=True)
            else:
                listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
            server = _Server(handler, table, listeners, handler_nursery=sessions,
                             max_message_size=ws_message_limit(cfg),
                             connect_timeout=cfg.start_timeout_s,
                             disconnect_timeout=cfg.send_timeout_s)
            await nursery.start(server.run)
            ws_port = ports.ws = server.port
            http_app.ws_port = ws_port  # the page at / streams here by default
            if worker is not None:
                await _serve_private(nursery, sessions, worker, ctx, cfg)
            if cfg.metrics_port is not None:
                ports.metrics = await _serve_metrics(
                    nursery, cfg.host, cfg.metrics_port, metrics, http_trigger,
                    worker=worker)
            log.info("gateway listening: %s://%s:%d%s, %s://%s:%d, metrics on port %d",
                     "wss" if tls else "ws", cfg.host, ws_port, WS_PATH, scheme, cfg.host,
                     http_port, ports.metrics if ports.metrics is not None else http_port)
            ready["ok"] = True
            task_status.started((ws_port, http_port))
            await shutdown.wait()
            ready["ok"] = False
            ctx.shutting_down.set()
            for s in list(ctx.sessions):
                s.stop_ingest()
            with trio.move_on_after(cfg.shutdown_grace_s):
                if ctx.sessions:
                    await ctx.drained.wait()
                # Connections relayed to a sibling carry its finals: they end with it.
                await relays.idle()
            sessions.cancel_scope.cancel()
        http_stop.set()
        nursery.cancel_scope.cancel()


async def _serve_metrics(nursery: trio.Nursery, host: str, port: int,
                         metrics: GatewayMetrics, trigger: Callable[[], Awaitable[None]],
                         worker: WorkerLink | None = None) -> int:
    """A second hypercorn with ``/metrics`` (and ``/healthz``) alone on METRICS_PORT, so
    that the port that serves recordings to the world does not also serve metrics. Plain
    HTTP even with TLS_CERT_FILE: it is for the cluster's scraper, not for the public."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hyper_serve

    mc = _hypercorn_config(Config(), host, port,
                           fd=worker.metrics_fd if worker is not None else None)
    app: Any = metrics_app(metrics.render)
    if worker is not None:
        app = _InstanceMetrics(app, worker, metrics)
    binds = await nursery.start(functools.partial(
        hyper_serve, app, mc, shutdown_trigger=trigger))
    return _bound_port(binds)


def _hypercorn_config(hc: Any, host: str, port: int, fd: int | None = None) -> Any:
    # fd: a socket the supervisor of ``--workers`` bound (hypercorn serves it as is)
    hc.bind = [f"fd://{fd}"] if fd is not None else [f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = log
    return hc


def _bound_port(binds: list[str]) -> int:
    return int(binds[0].rsplit(":", 1)[1])


def _register_metrics(metrics: GatewayMetrics, vad: VadService, pools: AsrPools,
                      store: RecordStore | None, table: ConnectionTable) -> None:
    metrics.counter_fn("vad_windows", "VAD windows decided (512 samples each)",
                       lambda: float(vad.stats.windows))
    metrics.counter_fn("vad_gated_windows", "VAD windows the RMS silence gate "
                       "(VAD_GATE_DBFS) decided without running the model",
                       lambda: float(vad.stats.gated))
    metrics.gauge_fn("vad_tick_ms", "duration of the last batched VAD tick, ms",
                     lambda: vad.stats.last_tick_ms)
    metrics.gauge_fn("ws_connections_open", "open client connections, admitted as a "
                     "session or not (MAX_CONNECTIONS caps it)", lambda: float(table.open))
    metrics.counter_fn("ws_connections_refused", "connections refused at the handshake "
                       "with 503 for MAX_CONNECTIONS", lambda: float(table.refused_full))
    metrics.counter_fn("ws_connections_rate_limited", "connections answered RATE_LIMITED "
                       "for MAX_SESSIONS_PER_IP", lambda: float(table.refused_rate_limited))
    metrics.counter_fn("ws_connections_dropped", "connections closed at the accept, "
                       "without a handshake: their address had twice MAX_SESSIONS_PER_IP "
                       "open", lambda: float(table.dropped))
    for name, doc in (("failovers", "ASR streams replaced after a failure, with a replay"),
                      ("ping_timeouts", "ASR connections failed for an unanswered PING"),
                      ("breaker_opened", "ASR endpoint circuit breakers opened"),
                      ("streams_opened", "ASR streams opened"),
                      ("discards", "false early starts withdrawn with a link v3 Discard"),
                      ("discards_by_finalize",
                       "false early starts finalized and dropped (v2 ASR)"),
                      ("pauses", "speech pauses hinted to the ASR service with a link v4 "
                       "Pause (its final may be decoded before the endpoint)")):
        metrics.counter_fn(f"asr_link_{name}", doc, functools.partial(_link_stat, pools, name))
    if isinstance(store, S3Store):
        s3 = store
        for name, doc in (("recordings", "recordings committed to S3"),
                          ("parts", "multipart parts uploaded, resends included"),
                          ("puts", "recordings sent with one PutObject"),
                          ("retries", "S3 calls tried again"),
                          ("restarts", "multipart uploads started over from the spool"),
                          ("failures", "recordings that could not be stored")):
            metrics.counter_fn(f"archive_s3_{name}", doc,
                               functools.partial(_s3_stat, s3, name))


async def _handshake(request: WebSocketRequest, admission: Admission,
                     shutting_down: bool) -> WebSocketConnection | None:
    """Answer the upgrade: the WebSocket, or None after a refusal (wrong path, shutdown,
    MAX_CONNECTIONS). A RATE_LIMITED connection is accepted: the client gets a coded
    event it can act on, which a bare HTTP status would not give a browser."""
    if request.path.split("?", 1)[0] != WS_PATH:
        await request.reject(404, body=b"voxgate: the stream is at /ws/stream\n")
        return None
    if shutting_down:
        await request.reject(503, extra_headers=[(b"retry-after", b"5")],
                             body=b"voxgate: shutting down\n")
        return None
    if admission is Admission.FULL:
        await request.reject(503, extra_headers=[
            (b"retry-after", str(RETRY_AFTER_FULL_S).encode())],
            body=b"voxgate: too many connections\n")
        return None
    return await request.accept()


async def _refuse_rate_limited(ws: WebSocketConnection, metrics: GatewayMetrics,
                               cap: int) -> None:
    """One fatal ``RATE_LIMITED`` error, then the close (both under the connection's send
    deadline). The client has sent nothing yet, so the event has an empty flowId."""
    ew = EventWriter("")
    event = ew.error(ErrorCode.RATE_LIMITED, f"more than {cap} connections from your "
                     "address; close one and try again", fatal=True)
    with contextlib.suppress(ConnectionClosed):
        await ws.send_message(dumps(ew.stamp(event)))
        metrics.egress_events.labels("error").inc()
        metrics.errors.labels(ErrorCode.RATE_LIMITED.value).inc()
    await ws.aclose(CLOSE_POLICY)


class _Connection(WebSocketConnection):
    """trio-websocket's connection, with these changes.

    - A message over ``max_message_size``: its parts are dropped (never buffered) and one
      ``OversizedMessage`` is queued. This overrides a private method of trio-websocket
      0.12 (the library has no hook for it); ``test_oversized_frame_*`` fails if a
      release changes it.
    - A frame that breaks RFC 6455 (invalid UTF-8 in a text message included): wsproto
      stops parsing and reports a ``CloseConnection`` the peer never sent, on which the
      library closed the socket at once, with no Close frame and no ``end`` for the
      session. Instead one ``ProtocolViolation`` is queued, the rest of what the peer
      sends is read and dropped (wsproto would buffer it without bound), and the close
      the session makes after its ``end`` carries the parser's code (1007 or 1002); the
      socket is closed when the peer closes it, or FAIL_LINGER_S after that Close frame.
      ``tests/integration/test_ws_protocol_errors.py`` fails if a release changes this.
    - A ping after the gateway sent its Close frame is not answered: wsproto refuses to
      send a pong in that state, and the library's error ended the connection's task
      with a traceback. RFC 6455 (5.5.2) asks no pong once closing.
    - Every ``send_message`` and ``aclose`` has a deadline (SEND_TIMEOUT_S): a peer that
      stops reading, or never answers the close handshake, gets its socket closed under
      it, so it cannot hold a connection slot (or a session) forever. A send that runs
      out of time raises ``ConnectionClosed`` (code 1006), as for a peer that went away.
    """

    _dropping = False
    send_timeout_s = 10.0
    # With --workers: the private port of the sibling that holds a flowId (None: no
    # sibling does); consulted for the first ``start`` read, then dropped.
    flow_owner: Callable[[str], int | None] | None = None
    relay_to: tuple[int, str] | None = None  # (owner's port, the start) to relay

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pushback: list[str | bytes] = []  # handed out again before reading on
    _failure: ProtocolViolation | None = None  # the frame at which the peer broke RFC 6455
    _discard_scope: trio.CancelScope | None = None  # reading on after the failure

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        if self._dropping:
            self._dropping = not event.message_finished
            return
        if self._message_size + len(event.data) <= self._max_message_size:
            await super()._handle_message_event(event)
            return
        size = self._message_size + len(event.data)
        self._message_size = 0
        self._message_parts = []
        self._dropping = not event.message_finished
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            # The queue is typed for str | bytes; the session checks for this marker first.
            await self._send_channel.send(
                OversizedMessage(size, self._max_message_size))  # type: ignore[arg-type]

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state is not ConnectionState.OPEN or self._failure is not None:
            # A Close the peer sent (wsproto moved on to REMOTE_CLOSING or CLOSED), or
            # anything after our own Close: the library's handling is right.
            await super()._handle_close_connection_event(event)
            return
        # Still OPEN: this Close comes from wsproto's parser, not from the peer.
        self._failure = ProtocolViolation(int(event.code), event.reason or "")
        self._message_parts, self._message_size, self._dropping = [], 0, False
        log.info("WebSocket protocol violation by %s: %d %s", _peer_ip(self._stream),
                 event.code, event.reason)
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            # The queue is typed for str | bytes; the session checks for this marker first.
            await self._send_channel.send(self._failure)  # type: ignore[arg-type]
        await self._discard_input()

    async def _discard_input(self) -> None:
        """Read and drop what the peer sends after its broken frame, until it closes the
        connection or FAIL_LINGER_S after our Close frame went out (``_send`` sets that
        deadline). Reading on keeps the peer's sends from blocking while the session
        sends its last events, and keeps the socket's receive buffer empty, so that the
        final close is a FIN that lets the peer read everything, not a reset."""
        self._discard_scope = trio.CancelScope()
        if self._wsproto.state is not ConnectionState.OPEN:  # the Close went out already
            self._discard_scope.deadline = trio.current_time() + self._linger_s()
        eof = False
        with self._discard_scope:
            while True:
                try:
                    data = await self._stream.receive_some(self._receive_buffer_size)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    eof = True
                    break
        if eof and self._wsproto.state is ConnectionState.OPEN:
            # Gone before the session's close: the session's sends fail as for any
            # client that left (after it has taken the ProtocolViolation).
            await self._abort_web_socket()
        else:
            self._reader_running = False
            self._close_handshake.set()  # ``aclose`` closes the stream now

    def _linger_s(self) -> float:
        return min(FAIL_LINGER_S, self.send_timeout_s)

    async def _send(self, event: Event) -> None:
        await super()._send(event)
        if (isinstance(event, CloseConnection) and self._discard_scope is not None
                and self._failure is not None):
            self._discard_scope.deadline = trio.current_time() + self._linger_s()

    async def _handle_ping_event(self, event: Ping) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            await super()._handle_ping_event(event)

    async def get_message(self) -> str | bytes:
        if self.pushback:
            return self.pushback.pop(0)
        message = await super().get_message()
        if self.flow_owner is not None and isinstance(message, str):
            flow_id = _start_flow_id(message)
            if flow_id is not None:
                owner, self.flow_owner = self.flow_owner, None
                port = owner(flow_id)
                if port is not None:
                    # The session reading this sees a client that left before its start
                    # and ends quietly; the handler then relays the connection.
                    self.relay_to = (port, message)
                    raise ConnectionClosed(CloseReason(1000, "relayed"))
        return message

    async def send_message(self, message: str | bytes) -> None:
        with trio.move_on_after(self.send_timeout_s) as scope:
            await super().send_message(message)
        if scope.cancelled_caught:
            await self.abort()
            raise ConnectionClosed(CloseReason(1006, "send timed out"))

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        if self._failure is not None:
            # The connection failed whatever the session says: the Close names why.
            code, reason = self._failure.close_code, None
        with trio.move_on_after(self.send_timeout_s) as scope:
            await super().aclose(code, reason)
        if scope.cancelled_caught:
            await self.abort()

    async def abort(self) -> None:
        """Drop the connection without the closing handshake (idempotent): a reset
        (linger 0, so the kernel drops what the peer never read instead of keeping it and
        the socket until its window opens), then the WebSocket is marked closed, so that
        ``get_message`` and ``send_message`` raise ``ConnectionClosed``."""
        sock = _socket_of(self._stream)
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(self._stream)
        await self._abort_web_socket()


class _Server(WebSocketServer):
    """``WebSocketServer`` that makes ``_Connection``s, keeps the ``ConnectionTable``
    and passes each handshake's ``Admission`` to the handler.

    The handshake (TLS included) has ``connect_timeout`` (START_TIMEOUT_S); a peer that
    closes before it completes frees its place at once instead of at the deadline. The
    session's own START_TIMEOUT_S for ``start`` runs after it, so a connection that does
    nothing is gone within twice that, plus SEND_TIMEOUT_S for its refusal and close.
    """

    def __init__(self, handler: Callable[[WebSocketRequest, Admission], Awaitable[None]],
                 table: ConnectionTable, listeners: Any, **kwargs: Any) -> None:
        super().__init__(cast(Any, handler), listeners, **kwargs)
        self._admission_handler = handler
        self._table = table

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        ip = _peer_ip(stream)
        if not self._table.opened(ip):
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._serve_connection(stream, ip)
        except Exception as exc:
            # Whatever one connection does must not reach the server's nursery.
            _, rest = _split_disconnects(exc)
            if rest is not None:
                log.error("connection from %s failed", ip, exc_info=rest)
        finally:
            self._table.closed(ip)
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.abc.Stream, ip: str) -> None:
        async with trio.open_nursery() as nursery:
            connection = _Connection(stream, WSConnection(ConnectionType.SERVER),
                                     message_queue_size=self._message_queue_size,
                                     max_message_size=self._max_message_size,
                                     receive_buffer_size=self._receive_buffer_size)
            connection.send_timeout_s = self._disconnect_timeout
            request: WebSocketRequest | None = None
            with trio.move_on_after(self._connect_timeout) as connect_scope:
                async def read() -> None:
                    try:
                        await connection._reader_task()
                    finally:
                        if request is None:  # gone before its request: stop waiting
                            connect_scope.cancel()

                nursery.start_soon(read)
                request = await connection._get_request()
            if request is None:
                nursery.cancel_scope.cancel()
                return
            try:
                with contextlib.suppress(*_DISCONNECTS):
                    await self._admission_handler(request, self._table.admit(ip))
            finally:
                await connection.aclose()  # bounded: see _Connection.aclose
                nursery.cancel_scope.cancel()


_DISCONNECTS = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)


def _split_disconnects(exc: Exception) -> tuple[Any, BaseException | None]:
    """(the peer-went-away part, the rest) of ``exc``, which may be an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(_DISCONNECTS)
    return (exc, None) if isinstance(exc, _DISCONNECTS) else (None, exc)


def _socket_of(stream: Any) -> socket.socket | None:
    """The socket under a trio stream (a SocketStream, possibly wrapped in TLS)."""
    for _ in range(4):  # SSLStream -> SocketStream
        if stream is None or hasattr(stream, "socket"):
            break
        stream = getattr(stream, "transport_stream", None)
    sock = getattr(stream, "socket", None)
    return cast(socket.socket, sock) if sock is not None else None


def _peer_ip(stream: trio.abc.Stream) -> str:
    """The client's address ("?" when the socket is already gone)."""
    sock = _socket_of(stream)
    try:
        return str(sock.getpeername()[0]) if sock is not None else "?"
    except OSError:
        return "?"


def _web_origins(cfg: GatewayConfig) -> list[str]:
    """Origins the page at / may fetch recordings from besides its own: PUBLIC_BASE
    (record_url is built on it), and the S3 endpoint that /records/ redirects to."""
    out = []
    for url in (cfg.public_base,
                cfg.s3_endpoint_url if cfg.archive_store == "s3" else ""):
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.netloc:
            out.append(f"{parts.scheme}://{parts.netloc}")
    return out


def _link_stat(pools: AsrPools, name: str) -> float:
    return float(getattr(pools.counters, name))


def _s3_stat(store: S3Store, name: str) -> float:
    return float(getattr(store.statistics(), name))


# -- voxgate gateway --workers N: one worker among several (see gateway.supervisor) -----

METRICS_FETCH_TIMEOUT_S = 2.0  # a sibling that does not answer a scrape in time is left out
INTERNAL_MESSAGE_BYTES = 64 * 1024 * 1024  # a sibling's exposition, or its events


def _start_flow_id(message: str) -> str | None:
    """The flowId of ``message`` when it is a valid ``start``, else None."""
    try:
        msg = parse_text(message)
    except ProtocolError:
        return None
    return msg.flow_id if isinstance(msg, Start) else None


class _Relays:
    """Connections this worker relays to a sibling; shutdown waits until they end (the
    sibling drains their sessions and sends their finals through them)."""

    def __init__(self) -> None:
        self.active = 0
        self._idle = trio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def one(self) -> Any:
        self.active += 1
        self._idle = trio.Event()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


def _secret_headers(secret: str) -> list[tuple[bytes, bytes]]:
    from .supervisor import SECRET_HEADER

    return [(SECRET_HEADER.encode(), secret.encode())]


async def _relay(client: _Connection, port: int, start: str, secret: str,
                 cfg: GatewayConfig) -> bool:
    """Carry ``client``'s connection to the sibling worker listening on ``port``, which
    holds the flowId of ``start``: the ``start`` first, then every message both ways,
    and the sibling's close code. Returns False (nothing sent to the client) when the
    sibling cannot be reached."""
    async with trio.open_nursery() as nursery:
        try:
            with trio.fail_after(cfg.start_timeout_s):
                up = await connect_websocket(
                    nursery, "127.0.0.1", port, WS_PATH, use_ssl=False,
                    extra_headers=_secret_headers(secret),
                    max_message_size=INTERNAL_MESSAGE_BYTES)
        except (OSError, HandshakeError, ConnectionRejected, trio.TooSlowError) as exc:
            log.warning("could not relay a connection to the worker on port %d: %r",
                        port, exc)
            nursery.cancel_scope.cancel()
            return False
        close_code = 1000
        try:
            await up.send_message(start)
            async with trio.open_nursery() as pump:
                async def down() -> None:
                    nonlocal close_code
                    with contextlib.suppress(ConnectionClosed):
                        while True:
                            await client.send_message(await up.get_message())
                    if up.closed is not None and up.closed.code is not None:
                        close_code = int(up.closed.code)
                    pump.cancel_scope.cancel()

                async def upward() -> None:
                    while True:
                        try:
                            message = await client.get_message()
                        except ConnectionClosed:
                            pump.cancel_scope.cancel()  # the client left: nothing to carry
                            return
                        if isinstance(message, ProtocolViolation):
                            pump.cancel_scope.cancel()  # aclose sends the violation's code
                            return
                        if isinstance(message, OversizedMessage):
                            # The sibling has the same limit: it answers FRAME_TOO_LARGE.
                            message = bytes(message.limit + 1)
                        try:
                            await up.send_message(message)
                        except ConnectionClosed:
                            return  # the sibling closed: ``down`` delivers the rest

                pump.start_soon(down)
                pump.start_soon(upward)
        except ConnectionClosed:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await up.aclose()
                await client.aclose(close_code)
            nursery.cancel_scope.cancel()
    return True


async def _serve_private(nursery: trio.Nursery, sessions: trio.Nursery, worker: WorkerLink,
                         ctx: GatewayContext, cfg: GatewayConfig) -> None:
    """The worker's private loopback listener (instance secret required): connections
    that siblings relay here, and ``/internal/metrics`` for their scrapes."""
    from .supervisor import INTERNAL_METRICS_PATH, SECRET_HEADER

    secret = worker.secret.encode()

    async def handler(request: WebSocketRequest, _admission: Admission) -> None:
        given = dict(request.headers).get(SECRET_HEADER.encode(), b"")
        if not hmac.compare_digest(given, secret):
            await request.reject(403)
            return
        if request.path == INTERNAL_METRICS_PATH:
            ws = await request.accept()
            await ws.send_message(ctx.metrics.render())
            return
        conn = await _handshake(request, Admission.OK, ctx.shutting_down.is_set())
        if conn is not None:
            await Session(ctx, conn).run()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = _Server(handler, ConnectionTable(1 << 30), listeners, handler_nursery=sessions,
                     max_message_size=ws_message_limit(cfg),
                     connect_timeout=cfg.start_timeout_s,
                     disconnect_timeout=cfg.send_timeout_s)
    await nursery.start(server.run)
    worker.publish(server.port)


async def _instance_metrics(worker: WorkerLink, metrics: GatewayMetrics) -> bytes:
    """Every worker's metrics, summed (a sibling that does not answer within
    METRICS_FETCH_TIMEOUT_S is left out, and ``gateway_workers`` says how many are in)."""
    from .supervisor import INTERNAL_METRICS_PATH, merge_expositions

    texts = [metrics.render()]

    async def fetch(port: int) -> None:
        with trio.move_on_after(METRICS_FETCH_TIMEOUT_S):
            try:
                async with trio.open_nursery() as n:
                    ws = await connect_websocket(
                        n, "127.0.0.1", port, INTERNAL_METRICS_PATH, use_ssl=False,
                        extra_headers=_secret_headers(worker.secret),
                        max_message_size=INTERNAL_MESSAGE_BYTES)
                    data = await ws.get_message()
                    texts.append(data if isinstance(data, bytes) else data.encode())
                    await ws.aclose()
            except Exception as exc:  # a sibling that just died, or is shutting down
                log.warning("metrics of the worker on port %d: %r", port, exc)

    async with trio.open_nursery() as n:
        for port in worker.siblings():
            n.start_soon(fetch, port)
    return merge_expositions(texts, workers_help="gateway worker processes whose "
                             "metrics this scrape sums")


class _InstanceMetrics:
    """ASGI wrapper: ``/metrics`` answered for the whole instance; the rest as ``app``."""

    def __init__(self, app: Any, worker: WorkerLink, metrics: GatewayMetrics) -> None:
        self.app, self.worker, self.metrics = app, worker, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["path"] == "/metrics"
                and scope["method"] in ("GET", "HEAD")):
            body = await _instance_metrics(self.worker, self.metrics)
            await _reply(send, 200, body, METRICS_TYPE, head=scope["method"] == "HEAD")
            return
        await self.app(scope, receive, send)
