"""The gateway's side of the ASR link: connection pools and one stream per session.

``AsrPools`` keeps HTTP/2 connections to every configured ASR endpoint, grouped by pool
(``default``, ``en``, ``multi``, ...). It opens more connections when the ones it has reach
the peer's ``SETTINGS_MAX_CONCURRENT_STREAMS`` and spreads streams round-robin across
endpoints. ``AsrStream`` encodes 20 ms frames to Opus (falling back to PCM when encoding
fails, counted), sends them with ``seq`` and ``pts_ms``, and yields the service's events.
A stream that fails before its first event is retried on another connection, replaying
what it had sent.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import ssl
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import trio

from asr import link
from native import OpusEncoder, OpusError

from .h2client import H2ClientError, H2Connection, H2Stream, connect

log = logging.getLogger("voxgate.gateway.asrlink")

MAX_REPLAY_FRAMES = 1500  # 30 s of 20 ms frames kept for a retry before the first event
OPEN_ATTEMPTS = 3


class AsrUnavailable(Exception):
    """No ASR endpoint of the pool could take the stream (down, or refusing)."""


class AsrBusy(AsrUnavailable):
    """The ASR endpoints answered 503: at capacity."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class LinkCounters:
    """Process-wide link counters, read by the metrics layer."""

    pcm_to_opus_fail: int = 0
    streams_opened: int = 0
    stream_retries: int = 0
    busy: int = 0
    unavailable: int = 0
    bytes_sent: int = 0


@dataclass
class _Endpoint:
    host: str
    port: int
    tls: bool
    conns: list[H2Connection] = field(default_factory=list)
    connecting: int = 0


