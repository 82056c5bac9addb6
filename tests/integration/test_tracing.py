"""OpenTelemetry traces end to end: a session through the real gateway and an ASR
service (stand-in engine) on loopback, spans exported over OTLP/HTTP to a receiver on
127.0.0.1 that decodes each ExportTraceServiceRequest. The client's trace_id becomes the
trace id, the ack returns it, the ASR stream's client span is the parent of the ASR
service's server span (traceparent over the link), and log lines carry the ids."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from asr import tracing
from gateway.client import stream_audio
from gateway.logs import JsonFormatter
from stages.vad import VadModel
from tests import speech
from tests.integration.test_gateway import start_gateway
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class _Receiver(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            type(self).bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    _Receiver.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT",
                       f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "voxgate-test")
    tracing.shutdown()
    assert tracing.setup("voxgate-test")
    try:
        yield _Receiver.bodies
    finally:
        tracing.shutdown()
        server.shutdown()
        server.server_close()
        thread.join(5)


def _spans(bodies: list[bytes]) -> list[Any]:
    out = []
    for body in bodies:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                out.extend(ss.spans)
    return out


def _attr(span: Any, key: str) -> Any:
    for kv in span.attributes:
        if kv.key == key:
            return kv.value.string_value or kv.value.int_value
    return None


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []
        self.fmt = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.fmt.format(record)))


async def test_session_utterance_and_asr_spans_share_the_client_trace(
        nursery: trio.Nursery, tmp_path: Path, collector: list[bytes]) -> None:
    capture = _Capture()
    logging.getLogger("voxgate").addHandler(capture)
    logging.getLogger("voxgate").setLevel(logging.INFO)
    try:
        _, port, _ = await start_asr(nursery, StandInEngine())
        gw = await start_gateway(nursery, VadModel(), tmp_path, f"http://127.0.0.1:{port}")
        audio = np.concatenate([np.zeros(8000, np.int16), speech.goforward(),
                                np.zeros(16000, np.int16)]).astype(np.int16)
        with trio.fail_after(40):
            r = await stream_audio(gw.ws_url, audio, realtime=False,
                                   start={"flowId": "traced", "trace_id": TRACE_ID})
            assert r.of("ack")[0]["session"]["trace_id"] == TRACE_ID
            assert len(r.of("asr_final")) == 1
            gw.shutdown.set()
            await trio.sleep(0.5)  # the ASR stream's end
            await trio.to_thread.run_sync(tracing.force_flush)
    finally:
        logging.getLogger("voxgate").removeHandler(capture)
    spans = _spans(collector)
    by_name: dict[str, list[Any]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    (session,) = by_name["session"]
    assert session.trace_id.hex() == TRACE_ID and not session.parent_span_id
    assert _attr(session, "voxgate.flow_id") == "traced"
    assert _attr(session, "voxgate.end_reason") == "flush"
    utterances = by_name["utterance"]
    assert [_attr(u, "voxgate.utterance") for u in utterances] == [0]
    assert utterances[0].parent_span_id == session.span_id
    (client,) = by_name["asr.stream"]
    assert client.parent_span_id == session.span_id and client.kind == 3  # CLIENT
    (server,) = by_name["asr.recognize"]
    assert server.parent_span_id == client.span_id and server.kind == 2  # SERVER
    (job,) = by_name["asr.final"]  # the inference job, with its queue wait and compute
    assert job.parent_span_id == server.span_id and _attr(job, "voxgate.utterance") == 0
    waits = {kv.key: kv.value.double_value for kv in job.attributes
             if kv.key in ("voxgate.queue_wait_ms", "voxgate.compute_ms")}
    assert set(waits) == {"voxgate.queue_wait_ms", "voxgate.compute_ms"}
    assert all(v >= 0 for v in waits.values())
    assert job.start_time_unix_nano <= job.end_time_unix_nano
    (commit,) = by_name["archive.commit"]
    assert commit.parent_span_id == session.span_id
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
    traced = [ln for ln in capture.lines if ln.get("flowId") == "traced" and "trace_id" in ln]
    assert traced and all(ln["trace_id"] == TRACE_ID for ln in traced)
    # per stage where something happens, not only at the session's end
    said = {(ln.get("stage"), ln["msg"]) for ln in capture.lines if ln.get("flowId") == "traced"}
    assert ("endpoint", "utterance 0 started") in said
    assert ("endpoint", "utterance 0 ended") in said
    assert ("archive", "recording committed") in said


def test_off_without_the_otel_variables() -> None:
    assert not tracing.enabled_by({})
    assert not tracing.enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
                                   "OTEL_SDK_DISABLED": "true"})
    assert not tracing.enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
                                   "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.enabled_by({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/t"})
    assert tracing.enabled_by({"OTEL_TRACES_EXPORTER": "otlp"})


@pytest.mark.parametrize(("text", "want"), [
    (TRACE_ID, int(TRACE_ID, 16)), ("4bf92f35-77b3-4da6-a3ce-929d0e0e4736", int(TRACE_ID, 16)),
    ("abc", 0), ("z" * 32, 0), ("", 0)])
def test_parse_trace_id(text: str, want: int) -> None:
    assert tracing.parse_trace_id(text) == want


def _spans_by_service(bodies: list[bytes]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for body in bodies:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            name = next((kv.value.string_value for kv in rs.resource.attributes
                         if kv.key == "service.name"), "")
            for ss in rs.scope_spans:
                out.setdefault(name, []).extend(ss.spans)
    return out


async def test_gateway_and_asr_as_two_processes_give_one_connected_trace(
        nursery: trio.Nursery, tmp_path: Path, collector: list[bytes]) -> None:
    """The ASR service runs in its own OS process, exporting to the same receiver under
    its own service name; its server span joins the gateway's trace through the
    traceparent carried over the HTTP/2 link."""
    import os
    import signal
    import subprocess
    import sys

    from tests.integration.test_chaos_asr import ASR_MAIN, ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OTEL_SERVICE_NAME": "asr-process",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    proc = subprocess.Popen([sys.executable, "-c", ASR_MAIN, "0", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        port = int(await trio.to_thread.run_sync(proc.stdout.readline))
        gw = await start_gateway(nursery, VadModel(), tmp_path, f"http://127.0.0.1:{port}")
        audio = np.concatenate([np.zeros(8000, np.int16), speech.goforward(),
                                np.zeros(16000, np.int16)]).astype(np.int16)
        with trio.fail_after(40):
            r = await stream_audio(gw.ws_url, audio, realtime=False,
                                   start={"flowId": "two-proc", "trace_id": TRACE_ID})
            assert len(r.of("asr_final")) == 1
            gw.shutdown.set()
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(tracing.force_flush)
    finally:
        proc.send_signal(signal.SIGINT)  # atexit flushes the ASR process's exporter
        await trio.to_thread.run_sync(proc.wait, 20)
        if proc.stdout is not None:
            proc.stdout.close()
    by_service = _spans_by_service(collector)
    (server,) = [s for s in by_service.get("asr-process", []) if s.name == "asr.recognize"]
    (client,) = [s for s in by_service["voxgate-test"] if s.name == "asr.stream"]
    (session,) = [s for s in by_service["voxgate-test"] if s.name == "session"]
    assert server.trace_id.hex() == client.trace_id.hex() == session.trace_id.hex() == TRACE_ID
    assert server.parent_span_id == client.span_id
    assert client.parent_span_id == session.span_id
