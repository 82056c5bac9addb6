"""Load generator for any running gateway: N real-time sessions of read speech.

    .venv/bin/python bench/load.py --spawn --sessions 50 --seconds 30 --pin
    .venv/bin/python bench/load.py --spawn --workers 2 --sessions 100 --seconds 30
    .venv/bin/python bench/load.py --url ws://HOST:PORT/ws/stream --pid PID --sessions 10

It is not the gateway's own client (``gateway.client``): it speaks WebSocket through
wsproto over plain trio sockets, so it can drive hundreds of real-time sessions from one
core. Every binary message is framed once, masked and all, and the same ``bytes`` are
written by every session; a session is one task with absolute-time pacing (frame ``i``
leaves at ``t0 + i * chunk``, so a late wake-up never accumulates into drift).

Material: the LibriVox clips of ``tests/speech.py`` in a row with pauses of quiet noise
between them, looped; session ``i`` starts ``i / N`` of the way into it, so speech onsets
are spread over time as with real users.

Per session and in aggregate it reports frames sent, events by type, errors by code,
whether ``end`` came, ``flush`` -> ``end`` time, and the archive check: the recording's
length against the audio sent (``record_url.duration_ms``, and with ``--verify-archive``
the Ogg is fetched over HTTP and its samples counted with soundfile), so lost frames are
counted, not guessed. Ingest lag is measured with ``ping``: the gateway reads a
session's messages in order and answers a ping when it reaches it, so ping -> pong is
how far its ingest loop is behind the audio sent before the ping (plus one loopback
round trip). The lag of the stages behind ingest (VAD, archive) shows only in
``flush`` -> ``end``. Gateway CPU per session-second of audio is the
``/proc/PID/stat`` utime+stime delta over the steady part (every session streaming)
divided by the audio sent in that part; RSS from ``/proc/PID/status``.

Writes ``bench/out/<name>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.events import Message as WsMessage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    OUT,
    cpu_model,
    free_port,
    pct,
    proc_sample,
    start,
    stop,
    tree_sample,
)

SAMPLE_RATE = 16000
PAUSE_S = 1.5  # quiet between clips: every clip is an utterance with an endpoint after it
PAUSE_RMS = 30.0  # int16 units, about -61 dBFS: a quiet room, not digital zero
PING_EVERY_S = 1.0  # one ingest-lag probe per session per second of audio
CONNECT_TIMEOUT_S = 20.0
RECV_BYTES = 65536


# -- material ---------------------------------------------------------------------------


def material(pause_s: float = PAUSE_S) -> npt.NDArray[np.int16]:
    """The LibriVox clips in a row, each followed by ``pause_s`` of quiet noise."""
    from tests import speech

    rng = np.random.default_rng(0)
    parts: list[npt.NDArray[np.int16]] = []
    for _, clip, _ in speech.librivox():
        parts.append(clip)
        gap = np.round(rng.normal(0.0, PAUSE_RMS, int(pause_s * SAMPLE_RATE)))
        parts.append(gap.astype(np.int16))
    return np.concatenate(parts)


def ws_binary_frame(payload: bytes, mask: bytes) -> bytes:
    """One complete client->server WebSocket binary frame (FIN, opcode 2, masked)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x82, 0x80 | n])
    elif n < 65536:
        head = bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x82, 0x80 | 127]) + n.to_bytes(8, "big")
    p = np.frombuffer(payload, np.uint8)
    m = np.resize(np.frombuffer(mask, np.uint8), n)
    return head + mask + (p ^ m).tobytes()


@dataclass(frozen=True)
class Framed:
    """The material cut into chunks, each already a WebSocket frame; shared by all
    sessions (one copy of the bytes, however many sessions)."""

    frames: tuple[bytes, ...]
    chunk_samples: int

    @property
    def chunk_s(self) -> float:
        return self.chunk_samples / SAMPLE_RATE


def frame_material(audio: npt.NDArray[np.int16], chunk_ms: int) -> Framed:
    chunk = SAMPLE_RATE * chunk_ms // 1000
    n = len(audio) // chunk
    rng = np.random.default_rng(1)
    frames = tuple(
        ws_binary_frame(audio[i * chunk:(i + 1) * chunk].tobytes(), rng.bytes(4))
        for i in range(n))
    return Framed(frames, chunk)


# -- one session ------------------------------------------------------------------------


