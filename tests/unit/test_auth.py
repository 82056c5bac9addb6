"""gateway.auth: JWT verification (HS256, RS256, ES256 pinned per key), the JWKS key file
and its rotation, the claims policy, and the startup exposure guard.

RSA keys come from the ``openssl`` command line (faster than pure-Python key generation,
and an independent implementation); one RS256 and one ES256 token are signed by openssl
itself, so the verifiers are checked against the standard, not only against themselves.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ecdsa
import ecdsa.util
import pytest
import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth import (
    Authenticator,
    AuthError,
    Claims,
    VerificationKey,
    _jws,
    exposure_problem,
    is_loopback,
    load_jwks,
)
from gateway.config import GatewayConfig

NOW = 1_800_000_000.0
SECRET = "s" * 32


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64uint(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True)
class RsaKey:
    private: rsa.PrivateKey
    pem_file: Path  # the private key as openssl wrote it
    public_pem: bytes  # SubjectPublicKeyInfo PEM, what an attacker can download

    def jwk(self, kid: str | None) -> dict[str, Any]:
        jwk = {"kty": "RSA", "n": b64uint(self.private.n), "e": b64uint(self.private.e)}
        return {**jwk, "kid": kid} if kid else jwk


def _openssl(*args: str, cwd: Path, data: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], cwd=cwd, input=data, check=True,
                          capture_output=True, timeout=60).stdout


def _rsa_key(d: Path, name: str, bits: int = 2048) -> RsaKey:
    _openssl("genrsa", "-traditional", "-out", f"{name}.pem", str(bits), cwd=d)
    private = rsa.PrivateKey.load_pkcs1((d / f"{name}.pem").read_bytes())
    public_pem = _openssl("rsa", "-in", f"{name}.pem", "-pubout", cwd=d)
    return RsaKey(private, d / f"{name}.pem", public_pem)


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jwtkeys")


@pytest.fixture(scope="module")
def rsa1(keydir: Path) -> RsaKey:
    return _rsa_key(keydir, "rsa1")


@pytest.fixture(scope="module")
def rsa2(keydir: Path) -> RsaKey:
    return _rsa_key(keydir, "rsa2")


@pytest.fixture(scope="module")
def ec1() -> ecdsa.SigningKey:
    return ecdsa.SigningKey.generate(curve=ecdsa.NIST256p)


def ec_jwk(key: ecdsa.SigningKey, kid: str | None) -> dict[str, Any]:
    raw = key.verifying_key.to_string("raw")
    jwk = {"kty": "EC", "crv": "P-256", "x": b64(raw[:32]), "y": b64(raw[32:])}
    return {**jwk, "kid": kid} if kid else jwk


def oct_jwk(secret: bytes, kid: str | None) -> dict[str, Any]:
    jwk = {"kty": "oct", "k": b64(secret)}
    return {**jwk, "kid": kid} if kid else jwk


def sign(claims: dict[str, Any], key: Any, alg: str, kid: str | None = None,
         headers: dict[str, Any] | None = None) -> str:
    hdr = dict(headers or {})
    if kid:
        hdr["kid"] = kid
    return _jws().encode(json.dumps(claims).encode(), key, algorithm=alg, headers=hdr)


def forge(header: dict[str, Any], claims: dict[str, Any],
          signer: Callable[[bytes], bytes]) -> str:
    """A token built by hand, as an attacker would, around any signature."""
    signing_input = (b64(json.dumps(header).encode()) + "." +
                     b64(json.dumps(claims).encode())).encode()
    return signing_input.decode() + "." + b64(signer(signing_input))


def hmac_signer(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda m: hmac.new(secret, m, hashlib.sha256).digest()


def rsa_sign(key: rsa.PrivateKey, hash_name: str, message: bytes) -> bytes:
    return bytes(rsa.sign(message, key, hash_name))


def good(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": NOW + 600, "iat": NOW - 10, **extra}


def write_jwks(path: Path, *jwks: dict[str, Any]) -> Path:
    """Replace the file atomically (write, then rename), as key rotation tools do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": list(jwks)}))
    os.replace(tmp, path)
    return path


