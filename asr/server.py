"""The ASR service: a hypercorn ASGI app on Trio speaking ASR link v1 over HTTP/2.

Routes:
  POST /v1/recognize   one full-duplex stream per session (docs/asr-link.md)
  POST /v1/lid         PCM16 body (first seconds of speech) -> {lang, score, top}
  GET  /healthz        the process is alive
  GET  /readyz         models loaded and warmed
  GET  /metrics        Prometheus text

Per stream, three tasks in one nursery: the *reader* always drains the request body
(it never waits on recognition, so one slow stream cannot stall the connection) and cuts
each utterance the moment its ``Finalize`` (or ``End``, or the length cap) is parsed; the
*worker* submits the cut utterances' finals in order; the *partial* task asks for a
partial whenever one is due and leaves the pacing under load to the scheduler. Events go
out through a bounded channel.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from native import OpusDecoder, OpusError

from . import link, tracing
from .backend import (
    Backend,
    HealthReporter,
    LanguageNormalizer,
    LidResult,
    PartialPolicy,
    Recognition,
    degradable_pools,
)
from .logs import fields
from .scheduler import Job, Scheduler, SchedulerBusy, SchedulerPolicy
from .stream import SAMPLE_RATE, CapReached, PartialDue, Utterance, UtteranceAssembler

log = logging.getLogger("voxgate.asr")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PCM_FRAME_BYTES = 640  # 20 ms of PCM16 at 16 kHz
MIN_TOKEN_BYTES = 32  # as the gateway's other secrets: guessing it is out of reach
# Routes answered without the bearer token: the kubelet's probes, and Prometheus, which
# then needs no copy of a secret that grants recognition (/metrics has counts only, no
# flowId or text). mTLS, when on, still covers them: it acts before any route.
OPEN_ROUTES = frozenset({("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")})
SHOWN_CHARS = 32  # a client's string echoed in an error message is cut to this
# Hotwords become a Whisper prompt, of which the decoder keeps the last 223 tokens;
# English averages over 4 characters a token, so 1024 characters fill that.
MAX_PROMPT_CHARS = 1024


@dataclass(frozen=True)
class AsrServerConfig:
    """ASR service settings; names carry units."""

    host: str = "127.0.0.1"
    port: int = 8090
    max_streams: int = 32  # admitted at once; more get 503 + retry-after
    partial_interval_ms: int = 250
    # Until an utterance has shown a partial, one is asked for every this much new
    # audio instead (see docs/operations.md section 4 for the measurement).
    first_partial_interval_ms: int = 100
    # No partial for an utterance shorter than this (the gateway's pre-roll is 300 ms).
    min_partial_ms: int = 500
    max_utterance_s: float = 30.0  # server-side cap; a final is forced
    max_frame_bytes: int = link.DEFAULT_MAX_FRAME_BYTES
    # Scheduler (asr/scheduler.py). It replaces partial_max_pending: later partials run
    # only when no LID job, final or first partial waits, and never ride in a final's
    # batch, which is what that gate bought (bench/asr_server.py: at 4 streams it cut
    # the final p50 from 1540 to 1005 ms), without letting an utterance go partial-less.
    # The bound on the gap between two partials of a growing utterance.
    partial_max_gap_ms: int = 1000
    # Deadlines once the audio is in: the issue asks a fresh utterance's first partial
    # within about 100 ms of CPU, and finals at endpoint + 300 ms.
    first_partial_deadline_ms: int = 100
    final_deadline_ms: int = 300
    # After this long with no new audio on an open utterance (the gateway sends an
    # utterance's audio only up to its last speech + 200 ms, so a gap is a pause), its
    # final is decoded speculatively. If the Finalize comes with no audio in between,
    # that decode is the final (same audio, same options): the final follows the
    # endpoint by the link's latency, not by a decode. Speech that goes on withdraws it
    # (free while queued). 0 turns it off. docs/operations.md section 4 has the numbers.
    speculative_final_ms: int = 100
    lid_deadline_ms: int = 500  # LID holds routing; the gateway waits up to ~1 s for it
    # Past capacity, finals of a pool with a faster partial model (tiny.en for the
    # English pool) run on it when a queued final is predicted to start more than
    # degrade_final_late_ms past its deadline (asr/scheduler.py; docs/operations.md
    # section 4 has the measurement behind the default).
    degrade_finals: bool = True
    degrade_final_late_ms: int = 500
    # With more than one inference worker, later partials (not past their max gap)
    # start only when no batch runs: a first partial, a final or a speculative final
    # that arrives finds a worker free. At 4 real-time sessions: first partial p50/p95
    # 401/774 -> 376/727 ms, finals 979/1451 -> 879/1255 ms (docs/operations.md 4).
    later_partials_idle_only: bool = True
    # Jobs in one engine call; 8 amortizes the encoder without making one batch long.
    scheduler_max_batch: int = 8
    # Jobs waiting, then BUSY: 64 is 2 jobs per admitted stream at max_streams = 32.
    scheduler_max_queued: int = 64
    # Audio of a stream waiting for recognition (queued finals, plus the growing
    # utterance's audio that no partial has covered yet) beyond which the stream gets a
    # `flow BEHIND` event, and `flow OK` at half of it. 10 s: a real-time stream stays
    # under 2 s at the partial max gap; a file uploaded at 40x passes it in 0.25 s.
    behind_threshold_s: float = 10.0
    # /v1/lid requests in flight at once, then 503 BUSY. A request takes its slot before
    # its body is read, so a slow upload holds one for at most lid_read_timeout_s, and
    # the slots bound the memory of bodies being read (16 x 320 KB). The gateway asks
    # once or twice per session.
    lid_max_inflight: int = 16
    # The longest /v1/lid body, in seconds of PCM16 (32 000 bytes a second); more is 413.
    # Whisper's language ID looks at a 10 s window (asr/engine.py LID_WINDOW_S), so a
    # longer body costs encoder time and buys nothing; the gateway sends its first
    # LID_FIRST_N_SECONDS (3 s) of speech.
    lid_max_audio_s: float = 10.0
    # The whole /v1/lid body must arrive within this; a slower upload gets 408 TIMEOUT
    # and gives its slot back. 10 s of PCM is 320 KB: on a cluster link, milliseconds.
    lid_read_timeout_s: float = 5.0
    stream_events: int = 64  # events buffered per stream toward a slow reader
    body_drain_s: float = 5.0  # wait this long for the request body to end after `end`
    # A recognize stream's Start must be complete this long after the stream opened,
    # else a fatal TIMEOUT. The gateway sends it with the request headers.
    start_timeout_s: float = 10.0
    # No request data for this long ends the stream with a fatal TIMEOUT (its queued
    # finals are still sent). The gateway sends audio only during speech and reopens a
    # stream for the next utterance when a quiet one was ended (gateway/asrlink.py), so
    # reaping costs a quiet session one stream open; an hour (the old default) let any
    # peer that reaches the service hold max_streams slots with no traffic at all.
    stream_idle_timeout_s: float = 60.0
    retry_after_s: int = 1
    h2_max_concurrent_streams: int = 256
    keep_alive_timeout_s: float = 300.0
    graceful_timeout_s: float = 15.0
    certfile: str | None = None
    keyfile: str | None = None
    # A TLS handshake not done in this long is dropped (hypercorn's default is 60 s): a
    # gateway on the cluster network handshakes in milliseconds, and a peer that opens
    # sockets and stays silent should hold each for as short a time as possible.
    tls_handshake_timeout_s: float = 10.0
    # mTLS: a CA bundle; with it (and certfile/keyfile) the listener requires a client
    # certificate signed by it, and refuses the TLS handshake otherwise.
    client_ca_file: str | None = None
    # A bearer token (32 bytes at least): every request except /healthz, /readyz and
    # /metrics needs ``authorization: Bearer <token>``, else 401 before its body is read.
    # Where mTLS is not wanted. `voxgate asr` reads it from ASR_TOKEN (asr/main.py).
    auth_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_streams < 1 or self.partial_interval_ms < 20:
            raise ValueError("max_streams must be >= 1 and partial_interval_ms >= 20")
        if self.first_partial_interval_ms < 20 or self.min_partial_ms < 0:
            raise ValueError("first_partial_interval_ms must be >= 20 and min_partial_ms >= 0")
        if self.speculative_final_ms < 0:
            raise ValueError("speculative_final_ms must be >= 0 (0: off)")
        if self.behind_threshold_s <= 0 or self.lid_max_inflight < 1:
            raise ValueError("behind_threshold_s and lid_max_inflight must be positive")
        for name in ("lid_max_audio_s", "lid_read_timeout_s", "start_timeout_s",
                     "stream_idle_timeout_s", "tls_handshake_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("certfile and keyfile must be set together")
        if self.client_ca_file and not self.certfile:
            raise ValueError("client_ca_file (mTLS) needs certfile and keyfile (TLS)")
        if self.auth_token is not None and len(self.auth_token.encode()) < MIN_TOKEN_BYTES:
            raise ValueError(f"auth_token must be {MIN_TOKEN_BYTES} bytes at least")
        self.scheduler_policy()  # validates the scheduler's knobs

    @property
    def lid_max_bytes(self) -> int:
        """The longest /v1/lid body, in bytes (whole samples)."""
        return int(self.lid_max_audio_s * SAMPLE_RATE) * 2

    def scheduler_policy(self) -> SchedulerPolicy:
        """The scheduler knobs of this config.

        Raises:
            ValueError: a knob out of range.
        """
        return SchedulerPolicy(
            max_batch=self.scheduler_max_batch, max_queued=self.scheduler_max_queued,
            partial_max_gap_ms=self.partial_max_gap_ms,
            first_partial_deadline_ms=self.first_partial_deadline_ms,
            final_deadline_ms=self.final_deadline_ms, lid_deadline_ms=self.lid_deadline_ms,
            degrade_finals=self.degrade_finals,
            degrade_final_late_ms=self.degrade_final_late_ms,
            later_partials_idle_only=self.later_partials_idle_only)


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
        hc.ssl_handshake_timeout = cfg.tls_handshake_timeout_s
        if cfg.client_ca_file:
            # hypercorn loads ca_certs into the server context and sets verify_mode on it
            # (Config.create_ssl_context): a handshake without a certificate signed by
            # this CA fails before any HTTP/2 byte, for every route, probes included.
            hc.ca_certs = cfg.client_ca_file
            hc.verify_mode = ssl.CERT_REQUIRED
    else:
        hc.alpn_protocols = ["h2", "http/1.1"]
    return hc


# Latency buckets (ms) around the SLA: first partial p50 300 / p95 600, finals at
# endpoint + 300 ms; dense from 100 to 2000 ms where alerts compare, coarse past it.
LATENCY_BUCKETS_MS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 800, 1000, 1500, 2000,
                      3000, 5000, math.inf)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own.

    Things that are counted are counters (``_total``, as prometheus_client names them),
    so PromQL can take ``rate()`` of them across restarts. The scheduler's and the
    inference workers' numbers are read from their ``statistics()`` once per scrape
    (``_StatsCollector``), so neither imports a metrics library. ``process_*`` covers this
    process; the workers' CPU is exported apart, as they are other processes.
    """

    def __init__(self, app: AsrApp) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.latency = Histogram(
            "asr_latency_ms", "final latency: finalize received to final sent, ms",
            buckets=LATENCY_BUCKETS_MS, registry=r)
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
        self.unauthorized = Counter("asr_unauthorized", "requests refused with 401: no or "
                                    "a wrong bearer token", registry=r)
        self.lid_refused = Counter("asr_lid_refused", "/v1/lid requests refused before "
                                   "their job: body too large or too slow", ["reason"],
                                   registry=r)
        self.flow = Counter("asr_flow_events", "flow events sent to streams", ["code"],
                            registry=r)
        self.discarded = Counter("asr_discarded_utterances", "utterances withdrawn by a "
                                 "link v3 Discard (a false early start): no final decoded",
                                 registry=r)
        self.pauses = Counter("asr_pause_hints", "link v4 Pause frames received (the "
                              "gateway saw an utterance's speech pause)", registry=r)
        self.speculative = Counter(
            "asr_speculative_finals", "finals decoded at a pause, before the endpoint, by "
            "outcome: used (it was the final), withdrawn (speech went on before it ran), "
            "wasted (it ran, then speech went on), failed", ["outcome"], registry=r)
        # Known label values start at 0, so rate() panels have a series before the
        # first occurrence (and an increase from 0 is not lost).
        for err in link.ErrorCode:
            self.link_errors.labels(err.value)
        for kind in ("partial", "final", "end", "error", "flow"):
            self.events.labels(kind)
        for code in ("BEHIND", "OK"):
            self.flow.labels(code)
        for reason in ("TOO_LARGE", "TIMEOUT"):
            self.lid_refused.labels(reason)
        for outcome in SPEC_OUTCOMES:
            self.speculative.labels(outcome)
        g = Gauge("asr_inflight_sessions", "streams in progress", registry=r)
        g.set_function(lambda: app.active)
        g = Gauge("asr_queue_depth", "jobs waiting for the engine", registry=r)
        g.set_function(lambda: app.scheduler.queued)
        r.register(_StatsCollector(app))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    """The scheduler's and (when the backend has them) the workers' ``statistics()``."""

    # WorkerStats field -> (metric name without _total, help)
    WORKER_COUNTERS = (
        ("restarts", "asr_worker_restarts", "inference worker processes started after "
         "the initial set"),
        ("crashes", "asr_worker_crashes", "inference workers that died mid-job"),
        ("hangs", "asr_worker_hangs", "inference workers killed past their job deadline"),
        ("failed_starts", "asr_worker_failed_starts", "inference workers that failed to "
         "start"),
        ("reruns", "asr_worker_reruns", "batches run again after their worker was lost"),
    )

    def __init__(self, app: AsrApp) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        return []  # no duplicate check at registration; collect() is cheap but dynamic

    def collect(self) -> list[Metric]:
        s = self.app.scheduler.statistics()
        out: list[Metric] = [
            GaugeMetricFamily("asr_rtf", "engine compute time over audio time, since "
                              "start (rate(asr_compute_seconds_total) / "
                              "rate(asr_audio_seconds_total) gives it over a window)",
                              value=s.rtf),
            CounterMetricFamily("asr_audio_seconds", "audio seconds in jobs run "
                                "(partials re-count their utterance)", value=s.audio_s),
            CounterMetricFamily("asr_compute_seconds", "engine wall seconds spent on "
                                "batches", value=s.compute_s),
            CounterMetricFamily("asr_batches", "engine batches run", value=s.batches),
            CounterMetricFamily("asr_jobs", "jobs run (partials, finals, LID)",
                                value=s.jobs_done),
            CounterMetricFamily("asr_jobs_failed", "jobs that failed alone or with their "
                                "batch", value=s.jobs_failed),
            CounterMetricFamily("asr_partials_dropped", "partial jobs made stale before "
                                "running", value=s.partials_dropped),
            CounterMetricFamily("asr_partials_promoted", "partials run early: their max "
                                "gap ran out", value=s.starved_promotions),
        ]
        by_kind = CounterMetricFamily("asr_compute_seconds_by_kind", "engine wall seconds "
                                      "by job kind (a batch's time shared among its "
                                      "jobs): lid, final, first_partial, partial, "
                                      "speculative", labels=["kind"])
        jobs_by_kind = CounterMetricFamily("asr_jobs_by_kind", "jobs run by kind",
                                           labels=["kind"])
        for kind in JOB_KINDS:
            by_kind.add_metric([kind], s.compute_by_kind.get(kind, 0.0))
            jobs_by_kind.add_metric([kind], s.jobs_by_kind.get(kind, 0))
        out += [by_kind, jobs_by_kind]
        degraded = CounterMetricFamily("asr_degraded_finals", "finals run on their pool's "
                                       "faster model: the pool was past capacity",
                                       labels=["pool"])
        core = getattr(self.app.scheduler, "core", None)
        for pool in sorted({*getattr(core, "degradable", ()), *s.degraded_finals}):
            degraded.add_metric([pool], s.degraded_finals.get(pool, 0))
        out.append(degraded)
        misses = CounterMetricFamily("asr_deadline_misses", "jobs done past their deadline",
                                     labels=["kind"])
        for kind in sorted({"lid", "final", "partial", *s.deadline_misses}):
            misses.add_metric([kind], s.deadline_misses.get(kind, 0))
        out.append(misses)
        out.extend(self._workers())
        return out

    def _workers(self) -> list[Metric]:
        stats_fn = getattr(self.app.backend, "statistics", None)
        if not callable(stats_fn):
            return []
        w = stats_fn()
        if not hasattr(w, "cpu_s"):  # not a worker backend
            return []
        out: list[Metric] = [CounterMetricFamily(
            "asr_worker_cpu_seconds", "user + system CPU seconds of the inference worker "
            "processes, live and gone (as of each worker's last answer)",
            value=float(sum(w.cpu_s)) + float(w.retired_cpu_s))]
        for field_name, name, doc in self.WORKER_COUNTERS:
            out.append(CounterMetricFamily(name, doc, value=getattr(w, field_name)))
        states = GaugeMetricFamily("asr_workers", "inference worker processes by state",
                                   labels=["state"])
        busy = int(w.busy)
        for state, n in (("idle", int(w.ready) - busy), ("busy", busy),
                         ("starting", int(w.starting))):
            states.add_metric([state], n)
        out.append(states)
        out.append(GaugeMetricFamily("asr_workers_wanted", "inference workers configured "
                                     "(active plus warm standby)",
                                     value=int(w.workers) + int(w.standby_workers)))
        out.append(GaugeMetricFamily("asr_workers_crash_looping", "1 while workers die "
                                     "faster than they are replaced (/healthz fails)",
                                     value=1.0 if w.crash_looping else 0.0))
        return out


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
        self.lid_inflight = 0
        self.draining = trio.Event()
        token = self.cfg.auth_token
        self._token = None if token is None else token.encode()
        self.metrics = Metrics(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"])
        if route not in OPEN_ROUTES and not self._authorized(scope):
            # Before the body is read: an unauthenticated peer costs one header block.
            self.metrics.unauthorized.inc()
            await _respond(send, 401, {"error": "UNAUTHORIZED"},
                           headers=[(b"www-authenticate", b'Bearer realm="voxgate-asr"')])
            return
        if route == ("POST", "/v1/recognize"):
            await self._recognize(scope, receive, send)
        elif route == ("POST", "/v1/lid"):
            await self._lid(scope, receive, send)
        elif route == ("GET", "/healthz"):
            await self._healthz(send)
        elif route == ("GET", "/readyz"):
            ok = self.ready and not self.draining.is_set()
            await _respond(send, 200 if ok else 503, {"ready": ok})
        elif route == ("GET", "/metrics"):
            await _respond_raw(send, 200, self.metrics.render(),
                               "text/plain; version=0.0.4; charset=utf-8")
        else:
            await _respond(send, 404, {"error": "NOT_FOUND"})

    def _authorized(self, scope: Scope) -> bool:
        """Whether the request carries the configured bearer token (always, without one).

        The comparison takes the same time wherever the first wrong byte is, so the token
        cannot be guessed byte by byte from response times.
        """
        if self._token is None:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    given.strip(), self._token)
        return False

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.draining.set()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _healthz(self, send: Send) -> None:
        """200 while the process serves; with a backend that reports its health (worker
        processes), 503 and its report when it says it cannot."""
        if not isinstance(self.backend, HealthReporter):
            await _respond(send, 200, {"status": "ok"})
            return
        try:
            report = dict(self.backend.health())
        except Exception as exc:  # a broken health check is itself unhealthy
            report = {"ok": False, "error": f"health() failed: {exc}"}
        ok = report.get("ok") is True
        report.setdefault("status", "ok" if ok else "unhealthy")
        await _respond(send, 200 if ok else 503, report)

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
        answered = _content_type(scope)
        session = LinkSession(self, receive, send,
                              version=link.version_of(answered) or link.VERSION)
        self.active += 1
        self.metrics.streams.inc()
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", answered.encode())]})
            await session.run()
        finally:
            self.active -= 1
            session.log_end()

    async def _lid(self, scope: Scope, receive: Receive, send: Send) -> None:
        pool = self.backend.lid_pool()
        if pool is None:
            await self._drain_for(receive)
            await _respond(send, 404, {"error": "NO_LID_MODEL"})
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.cfg.lid_max_bytes:
            # Said up front: refused before it holds a slot or sends a byte more.
            await self._drain_for(receive)
            await self._too_large(send)
            return
        if self.lid_inflight >= self.cfg.lid_max_inflight:
            self.metrics.busy.inc()
            await self._drain_for(receive)
            await _respond(send, 503, {"error": "BUSY"},
                           headers=[(b"retry-after", str(self.cfg.retry_after_s).encode())])
            return
        self.lid_inflight += 1
        try:
            await self._lid_inner(pool, receive, send)
        finally:
            self.lid_inflight -= 1

    async def _drain_for(self, receive: Receive) -> None:
        """Read and drop what is left of a refused request's body, for at most
        ``lid_read_timeout_s``: a refusal answered while the client still sends is safe
        (install_hypercorn_guard), but an HTTP/1.1 client reads it more reliably after
        its body went out. Nothing is kept, so this costs no memory."""
        with trio.move_on_after(self.cfg.lid_read_timeout_s):
            await _drain(receive)

    async def _too_large(self, send: Send) -> None:
        self.metrics.lid_refused.labels("TOO_LARGE").inc()
        await _respond(send, 413, {
            "error": "TOO_LARGE", "message": f"at most {self.cfg.lid_max_bytes} bytes "
            f"({self.cfg.lid_max_audio_s:g} s of PCM16 at 16 kHz)"})

    async def _lid_inner(self, pool: str, receive: Receive, send: Send) -> None:
        body = bytearray()
        limit = self.cfg.lid_max_bytes
        with trio.move_on_after(self.cfg.lid_read_timeout_s) as read:
            while len(body) <= limit:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
        if len(body) > limit:
            del body[:]
            await self._drain_for(receive)
            await self._too_large(send)
            return
        if read.cancelled_caught:
            # The slot goes back now; whatever the client still sends is dropped.
            self.metrics.lid_refused.labels("TIMEOUT").inc()
            await _respond(send, 408, {
                "error": "TIMEOUT",
                "message": f"the body did not arrive within {self.cfg.lid_read_timeout_s:g} s"})
            return
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
        except Exception:
            log.exception("language ID failed", extra=fields(stage="asr_lid",
                                                              err_code="INTERNAL"))
            await _respond(send, 500, {"error": "INTERNAL",
                                       "message": "language ID failed"})
            return
        if not isinstance(result, LidResult):
            await _respond(send, 500, {"error": "INTERNAL",
                                       "message": "the engine gave no language ID"})
            return
        await _respond(send, 200, {
            "lang": result.lang, "score": round(result.score, 4),
            "top": [{"lang": la, "score": round(s, 4)} for la, s in result.top],
            "no_speech_prob": round(result.no_speech_prob, 4),
            "latency_ms": round((time.perf_counter() - t0) * 1000, 1),
        })


