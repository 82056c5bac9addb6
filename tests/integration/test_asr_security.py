"""The ASR service's listener and Start validation against a hostile peer (issue 12,
findings 3 and 4): mTLS, the bearer token, bounded idle streams and ``/v1/lid``, coded
refusals of client-chosen Start fields, and a poisoned job that fails alone in its batch
with the real Whisper engine.

Real sockets on 127.0.0.1 port 0, certificates made by the ``openssl`` command line
(tests/certs.py). The stand-in engine answers with the duration it heard.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from asr import link
from asr.backend import Recognition
from asr.engine import PoolSpec, UnsupportedLanguage, WhisperBackend
from asr.main import load_config
from asr.scheduler import Job
from asr.server import AsrApp, AsrServerConfig, serve
from asr.whisper.engine import WhisperEngine
from asr.whisper.normalize import normalize_english
from gateway.h2client import H2Connection, connect
from tests import speech
from tests.certs import Pki, make_pki
from tests.linkclient import LinkStream, audio_frames, open_recognize, opus_packets
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

GOFORWARD = speech.goforward()
TOKEN = "k" * 20 + "-link-token-0123456789"  # 42 bytes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client_ctx(pki: Pki, cert: Path | None = None, key: Path | None = None
                ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _one_final(conn: H2Connection, flow_id: str, **start: object) -> list[link.AsrEvent]:
    ls = await open_recognize(conn, link.Start(flow_id=flow_id, **start))  # type: ignore[arg-type]
    await ls.send(*audio_frames(opus_packets(GOFORWARD[:8000])), link.End())
    await ls.stream.end()
    return await ls.rest()


# -- mTLS ------------------------------------------------------------------------------


@pytest.fixture
async def mtls_server(nursery: trio.Nursery, pki: Pki) -> AsyncIterator[tuple[AsrApp, int]]:
    app, port, shutdown = await start_asr(
        nursery, StandInEngine(), certfile=str(pki.server_cert), keyfile=str(pki.server_key),
        client_ca_file=str(pki.ca_cert))
    yield app, port
    shutdown.set()


async def _handshake_error(port: int, ctx: ssl.SSLContext) -> str:
    """Handshake with ``ctx`` and read: the TLS error the server refused it with.

    In TLS 1.3 the client's side of the handshake completes before the server has
    checked the client's certificate; the refusal then shows on the first read, before
    any application byte: as the server's alert, or as an EOF when the server closed the
    socket before its alert went out (trio's SSLStream does not flush it).
    """
    ctx.set_alpn_protocols(["h2"])
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
    try:
        with trio.fail_after(10):
            await tls.do_handshake()
            data = await tls.receive_some()
    except trio.BrokenResourceError as exc:
        assert isinstance(exc.__cause__, ssl.SSLError), exc.__cause__
        return str(exc.__cause__)
    finally:
        with trio.move_on_after(1):
            await tcp.aclose()
    raise AssertionError(f"the server accepted the handshake and sent {data!r}")


async def test_mtls_admits_the_right_client_certificate(mtls_server: tuple[AsrApp, int],
                                                        pki: Pki) -> None:
    _, port = mtls_server
    ctx = _client_ctx(pki, pki.client_cert, pki.client_key)
    async with connect("127.0.0.1", port, ssl_context=ctx) as conn:
        events = await _one_final(conn, "mtls")
    assert [e.type for e in events][-2:] == ["final", "end"]
    assert events[-2].text.startswith("0.50s")


async def test_mtls_probes_over_http1_present_the_client_certificate(
        mtls_server: tuple[AsrApp, int], pki: Pki) -> None:
    """The chart's exec probes speak HTTP/1.1 over TLS with the client certificate."""
    _, port = mtls_server
    url = f"https://127.0.0.1:{port}"
    ctx = _client_ctx(pki, pki.client_cert, pki.client_key)
    async with httpx.AsyncClient(base_url=url, verify=ctx) as client:
        for path in ("/healthz", "/readyz"):
            assert (await client.get(path)).status_code == 200
    async with httpx.AsyncClient(base_url=url, verify=_client_ctx(pki)) as client:
        with pytest.raises(httpx.TransportError):
            await client.get("/healthz")


@pytest.mark.parametrize("who", ["no certificate", "a rogue CA's certificate"])
async def test_mtls_refuses_the_handshake_without_the_cas_certificate(
        mtls_server: tuple[AsrApp, int], pki: Pki, who: str) -> None:
    app, port = mtls_server
    if who == "no certificate":
        ctx = _client_ctx(pki)
        alert = "CERTIFICATE_REQUIRED"
    else:
        ctx = _client_ctx(pki, pki.rogue_client_cert, pki.rogue_client_key)
        alert = "UNKNOWN_CA"
    reason = await _handshake_error(port, ctx)
    assert alert in reason.upper() or "UNEXPECTED_EOF" in reason.upper(), reason
    assert app.metrics.streams._value.get() == 0  # no request reached the app
    # The listener is still there for the right client.
    good = _client_ctx(pki, pki.client_cert, pki.client_key)
    async with connect("127.0.0.1", port, ssl_context=good) as conn:
        assert [e.type for e in await _one_final(conn, "after")][-1] == "end"


async def test_a_silent_socket_is_dropped_at_the_handshake_timeout(
        nursery: trio.Nursery, pki: Pki) -> None:
    _, port, shutdown = await start_asr(
        nursery, StandInEngine(), certfile=str(pki.server_cert),
        keyfile=str(pki.server_key), tls_handshake_timeout_s=0.3)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    t0 = trio.current_time()
    with trio.fail_after(5):
        assert await tcp.receive_some() == b""  # closed by the server, unasked
    assert trio.current_time() - t0 < 2.0
    await tcp.aclose()
    shutdown.set()


def test_mtls_needs_tls_and_the_config_hides_the_token() -> None:
    with pytest.raises(ValueError, match="client_ca_file"):
        AsrServerConfig(client_ca_file="/ca.pem")
    with pytest.raises(ValueError, match="together"):
        AsrServerConfig(certfile="/c.pem")
    with pytest.raises(ValueError, match="32 bytes"):
        AsrServerConfig(auth_token="short")
    cfg = AsrServerConfig(auth_token=TOKEN)
    assert TOKEN not in repr(cfg)


def test_voxgate_asr_reads_the_token_from_asr_token(tmp_path: Path) -> None:
    cfg, *_ = load_config(None, env={"ASR_TOKEN": TOKEN})
    assert cfg.auth_token == TOKEN
    assert load_config(None, env={"ASR_TOKEN": ""})[0].auth_token is None
    toml = tmp_path / "asr.toml"
    toml.write_text(f'[server]\nauth_token = "{"f" * 40}"\nclient_ca_file = "/ca.pem"\n'
                    'certfile = "/c.pem"\nkeyfile = "/k.pem"\n')
    cfg, *_ = load_config(toml, env={"ASR_TOKEN": TOKEN})
    assert cfg.auth_token == "f" * 40  # the file wins over the environment
    assert cfg.client_ca_file == "/ca.pem"


# -- bearer token ------------------------------------------------------------------------


@pytest.fixture
async def token_server(nursery: trio.Nursery) -> AsyncIterator[tuple[AsrApp, int]]:
    app, port, shutdown = await start_asr(nursery, StandInEngine(), auth_token=TOKEN)
    yield app, port
    shutdown.set()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}",
                                           f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"])
