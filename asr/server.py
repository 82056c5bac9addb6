"""The ASR service: a hypercorn ASGI app on Trio speaking ASR link v1 over HTTP/2.

Routes:
  POST /v1/recognize   one full-duplex stream per session (docs/asr-link.md)
  POST /v1/lid         PCM16 body (first seconds of speech) -> {lang, score, top}
  GET  /healthz        the process is alive
  GET  /readyz         models loaded and warmed
  GET  /metrics        Prometheus text

Per stream, three tasks in one nursery: the *reader* always drains the request body
(it never waits on recognition, so one slow stream cannot stall the connection), the
*worker* turns finalize/end into finals, and the *partial* task asks for partials when
they are due and the scheduler has room. Events go out through a bounded channel.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from native import OpusDecoder, OpusError

from . import link
from .backend import Backend, LidResult, PartialPolicy, Recognition
from .scheduler import Job, Scheduler, SchedulerBusy
from .stream import CapReached, PartialDue, UtteranceAssembler

log = logging.getLogger("voxgate.asr")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PCM_FRAME_BYTES = 640  # 20 ms of PCM16 at 16 kHz
MAX_LID_BYTES = 30 * 16000 * 2  # 30 s of PCM16


@dataclass(frozen=True)
class AsrServerConfig:
    """ASR service settings; names carry units."""

    host: str = "127.0.0.1"
    port: int = 8090
    max_streams: int = 32  # admitted at once; more get 503 + retry-after
    partial_interval_ms: int = 250
    max_utterance_s: float = 30.0  # server-side cap; a final is forced
    max_frame_bytes: int = link.DEFAULT_MAX_FRAME_BYTES
    # A partial is asked for only while at most this many jobs are queued or running:
    # partials use what finals leave (bench/asr_server.py: at 4 streams this cut the
    # final p50 from 1540 to 1005 ms and made partials more regular, not rarer).
    partial_max_pending: int = 1
    stream_events: int = 64  # events buffered per stream toward a slow reader
    body_drain_s: float = 5.0  # wait this long for the request body to end after `end`
    # No request data for this long ends the stream. The gateway sends audio only while
    # someone speaks, so a session may be quiet for minutes: this only reaps dead peers.
    stream_idle_timeout_s: float = 3600.0
    retry_after_s: int = 1
    h2_max_concurrent_streams: int = 256
    keep_alive_timeout_s: float = 300.0
    graceful_timeout_s: float = 15.0
    certfile: str | None = None
    keyfile: str | None = None

    def __post_init__(self) -> None:
        if self.max_streams < 1 or self.partial_interval_ms < 20:
            raise ValueError("max_streams must be >= 1 and partial_interval_ms >= 20")


def install_hypercorn_guard() -> None:
    """Survive hypercorn's h2 ``KeyError`` on DATA for a closed stream (hypercorn #329).

    When the app has finished a response while the client is still sending its request
    body, hypercorn 0.18 indexes its stream table with the closed stream's id and the
    connection task dies with ``KeyError``, taking every stream of the connection (and,
    on some versions, the worker) down with it. A stream table that answers a missing id
    with a stream that ignores events makes that DATA a no-op; hypercorn then still
    acknowledges it, so flow control stays right. Applied once, idempotent.
    """
    from hypercorn.protocol import h2 as hyper_h2

    if getattr(hyper_h2.H2Protocol, "_voxgate_guard", False):
        return

    class _Gone:
        idle = True

        async def handle(self, event: object) -> None:
            return None

    gone = _Gone()

    class _Streams(dict):  # type: ignore[type-arg]
        def __missing__(self, key: int) -> _Gone:
            return gone

    original_init = hyper_h2.H2Protocol.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.streams = _Streams(self.streams)

    hyper_h2.H2Protocol.__init__ = __init__  # type: ignore[method-assign]
    hyper_h2.H2Protocol._voxgate_guard = True  # type: ignore[attr-defined]


def hypercorn_config(cfg: AsrServerConfig) -> Any:
    """hypercorn settings with the known pitfalls set for long full-duplex streams."""
    from hypercorn.config import Config

    hc = Config()
    hc.bind = [f"{cfg.host}:{cfg.port}"]
    hc.h2_max_concurrent_streams = cfg.h2_max_concurrent_streams
    # The default (1000) sends GOAWAY after that many requests on a connection, which
    # ends streams still in flight: a gateway keeps its connections for days.
    hc.keep_alive_max_requests = 2**31 - 1
    hc.keep_alive_timeout = cfg.keep_alive_timeout_s
    hc.graceful_timeout = cfg.graceful_timeout_s
    hc.h2_max_inbound_frame_size = 2**16
    hc.accesslog = None
    hc.errorlog = log
    if cfg.certfile:
        hc.certfile = cfg.certfile
        hc.keyfile = cfg.keyfile
        hc.alpn_protocols = ["h2"]
    else:
        hc.alpn_protocols = ["h2", "http/1.1"]
    return hc


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self, app: AsrApp) -> None:
        r = self.registry = CollectorRegistry()
        self.latency = Histogram(
            "asr_latency_ms", "final latency: finalize received to final sent, ms",
            buckets=(50, 100, 200, 300, 400, 600, 800, 1000, 1500, 2000, 3000, 5000, math.inf),
            registry=r,
        )
        self.streams = Counter("asr_streams", "recognize streams accepted", registry=r)
        self.busy = Counter("asr_busy_rejections", "streams or jobs refused: busy",
                            registry=r)
        self.opus_errors = Counter("asr_opus_decode_errors", "Opus packets that failed",
                                   registry=r)
        self.concealed = Counter("asr_concealed_packets", "lost packets concealed",
                                 registry=r)
        self.link_errors = Counter("asr_link_errors", "link protocol errors", ["code"],
                                   registry=r)
        self.events = Counter("asr_events", "events sent", ["type"], registry=r)
        g = Gauge("asr_inflight_sessions", "streams in progress", registry=r)
        g.set_function(lambda: app.active)
        g = Gauge("asr_queue_depth", "jobs waiting for the engine", registry=r)
        g.set_function(lambda: app.scheduler.queued)
        g = Gauge("asr_rtf", "engine compute time over audio time, since start", registry=r)
        g.set_function(lambda: app.scheduler.statistics().rtf)
        g = Gauge("asr_partials_dropped", "partial jobs made stale before running",
                  registry=r)
        g.set_function(lambda: app.scheduler.statistics().partials_dropped)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AsrApp:
    """The ASGI application. ``scheduler.run`` must be running (``serve`` starts it)."""

    def __init__(self, backend: Backend, scheduler: Scheduler,
                 cfg: AsrServerConfig | None = None) -> None:
        self.backend = backend
        self.scheduler = scheduler
        self.cfg = cfg or AsrServerConfig()
        self.ready = False
        self.ready_event = trio.Event()  # set with ``ready``: models loaded and warmed
        self.active = 0
        self.draining = trio.Event()
        self.metrics = Metrics(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"])
        if route == ("POST", "/v1/recognize"):
            await self._recognize(scope, receive, send)
        elif route == ("POST", "/v1/lid"):
            await self._lid(receive, send)
        elif route == ("GET", "/healthz"):
            await _respond(send, 200, {"status": "ok"})
        elif route == ("GET", "/readyz"):
            ok = self.ready and not self.draining.is_set()
            await _respond(send, 200 if ok else 503, {"ready": ok})
        elif route == ("GET", "/metrics"):
            await _respond_raw(send, 200, self.metrics.render(),
                               "text/plain; version=0.0.4; charset=utf-8")
        else:
            await _respond(send, 404, {"error": "NOT_FOUND"})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.draining.set()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _refusal(self) -> tuple[int, str] | None:
        if not self.ready:
            return 503, "NOT_READY"
        if self.draining.is_set():
            return 503, "DRAINING"
        if self.active >= self.cfg.max_streams:
            return 503, "BUSY"
        return None

    async def _recognize(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal()
        if refusal is not None:
            self.metrics.busy.inc()
            status, code = refusal
            await _respond(send, status, {"error": code},
                           headers=[(b"retry-after", str(self.cfg.retry_after_s).encode())])
            return
        self.active += 1
        self.metrics.streams.inc()
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", link.CONTENT_TYPE.encode())]})
            await LinkSession(self, receive, send).run()
        finally:
            self.active -= 1

    async def _lid(self, receive: Receive, send: Send) -> None:
        pool = self.backend.lid_pool()
        if pool is None:
            await _respond(send, 404, {"error": "NO_LID_MODEL"})
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_LID_BYTES:
                await _drain(receive)
                await _respond(send, 413, {"error": "TOO_LARGE",
                                           "message": f"at most {MAX_LID_BYTES} bytes"})
                return
            if not message.get("more_body", False):
                break
        if len(body) % 2 or not body:
            await _respond(send, 400, {"error": "BAD_AUDIO",
                                       "message": "body must be PCM16 LE, 16 kHz mono"})
            return
        audio = np.frombuffer(bytes(body), dtype="<i2").astype(np.float32) / 32768.0
        t0 = time.perf_counter()
        try:
            result = await self.scheduler.submit(Job("lid", pool, audio, key=object()))
        except SchedulerBusy:
            self.metrics.busy.inc()
            await _respond(send, 503, {"error": "BUSY"},
                           headers=[(b"retry-after", str(self.cfg.retry_after_s).encode())])
            return
        assert isinstance(result, LidResult)
        await _respond(send, 200, {
            "lang": result.lang, "score": round(result.score, 4),
            "top": [{"lang": la, "score": round(s, 4)} for la, s in result.top],
            "no_speech_prob": round(result.no_speech_prob, 4),
            "latency_ms": round((time.perf_counter() - t0) * 1000, 1),
        })


class LinkSession:
    """One ``/v1/recognize`` stream."""

    def __init__(self, app: AsrApp, receive: Receive, send: Send) -> None:
        self.app = app
        self.cfg = app.cfg
        self._receive = receive
        self._send = send
        self.stream = link.ServerStream(max_frame_bytes=self.cfg.max_frame_bytes)
        self.start: link.Start | None = None
        self.pool = ""
        self.decoder: OpusDecoder | None = None
        self.assembler = UtteranceAssembler(partial_interval_ms=self.cfg.partial_interval_ms,
                                            max_utterance_s=self.cfg.max_utterance_s)
        self._events_in, self._events_out = trio.open_memory_channel[link.AsrEvent](
            self.cfg.stream_events)
        self._control_in, self._control_out = trio.open_memory_channel[str](1024)
        self._partial_due = trio.Event()
        self._body_done = trio.Event()
        self._finalize_times: list[float] = []
        self._last_partial: dict[int, str] = {}
        self._failed = False
        self._sent = trio.Event()
        self._policy: PartialPolicy | None = None
        self._policy_utt = -1

    @property
    def flow_id(self) -> str:
        return self.start.flow_id if self.start else ""

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, nursery.cancel_scope)
            nursery.start_soon(self._sender)
            nursery.start_soon(self._partials)
            nursery.start_soon(self._watch_drain)
            await self._worker()
            # Everything is said. Let the request body end first, so the response never
            # completes under a client still sending (see install_hypercorn_guard).
            with trio.move_on_after(self.cfg.body_drain_s):
                await self._body_done.wait()
            self._events_in.close()
            nursery.cancel_scope.deadline = min(
                nursery.cancel_scope.deadline, trio.current_time() + 5)
            # the sender ends when the channel drains; then cancel the reader
            await self._sent.wait()
            nursery.cancel_scope.cancel()
        # If the client is gone there is nothing left to tell it.
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._send({"type": "http.response.body", "body": b"",
                                  "more_body": False})
        if self.decoder is not None:
            self.decoder.close()

    async def _watch_drain(self) -> None:
        """Graceful shutdown: finish this stream (its final, then ``end``)."""
        await self.app.draining.wait()
        self._control("end")

    # -- reader: always drains the body, never waits on recognition ------------------

    async def _reader(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                message: dict[str, Any] | None = None
                with trio.move_on_after(self.cfg.stream_idle_timeout_s):
                    message = await self._receive()
                if message is None:
                    self._protocol_error(link.LinkProtocolError(
                        link.ErrorCode.TIMEOUT,
                        f"no data for {self.cfg.stream_idle_timeout_s:g} s", fatal=True))
                    continue
                if message["type"] == "http.disconnect":
                    # The client went away: nobody can hear results any more.
                    scope.cancel()
                    return
                data = message.get("body", b"")
                if data and not self._failed:
                    self._handle_bytes(data)
                if not message.get("more_body", False):
                    if not self._failed:
                        try:
                            self.stream.close()
                        except link.LinkProtocolError as exc:
                            self._protocol_error(exc)
                    self._control("end")
                    return
        finally:
            self._body_done.set()

    def _handle_bytes(self, data: bytes) -> None:
        try:
            items = self.stream.receive(data)
        except link.LinkProtocolError as exc:
            self._protocol_error(exc)
            return
        for item in items:
            if isinstance(item, link.LinkProtocolError):
                self._protocol_error(item)
            elif isinstance(item, link.Start):
                self._on_start(item)
            elif isinstance(item, link.AudioIn):
                self._on_audio(item)
            elif isinstance(item, link.Finalize):
                self._control("finalize")
            elif isinstance(item, link.End):
                self._control("end")
            if self._failed:
                return

    def _on_start(self, start: link.Start) -> None:
        pool = self.app.backend.select_pool(start.lang_hint, start.domain)
        if pool is None:
            self._protocol_error(link.LinkProtocolError(
                link.ErrorCode.BAD_START,
                f"no pool serves lang_hint={start.lang_hint!r} domain={start.domain!r}",
                fatal=True))
            return
        self.start, self.pool = start, pool
        if start.codec == "opus":
            self.decoder = OpusDecoder(16000, 1)

    def _on_audio(self, item: link.AudioIn) -> None:
        pcm_parts = []
        packet = item.packet
        if self.decoder is not None and not packet.pcm:
            for k in range(item.lost):
                # FEC rebuilds the packet just before this one; older ones are concealed.
                fec = k == item.lost - 1
                try:
                    pcm_parts.append(self.decoder.decode(packet.data if fec else None, fec=fec))
                except (OpusError, ValueError):
                    pcm_parts.append(self.decoder.decode(None))
                self.app.metrics.concealed.inc()
            try:
                pcm_parts.append(self.decoder.decode(packet.data))
            except (OpusError, ValueError) as exc:
                self.app.metrics.opus_errors.inc()
                self._emit_error(link.ErrorCode.BAD_AUDIO,
                                 f"packet seq={packet.seq} does not decode: {exc}", False)
                pcm_parts.append(self.decoder.decode(None))
        else:
            if len(packet.data) != PCM_FRAME_BYTES:
                self._emit_error(link.ErrorCode.BAD_AUDIO,
                                 f"PCM packet seq={packet.seq} is {len(packet.data)} bytes, "
                                 f"not {PCM_FRAME_BYTES}", False)
                return
            for _ in range(item.lost):
                pcm_parts.append(self.decoder.decode(None) if self.decoder is not None
                                 else np.zeros(320, np.int16))
            pcm_parts.append(np.frombuffer(packet.data, dtype="<i2").astype(np.int16))
        pcm = np.concatenate(pcm_parts)
        pts = max(0, packet.pts_ms - 20 * item.lost)
        for action in self.assembler.add(pcm, pts):
            if isinstance(action, CapReached):
                self._control("finalize")
            elif isinstance(action, PartialDue):
                self._partial_due.set()

    def _control(self, what: str) -> None:
        try:
            if what == "finalize":
                self._finalize_times.append(time.perf_counter())
            self._control_in.send_nowait(what)
        except trio.WouldBlock:
            self._protocol_error(link.LinkProtocolError(
                link.ErrorCode.BUSY, "too many finalize frames pending", fatal=True))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _protocol_error(self, exc: link.LinkProtocolError) -> None:
        self.app.metrics.link_errors.labels(exc.code.value).inc()
        self._emit_error(exc.code, exc.message, exc.fatal)
        if exc.fatal and not self._failed:
            self._failed = True
            self._control("end")

    def _emit_error(self, code: link.ErrorCode, message: str, fatal: bool) -> None:
        self._emit(link.AsrEvent("error", self.flow_id, utterance=self.assembler.index,
                                 code=code.value, message=message, fatal=fatal))

    def _emit(self, event: link.AsrEvent) -> None:
        """Queue an event without waiting; a reader that stopped reading loses the stream."""
        try:
            self._events_in.send_nowait(event)
        except trio.WouldBlock:
            self._failed = True
            self._control("end")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # -- worker: finals -------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            what = await self._control_out.receive()
            await self._finalize()
            if what == "end":
                self._emit(link.AsrEvent("end", self.flow_id, utterance=self.assembler.index))
                return

    async def _finalize(self) -> None:
        utt = self.assembler.finish()
        started = self._finalize_times.pop(0) if self._finalize_times else time.perf_counter()
        if utt is None or self.start is None:
            return
        job = Job("final", self.pool, utt.audio, key=self, options=self._options())
        try:
            with trio.CancelScope(shield=self.app.draining.is_set()):
                result = await self.app.scheduler.submit(job)
        except SchedulerBusy:
            self.app.metrics.busy.inc()
            self._emit_error(link.ErrorCode.BUSY, "the engine queue is full", False)
            return
        except Exception as exc:
            log.exception("final failed for %s", self.flow_id)
            self._emit_error(link.ErrorCode.INTERNAL, f"recognition failed: {exc}", False)
            return
        assert isinstance(result, Recognition)
        self.app.metrics.latency.observe((time.perf_counter() - started) * 1000)
        self._last_partial.pop(utt.index, None)
        self._emit(link.AsrEvent("final", self.flow_id, utterance=utt.index, text=result.text,
                                 ts=(utt.start_ms, utt.end_ms), lang=result.lang))

    def _options(self) -> dict[str, Any]:
        assert self.start is not None
        opts: dict[str, Any] = {}
        if self.start.lang_hint:
            opts["lang"] = self.start.lang_hint
        if self.start.hotwords:
            opts["prompt"] = ", ".join(self.start.hotwords)
        return opts

    # -- partials: when due and the engine has room ------------------------------------

    async def _partials(self) -> None:
        while True:
            await self._partial_due.wait()
            self._partial_due = trio.Event()
            if self.start is None or self.app.scheduler.pending > self.cfg.partial_max_pending:
                continue  # under load, partials thin out; finals never do
            utt = self.assembler.snapshot()
            if utt is None:
                continue
            self.assembler.partial_requested()
            if self._policy_utt != utt.index:
                self._policy = self.app.backend.partial_policy(self.pool)
                self._policy_utt = utt.index
            options = self._options()
            if self._policy is not None:
                options["prefix"] = self._policy.prefix
            job = Job("partial", self.pool, utt.audio, key=self, options=options)
            try:
                result = await self.app.scheduler.submit(job)
            except SchedulerBusy:
                continue
            except Exception:
                log.exception("partial failed for %s", self.flow_id)
                continue
            if job.stale or result is None or utt.index != self.assembler.index:
                continue  # the utterance was finalized meanwhile: its final replaces this
            assert isinstance(result, Recognition)
            text = result.text if self._policy is None else self._policy.update(result)
            if not text or text == self._last_partial.get(utt.index):
                continue
            self._last_partial[utt.index] = text
            self._emit(link.AsrEvent("partial", self.flow_id, utterance=utt.index,
                                     text=text, ts=(utt.start_ms, utt.end_ms),
                                     lang=result.lang))

    # -- sender -------------------------------------------------------------------------

    async def _sender(self) -> None:
        try:
            async for event in self._events_out:
                batch = [event]
                while True:  # everything already queued goes in one DATA frame
                    try:
                        batch.append(self._events_out.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                for ev in batch:
                    self.app.metrics.events.labels(ev.type).inc()
                await self._send({"type": "http.response.body",
                                  "body": link.encode_many(list(batch)), "more_body": True})
        finally:
            self._sent.set()


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _respond(send: Send, status: int, obj: dict[str, Any], *,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _respond_raw(send, status, json.dumps(obj).encode(), "application/json",
                       headers=headers)


async def _respond_raw(send: Send, status: int, body: bytes, content_type: str, *,
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def serve(
    backend: Backend,
    cfg: AsrServerConfig | None = None,
    *,
    scheduler: Scheduler | None = None,
    shutdown: trio.Event | None = None,
    warmup: bool = True,
    task_status: trio.TaskStatus[tuple[AsrApp, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the ASR service until ``shutdown`` is set (then drain in-flight streams).

    ``task_status.started((app, port))`` fires once the socket listens; ``/readyz`` turns
    200 after warm-up.
    """
    from hypercorn.trio import serve as hyper_serve

    cfg = cfg or AsrServerConfig()
    install_hypercorn_guard()
    scheduler = scheduler or Scheduler(backend.run_batch)
    app = AsrApp(backend, scheduler, cfg)
    shutdown = trio.Event() if shutdown is None else shutdown

    async def trigger() -> None:
        await shutdown.wait()
        app.draining.set()

    async with trio.open_nursery() as outer:
        await outer.start(scheduler.run)
        # hypercorn returns once the trigger fired and its connections drained (within
        # graceful_timeout); streams finish on ``app.draining``. Then the scheduler stops.
        async with trio.open_nursery() as inner:
            binds = await inner.start(functools.partial(
                hyper_serve, cast(Any, app), hypercorn_config(cfg), shutdown_trigger=trigger))
            port = int(binds[0].rsplit(":", 1)[1])
            task_status.started((app, port))
            if warmup:
                await trio.to_thread.run_sync(backend.warmup)
            app.ready = True
            app.ready_event.set()
        outer.cancel_scope.cancel()
