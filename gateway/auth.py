"""Who may open a session: JWT verification for ``start.auth.token``, and the startup
guard that keeps an unauthenticated gateway off public addresses.

Keys come from ``AUTH_JWT_SECRET`` (one HS256 secret) and/or ``AUTH_JWT_KEYS_FILE`` (a
JSON Web Key Set, RFC 7517, with ``oct``, ``RSA`` and ``EC`` P-256 keys). Each key is
pinned to exactly one algorithm by its type (oct: HS256, RSA: RS256, EC: ES256), so a
token can never choose how its key is interpreted: the classic confusion where an HS256
token is "signed" with an RSA public key as the HMAC secret fails on the pin. ``none``
and every other algorithm are never registered.

The core is Rust-free: PyJWT parses the compact form (strict base64url, ``crit``),
HS256 is PyJWT's own HMAC on ``hashlib``, RS256 is the pure-Python ``rsa`` package
(RSASSA-PKCS1-v1_5 with SHA-256) and ES256 the pure-Python ``ecdsa`` package (P-256,
the JWS raw ``r||s`` signature form). Only public keys are used here, so the lack of
constant-time arithmetic in those packages leaks nothing: verification handles no
secret except the HMAC key, which ``hmac.compare_digest`` protects.

The claims are checked here rather than by PyJWT because PyJWT reads the wall clock,
and ``Authenticator.verify`` takes ``now`` so tests (and the session) can pin time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ecdsa
import ecdsa.util
import jwt
import rsa
import rsa.common
from jwt.algorithms import Algorithm, HMACAlgorithm

if TYPE_CHECKING:
    from .config import GatewayConfig

log = logging.getLogger("voxgate.auth")

MIN_HMAC_KEY_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash
MIN_RSA_BITS = 2048  # NIST SP 800-131A: shorter RSA keys are no longer acceptable
MAX_TOKEN_BYTES = 16 * 1024  # a JWT larger than this is refused before it is parsed
MAX_TENANT_CHARS = 128  # the tenant ends up in storage keys and metric labels
_SAFE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,64}")  # a kid we are willing to echo back


class AuthError(Exception):
    """A token was refused. The message says what is wrong (expired, wrong issuer, unknown
    key id...) and is safe to show the client: it never contains the token."""


@dataclass(frozen=True)
class Claims:
    """The verified identity behind a session.

    Attributes:
        subject: the ``sub`` claim ("" when the token has none).
        tenant: the ``tenant`` claim, else ``sub``: whose recordings and flowIds these are.
        raw: every claim of the token, for callers that need more (roles, scopes).
    """

    subject: str
    tenant: str
    raw: Mapping[str, Any]


# --- algorithms (registered on a private PyJWS, never on PyJWT's global one) ----------


class _RS256(Algorithm):
    """RSASSA-PKCS1-v1_5 with SHA-256 on the pure-Python ``rsa`` package."""

    def prepare_key(self, key: Any) -> Any:
        if not isinstance(key, rsa.PublicKey | rsa.PrivateKey):
            raise jwt.InvalidKeyError("RS256 needs an RSA key")
        return key

    def sign(self, msg: bytes, key: Any) -> bytes:
        if not isinstance(key, rsa.PrivateKey):
            raise jwt.InvalidKeyError("RS256 signing needs an RSA private key")
        return bytes(rsa.sign(msg, key, "SHA-256"))

    def verify(self, msg: bytes, key: Any, sig: bytes) -> bool:
        public = rsa.PublicKey(key.n, key.e)
        if len(sig) != rsa.common.byte_size(public.n):
            return False
        try:
            # rsa.verify takes the hash from the signature itself: insist it is SHA-256,
            # or a SHA-1 signature of the same bytes would pass as RS256.
            return bool(rsa.verify(msg, sig, public) == "SHA-256")
        except (rsa.VerificationError, OverflowError, ValueError):
            return False

    @staticmethod
    def to_jwk(key_obj: Any, as_dict: bool = False) -> Any:
        jwk = {"kty": "RSA", "n": _b64uint(key_obj.n), "e": _b64uint(key_obj.e)}
        return jwk if as_dict else json.dumps(jwk)

    @staticmethod
    def from_jwk(jwk: Any) -> Any:
        obj = json.loads(jwk) if isinstance(jwk, str) else jwk
        return rsa.PublicKey(_uint(obj, "n"), _uint(obj, "e"))


class _ES256(Algorithm):
    """ECDSA on P-256 with SHA-256 on the pure-Python ``ecdsa`` package; signatures in
    the JWS form (RFC 7518 §3.4): ``r`` and ``s`` as 32 bytes each, not DER."""

    def prepare_key(self, key: Any) -> Any:
        if not isinstance(key, ecdsa.VerifyingKey | ecdsa.SigningKey):
            raise jwt.InvalidKeyError("ES256 needs an EC key")
        if key.curve != ecdsa.NIST256p:
            raise jwt.InvalidKeyError("ES256 needs a P-256 key")
        return key

    def sign(self, msg: bytes, key: Any) -> bytes:
        if not isinstance(key, ecdsa.SigningKey):
            raise jwt.InvalidKeyError("ES256 signing needs an EC private key")
        return bytes(key.sign_deterministic(msg, hashfunc=hashlib.sha256,
                                            sigencode=ecdsa.util.sigencode_string))

    def verify(self, msg: bytes, key: Any, sig: bytes) -> bool:
        public = key.verifying_key if isinstance(key, ecdsa.SigningKey) else key
        if len(sig) != 64:
            return False
        try:
            return bool(public.verify(sig, msg, hashfunc=hashlib.sha256,
                                      sigdecode=ecdsa.util.sigdecode_string))
        except (ecdsa.BadSignatureError, ecdsa.util.MalformedSignature):
            return False

    @staticmethod
    def to_jwk(key_obj: Any, as_dict: bool = False) -> Any:
        public = key_obj.verifying_key if isinstance(key_obj, ecdsa.SigningKey) else key_obj
        raw = public.to_string("raw")
        jwk = {"kty": "EC", "crv": "P-256", "x": _b64(raw[:32]), "y": _b64(raw[32:])}
        return jwk if as_dict else json.dumps(jwk)

    @staticmethod
    def from_jwk(jwk: Any) -> Any:
        obj = json.loads(jwk) if isinstance(jwk, str) else jwk
        if obj.get("crv") != "P-256":
            raise ValueError("only the P-256 curve is supported (ES256)")
        x, y = _bytes(obj, "x"), _bytes(obj, "y")
        if len(x) != 32 or len(y) != 32:
            raise ValueError("a P-256 key needs 32-byte x and y")
        try:  # from_string checks that the point is on the curve
            return ecdsa.VerifyingKey.from_string(x + y, curve=ecdsa.NIST256p)
        except (ecdsa.MalformedPointError, ValueError) as exc:
            raise ValueError("x and y are not a point of P-256") from exc


ALGORITHMS: dict[str, Algorithm] = {
    "HS256": HMACAlgorithm(HMACAlgorithm.SHA256),
    "RS256": _RS256(),
    "ES256": _ES256(),
}
_ALG_OF_KTY = {"oct": "HS256", "RSA": "RS256", "EC": "ES256"}


def _jws() -> jwt.PyJWS:
    """A PyJWS that knows exactly our three algorithms (PyJWT's defaults, which use the
    Rust-based ``cryptography`` when it happens to be installed, are all removed)."""
    jws = jwt.PyJWS(algorithms=[], options={"enforce_minimum_key_length": True})
    for name, alg in ALGORITHMS.items():
        jws.register_algorithm(name, alg)
    return jws


# --- keys ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationKey:
    """One key a token may be signed with.

    Attributes:
        kid: its key id (``None`` for AUTH_JWT_SECRET and kid-less JWKs).
        alg: the one algorithm it verifies (HS256, RS256 or ES256).
        material: HMAC bytes, an ``rsa.PublicKey`` or an ``ecdsa.VerifyingKey``.
    """

    kid: str | None
    alg: str
    material: Any


def load_jwks(text: str, source: str = "key set") -> list[VerificationKey]:
    """Parse a JSON Web Key Set into verification keys.

    Keys marked ``"use": "enc"`` and key types or curves other than oct, RSA and EC P-256
    are skipped with a warning (an identity provider's set may hold them); a key that is
    meant for us but unsafe is an error.

    Args:
        text: the JSON text, ``{"keys": [...]}``.
        source: what to call it in error messages (the file name).

    Returns:
        The keys, in file order.

    Raises:
        ValueError: malformed JSON, an oct key shorter than 32 bytes, an RSA key shorter
            than 2048 bits, an ``alg`` that contradicts the key type, a duplicate kid, or
            no usable key at all.
    """
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError(f'{source}: a JSON Web Key Set is an object {{"keys": [...]}}')
    keys: list[VerificationKey] = []
    seen: set[str | None] = set()
    for i, jwk in enumerate(doc["keys"]):
        where = f"{source}: key {i}"
        if not isinstance(jwk, dict):
            raise ValueError(f"{where} is not an object")
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ValueError(f"{where}: kid must be a string")
        where = f"{source}: key {i}" + (f" (kid {kid!r})" if kid else "")
        kty = jwk.get("kty")
        if jwk.get("use", "sig") != "sig" or kty not in _ALG_OF_KTY or (
                kty == "EC" and jwk.get("crv") != "P-256"):
            log.warning("%s skipped: only signing keys of type oct, RSA and EC P-256 "
                        "are used", where)
            continue
        alg = _ALG_OF_KTY[kty]
        if jwk.get("alg", alg) != alg:
            raise ValueError(f"{where}: a {kty} key verifies {alg} only, not "
                             f"{jwk.get('alg')!r}")
        try:
            material = _material(kty, jwk)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if kid in seen:
            raise ValueError(f"{where}: two keys have the same kid")
        seen.add(kid)
        keys.append(VerificationKey(kid, alg, material))
    if not keys:
        raise ValueError(f"{source}: no usable key (oct, RSA or EC P-256)")
    return keys


def _material(kty: str, jwk: Mapping[str, Any]) -> Any:
    if kty == "oct":
        secret = _bytes(jwk, "k")
        if len(secret) < MIN_HMAC_KEY_BYTES:
            raise ValueError(f"an oct (HS256) key must be {MIN_HMAC_KEY_BYTES} bytes at "
                             f"least, this one has {len(secret)}")
        return secret
    if kty == "RSA":
        key = _RS256.from_jwk(jwk)
        if key.n.bit_length() < MIN_RSA_BITS:
            raise ValueError(f"an RSA key must have {MIN_RSA_BITS} bits at least, this "
                             f"one has {key.n.bit_length()}")
        if key.e < 3 or key.e % 2 == 0:
            raise ValueError("the RSA exponent e must be odd and at least 3")
        return key
    return _ES256.from_jwk(jwk)


def _bytes(jwk: Mapping[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"member {name!r} is missing")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"member {name!r} is not base64url") from None


def _uint(jwk: Mapping[str, Any], name: str) -> int:
    return int.from_bytes(_bytes(jwk, name), "big")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64uint(n: int) -> str:
    return _b64(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))


_GONE = (-1, -1, -1)  # the stamp of a key file that could not be stat'ed


class _KeyFile:
    """AUTH_JWT_KEYS_FILE, reread when it changes (rotation without a restart).

    A change is a new (mtime, size, inode): that catches an in-place rewrite and the
    rename or symlink swap that tools and Kubernetes use. A file that fails to load after
    a change leaves the previous keys in force and is logged once; the next change is
    tried again.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp = self._stat()
        with open(path, encoding="utf-8") as fh:
            self.keys = load_jwks(fh.read(), path)

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> list[VerificationKey]:
        try:
            stamp = self._stat()
        except OSError as exc:
            if self._stamp != _GONE:  # logged once, not at every session start
                self._stamp = _GONE
                log.error("AUTH_JWT_KEYS_FILE %s: %s; the last keys loaded stay in force",
                          self.path, exc.strerror)
            return self.keys
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                with open(self.path, encoding="utf-8") as fh:
                    self.keys = load_jwks(fh.read(), self.path)
            except (OSError, ValueError) as exc:
                log.error("AUTH_JWT_KEYS_FILE changed but cannot be used (%s); the last "
                          "keys loaded stay in force", exc)
            else:
                log.info("AUTH_JWT_KEYS_FILE reloaded: %d keys", len(self.keys))
        return self.keys


# --- the authenticator -----------------------------------------------------------------


class Authenticator:
    """Verifies session tokens against the configured keys and claims policy.

    Args:
        keys: fixed keys (AUTH_JWT_SECRET becomes one kid-less HS256 key).
        keys_file: a JWKS path reread on change, its keys added to ``keys``.
        issuer: when non-empty, ``iss`` must equal it.
        audience: when non-empty, ``aud`` (a string or a list) must contain it; when
            empty, a token that names an audience is refused (RFC 7519 §4.1.3).
        leeway_s: clock skew allowed on ``exp``, ``nbf`` and ``iat``, s.
    """

    def __init__(self, keys: list[VerificationKey] | None = None, *,
                 keys_file: str | None = None, issuer: str = "", audience: str = "",
                 leeway_s: float = 30.0) -> None:
        self._keys = list(keys or [])
        for key in self._keys:
            if key.alg == "HS256" and len(key.material) < MIN_HMAC_KEY_BYTES:
                raise ValueError(f"an HS256 key must be {MIN_HMAC_KEY_BYTES} bytes at least")
        self._file = _KeyFile(keys_file) if keys_file else None
        if not self._keys and self._file is None:
            raise ValueError("an Authenticator needs at least one key")
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self._jws = _jws()

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> Authenticator | None:
        """The gateway's authenticator, or ``None`` when neither AUTH_JWT_SECRET nor
        AUTH_JWT_KEYS_FILE is set (no authentication).

        Raises:
            ValueError: the key file is missing, malformed or holds an unsafe key.
            FileNotFoundError: AUTH_JWT_KEYS_FILE does not exist.
        """
        if not cfg.auth_jwt_secret and not cfg.auth_jwt_keys_file:
            return None
        keys = []
        if cfg.auth_jwt_secret:
            keys.append(VerificationKey(None, "HS256", cfg.auth_jwt_secret.encode()))
        return cls(keys, keys_file=cfg.auth_jwt_keys_file or None,
                   issuer=cfg.auth_jwt_issuer, audience=cfg.auth_jwt_audience,
                   leeway_s=cfg.auth_jwt_leeway_s)

    def keys(self) -> list[VerificationKey]:
        """The keys in force now (the key file is reread if it changed)."""
        return self._keys + (self._file.current() if self._file else [])

    def verify(self, token: str, *, now: float | None = None) -> Claims:
        """Check a token's signature and claims.

        Args:
            token: the compact JWT from ``start.auth.token``.
            now: the time to judge ``exp``/``nbf``/``iat`` by, Unix seconds (default:
                the wall clock).

        Returns:
            The verified claims, with the tenant resolved.

        Raises:
            AuthError: the token is missing, malformed, signed by an unknown key or with
                the wrong algorithm, badly signed, expired, not yet valid, for another
                issuer or audience, or names no usable tenant.
        """
        if not token:
            raise AuthError("auth.token is required")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise AuthError(f"the token is not a JWT of at most {MAX_TOKEN_BYTES} bytes")
        try:
            header = self._jws.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("the token is not a well-formed JWT") from None
        key = self._key_for(header)
        alg = header.get("alg")
        if alg != key.alg:
            named = repr(alg) if alg in ("none", *ALGORITHMS) else "an unsupported one"
            raise AuthError(f"the token's algorithm is {named}; its key verifies "
                            f"{key.alg} only")
        try:
            payload = self._jws.decode(token, key.material, algorithms=[key.alg])
        except jwt.InvalidSignatureError:
            raise AuthError("the token's signature is not valid") from None
        except jwt.InvalidKeyError:
            raise AuthError("the token's key cannot verify it") from None
        except jwt.InvalidTokenError:
            raise AuthError("the token is not a well-formed JWT") from None
        try:
            claims = json.loads(payload)
        except (ValueError, RecursionError):
            raise AuthError("the token's claims are not JSON") from None
        if not isinstance(claims, dict):
            raise AuthError("the token's claims are not a JSON object")
        return self._check_claims(claims, time.time() if now is None else now)

    def _key_for(self, header: Mapping[str, Any]) -> VerificationKey:
        keys = self.keys()
        kid = header.get("kid")
        if kid is not None:
            for key in keys:
                if key.kid == kid:
                    return key
            if len(keys) == 1 and keys[0].kid is None:
                # AUTH_JWT_SECRET alone names no kid: an issuer's kid is only a hint then
                # (RFC 7515 §4.1.4), and the signature still has to verify with it.
                return keys[0]
            shown = f" {kid!r}" if _SAFE_ID.fullmatch(kid) else ""
            raise AuthError(f"unknown key id (kid){shown}")
        # No kid: the only key, or the only kid-less one (AUTH_JWT_SECRET next to a key
        # set); never a guess among several.
        kidless = [k for k in keys if k.kid is None]
        if len(keys) == 1:
            return keys[0]
        if len(kidless) == 1:
            return kidless[0]
        raise AuthError(f"the token has no key id (kid) and {len(keys)} keys are "
                        "configured")

    def _check_claims(self, claims: dict[str, Any], now: float) -> Claims:
        exp = _numeric(claims, "exp")
        if exp is None:
            raise AuthError("the token has no expiry (exp)")
        if exp <= now - self.leeway_s:
            raise AuthError("the token has expired")
        nbf = _numeric(claims, "nbf")
        if nbf is not None and nbf > now + self.leeway_s:
            raise AuthError("the token is not valid yet (nbf)")
        iat = _numeric(claims, "iat")
        if iat is not None and iat > now + self.leeway_s:
            raise AuthError("the token was issued in the future (iat)")
        if self.issuer:
            iss = claims.get("iss")
            if iss is None:
                raise AuthError("the token has no issuer (iss)")
            if iss != self.issuer:
                raise AuthError("the token is from another issuer (iss)")
        aud = claims.get("aud")
        auds: list[Any] = [] if aud is None else [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
            raise AuthError("the token's audience (aud) is not a string or a list of them")
        if self.audience:
            if aud is None:
                raise AuthError("the token has no audience (aud)")
            if self.audience not in auds:
                raise AuthError("the token is for another audience (aud)")
        elif auds:
            raise AuthError("the token is for an audience (aud) this gateway was not told "
                            "it is")
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise AuthError("the token's subject (sub) is not a string")
        tenant = claims.get("tenant", sub)
        if tenant is None:
            raise AuthError("the token names no tenant (tenant or sub)")
        if not isinstance(tenant, str):
            raise AuthError("the token's tenant is not a string")
        if not tenant or len(tenant) > MAX_TENANT_CHARS:
            raise AuthError(f"the token's tenant must have 1 to {MAX_TENANT_CHARS} "
                            "characters")
        if not tenant.isprintable():
            raise AuthError("the token's tenant has control characters")
        return Claims(subject=sub or "", tenant=tenant, raw=claims)


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 §2): a finite JSON number, not a boolean."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise AuthError(f"the token's {name} is not a number")
    try:
        return float(value)
    except OverflowError:  # an integer past float range: no date anyone means
        raise AuthError(f"the token's {name} is out of range") from None


# --- the startup guard -----------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that could resolve to anything


def exposure_problem(cfg: GatewayConfig) -> str | None:
    """Why this config must not start, or ``None``.

    A gateway on an address other machines can reach, with no AUTH_JWT_SECRET or
    AUTH_JWT_KEYS_FILE, would let anyone stream, fill the archive and read recordings'
    links; it starts only when AUTH_DISABLED says that is meant (behind an authenticating
    proxy, say). On loopback the embedded default stays zero-config.
    """
    if is_loopback(cfg.host) or cfg.auth_jwt_secret or cfg.auth_jwt_keys_file:
        return None
    if cfg.auth_disabled:
        return None
    return (f"refusing to listen on {cfg.host or 'every address'} without authentication: "
            "set AUTH_JWT_SECRET or AUTH_JWT_KEYS_FILE, or AUTH_DISABLED=true if something "
            "in front of the gateway authenticates its clients")
