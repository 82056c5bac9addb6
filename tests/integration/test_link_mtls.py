"""The ASR link's security end to end: the gateway's ``AsrPools.from_config`` against
the real ASR service (``asr.server.serve`` with the stand-in engine) over TLS on
127.0.0.1, with certificates made by ``tests/certs.py``.

mTLS: the right client certificate recognises; none, or one from another CA, fails
with a clear error and the endpoint's breaker opens as for an unreachable one (and a
pool with a good endpoint fails over to it). A server certificate from an unknown CA is
refused by the gateway. The bearer token: the right one works on ``/v1/recognize`` and
``/v1/lid``, a wrong or missing one is a coded refusal (401), never "busy".
"""

from __future__ import annotations

import functools
import re
import ssl
from pathlib import Path

import numpy as np
import pytest
import trio

from asr import link
from gateway.asrlink import (
    AsrChannel,
    AsrPools,
    AsrRefused,
    AsrStream,
    AsrUnavailable,
    FailoverPolicy,
    client_ssl_context,
)
from gateway.client import stream_audio
from gateway.config import GatewayConfig
from gateway.server import serve
from gateway.vadservice import VadService
from stages.vad import VadModel
from tests import speech
from tests.certs import Pki, make_pki
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

AUDIO = speech.goforward()
FRAMES = [(AUDIO[i:i + 320], i // 16) for i in range(0, len(AUDIO) - 319, 320)][:100]
TOKEN = "t" * 40  # the service wants 32 bytes at least


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _asr(nursery: trio.Nursery, pki: Pki, *, client_ca: Path | None = None,
               token: str | None = None, server_cert: tuple[Path, Path] | None = None
               ) -> str:
    """Start the real ASR service over TLS; return its https:// URL."""
    cert, key = server_cert or (pki.server_cert, pki.server_key)
    _, port, _ = await start_asr(
        nursery, StandInEngine(), certfile=str(cert), keyfile=str(key),
        client_ca_file=str(client_ca) if client_ca else None, auth_token=token)
    return f"https://127.0.0.1:{port}"


async def _pools(nursery: trio.Nursery, urls: tuple[str, ...], **settings: object
                 ) -> AsrPools:
    cfg = GatewayConfig(asr_urls=urls, asr_breaker_open_s=5.0, **settings)  # type: ignore[arg-type]
    pools = AsrPools.from_config(cfg)
    await nursery.start(pools.run)
    return pools


def _mtls(pki: Pki) -> dict[str, object]:
    return {"asr_tls_ca_file": str(pki.ca_cert), "asr_tls_cert_file": str(pki.client_cert),
            "asr_tls_key_file": str(pki.client_key)}


async def _recognize(stream: AsrStream) -> list[link.AsrEvent]:
    events: list[link.AsrEvent] = []

    async def read() -> None:
        async for ev in stream.events():
            events.append(ev)

    async with trio.open_nursery() as n:
        n.start_soon(read)
        for i in range(0, len(FRAMES), 5):
            await stream.send_audio(FRAMES[i:i + 5])
        await stream.finalize()
        await stream.end()
    return events


async def _through_channel(channel: AsrChannel, frames: list[tuple[np.ndarray, int]]
                           ) -> list[link.AsrEvent]:
    """One utterance of ``frames`` through a session's channel; its events."""
    events: list[link.AsrEvent] = []
    async with trio.open_nursery() as n:
        await n.start(channel.run)

        async def read() -> None:
            async for ev in channel.events():
                events.append(ev)
            n.cancel_scope.cancel()

        n.start_soon(read)
        channel.begin(0)
        for j in range(0, len(frames), 5):
            await channel.send_audio(frames[j:j + 5])
        await channel.finalize()
        await channel.end()
    return events


def _final_text() -> str:
    return f"{len(FRAMES) * 320 / 16000:.2f}s"


async def test_mtls_with_the_right_client_certificate_recognizes(
    nursery: trio.Nursery, pki: Pki
) -> None:
    url = await _asr(nursery, pki, client_ca=pki.ca_cert)
    pools = await _pools(nursery, (url,), **_mtls(pki))
    stream = await pools.open("default", link.Start(flow_id="mtls"), codec="opus",
                              bitrate=20000)
    assert stream._conn is not None and stream._conn.scheme == "https"
    events = await _recognize(stream)
    (final,) = [e for e in events if e.type == "final"]
    assert final.text.startswith(_final_text())
    assert events[-1].type == "end"
    answer = await pools.lid("default", AUDIO[:16000 * 2].astype("<i2").tobytes())
    assert answer["lang"] == "en" and answer["score"] == pytest.approx(0.9)
    assert pools.breaker_states("default") == {url.removeprefix("https://"): "closed"}


@pytest.mark.parametrize("client", ["none", "rogue"])
async def test_mtls_without_an_accepted_client_certificate_fails_clearly(
    nursery: trio.Nursery, pki: Pki, client: str
) -> None:
    url = await _asr(nursery, pki, client_ca=pki.ca_cert)
    settings: dict[str, object] = {"asr_tls_ca_file": str(pki.ca_cert)}
    if client == "rogue":
        settings.update(asr_tls_cert_file=str(pki.rogue_client_cert),
                        asr_tls_key_file=str(pki.rogue_client_key))
    pools = await _pools(nursery, (url,), **settings)
    with pytest.raises(AsrUnavailable) as info:
        await pools.open("default", link.Start(flow_id="nocert"), codec="opus",
                         bitrate=20000)
    message = str(info.value)
    # The TLS alert would name the cause ("certificate required", "unknown ca"), but
    # hypercorn on trio closes without sending it: the error says what that means.
    assert re.search(r"certificate required|unknown ca|refused our client certificate",
                     message, re.IGNORECASE), message
    assert url.removeprefix("https://") in message
    # As for an unreachable endpoint: the breaker opens, the next open fails fast.
    assert pools.breaker_states("default") == {url.removeprefix("https://"): "open"}
    with trio.fail_after(0.5), pytest.raises(AsrUnavailable, match="circuit breaker"):
        await pools.open("default", link.Start(flow_id="nocert2"), codec="opus",
                         bitrate=20000)
    with pytest.raises(AsrUnavailable, match=r"client certificate|certificate required"):
        await pools.lid("default", b"\0\0" * 16000)


async def test_unknown_server_ca_is_refused(nursery: trio.Nursery, pki: Pki) -> None:
    """The gateway trusts only ASR_TLS_CA_FILE: a service whose certificate another CA
    signed (here: the gateway is told to trust only the rogue CA) is not spoken to."""
    url = await _asr(nursery, pki)
    pools = await _pools(nursery, (url,), asr_tls_ca_file=str(pki.rogue_ca_cert),
                         asr_tls_cert_file=str(pki.client_cert),
                         asr_tls_key_file=str(pki.client_key))
    with pytest.raises(AsrUnavailable, match=r"TLS handshake.*CERTIFICATE_VERIFY_FAILED"):
        await pools.open("default", link.Start(flow_id="mitm"), codec="opus",
                         bitrate=20000)


async def test_server_certificate_for_another_host_is_refused(
    nursery: trio.Nursery, pki: Pki
) -> None:
    """The host name is checked: the client certificate (CN voxgate-gateway, signed by
    the right CA) served as a server certificate does not pass for 127.0.0.1."""
    url = await _asr(nursery, pki, server_cert=(pki.client_cert, pki.client_key))
    pools = await _pools(nursery, (url,), **_mtls(pki))
    with pytest.raises(AsrUnavailable, match=r"TLS handshake.*(IP address mismatch|"
                                              r"CERTIFICATE_VERIFY_FAILED)"):
        await pools.open("default", link.Start(flow_id="host"), codec="opus",
                         bitrate=20000)


async def test_channel_fails_over_from_an_endpoint_that_refuses_our_certificate(
    nursery: trio.Nursery, pki: Pki
) -> None:
    """Two endpoints, one of which trusts another CA for its clients: every stream ends
    on the other one, and recognition is whole."""
    refusing = await _asr(nursery, pki, client_ca=pki.rogue_ca_cert)
    good = await _asr(nursery, pki, client_ca=pki.ca_cert)
    pools = await _pools(nursery, (refusing, good), **_mtls(pki))
    for i in range(3):
        channel = AsrChannel(pools, "default", link.Start(flow_id=f"fo{i}"), codec="opus",
                             bitrate=20000, policy=FailoverPolicy(budget_s=5))
        events = await _through_channel(channel, FRAMES)
        finals = [e for e in events if e.type == "final"]
        assert [f.text[:5] for f in finals] == [_final_text()], events
        assert not [e for e in events if e.type == "error"], events
    states = pools.breaker_states("default")
    assert states[good.removeprefix("https://")] == "closed"
    assert states[refusing.removeprefix("https://")] != "closed"


async def test_bearer_token_right_works_on_recognize_and_lid(
    nursery: trio.Nursery, pki: Pki
) -> None:
    url = await _asr(nursery, pki, token=TOKEN)
    pools = await _pools(nursery, (url,), asr_tls_ca_file=str(pki.ca_cert),
                         asr_token=TOKEN)
    stream = await pools.open("default", link.Start(flow_id="tok", codec="pcm"), codec="pcm",
                              bitrate=20000)
    events = await _recognize(stream)
    assert [e.text[:5] for e in events if e.type == "final"] == [_final_text()]
    answer = await pools.lid("default", b"\0\0" * 16000)
    assert answer["lang"] == "en"


@pytest.mark.parametrize("token", ["", "w" * 40])
async def test_bearer_token_wrong_or_missing_is_a_coded_refusal(
    nursery: trio.Nursery, pki: Pki, token: str
) -> None:
    url = await _asr(nursery, pki, token=TOKEN)
    pools = await _pools(nursery, (url,), asr_tls_ca_file=str(pki.ca_cert),
                         asr_token=token)
    with pytest.raises(AsrRefused) as info:
        await pools.open("default", link.Start(flow_id="bad"), codec="opus", bitrate=20000)
    assert info.value.status == 401 and "ASR_TOKEN" in str(info.value)
    assert pools.counters.busy == 0  # a refusal is not "busy": no waiting for capacity
    with pytest.raises(AsrRefused) as lid_info:
        await pools.lid("default", b"\0\0" * 16000)
    assert lid_info.value.status == 401

    # A session's channel turns it into its coded error event (utterances given up),
    # and goes on without crashing.
    channel = AsrChannel(pools, "default", link.Start(flow_id="bad-ch"), codec="opus",
                         bitrate=20000, policy=FailoverPolicy(budget_s=0.5,
                                                              backoff_first_s=0.05))
    (error,) = await _through_channel(channel, FRAMES[:25])
    assert error.type == "error" and error.code == "UNAVAILABLE"
    assert "401" in error.message and error.extra == {"utterances": [0]}


def test_from_config_refuses_unloadable_tls_files(tmp_path: Path, pki: Pki) -> None:
    """A wrong path or a file that is not PEM is a startup error naming the setting,
    not a handshake failure at the first session."""
    with pytest.raises(ValueError, match="ASR_TLS_CA_FILE"):
        AsrPools.from_config(GatewayConfig(asr_tls_ca_file=str(tmp_path / "missing.pem")))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="ASR_TLS_CERT_FILE"):
        AsrPools.from_config(GatewayConfig(asr_tls_ca_file=str(pki.ca_cert),
                                           asr_tls_cert_file=str(junk),
                                           asr_tls_key_file=str(pki.client_key)))
    # The client certificate with another certificate's key
    with pytest.raises(ValueError, match="ASR_TLS_CERT_FILE"):
        AsrPools.from_config(GatewayConfig(asr_tls_cert_file=str(pki.client_cert),
                                           asr_tls_key_file=str(pki.rogue_client_key)))
    with pytest.raises(ValueError, match="line breaks"):
        AsrPools.from_config(GatewayConfig(asr_token="x" * 40 + "\r\nhost: evil"))


def test_client_context_is_tls12_or_newer_and_verifies(pki: Pki) -> None:
    ctx = client_ssl_context(ca_file=str(pki.ca_cert), cert_file=str(pki.client_cert),
                             key_file=str(pki.client_key))
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.get_ca_certs()[0]["subject"] == ((("commonName", "voxgate test ca"),),)



# -- the whole gateway: its settings reach the link ------------------------------------


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


async def _gateway(nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path, url: str,
                   **settings: object) -> str:
    """``gateway.server.serve`` on loopback with ASR settings; its WebSocket URL."""
    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "archive_fallback_dir": str(tmp_path / "fallback"), "asr_urls": url,
        "flush_idle_s": 1.0, **settings})
    ws_port, _ = await nursery.start(functools.partial(
        serve, cfg, vad=VadService(vad_model)))
    return f"ws://127.0.0.1:{ws_port}/ws/stream"


