"""The gateway's side of the ASR link: connection pools and one stream per session.

``AsrPools`` keeps HTTP/2 connections to every configured ASR endpoint, grouped by pool
(``default``, ``en``, ``multi``, ...). It opens more connections when the ones it has reach
the peer's ``SETTINGS_MAX_CONCURRENT_STREAMS`` and spreads streams round-robin across
endpoints. ``AsrStream`` encodes 20 ms frames to Opus (falling back to PCM when encoding
fails, counted), sends them with ``seq`` and ``pts_ms``, and yields the service's events.
A stream that fails before its first event is retried on another connection, replaying
what it had sent.

``AsrChannel`` is what a session uses: one recognition channel for the session's whole
life, across streams. It owns the Opus encoder and the one replay buffer (the packets of
every utterance that has no final yet), and it wraps transport failures at its boundary:
a stream that fails (reset, connection lost, PING unanswered, a final overdue) is replaced
by one on a healthy endpoint of the pool, with backoff within a budget, and the
utterances still waiting for their finals are replayed there. Moving to another pool
after language ID is the same replay. Each endpoint has a circuit breaker
(``CircuitBreaker``, sans-IO) with half-open probes.

``AsrPools.from_config`` builds the pools from the gateway's settings, with the link's
security: ``https://`` endpoints verified against ``ASR_TLS_CA_FILE``, the gateway's
client certificate (mTLS) and ``ASR_TOKEN`` as a bearer token on every request.

Nothing the ASR service sends is trusted: a malformed frame or event, a ``retry-after``
that is not a small number, a language-ID answer of the wrong shape fail that stream or
request (``AsrUnavailable``, failed over like a dead endpoint), never the session.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import numpy as np
import trio

from asr import link
from native import OpusEncoder, OpusError

from .h2client import H2ClientError, H2Connection, H2Stream, connect
from .logs import fields

if TYPE_CHECKING:
    from .config import GatewayConfig

log = logging.getLogger("voxgate.gateway.asrlink")

# A final overdue on a pool's only endpoint waits this many more deadlines before the
# stream is failed over (to that endpoint again, once it is the only choice).
FINAL_DEADLINE_WAITS = 5

MAX_REPLAY_FRAMES = 1500  # 30 s of 20 ms frames kept for a retry before the first event
OPEN_ATTEMPTS = 3
# libopus effort of the link encoder. Whisper base heard the 5 LibriVox + 5 cards clips
# (92 words) with 4 errors at 5, 3 at 2, 5 at 0 (PCM: 4), and 20 espeak sentences (222
# words) with 52 at 5, 52 at 2, 56 at 0; encoding costs 6.4 ms per second of audio at 5,
# 4.2 at 2, 3.5 at 0 (``ASR_LINK_OPUS_COMPLEXITY``).
DEFAULT_LINK_OPUS_COMPLEXITY = 2
LOOP_LAG_S = 0.1  # a timer this late means our own event loop is overloaded
# A 503's retry-after is the peer's word: a missing or unreadable one means this, and
# any value is clamped to the range (a hostile "1e308" must not park a session).
DEFAULT_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 30.0
MAX_LID_ANSWER_BYTES = 64 * 1024  # a /v1/lid answer is a few hundred bytes
# What a language code from the ASR service may look like ("en", "pt-BR", "yue").
_LANG_RE = re.compile(r"[A-Za-z]{0,8}(?:[-_][A-Za-z0-9]{1,8}){0,3}")
MAX_EVENT_MESSAGE_CHARS = 500  # an error's message from the service, as passed on


class AsrUnavailable(Exception):
    """No ASR endpoint of the pool could take the stream (down, or refusing)."""


class AsrBusy(AsrUnavailable):
    """The ASR endpoints answered 503: at capacity."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AsrRefused(AsrUnavailable):
    """An ASR endpoint refused the request with an HTTP error (401/403: the gateway's
    ``ASR_TOKEN`` or client certificate is not accepted; another 4xx/5xx: a broken or
    mismatched service). Failed over like an unreachable endpoint."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def parse_retry_after(value: str | None) -> float:
    """Seconds from a ``retry-after`` header, clamped to ``[0, MAX_RETRY_AFTER_S]``.

    The header comes from the ASR service: a missing, non-numeric (an HTTP date, "abc"),
    infinite or NaN value means ``DEFAULT_RETRY_AFTER_S``; a negative one means 0.
    """
    try:
        seconds = float((value or "").strip())
    except ValueError:
        return DEFAULT_RETRY_AFTER_S
    if math.isnan(seconds) or math.isinf(seconds):
        return DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def check_lid_answer(body: bytes) -> dict[str, Any]:
    """The JSON answer of ``/v1/lid``, checked: ``lang`` a language code, ``score`` a
    finite number, ``top`` a list of ``{"lang", "score"}`` of the same kinds.

    Returns:
        ``{"lang": str, "score": float, "top": [{"lang": str, "score": float}, ...]}``
        plus any other keys of the answer.
    Raises:
        ValueError: the body is not such an answer (the message says what is wrong).
    """
    if len(body) > MAX_LID_ANSWER_BYTES:
        raise ValueError(f"answer of {len(body)} bytes (limit {MAX_LID_ANSWER_BYTES})")
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"answer is not JSON: {type(exc).__name__}") from None
    if not isinstance(answer, dict):
        raise ValueError("answer is not a JSON object")

    def lang_score(obj: Any, where: str) -> tuple[str, float]:
        if not isinstance(obj, dict):
            raise ValueError(f"{where} is not an object")
        lang, score = obj.get("lang"), obj.get("score")
        if not isinstance(lang, str) or not lang or not _LANG_RE.fullmatch(lang):
            raise ValueError(f"{where}.lang is not a language code: {str(lang)[:20]!r}")
        if (isinstance(score, bool) or not isinstance(score, int | float)
                or not math.isfinite(score)):
            raise ValueError(f"{where}.score is not a finite number")
        return lang, float(score)

    lang, score = lang_score(answer, "answer")
    top = answer.get("top", [])
    if not isinstance(top, list) or len(top) > 200:
        raise ValueError("answer.top is not a list (of at most 200 entries)")
    checked = [lang_score(t, f"answer.top[{i}]") for i, t in enumerate(top)]
    return {**answer, "lang": lang, "score": score,
            "top": [{"lang": t_lang, "score": t_score} for t_lang, t_score in checked]}


def check_event(ev: link.AsrEvent) -> link.AsrEvent:
    """An event from the ASR service, checked beyond what the codec checks: the
    utterance index and times are non-negative, the times in order, ``lang`` a language
    code, and an error's message at most ``MAX_EVENT_MESSAGE_CHARS`` (it is passed on to
    the client).

    Raises:
        ValueError: the event cannot be passed on.
    """
    if ev.utterance < 0:
        raise ValueError(f"{ev.type} event with utterance {ev.utterance}")
    if ev.ts[0] < 0 or ev.ts[1] < ev.ts[0]:
        raise ValueError(f"{ev.type} event with times {ev.ts}")
    if ev.lang and not _LANG_RE.fullmatch(ev.lang):
        raise ValueError(f"{ev.type} event with language {ev.lang[:20]!r}")
    if len(ev.message) > MAX_EVENT_MESSAGE_CHARS or len(ev.code) > 64:
        ev = replace(ev, code=ev.code[:64],
                     message=ev.message[:MAX_EVENT_MESSAGE_CHARS] + "...")
    return ev


def client_ssl_context(*, ca_file: str = "", cert_file: str = "", key_file: str = ""
                       ) -> ssl.SSLContext:
    """The TLS context for ``https://`` ASR endpoints: TLS 1.2 or newer, the server
    verified against ``ca_file`` (the system trust store when empty) with its host name
    checked, and ``cert_file``/``key_file`` presented when set (mTLS).

    Raises:
        ValueError: a file is missing or not a PEM certificate/key (named in the message).
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"ASR_TLS_CA_FILE {ca_file!r} cannot be loaded: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if bool(cert_file) != bool(key_file):
        raise ValueError("ASR_TLS_CERT_FILE and ASR_TLS_KEY_FILE must be set together")
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"ASR_TLS_CERT_FILE {cert_file!r} / ASR_TLS_KEY_FILE "
                             f"{key_file!r} cannot be loaded: {exc}") from exc
    return ctx