async def test_recognize_without_the_token_gets_401_before_its_body(
        token_server: tuple[AsrApp, int], authorization: str | None) -> None:
    app, port = token_server
    headers = [("content-type", link.CONTENT_TYPE)]
    if authorization is not None:
        headers.append(("authorization", authorization))
    async with connect("127.0.0.1", port) as conn:
        # The body never even starts: the answer cannot depend on reading it.
        stream = await conn.open_stream("POST", "/v1/recognize", headers)
        assert await stream.response() == 401
        assert stream.headers["www-authenticate"].startswith("Bearer")
    assert app.metrics.streams._value.get() == 0
    assert app.metrics.unauthorized._value.get() == 1


async def test_the_right_token_opens_streams_and_lid(token_server: tuple[AsrApp, int]
                                                     ) -> None:
    _, port = token_server
    async with connect("127.0.0.1", port) as conn:
        stream = await conn.open_stream("POST", "/v1/recognize", [
            ("content-type", link.CONTENT_TYPE), ("authorization", f"bearer {TOKEN}")])
        ls = LinkStream(stream)
        await ls.send(link.Start(flow_id="tok"),
                      *audio_frames(opus_packets(GOFORWARD[:8000])), link.End())
        await ls.stream.end()
        assert [e.type for e in await ls.rest()][-2:] == ["final", "end"]
    pcm = GOFORWARD[:16000].tobytes()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.post("/v1/lid", content=pcm)).status_code == 401
        r = await client.post("/v1/lid", content=pcm,
                              headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["lang"] == "en"
        # Probes and Prometheus need no copy of the token; anything else does.
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/nope")).status_code == 401
        assert "asr_unauthorized_total 2.0" in (await client.get("/metrics")).text


# -- idle and slow streams ---------------------------------------------------------------


async def test_a_quiet_stream_is_ended_after_the_idle_bound_with_its_final(
        nursery: trio.Nursery) -> None:
    app, port, shutdown = await start_asr(nursery, StandInEngine(),
                                          stream_idle_timeout_s=0.5, body_drain_s=0.2)
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="quiet"))
        await ls.send(*audio_frames(opus_packets(GOFORWARD[:8000])))
        t0 = trio.current_time()
        with trio.fail_after(5):
            events = await ls.rest()  # the body stays open: the server ends it
        waited = trio.current_time() - t0
    kinds = [e.type for e in events]
    assert kinds[-3:] == ["error", "final", "end"], kinds
    assert events[-3].code == "TIMEOUT" and events[-3].fatal
    assert events[-2].text.startswith("0.50s")  # the audio it had still got its final
    assert 0.4 <= waited < 2.0
    assert app.active == 0
    shutdown.set()


