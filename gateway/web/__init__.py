"""The browser client's files (``/`` and ``/web/<name>``) and the headers they go out with.

The page is plain ES modules with no build step, so the files are served as they are in
the package. They are read once, on first use: a handful of kilobytes, and a fixed set
of names, so no request path ever reaches the file system.

Caching: the names carry no content hash, so a long ``max-age`` would keep an old page
after an upgrade; ``no-cache`` with a strong ETag revalidates cheaply instead (304).

Content-Security-Policy: everything off (``default-src 'none'``) except this origin's
scripts, styles and the worklet, WebSocket connections to this host on any port (the
stream is on another port than this HTTP side: 8080 vs 8081 by default) and the
recording, which the gateway serves from this origin unless the operator adds origins
(``extra_origins``: ``PUBLIC_BASE`` or an object store the recordings redirect to).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # module scripts need a JavaScript type
    ".css": "text/css; charset=utf-8",
}
FILES = ("index.html", "app.js", "capture-worklet.js", "style.css")
# A Host header we are willing to copy into the CSP: a DNS name, IPv4, or [IPv6].
_HOST = re.compile(r"^(?P<name>[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")


@dataclass(frozen=True)
class Asset:
    """One file of the page, ready to send."""

    body: bytes
    content_type: str
    etag: str


@functools.cache
def assets() -> dict[str, Asset]:
    """The page's files by URL path, read from the package once."""
    base = resources.files(__name__)
    out: dict[str, Asset] = {}
    for name in FILES:
        body = (base / name).read_bytes()
        ext = name[name.rfind("."):]
        asset = Asset(body, CONTENT_TYPES[ext],
                      '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
        out["/" if name == "index.html" else f"/web/{name}"] = asset
    return out


def page(ws_port: int | None) -> Asset:
    """The page at ``/``, telling the script the gateway's WebSocket port if known.

    The port goes into a ``<meta>`` element (data, not script, so the CSP stays
    ``script-src 'self'``); without it the page assumes 8080, the default port.
    """
    asset = assets()["/"]
    if ws_port is None:
        return asset
    return _with_port(asset, int(ws_port))


@functools.cache
def _with_port(asset: Asset, ws_port: int) -> Asset:
    body = asset.body.replace(b'<meta name="voxgate-ws-port" content="">',
                              f'<meta name="voxgate-ws-port" content="{ws_port}">'.encode())
    return Asset(body, asset.content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def csp(host: str | None, extra_origins: Sequence[str] = ()) -> str:
    """The page's Content-Security-Policy for a request that named ``host``.

    Args:
        host: the request's Host header (``name[:port]``); WebSockets may go to that
            name on any port. Anything that does not look like a host is ignored.
        extra_origins: origins besides this one that may serve the recording and the
            stream (for example ``https://records.example.com``).
    """
    connect = ["'self'"]
    m = _HOST.match(host or "")
    if m:
        connect += [f"ws://{m['name']}:*", f"wss://{m['name']}:*"]
    extra = [o for o in extra_origins if re.fullmatch(r"(?:https?|wss?)://[^\s;,']+", o)]
    media = ["'self'", *extra]
    return "; ".join([
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src " + " ".join(connect + extra),
        "media-src " + " ".join(media),
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


def response_headers(asset: Asset, host: str | None,
                     extra_origins: Sequence[str] = ()) -> list[tuple[bytes, bytes]]:
    """Headers for ``asset`` besides its length."""
    headers = [
        (b"content-type", asset.content_type.encode()),
        (b"cache-control", b"no-cache"),
        (b"etag", asset.etag.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]
    if asset.content_type.startswith("text/html"):
        headers.append((b"content-security-policy", csp(host, extra_origins).encode()))
        # the microphone is the page's whole point; nothing else is allowed
        headers.append((b"permissions-policy", b"microphone=(self), camera=(), geolocation=()"))
    return headers