@dataclass
class LinkCounters:
    """Process-wide link counters, read by the metrics layer."""

    pcm_to_opus_fail: int = 0
    streams_opened: int = 0
    failovers: int = 0  # streams replaced after a failure, utterances replayed
    ping_timeouts: int = 0
    breaker_opened: int = 0
    stream_retries: int = 0
    busy: int = 0
    unavailable: int = 0
    bytes_sent: int = 0
    discards: int = 0  # false early starts withdrawn with a link v3 Discard
    pauses: int = 0  # link v4 Pause hints sent
    discards_by_finalize: int = 0  # ... and with Finalize (a v2 service): one final wasted


class CircuitBreaker:
    """Per-endpoint circuit breaker, sans-IO (the caller passes the time).

    ``closed``: streams go to the endpoint. A failure opens it: no new stream for
    ``open_s``. Then ``half_open``: exactly one caller is let through as a probe; its
    success closes the breaker, its failure opens it again for twice as long (up to
    ``open_s * max_factor``). Without this, every session whose stream fails would try the
    dead endpoint first, each paying a connect timeout.
    """

    TRANSITIONS: ClassVar[dict[tuple[str, str], str]] = {
        ("closed", "success"): "closed",
        ("closed", "failure"): "open",
        ("open", "success"): "closed",  # a stream opened before the failure still works
        ("open", "failure"): "open",
        ("open", "probe"): "half_open",
        ("half_open", "success"): "closed",
        ("half_open", "failure"): "open",
    }

    def __init__(self, open_s: float = 1.0, *, max_factor: float = 8.0) -> None:
        if open_s <= 0 or max_factor < 1:
            raise ValueError("open_s must be > 0 and max_factor >= 1")
        self.open_s = open_s
        self.max_factor = max_factor
        self.state = "closed"
        self._factor = 1.0
        self._until = -math.inf
        self.failures = 0
        self.opened = 0

    def _go(self, what: str) -> None:
        try:
            self.state = self.TRANSITIONS[(self.state, what)]
        except KeyError:
            raise RuntimeError(f"circuit breaker: no transition from {self.state!r} "
                               f"on {what!r}") from None

    def allow(self, now: float) -> bool:
        """May a new stream (or a probe) go to this endpoint now?"""
        if self.state == "closed":
            return True
        if self.state == "open" and now >= self._until:
            self._go("probe")
            self._until = now + self.open_s * self._factor  # a lost probe is not forever
            return True
        if self.state == "half_open" and now >= self._until:
            self._until = now + self.open_s * self._factor
            return True  # the last probe never reported: let another through
        return False  # open, or half-open with its probe under way

    def success(self, now: float) -> None:
        self._go("success")
        self._factor = 1.0

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == "half_open":
            self._factor = min(self._factor * 2, self.max_factor)
        if self.state != "open":
            self.opened += 1
        self._go("failure")
        self._until = max(self._until, now + self.open_s * self._factor)

    def retry_at(self) -> float:
        """When an open breaker lets its next probe through."""
        return self._until if self.state == "open" else -math.inf


@dataclass
class _Endpoint:
    host: str
    port: int
    tls: bool
    breaker: CircuitBreaker
    conns: list[H2Connection] = field(default_factory=list)
    connecting: int = 0
    last_error: str = ""  # why it last failed: said when every breaker is open

    @property
    def load(self) -> int:
        return sum(c.open_streams for c in self.conns if not c.closed)

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


