"""OpenTelemetry traces for the gateway and the ASR service, configured only by the
standard ``OTEL_*`` environment variables, and off when none asks for them.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (or ``OTEL_TRACES_EXPORTER=otlp``), unless
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Spans go out over OTLP/HTTP
(protobuf) from the SDK's batch processor thread, so the event loop never waits on the
collector. Every other ``OTEL_*`` variable (service name, resource attributes, headers,
timeouts, sampler) is read by the SDK itself.

When tracing is off, ``tracer()`` is the API's no-op tracer: spans cost a few
attribute look-ups and nothing is exported. Both services import this module; the
process-wide provider is set up once (``voxgate serve`` runs both in one process).
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

_forced_trace_id: contextvars.ContextVar[int] = contextvars.ContextVar(
    "voxgate_forced_trace_id", default=0)
_provider: Any = None  # opentelemetry.sdk.trace.TracerProvider once set up


def enabled_by(env: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables in ``env`` ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return exporter == "otlp" or bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                                      or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Start exporting spans if the environment asks for it (idempotent: the first
    caller's service name stands, unless ``OTEL_SERVICE_NAME`` is set).

    Returns:
        Whether tracing is on.
    """
    global _provider
    if _provider is not None:
        return True
    env = os.environ if env is None else env
    if not enabled_by(env):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class _ClientTraceIds(RandomIdGenerator):
        """A root span takes the client's trace id when the session gave one."""

        def generate_trace_id(self) -> int:
            forced = _forced_trace_id.get()
            return forced if forced else super().generate_trace_id()

    attrs = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attrs), id_generator=_ClientTraceIds())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    return True


def force_flush(timeout_s: float = 5.0) -> None:
    """Export the spans ended so far (tests, and before a process exits)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    """Flush and stop exporting; a later ``setup`` starts afresh."""
    global _provider
    if _provider is not None:
        provider, _provider = _provider, None
        provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    """The tracer for ``name``: the exporting one, or a no-op one when tracing is off."""
    if _provider is None:
        return trace.NoOpTracer()
    return _provider.get_tracer(name)  # type: ignore[no-any-return]


def parse_trace_id(text: str) -> int:
    """A client's ``trace_id`` as an OpenTelemetry trace id: 32 hex digits (a UUID's
    dashes are dropped), not all zero; 0 when it is not one."""
    digits = text.strip().replace("-", "").lower()
    if len(digits) != 32:
        return 0
    try:
        return int(digits, 16)
    except ValueError:
        return 0


def start_root(name: str, tracer_: trace.Tracer, trace_id: str = "",
               attributes: Mapping[str, Any] | None = None) -> trace.Span:
    """A span that starts a trace, with the client's trace id when it is a valid one
    (a client-given id that is not gets recorded as ``voxgate.client_trace_id``)."""
    forced = parse_trace_id(trace_id)
    attrs = dict(attributes or {})
    if trace_id and not forced:
        attrs["voxgate.client_trace_id"] = trace_id
    token = _forced_trace_id.set(forced)
    try:
        return tracer_.start_span(name, context=Context(), attributes=attrs)
    finally:
        _forced_trace_id.reset(token)


def traceparent(span: trace.Span) -> str:
    """The W3C ``traceparent`` of ``span`` ("" when it is not a recorded span)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def trace_id_hex(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def start_server_span(name: str, tracer_: trace.Tracer, parent_traceparent: str,
                      attributes: Mapping[str, Any] | None = None) -> trace.Span:
    """A server span whose parent is the caller's ``traceparent`` (a root span when
    there is none or it does not parse)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = (TraceContextTextMapPropagator().extract({"traceparent": parent_traceparent})
           if parent_traceparent else Context())
    return tracer_.start_span(name, context=ctx, kind=SpanKind.SERVER,
                              attributes=dict(attributes or {}))


def record_job(parent: trace.Span, name: str, *, submitted: float, started: float,
               finished: float, now: float, attributes: Mapping[str, Any]) -> None:
    """A finished child span of ``parent`` for one inference job, from the scheduler's
    times (``now`` is that clock's current reading): queue wait and compute become
    attributes. A no-op when ``parent`` is not recording (tracing off)."""
    if not parent.is_recording():
        return
    wall_now = time.time_ns()

    def wall(t: float) -> int:
        return wall_now - int((now - t) * 1e9)

    attrs = {**attributes, "voxgate.queue_wait_ms": round((started - submitted) * 1000, 1),
             "voxgate.compute_ms": round((finished - started) * 1000, 1)}
    span = tracer("voxgate.asr").start_span(
        name, context=trace.set_span_in_context(parent), start_time=wall(submitted),
        attributes=attrs)
    span.end(end_time=wall(finished))


def current_ids() -> tuple[str, str]:
    """(trace_id, span_id) of the current span as hex, or ("", "") for log lines."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
