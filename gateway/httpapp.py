"""The gateway's plain HTTP side (ASGI, served by hypercorn): probes, metrics, recordings,
and the browser client (``/`` and ``/web/*``, see ``gateway/web``).

GET/HEAD /records/<key> serves a recording with ``audio/ogg`` and byte ranges, so a
browser's <audio> element can seek in it. With object storage (``ARCHIVE_STORE=s3``) it
answers 307 with a short-lived presigned URL instead, so the bytes and their ranges come
straight from the store and the gateway stays out of the data path.

Recordings are people's voices: with a :class:`~gateway.signing.UrlSigner` (the server
always passes one) a request needs the ``exp`` and ``sig`` of a signed ``record_url``,
checked before anything else, so an unsigned request gets the same 403 whether the
recording exists or not (a HEAD tells nothing), and the S3 store is not even asked.

``/metrics`` can move to its own port (``METRICS_PORT``, :func:`metrics_app`), so that
exposing recordings to users does not expose the gateway's metrics with them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from . import web
from .records import LinkedRecordStore, LocalStore, RecordStore, RecordStoreError
from .signing import UrlSigner

log = logging.getLogger("voxgate.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 64 * 1024
RECORDS = "/records/"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayHttpApp:
    """The gateway's HTTP side.

    Args:
        store: where recordings are (None: archiving is off, every recording is 404).
        metrics: renders the Prometheus exposition.
        ready: whether ``/readyz`` says ready.
        web_origins: more origins for the browser page's CSP.
        signer: checks ``record_url`` signatures; None serves recordings to anyone
            (only for callers that predate signed URLs).
        serve_metrics: False when ``/metrics`` has its own port (``METRICS_PORT``):
            this app then answers 404 for it.
    """

    def __init__(self, *, store: RecordStore | None, metrics: Callable[[], bytes],
                 ready: Callable[[], bool], web_origins: Sequence[str] = (),
                 signer: UrlSigner | None = None, serve_metrics: bool = True) -> None:
        self.store = store
        self.metrics = metrics
        self.ready = ready
        self.signer = signer
        self.serve_metrics = serve_metrics
        self.web_origins = tuple(web_origins)  # more origins for the page's CSP
        self.ws_port: int | None = None  # the WebSocket port, once bound: the page's default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/healthz":
            await _json(send, 200, {"status": "ok"})
        elif path == "/readyz":
            ok = self.ready()
            await _json(send, 200 if ok else 503, {"ready": ok})
        elif path == "/metrics" and self.serve_metrics:
            await _reply(send, 200, self.metrics(), METRICS_TYPE)
        elif path.startswith(RECORDS) and method in ("GET", "HEAD"):
            key = self._authorized_key(scope)
            if key is None:
                await _json(send, 403, {"error": "FORBIDDEN"},
                            [(b"cache-control", b"no-store")], head=method == "HEAD")
                return
            await self._record(scope, send, key, method == "HEAD")
        elif path in web.assets() and method in ("GET", "HEAD"):
            asset = web.page(self.ws_port) if path == "/" else web.assets()[path]
            await self._asset(scope, send, asset, method == "HEAD")
        else:
            await _json(send, 404, {"error": "NOT_FOUND"})

    def _authorized_key(self, scope: Scope) -> str | None:
        """The recording key of a ``/records/`` request whose signature holds, or None.

        The signature is checked on the path exactly as the client sent it (``raw_path``),
        and the key is taken from those same bytes: what was verified is what is served,
        whatever the server's decoding of ``%2F`` or ``..`` would have made of it.
        """
        if self.signer is None:
            return str(scope["path"]).removeprefix(RECORDS)
        raw = scope.get("raw_path")
        try:
            path = raw.decode("ascii") if isinstance(raw, bytes) else str(scope["path"])
        except UnicodeDecodeError:
            return None
        if not path.startswith(RECORDS):
            return None
        query = scope.get("query_string", b"")
        if not isinstance(query, bytes) or not self.signer.verify(path, query):
            return None
        return path.removeprefix(RECORDS)

    async def _record(self, scope: Scope, send: Send, key: str, head: bool) -> None:
        if isinstance(self.store, LinkedRecordStore):
            await self._redirect(send, self.store, key, head)
            return
        p = self.store.path(key) if isinstance(self.store, LocalStore) else None
        if p is None:
            await _json(send, 404, {"error": "NOT_FOUND"}, head=head)
            return
        size = p.stat().st_size
        start, end, status = 0, size - 1, 200
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if "range" in headers:
            m = RANGE.match(headers["range"].strip())
            parsed = _range(m, size) if m else None
            if parsed is None:
                await _reply(send, 416, b"", "text/plain",
                             [(b"content-range", f"bytes */{size}".encode())])
                return
            start, end = parsed
            status = 206
        extra = [(b"accept-ranges", b"bytes"), (b"cache-control", b"private, max-age=3600")]
        if status == 206:
            extra.append((b"content-range", f"bytes {start}-{end}/{size}".encode()))
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"audio/ogg"),
            (b"content-length", str(end - start + 1).encode()), *extra]})
        if head:
            await send({"type": "http.response.body", "body": b""})
            return
        async with await trio.open_file(p, "rb") as fh:
            await fh.seek(start)
            left = end - start + 1
            while left > 0:
                data = await fh.read(min(CHUNK, left))
                if not data:
                    break
                left -= len(data)
                await send({"type": "http.response.body", "body": data,
                            "more_body": left > 0})
        if left > 0:  # the file shrank under us; end the body anyway
            await send({"type": "http.response.body", "body": b""})


    async def _asset(self, scope: Scope, send: Send, asset: web.Asset, head: bool) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        extra = web.response_headers(asset, headers.get("host"), self.web_origins)
        if asset.etag in headers.get("if-none-match", ""):
            await send({"type": "http.response.start", "status": 304, "headers": extra[1:]})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            *extra, (b"content-length", str(len(asset.body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if head else asset.body})

    async def _redirect(self, send: Send, store: LinkedRecordStore, key: str,
                        head: bool) -> None:
        try:
            url = await store.link(key, "HEAD" if head else "GET")
        except RecordStoreError as exc:
            log.warning("record store unavailable for %s: %s", key, exc)
            await _json(send, 503, {"error": "STORE_UNAVAILABLE"},
                        [(b"retry-after", b"5")], head=head)
            return
        if url is None:
            await _json(send, 404, {"error": "NOT_FOUND"}, head=head)
            return
        # 307 keeps the method: a HEAD goes on as a HEAD, which its URL is signed for.
        # The URL expires, so nobody may cache the redirect.
        await _reply(send, 307, b"", "text/plain", [
            (b"location", url.encode()), (b"cache-control", b"no-store")])


def _range(m: re.Match[str], size: int) -> tuple[int, int] | None:
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 and size else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end


def metrics_app(metrics: Callable[[], bytes]) -> Callable[[Scope, Receive, Send],
                                                          Awaitable[None]]:
    """An ASGI app that serves only ``/metrics`` (rendered by ``metrics``) and
    ``/healthz``: the app of ``METRICS_PORT``, which only Prometheus should reach."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        head = scope["method"] == "HEAD"
        if scope["method"] not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "METHOD_NOT_ALLOWED"},
                        [(b"allow", b"GET, HEAD")])
        elif scope["path"] == "/metrics":
            await _reply(send, 200, metrics(), METRICS_TYPE, head=head)
        elif scope["path"] == "/healthz":
            await _json(send, 200, {"status": "ok"}, head=head)
        else:
            await _json(send, 404, {"error": "NOT_FOUND"}, head=head)

    return app


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        kind = message["type"].rsplit(".", 1)[-1]
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


async def _json(send: Send, status: int, obj: dict[str, Any],
                headers: list[tuple[bytes, bytes]] | None = None, *,
                head: bool = False) -> None:
    await _reply(send, status, json.dumps(obj).encode(), "application/json", headers,
                 head=head)


async def _reply(send: Send, status: int, body: bytes, content_type: str,
                 headers: list[tuple[bytes, bytes]] | None = None, *,
                 head: bool = False) -> None:
    """One whole response; a HEAD gets the same headers (length included), no body."""
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": b"" if head else body})