class AsrPools:
    """Connections to the ASR service, per pool. Run ``run()`` in a long-lived nursery.

    Args:
        pools: pool name -> endpoint URLs (``http://`` is h2c with prior knowledge,
            ``https://`` is TLS with ALPN h2).
        ssl_context: for ``https`` endpoints (defaults to the system trust store).
        max_connections: per endpoint.
        token: sent as ``authorization: Bearer <token>`` on every request (empty: none).
    """

    def __init__(self, pools: dict[str, tuple[str, ...]], *,
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 8,
                 connect_timeout_s: float = 3.0, ping_interval_s: float = 0.25,
                 ping_timeout_s: float = 1.5, breaker_open_s: float = 1.0,
                 token: str = "") -> None:
        if any(c in token for c in "\r\n\0"):
            raise ValueError("ASR_TOKEN must not contain line breaks or NUL")
        self._auth: list[tuple[str, str]] = (
            [("authorization", f"Bearer {token}")] if token else [])
        self._pools: dict[str, list[_Endpoint]] = {}
        for name, urls in pools.items():
            eps = []
            for url in urls:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ValueError(f"ASR endpoint {url!r} must be http(s)://host:port")
                eps.append(_Endpoint(parts.hostname, parts.port or 8090,
                                     parts.scheme == "https",
                                     CircuitBreaker(breaker_open_s)))
            self._pools[name] = eps
        self._rr = {name: itertools.count() for name in self._pools}
        self._ssl = ssl_context
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._ping_interval_s = ping_interval_s
        self._ping_timeout_s = ping_timeout_s
        self._nursery: trio.Nursery | None = None
        self.counters = LinkCounters()

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> AsrPools:
        """The pools of ``cfg``, with the link's TLS context (``ASR_TLS_CA_FILE``,
        ``ASR_TLS_CERT_FILE``/``ASR_TLS_KEY_FILE``) and ``ASR_TOKEN``.

        Raises:
            ValueError: an endpoint URL is malformed, or a TLS file cannot be loaded (at
                startup, not at the first session).
        """
        urls = cfg.pool_urls()
        tls_files = cfg.asr_tls_ca_file or cfg.asr_tls_cert_file
        ctx = client_ssl_context(ca_file=cfg.asr_tls_ca_file,
                                 cert_file=cfg.asr_tls_cert_file,
                                 key_file=cfg.asr_tls_key_file)
        cleartext = sorted({u for us in urls.values() for u in us
                            if urlsplit(u).scheme == "http"})
        if cleartext and tls_files:
            log.warning("ASR_TLS_* is set but these ASR endpoints are http:// (h2c, no "
                        "TLS): %s", ", ".join(cleartext))
        if cleartext and cfg.asr_token and any(
                urlsplit(u).hostname not in ("127.0.0.1", "::1", "localhost")
                for u in cleartext):
            log.warning("ASR_TOKEN goes in clear text to http:// ASR endpoints; use "
                        "https:// for them")
        return cls(urls, ssl_context=ctx, ping_interval_s=cfg.asr_ping_interval_s,
                   ping_timeout_s=cfg.asr_ping_timeout_s,
                   breaker_open_s=cfg.asr_breaker_open_s, token=cfg.asr_token)

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
            ctx = self._ssl or client_ssl_context()
        started = False
        try:
            async with connect(ep.host, ep.port, ssl_context=ctx,
                               connect_timeout_s=self._connect_timeout_s) as conn:
                ep.conns.append(conn)
                task_status.started(conn)
                started = True
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keepalive, ep, conn)
                    await conn.wait_closed()
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            if not started:
                raise  # to the opener (connect raises H2ClientError only)
            # This task lives in the pools' nursery, beside every other connection and
            # the gateway itself: one connection's failure must end here.
            log.warning("ASR connection to %s failed: %r", ep.name, exc)
        finally:
            ep.conns[:] = [c for c in ep.conns if not c.closed]

    async def _keepalive(self, ep: _Endpoint, conn: H2Connection) -> None:
        """PING the connection while it carries streams (rarely when idle). A PING left
        unanswered while nothing at all arrived from the peer for the timeout fails the
        connection, so its streams fail over within interval + timeout."""
        last_ping = trio.current_time()
        while not conn.closed:
            await trio.sleep(self._ping_interval_s)
            idle = conn.open_streams == 0
            if idle and trio.current_time() - last_ping < self._ping_interval_s * 10:
                continue
            asked = last_ping = trio.current_time()
            if await conn.ping(self._ping_timeout_s) or conn.closed:
                continue
            late = trio.current_time() - (asked + self._ping_timeout_s)
            if (trio.current_time() - conn.last_received < self._ping_timeout_s
                    or late > LOOP_LAG_S or conn.unread_bytes()):
                # Bytes arrived, or are waiting, or our own loop woke late: a busy peer
                # or a busy gateway, not a stalled peer. Failing over would add load.
                continue
            self.counters.ping_timeouts += 1
            self.report_failure(ep, f"no PING answer in {self._ping_timeout_s:g} s")
            log.warning("ASR %s: no PING answer in %.1f s; its streams fail over", ep.name,
                        self._ping_timeout_s)
            conn.fail(f"no PING answer from {ep.name} in {self._ping_timeout_s:g} s")
            return

    def report_failure(self, ep: _Endpoint, reason: str = "") -> None:
        """A stream or connection to ``ep`` failed (``reason``: why): open its breaker."""
        if reason:
            ep.last_error = reason[:300]
        before = ep.breaker.state
        ep.breaker.failure(trio.current_time())
        if before != "open":
            self.counters.breaker_opened += 1

    def breaker_states(self, pool: str | None = None) -> dict[str, str]:
        """Endpoint -> breaker state, for health pages and tests. Each pool has its own
        breakers, also for an endpoint that several pools share: without ``pool`` the
        last pool that names an endpoint gives its state."""
        pools = self._pools.values() if pool is None else [self._pools.get(pool, [])]
        return {ep.name: ep.breaker.state for eps in pools for ep in eps}

    def has_alternative(self, pool: str, endpoint: Any) -> bool:
        """Whether ``pool`` has an endpoint other than ``endpoint`` that its breaker
        lets through now."""
        now = trio.current_time()
        return any(ep is not endpoint and ep.breaker.allow(now)
                   for ep in self._pools.get(pool, ()))

    def _candidates(self, pool: str, avoid: _Endpoint | None) -> list[_Endpoint]:
        """Endpoints to try, best first: breaker lets it through, least loaded, not the
        one that just failed; round-robin among equals so streams spread."""
        eps = self._pools[pool]
        first = next(self._rr[pool])
        order = [eps[(first + i) % len(eps)] for i in range(len(eps))]
        now = trio.current_time()
        # Sorting is stable: the round-robin order breaks ties.
        order.sort(key=lambda ep: (ep is avoid and len(eps) > 1, ep.load))
        allowed = [ep for ep in order if ep.breaker.allow(now)]
        return allowed

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
                   encoder: OpusEncoder | None = None, retry: bool = True,
                   avoid: Any = None, complexity: int = DEFAULT_LINK_OPUS_COMPLEXITY
                   ) -> AsrStream:
        """Open a recognition stream on ``pool`` and send its ``Start``.

        ``encoder`` continues another stream's Opus encoder (a session moving to another
        pool), so the packets the new stream gets after a replay follow on smoothly.
        ``retry=False``: the stream keeps no replay of its own (``AsrChannel`` does).
        ``avoid``: an endpoint (``AsrStream.endpoint``) tried last, e.g. the one that
        just failed.

        Raises:
            AsrBusy: every endpoint tried answered 503.
            AsrUnavailable: no endpoint could be reached.
        """
        stream = AsrStream(self, pool, start, codec=codec, bitrate=bitrate, encoder=encoder,
                           retry=retry, complexity=complexity)
        try:
            await stream._open(avoid=avoid)
        except BaseException:
            if encoder is None:
                stream.close_encoder()
            raise
        return stream

    async def lid(self, pool: str, pcm: bytes, *, timeout_s: float = 10.0) -> dict[str, Any]:
        """Ask ``pool``'s ``/v1/lid`` about PCM16 speech; returns its checked JSON answer
        (``check_lid_answer``).

        An endpoint that cannot be reached is tried again (up to ``OPEN_ATTEMPTS``
        attempts in all); one that refuses (401/403/...) or answers something that is not
        a language-ID answer is not asked again, the next endpoint is.

        Raises:
            AsrBusy: the endpoints answered 503 (or 429).
            AsrRefused: an endpoint refused the request (and none answered).
            AsrUnavailable: no endpoint answered, or their answers were malformed.
        """
        eps = self._pools.get(pool)
        if not eps:
            raise AsrUnavailable(f"no ASR pool named {pool!r}")
        first = next(self._rr[pool])
        errors = []
        busy: AsrBusy | None = None
        refused: int | None = None
        broken: set[int] = set()  # endpoints that refused or answered garbage
        for attempt in range(max(OPEN_ATTEMPTS, len(eps))):
            ep = eps[(first + attempt) % len(eps)]
            if id(ep) in broken:
                continue
            try:
                with trio.fail_after(timeout_s):
                    conn = await self._connection(ep)
                    h2s = await conn.open_stream("POST", "/v1/lid", [
                        ("content-type", "application/octet-stream"),
                        ("content-length", str(len(pcm))), *self._auth])
                    await h2s.send(pcm)
                    await h2s.end()
                    status = await h2s.response()
                    body = bytearray()
                    while (chunk := await h2s.receive()) is not None:
                        body += chunk
                        if len(body) > MAX_LID_ANSWER_BYTES:
                            await h2s.reset()
                            break
            except (H2ClientError, trio.TooSlowError, OSError) as exc:
                errors.append(f"{ep.name}: {exc or type(exc).__name__}")
                continue
            if status == 200:
                try:
                    return check_lid_answer(bytes(body))
                except ValueError as exc:
                    broken.add(id(ep))
                    errors.append(f"{ep.name} /v1/lid: malformed answer: {exc}")
                    continue
            if status in (429, 503):
                retry = parse_retry_after(h2s.headers.get("retry-after"))
                busy = AsrBusy(f"{ep.name} answered {status}", retry)
                continue
            broken.add(id(ep))
            refused = status
            errors.append(f"{ep.name} /v1/lid answered {status}{_refusal_hint(status)}: "
                          f"{bytes(body[:200]).decode(errors='replace')!r}")
        if busy is not None:
            raise busy
        if refused is not None:
            raise AsrRefused("; ".join(errors), refused)
        raise AsrUnavailable("; ".join(errors) or "no endpoint")

    async def _open_raw(self, pool: str, start: link.Start, exclude: set[int],
                        avoid: _Endpoint | None = None
                        ) -> tuple[_Endpoint, H2Connection, H2Stream]:
        """Open the HTTP/2 stream and wait for its status, trying endpoints in turn
        (those whose breaker is open are skipped)."""
        eps = self._pools.get(pool)
        if not eps:
            raise AsrUnavailable(f"no ASR pool named {pool!r}")
        busy: AsrBusy | None = None
        errors = []
        refused: int | None = None
        candidates = self._candidates(pool, avoid)
        if not candidates:
            last = "; ".join(ep.last_error for ep in eps if ep.last_error)
            errors.append("every endpoint's circuit breaker is open"
                          + (f" (last failures: {last})" if last else ""))
        for ep in candidates[:max(OPEN_ATTEMPTS, len(eps))]:
            try:
                conn = await self._connection(ep)
                if id(conn) in exclude and len(eps) > 1:
                    continue
                with trio.fail_after(self._connect_timeout_s):
                    # Bounded: a peer that advertises no stream slots must not park us.
                    h2s = await conn.open_stream(
                        "POST", "/v1/recognize",
                        # v3: a v2 service answers v2 (and the stream is v2; see
                        # AsrStream.version), as Start says version 2 (START_VERSION).
                        [("content-type", link.CONTENT_TYPE), *self._auth,
                         *([("traceparent", start.traceparent)]
                           if start.traceparent else [])])
                await h2s.send(link.encode(start))
                with trio.fail_after(self._connect_timeout_s):
                    status = await h2s.response()
                if status == 200:
                    ep.breaker.success(trio.current_time())
                    self.counters.streams_opened += 1
                    return ep, conn, h2s
                await h2s.reset()
                if status not in (429, 503):
                    # Refused (401/403: credentials) or broken: this endpoint cannot
                    # serve us, like one that is down.
                    errors.append(f"{ep.name} answered {status}{_refusal_hint(status)}")
                    self.report_failure(ep, errors[-1])
                    refused = status
                    continue
                # 503 is the service working as designed: not a breaker failure.
                ep.breaker.success(trio.current_time())
                retry = parse_retry_after(h2s.headers.get("retry-after"))
                busy = AsrBusy(f"{ep.name} answered {status}", retry)
            except (H2ClientError, trio.TooSlowError, OSError) as exc:
                errors.append(f"{ep.name}: {exc or type(exc).__name__}")
                self.report_failure(ep, errors[-1])
        if busy is not None:
            self.counters.busy += 1
            raise busy
        self.counters.unavailable += 1
        if refused is not None:
            raise AsrRefused("; ".join(errors), refused)
        raise AsrUnavailable("; ".join(errors) or "no endpoint")


