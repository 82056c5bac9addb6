"""The gateway's public side over TLS (issue 12, finding 4): with TLS_CERT_FILE and
TLS_KEY_FILE it serves wss:// and https:// itself. Certificates come from
``tests/certs.py`` (the openssl command line); the clients verify the server against
the test CA, as a real client would against its trust store."""

from __future__ import annotations

import contextlib
import functools
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from gateway.client import connect
from gateway.config import GatewayConfig
from gateway.server import GatewayPorts, serve
from gateway.vadservice import VadService
from stages.vad import VadModel
from tests.certs import Pki, make_pki
from tests.contract import check_event
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


@pytest.fixture
async def tls_gw(nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, pki: Pki
                 ) -> AsyncIterator[GatewayPorts]:
    _, asr_port, asr_stop = await start_asr(nursery, StandInEngine())
    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "archive_fallback_dir": str(tmp_path / "fallback"),
        "asr_urls": f"http://127.0.0.1:{asr_port}", "flush_idle_s": 1.0,
        "tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key),
        "start_timeout_s": 2.0})
    shutdown = trio.Event()
    ports = GatewayPorts()
    await nursery.start(functools.partial(serve, cfg, shutdown=shutdown,
                                          vad=VadService(vad_model), ports=ports))
    assert ports.tls
    yield ports
    shutdown.set()
    asr_stop.set()


async def test_wss_session_and_its_recording_over_https(tls_gw: GatewayPorts,
                                                        pki: Pki) -> None:
    ctx = client_context(pki.ca_cert)
    events: list[dict[str, Any]] = []
    audio = np.zeros(16000, dtype=np.int16).tobytes()
    url = f"wss://127.0.0.1:{tls_gw.ws}/ws/stream"
    async with connect(url, ssl_context=ctx) as ws:
        await ws.send_message(json.dumps({"type": "start", "flowId": "tls-1"}))
        for i in range(0, len(audio), 6400):
            await ws.send_message(audio[i:i + 6400])
        await ws.send_message(json.dumps({"type": "flush"}))
        with trio.fail_after(20):
            while not events or events[-1]["type"] != "end":
                events.append(json.loads(await ws.get_message()))
    for e in events:
        check_event(e)
    assert events[0]["type"] == "ack" and not [e for e in events if e["type"] == "error"]
    (record,) = [e for e in events if e["type"] == "record_url"]
    base = f"https://127.0.0.1:{tls_gw.http}/"
    assert record["url"].startswith(base), record["url"]
    async with httpx.AsyncClient(verify=ctx) as client:
        r = await client.get(record["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "audio/ogg"
        assert r.content[:4] == b"OggS" and len(r.content) == record["bytes"]
        page = await client.get(base)  # the browser page: it picks wss:// on https
        assert page.status_code == 200
        assert f'content="{tls_gw.ws}"' in page.text
        assert (await client.get(base + "healthz")).status_code == 200


async def test_plaintext_and_untrusted_clients_do_not_get_in(tls_gw: GatewayPorts,
                                                             pki: Pki) -> None:
    # ws:// to the wss:// port: the server drops the socket at once (no upgrade) ...
    stream = await trio.open_tcp_stream("127.0.0.1", tls_gw.ws)
    await stream.send_all(b"GET /ws/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
    got = b""
    with trio.fail_after(1):  # well before the 2 s handshake deadline
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(1024):
                got += data
    await stream.aclose()
    assert b"HTTP/1.1" not in got  # at most a TLS alert
    # A client that trusts another CA refuses the server's certificate.
    # (trio-websocket's client leaks its socket when a handshake fails: plain TLS here)
    tls = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", tls_gw.ws, ssl_context=client_context(pki.rogue_ca_cert))
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
        await tls.do_handshake()
    await trio.aclose_forcefully(tls)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    # http:// to the https:// port gets no page.
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(f"http://127.0.0.1:{tls_gw.http}/healthz", timeout=5)
    # None of that holds a connection: a trusted client still streams.
    async with connect(f"wss://127.0.0.1:{tls_gw.ws}/ws/stream",
                       ssl_context=client_context(pki.ca_cert)) as ws:
        await ws.send_message(json.dumps({"type": "ping", "id": "x"}))
        with trio.fail_after(5):
            pong = json.loads(await ws.get_message())
    assert (pong["type"], pong["id"]) == ("pong", "x")


async def test_plain_tcp_to_the_tls_port_is_dropped_at_the_handshake_deadline(
        tls_gw: GatewayPorts) -> None:
    """A socket that never starts TLS is closed at START_TIMEOUT_S (2 s here)."""
    stream = await trio.open_tcp_stream("127.0.0.1", tls_gw.ws)
    t0 = trio.current_time()
    with trio.fail_after(5):
        data = await stream.receive_some(1024)
    assert data == b"" and 1.5 <= trio.current_time() - t0 <= 3.5
    await stream.aclose()


def test_an_unreadable_certificate_stops_the_start(tmp_path: Path, pki: Pki) -> None:
    from gateway.server import server_ssl_context

    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    cfg = GatewayConfig(tls_cert_file=str(bad), tls_key_file=str(pki.server_key))
    with pytest.raises(ValueError, match="TLS_CERT_FILE"):
        server_ssl_context(cfg)
    assert server_ssl_context(GatewayConfig()) is None
    good = server_ssl_context(GatewayConfig(tls_cert_file=str(pki.server_cert),
                                            tls_key_file=str(pki.server_key)))
    assert good is not None and good.minimum_version >= ssl.TLSVersion.TLSv1_2
