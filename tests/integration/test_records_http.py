"""Recordings over HTTP are private: ``GatewayHttpApp`` in hypercorn on 127.0.0.1, asked
with raw HTTP/1.1 requests (the exact bytes of the path matter here, and an HTTP client
library would normalise them). Without a valid signature every ``/records/`` request is
a 403, the same for a recording that exists and one that does not; a signed URL serves
the recording with ranges as before; ``/metrics`` can move to an app of its own. And
the whole gateway with JWT: a tenant's session records under the tenant's folder and
returns a signed record_url that works, where the bare path does not."""

from __future__ import annotations

import functools
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jwt
import numpy as np
import pytest
import soundfile
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hyper_serve

from gateway.client import stream_audio
from gateway.httpapp import GatewayHttpApp, metrics_app
from gateway.records import LocalStore, tenant_part
from gateway.signing import UrlSigner
from stages.vad import VadModel
from tests import speech
from tests.integration.test_gateway import start_gateway
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(30)

KEY = b"records-http-test-key-0123456789abcdef"
METRICS = b"# TYPE voxgate_test gauge\nvoxgate_test 1.0\n"
RECORDING = bytes(range(256)) * 8  # 2048 bytes, each offset recognisable


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def request(port: int, method: str, target: str,
                  headers: dict[str, str] | None = None) -> Response:
    """One HTTP/1.1 request with ``target`` sent byte for byte."""
    lines = [f"{method} {target} HTTP/1.1", "host: 127.0.0.1", "connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items()), "", ""]
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all("\r\n".join(lines).encode("latin-1"))
            data = b""
            async for chunk in stream:
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {k.strip().lower(): v.strip()
              for k, _, v in (h.partition(":") for h in header_lines)}
    return Response(int(status_line.split()[1]), parsed, body)


async def serve_app(nursery: trio.Nursery, app: Callable[..., Any]) -> tuple[int, trio.Event]:
    """``app`` in hypercorn on 127.0.0.1 port 0, as ``gateway.server`` serves it."""
    hc = Config()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    stop = trio.Event()
    binds = await nursery.start(functools.partial(
        hyper_serve, cast(Any, app), hc, shutdown_trigger=stop.wait))
    return int(binds[0].rsplit(":", 1)[1]), stop


@dataclass
class Http:
    port: int
    signer: UrlSigner
    root: Path


@pytest.fixture
async def http(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Http]:
    store = LocalStore(tmp_path / "records")
    for flow, tenant in (("f1", "acme"), ("f2", "acme"), ("f1", "globex"), ("plain", "")):
        w = await store.open(flow, tenant)
        await w.write(RECORDING)
        await w.commit()
    signer = UrlSigner(KEY, 60)
    app = GatewayHttpApp(store=store, metrics=lambda: METRICS, ready=lambda: True,
                         signer=signer, serve_metrics=False)
    port, stop = await serve_app(nursery, app)
    yield Http(port, signer, tmp_path / "records")
    stop.set()


def query_of(url: str) -> str:
    return url.partition("?")[2]


async def test_unsigned_requests_are_refused_alike_for_present_and_missing(
        http: Http) -> None:
    answers = []
    for target in ("/records/acme/f1.ogg", "/records/acme/nothing.ogg", "/records/plain.ogg",
                   "/records/nothing.ogg", "/records/../etc/passwd", "/records/"):
        for method in ("GET", "HEAD"):
            r = await request(http.port, method, target)
            assert r.status == 403, (method, target)
            assert r.headers["cache-control"] == "no-store"
            if method == "GET":
                assert r.json() == {"error": "FORBIDDEN"}
            else:
                assert r.body == b""
            answers.append((method, r.headers["content-length"], r.body))
    # HEAD no longer tells whether a flowId exists: identical answers
    assert len({a for a in answers if a[0] == "HEAD"}) == 1
    assert len({a for a in answers if a[0] == "GET"}) == 1


async def test_a_signed_url_serves_the_recording_with_ranges(http: Http) -> None:
    url = http.signer.sign("/records/acme/f1.ogg")
    r = await request(http.port, "GET", url)
    assert r.status == 200 and r.body == RECORDING
    assert r.headers["content-type"] == "audio/ogg" and r.headers["accept-ranges"] == "bytes"
    r = await request(http.port, "HEAD", url)
    assert r.status == 200 and r.body == b""
    assert r.headers["content-length"] == str(len(RECORDING))
    r = await request(http.port, "GET", url, {"range": "bytes=100-199"})
    assert r.status == 206 and r.body == RECORDING[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(RECORDING)}"
    r = await request(http.port, "GET", url, {"range": "bytes=-10"})
    assert r.status == 206 and r.body == RECORDING[-10:]
    r = await request(http.port, "GET", url, {"range": "bytes=5000-"})
    assert r.status == 416
    plain = await request(http.port, "GET", http.signer.sign("/records/plain.ogg"))
    assert plain.status == 200 and plain.body == RECORDING


async def test_a_signed_url_to_a_missing_or_unsafe_key_is_404(http: Http) -> None:
    for path in ("/records/acme/nothing.ogg", "/records/initech/f1.ogg",
                 "/records/acme/../plain.ogg", "/records/a/b/f1.ogg", "/records/"):
        for method in ("GET", "HEAD"):
            r = await request(http.port, method, http.signer.sign(path))
            assert r.status == 404, (method, path)


async def test_expired_and_foreign_signatures_are_refused(http: Http) -> None:
    expired = http.signer.sign("/records/acme/f1.ogg", now=time.time() - 61)
    assert (await request(http.port, "GET", expired)).status == 403
    other_key = UrlSigner(b"x" * 32, 60).sign("/records/acme/f1.ogg")
    assert (await request(http.port, "GET", other_key)).status == 403
    # the signature of acme's f2, or of globex's f1, opens nothing else
    for signed, asked in (("/records/acme/f2.ogg", "/records/acme/f1.ogg"),
                          ("/records/globex/f1.ogg", "/records/acme/f1.ogg"),
                          ("/records/plain.ogg", "/records/acme/f1.ogg")):
        q = query_of(http.signer.sign(signed))
        for method in ("GET", "HEAD"):
            assert (await request(http.port, method, f"{asked}?{q}")).status == 403
        assert (await request(http.port, "GET", f"{signed}?{q}")).status == 200


async def test_respelled_paths_and_queries_are_refused(http: Http) -> None:
    """The signature covers the bytes the client sends: a percent-encoded, dotted or
    doubled-slash spelling of the signed path, or a doctored query, gets a 403 (what the
    server would have decoded it to is never looked at)."""
    q = query_of(http.signer.sign("/records/acme/f1.ogg"))
    exp, sig = (p.split("=", 1)[1] for p in q.split("&"))
    for target in (
        f"/records/acme%2Ff1.ogg?{q}", f"/records/acme%2ff1.ogg?{q}",
        f"/records/%61cme/f1.ogg?{q}", f"/records//acme/f1.ogg?{q}",
        f"/records/acme//f1.ogg?{q}", f"//records/acme/f1.ogg?{q}",
        f"/records/globex/../acme/f1.ogg?{q}", f"/records/./acme/f1.ogg?{q}",
        f"/records/acme/f1.ogg/?{q}", f"/Records/acme/f1.ogg?{q}",
        f"/records/acme/f1.ogg?{q}&exp={exp}", f"/records/acme/f1.ogg?{q}&sig={sig}",
        f"/records/acme/f1.ogg?{q}&download=1", f"/records/acme/f1.ogg?exp={exp}",
        f"/records/acme/f1.ogg?sig={sig}", f"/records/acme/f1.ogg?exp={int(exp) + 1}&sig={sig}",
        f"/records/acme/f1.ogg?exp=0{exp}&sig={sig}",
        f"/records/acme/f1.ogg?exp={exp}&sig={sig[:-1]}",
        f"/records/acme/f1.ogg?exp={exp}&sig=%{ord(sig[0]):02X}{sig[1:]}",
    ):
        r = await request(http.port, "GET", target)
        # (outside /records/ nothing matches at all)
        assert r.status == (403 if target.startswith("/records/") else 404), target
    assert (await request(http.port, "GET", f"/records/acme/f1.ogg?{q}")).status == 200
    assert (await request(http.port, "GET", f"/records/acme/f1.ogg?sig={sig}&exp={exp}")
            ).status == 200


async def test_metrics_are_not_on_the_records_port_but_on_their_own(
        http: Http, nursery: trio.Nursery) -> None:
    assert (await request(http.port, "GET", "/metrics")).status == 404
    assert (await request(http.port, "GET", "/healthz")).status == 200
    port, stop = await serve_app(nursery, metrics_app(lambda: METRICS))
    r = await request(port, "GET", "/metrics")
    assert r.status == 200 and r.body == METRICS
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert (await request(port, "GET", "/healthz")).json() == {"status": "ok"}
    head = await request(port, "HEAD", "/metrics")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(METRICS))
    for target in ("/", "/readyz", "/records/plain.ogg", http.signer.sign("/records/plain.ogg"),
                   "/web/app.js", "/metrics/"):
        assert (await request(port, "GET", target)).status == 404, target
    assert (await request(port, "POST", "/metrics")).status == 405
    stop.set()