def _refusal_hint(status: int) -> str:
    if status == 401:
        return " (unauthorized: check ASR_TOKEN)"
    if status == 403:
        return " (forbidden: check ASR_TOKEN and the client certificate)"
    return ""


class AsrStream:
    """One session's recognition stream. Use one task to send and one to read events."""

    def __init__(self, pools: AsrPools, pool: str, start: link.Start, *, codec: str,
                 bitrate: int, encoder: OpusEncoder | None = None, retry: bool = True,
                 complexity: int = DEFAULT_LINK_OPUS_COMPLEXITY) -> None:
        self.pools = pools
        self.pool = pool
        self.start = start
        self.codec = codec
        self._encoder: OpusEncoder | None = encoder
        if codec == "opus" and encoder is None:
            self._encoder = OpusEncoder(16000, 1, "voip", bitrate=bitrate, vbr=True,
                                        complexity=complexity)
        self._seq = 0
        # until the first event arrives
        self._replay: list[link.Frame] | None = [] if retry else None
        self.endpoint: _Endpoint | None = None
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

    @property
    def version(self) -> int:
        """The link version of this stream: the one the response's content type names
        (a v2 service answers v2 to our v3 request; a response naming none, 1)."""
        if self._h2 is None:
            return 1
        return link.version_of(self._h2.headers.get("content-type")) or 1

    async def discard(self, utterance: int) -> None:
        """(v3) Withdraw utterance ``utterance`` (the service's index): no final comes."""
        await self._send([link.Discard(utterance)])

    async def pause(self, utterance: int) -> None:
        """(v4) Utterance ``utterance``'s speech paused (a hint)."""
        await self._send([link.Pause(utterance)])

    async def _open(self, exclude: set[int] | None = None, avoid: Any = None) -> None:
        self.endpoint, self._conn, self._h2 = await self.pools._open_raw(
            self.pool, self.start, exclude or set(), avoid)

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
        frames: list[link.Frame] = [*self.number(packets)]
        if finalize:
            frames.append(link.Finalize())
        if frames:
            await self._send(frames)

    def number(self, packets: list[link.Audio]) -> list[link.Audio]:
        """Packets encoded elsewhere, with this stream's next ``seq`` numbers."""
        out = []
        for p in packets:
            out.append(link.Audio(self._seq, p.pts_ms, p.data, pcm=p.pcm))
            self._seq += 1
        return out

    async def send_frames(self, frames: list[link.Frame]) -> None:
        """Send frames (Audio already numbered by ``number``) in one DATA frame."""
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
        if self.endpoint is not None:
            self.pools.report_failure(self.endpoint, f"{self.endpoint.name}: stream failed "
                                                     f"before its first event")
        exclude = {id(self._conn)}
        try:
            await self._open(exclude=exclude)
        except AsrUnavailable as exc:
            log.warning("stream retry failed: %s", exc, extra=fields(
                flowId=self.start.flow_id, stage="asr", err_code="ASR_UNAVAILABLE"))
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
            try:
                items = self._decoder.feed(chunk)
                checked = [check_event(item) for item in items
                           if isinstance(item, link.AsrEvent)]
            except (link.LinkProtocolError, ValueError, ArithmeticError,
                    RecursionError) as exc:
                # The service sent something that is not an event stream (or an event
                # that cannot be passed on): this stream is broken, the session is not.
                raise AsrUnavailable(
                    f"ASR stream on {self.endpoint.name if self.endpoint else '?'} sent a "
                    f"malformed frame: {type(exc).__name__}: {str(exc)[:200]}") from None
            for item in checked:
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