@dataclass
class SessionResult:
    index: int
    flow_id: str
    frames_sent: int = 0
    samples_sent: int = 0
    events: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    ended: bool = False
    end_reason: str | None = None
    connect_s: float | None = None
    flush_to_end_s: float | None = None
    late_max_s: float = 0.0  # how far the generator itself fell behind its schedule
    lag_s: list[tuple[float, float]] = field(default_factory=list)  # (at, ping->pong)
    record_url: str | None = None
    record_duration_ms: int | None = None
    record_bytes: int | None = None
    archived_samples: int | None = None  # counted in the fetched Ogg
    failure: str | None = None
    # With recognition: utterances that had a partial, and each final's utterance and
    # audio span (ms), so a soak can count finals that came without a partial first.
    partial_utts: set[int] = field(default_factory=set)
    finals: list[tuple[int, int, bool]] = field(default_factory=list)  # (utt, ms, partial)

    @property
    def sent_ms(self) -> int:
        return self.samples_sent * 1000 // SAMPLE_RATE

    @property
    def lost_ms(self) -> int | None:
        """Audio sent but missing from the recording (from the decoded file when it was
        fetched, else from ``record_url.duration_ms``)."""
        if self.archived_samples is not None:
            return (self.samples_sent - self.archived_samples) * 1000 // SAMPLE_RATE
        if self.record_duration_ms is None:
            return None
        return self.sent_ms - self.record_duration_ms

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["events"] = dict(self.events)
        d["errors"] = dict(self.errors)
        d["lag_s"] = [[round(a, 3), round(b, 4)] for a, b in self.lag_s]
        d["lost_ms"] = self.lost_ms
        d["partial_utts"] = sorted(self.partial_utts)
        return d