def hs(**kw: Any) -> Authenticator:
    return Authenticator([VerificationKey(None, "HS256", SECRET.encode())], **kw)


# --- each algorithm -------------------------------------------------------------------


def test_hs256_from_config_and_tenant_falls_back_to_sub() -> None:
    auth = Authenticator.from_config(GatewayConfig(auth_jwt_secret=SECRET))
    assert auth is not None
    claims = auth.verify(sign(good(), SECRET, "HS256"), now=NOW)
    assert claims == Claims(subject="alice", tenant="alice", raw=claims.raw)
    assert claims.raw["sub"] == "alice"
    tenant = auth.verify(sign(good(tenant="acme"), SECRET, "HS256"), now=NOW)
    assert (tenant.subject, tenant.tenant) == ("alice", "acme")


def test_no_keys_configured_means_no_authenticator() -> None:
    assert Authenticator.from_config(GatewayConfig()) is None


def test_rs256_and_es256_from_a_key_set(tmp_path: Path, rsa1: RsaKey,
                                        ec1: ecdsa.SigningKey) -> None:
    path = write_jwks(tmp_path / "jwks.json", rsa1.jwk("r1"), ec_jwk(ec1, "e1"),
                      oct_jwk(b"k" * 32, "h1"))
    auth = Authenticator.from_config(GatewayConfig(auth_jwt_keys_file=str(path)))
    assert auth is not None
    assert auth.verify(sign(good(), rsa1.private, "RS256", "r1"), now=NOW).tenant == "alice"
    assert auth.verify(sign(good(), ec1, "ES256", "e1"), now=NOW).tenant == "alice"
    assert auth.verify(sign(good(), b"k" * 32, "HS256", "h1"), now=NOW).tenant == "alice"
    # a signature by another key of the same type fails
    other = ecdsa.SigningKey.generate(curve=ecdsa.NIST256p)
    with pytest.raises(AuthError, match="signature is not valid"):
        auth.verify(sign(good(), other, "ES256", "e1"), now=NOW)


def test_tokens_signed_by_openssl_verify(tmp_path: Path, rsa1: RsaKey) -> None:
    """Interop: RS256 and ES256 signatures made by openssl (ES256's DER turned into the
    JWS raw r||s form) verify, so the pure-Python verifiers follow the standard."""
    ec_pem = tmp_path / "ec.pem"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ec_pem),
             cwd=tmp_path)
    ec_key = ecdsa.SigningKey.from_pem(ec_pem.read_text())
    path = write_jwks(tmp_path / "jwks.json", rsa1.jwk("r1"), ec_jwk(ec_key, "e1"))
    auth = Authenticator(keys_file=str(path))

    def openssl_sign(pem: Path, data: bytes) -> bytes:
        return _openssl("dgst", "-sha256", "-sign", str(pem), cwd=tmp_path, data=data)

    rs = forge({"alg": "RS256", "kid": "r1", "typ": "JWT"}, good(),
               lambda m: openssl_sign(rsa1.pem_file, m))
    assert auth.verify(rs, now=NOW).subject == "alice"

    def es_raw(m: bytes) -> bytes:
        r, s = ecdsa.util.sigdecode_der(openssl_sign(ec_pem, m), ecdsa.NIST256p.order)
        return bytes(ecdsa.util.sigencode_string(r, s, ecdsa.NIST256p.order))

    es = forge({"alg": "ES256", "kid": "e1"}, good(), es_raw)
    assert auth.verify(es, now=NOW).subject == "alice"
    der = forge({"alg": "ES256", "kid": "e1"}, good(), lambda m: openssl_sign(ec_pem, m))
    with pytest.raises(AuthError, match="signature"):  # DER is not the JWS form
        auth.verify(der, now=NOW)


def test_rs256_signature_with_another_hash_is_refused(tmp_path: Path, rsa1: RsaKey) -> None:
    """rsa.verify reads the hash from the signature: a valid SHA-1 or SHA-512 PKCS#1
    signature of the same bytes must not pass as RS256."""
    auth = Authenticator(keys_file=str(write_jwks(tmp_path / "k.json", rsa1.jwk("r1"))))
    for hash_name in ("SHA-1", "SHA-512"):
        token = forge({"alg": "RS256", "kid": "r1"}, good(),
                      functools.partial(rsa_sign, rsa1.private, hash_name))
        with pytest.raises(AuthError, match="signature is not valid"):
            auth.verify(token, now=NOW)