@dataclass(frozen=True)
class FailoverPolicy:
    """How an ``AsrChannel`` replaces a failed stream."""

    final_deadline_s: float = 10.0  # a final this late after Finalize: the stream failed
    budget_s: float = 10.0  # retry a failed stream this long, then give its utterances up
    backoff_first_s: float = 0.1
    backoff_max_s: float = 1.0
    max_replays: int = 3  # an utterance replayed this often and still failing is given up
    max_pending_packets: int = 3000  # 60 s of 20 ms packets held for replay per session


@dataclass
class _Pending:
    """An utterance that has no final yet, with every packet sent for it."""

    utterance: int  # the session's index
    packets: list[link.Audio] = field(default_factory=list)
    finalized_at: float | None = None  # trio time its Finalize went out (None: open)
    index: int | None = None  # the service's utterance index on the current stream
    partial_end_ms: int = -1  # the furthest partial passed on
    replays: int = 0
    sent: bool = False  # went to a stream that is gone: the next one is a replay
    # An early start not yet confirmed. Its partials are passed on: if it is withdrawn,
    # the next utterance reuses its index, so that one's final replaces them.
    tentative: bool = False
    discard: bool = False  # a withdrawn early start: finalized only to close it; no final
    waits: int = 0  # final deadlines let pass because no other endpoint could take it