class _Ws:
    """The receiving half of a wsproto client connection over a trio stream."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream, self.ws = stream, ws
        self._text: list[str] = []
        self.closed = False
        # The sender and the receiver (answering pings and the close) share the socket.
        self._send_lock = trio.StrictFIFOLock()

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send_text(self, text: str) -> None:
        await self.send(self.ws.send(WsMessage(data=text)))

    async def messages(self) -> Any:
        """Yield text messages until the connection closes."""
        while not self.closed:
            try:
                data = await self.stream.receive_some(RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed = True
                return
            self.ws.receive_data(data)
            for ev in self.ws.events():
                if isinstance(ev, TextMessage):
                    self._text.append(ev.data)
                    if ev.message_finished:
                        yield "".join(self._text)
                        self._text.clear()
                elif isinstance(ev, Ping):
                    await self.send(self.ws.send(ev.response()))
                elif isinstance(ev, CloseConnection):
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.send(self.ws.send(ev.response()))
                    self.closed = True
                    return
                elif isinstance(ev, BytesMessage):
                    pass  # the protocol sends none downstream


async def connect(url: str) -> _Ws:
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError(f"only ws:// URLs are supported, got {url!r}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    stream = await trio.open_tcp_stream(host, port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"{host}:{port}", target=parts.path or "/")))
    while True:
        data = await stream.receive_some(RECV_BYTES)
        if not data:
            raise ConnectionError("closed during the handshake")
        ws.receive_data(data)
        for ev in ws.events():
            if isinstance(ev, AcceptConnection):
                return _Ws(stream, ws)
            if isinstance(ev, RejectConnection):
                raise ConnectionError(f"handshake refused: HTTP {ev.status_code}")


@dataclass(frozen=True)
class LoadConfig:
    url: str
    sessions: int = 10
    seconds: float = 20.0  # audio per session
    chunk_ms: int = 20
    ramp_s: float = 5.0  # session i starts at i * ramp_s / sessions
    speed: float = 1.0  # 1: real time; >1 sends faster (tests)
    returns: tuple[str, ...] = ("record_url", "metrics")
    end_timeout_s: float = 60.0  # flush -> end
    ping_every_s: float = PING_EVERY_S
    run_id: str = "load"


class Counters:
    """What the monitor reads: audio sent so far by all sessions, and sessions live."""

    def __init__(self) -> None:
        self.samples_sent = 0
        self.streaming = 0


async def run_session(cfg: LoadConfig, framed: Framed, index: int, counters: Counters
                      ) -> SessionResult:
    res = SessionResult(index, f"{cfg.run_id}-{index:04d}")
    n_frames = int(cfg.seconds * SAMPLE_RATE) // framed.chunk_samples
    offset = index * len(framed.frames) // max(1, cfg.sessions)
    ping_every = max(1, round(cfg.ping_every_s / framed.chunk_s))
    pings: dict[str, float] = {}
    acked = trio.Event()
    ended = trio.Event()
    t_flush = math.nan
    t_begin = trio.current_time()
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            ws = await connect(cfg.url)
    except (OSError, ConnectionError, trio.TooSlowError) as exc:
        res.failure = f"connect: {exc!r}"
        return res
    res.connect_s = trio.current_time() - t_begin

    async def receive() -> None:
        nonlocal t_flush
        async for text in ws.messages():
            ev = json.loads(text)
            kind = ev.get("type", "?")
            res.events[kind] += 1
            now = trio.current_time()
            if kind == "ack":
                acked.set()
            elif kind == "pong":
                sent = pings.pop(str(ev.get("id")), None)
                if sent is not None:
                    res.lag_s.append((sent, now - sent))
            elif kind == "asr_partial":
                res.partial_utts.add(int(ev.get("utterance", -1)))
            elif kind == "asr_final":
                utt = int(ev.get("utterance", -1))
                span = int(ev.get("end_ms", 0)) - int(ev.get("start_ms", 0))
                res.finals.append((utt, span, utt in res.partial_utts))
            elif kind == "error":
                res.errors[ev.get("code", "?")] += 1
            elif kind == "record_url":
                res.record_url = ev.get("url")
                res.record_duration_ms = ev.get("duration_ms")
                res.record_bytes = ev.get("size_bytes")
            elif kind == "end":
                res.ended = True
                res.end_reason = ev.get("reason")
                # an end before our flush (the gateway's idle flush, an error) has no
                # flush -> end time; end_reason says why
                res.flush_to_end_s = None if math.isnan(t_flush) else now - t_flush
                ended.set()
        acked.set()
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        streaming = False
        try:
            await ws.send_text(json.dumps({
                "type": "start", "flowId": res.flow_id,
                "audio": {"codec": "pcm_s16le", "sr": SAMPLE_RATE, "channels": 1,
                          "chunk_ms": cfg.chunk_ms},
                "return": list(cfg.returns), "client_version": "bench-load/1",
            }))
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await acked.wait()
            if res.events["ack"] == 0:
                res.failure = "no ack"
                nursery.cancel_scope.cancel()
                return res
            counters.streaming += 1
            streaming = True
            step = framed.chunk_s / cfg.speed
            t0 = trio.current_time()
            frames, nf = framed.frames, len(framed.frames)
            send = ws.send
            for i in range(n_frames):
                target = t0 + i * step
                now = trio.current_time()
                if now < target:
                    await trio.sleep_until(target)
                else:
                    res.late_max_s = max(res.late_max_s, now - target)
                await send(frames[(offset + i) % nf])
                res.frames_sent += 1
                res.samples_sent += framed.chunk_samples
                counters.samples_sent += framed.chunk_samples
                if i % ping_every == ping_every - 1:
                    pings[str(i)] = trio.current_time()
                    await ws.send_text(f'{{"type":"ping","id":"{i}"}}')
            counters.streaming -= 1
            streaming = False
            t_flush = trio.current_time()
            await ws.send_text('{"type":"flush"}')
            with trio.move_on_after(cfg.end_timeout_s):
                await ended.wait()
            if not res.ended and res.failure is None:
                res.failure = f"no end within {cfg.end_timeout_s:g} s of flush"
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                OSError) as exc:
            res.failure = f"send: {exc!r}"
        except trio.TooSlowError:
            res.failure = "no ack"
        finally:
            if streaming:
                counters.streaming -= 1
            nursery.cancel_scope.cancel()
            await ws.stream.aclose()
    return res


# -- the run ----------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    gw_cpu_s: float
    gw_rss_mb: float
    self_cpu_s: float
    samples_sent: int
    streaming: int


@dataclass
class LoadRun:
    cfg: LoadConfig
    sessions: list[SessionResult]
    samples: list[Sample]
    wall_s: float


async def run_load(cfg: LoadConfig, framed: Framed, pid: int | None = None,
                   sample_every_s: float = 0.5, tree: bool = False) -> LoadRun:
    """Run ``cfg.sessions`` sessions against ``cfg.url``; sample ``pid`` meanwhile
    (with ``tree``, CPU and RSS summed over ``pid`` and its descendants: a gateway's
    supervisor and its workers)."""
    sample = tree_sample if tree else proc_sample
    counters = Counters()
    results: list[SessionResult] = []
    samples: list[Sample] = []
    t_start = trio.current_time()

    async def monitor() -> None:
        while True:
            gw = sample(pid) if pid else None
            samples.append(Sample(
                trio.current_time() - t_start, gw.cpu_s if gw else math.nan,
                gw.rss_mb if gw else math.nan, time.process_time(),
                counters.samples_sent, counters.streaming))
            await trio.sleep(sample_every_s)

    async def one(i: int) -> None:
        await trio.sleep(i * cfg.ramp_s / max(1, cfg.sessions))
        try:
            results.append(await run_session(cfg, framed, i, counters))
        except Exception as exc:  # one broken session must not end the run
            r = SessionResult(i, f"{cfg.run_id}-{i:04d}")
            r.failure = f"crash: {exc!r}"
            results.append(r)

    async with trio.open_nursery() as outer:
        outer.start_soon(monitor)
        async with trio.open_nursery() as nursery:
            for i in range(cfg.sessions):
                nursery.start_soon(one, i)
        outer.cancel_scope.cancel()
    gw = sample(pid) if pid else None
    samples.append(Sample(trio.current_time() - t_start, gw.cpu_s if gw else math.nan,
                          gw.rss_mb if gw else math.nan, time.process_time(),
                          counters.samples_sent, counters.streaming))
    results.sort(key=lambda r: r.index)
    return LoadRun(cfg, results, samples, trio.current_time() - t_start)


def verify_archives(results: list[SessionResult], timeout_s: float = 30.0) -> None:
    """Fetch each recording and count its samples (sets ``archived_samples``)."""
    import io

    import soundfile

    for r in results:
        if not r.record_url:
            continue
        with urllib.request.urlopen(r.record_url, timeout=timeout_s) as resp:
            data = resp.read()
        info = soundfile.info(io.BytesIO(data))
        r.archived_samples = round(info.frames * SAMPLE_RATE / info.samplerate)


# -- report -----------------------------------------------------------------------------


def steady_window(run: LoadRun) -> tuple[Sample, Sample] | None:
    """First and last monitor samples while every session was streaming (every session
    that got as far: one that failed to connect does not void the measurement)."""
    most = max((s.streaming for s in run.samples), default=0)
    full = [s for s in run.samples if s.streaming == most > 0]
    if len(full) < 2:
        return None
    return full[0], full[-1]


def aggregate(run: LoadRun) -> dict[str, Any]:
    rs = run.sessions
    events: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in rs:
        events.update(r.events)
        errors.update(r.errors)
    lags = [lag for r in rs for _, lag in r.lag_s]
    f2e = [r.flush_to_end_s for r in rs if r.flush_to_end_s is not None]
    lost = [r.lost_ms for r in rs]
    out: dict[str, Any] = {
        "sessions": len(rs),
        "ended": sum(r.ended for r in rs),
        "end_reasons": dict(Counter(str(r.end_reason) for r in rs)),
        "failures": Counter(r.failure.split(":")[0] for r in rs if r.failure),
        "frames_sent": sum(r.frames_sent for r in rs),
        "audio_sent_s": round(sum(r.samples_sent for r in rs) / SAMPLE_RATE, 2),
        "events": dict(events),
        "errors": dict(errors),
        "records": sum(r.record_url is not None for r in rs),
        "archive_checked": sum(r.archived_samples is not None for r in rs),
        "lost_ms_total": sum(x for x in lost if x is not None),
        "sessions_with_loss": sum(1 for x in lost if x),
        "sessions_without_record": sum(1 for x in lost if x is None),
        "flush_to_end_ms": {q: round(pct(f2e, p) * 1000, 1) for q, p in
                            (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
        "ingest_lag_ms": {q: round(pct(lags, p) * 1000, 1) for q, p in
                          (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
        "generator_late_max_ms": round(max((r.late_max_s for r in rs), default=0) * 1000, 1),
        "wall_s": round(run.wall_s, 1),
    }
    out["failures"] = dict(out["failures"])
    win = steady_window(run)
    if win is not None:
        a, b = win
        audio_s = (b.samples_sent - a.samples_sent) / SAMPLE_RATE
        out["steady"] = {
            "from_s": round(a.at, 1), "to_s": round(b.at, 1),
            "audio_s": round(audio_s, 1),
            "gw_cpu_ms_per_session_s": (round((b.gw_cpu_s - a.gw_cpu_s) * 1000 / audio_s, 2)
                                        if audio_s > 0 else None),
            "gw_cores": round((b.gw_cpu_s - a.gw_cpu_s) / (b.at - a.at), 3),
            "gen_cpu_ms_per_session_s": (round((b.self_cpu_s - a.self_cpu_s) * 1000 / audio_s,
                                               2) if audio_s > 0 else None),
            "gen_cores": round((b.self_cpu_s - a.self_cpu_s) / (b.at - a.at), 3),
        }
    rss = [s.gw_rss_mb for s in run.samples if not math.isnan(s.gw_rss_mb)]
    if rss:
        out["gw_rss_mb"] = {"first": round(rss[0], 1), "max": round(max(rss), 1),
                            "last": round(rss[-1], 1)}
    return out


def print_report(run: LoadRun, agg: dict[str, Any], per_session: bool) -> None:
    if per_session:
        print(f"{'sess':>4} {'frames':>7} {'sent s':>7} {'ended':>5} {'f->end ms':>9} "
              f"{'lag p99':>8} {'rec ms':>7} {'lost ms':>7}  events / errors")
        for r in run.sessions:
            lag = pct([x for _, x in r.lag_s], 99) * 1000
            f2e = "-" if r.flush_to_end_s is None else f"{r.flush_to_end_s * 1000:.0f}"
            ev = " ".join(f"{k}={v}" for k, v in sorted(r.events.items()))
            err = " ".join(f"{k}={v}" for k, v in sorted(r.errors.items()))
            print(f"{r.index:>4} {r.frames_sent:>7} {r.samples_sent / SAMPLE_RATE:>7.1f} "
                  f"{'yes' if r.ended else 'NO':>5} {f2e:>9} {lag:>8.1f} "
                  f"{r.record_duration_ms if r.record_duration_ms is not None else '-':>7} "
                  f"{r.lost_ms if r.lost_ms is not None else '-':>7}  {ev}"
                  f"{' / ' + err if err else ''}{' FAIL ' + r.failure if r.failure else ''}")
        print()
    width = max(len(k) for k in agg)
    for k, v in agg.items():
        print(f"{k:<{width}}  {v}")


def plot(run: LoadRun, agg: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 7), constrained_layout=True)
    s = run.samples
    t = np.array([x.at for x in s])
    if len(s) > 1:
        dt = np.diff(t)
        gw = np.diff([x.gw_cpu_s for x in s]) / np.where(dt > 0, dt, np.nan)
        me = np.diff([x.self_cpu_s for x in s]) / np.where(dt > 0, dt, np.nan)
        ax[0][0].plot(t[1:], gw, label="gateway")
        ax[0][0].plot(t[1:], me, label="load generator")
        ax[0][0].plot(t, [x.streaming / max(1, run.cfg.sessions) for x in s], "k:",
                      label="sessions streaming (fraction)")
        ax[0][0].set_ylabel("cores")
        ax[0][0].set_xlabel("s")
        ax[0][0].legend()
        ax[0][0].set_title(f"{run.cfg.sessions} sessions: gateway "
                           f"{agg.get('steady', {}).get('gw_cpu_ms_per_session_s', '?')} "
                           "ms CPU per session-second")
        ax[0][1].plot(t, [x.gw_rss_mb for x in s])
        ax[0][1].set_ylabel("gateway RSS (MB)")
        ax[0][1].set_xlabel("s")
    t0 = min((a for r in run.sessions for a, _ in r.lag_s), default=0.0)
    for r in run.sessions:
        if r.lag_s:
            ax[1][0].plot([a - t0 for a, _ in r.lag_s], [b * 1000 for _, b in r.lag_s],
                          ".", ms=2, color="C0")
    ax[1][0].set_ylabel("ping -> pong (ms): ingest lag")
    ax[1][0].set_xlabel("s")
    f2e = [r.flush_to_end_s * 1000 for r in run.sessions if r.flush_to_end_s is not None]
    if f2e:
        ax[1][1].hist(f2e, bins=30)
    ax[1][1].set_xlabel("flush -> end (ms)")
    ax[1][1].set_ylabel("sessions")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def set_affinity(pid: int, cpus: set[int]) -> bool:
    try:
        os.sched_setaffinity(pid, cpus)
        # every thread of the process, not only its main thread
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cpus)
        return True
    except OSError:
        return False


def spawn_gateway(with_asr: bool, archive_dir: str, max_sessions: int, workers: int = 1
                  ) -> tuple[Any, str]:
    """``voxgate gateway`` with an unreachable ASR (record-only), or ``voxgate serve``;
    ``workers`` gateway processes (MAX_SESSIONS holds per worker)."""
    env = {"ARCHIVE_DIR": archive_dir, "MAX_SESSIONS": str(max_sessions),
           "PUBLIC_BASE": "", "WORKERS": str(workers)}
    if not with_asr:
        env["ASR_URLS"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cmd = "serve" if with_asr else "gateway"
    proc, line = start([cmd, "--port", "0", "--http-port", "0"], "ws://", env=env)
    return proc, line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="ws://HOST:PORT/ws/stream of a running gateway")
    p.add_argument("--spawn", action="store_true", help="start `voxgate gateway` "
                   "(record-only: its ASR unreachable) and measure it")
    p.add_argument("--with-asr", action="store_true",
                   help="with --spawn: `voxgate serve` (gateway + local ASR); asks for asr")
    p.add_argument("--pid", type=int, help="gateway process to measure (with --url)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="with --spawn: `voxgate gateway --workers N`; the gateway's CPU "
                   "is then summed over the supervisor and its workers (default 1)")
    p.add_argument("--tree", action="store_true",
                   help="with --pid: sum CPU and RSS over PID and its descendants (a "
                   "gateway started with --workers: give the supervisor's pid)")
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--seconds", type=float, default=20.0, help="audio per session, s")
    p.add_argument("--chunk-ms", type=int, default=20)
    p.add_argument("--ramp-s", type=float, default=5.0)
    p.add_argument("--speed", type=float, default=1.0, help="1 = real time")
    p.add_argument("--pin", action="store_true",
                   help="gateway on CPU 0, this process on CPU 1")
    p.add_argument("--verify-archive", action="store_true",
                   help="fetch every recording and count its samples")
    p.add_argument("--end-timeout-s", type=float, default=60.0)
    p.add_argument("--name", default=None, help="output stem (default load_<N>)")
    p.add_argument("--per-session", action="store_true", help="print every session")
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.spawn):
        p.error("give exactly one of --url and --spawn")
    if args.sessions < 1 or args.seconds <= 0 or args.chunk_ms <= 0:
        p.error("--sessions, --seconds and --chunk-ms must be positive")
    if args.workers < 1 or (args.workers > 1 and (args.with_asr or not args.spawn)):
        p.error("--workers N: N >= 1, with --spawn and without --with-asr")
    if args.workers > 1 and args.pin:
        p.error("--pin puts the gateway on one CPU: not with --workers")
    tree = args.tree or args.workers > 1

    proc = None
    pid = args.pid
    url = args.url
    tmp = tempfile.TemporaryDirectory(prefix="voxgate-load-")
    try:
        if args.spawn:
            proc, url = spawn_gateway(args.with_asr, tmp.name, max(200, args.sessions + 10),
                                      args.workers)
            pid = proc.pid
        pinned = False
        if args.pin and pid:
            pinned = set_affinity(pid, {0}) and set_affinity(os.getpid(), {1})
        returns = ("record_url", "metrics") + (("asr",) if args.with_asr else ())
        cfg = LoadConfig(url=url, sessions=args.sessions, seconds=args.seconds,
                         chunk_ms=args.chunk_ms, ramp_s=args.ramp_s, speed=args.speed,
                         returns=returns, end_timeout_s=args.end_timeout_s,
                         run_id=f"load{int(time.time())}")
        framed = frame_material(material(), args.chunk_ms)
        run = trio.run(run_load, cfg, framed, pid, 0.5, tree)
        if args.verify_archive:
            verify_archives(run.sessions)
    finally:
        if proc is not None:
            stop(proc)
        tmp.cleanup()

    agg = aggregate(run)
    print_report(run, agg, args.per_session or args.sessions <= 12)
    name = args.name or f"load_{args.sessions}"
    OUT.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": {"cpu": cpu_model(), "cores": os.cpu_count(),
                 "python": platform.python_version(), "url": url, "pinned": pinned,
                 "spawned": bool(args.spawn), "with_asr": args.with_asr,
                 "workers": args.workers, "cpu_over_process_tree": tree,
                 "config": {k: v for k, v in asdict(cfg).items() if k != "url"},
                 "note": "ingest lag = ping->pong through the session's ingest loop"},
        "aggregate": agg,
        "samples": [asdict(s) for s in run.samples],
        "sessions": [r.summary() for r in run.sessions],
    }
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=1))
    plot(run, agg, OUT / f"{name}.png")
    print(f"wrote {OUT / name}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
