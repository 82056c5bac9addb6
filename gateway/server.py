"""The gateway process: WebSocket sessions, the VAD tick, ASR pools and the HTTP side.

``serve`` is startable (``task_status.started((ws_port, http_port))``) so tests and
``bench/`` run it on port 0 inside a nursery. Setting ``shutdown`` drains: no new sessions,
ingest stops, every session finishes its finals and sends ``end{reason:"server_shutdown"}``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, WebSocketServer
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage, TextMessage

from asr.server import install_hypercorn_guard

from .asrlink import AsrPools
from .config import GatewayConfig
from .httpapp import GatewayHttpApp
from .metrics import GatewayMetrics
from .protocol import OversizedMessage
from .records import ArchiveRetrier, RecordStore, default_fallback_dir, store_from_config
from .s3store import S3Store
from .session import GatewayContext, Session
from .vadservice import VadService

log = logging.getLogger("voxgate.gateway")

WS_PATH = "/ws/stream"
MAX_WS_MESSAGE_BYTES = 4 * 1024 * 1024  # larger than any limit we enforce ourselves


async def serve(
    cfg: GatewayConfig,
    *,
    shutdown: trio.Event | None = None,
    vad: VadService | None = None,
    store: RecordStore | None = None,
    task_status: trio.TaskStatus[tuple[int, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until ``shutdown`` is set; then drain the sessions."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hyper_serve

    shutdown = trio.Event() if shutdown is None else shutdown
    metrics = GatewayMetrics()
    pools = AsrPools(cfg.pool_urls(), ping_interval_s=cfg.asr_ping_interval_s,
                     ping_timeout_s=cfg.asr_ping_timeout_s,
                     breaker_open_s=cfg.asr_breaker_open_s)
    store = store if store is not None else store_from_config(cfg)
    fallback_dir = (Path(cfg.archive_fallback_dir) if cfg.archive_fallback_dir
                    else default_fallback_dir())
    retrier = (ArchiveRetrier(store, fallback_dir, interval_s=cfg.archive_retry_interval_s)
               if store is not None else None)
    vad = vad or VadService(gate_dbfs=cfg.vad_gate_dbfs)
    vad.on_tick = lambda ms, _windows: metrics.vad_latency.observe(ms)

    async with trio.open_nursery() as nursery:
        await nursery.start(pools.run)
        await nursery.start(vad.run)
        ready = {"ok": False}

        hc = Config()
        hc.bind = [f"{cfg.host}:{cfg.http_port}"]
        hc.accesslog = None
        hc.errorlog = log
        install_hypercorn_guard()
        http_app = GatewayHttpApp(store=store, metrics=metrics.render,
                                  ready=lambda: ready["ok"], web_origins=_web_origins(cfg))
        http_stop = trio.Event()

        async def http_trigger() -> None:
            await http_stop.wait()

        binds = await nursery.start(functools.partial(
            hyper_serve, cast(Any, http_app), hc, shutdown_trigger=http_trigger))
        http_port = int(binds[0].rsplit(":", 1)[1])
        public_base = cfg.public_base.rstrip("/") or f"http://{cfg.host}:{http_port}"
        ctx = GatewayContext(cfg, vad, pools, metrics, store, public_base,
                             fallback_dir=fallback_dir, archive_retrier=retrier)
        if retrier is not None:
            await nursery.start(retrier.run)  # also stores what an earlier run left
            metrics.counter_fn("archive_fallback_stored", "recordings stored from the "
                               "local fallback after the store failed",
                               lambda: float(retrier.stored))
        metrics.counter_fn("vad_windows", "VAD windows decided (512 samples each)",
                           lambda: float(vad.stats.windows))
        metrics.counter_fn("vad_gated_windows", "VAD windows the RMS silence gate "
                           "(VAD_GATE_DBFS) decided without running the model",
                           lambda: float(vad.stats.gated))
        metrics.gauge_fn("vad_tick_ms", "duration of the last batched VAD tick, ms",
                         lambda: vad.stats.last_tick_ms)
        for name, doc in (("failovers", "ASR streams replaced after a failure, with a replay"),
                          ("ping_timeouts", "ASR connections failed for an unanswered PING"),
                          ("breaker_opened", "ASR endpoint circuit breakers opened"),
                          ("streams_opened", "ASR streams opened")):
            metrics.counter_fn(f"asr_link_{name}", doc,
                               functools.partial(_link_stat, pools, name))
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

        async with trio.open_nursery() as sessions:
            async def handler(request: WebSocketRequest) -> None:
                if request.path.split("?", 1)[0] != WS_PATH:
                    await request.reject(404, body=b"voxgate: the stream is at /ws/stream\n")
                    return
                if ctx.shutting_down.is_set():
                    await request.reject(503, extra_headers=[(b"retry-after", b"5")],
                                         body=b"voxgate: shutting down\n")
                    return
                ws = await request.accept()
                await Session(ctx, ws).run()

            listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
            server = _Server(handler, listeners, handler_nursery=sessions,
                             max_message_size=MAX_WS_MESSAGE_BYTES)
            await nursery.start(server.run)
            ws_port = server.port
            http_app.ws_port = ws_port  # the page at / streams here by default
            ready["ok"] = True
            task_status.started((ws_port, http_port))
            await shutdown.wait()
            ready["ok"] = False
            ctx.shutting_down.set()
            for s in list(ctx.sessions):
                s.stop_ingest()
            if ctx.sessions:
                with trio.move_on_after(cfg.shutdown_grace_s):
                    await ctx.drained.wait()
            sessions.cancel_scope.cancel()
        http_stop.set()
        nursery.cancel_scope.cancel()


class _Connection(WebSocketConnection):
    """trio-websocket's connection, except for a message over ``max_message_size``:
    its parts are dropped (never buffered) and one ``OversizedMessage`` is queued.

    This overrides a private method of trio-websocket 0.12 (the library has no hook for
    it); ``test_oversized_frame_*`` fails if a release changes it."""

    _dropping = False

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


class _Server(WebSocketServer):
    """``WebSocketServer`` that makes ``_Connection``s (same steps as the library's)."""

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            connection = _Connection(stream, WSConnection(ConnectionType.SERVER),
                                     message_queue_size=self._message_queue_size,
                                     max_message_size=self._max_message_size,
                                     receive_buffer_size=self._receive_buffer_size)
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(self._connect_timeout) as connect_scope:
                request = await connection._get_request()
            if connect_scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
            try:
                await self._handler(request)
            finally:
                with trio.move_on_after(self._disconnect_timeout):
                    await connection.aclose()


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