UNAVAILABLE = "UNAVAILABLE"  # code of the channel's own error event: utterances given up


class AsrChannel:
    """One session's recognition, across ASR streams and endpoints.

    The session calls ``begin(index)``, ``send_audio``, ``finalize`` per utterance and
    ``end`` once; it reads ``events()`` (one task) until it ends, and runs ``run()`` in
    its nursery. Events carry the session's utterance index. A stream failure never
    reaches the caller: the channel opens a stream on a healthy endpoint (the breaker
    steers away from the failed one; with one endpoint, the same one once it is back),
    replays every utterance that has no final yet, and goes on. Only when the budget is
    spent does it give those utterances up, with an ``error`` event coded
    ``UNAVAILABLE`` (non-fatal: the next utterance tries again). Sending never waits on
    a recovery: packets go to the replay buffer and out with the replay.

    Partials of a replayed utterance start again from its onset; the channel holds them
    back until they reach past what was already passed on. A final is passed on once per
    utterance: it removes the utterance from the buffer, so it is never replayed after.
    """

    def __init__(self, pools: AsrPools, pool: str, start: link.Start, *, codec: str,
                 bitrate: int, policy: FailoverPolicy | None = None,
                 complexity: int = DEFAULT_LINK_OPUS_COMPLEXITY) -> None:
        self.pools = pools
        self.pool = pool
        self.start = start
        self.codec = codec
        self.bitrate = bitrate
        self.policy = policy or FailoverPolicy()
        self._encoder: OpusEncoder | None = None
        if codec == "opus":
            self._encoder = OpusEncoder(16000, 1, "voip", bitrate=bitrate, vbr=True,
                                        complexity=complexity)
        self._pending: deque[_Pending] = deque()
        self._packets = 0  # held in _pending
        self._stream: AsrStream | None = None
        self._gen = 0  # bumped whenever the current stream changes; stale readers stop
        self._next_index = 0
        self._lock = trio.Lock()
        self._recovering = False
        self._ending = False
        self._finished = False
        self._out_send, self._out_recv = trio.open_memory_channel[link.AsrEvent](1024)
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self.opus_failures = 0
        self.failovers = 0
        self.given_up = 0  # utterances given up
        self.behind = False  # the current stream's service said flow BEHIND

    # -- the session's side ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Own the readers, recoveries and the final-deadline watchdog until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watchdog)
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    def begin(self, utterance: int, *, tentative: bool = False) -> None:
        """An utterance starts; its audio follows. ``tentative``: an early start that
        ``confirm`` or ``cancel`` settles."""
        if self._pending and self._pending[-1].finalized_at is None:
            self._drop_open()
        self._pending.append(_Pending(utterance, tentative=tentative))

    def confirm(self) -> None:
        """The open (tentative) utterance is speech after all."""
        cur = self._open_utterance()
        if cur is not None:
            cur.tentative = False

    async def cancel(self) -> None:
        """Withdraw the open tentative utterance (a false start). If none of its audio
        went out, that is free. Otherwise, on a link v3 stream a ``Discard`` makes the
        service drop it (no final is decoded); a v2 service gets ``Finalize`` and its
        final is dropped here (one final job wasted)."""
        async with self._lock:
            cur = self._open_utterance()
            if cur is None:
                return
            if cur.index is None:
                self._pending.remove(cur)
                self._packets -= len(cur.packets)
                return
            stream = self._stream
            if stream is not None and not self._recovering and stream.version >= 3:
                self._pending.remove(cur)
                self._packets -= len(cur.packets)
                self.pools.counters.discards += 1
                try:
                    await stream.discard(cur.index)
                except (H2ClientError, AsrUnavailable) as exc:
                    self._fail(stream, f"send failed: {exc}")
                return
            self.pools.counters.discards_by_finalize += 1
            cur.discard = True
            cur.finalized_at = trio.current_time()
            self._wake.set()
            if self._stream is not None and not self._recovering:
                await self._send(self._stream, [link.Finalize()])

    async def pause(self) -> None:
        """The open utterance's speech paused: on a link v4 stream a ``Pause`` lets the
        service decode its final before the endpoint. Only a hint: nothing is sent to an
        older service, while recovering, or before any of the utterance's audio went
        out, and a failure to send it fails the stream as any send does."""
        async with self._lock:
            cur = self._open_utterance()
            stream = self._stream
            if cur is None or cur.index is None or stream is None or self._recovering \
                    or stream.version < 4:
                return
            self.pools.counters.pauses += 1
            try:
                await stream.pause(cur.index)
            except (H2ClientError, AsrUnavailable) as exc:
                self._fail(stream, f"send failed: {exc}")

    async def send_audio(self, frames: list[tuple[np.ndarray, int]]) -> None:
        """Encode 20 ms int16 frames ``(pcm, pts_ms)`` of the open utterance and send
        them in one DATA frame (or keep them for the replay while recovering)."""
        async with self._lock:
            packets = [self._encode(pcm, pts) for pcm, pts in frames]
            cur = self._open_utterance()
            if cur is None or not packets:
                return  # given up (no open utterance): recognition resumes at the next
            cur.packets.extend(packets)
            self._packets += len(packets)
            self._bound()
            if self._recovering:
                return
            stream = self._stream
            if stream is None:
                self._recover(None)
                return
            if cur.index is None:
                cur.index = self._next_index
                self._next_index += 1
            await self._send(stream, list[link.Frame](stream.number(packets)))

    async def finalize(self) -> None:
        """The open utterance has ended: the service sends its final."""
        async with self._lock:
            cur = self._open_utterance()
            if cur is None:
                return
            if not cur.packets:  # nothing was sent, no final will come
                self._pending.remove(cur)
                return
            cur.finalized_at = trio.current_time()
            self._wake.set()
            if self._stream is not None and not self._recovering:
                await self._send(self._stream, [link.Finalize()])

    async def end(self) -> None:
        """No more audio: the events end after the last final (or the give-up)."""
        async with self._lock:
            if self._ending:
                return
            self._ending = True
            if self._pending and self._pending[-1].finalized_at is None:
                self._drop_open()
            if self._recovering:
                return  # the replay ends with End
            if self._stream is not None:
                stream = self._stream
                try:
                    await stream.end()
                except (H2ClientError, AsrUnavailable) as exc:
                    self._fail(stream, f"sending End failed: {exc}")
            elif self._pending:
                self._recover(None)
            else:
                self._finish()

    async def move(self, pool: str, start: link.Start) -> bool:
        """Recognize on ``pool`` with ``start`` from now on (language ID decided): open a
        stream there and replay the utterances that have no final yet.

        Returns:
            Whether the current stream moved (an idle channel just opens there next).
        Raises:
            AsrUnavailable: the new pool cannot take it; the channel stays where it was.
        """
        async with self._lock:
            if self._stream is None:
                self.pool, self.start = pool, start  # the next (re)open goes there
                return False
            new = await self.pools.open(pool, start, codec=self.codec, bitrate=self.bitrate,
                                        encoder=self._encoder, retry=False)
            old = self._stream
            self.pool, self.start = pool, start
            self._detach(old)
            await self._install(new)
            return True

    async def events(self) -> AsyncGenerator[link.AsrEvent, None]:
        """Partials and finals (``utterance`` is the session's index), errors, until the
        channel ends."""
        async for ev in self._out_recv:
            yield ev

    async def aclose(self) -> None:
        """Abort the current stream and free the encoder."""
        stream, self._stream = self._stream, None
        self._gen += 1
        if stream is not None:
            stream.take_encoder()
            await stream.aclose()
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
        self._finish()

    @property
    def pending_utterances(self) -> list[int]:
        return [p.utterance for p in self._pending]

    # -- internals ----------------------------------------------------------------------

    def _open_utterance(self) -> _Pending | None:
        if self._pending and self._pending[-1].finalized_at is None:
            return self._pending[-1]
        return None

    def _drop_open(self) -> None:
        p = self._pending.pop()
        self._packets -= len(p.packets)

    def _encode(self, pcm: np.ndarray, pts_ms: int) -> link.Audio:
        if self._encoder is not None:
            try:
                return link.Audio(0, pts_ms, self._encoder.encode(pcm))
            except (OpusError, ValueError) as exc:
                self.opus_failures += 1
                self.pools.counters.pcm_to_opus_fail += 1
                log.warning("opus encode failed, sending PCM: %s", exc)
                return link.Audio(0, pts_ms, pcm.astype("<i2").tobytes(), pcm=True)
        return link.Audio(0, pts_ms, pcm.astype("<i2").tobytes())

    def _bound(self) -> None:
        """Past the bound, the oldest utterances lose their replay (not their final, if
        their stream lives)."""
        for p in self._pending:
            if self._packets <= self.policy.max_pending_packets:
                return
            if p is self._pending[-1]:
                return
            self._packets -= len(p.packets)
            p.packets = []

    async def _send(self, stream: AsrStream, frames: list[link.Frame]) -> None:
        """Send on the current stream; a failure starts a recovery (the frames are in
        the replay buffer already). Call with the lock held."""
        try:
            await stream.send_frames(frames)
        except (H2ClientError, AsrUnavailable) as exc:
            self._fail(stream, f"send failed: {exc}")

    def _fail(self, stream: AsrStream, reason: str) -> None:
        """``stream`` failed: if it is still the current one, replace it."""
        if stream is not self._stream or self._finished:
            return
        if stream.endpoint is not None:
            self.pools.report_failure(stream.endpoint, f"{stream.endpoint.name}: {reason}")
        log.warning("ASR stream on %s failed (%s); %d utterance(s) to replay",
                    stream.endpoint.name if stream.endpoint else "?", reason,
                    len(self._pending), extra=fields(flowId=self.start.flow_id, stage="asr",
                                                     pool=self.pool))
        self._detach(stream)
        self._recover(reason, avoid=stream.endpoint)

    def _detach(self, stream: AsrStream) -> None:
        if stream is self._stream:
            self._stream = None
            self._gen += 1
            if self.behind:  # that service's backlog is not the next one's
                self.behind = False
                self._emit(link.AsrEvent("flow", self.start.flow_id, code="OK"))
            for p in self._pending:
                p.sent = p.sent or p.index is not None
                p.index = None
        stream.take_encoder()  # the encoder is the channel's
        if self._nursery is not None:
            self._nursery.start_soon(self._close_quietly, stream)

    @staticmethod
    async def _close_quietly(stream: AsrStream) -> None:
        """Reset a replaced stream; its connection may be gone, which is fine."""
        with trio.CancelScope(shield=True), trio.move_on_after(2), \
                contextlib.suppress(H2ClientError, AsrUnavailable):
            await stream.aclose()

    def _recover(self, reason: str | None, avoid: Any = None) -> None:
        if self._recovering or self._finished or self._nursery is None:
            return
        self._recovering = True
        self._nursery.start_soon(self._recovery, reason, avoid)

    async def _recovery(self, reason: str | None, avoid: Any) -> None:
        """Open a stream (backoff within the budget), then replay under the lock."""
        policy = self.policy
        give_up_at = trio.current_time() + policy.budget_s
        delay = policy.backoff_first_s
        last = reason or ""
        while True:
            try:
                new = await self.pools.open(self.pool, self.start, codec=self.codec,
                                            bitrate=self.bitrate, encoder=self._encoder,
                                            retry=False, avoid=avoid)
            except AsrBusy as exc:
                last = str(exc)
                wait = min(max(delay, exc.retry_after_s), policy.backoff_max_s)
            except AsrUnavailable as exc:
                last = str(exc)
                wait = delay
            else:
                async with self._lock:
                    self._recovering = False
                    if self._finished:
                        new.take_encoder()
                        await new.aclose()
                        return
                    if reason is not None:
                        self.failovers += 1
                        self.pools.counters.failovers += 1
                    await self._install(new)
                return
            if trio.current_time() + wait > give_up_at:
                break
            await trio.sleep(wait)
            delay = min(delay * 2, policy.backoff_max_s)
        async with self._lock:
            self._recovering = False
            self._give_up(f"no ASR endpoint of pool {self.pool!r} took the stream within "
                          f"{policy.budget_s:g} s: {last}")

    def _give_up(self, message: str, which: list[_Pending] | None = None) -> None:
        lost = list(self._pending) if which is None else which
        utterances = [p.utterance for p in lost if p.packets or p.index is not None]
        for p in lost:
            self._packets -= len(p.packets)
            self._pending.remove(p)
        self.given_up += len(utterances)
        self._emit(link.AsrEvent("error", self.start.flow_id, code=UNAVAILABLE,
                                 message=message, extra={"utterances": utterances}))
        if self._ending and not self._pending:
            self._finish()
        elif self._pending and self._nursery is not None and not self._recovering:
            self._recover(message)

    async def _install(self, new: AsrStream) -> None:
        """Make ``new`` current and replay what has no final. Call with the lock held."""
        self._stream = new
        self._gen += 1
        gen = self._gen
        self._next_index = 0
        frames: list[link.Frame] = []
        now = trio.current_time()
        tired = []
        for p in list(self._pending):
            replay = p.sent or p.index is not None
            p.index = None
            if p.discard:  # a withdrawn early start: nothing to ask again
                self._pending.remove(p)
                self._packets -= len(p.packets)
                continue
            if not p.packets:
                if p.finalized_at is not None:
                    # Its replay was dropped at the bound: it cannot be asked again.
                    tired.append(p)
                continue
            if replay:
                p.replays += 1
                if p.replays > self.policy.max_replays:
                    tired.append(p)
                    continue
            p.index = self._next_index
            self._next_index += 1
            frames.extend(new.number(p.packets))
            if p.finalized_at is not None:
                frames.append(link.Finalize())
                p.finalized_at = now
        if tired:
            for p in tired:
                self._packets -= len(p.packets)
                self._pending.remove(p)
            self.given_up += len(tired)
            self._emit(link.AsrEvent(
                "error", self.start.flow_id, code=UNAVAILABLE,
                message=f"{len(tired)} utterance(s) could not be recognized after "
                        f"{self.policy.max_replays} replays",
                extra={"utterances": [p.utterance for p in tired]}))
        assert self._nursery is not None
        self._nursery.start_soon(self._reader, new, gen)
        self._wake.set()
        try:
            await new.send_frames(frames)
            if self._ending:
                await new.end()
        except (H2ClientError, AsrUnavailable) as exc:
            self._fail(new, f"replay failed: {exc}")

    async def _reader(self, stream: AsrStream, gen: int) -> None:
        try:
            async with contextlib.aclosing(stream.events()) as events:
                async for ev in events:
                    if gen != self._gen:
                        return
                    self._on_event(ev)
        except AsrUnavailable as exc:
            async with self._lock:
                self._fail(stream, str(exc))
            return
        async with self._lock:
            if gen != self._gen:
                return
            if self._ending:
                self._finish()
            elif any(p.index is not None for p in self._pending):
                self._fail(stream, "the service ended the stream with finals pending")
            else:
                # The service ended a quiet stream (idle reaping, drain): the next
                # utterance opens a new one.
                self._detach(stream)

    def _on_event(self, ev: link.AsrEvent) -> None:
        if ev.type in ("partial", "final"):
            p = next((p for p in self._pending if p.index == ev.utterance), None)
            if p is None:
                return
            if ev.type == "final":
                self._pending.remove(p)
                self._packets -= len(p.packets)
                self._wake.set()
                if p.discard:
                    return
            elif p.discard:
                return  # a withdrawn early start
            elif ev.ts[1] < p.partial_end_ms:
                return  # a replay's partials catching up with what was passed on
            else:
                p.partial_end_ms = ev.ts[1]
            self._emit(replace(ev, utterance=p.utterance))
        elif ev.type == "flow":
            behind = ev.code == "BEHIND"
            if behind != self.behind:
                self.behind = behind
                self._emit(ev)
        elif ev.type == "error" and ev.code != "TIMEOUT":
            # TIMEOUT: the service reaped a quiet stream; the next utterance reopens.
            self._emit(ev)

    def _emit(self, ev: link.AsrEvent) -> None:
        try:
            self._out_send.send_nowait(ev)
        except trio.WouldBlock:
            log.warning("%s: recognition events not read; dropped a %s", self.start.flow_id,
                        ev.type)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._out_send.close()

    async def _watchdog(self) -> None:
        """Fail a stream whose final is overdue: the service answers PINGs but has
        stopped recognizing (a wedged engine, a lost Finalize)."""
        limit = self.policy.final_deadline_s
        while True:
            self._wake = trio.Event()
            due = [p.finalized_at + limit for p in self._pending
                   if p.finalized_at is not None and p.index is not None]
            deadline = min(due, default=math.inf)
            with trio.move_on_at(deadline):
                await self._wake.wait()
                continue
            async with self._lock:
                if self._stream is None or self._recovering:
                    continue
                ep = self._stream.endpoint
                now = trio.current_time()
                overdue = [p for p in self._pending if p.finalized_at is not None
                           and p.index is not None and p.finalized_at + limit <= now]
                if (ep is not None and not self.pools.has_alternative(self.pool, ep)
                        and all(p.waits < FINAL_DEADLINE_WAITS for p in overdue)):
                    # The only endpoint still answers PINGs (a stall is caught by them):
                    # it is slow, not gone. A replay to it would queue the same work
                    # again behind itself: at 8 real-time sessions on 2 cores that fed a
                    # failover storm (finals p95 13 s). Give it more time instead.
                    for p in overdue:
                        p.waits += 1
                        p.finalized_at = now
                    log.warning("final overdue by %g s; the pool has no other endpoint, "
                                "waiting longer", limit, extra=fields(
                                    flowId=self.start.flow_id, stage="asr", pool=self.pool))
                    continue
                self._fail(self._stream, f"no final within {limit:g} s of Finalize")