# --- the attacks ----------------------------------------------------------------------


def test_alg_confusion_hs256_signed_with_the_rsa_public_key(tmp_path: Path,
                                                            rsa1: RsaKey) -> None:
    """The classic attack: the RSA public key (PEM, or its JWK members) used as an HMAC
    secret. The key is pinned to RS256, so the HS256 token is refused, with or without
    a kid."""
    auth = Authenticator(keys_file=str(write_jwks(tmp_path / "k.json", rsa1.jwk("r1"))))
    for secret in (rsa1.public_pem, rsa1.public_pem.strip(),
                   json.dumps(rsa1.jwk("r1")).encode()):
        for header in ({"alg": "HS256", "kid": "r1"}, {"alg": "HS256"}):
            token = forge(header, good(), hmac_signer(secret))
            with pytest.raises(AuthError, match="verifies RS256 only"):
                auth.verify(token, now=NOW)


def test_alg_none_is_refused() -> None:
    auth = hs()
    for header in ({"alg": "none"}, {"alg": "none", "typ": "JWT"}, {"alg": "None"},
                   {"alg": "NONE"}, {}):
        token = forge(header, good(), lambda m: b"")
        with pytest.raises(AuthError, match="algorithm"):
            auth.verify(token, now=NOW)


def test_hs256_with_an_rs256_header_is_refused() -> None:
    """The other direction: the secret's key never verifies RS256 or ES256 tokens."""
    auth = hs()
    good_sig = hmac.new(SECRET.encode(), b"", hashlib.sha256).digest()
    for alg in ("RS256", "ES256", "HS512", "PS256"):
        token = forge({"alg": alg}, good(), lambda m: good_sig)
        with pytest.raises(AuthError, match="verifies HS256 only"):
            auth.verify(token, now=NOW)


@pytest.mark.parametrize("token", [
    "", "abc", "a.b", "a.b.c", "....", "e30.e30.", "!!!.e30.e30",
    b64(b'{"alg":"HS256"}') + ".bm90IGpzb24." + b64(b"x" * 32),
    b64(b"[" * 5000) + ".e30.e30",
    "x" * 20000,
])
def test_malformed_tokens_give_auth_errors_without_echoing_them(token: str) -> None:
    with pytest.raises(AuthError) as info:
        hs().verify(token, now=NOW)
    if len(token) > 4:
        assert token not in str(info.value)


def test_wrong_secret_and_tampered_claims() -> None:
    auth = hs()
    with pytest.raises(AuthError, match="signature is not valid"):
        auth.verify(sign(good(), "t" * 32, "HS256"), now=NOW)
    token = sign(good(), SECRET, "HS256")
    head, _body, sig = token.split(".")
    tampered = ".".join([head, b64(json.dumps(good(sub="mallory")).encode()), sig])
    with pytest.raises(AuthError, match="signature is not valid"):
        auth.verify(tampered, now=NOW)


# --- claims ---------------------------------------------------------------------------


def test_exp_is_required_and_leeway_applies() -> None:
    auth = hs(leeway_s=30)
    with pytest.raises(AuthError, match="no expiry"):
        auth.verify(sign({"sub": "a"}, SECRET, "HS256"), now=NOW)
    with pytest.raises(AuthError, match="exp is not a number"):
        auth.verify(sign({"sub": "a", "exp": "tomorrow"}, SECRET, "HS256"), now=NOW)
    expired_20s_ago = sign({"sub": "a", "exp": NOW - 20}, SECRET, "HS256")
    assert auth.verify(expired_20s_ago, now=NOW).tenant == "a"  # within the leeway
    with pytest.raises(AuthError, match="expired"):
        auth.verify(expired_20s_ago, now=NOW + 11)
    with pytest.raises(AuthError, match="expired"):
        hs(leeway_s=0).verify(expired_20s_ago, now=NOW)