@dataclass(frozen=True)
class _Cut:
    """An utterance cut by the reader, for the worker to finalize in order.

    ``utt`` is None when there was nothing to cut; ``end`` closes the stream after it;
    ``at`` is when the cut happened (``perf_counter``), for the latency metric.
    """

    utt: Utterance | None
    end: bool
    at: float
    spec: _Spec | None = None  # the speculative final that is this utterance's final


SPEC_OUTCOMES = ("used", "withdrawn", "wasted", "failed")
JOB_KINDS = ("lid", "final", "first_partial", "partial", "speculative")


@dataclass(eq=False)
class _Spec:
    """A speculative final (``AsrServerConfig.speculative_final_ms``): the decode of
    the open utterance's first ``samples`` with ``options``. ``done`` is set when its
    job has returned (``result``, or None when it was withdrawn or failed)."""

    job: Job
    samples: int
    options: dict[str, Any]
    done: trio.Event = field(default_factory=trio.Event)
    result: Recognition | None = None


class LinkSession:
    """One ``/v1/recognize`` stream."""

    def __init__(self, app: AsrApp, receive: Receive, send: Send, *,
                 version: int = link.VERSION) -> None:
        self.app = app
        self.cfg = app.cfg
        self._receive = receive
        self._send = send
        # ``version``: the one the response's content type names; below 3, Discard is an
        # unknown frame type on this stream.
        self.stream = link.ServerStream(max_frame_bytes=self.cfg.max_frame_bytes,
                                        version=version)
        self.start: link.Start | None = None
        self.pool = ""
        self.lang = ""  # the backend's code for Start.lang_hint ("" = auto)
        self.decoder: OpusDecoder | None = None
        self.assembler = UtteranceAssembler(
            partial_interval_ms=self.cfg.partial_interval_ms,
            first_partial_interval_ms=self.cfg.first_partial_interval_ms,
            min_partial_ms=self.cfg.min_partial_ms, max_utterance_s=self.cfg.max_utterance_s)
        self._events_in, self._events_out = trio.open_memory_channel[link.AsrEvent](
            self.cfg.stream_events)
        self._cuts_in, self._cuts_out = trio.open_memory_channel[_Cut](1024)
        self._partial_due = trio.Event()
        self._body_done = trio.Event()
        self._ended = False  # an end was queued: later cuts have nothing to add
        self._end_lost = False  # an end found the cut queue full: the worker ends instead
        self._last_partial: dict[int, str] = {}
        self._last_partial_end: dict[int, int] = {}  # end_ms of each shown partial
        # Utterances whose partials may no longer be sent: every index up to
        # ``_closed_upto`` (its final was sent or failed: finals go out in cut order),
        # and the discarded ones.
        self._closed_upto = -1
        self._discarded: set[int] = set()
        self._failed = False
        self._sent = trio.Event()
        self._policy: PartialPolicy | None = None
        self._policy_utt = -1
        self._partial_job: Job | None = None  # this stream's partial, queued or running
        self._spec: _Spec | None = None  # the open utterance's speculative final
        self._last_audio = 0.0  # trio clock of the last audio packet
        self._audio_came = trio.Event()
        self._nursery: trio.Nursery | None = None  # the stream's, for speculative finals
        self._due_while_running = False
        # Backpressure accounting, in samples (see AsrServerConfig.behind_threshold_s).
        self._queued_final_samples = 0
        self._covered_samples = 0  # of the growing utterance, by its latest partial
        self._behind = False
        # For the stream's log lines (asr/logs.py fields).
        self._t0 = time.perf_counter()
        self.bytes_in = self.bytes_out = self.samples_in = 0
        self.last_seq = -1
        self.err_code = ""
        self.model = ""  # the pool's model, set at Start
        self.span: Any = None  # the stream's server span, from Start (traceparent)

    @property
    def flow_id(self) -> str:
        return self.start.flow_id if self.start else ""

    def _model(self) -> str:
        """The pool's model name when the backend describes its pools, else the pool."""
        describe = getattr(self.app.backend, "describe", None)
        if callable(describe):
            with contextlib.suppress(Exception):
                return str(describe()[self.pool]["model"])
        return self.pool

    def log_end(self) -> None:
        """One line per stream when it ends, with what it carried."""
        log.info("stream end", extra=fields(
            flowId=self.flow_id, stage="asr_stream", seq=self.last_seq, sr=SAMPLE_RATE,
            ns=self.samples_in, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
            lang=self.lang, model=self.model,
            latency_ms=round((time.perf_counter() - self._t0) * 1000, 1),
            err_code=self.err_code,
            asr_link_codec=self.start.codec if self.start else ""))

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reader, nursery.cancel_scope)
                nursery.start_soon(self._sender)
                nursery.start_soon(self._partials, nursery)
                nursery.start_soon(self._speculator, nursery)
                nursery.start_soon(self._watch_drain)
                await self._worker()
                # Everything is said. Let the request body end first, so the response
                # never completes under a client still sending (install_hypercorn_guard).
                with trio.move_on_after(self.cfg.body_drain_s):
                    await self._body_done.wait()
                self._events_in.close()
                nursery.cancel_scope.deadline = min(
                    nursery.cancel_scope.deadline, trio.current_time() + 5)
                # the sender ends when the channel drains; then cancel the reader
                await self._sent.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.app.scheduler.forget(self)
            if self.span is not None:
                self.span.set_attribute("voxgate.err_code", self.err_code)
                self.span.end()
        # If the client is gone there is nothing left to tell it.
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._send({"type": "http.response.body", "body": b"",
                                  "more_body": False})
        if self.decoder is not None:
            self.decoder.close()

    async def _watch_drain(self) -> None:
        """Graceful shutdown: finish this stream (its final, then ``end``)."""
        await self.app.draining.wait()
        self._cut(end=True)

    # -- reader: always drains the body, never waits on recognition ------------------

    async def _reader(self, scope: trio.CancelScope) -> None:
        # Absolute, not per message: a Start sent a byte at a time still has to be
        # complete by then.
        start_by = trio.current_time() + self.cfg.start_timeout_s
        try:
            while True:
                message: dict[str, Any] | None = None
                waiting_start = self.start is None and not self._failed
                deadline = trio.current_time() + self.cfg.stream_idle_timeout_s
                if waiting_start:
                    deadline = min(deadline, start_by)
                with trio.move_on_at(deadline):
                    message = await self._receive()
                if message is None:
                    if not self._failed:
                        self._protocol_error(link.LinkProtocolError(
                            link.ErrorCode.TIMEOUT,
                            f"no Start within {self.cfg.start_timeout_s:g} s" if waiting_start
                            else f"no data for {self.cfg.stream_idle_timeout_s:g} s",
                            fatal=True))
                    continue
                if message["type"] == "http.disconnect":
                    # The client went away: nobody can hear results any more.
                    scope.cancel()
                    return
                data = message.get("body", b"")
                self.bytes_in += len(data)
                if data and not self._failed:
                    self._handle_bytes(data)
                if not message.get("more_body", False):
                    if not self._failed:
                        try:
                            self.stream.close()
                        except link.LinkProtocolError as exc:
                            self._protocol_error(exc)
                    self._cut(end=True)
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
                self._cut(end=False)
            elif isinstance(item, link.Discard):
                self._discard(item.utterance)
            elif isinstance(item, link.Pause):
                self._on_pause(item.utterance)
            elif isinstance(item, link.End):
                self._cut(end=True)
            if self._failed:
                return

    def _on_start(self, start: link.Start) -> None:
        """Check what the client chose (language, domain) before any audio costs CPU;
        a refusal fails this stream alone, and its message shows the client's strings
        only cut and escaped (they end up in logs and in the gateway's error text)."""
        lang = start.lang_hint
        if lang and isinstance(self.app.backend, LanguageNormalizer):
            try:
                lang = self.app.backend.normalize_language(lang)
            except ValueError:
                self._protocol_error(link.LinkProtocolError(
                    link.ErrorCode.UNSUPPORTED_LANGUAGE,
                    f"lang_hint {shown(start.lang_hint)} is not a supported language",
                    fatal=True))
                return
        pool = self.app.backend.select_pool(lang, start.domain)
        if pool is None:
            self._protocol_error(link.LinkProtocolError(
                link.ErrorCode.BAD_START,
                f"no pool serves lang_hint={shown(start.lang_hint)} "
                f"domain={shown(start.domain)}", fatal=True))
            return
        self.start, self.pool, self.lang = start, pool, lang
        self.model = self._model()
        self.span = tracing.start_server_span(
            "asr.recognize", tracing.tracer("voxgate.asr"), start.traceparent,
            {"voxgate.flow_id": start.flow_id, "voxgate.asr_pool": pool,
             "voxgate.model": self.model, "voxgate.asr_link_codec": start.codec})
        if start.codec == "opus":
            self.decoder = OpusDecoder(16000, 1)
        log.info("stream start", extra=fields(
            flowId=start.flow_id, stage="asr_stream", sr=start.sr, lang=lang or "auto",
            pool=pool, model=self.model, asr_link_codec=start.codec))

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
        self.samples_in += len(pcm)
        self.last_seq = packet.seq
        pts = max(0, packet.pts_ms - 20 * item.lost)
        for action in self.assembler.add(pcm, pts):
            if isinstance(action, CapReached):
                self._cut(end=False)
            elif isinstance(action, PartialDue):
                self._partial_due.set()
        if self._spec is not None:
            self._drop_spec()  # the utterance grew: speech went on
        self._last_audio = trio.current_time()
        self._audio_came.set()
        self._check_flow()

    def _cut(self, *, end: bool) -> None:
        """Close the current utterance now, in arrival order, and queue its final.

        Cutting here rather than when the worker gets to it keeps utterances apart
        however far recognition lags behind the audio.
        """
        if self._ended:
            return
        self._ended = end
        utt = self.assembler.finish()
        spec = self._spec
        if spec is not None:
            if utt is not None and spec.job.utterance == utt.index \
                    and spec.samples == len(utt.audio) and not spec.job.stale \
                    and spec.options == self._options():
                self._spec = None
                self.app.scheduler.promote(spec.job)  # it is this utterance's final
            else:
                self._drop_spec()
                spec = None
        if utt is not None:
            self._queued_final_samples += len(utt.audio)
            self._covered_samples = 0
            self.app.scheduler.retire(self, utt.index)
        try:
            self._cuts_in.send_nowait(_Cut(utt, end, time.perf_counter(), spec))
        except trio.WouldBlock:
            # The stream fails (fatal BUSY), so the worker ends it once it has said
            # everything already queued.
            self._ended = self._end_lost = True
            if not self._failed:
                self._protocol_error(link.LinkProtocolError(
                    link.ErrorCode.BUSY, "too many finalize frames pending", fatal=True))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _discard(self, utterance: int | None) -> None:
        """(v3) Forget the current utterance (a false early start): its audio and its
        queued partials go, no final is decoded or sent, and its index is used up, as a
        ``Finalize`` would. A partial of it already running is dropped when it returns.
        A Discard that names another utterance (one already cut) changes nothing."""
        if self._ended or (utterance is not None and utterance != self.assembler.index):
            return
        index = self.assembler.index
        if self._spec is not None:
            self._drop_spec()
        if not self.assembler.discard():
            return
        self._covered_samples = 0
        self._discarded.add(index)
        self._last_partial.pop(index, None)
        self._last_partial_end.pop(index, None)
        self.app.scheduler.retire(self, index)
        self.app.metrics.discarded.inc()
        log.info("utterance discarded", extra=fields(
            flowId=self.flow_id, stage="asr_stream", utterance=index, model=self.model))
        self._check_flow()

    def _protocol_error(self, exc: link.LinkProtocolError) -> None:
        self.app.metrics.link_errors.labels(exc.code.value).inc()
        self._emit_error(exc.code, exc.message, exc.fatal)
        if exc.fatal and not self._failed:
            self._failed = True
            self._cut(end=True)

    def _emit_error(self, code: link.ErrorCode, message: str, fatal: bool) -> None:
        self.err_code = code.value
        log.warning("stream error: %s", message, extra=fields(
            flowId=self.flow_id, stage="asr_stream", err_code=code.value, lang=self.lang,
            model=self.model))
        self._emit(link.AsrEvent("error", self.flow_id, utterance=self.assembler.index,
                                 code=code.value, message=message, fatal=fatal))

    def _emit(self, event: link.AsrEvent) -> None:
        """Queue an event without waiting; a reader that stopped reading loses the stream."""
        try:
            self._events_in.send_nowait(event)
        except trio.WouldBlock:
            self._failed = True
            self._cut(end=True)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # -- backpressure ---------------------------------------------------------------

    def backlog_s(self) -> float:
        """Audio waiting for recognition: queued finals, plus the growing utterance's
        audio that no partial has covered yet."""
        uncovered = max(0, self.assembler.samples - self._covered_samples)
        return (self._queued_final_samples + uncovered) / SAMPLE_RATE

    def _check_flow(self) -> None:
        # v1 receivers reject unknown event types, so only v2 streams hear about flow.
        if self.start is None or self.start.version < 2:
            return
        backlog = self.backlog_s()
        threshold = self.cfg.behind_threshold_s
        if not self._behind and backlog > threshold:
            code = "BEHIND"
        elif self._behind and backlog < threshold / 2:
            code = "OK"
        else:
            return
        self._behind = code == "BEHIND"
        self.app.metrics.flow.labels(code).inc()
        self._emit(link.AsrEvent("flow", self.flow_id, utterance=self.assembler.index,
                                 code=code, message=f"{backlog:.1f} s of audio waiting for "
                                 f"recognition (threshold {threshold:g} s)"))

    # -- worker: finals, in the order their utterances were cut -----------------------

    async def _worker(self) -> None:
        while True:
            cut = await self._cuts_out.receive()
            if cut.utt is not None:
                try:
                    await self._final(cut.utt, cut.at, cut.spec)
                finally:
                    self._queued_final_samples -= len(cut.utt.audio)
                    self._close(cut.utt.index)
                self._check_flow()
            drained = self._cuts_out.statistics().current_buffer_used == 0
            if cut.end or (self._end_lost and drained):
                self._emit(link.AsrEvent("end", self.flow_id, utterance=self.assembler.index))
                return

    async def _final(self, utt: Utterance, started: float, spec: _Spec | None = None
                     ) -> None:
        if self.start is None:
            return
        result: Any = None
        if spec is not None:  # the decode at the pause is this final, done or under way
            with trio.CancelScope(shield=self.app.draining.is_set()):
                await spec.done.wait()
            result = spec.result
            self.app.metrics.speculative.labels("used" if result is not None
                                                else "failed").inc()
        if spec is not None and result is not None:
            job = spec.job
        else:
            job = Job("final", self.pool, utt.audio, key=self, options=self._options(),
                      utterance=utt.index)
        try:
            if result is None:
                with trio.CancelScope(shield=self.app.draining.is_set()):
                    result = await self.app.scheduler.submit(job)
        except SchedulerBusy:
            self.app.metrics.busy.inc()
            self._emit_error(link.ErrorCode.BUSY, "the engine queue is full", False)
            return
        except Exception as exc:
            log.exception("final failed", extra=fields(
                flowId=self.flow_id, stage="asr_final", err_code="INTERNAL",
                model=self.model))
            # Cut: an engine's message may quote this stream's own options at length.
            self._emit_error(link.ErrorCode.INTERNAL,
                             f"recognition failed: {shown(str(exc), 160)}", False)
            return
        assert isinstance(result, Recognition)
        latency_ms = (time.perf_counter() - started) * 1000
        self.app.metrics.latency.observe(latency_ms)
        if self.span is not None:
            tracing.record_job(self.span, "asr.final", submitted=job.submitted,
                               started=job.started, finished=job.finished,
                               now=trio.current_time(), attributes={
                                   "voxgate.utterance": utt.index, "voxgate.model": self.model,
                                   "voxgate.lang": result.lang,
                                   "voxgate.audio_ms": len(utt.audio) * 1000 // 16000})
        log.info("final", extra=fields(
            flowId=self.flow_id, stage="asr_final", utterance=utt.index, ns=len(utt.audio),
            lang=result.lang, model=self.model, latency_ms=round(latency_ms, 1)))
        self._close(utt.index)
        self._emit(link.AsrEvent("final", self.flow_id, utterance=utt.index, text=result.text,
                                 ts=(utt.start_ms, utt.end_ms), lang=result.lang))

    # -- speculative finals: decode at a pause, before the endpoint ---------------------

    async def _speculator(self, nursery: trio.Nursery) -> None:
        gap_s = self.cfg.speculative_final_ms / 1000
        if gap_s <= 0:
            return
        while True:
            await self._audio_came.wait()
            self._audio_came = trio.Event()
            # One wake-up per gap at most while audio flows, none per packet.
            while (deadline := self._last_audio + gap_s) > trio.current_time():
                await trio.sleep_until(deadline)
            self._speculate(nursery)

    def _on_pause(self, utterance: int | None) -> None:
        """(v4) The gateway says the open utterance's speech paused: decode its final
        now rather than after ``speculative_final_ms`` of silence on the link."""
        self.app.metrics.pauses.inc()
        if self.cfg.speculative_final_ms <= 0 or self._nursery is None or (
                utterance is not None and utterance != self.assembler.index):
            return
        self._speculate(self._nursery)

    def _speculate(self, nursery: trio.Nursery) -> None:
        """The audio paused: decode the open utterance's final now, unless it is too
        short for a partial, or a decode of exactly this audio is already asked for."""
        a = self.assembler
        if self.start is None or self._ended or self._failed \
                or a.samples * 1000 < self.cfg.min_partial_ms * SAMPLE_RATE:
            return
        spec = self._spec
        if spec is not None and spec.job.utterance == a.index and spec.samples == a.samples:
            return
        if spec is not None:
            self._drop_spec()
        utt = a.snapshot()
        if utt is None:
            return
        options = self._options()
        job = Job("final", self.pool, utt.audio, key=self, options=dict(options),
                  utterance=utt.index, speculative=True)
        self._spec = _Spec(job, a.samples, options)
        nursery.start_soon(self._run_spec, self._spec)

    async def _run_spec(self, spec: _Spec) -> None:
        try:
            result = await self.app.scheduler.submit(spec.job)
            if not spec.job.stale and isinstance(result, Recognition):
                spec.result = result
        except SchedulerBusy:
            pass  # the final is asked for as usual when its utterance is cut
        except Exception:
            log.warning("speculative final failed", exc_info=True, extra=fields(
                flowId=self.flow_id, stage="asr_final", err_code="INTERNAL",
                model=self.model))
        finally:
            spec.done.set()

    def _drop_spec(self) -> None:
        """The open utterance's speculative final no longer matches it."""
        spec, self._spec = self._spec, None
        if spec is None:
            return
        queued = self.app.scheduler.is_queued(spec.job)
        outcome = "withdrawn" if queued else \
            "failed" if spec.done.is_set() and spec.result is None else "wasted"
        self.app.metrics.speculative.labels(outcome).inc()
        self.app.scheduler.withdraw(spec.job)

    def _close(self, index: int) -> None:
        """Utterance ``index`` has its final (or its final failed): no partial of it
        may follow. Finals go out in cut order, so every earlier one is closed too."""
        self._closed_upto = max(self._closed_upto, index)
        self._discarded = {i for i in self._discarded if i > index}
        for d in (self._last_partial, self._last_partial_end):
            for i in [i for i in d if i <= index]:
                del d[i]

    def _open(self, index: int) -> bool:
        """A partial of utterance ``index`` may still be sent: its final is not out and
        it was not discarded (it may have been cut: its final can wait behind others)."""
        return index > self._closed_upto and index not in self._discarded

    def _options(self) -> dict[str, Any]:
        assert self.start is not None
        opts: dict[str, Any] = {}
        if self.lang:
            opts["lang"] = self.lang
        if self.start.hotwords:
            opts["prompt"] = hotword_prompt(self.start.hotwords)
        return opts

    # -- partials: ask whenever due; the scheduler paces them under load ----------------

    async def _partials(self, nursery: trio.Nursery) -> None:
        while True:
            await self._partial_due.wait()
            self._partial_due = trio.Event()
            if self.start is None:
                continue
            running = self._partial_job
            # One running partial per utterance: a newer one waits for it. But one of an
            # utterance already cut is dropped when it returns, so a fresh utterance's
            # first partial does not wait for it (it ran ahead of every first partial:
            # at 1 session, 1 utterance in 3 waited a whole partial's compute).
            if running is not None and not self.app.scheduler.is_queued(running) and (
                    running.utterance == self.assembler.index):
                self._due_while_running = True  # it asks again when it is done
                continue
            utt = self.assembler.snapshot()
            if utt is None:
                continue
            self.assembler.partial_requested()
            if self._policy_utt != utt.index:
                self._policy = self.app.backend.partial_policy(self.pool)
                self._policy_utt = utt.index
            options = self._options()
            if not self.assembler.shown:
                options["first"] = True  # the engine decodes it on a shorter window
            if self._policy is not None:
                # The policy says, per decode, whether to force its stable prefix or
                # re-check it unforced (asr.engine.StablePartials.prefix_for).
                options["prefix"] = self._policy.prefix_for(len(utt.audio))
            # A queued partial of this stream is replaced (made stale) by this fresher
            # one; one already running is never doubled.
            # Until the utterance shows a partial, its partials rank as first ones.
            job = Job("partial", self.pool, utt.audio, key=self, options=options,
                      utterance=utt.index, first=not self.assembler.shown)
            self._partial_job = job
            nursery.start_soon(self._partial, job, utt, self._policy)

    async def _partial(self, job: Job, utt: Utterance,
                       policy: PartialPolicy | None) -> None:
        try:
            result = await self.app.scheduler.submit(job)
        except SchedulerBusy:
            return
        except Exception:
            log.exception("partial failed", extra=fields(
                flowId=self.flow_id, stage="asr_partial", err_code="INTERNAL",
                model=self.model))
            return
        finally:
            if self._partial_job is job:
                self._partial_job = None
                if self._due_while_running:
                    self._due_while_running = False
                    self._partial_due.set()
        if job.stale or result is None or not self._open(utt.index):
            return  # replaced, discarded, or its final is out: the final replaces it
        assert isinstance(result, Recognition)
        current = utt.index == self.assembler.index
        if current:
            self._covered_samples = max(self._covered_samples, len(utt.audio))
            self._check_flow()
        # The policy of this partial's utterance (a cut one's, if the next began since).
        text = result.text if policy is None else policy.update(result)
        if not text or text == self._last_partial.get(utt.index):
            return
        if utt.end_ms <= self._last_partial_end.get(utt.index, -1):
            return  # never back in time: a later snapshot of it was shown already
        if current and utt.index not in self._last_partial:
            self.assembler.partial_shown()
        self._last_partial[utt.index] = text
        self._last_partial_end[utt.index] = utt.end_ms
        self._emit(link.AsrEvent("partial", self.flow_id, utterance=utt.index,
                                 text=text, ts=(utt.start_ms, utt.end_ms), lang=result.lang))

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
                body = link.encode_many(list(batch))
                self.bytes_out += len(body)
                await self._send({"type": "http.response.body", "body": body,
                                  "more_body": True})
        finally:
            self._sent.set()


def hotword_prompt(hotwords: tuple[str, ...], max_chars: int = MAX_PROMPT_CHARS) -> str:
    """The decoder prompt for a stream's hotwords: the last ones that fit in
    ``max_chars`` (whole words), joined by ", ".

    Whisper keeps only the last 223 prompt tokens, so what is cut here it would have
    dropped anyway; but the tokenizer had to encode all of it first, in the batch that
    other streams' jobs share. The longest list the link allows (100 x 64 characters)
    took 325-388 ms to encode in random CJK (35-47 ms in random Latin letters) on first
    use; cut to 1024 characters, 63 ms and 7 ms, and an English list of 927 characters
    already gives the full 223 tokens.
    """
    kept: list[str] = []
    used = 0
    for word in reversed(hotwords):
        used += len(word) + (2 if kept else 0)
        if used > max_chars:
            break
        kept.append(word)
    return ", ".join(reversed(kept))


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """A client's string as an error message may show it: escaped (``repr``, so no
    control character or quote gets through) and cut to ``limit`` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _content_length(scope: Scope) -> int | None:
    """The request's ``content-length``, or None when absent or not a number."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _content_type(scope: Scope) -> str:
    """Answer in the link version the client named (a v1 client gets v1's type)."""
    for name, value in scope.get("headers", []):
        if name == b"content-type" and value.decode("latin-1") in link.CONTENT_TYPES.values():
            return str(value.decode("latin-1"))
    return link.CONTENT_TYPE


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
    tracing.setup("voxgate-asr")  # only if the OTEL_* variables ask for it
    scheduler = scheduler or Scheduler(backend.run_batch, policy=cfg.scheduler_policy())
    describe = getattr(backend, "describe", None)
    if callable(describe):
        # Which pools' finals may degrade to a faster model (asr/backend.py).
        scheduler.core.degradable = degradable_pools(describe())
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
