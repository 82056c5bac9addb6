"""A session's spans: the session itself (a root span, with the client's ``trace_id``
when it gave a valid one), one per utterance, and the ASR stream (a client span whose
``traceparent`` goes in the link's ``Start`` and HTTP/2 headers, so the ASR service's
server span joins the same trace). Setup and export: ``asr.tracing``; with tracing off
every span here is the API's no-op span."""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from asr import tracing as core

TRACER = "voxgate.gateway"


class SessionTrace:
    """The spans of one session; ``close`` ends whatever is still open."""

    def __init__(self, flow_id: str, client_trace_id: str, *, tenant_id: str = "") -> None:
        self._tracer = core.tracer(TRACER)
        attrs: dict[str, Any] = {"voxgate.flow_id": flow_id}
        if tenant_id:
            attrs["voxgate.tenant_id"] = tenant_id
        self.span = core.start_root("session", self._tracer, client_trace_id, attrs)
        self._ctx = trace.set_span_in_context(self.span)
        self._utterances: dict[int, trace.Span] = {}
        self._asr: trace.Span | None = None
        self.client_trace_id = client_trace_id

    @property
    def trace_id(self) -> str:
        """The trace id the ack reports: the session span's, or the client's own
        when tracing is off."""
        return core.trace_id_hex(self.span) or self.client_trace_id

    def attach(self) -> object:
        """Make the session span current in this task (tasks started after inherit it,
        so their log lines carry its ids); give the token back to ``detach``."""
        return otel_context.attach(self._ctx)

    @staticmethod
    def detach(token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    def utterance_started(self, index: int) -> None:
        self._end_utterance(index, "replaced")
        self._utterances[index] = self._tracer.start_span(
            "utterance", context=self._ctx, attributes={"voxgate.utterance": index})

    def utterance_ended(self, index: int, *, cancelled: bool = False) -> None:
        self._end_utterance(index, "cancelled" if cancelled else "ended")

    def _end_utterance(self, index: int, how: str) -> None:
        span = self._utterances.pop(index, None)
        if span is not None:
            span.set_attribute("voxgate.utterance_end", how)
            span.end()

    def archive_commit(self, key: str) -> trace.Span:
        """A span for committing the recording (the caller ends it)."""
        return self._tracer.start_span("archive.commit", context=self._ctx,
                                       attributes={"voxgate.record_key": key})

    def asr_traceparent(self, pool: str) -> str:
        """The ASR stream's client span (opened on first use) as a ``traceparent``."""
        if self._asr is None:
            self._asr = self._tracer.start_span(
                "asr.stream", context=self._ctx, kind=SpanKind.CLIENT,
                attributes={"voxgate.asr_pool": pool})
        return core.traceparent(self._asr)

    def close(self, reason: str, *, failed: bool = False) -> None:
        for index in list(self._utterances):
            self._end_utterance(index, reason)
        if self._asr is not None:
            self._asr.end()
            self._asr = None
        self.span.set_attribute("voxgate.end_reason", reason)
        if failed:
            self.span.set_status(Status(StatusCode.ERROR, reason))
        self.span.end()