async def test_gateway_recognizes_over_mtls_with_the_token(
    nursery: trio.Nursery, pki: Pki, vad_model: VadModel, tmp_path: Path
) -> None:
    """ASR_TLS_* and ASR_TOKEN from the gateway's settings reach every request: a
    session's utterance is recognized by a service that requires both."""
    url = await _asr(nursery, pki, client_ca=pki.ca_cert, token=TOKEN)
    ws = await _gateway(nursery, vad_model, tmp_path, url, asr_token=TOKEN, **_mtls(pki))
    audio = np.concatenate([np.zeros(16000, np.int16), AUDIO, np.zeros(16000, np.int16)])
    r = await stream_audio(ws, audio, realtime=False, start={"flowId": "mtls-e2e"})
    (final,) = r.of("asr_final")
    # The stand-in says how much audio it heard: the utterance, well over a second.
    heard = re.fullmatch(r"(\d+\.\d\d)s rms=\d\.\d{3}", final["text"])
    assert heard is not None and float(heard[1]) > 1.0, final
    assert not r.of("error") and r.of("end")[0]["reason"] == "flush"


async def test_gateway_session_without_an_accepted_certificate_is_a_coded_error(
    nursery: trio.Nursery, pki: Pki, vad_model: VadModel, tmp_path: Path
) -> None:
    """The gateway's client certificate is refused: the session says ASR_UNAVAILABLE
    (after the channel's 10 s retry budget), keeps its recording and ends normally."""
    url = await _asr(nursery, pki, client_ca=pki.rogue_ca_cert)
    ws = await _gateway(nursery, vad_model, tmp_path, url, **_mtls(pki))
    audio = np.concatenate([np.zeros(16000, np.int16), AUDIO, np.zeros(16000, np.int16)])
    r = await stream_audio(ws, audio, realtime=False, start={"flowId": "refused"})
    assert not r.of("asr_final")
    errors = r.of("error")
    assert errors and {e["code"] for e in errors} == {"ASR_UNAVAILABLE"}, errors
    assert not any(e["fatal"] for e in errors)
    assert r.of("record_url") and r.of("end")[0]["reason"] == "flush"
