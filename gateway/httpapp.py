"""The gateway's plain HTTP side (ASGI, served by hypercorn): probes, metrics, recordings,
and the browser client (``/`` and ``/web/*``, see ``gateway/web``).

GET/HEAD /records/<flowId>.ogg serves a recording with ``audio/ogg`` and byte ranges, so a
browser's <audio> element can seek in it. With object storage (``ARCHIVE_STORE=s3``) it
answers 307 with a short-lived presigned URL instead, so the bytes and their ranges come
straight from the store and the gateway stays out of the data path.
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

log = logging.getLogger("voxgate.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 64 * 1024


class GatewayHttpApp:
    def __init__(self, *, store: RecordStore | None, metrics: Callable[[], bytes],
                 ready: Callable[[], bool], web_origins: Sequence[str] = ()) -> None:
        self.store = store
        self.metrics = metrics
        self.ready = ready
        self.web_origins = tuple(web_origins)  # more origins for the page's CSP
        self.ws_port: int | None = None  # the WebSocket port, once bound: the page's default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/healthz":
            await _json(send, 200, {"status": "ok"})
        elif path == "/readyz":
            ok = self.ready()
            await _json(send, 200 if ok else 503, {"ready": ok})
        elif path == "/metrics":
            await _reply(send, 200, self.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        elif path.startswith("/records/") and method in ("GET", "HEAD"):
            await self._record(scope, send, path.removeprefix("/records/"), method == "HEAD")
        elif path in web.assets() and method in ("GET", "HEAD"):
            asset = web.page(self.ws_port) if path == "/" else web.assets()[path]
            await self._asset(scope, send, asset, method == "HEAD")
        else:
            await _json(send, 404, {"error": "NOT_FOUND"})

    async def _record(self, scope: Scope, send: Send, key: str, head: bool) -> None:
        if isinstance(self.store, LinkedRecordStore):
            await self._redirect(send, self.store, key, head)
            return
        p = self.store.path(key) if isinstance(self.store, LocalStore) else None
        if p is None:
            await _json(send, 404, {"error": "NOT_FOUND"})
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
                        [(b"retry-after", b"5")])
            return
        if url is None:
            await _json(send, 404, {"error": "NOT_FOUND"})
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


async def _json(send: Send, status: int, obj: dict[str, Any],
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _reply(send, status, json.dumps(obj).encode(), "application/json", headers)


async def _reply(send: Send, status: int, body: bytes, content_type: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
