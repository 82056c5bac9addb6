"""The startup guard, through the real command line in a subprocess: ``voxgate gateway``
(and ``voxgate serve``) on an address other machines can reach refuses to start without
authentication unless AUTH_DISABLED=true says so, and a broken key set stops it with
its reason; on loopback it stays zero-config."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import ecdsa
import httpx
import pytest
import trio

from gateway.client import stream_audio
from stages.vad import VadModel
from tests.certs import make_pki
from tests.integration.test_gateway import SILENCE, checked, start_gateway
from tests.standin import StandInEngine, start_asr
from tests.unit.test_auth import _rsa_key, ec_jwk, forge, hmac_signer, sign, write_jwks

ROOT = Path(__file__).resolve().parents[2]
# Exactly what the console script runs (gateway.cli:main), without depending on the
# script having been installed in this environment.
CLI = [sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())"]
MESSAGE = "without authentication: set AUTH_JWT_SECRET or AUTH_JWT_KEYS_FILE"
WS_LINE = re.compile(rb"wss?://[^\s]+:(\d+)/ws/stream")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test runner's environment without any gateway settings it may carry, plus
    free ports, an ASR endpoint that is a closed loopback port (the gateway connects
    lazily) and a private archive."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AUTH_", "VOXGATE_", "RECORDS_", "TLS_", "OTEL_", "ASR_"))}
    env.update(PYTHONPATH=str(ROOT), VOXGATE_PORT="0", VOXGATE_HTTP_PORT="0",
               ASR_URLS="http://127.0.0.1:9", ARCHIVE_DIR=str(tmp_path / "records"),
               ARCHIVE_FALLBACK_DIR=str(tmp_path / "fallback"))
    env.update(extra)
    return env


async def _refused(tmp_path: Path, *args: str, **env: str) -> str:
    with trio.fail_after(30):
        done = await trio.run_process([*CLI, *args], env=_env(tmp_path, **env),
                                      cwd=tmp_path, capture_stdout=True,
                                      capture_stderr=True, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert b"ws://" not in done.stdout  # it never listened
    return str(done.stderr.decode())


async def _starts(tmp_path: Path, *args: str,
                  check: Callable[[str], Awaitable[None]] | None = None, **env: str) -> str:
    """Run the command until it prints its WebSocket URL, check that the port takes
    connections (and run ``check`` on what it printed), stop it with SIGTERM, and return
    what it logged."""
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as log_file:
        proc = await trio.lowlevel.open_process(
            [*CLI, *args], env=_env(tmp_path, **env), cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=log_file)
    try:
        assert proc.stdout is not None
        out = b""
        with trio.fail_after(30):
            while not WS_LINE.search(out):
                chunk = await proc.stdout.receive_some()
                assert chunk, f"exited before listening: {log_path.read_text()}"
                out += chunk
        match = WS_LINE.search(out)
        assert match is not None
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=5):
            pass
        if check is not None:
            with trio.fail_after(30):
                await check(out.decode())
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            code = await proc.wait()
        assert code == 0, log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(10):
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
    return log_path.read_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
async def test_gateway_on_a_public_address_without_auth_refuses(tmp_path: Path,
                                                                host: str) -> None:
    stderr = await _refused(tmp_path, "gateway", "--host", host)
    assert f"voxgate gateway: refusing to listen on {host} {MESSAGE}" in stderr
    assert "AUTH_DISABLED=true" in stderr


@pytest.mark.timeout(60)
async def test_the_host_from_the_environment_is_guarded_too(tmp_path: Path) -> None:
    stderr = await _refused(tmp_path, "gateway", VOXGATE_HOST="0.0.0.0")
    assert MESSAGE in stderr


@pytest.mark.timeout(60)
async def test_serve_on_a_public_address_without_auth_refuses(tmp_path: Path) -> None:
    """voxgate serve applies the same rule, before it loads any model."""
    stderr = await _refused(tmp_path, "serve", "--host", "0.0.0.0")
    assert f"voxgate serve: refusing to listen on 0.0.0.0 {MESSAGE}" in stderr


@pytest.mark.timeout(60)
async def test_auth_disabled_starts_on_a_public_address_with_a_warning(
        tmp_path: Path) -> None:
    stderr = await _starts(tmp_path, "gateway", "--host", "0.0.0.0", AUTH_DISABLED="true")
    warnings = [json.loads(line) for line in stderr.splitlines()
                if "AUTH_DISABLED=true" in line]
    assert len(warnings) == 1, stderr
    assert warnings[0]["level"] == "warning"
    assert "authentication is off" in warnings[0]["msg"]


@pytest.mark.timeout(60)
async def test_loopback_stays_zero_config(tmp_path: Path) -> None:
    stderr = await _starts(tmp_path, "gateway")
    assert "AUTH_DISABLED" not in stderr and "authentication" not in stderr


@pytest.mark.timeout(60)
async def test_a_key_set_lets_it_start_and_a_bad_one_stops_it(tmp_path: Path) -> None:
    keys = tmp_path / "jwks.json"
    short = base64.urlsafe_b64encode(b"k" * 16).rstrip(b"=").decode()
    keys.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "a", "k": short}]}))
    stderr = await _refused(tmp_path, "gateway", "--host", "0.0.0.0",
                            AUTH_JWT_KEYS_FILE=str(keys))
    assert f"{keys}: key 0 (kid 'a'): an oct (HS256) key must be 32 bytes" in stderr

    stderr = await _refused(tmp_path, "gateway", "--host", "0.0.0.0",
                            AUTH_JWT_KEYS_FILE=str(tmp_path / "missing.json"))
    assert "AUTH_JWT_KEYS_FILE" in stderr and "No such file" in stderr

    good = base64.urlsafe_b64encode(b"k" * 32).rstrip(b"=").decode()
    keys.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "a", "k": good}]}))
    stderr = await _starts(tmp_path, "gateway", "--host", "0.0.0.0",
                           AUTH_JWT_KEYS_FILE=str(keys))
    assert "AUTH_DISABLED" not in stderr


@pytest.mark.timeout(60)
async def test_auth_disabled_next_to_a_secret_is_reported_as_ignored(
        tmp_path: Path) -> None:
    stderr = await _starts(tmp_path, "gateway", "--host", "0.0.0.0", AUTH_DISABLED="true",
                           AUTH_JWT_SECRET="s" * 32)
    assert "AUTH_DISABLED=true is ignored" in stderr
    assert "s" * 32 not in stderr


@pytest.mark.timeout(60)
async def test_printed_urls_follow_tls_and_metrics_port(tmp_path: Path) -> None:
    """With TLS_CERT_FILE the command prints wss:// and https://; with METRICS_PORT it
    prints the metrics port, which answers plain HTTP."""
    pki = make_pki(tmp_path / "pki")

    async def check(stdout: str) -> None:
        head, ws = stdout.splitlines()[:2]
        assert ws.startswith("wss://127.0.0.1:") and ws.endswith("/ws/stream"), stdout
        m = re.fullmatch(r"voxgate gateway: https://127\.0\.0\.1:(\d+) \(records\), "
                         r"metrics on http://127\.0\.0\.1:(\d+)/metrics", head)
        assert m, head
        ca = ssl.create_default_context(cafile=str(pki.ca_cert))
        async with httpx.AsyncClient(verify=ca) as client:
            ok = await client.get(f"https://127.0.0.1:{m.group(1)}/healthz")
            assert ok.status_code == 200
            scraped = await client.get(f"http://127.0.0.1:{m.group(2)}/metrics")
            assert scraped.status_code == 200
            assert "orchestrator_active_sessions" in scraped.text

    await _starts(tmp_path, "gateway", check=check, TLS_CERT_FILE=str(pki.server_cert),
                  TLS_KEY_FILE=str(pki.server_key), METRICS_PORT="0")

    async def plain(stdout: str) -> None:
        head, ws = stdout.splitlines()[:2]
        assert ws.startswith("ws://127.0.0.1:")
        assert re.fullmatch(r"voxgate gateway: http://127\.0\.0\.1:\d+ \(records, "
                            r"metrics\)", head), head

    await _starts(tmp_path, "gateway", check=plain)


# --- tokens through a real gateway ----------------------------------------------------


@pytest.mark.timeout(90)
async def test_key_set_tokens_through_a_real_gateway(nursery: trio.Nursery,
                                                     tmp_path: Path) -> None:
    """A gateway on a JWKS with an RSA and an EC key: RS256 and ES256 tokens open
    sessions owned by their tenant; the alg-confusion token, ``alg: none``, a wrong
    issuer and an unknown kid are UNAUTHORIZED with a reason and without the token; a
    key added to the file works at the next session, without a restart."""
    rsa1, rsa2 = _rsa_key(tmp_path, "r1"), _rsa_key(tmp_path, "r2")
    ec1 = ecdsa.SigningKey.generate(curve=ecdsa.NIST256p)
    keys = write_jwks(tmp_path / "jwks.json", rsa1.jwk("r1"), ec_jwk(ec1, "e1"))
    _, asr_port, asr_stop = await start_asr(nursery, StandInEngine())
    g = await start_gateway(nursery, VadModel(), tmp_path, f"http://127.0.0.1:{asr_port}",
                            auth_jwt_keys_file=str(keys), auth_jwt_issuer="https://id.test",
                            auth_jwt_audience="voxgate")

    def claims(**extra: object) -> dict[str, object]:
        return {"sub": "alice", "tenant": "acme", "iss": "https://id.test",
                "aud": ["voxgate"], "exp": time.time() + 300, **extra}

    async def session(token: str) -> list[dict[str, object]]:
        r = checked(await stream_audio(g.ws_url, SILENCE[:3200], realtime=False,
                                       start={"auth": {"token": token}}))
        errors = r.of("error")
        for e in errors:
            assert not token or token not in str(e["message"])
        if not errors:
            assert r.of("ack") and r.of("end")[0]["reason"] == "flush"
            url = str(r.of("record_url")[0]["url"])
            assert "/acme/" in url, url  # the recording is the tenant's
        return errors

    assert await session(sign(claims(), rsa1.private, "RS256", "r1")) == []
    assert await session(sign(claims(), ec1, "ES256", "e1")) == []

    refused = {
        "verifies RS256 only": forge({"alg": "HS256", "kid": "r1"}, claims(),
                                     hmac_signer(rsa1.public_pem)),
        "'none'": forge({"alg": "none", "kid": "r1"}, claims(), lambda m: b""),
        "another issuer": sign(claims(iss="https://evil.test"), rsa1.private, "RS256",
                               "r1"),
        "another audience": sign(claims(aud="billing"), ec1, "ES256", "e1"),
        "unknown key id (kid) 'r2'": sign(claims(), rsa2.private, "RS256", "r2"),
        "expired": sign(claims(exp=time.time() - 120), rsa1.private, "RS256", "r1"),
        "auth.token is required": "",
    }
    for reason, token in refused.items():
        errors = await session(token)
        assert [(e["code"], e["fatal"]) for e in errors] == [("UNAUTHORIZED", True)]
        assert reason in str(errors[0]["message"]), (reason, errors)

    write_jwks(keys, rsa1.jwk("r1"), ec_jwk(ec1, "e1"), rsa2.jwk("r2"))  # rotation
    assert await session(sign(claims(), rsa2.private, "RS256", "r2")) == []
    g.shutdown.set()
    asr_stop.set()