@pytest.mark.parametrize("dribble", [False, True])
async def test_a_stream_without_a_timely_start_is_ended(nursery: trio.Nursery,
                                                        dribble: bool) -> None:
    """No Start at all, or one sent a byte at a time (each byte well inside the idle
    bound): the start deadline counts from the stream's opening."""
    app, port, shutdown = await start_asr(nursery, StandInEngine(), start_timeout_s=0.6,
                                          stream_idle_timeout_s=30, body_drain_s=0.2)
    start = link.encode(link.Start(flow_id="slow"))
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn)
        t0 = trio.current_time()

        async def drip() -> None:
            for i in range(len(start) - 1):
                await ls.send_raw(start[i:i + 1])
                await trio.sleep(0.05)

        async with trio.open_nursery() as n:
            if dribble:
                n.start_soon(drip)
            with trio.fail_after(5):
                events = await ls.rest()
            n.cancel_scope.cancel()
        waited = trio.current_time() - t0
    assert [e.type for e in events] == ["error", "end"]
    assert events[0].code == "TIMEOUT" and "Start" in events[0].message
    assert 0.5 <= waited < 2.0
    assert app.active == 0
    shutdown.set()


# -- /v1/lid ---------------------------------------------------------------------------


async def test_lid_bodies_past_the_bound_get_413_without_a_job(nursery: trio.Nursery
                                                               ) -> None:
    engine = StandInEngine()
    _app, port, shutdown = await start_asr(nursery, engine, lid_max_audio_s=2.0)
    ok = np.zeros(32000, np.int16).tobytes()  # exactly 2 s
    big = np.zeros(32001, np.int16).tobytes()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.post("/v1/lid", content=ok)).status_code == 200
        r = await client.post("/v1/lid", content=big)  # content-length says it
        assert r.status_code == 413 and r.json()["error"] == "TOO_LARGE"

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted
            for i in range(0, len(big), 8000):
                yield big[i:i + 8000]

        r = await client.post("/v1/lid", content=chunks())
        assert r.status_code == 413
    async with connect("127.0.0.1", port) as conn:  # HTTP/2, no content-length
        s = await conn.open_stream("POST", "/v1/lid")
        await s.send(big)
        await s.end()
        assert await s.response() == 413
    assert engine.lid_requests == [32000]
    shutdown.set()