def test_nbf_and_iat_in_the_future() -> None:
    auth = hs(leeway_s=30)
    nbf = sign(good(nbf=NOW + 60), SECRET, "HS256")
    with pytest.raises(AuthError, match="not valid yet"):
        auth.verify(nbf, now=NOW)
    assert auth.verify(nbf, now=NOW + 31).tenant == "alice"
    iat = sign(good(iat=NOW + 60), SECRET, "HS256")
    with pytest.raises(AuthError, match="issued in the future"):
        auth.verify(iat, now=NOW)
    assert auth.verify(iat, now=NOW + 30).tenant == "alice"


def test_wall_clock_is_the_default() -> None:
    auth = hs()
    assert auth.verify(sign({"sub": "a", "exp": time.time() + 60}, SECRET, "HS256"))
    with pytest.raises(AuthError, match="expired"):
        auth.verify(sign({"sub": "a", "exp": time.time() - 120}, SECRET, "HS256"))


def test_issuer() -> None:
    auth = hs(issuer="https://id.example")
    assert auth.verify(sign(good(iss="https://id.example"), SECRET, "HS256"), now=NOW)
    with pytest.raises(AuthError, match="another issuer"):
        auth.verify(sign(good(iss="https://evil.example"), SECRET, "HS256"), now=NOW)
    with pytest.raises(AuthError, match="no issuer"):
        auth.verify(sign(good(), SECRET, "HS256"), now=NOW)
    # no issuer configured: any iss is fine
    assert hs().verify(sign(good(iss="whoever"), SECRET, "HS256"), now=NOW)


@pytest.mark.parametrize(("aud", "ok"), [
    ("voxgate", True), (["other", "voxgate"], True), ("other", False),
    (["other"], False), ([], False), (None, False), (7, False), (["voxgate", 7], False),
])
def test_audience_string_or_list(aud: Any, ok: bool) -> None:
    auth = hs(audience="voxgate")
    claims = good() if aud is None else good(aud=aud)
    token = sign(claims, SECRET, "HS256")
    if ok:
        assert auth.verify(token, now=NOW).tenant == "alice"
    else:
        with pytest.raises(AuthError, match="aud"):
            auth.verify(token, now=NOW)


def test_a_token_for_an_audience_needs_the_gateway_to_be_it() -> None:
    """RFC 7519 §4.1.3: a token that names audiences is for them only."""
    with pytest.raises(AuthError, match="audience"):
        hs().verify(sign(good(aud="billing"), SECRET, "HS256"), now=NOW)


@pytest.mark.parametrize(("claims", "message"), [
    ({"exp": NOW + 60}, "names no tenant"),
    ({"exp": NOW + 60, "sub": ""}, "1 to 128"),
    ({"exp": NOW + 60, "sub": "a", "tenant": ""}, "1 to 128"),
    ({"exp": NOW + 60, "tenant": "t" * 129}, "1 to 128"),
    ({"exp": NOW + 60, "tenant": 42}, "not a string"),
    ({"exp": NOW + 60, "sub": 42}, "sub"),
    ({"exp": NOW + 60, "tenant": "a\nb"}, "control"),
])
def test_bad_tenants(claims: dict[str, Any], message: str) -> None:
    with pytest.raises(AuthError, match=message):
        hs().verify(sign(claims, SECRET, "HS256"), now=NOW)


def test_tenant_without_sub() -> None:
    claims = hs().verify(sign({"exp": NOW + 60, "tenant": "t" * 128}, SECRET, "HS256"),
                         now=NOW)
    assert (claims.subject, claims.tenant) == ("", "t" * 128)


# --- keys, kids and rotation ----------------------------------------------------------


def test_short_hmac_keys_are_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 bytes at least, this one has 31"):
        load_jwks(json.dumps({"keys": [oct_jwk(b"k" * 31, "h1")]}), "jwks.json")
    with pytest.raises(ValueError, match="32 bytes"):
        Authenticator([VerificationKey(None, "HS256", b"k" * 31)])
    with pytest.raises(ValueError, match="AUTH_JWT_SECRET"):
        GatewayConfig(auth_jwt_secret="k" * 31)
    path = write_jwks(tmp_path / "short.json", oct_jwk(b"k" * 16, "h1"))
    with pytest.raises(ValueError, match=r"short\.json: key 0 \(kid 'h1'\): an oct"):
        Authenticator.from_config(GatewayConfig(auth_jwt_keys_file=str(path)))