async def test_without_a_signer_the_old_behaviour_is_kept(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """Callers that predate signed URLs (serve_metrics defaults to True, signer to None)."""
    store = LocalStore(tmp_path)
    w = await store.open("old")
    await w.write(RECORDING)
    await w.commit()
    port, stop = await serve_app(nursery, GatewayHttpApp(
        store=store, metrics=lambda: METRICS, ready=lambda: True))
    assert (await request(port, "GET", "/records/old.ogg")).body == RECORDING
    assert (await request(port, "GET", "/records/gone.ogg")).status == 404
    assert (await request(port, "GET", "/records/..%2Fold.ogg")).status == 404
    assert (await request(port, "GET", "/metrics")).body == METRICS
    stop.set()


JWT_SECRET = "records-http-jwt-secret-0123456789abcdef"


def token(**claims: Any) -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, JWT_SECRET, algorithm="HS256")


async def test_a_tenants_session_records_under_its_folder_behind_a_signed_url(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    _, asr_port, asr_stop = await start_asr(nursery, StandInEngine())
    g = await start_gateway(nursery, VadModel(), tmp_path, f"http://127.0.0.1:{asr_port}",
                            auth_jwt_secret=JWT_SECRET, records_url_key=KEY.decode(),
                            records_url_ttl_s=120)
    port = int(g.http.rsplit(":", 1)[1])
    silence = np.zeros(8000, dtype=np.int16)
    audio = np.concatenate([silence, speech.goforward(), silence]).astype(np.int16)
    urls = {}
    for claims in ({"sub": "alice", "tenant": "acme"}, {"sub": "bob@globex.example"}):
        r = await stream_audio(g.ws_url, audio, realtime=False, start={
            "flowId": "e2e-rec", "auth": {"token": token(**claims)}})
        assert not r.of("error"), r.of("error")
        (rec,) = r.of("record_url")
        assert rec["url"].startswith(g.http)
        urls[claims.get("tenant", claims["sub"])] = rec["url"].removeprefix(g.http)
    # the same flowId, two tenants: two recordings, each in its tenant's folder
    acme, globex = urls["acme"], urls["bob@globex.example"]
    folder = tenant_part("bob@globex.example")
    assert acme.startswith("/records/acme/e2e-rec.ogg?exp=")
    assert globex.startswith(f"/records/{folder}/e2e-rec.ogg?exp=")
    assert folder.startswith("t-")  # "@" is not safe in a path: hashed
    signer = UrlSigner(KEY, 120)
    for url in (acme, globex):
        path, _, query = url.partition("?")
        assert signer.verify(path, query.encode())
        assert int(query.split("&")[0].removeprefix("exp=")) <= time.time() + 120
        r = await request(port, "GET", url)
        assert r.status == 200 and r.headers["content-type"] == "audio/ogg"
        assert (g.archive / path.removeprefix("/records/")).read_bytes() == r.body
        decoded, sr = soundfile.read(io.BytesIO(r.body), dtype="int16")
        assert sr == 16000 and abs(len(decoded) - len(audio)) <= 320
        for method in ("GET", "HEAD"):
            assert (await request(port, method, path)).status == 403
    # acme's signature opens neither globex's recording nor a flat one
    q = acme.partition("?")[2]
    assert (await request(port, "GET", f"/records/{folder}/e2e-rec.ogg?{q}")).status == 403
    assert (await request(port, "GET", f"/records/e2e-rec.ogg?{q}")).status == 403
    g.shutdown.set()
    asr_stop.set()