class AsrPools:
    """Connections to the ASR service, per pool. Run ``run()`` in a long-lived nursery.

    Args:
        pools: pool name -> endpoint URLs (``http://`` is h2c with prior knowledge,
            ``https://`` is TLS with ALPN h2).
        ssl_context: for ``https`` endpoints (defaults to the system trust store).
        max_connections: per endpoint.
    """

    def __init__(self, pools: dict[str, tuple[str, ...]], *,
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 8,
                 connect_timeout_s: float = 3.0) -> None:
        self._pools: dict[str, list[_Endpoint]] = {}
        for name, urls in pools.items():
            eps = []
            for url in urls:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ValueError(f"ASR endpoint {url!r} must be http(s)://host:port")
                eps.append(_Endpoint(parts.hostname, parts.port or 8090,
                                     parts.scheme == "https"))
            self._pools[name] = eps
        self._rr = {name: itertools.count() for name in self._pools}
        self._ssl = ssl_context
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._nursery: trio.Nursery | None = None
        self.counters = LinkCounters()

    @property
    def names(self) -> list[str]:
        return list(self._pools)

    def has_pool(self, name: str) -> bool:
        return name in self._pools

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Own the connections' tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _hold(self, ep: _Endpoint, *, task_status: trio.TaskStatus[H2Connection]
                    ) -> None:
        ctx = None
        if ep.tls:
            ctx = self._ssl or ssl.create_default_context()
        try:
            async with connect(ep.host, ep.port, ssl_context=ctx,
                               connect_timeout_s=self._connect_timeout_s) as conn:
                ep.conns.append(conn)
                task_status.started(conn)
                await conn.wait_closed()
        finally:
            ep.conns[:] = [c for c in ep.conns if not c.closed]

    async def _connection(self, ep: _Endpoint) -> H2Connection:
        for conn in ep.conns:
            if conn.available:
                return conn
        if len(ep.conns) + ep.connecting >= self._max_connections:
            live = [c for c in ep.conns if not c.closed]
            if live:  # all full: wait on the least loaded one
                return min(live, key=lambda c: c.open_streams)
        if self._nursery is None:
            raise RuntimeError("AsrPools.run() is not running")
        ep.connecting += 1
        try:
            new: H2Connection = await self._nursery.start(self._hold, ep)
            return new
        finally:
            ep.connecting -= 1

    async def open(self, pool: str, start: link.Start, *, codec: str, bitrate: int,
                   encoder: OpusEncoder | None = None) -> AsrStream:
        """Open a recognition stream on ``pool`` and send its ``Start``.

        ``encoder`` continues another stream's Opus encoder (a session moving to another
        pool), so the packets the new stream gets after a replay follow on smoothly.

        Raises:
            AsrBusy: every endpoint tried answered 503.
            AsrUnavailable: no endpoint could be reached.
        """
        stream = AsrStream(self, pool, start, codec=codec, bitrate=bitrate, encoder=encoder)
        try:
            await stream._open()
        except BaseException:
            if encoder is None:
                stream.close_encoder()
            raise
        return stream

    async def lid(self, pool: str, pcm: bytes, *, timeout_s: float = 10.0) -> dict[str, Any]:
        """Ask ``pool``'s ``/v1/lid`` about PCM16 speech; returns its JSON answer.

        Raises:
            AsrBusy: the endpoints answered 503.
            AsrUnavailable: no endpoint answered, or one answered with an error.
        """
        eps = self._pools.get(pool)
        if not eps:
            raise AsrUnavailable(f"no ASR pool named {pool!r}")
        first = next(self._rr[pool])
        errors = []
        busy: AsrBusy | None = None
        for attempt in range(max(OPEN_ATTEMPTS, len(eps))):
            ep = eps[(first + attempt) % len(eps)]
            try:
                with trio.fail_after(timeout_s):
                    conn = await self._connection(ep)
                    h2s = await conn.open_stream("POST", "/v1/lid", [
                        ("content-type", "application/octet-stream"),
                        ("content-length", str(len(pcm)))])
                    await h2s.send(pcm)
                    await h2s.end()
                    status = await h2s.response()
                    body = bytearray()
                    while (chunk := await h2s.receive()) is not None:
                        body += chunk
            except (H2ClientError, trio.TooSlowError, OSError) as exc:
                errors.append(f"{ep.host}:{ep.port}: {exc or type(exc).__name__}")
                continue
            if status == 200:
                answer: dict[str, Any] = json.loads(body)
                return answer
            if status == 503:
                retry = float(h2s.headers.get("retry-after", "1") or 1)
                busy = AsrBusy(f"{ep.host}:{ep.port} answered 503", retry)
                continue
            raise AsrUnavailable(f"{ep.host}:{ep.port} /v1/lid answered {status}: "
                                 f"{bytes(body[:200]).decode(errors='replace')}")
        if busy is not None:
            raise busy
        raise AsrUnavailable("; ".join(errors) or "no endpoint")

    async def _open_raw(self, pool: str, start: link.Start, exclude: set[int]
                        ) -> tuple[H2Connection, H2Stream]:
        """Open the HTTP/2 stream and wait for its status, trying endpoints in turn."""
        eps = self._pools.get(pool)
        if not eps:
            raise AsrUnavailable(f"no ASR pool named {pool!r}")
        first = next(self._rr[pool])
        busy: AsrBusy | None = None
        errors = []
        for attempt in range(max(OPEN_ATTEMPTS, len(eps))):
            ep = eps[(first + attempt) % len(eps)]
            try:
                conn = await self._connection(ep)
                if id(conn) in exclude and len(eps) > 1:
                    continue
                h2s = await conn.open_stream(
                    "POST", "/v1/recognize",
                    [("content-type", link.CONTENT_TYPE),
                     *([("traceparent", start.traceparent)] if start.traceparent else [])])
                await h2s.send(link.encode(start))
                with trio.fail_after(self._connect_timeout_s):
                    status = await h2s.response()
                if status == 200:
                    self.counters.streams_opened += 1
                    return conn, h2s
                retry = float(h2s.headers.get("retry-after", "1") or 1)
                busy = AsrBusy(f"{ep.host}:{ep.port} answered {status}", retry)
                await h2s.reset()
            except (H2ClientError, trio.TooSlowError, OSError) as exc:
                errors.append(f"{ep.host}:{ep.port}: {exc}")
        if busy is not None:
            self.counters.busy += 1
            raise busy
        self.counters.unavailable += 1
        raise AsrUnavailable("; ".join(errors) or "no endpoint")


