"""Signed, expiring URLs for recordings (``record_url``).

A recording holds a person's voice, so ``/records/<key>`` is served only to whoever
holds a URL the gateway signed: ``<path>?exp=<unix s>&sig=<HMAC-SHA256>``. The HMAC
covers the exact path bytes and the expiry, so a URL cannot be stretched in time or
pointed at another recording, and nothing needs to be stored per URL (any replica with
the same ``RECORDS_URL_KEY`` accepts it).

Verification is strict on purpose: the path must be byte for byte the one that was
signed (no percent-encoding, no ``..``, no doubled ``/``; the caller passes the raw
request path), and the query must be exactly ``exp`` and ``sig``, each once, in
canonical form. Anything else is simply invalid: there is no second way to spell a
valid URL, so there is nothing to normalise and nothing to get wrong.

Sans-IO: the clock is read only when the caller passes no ``now``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import GatewayConfig

MIN_KEY_BYTES = 32  # HMAC-SHA256: a shorter key is weaker than the hash
SIG_CHARS = 43  # URL-safe base64 of 32 bytes, without padding
EXP_MAX_DIGITS = 12  # unix seconds up to the year 33658: no huge integers to parse
# The paths this signer will sign: printable ASCII that needs no percent-encoding in a
# URL path, so the bytes a client sends back are the bytes that were signed.
PATH = re.compile(r"/[A-Za-z0-9._~:@!$&'()*+,;=/\-]*")
_DOMAIN = b"voxgate record_url v1\x00"  # keeps these MACs apart from any other use of the key


class UrlSigner:
    """Signs and checks ``record_url`` paths with HMAC-SHA256 over path and expiry.

    Args:
        key: the HMAC key, at least 32 bytes (``RECORDS_URL_KEY``).
        ttl_s: how long a signed URL stays valid, seconds (``RECORDS_URL_TTL_S``).

    Raises:
        ValueError: a key shorter than 32 bytes, or a TTL below one second.
    """

    def __init__(self, key: bytes, ttl_s: int) -> None:
        if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the record URL key must be {MIN_KEY_BYTES} bytes at least")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
            raise ValueError(f"ttl_s must be a whole number of seconds >= 1, not {ttl_s!r}")
        self._key = key
        self.ttl_s = ttl_s

    def __repr__(self) -> str:  # never the key
        return f"UrlSigner(ttl_s={self.ttl_s})"

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> UrlSigner:
        """The signer ``cfg`` describes: ``RECORDS_URL_KEY`` (else a random 32-byte key,
        so links die with the process) and ``RECORDS_URL_TTL_S``."""
        key = (cfg.records_url_key.encode() if cfg.records_url_key
               else secrets.token_bytes(MIN_KEY_BYTES))
        return cls(key, cfg.records_url_ttl_s)

    def sign(self, path: str, *, now: float | None = None) -> str:
        """``path`` with ``?exp=...&sig=...`` appended, valid for ``ttl_s`` from ``now``.

        Args:
            path: an absolute URL path such as ``/records/acme/f1.ogg``, in characters
                that need no percent-encoding.
            now: unix time, seconds (default: the wall clock).

        Raises:
            ValueError: a path this signer will not sign.
        """
        if not PATH.fullmatch(path):
            raise ValueError(f"cannot sign the path {path!r}")
        exp = str(int(time.time() if now is None else now) + self.ttl_s)
        return f"{path}?exp={exp}&sig={self._mac(path.encode(), exp.encode())}"

    def verify(self, path: str, query_string: bytes, *, now: float | None = None) -> bool:
        """Whether ``query_string`` carries a valid, unexpired signature for ``path``.

        Args:
            path: the request path exactly as the client sent it (ASGI ``raw_path``,
                decoded as ASCII), not a decoded or normalised one.
            query_string: the raw query (ASGI ``query_string``).
            now: unix time, seconds (default: the wall clock).
        """
        if not PATH.fullmatch(path):
            return False
        params = _params(query_string)
        if params is None:
            return False
        exp, sig = params
        if int(exp) <= (time.time() if now is None else now):
            return False
        expected = self._mac(path.encode(), exp).encode()
        return hmac.compare_digest(expected, sig)

    def _mac(self, path: bytes, exp: bytes) -> str:
        digest = hmac.new(self._key, _DOMAIN + path + b"\x00" + exp, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _params(query_string: bytes) -> tuple[bytes, bytes] | None:
    """``(exp, sig)`` from a query of exactly ``exp=<digits>&sig=<43 chars>`` in either
    order, or None. Duplicates, extra parameters and non-canonical numbers are refused:
    a signed URL has one spelling."""
    found: dict[bytes, bytes] = {}
    for item in query_string.split(b"&"):
        name, eq, value = item.partition(b"=")
        if not eq or name not in (b"exp", b"sig") or name in found:
            return None
        found[name] = value
    exp, sig = found.get(b"exp"), found.get(b"sig")
    if exp is None or sig is None:
        return None
    if not (0 < len(exp) <= EXP_MAX_DIGITS and exp.isdigit() and exp.isascii()) \
            or exp.startswith(b"0"):
        return None
    if len(sig) != SIG_CHARS:
        return None
    return exp, sig
