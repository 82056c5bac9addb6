"""The gateway's Prometheus metrics (names from the design), in a registry of its own."""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .protocol import EVENT_TYPES, REJECT_CODES, ErrorCode

LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, math.inf)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, ...: a gateway's CPU
        # per session is the number capacity planning runs on.
        ProcessCollector(registry=r)
        self.active_sessions = Gauge("orchestrator_active_sessions", "sessions in progress",
                                     registry=r)
        self.sessions = Counter("orchestrator_sessions", "sessions accepted", registry=r)
        self.rejected = Counter("orchestrator_rejected_sessions", "sessions refused",
                                ["code"], registry=r)
        self.ingress_bytes = Counter("ingress_bytes", "audio bytes accepted from clients",
                                     registry=r)
        self.egress_events = Counter("egress_events", "events sent to clients", ["type"],
                                     registry=r)
        self.errors = Counter("client_errors", "error events sent", ["code"], registry=r)
        self.idle_deferred = Counter(
            "idle_flush_deferred", "idle timeouts not taken because client data was "
            "still waiting (a starved event loop)", registry=r)
        self.pcm_to_opus_fail = Counter("pcm_to_opus_fail", "frames sent as PCM because "
                                        "Opus encoding failed", registry=r)
        # One batched VAD tick covers every session's pending windows.
        self.dn_latency = Histogram("dn_latency_ms", "denoise of one 20 ms frame, ms",
                                    buckets=LATENCY_BUCKETS_MS, registry=r)
        self.lid_latency = Histogram(
            "lid_latency_ms", "one language-ID request to the ASR service, ms",
            buckets=(25, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, math.inf),
            registry=r)
        self.vad_latency = Histogram("vad_latency_ms", "one batched VAD tick, ms",
                                     buckets=LATENCY_BUCKETS_MS, registry=r)
        self.compress_latency = Histogram("compress_latency_ms",
                                          "archive encode of one Ogg page "
                                          "(about 1 s of audio), ms",
                                          buckets=LATENCY_BUCKETS_MS, registry=r)
        self.first_partial = Histogram(
            "first_partial_latency_ms", "first speech frame sent to first partial, ms",
            buckets=(100, 200, 300, 400, 600, 800, 1000, 1500, 2000, 3000, math.inf),
            registry=r)
        self.final_latency = Histogram(
            "final_latency_ms", "endpoint to final, ms",
            buckets=(100, 200, 300, 400, 600, 800, 1000, 1500, 2000, 3000, math.inf),
            registry=r)

        # Every label value exists from the start at 0, so rate() and increase() see the
        # first rejection, error or event instead of a series appearing at 1.
        for code in REJECT_CODES:
            self.rejected.labels(code.value)
        for ec in ErrorCode:
            self.errors.labels(ec.value)
        for kind in EVENT_TYPES:
            self.egress_events.labels(kind)

    def gauge_fn(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        Gauge(name, doc, registry=self.registry).set_function(fn)

    def counter_fn(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        """A counter whose value another object keeps (exposed as ``<name>_total``)."""
        self.registry.register(_FnCounter(name, doc, fn))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FnCounter(Collector):
    def __init__(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        self.name, self.doc, self.fn = name, doc, fn

    def collect(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.doc, value=self.fn())]