class AsrStream:
    """One session's recognition stream. Use one task to send and one to read events."""

    def __init__(self, pools: AsrPools, pool: str, start: link.Start, *, codec: str,
                 bitrate: int, encoder: OpusEncoder | None = None) -> None:
        self.pools = pools
        self.pool = pool
        self.start = start
        self.codec = codec
        self._encoder: OpusEncoder | None = encoder
        if codec == "opus" and encoder is None:
            self._encoder = OpusEncoder(16000, 1, "voip", bitrate=bitrate, vbr=True,
                                        complexity=5)
        self._seq = 0
        self._replay: list[link.Frame] | None = []  # until the first event arrives
        self._conn: H2Connection | None = None
        self._h2: H2Stream | None = None
        self._decoder = link.FrameDecoder(accept=link.SERVER_FRAMES)
        self._send_lock = trio.Lock()
        self.opus_failures = 0
        self.first_event_at: float | None = None
        self.ended = False

    @property
    def _stream(self) -> H2Stream:
        if self._h2 is None:
            raise AsrUnavailable("the stream is not open")
        return self._h2

    async def _open(self, exclude: set[int] | None = None) -> None:
        self._conn, self._h2 = await self.pools._open_raw(self.pool, self.start,
                                                          exclude or set())

    def _encode(self, pcm: np.ndarray, pts_ms: int) -> link.Audio:
        seq = self._seq
        self._seq += 1
        if self._encoder is not None:
            try:
                return link.Audio(seq, pts_ms, self._encoder.encode(pcm))
            except (OpusError, ValueError) as exc:
                # One frame that fails to encode goes as PCM (AudioPcm), counted.
                self.opus_failures += 1
                self.pools.counters.pcm_to_opus_fail += 1
                log.warning("opus encode failed, sending PCM: %s", exc)
                return link.Audio(seq, pts_ms, pcm.astype("<i2").tobytes(), pcm=True)
        return link.Audio(seq, pts_ms, pcm.astype("<i2").tobytes())

    async def send_audio(self, frames: list[tuple[np.ndarray, int]]) -> list[link.Audio]:
        """Send 20 ms int16 frames ``(pcm, pts_ms)``, all in one DATA frame; return the
        packets sent (a session keeps them to replay an utterance on another pool)."""
        packets = [self._encode(pcm, pts) for pcm, pts in frames]
        if packets:
            await self._send(list[link.Frame](packets))
        return packets

    async def replay(self, packets: list[link.Audio], *, finalize: bool) -> None:
        """Send packets another stream encoded (renumbered for this stream), then
        ``Finalize`` if the utterance they hold has ended."""
        frames: list[link.Frame] = []
        for p in packets:
            frames.append(link.Audio(self._seq, p.pts_ms, p.data, pcm=p.pcm))
            self._seq += 1
        if finalize:
            frames.append(link.Finalize())
        if frames:
            await self._send(frames)

    def take_encoder(self) -> OpusEncoder | None:
        """Hand the Opus encoder to the stream that replaces this one."""
        encoder, self._encoder = self._encoder, None
        return encoder

    def close_encoder(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None

    async def finalize(self) -> None:
        await self._send([link.Finalize()])

    async def end(self) -> None:
        """Send ``End`` and close the request body."""
        if self.ended:
            return
        self.ended = True
        await self._send([link.End()])
        async with self._send_lock:
            with contextlib.suppress(H2ClientError):
                await self._stream.end()

    async def _send(self, frames: list[link.Frame]) -> None:
        data = link.encode_many(frames)
        async with self._send_lock:
            if self._replay is not None:
                self._replay.extend(frames)
                if len(self._replay) > MAX_REPLAY_FRAMES:
                    self._replay = None  # too long to replay: a failure is final now
            current = self._stream
            try:
                await current.send(data)
                self.pools.counters.bytes_sent += len(data)
            except H2ClientError:
                # The replay (which now holds these frames) goes to the new stream.
                if not await self._retry(current):
                    raise

    async def _retry(self, failed: H2Stream) -> bool:
        """Reopen on another connection and replay, if no event has arrived yet.

        Both the sending and the reading side notice a failure; whichever comes second
        finds ``failed`` already replaced and has nothing to do. Call with the send lock.
        """
        if self._h2 is not failed:
            return True
        if self._replay is None or self.first_event_at is not None:
            return False
        exclude = {id(self._conn)}
        try:
            await self._open(exclude=exclude)
        except AsrUnavailable as exc:
            log.warning("retry of %s failed: %s", self.start.flow_id, exc)
            return False
        self.pools.counters.stream_retries += 1
        replay = link.encode_many(self._replay)
        try:
            await self._stream.send(replay)
        except H2ClientError:
            return False
        return True

    async def events(self) -> AsyncGenerator[link.AsrEvent, None]:
        """The service's events, until ``end`` or the stream closes.

        Raises:
            AsrUnavailable: the stream failed after its first event (no replay possible).
        """
        while True:
            current = self._stream
            try:
                chunk = await current.receive()
            except H2ClientError as exc:
                async with self._send_lock:
                    if await self._retry(current):
                        self._decoder = link.FrameDecoder(accept=link.SERVER_FRAMES)
                        continue
                raise AsrUnavailable(f"ASR stream failed: {exc}") from exc
            if chunk is None:
                return
            for item in self._decoder.feed(chunk):
                if not isinstance(item, link.AsrEvent):
                    continue
                if self.first_event_at is None:
                    self.first_event_at = time.perf_counter()
                    self._replay = None
                yield item
                if item.type == "end":
                    return

    async def aclose(self) -> None:
        """Abort the stream (e.g. the session was cancelled, or moved to another pool)."""
        self.close_encoder()
        if not self.ended:
            self.ended = True
            with contextlib.suppress(H2ClientError):
                await self._stream.reset()