async def test_slow_lid_uploads_give_their_slot_back(nursery: trio.Nursery) -> None:
    engine = StandInEngine()
    app, port, shutdown = await start_asr(nursery, engine, lid_max_inflight=2,
                                          lid_read_timeout_s=0.5)
    async with connect("127.0.0.1", port) as conn:
        slow = [await conn.open_stream("POST", "/v1/lid") for _ in range(2)]
        for s in slow:
            await s.send(b"\x00" * 100)  # then nothing: each holds a slot
        await trio.sleep(0.1)
        assert app.lid_inflight == 2
        third = await conn.open_stream("POST", "/v1/lid")
        await third.send(b"\x00" * 100)
        await third.end()
        assert await third.response() == 503  # the slots are bounded ...
        t0 = trio.current_time()
        for s in slow:
            assert await s.response() == 408  # ... and so is how long a slow one holds
        assert trio.current_time() - t0 < 1.0
        with trio.fail_after(1):  # the handlers return just after their answers
            while app.lid_inflight:
                await trio.sleep(0.01)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.post("/v1/lid", content=GOFORWARD[:16000].tobytes())
        assert r.status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'asr_lid_refused_total{reason="TIMEOUT"} 2.0' in metrics
    assert engine.lid_requests == [16000]
    shutdown.set()


# -- Start validation ------------------------------------------------------------------


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[tuple[AsrApp, int]]:
    app, port, shutdown = await start_asr(nursery, StandInEngine(), body_drain_s=1.0)
    yield app, port
    shutdown.set()


@pytest.mark.parametrize(("hint", "code"), [
    ("xx", "UNSUPPORTED_LANGUAGE"),
    ("en\x1b[31m\n", "UNSUPPORTED_LANGUAGE"),
    ("x" * 10_000, "BAD_START"),
])
async def test_a_bad_lang_hint_fails_its_stream_only_and_is_not_echoed(
        server: tuple[AsrApp, int], hint: str, code: str) -> None:
    _, port = server
    async with connect("127.0.0.1", port) as conn, trio.open_nursery() as n:
        good_events: list[link.AsrEvent] = []

        async def good() -> None:
            good_events.extend(await _one_final(conn, "good", lang_hint="en-US"))

        n.start_soon(good)
        bad = await _one_final(conn, "bad", lang_hint=hint)
    assert [e.type for e in bad] == ["error", "end"]
    assert bad[0].code == code and bad[0].fatal
    assert len(bad[0].message) < 200
    assert "\x1b" not in bad[0].message and "\n" not in bad[0].message
    final = next(e for e in good_events if e.type == "final")
    assert final.lang == "en" and final.text.startswith("0.50s")  # en-US normalised


@pytest.mark.parametrize("start", [
    {"traceparent": "0" * 300},
    {"hotwords": ["w" * 65]},
    {"hotwords": ["w"] * 101},
    {"domain": "d" * 200},
])
async def test_oversized_start_fields_are_refused(server: tuple[AsrApp, int],
                                                  start: dict[str, object]) -> None:
    _, port = server
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn)
        obj = {**link.Start(flow_id="big").to_json(), **start}
        await ls.send_raw(link._frame(link.FrameType.START, link._json(obj)))
        await ls.stream.end()
        events = await ls.rest()
    assert [e.type for e in events] == ["error", "end"]
    assert events[0].code == "BAD_START" and len(events[0].message) < 200


