"""Fuzzing the session token check (``gateway.auth.Authenticator.verify``).

The token is the first thing an unauthenticated client controls that reaches a parser.
Whatever it is (arbitrary text, a JWT with a mutated header or claims, correctly signed
or not) ``verify`` returns Claims or raises ``AuthError``, whose message is sent to the
client; any other exception would fail the session with INTERNAL instead of
UNAUTHORIZED. Tokens are signed here with HMAC-SHA256 by hand, so that headers and claims
that no JWT library would produce (huge numbers, NaN, deep nesting, duplicate keys) are
signed correctly and reach the claims checks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.auth import MAX_TENANT_CHARS, Authenticator, AuthError, Claims, VerificationKey

SECRET = b"s" * 32
OTHER = b"o" * 32
NOW = 1_800_000_000.0
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

AUTHS = {
    "secret": Authenticator([VerificationKey(None, "HS256", SECRET)]),
    "secret+kid": Authenticator([VerificationKey(None, "HS256", SECRET),
                                 VerificationKey("k1", "HS256", OTHER)],
                                issuer="https://issuer", audience="voxgate"),
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header: str, payload: str, key: bytes = SECRET) -> str:
    head = b64(header.encode("utf-8", "surrogatepass")) + "." + b64(
        payload.encode("utf-8", "surrogatepass"))
    mac = hmac.new(key, head.encode(), hashlib.sha256).digest()
    return head + "." + b64(mac)


def verify_checked(auth: Authenticator, token: Any) -> Claims | AuthError:
    try:
        claims = auth.verify(token, now=NOW)
    except AuthError as exc:
        assert isinstance(str(exc), str) and len(str(exc)) <= 300, str(exc)[:300]
        return exc
    assert isinstance(claims, Claims)
    assert isinstance(claims.tenant, str) and 0 < len(claims.tenant) <= MAX_TENANT_CHARS
    assert claims.tenant.isprintable()
    claims.tenant.encode("utf-8")  # it becomes part of storage keys and metric labels
    assert isinstance(claims.subject, str)
    return claims


json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=20)
                | st.sampled_from(["HS256", "none", "RS256", "ES256", "k1", "voxgate",
                                   "https://issuer", "\ud800", "", NOW + 60, NOW - 3600]))
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=10)
RAW = ["1" * 5000, "1e999", "NaN", "-Infinity", "[" * 3000 + "]" * 3000, "1e308",
       "18000000000000000000000"]


@st.composite
def mutated_json(draw: st.DrawFn, base: dict[str, Any]) -> str:
    obj = dict(base)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*sorted(base), "x", "kid", "crit", "b64"]))
        if draw(st.booleans()):
            obj[key] = draw(json_values)
        else:
            obj.pop(key, None)
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0 and obj:
        key = draw(st.sampled_from(sorted(obj)))
        text = text.replace(json.dumps(key) + ": " + json.dumps(obj[key], ensure_ascii=False),
                            json.dumps(key) + ": " + draw(st.sampled_from(RAW)), 1)
    return text


HEADER = {"alg": "HS256", "typ": "JWT"}
CLAIMS = {"sub": "user-1", "tenant": "acme", "exp": NOW + 600, "iat": NOW - 10,
          "iss": "https://issuer", "aud": "voxgate"}


@FUZZ
@given(st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-=]*",
                                           fullmatch=True),
       st.sampled_from(sorted(AUTHS)))
@example("..", "secret")
@example("a.b.c.d", "secret")
@example("e30.e30.", "secret")
@example("x" * 20000, "secret")
def test_any_text_token_gives_claims_or_auth_error(token: str, which: str) -> None:
    verify_checked(AUTHS[which], token)


@FUZZ
@given(st.just(json.dumps(HEADER)) | st.just('{"alg":"HS256","kid":"k1"}')
       | mutated_json(HEADER), mutated_json(CLAIMS), st.sampled_from([SECRET, OTHER, b"x" * 32]),
       st.sampled_from(sorted(AUTHS)))
@example('{"alg":"HS256","kid":7}', json.dumps(CLAIMS), SECRET, "secret+kid")
@example('{"alg":"HS256","kid":["k1"]}', json.dumps(CLAIMS), SECRET, "secret+kid")
@example('{"alg":["HS256"]}', json.dumps(CLAIMS), SECRET, "secret")
@example('{"alg":"HS256"}', '{"exp":' + "1" * 5000 + "}", SECRET, "secret")
@example('{"alg":"HS256"}', '{"exp":1e999,"sub":"a"}', SECRET, "secret")
@example('{"alg":"HS256"}', '{"exp":1800000600,"tenant":"\\ud800"}', SECRET, "secret")
@example('{"alg":"HS256"}', '{"exp":1800000600,"sub":"a","aud":[["x"]]}', SECRET, "secret")
def test_signed_mutated_tokens_give_claims_or_auth_error(header: str, claims: str,
                                                         key: bytes, which: str) -> None:
    result = verify_checked(AUTHS[which], sign(header, claims, key))
    if isinstance(result, Claims):
        # Accepted means: signed with a configured key and not expired.
        assert key in (SECRET, OTHER)
        exp = result.raw["exp"]
        assert isinstance(exp, int | float) and exp > NOW - 30 - 1e-6


def test_the_valid_token_passes() -> None:
    """The harness can tell: the unmutated token is accepted by both configurations."""
    plain = {k: v for k, v in CLAIMS.items() if k not in ("aud", "iss")}
    for which, claims_obj in (("secret", plain), ("secret+kid", CLAIMS)):
        claims = verify_checked(AUTHS[which], sign(json.dumps(HEADER), json.dumps(claims_obj)))
        assert isinstance(claims, Claims) and claims.tenant == "acme"
        # ...and the same token signed with a key nobody configured is not.
        forged = sign(json.dumps(HEADER), json.dumps(claims_obj), b"x" * 32)
        assert isinstance(verify_checked(AUTHS[which], forged), AuthError)