def test_short_rsa_keys_and_bad_key_sets_are_refused(keydir: Path) -> None:
    small = _rsa_key(keydir, "small", bits=1024)
    with pytest.raises(ValueError, match="2048 bits"):
        load_jwks(json.dumps({"keys": [small.jwk("r")]}))
    for doc, message in [
        ("not json", "not JSON"),
        ("[]", "Key Set"),
        ('{"keys": []}', "no usable key"),
        ('{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA"}]}', "no usable key"),
        (json.dumps({"keys": [{**oct_jwk(b"k" * 32, None), "alg": "RS256"}]}),
         "verifies HS256 only"),
        ('{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}', "32-byte"),
        (json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": b64(b"\1" * 32),
                               "y": b64(b"\2" * 32)}]}), "not a point"),
        ('{"keys": [{"kty": "RSA", "e": "AQAB"}]}', "'n' is missing"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_jwks(doc)
    with pytest.raises(ValueError, match="same kid"):
        load_jwks(json.dumps({"keys": [oct_jwk(b"k" * 32, "a"), oct_jwk(b"j" * 32, "a")]}))


def test_encryption_keys_and_other_curves_are_skipped(ec1: ecdsa.SigningKey) -> None:
    keys = load_jwks(json.dumps({"keys": [
        {**oct_jwk(b"k" * 32, "enc"), "use": "enc"},
        {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA", "kid": "p384"},
        ec_jwk(ec1, "e1"),
    ]}))
    assert [(k.kid, k.alg) for k in keys] == [("e1", "ES256")]


def test_kid_selection(tmp_path: Path, rsa1: RsaKey, rsa2: RsaKey) -> None:
    path = write_jwks(tmp_path / "k.json", rsa1.jwk("r1"), rsa2.jwk("r2"))
    auth = Authenticator(keys_file=str(path))
    assert auth.verify(sign(good(), rsa2.private, "RS256", "r2"), now=NOW)
    with pytest.raises(AuthError, match="signature"):  # r2's kid, r1's signature
        auth.verify(sign(good(), rsa1.private, "RS256", "r2"), now=NOW)
    with pytest.raises(AuthError, match="unknown key id"):
        auth.verify(sign(good(), rsa1.private, "RS256", "r9"), now=NOW)
    with pytest.raises(AuthError, match="no key id"):
        auth.verify(sign(good(), rsa1.private, "RS256"), now=NOW)
    # one key only: a token without kid uses it
    single = Authenticator(keys_file=str(write_jwks(tmp_path / "1.json", rsa1.jwk("r1"))))
    assert single.verify(sign(good(), rsa1.private, "RS256"), now=NOW)
    # AUTH_JWT_SECRET next to a key set: kid-less tokens are the secret's
    both = Authenticator.from_config(GatewayConfig(auth_jwt_secret=SECRET,
                                                   auth_jwt_keys_file=str(path)))
    assert both is not None
    assert both.verify(sign(good(), SECRET, "HS256"), now=NOW)
    assert both.verify(sign(good(), rsa1.private, "RS256", "r1"), now=NOW)


def test_a_lone_secret_ignores_the_kid_hint() -> None:
    """AUTH_JWT_SECRET alone has no kid: an issuer that puts one in its HS256 tokens
    still works (as before key sets existed), and the signature still decides."""
    assert hs().verify(sign(good(), SECRET, "HS256", "default"), now=NOW)
    with pytest.raises(AuthError, match="signature is not valid"):
        hs().verify(sign(good(), "t" * 32, "HS256", "default"), now=NOW)


def test_unknown_kid_is_echoed_only_when_it_looks_like_an_id() -> None:
    auth = Authenticator([VerificationKey("k1", "HS256", SECRET.encode())])
    with pytest.raises(AuthError, match="unknown key id \\(kid\\) 'k-2026'"):
        auth.verify(sign(good(), SECRET, "HS256", "k-2026"), now=NOW)
    with pytest.raises(AuthError) as info:
        auth.verify(sign(good(), SECRET, "HS256", "<script>"), now=NOW)
    assert "<script>" not in str(info.value)


def test_rotation_by_rewriting_the_key_file(tmp_path: Path, rsa1: RsaKey, rsa2: RsaKey,
                                            ec1: ecdsa.SigningKey,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Add a key: its tokens work at once. Remove one: its tokens fail. A broken file
    keeps the last good keys. No restart, no new Authenticator."""
    path = write_jwks(tmp_path / "jwks.json", rsa1.jwk("2026-01"))
    auth = Authenticator.from_config(GatewayConfig(auth_jwt_keys_file=str(path)))
    assert auth is not None
    old = sign(good(), rsa1.private, "RS256", "2026-01")
    new = sign(good(), rsa2.private, "RS256", "2026-02")
    ec = sign(good(), ec1, "ES256", "2026-03")
    assert auth.verify(old, now=NOW)
    with pytest.raises(AuthError, match="unknown key id"):
        auth.verify(new, now=NOW)

    write_jwks(path, rsa1.jwk("2026-01"), rsa2.jwk("2026-02"))  # add
    assert auth.verify(new, now=NOW) and auth.verify(old, now=NOW)

    write_jwks(path, rsa2.jwk("2026-02"), ec_jwk(ec1, "2026-03"))  # retire the old one
    with pytest.raises(AuthError, match="unknown key id"):
        auth.verify(old, now=NOW)
    assert auth.verify(new, now=NOW) and auth.verify(ec, now=NOW)

    (tmp_path / "broken.tmp").write_text('{"keys": [')
    os.replace(tmp_path / "broken.tmp", path)
    assert auth.verify(new, now=NOW)  # the last good keys stay in force
    path.unlink()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="voxgate.auth"):
        assert auth.verify(ec, now=NOW) and auth.verify(ec, now=NOW)
    assert len([r for r in caplog.records if "stay in force" in r.message]) == 1

    write_jwks(path, rsa1.jwk("2026-01"))  # back, with only the first key
    with pytest.raises(AuthError, match="unknown key id"):
        auth.verify(new, now=NOW)
    assert auth.verify(old, now=NOW)


def test_in_place_rewrite_of_the_key_file_is_seen(tmp_path: Path, rsa1: RsaKey) -> None:
    """An editor that rewrites the same inode: the size or mtime changes."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [oct_jwk(b"a" * 32, "a")]}))
    auth = Authenticator(keys_file=str(path))
    path.write_text(json.dumps({"keys": [oct_jwk(b"a" * 32, "a"), rsa1.jwk("r1")]}))
    assert auth.verify(sign(good(), rsa1.private, "RS256", "r1"), now=NOW)


def test_missing_key_file_fails_at_startup(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Authenticator.from_config(GatewayConfig(
            auth_jwt_keys_file=str(tmp_path / "nope.json")))


def test_verification_is_quick(tmp_path: Path, rsa1: RsaKey, ec1: ecdsa.SigningKey) -> None:
    """Pure-Python verification runs on the event loop at each session start: it must
    stay in the low milliseconds."""
    path = write_jwks(tmp_path / "k.json", rsa1.jwk("r1"), ec_jwk(ec1, "e1"))
    auth = Authenticator(keys_file=str(path))
    for token in (sign(good(), rsa1.private, "RS256", "r1"), sign(good(), ec1, "ES256", "e1")):
        auth.verify(token, now=NOW)
        t0 = time.perf_counter()
        for _ in range(20):
            auth.verify(token, now=NOW)
        per_token_ms = (time.perf_counter() - t0) / 20 * 1000
        assert per_token_ms < 50, per_token_ms


# --- the exposure guard ---------------------------------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LOCALHOST", True), ("0.0.0.0", False), ("::", False),
    ("", False), ("10.0.0.5", False), ("gateway.internal", False),
    ("::ffff:127.0.0.1", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_exposure_problem() -> None:
    assert exposure_problem(GatewayConfig()) is None  # loopback: zero-config
    problem = exposure_problem(GatewayConfig(host="0.0.0.0"))
    assert problem is not None
    assert "0.0.0.0" in problem and "AUTH_JWT_SECRET" in problem
    assert "AUTH_DISABLED=true" in problem
    assert exposure_problem(GatewayConfig(host="0.0.0.0", auth_disabled=True)) is None
    assert exposure_problem(GatewayConfig(host="0.0.0.0", auth_jwt_secret=SECRET)) is None
    assert exposure_problem(GatewayConfig(host="0.0.0.0",
                                          auth_jwt_keys_file="/k.json")) is None
    assert "every address" in (exposure_problem(GatewayConfig(host="")) or "")


def test_the_secret_stays_out_of_repr() -> None:
    assert SECRET not in repr(GatewayConfig(auth_jwt_secret=SECRET))


# --- nothing but AuthError escapes ----------------------------------------------------

_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                 inner, max_size=3),
    max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64", "x"]),
                              _JSONISH, max_size=4),
       claims=st.dictionaries(st.sampled_from(["sub", "tenant", "exp", "nbf", "iat", "iss",
                                               "aud", "y"]), _JSONISH, max_size=6),
       signature=st.binary(max_size=80), signed=st.booleans())
def test_arbitrary_headers_and_claims_give_claims_or_auth_error(
        header: dict[str, Any], claims: dict[str, Any], signature: bytes,
        signed: bool) -> None:
    """Signed: a valid HS256 signature over arbitrary claims (the claims checks see
    everything); else arbitrary headers and signature bytes (the parser does)."""
    if signed:
        header = {**header, "alg": "HS256"}
        header.pop("crit", None)
        header.pop("b64", None)
    token = forge(header, claims, hmac_signer(SECRET.encode()) if signed
                  else (lambda m: signature))
    try:
        result = hs(issuer="i", audience="a").verify(token, now=NOW)
    except AuthError as exc:
        assert token not in str(exc)
    else:
        assert 1 <= len(result.tenant) <= 128
        assert result.raw["exp"] > NOW - 30 and result.raw["iss"] == "i"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.from_regex(r"[A-Za-z0-9_=-]{0,40}(\.[A-Za-z0-9_=-]{0,40}){0,4}",
                                               fullmatch=True))
def test_arbitrary_strings_give_auth_error(token: str) -> None:
    with pytest.raises(AuthError):
        hs().verify(token, now=NOW)


@pytest.mark.parametrize("raw", ["1e400", "-1e400", "NaN", "Infinity", str(10**400), "true"])
def test_numeric_dates_out_of_range(raw: str) -> None:
    """JSON numbers Python reads as inf, nan or an int past float range are refused."""
    body = '{"sub": "a", "exp": %s}' % raw  # noqa: UP031 (the raw JSON text is the point)
    token = forge({"alg": "HS256"}, {}, hmac_signer(SECRET.encode()))
    head = token.split(".")[0]
    signing_input = (head + "." + b64(body.encode())).encode()
    token = signing_input.decode() + "." + b64(hmac_signer(SECRET.encode())(signing_input))
    with pytest.raises(AuthError, match="exp"):
        hs().verify(token, now=NOW)


NO_CRYPTOGRAPHY = """
import sys
sys.modules["cryptography"] = None  # import cryptography now raises ImportError
import ecdsa, jwt, rsa
from jwt.algorithms import has_crypto
assert not has_crypto
from gateway.auth import Authenticator, VerificationKey, _jws
pub, priv = rsa.newkeys(1024)  # small: key generation only, speed
ec = ecdsa.SigningKey.generate(curve=ecdsa.NIST256p)
auth = Authenticator([VerificationKey("r", "RS256", pub),
                      VerificationKey("e", "ES256", ec.verifying_key)])
for kid, alg, key in (("r", "RS256", priv), ("e", "ES256", ec)):
    token = _jws().encode(b'{"sub": "a", "exp": 4000000000}', key, algorithm=alg,
                          headers={"kid": kid})
    assert auth.verify(token).tenant == "a"
print("ok")
"""


@pytest.mark.timeout(60)
def test_rs256_and_es256_work_without_cryptography() -> None:
    """The gateway image has no ``cryptography`` (Rust): RS256 and ES256 verify with
    PyJWT's own cryptography-backed algorithms unavailable."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", NO_CRYPTOGRAPHY], cwd=root,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