def test_hotword_prompt_keeps_the_last_whole_words_that_fit() -> None:
    from asr.server import MAX_PROMPT_CHARS, hotword_prompt

    assert hotword_prompt(("voxgate", "Whisper")) == "voxgate, Whisper"
    assert hotword_prompt(("aaaa", "bb", "cc"), max_chars=6) == "bb, cc"
    words = tuple(f"{i:02d}" + "w" * 62 for i in range(100))  # the link's maximum
    prompt = hotword_prompt(words)
    assert len(prompt) <= MAX_PROMPT_CHARS
    assert prompt.endswith(words[-1]) and prompt.split(", ")[0] in words
    assert len(prompt.split(", ")) == 15


def test_shown_cuts_and_escapes() -> None:
    from asr.server import shown

    assert shown("en") == "'en'"
    assert shown("a\nb\x1b") == "'a\\nb\\x1b'"
    long = shown("y" * 10_000)
    assert len(long) < 60 and "10000 characters" in long


# -- the real engine: one poisoned job in a batch fails alone -------------------------


@pytest.fixture(scope="module")
def tiny(whisper_engine: Callable[..., WhisperEngine]) -> WhisperBackend:
    b = WhisperBackend({"en": PoolSpec(model="tiny.en", languages=("en",))}, "en")
    b._engines[("tiny.en", "int8")] = whisper_engine("tiny.en", "int8")
    return b


@pytest.mark.slow
def test_a_poisoned_job_fails_alone_in_a_real_whisper_batch(tiny: WhisperBackend) -> None:
    audio = GOFORWARD.astype(np.float32) / 32768.0
    jobs = [
        Job("final", "en", audio, key=1),
        Job("final", "en", audio, key=2, options={"seed": "not a number"}),  # decode raises
        Job("final", "en", audio, key=3, options={"lang": "xx"}),  # past Start validation
        Job("final", "en", audio, key=4, options={"prompt": "metres, " * 2000}),  # long
        Job("partial", "en", audio, key=5, options={"prefix": (10**9,)}),  # no such token
        Job("partial", "en", audio, key=6),
    ]
    out = tiny.run_batch("en", jobs)
    assert isinstance(out[1], ValueError) and not isinstance(out[1], UnsupportedLanguage)
    assert isinstance(out[2], UnsupportedLanguage)
    assert isinstance(out[4], Exception)
    for i in (0, 5):
        text = normalize_english(out[i].text)
        assert "go forward" in text, (i, out[i])
    # A prompt far past Whisper's 223 prompt tokens is cut to them, not a failure (what
    # it does to the text is the client's own business: its hotwords).
    assert isinstance(out[3], Recognition)
    assert len(str(out[2])) < 200


@pytest.mark.slow
async def test_real_whisper_refuses_xx_at_start_and_the_other_stream_gets_its_final(
        nursery: trio.Nursery, tiny: WhisperBackend) -> None:
    shutdown = trio.Event()
    app, port = await nursery.start(functools.partial(
        serve, tiny, AsrServerConfig(port=0, body_drain_s=1.0), shutdown=shutdown,
        warmup=False))
    await app.ready_event.wait()
    packets = opus_packets(GOFORWARD)
    results: dict[str, list[link.AsrEvent]] = {}

    async def one(conn: H2Connection, flow_id: str, hint: str) -> None:
        ls = await open_recognize(conn, link.Start(flow_id=flow_id, lang_hint=hint))
        await ls.send(*audio_frames(packets), link.End())
        await ls.stream.end()
        results[flow_id] = await ls.rest()

    async with connect("127.0.0.1", port) as conn, trio.open_nursery() as n:
        n.start_soon(one, conn, "good", "en-US")
        n.start_soon(one, conn, "bad", "xx")
        n.start_soon(one, conn, "good2", "")
    assert [e.type for e in results["bad"]] == ["error", "end"]
    assert results["bad"][0].code == "UNSUPPORTED_LANGUAGE"
    for flow_id in ("good", "good2"):
        (final,) = [e for e in results[flow_id] if e.type == "final"]
        assert "go forward" in normalize_english(final.text), final
        assert not [e for e in results[flow_id] if e.type == "error"]
    shutdown.set()
