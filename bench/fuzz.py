"""Fuzz bench: a million mutated frames at a running gateway and ASR service.

    .venv/bin/python bench/fuzz.py                  # 1,000,000 frames (about 10 min)
    .venv/bin/python bench/fuzz.py --quick          # 10,000 frames, a smoke test
    .venv/bin/python bench/fuzz.py --frames 200000 --ws-connections 6 --link-connections 2

It starts two processes on 127.0.0.1: the ASR service around the stand-in engine
(``tests/standin.py``: real HTTP/2 server, link codec, scheduler and Opus decoder, with
recognition replaced by a cheap answer) and ``voxgate gateway`` pointed at it. Then:

1. a normal session (real speech, ``flush``) must produce an ``asr_final`` and ``end``;
2. WebSocket workers open sessions and send mutated frames: text frames built from valid
   ``start``/``ping``/``finalize``/``flush`` messages with fields of the wrong type,
   unknown fields, unicode, lone-surrogate escapes, huge or deeply nested JSON, huge
   numbers, spliced JSON, invalid UTF-8; and binary frames of odd sizes, empty, oversize,
   with ``seq`` headers that repeat, reorder, jump to ``2**32 - 1`` or are too short.
   A session ends with ``flush``, an abrupt disconnect or a close, or when the server
   closes it; the worker then reconnects;
3. link workers open HTTP/2 connections (the ``h2`` library) straight to the ASR
   service's ``/v1/recognize`` and send a ``Start`` (sometimes mutated) followed by
   mutated link frames (wild ``seq``/``pts``, garbage Opus, wrong-size PCM, short
   frames, odd ``Finalize`` JSON, duplicate ``Start``), ending with ``End``, a reset, or
   one fatal frame (unknown type, oversize length, bad JSON); and ``/v1/lid`` bodies of
   odd, empty, small and oversize lengths;
4. after an idle period, the normal session again: it must still produce its final.

Recorded: frames sent (by kind), server error events by code, server closes by close
code, HTTP statuses, any crash (a process that exits, a 5xx, a response the client
cannot decode, a traceback in a service's log), both services' RSS over time (start,
after warm-up, end, after the idle period), and frames/s. Writes
``bench/results/<name>.json`` and ``.png``; exit status 1 if a check failed.

A frame is one WebSocket message, one link frame, or one ``/v1/lid`` request body.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import os
import platform
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import VOXGATE, cpu_model, proc_sample  # noqa: E402

RESULTS = ROOT / "bench" / "results"
U32_MAX = 2**32 - 1
MAX_FRAME_BYTES = 65536  # the gateway's MAX_FRAME_BYTES default
TEXT_LIMIT = 16 * 1024  # protocol.MAX_TEXT_FRAME_BYTES
RECV_BYTES = 65536
LINK_CT = "application/vnd.voxgate.asr-link.v2"
MAX_ERROR_SAMPLES = 12  # distinct problem lines kept in the report
# Frame kinds that are malformed whatever the dice said: each one must be answered with
# an error event (odd PCM, a short seq header, a seq past the reorder limit, odd payload).
MUST_ERROR = frozenset({"bin_odd", "seq_short_header", "seq_wild", "seq_odd_payload"})
# How long a request may stay unanswered once the client has said all it will (a flush,
# a link End or fatal frame, a /v1/lid body) before it counts as a hang, s.
ANSWER_TIMEOUT_S = [15.0]
LINK_IN_FLIGHT = 24  # streams per link connection (the ASR service admits 32 at once)


# -- the services ----------------------------------------------------------------------


def _asr_standin_main() -> None:
    """The ASR service around the stand-in engine, until SIGINT/SIGTERM (child process)."""
    from asr.server import AsrServerConfig, serve
    from tests.standin import StandInEngine

    async def run() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            app, port = await nursery.start(functools.partial(
                serve, StandInEngine(), AsrServerConfig(host="127.0.0.1", port=0),
                shutdown=shutdown))
            await app.ready_event.wait()
            print(f"asr http://127.0.0.1:{port}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    shutdown.set()
                    break

    trio.run(run)


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[str]
    line: str
    log: Path
    log_fh: Any = None
    drain: threading.Thread | None = None
    stdout_lines: list[str] = field(default_factory=list)  # printed up to the ready line

    def url(self, prefix: str) -> str | None:
        """The first URL starting with ``prefix`` that the service printed."""
        for line in self.stdout_lines:
            for word in line.split():
                if word.startswith(prefix):
                    return word
        return None

    def problems(self) -> list[str]:
        """Log lines that show a crash: tracebacks and error-level records."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        out = []
        for line in text.splitlines():
            low = line.lower()
            if ("traceback" in low or '"level": "error"' in low or '"level":"error"' in low
                    or '"levelname": "error"' in low or "exceptiongroup" in low
                    or "critical" in low):
                out.append(_summary(line))
        return out


def _summary(line: str) -> str:
    """A log line cut to its message and the exception's last line (JSON logs), so the
    report says what failed."""
    try:
        record = json.loads(line)
    except ValueError:
        return line[:400]
    exc = [x for x in str(record.get("exc", "")).splitlines() if x.strip(" |+-")]
    return f"{record.get('msg', '')[:200]} :: {exc[-1].strip(' |')[:300] if exc else ''}"


def spawn(name: str, argv: list[str], ready: str, env: dict[str, str],
          timeout_s: float = 120.0) -> Service:
    log = Path(tempfile.mkstemp(prefix=f"voxgate-fuzz-{name}-", suffix=".log")[1])
    fh = log.open("w")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=fh, text=True,
                            env={**os.environ, **env}, cwd=ROOT)
    assert proc.stdout is not None
    out = proc.stdout
    deadline = time.monotonic() + timeout_s
    before: list[str] = []
    while time.monotonic() < deadline:
        line = out.readline()
        before.append(line.strip())
        if not line:
            proc.wait()
            out.close()
            fh.close()
            raise RuntimeError(f"{name} exited early: {log.read_text()[-2000:]}")
        if line.startswith(ready):
            # Keep reading stdout: a pipe nobody reads would block the service.
            drain = threading.Thread(target=lambda: [None for _ in out], daemon=True)
            drain.start()
            return Service(name, proc, line.strip(), log, fh, drain, before)
    proc.kill()
    proc.wait()
    out.close()
    fh.close()
    raise TimeoutError(f"{name} not ready after {timeout_s} s")


def stop(svc: Service) -> int | None:
    """SIGINT, then kill after 20 s; returns the exit code (None: it had to be killed)."""
    code: int | None = svc.proc.poll()
    if code is None:
        svc.proc.send_signal(signal.SIGINT)
        try:
            code = svc.proc.wait(20)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait(5)
    if svc.drain is not None:
        svc.drain.join(5)
    if svc.proc.stdout is not None:
        svc.proc.stdout.close()
    if svc.log_fh is not None:
        svc.log_fh.close()
    return code


# -- bookkeeping -----------------------------------------------------------------------


@dataclass
class Stats:
    frames: Counter[str] = field(default_factory=Counter)  # sent, by kind
    ws_events: Counter[str] = field(default_factory=Counter)
    ws_errors: Counter[str] = field(default_factory=Counter)  # error events by code
    ws_fatal: Counter[str] = field(default_factory=Counter)
    ws_closes: Counter[str] = field(default_factory=Counter)  # server close codes
    ws_session_ends: Counter[str] = field(default_factory=Counter)  # how workers ended
    ws_handshake: Counter[str] = field(default_factory=Counter)
    link_errors: Counter[str] = field(default_factory=Counter)
    link_status: Counter[str] = field(default_factory=Counter)
    link_events: Counter[str] = field(default_factory=Counter)
    link_streams: Counter[str] = field(default_factory=Counter)  # how streams ended
    lid_status: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)  # requests the server never finished
    samples: dict[str, list[str]] = field(default_factory=dict)  # context of some outcomes
    # where the workers' time went, s
    timing: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    coded: Counter[str] = field(default_factory=Counter)  # malformed frames vs errors
    record_urls: list[str] = field(default_factory=list)  # the latest signed record_urls
    http_status: Counter[str] = field(default_factory=Counter)  # by request kind
    undecodable: list[str] = field(default_factory=list)  # server output we cannot read
    # (t_s, frames sent, gateway RSS MB, ASR RSS MB, gateway CPU s, ASR CPU s, bench CPU s)
    timeline: list[tuple[float, int, float, float, float, float, float]] = field(
        default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.frames.values())

    def family(self, name: str) -> int:
        """Frames sent of one family: ``ws``, ``link`` (incl. /v1/lid) or ``http``."""
        def of(label: str) -> str:
            if label.startswith(("link", "lid")):
                return "link"
            return "http" if label.startswith(("record_", "http_")) else "ws"
        return sum(v for k, v in self.frames.items() if of(k) == name)

    def sample(self, key: str, what: str) -> None:
        got = self.samples.setdefault(key, [])
        if len(got) < 5:
            got.append(what[:300])

    def hang(self, what: str) -> None:
        if len(self.hangs) < 200:
            self.hangs.append(what[:400])

    def crash(self, what: str) -> None:
        if len(self.crashes) < 200:
            self.crashes.append(what[:400])


# -- mutation --------------------------------------------------------------------------

VALID: dict[str, dict[str, Any]] = {
    "start": {
        "type": "start", "flowId": "fuzz",
        "audio": {"codec": "pcm_s16le", "sr": 16000, "channels": 1, "chunk_ms": 20},
        "return": ["lid", "asr", "record_url", "metrics"],
        "hints": {"domain": "default", "user_lang_pref": "auto", "hotwords": ["voxgate"]},
        "client_version": "fuzz/1", "features": [], "trace_id": "t", "tenant_id": "",
    },
    "ping": {"type": "ping", "id": "p"},
    "finalize": {"type": "finalize"},
    "flush": {"type": "flush"},
}
STRINGS = ["", " ", "\x00", "\u202e", "\ufeff", "🙂" * 30, "é" * 100, "a" * 300,
           "../../etc/passwd", "%00", "null", "en-US", "xx", "zh-Hant-TW", "EN_us",
           "x" * 17, "\ud800", "\udfff\ud800", "\\", '"', "start", "flush", "seq_header",
           "<script>", "\n\r\t", "A" * 5000]
# Literal JSON texts that json.dumps cannot produce, spliced in place of a value.
RAW_VALUES = ["1" * 4301, "1" * 5000, "-" + "9" * 4400, "1e999", "-1e999", "NaN",
              "Infinity", "1e-999", "[" * 40 + "]" * 40, '{"a":' * 40 + "1" + "}" * 40,
              "[" * 2000 + "]" * 2000, "0.1e1", "-0", "123456789012345678901234567890"]


def weird(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if r < 0.25:
        return rng.choice(STRINGS)
    if r < 0.45:
        return rng.choice([0, -1, 1, 7, 16000, 2**31, 2**32, 2**63, -2**63, 2**64, 10**30])
    if r < 0.55:
        return rng.choice([0.5, -0.0, 1e308, float("nan"), float("inf"), 16000.0])
    if r < 0.65:
        return rng.choice([None, True, False])
    if r < 0.72 or depth > 3:
        return f"__RAW{rng.randrange(len(RAW_VALUES))}__"
    if r < 0.86:
        return [weird(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {rng.choice(["a", "type", "sr", "", "🙂", "x" * 50]): weird(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))}


def dumps_raw(obj: Any) -> str:
    """json.dumps, then the ``__RAWn__`` markers replaced by their literal JSON."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=True)
    if "__RAW" in text:
        for i, raw in enumerate(RAW_VALUES):
            text = text.replace(f'"__RAW{i}__"', raw)
    return text


def mutate_message(rng: random.Random, kind: str) -> str:
    msg = json.loads(json.dumps(VALID[kind]))
    if kind == "flush":
        # A flush that stays a flush ends the session: mutate its type instead.
        msg["type"] = rng.choice(["FLUSH", "flush ", " flush", ["flush"], {"flush": 1},
                                  "flus", "flush\x00", None, 1, ""])
        return dumps_raw(msg)
    for _ in range(rng.randrange(1, 4)):
        place = msg
        if kind == "start" and rng.random() < 0.6:
            sub = msg.get(rng.choice(["audio", "hints", "auth"]))
            if isinstance(sub, dict):
                place = sub
            elif rng.random() < 0.5:
                msg["auth"] = place = {"token": "x"}
        op = rng.random()
        keys = [k for k in place if k != "type"] or ["x"]
        if op < 0.6:
            place[rng.choice(keys)] = weird(rng)
        elif op < 0.75:
            place.pop(rng.choice(keys), None)
        else:
            place[rng.choice(["x", "", "🙂", "typ", "TYPE", "a" * 200, "\ud800"])] = weird(rng)
    return dumps_raw(msg)


def splice(rng: random.Random, text: str) -> str:
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(len(text) + 1)
        op = rng.random()
        if op < 0.35:
            text = text[:i] + rng.choice(["[", "{", '"', "\\", "\\u", "\\ud800", ",", ":",
                                          "}", "]", "\x00", "🙂"]) + text[i:]
        elif op < 0.6:
            text = text[:i] + text[i + rng.randrange(1, 6):]
        elif op < 0.8:
            text = text[:i]
        else:
            text = text[:i] + text[i:] * rng.randrange(2, 4)
    return text


def text_frame(rng: random.Random) -> tuple[str, str | bytes]:
    """One mutated text message: (label, text) or (label, raw bytes for an invalid
    UTF-8 text frame)."""
    r = rng.random()
    if r < 0.30:
        return "text_ping", mutate_message(rng, "ping")
    if r < 0.40:
        return "text_finalize", mutate_message(rng, "finalize")
    if r < 0.50:
        return "text_flush_mutated", mutate_message(rng, "flush")
    if r < 0.58:
        return "text_start_again", mutate_message(rng, "start")
    if r < 0.75:
        return "text_spliced", splice(rng, json.dumps(VALID[rng.choice(
            ["ping", "finalize", "start"])]))
    if r < 0.84:
        return "text_unicode", "".join(chr(rng.choice(
            [rng.randrange(32, 127), rng.randrange(0x80, 0xD800),
             rng.randrange(0xE000, 0x110000)])) for _ in range(rng.randrange(0, 60)))
    if r < 0.96:
        return "text_unknown_type", dumps_raw({"type": weird(rng), "x": weird(rng)})
    if r < 0.999:
        n = rng.choice([TEXT_LIMIT - 20, TEXT_LIMIT, TEXT_LIMIT + 1, 4000, 9000])
        return "text_huge", rng.choice([
            "[" * n, '{"type":"ping","id":"' + "a" * n + '"}',
            '{"type":"ping","id":' + "[" * (n // 2) + "]" * (n // 2) + "}",
            '{"type":"ping","id":"' + "🙂" * (n // 4) + '"}',
            '{"type":"ping","id":' + "1" * min(n, 9000) + "}"])
    return "text_bad_utf8", rng.choice([b"\xff", b'{"type":"ping","id":"\xc3"}',
                                        b"\xed\xa0\x80", b"\x80" * 10])


def _is_flush(text: str) -> bool:
    """Whether a fuzzed text frame is still a valid ``flush`` (``{"type": "flush", ...}``
    with any other fields): the session ends there, and later frames go unanswered."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("type") == "flush"


def pcm(rng: random.Random, n_bytes: int) -> bytes:
    if rng.random() < 0.5:
        return bytes(n_bytes)
    return rng.randbytes(n_bytes)  # full-scale noise: VAD, archive and link all run


@dataclass
class SeqState:
    next: int = 0
    sent: list[int] = field(default_factory=list)


def binary_frame(rng: random.Random, seq: SeqState | None) -> tuple[str, bytes]:
    if seq is None:
        r = rng.random()
        if r < 0.55:
            return "bin_audio", pcm(rng, 2 * rng.randrange(1, 640))
        if r < 0.80:
            return "bin_odd", pcm(rng, 2 * rng.randrange(0, 640) + 1)
        if r < 0.90:
            return "bin_empty", b""
        if r < 0.995:
            return "bin_large", pcm(rng, 2 * rng.randrange(2048, 8192))
        return "bin_oversize", bytes(MAX_FRAME_BYTES + rng.choice([2, 8, 10, 1000]))
    r = rng.random()
    pts = rng.choice([seq.next * 20, 0, U32_MAX, rng.randrange(U32_MAX)])
    if r < 0.45:
        s, label = seq.next, "seq_in_order"
        seq.next += 1
    elif r < 0.55:
        s, label = (rng.choice(seq.sent[-40:]) if seq.sent else 0), "seq_duplicate"
    elif r < 0.65:
        s, label = seq.next + rng.randrange(1, 12), "seq_ahead"
    elif r < 0.72:
        # Far past any reorder limit: refused whatever the server's next seq is.
        s, label = rng.choice([U32_MAX, 2**31, seq.next + 10**6]), "seq_wild"
    elif r < 0.78:
        # Just past the limit as the client counts (the server's next seq may be ahead
        # of the client's after a window skip, so this one may be taken).
        s, label = rng.choice([seq.next + 257, rng.randrange(U32_MAX)]), "seq_jump"
    elif r < 0.88:
        return "seq_short_header", rng.randbytes(rng.randrange(0, 8))
    else:
        s, label = seq.next, "seq_odd_payload"
        seq.sent.append(s)
        return label, struct.pack("<II", s, pts) + pcm(rng, 2 * rng.randrange(0, 320) + 1)
    s = min(s, U32_MAX)
    seq.sent.append(s)
    return label, struct.pack("<II", s, pts) + pcm(rng, 640)


def mutated_start(rng: random.Random) -> str:
    return mutate_message(rng, "start")


def valid_start(flow_id: str, seq_header: bool, lang: str, token: str = "",
                **hints: Any) -> str:
    msg = dict(VALID["start"], flowId=flow_id,
               features=["seq_header"] if seq_header else [])
    msg["hints"] = dict(VALID["start"]["hints"], user_lang_pref=lang, **hints)
    if token:
        msg["auth"] = {"token": token}
    return json.dumps(msg)  # ASCII: a lone surrogate goes out as its escape


# -- session tokens (--auth) -------------------------------------------------------------

AUTH_SECRET: list[bytes] = []  # the gateway's AUTH_JWT_SECRET when --auth is on


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(claims: dict[str, Any], key: bytes, header: dict[str, Any] | None = None
                ) -> str:
    head = (_b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode()) + "."
            + _b64(json.dumps(claims).encode()))
    return head + "." + _b64(hmac.new(key, head.encode(), hashlib.sha256).digest())


def session_token(rng: random.Random, tenant: str) -> tuple[str, str]:
    """(label, token): valid for ``tenant`` mostly; expired, forged, ``alg: none``,
    tenant-less or garbage now and then (those must get UNAUTHORIZED)."""
    now = time.time()
    good = {"sub": f"user-{tenant}", "tenant": tenant, "exp": now + 3600, "iat": now}
    r = rng.random()
    if r < 0.94:
        return "token_valid", hs256_token(good, AUTH_SECRET[0])
    return rng.choice([
        ("token_expired", hs256_token({**good, "exp": now - 3600}, AUTH_SECRET[0])),
        ("token_forged", hs256_token(good, b"f" * 32)),
        ("token_alg_none", hs256_token(good, b"", {"alg": "none"}).rsplit(".", 1)[0] + "."),
        ("token_no_tenant", hs256_token({"exp": now + 3600}, AUTH_SECRET[0])),
        ("token_garbage", splice(rng, hs256_token(good, AUTH_SECRET[0]))),
        ("token_missing", ""),
    ])


# -- WebSocket client ------------------------------------------------------------------


_MASKS = random.Random(0)


def _ws_frame(opcode: int, payload: bytes, rng: random.Random, *, first: int | None = None,
              masked: bool = True) -> bytes:
    """One client frame built by hand, so that any payload goes out: masked, FIN set,
    unless ``first`` gives the whole first byte (FIN, RSV bits, opcode)."""
    n = len(payload)
    b0 = 0x80 | opcode if first is None else first
    m = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", b0, m | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if not masked:
        return head + payload
    mask = rng.randbytes(4)
    arr = np.frombuffer(payload, np.uint8)
    key = np.frombuffer(mask * (n // 4 + 1), np.uint8)[:n]
    return head + mask + (arr ^ key).tobytes()


def ws_level_frame(rng: random.Random) -> tuple[str, bytes, bool]:
    """A frame that tests the WebSocket layer itself: (label, bytes, whether it breaks
    RFC 6455, which must fail the connection with a Close frame)."""
    ping = b'{"type":"ping","id":"frag"}'
    choices: list[tuple[str, bytes, bool]] = [
        ("ws_ping", _ws_frame(0x9, rng.randbytes(rng.randrange(0, 126)), rng), False),
        ("ws_pong", _ws_frame(0xA, b"unsolicited", rng), False),
        ("ws_fragmented_text", _ws_frame(0x1, ping[:7], rng, first=0x01)
         + _ws_frame(0x0, ping[7:], rng, first=0x80), False),
        ("ws_ping_inside_fragments", _ws_frame(0x1, ping[:7], rng, first=0x01)
         + _ws_frame(0x9, b"p", rng) + _ws_frame(0x0, ping[7:], rng, first=0x80), False),
        ("ws_reserved_opcode", _ws_frame(rng.choice([3, 4, 7, 0xB, 0xF]), b"x", rng), True),
        ("ws_rsv_bits", _ws_frame(0x1, ping, rng, first=0x80 | rng.choice([0x40, 0x20, 0x10])
                                  | 0x1), True),
        ("ws_unmasked", _ws_frame(0x1, ping, rng, masked=False), True),
        ("ws_lone_continuation", _ws_frame(0x0, b"abc", rng), True),
        ("ws_long_ping", _ws_frame(0x9, b"x" * 200, rng), True),
        ("ws_fragmented_ping", _ws_frame(0x9, b"x", rng, first=0x09), True),
        ("ws_interleaved_messages", _ws_frame(0x1, b'{"ty', rng, first=0x01)
         + _ws_frame(0x2, b"ab", rng), True),
    ]
    return rng.choice(choices)


class WsClient:
    """A raw WebSocket client (wsproto for the handshake and reading)."""

    def __init__(self, stream: trio.SocketStream, ws: Any) -> None:
        self.stream, self.ws = stream, ws
        self.lock = trio.StrictFIFOLock()
        self.closed = trio.Event()
        self.close_code: int | None = None
        self.aborted = False  # this client dropped the connection itself
        self.phase = "start"  # what the client was doing: start, sending, flush, close
        self.last_sent: list[str] = []  # labels of the latest frames sent
        self.saw_end = self.saw_fatal = False
        self.sent_bad_frame = False  # invalid UTF-8 text, or a frame breaking RFC 6455
        self.reply_close = True  # answer the server's Close frame at once
        self.must_error = 0  # frames sent that must each get an error event
        self.maybe_flushed = False  # a fuzzed text frame may have ended the session
        self.errors = 0  # error events received
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, host: str, port: int, stats: Stats | None) -> WsClient | None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, RejectConnection, Request

        stream = await trio.open_tcp_stream(host, port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=f"{host}:{port}", target="/ws/stream")))
        with trio.fail_after(20):
            while True:
                data = await stream.receive_some(RECV_BYTES)
                if not data:
                    await stream.aclose()
                    if stats is not None:
                        stats.ws_handshake["closed"] += 1
                    return None
                ws.receive_data(data)
                for ev in ws.events():
                    if isinstance(ev, AcceptConnection):
                        if stats is not None:
                            stats.ws_handshake["101"] += 1
                        return cls(stream, ws)
                    if isinstance(ev, RejectConnection):
                        if stats is not None:
                            stats.ws_handshake[str(ev.status_code)] += 1
                            if ev.status_code >= 500 and ev.status_code != 503:
                                stats.crash(f"WebSocket handshake answered {ev.status_code}")
                        await stream.aclose()
                        return None

    async def send_raw(self, data: bytes) -> bool:
        if self.closed.is_set():
            return False
        try:
            async with self.lock:
                await self.stream.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed.set()
            return False

    async def send_text(self, text: str) -> bool:
        # A lone surrogate goes out as its JSON escape, so the frame stays valid UTF-8.
        return await self.send_raw(_ws_frame(0x1, text.encode("utf-8", "backslashreplace"),
                                             _MASKS))

    async def reader(self, stats: Stats | None) -> None:
        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

        parts: list[str] = []
        try:
            while True:
                try:
                    data = await self.stream.receive_some(RECV_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    if self.close_code is None and not self.aborted and stats is not None:
                        # After "end" (or a fatal error) the session has said everything;
                        # a missing Close frame then is most likely lost to the reset a
                        # server's close sends while our frames are still arriving.
                        # Without either, the client never learnt why: a silent drop.
                        said = self.saw_end or self.saw_fatal
                        key = f"no_close_frame@{self.phase}/{'after_end' if said else 'silent'}"
                        if not said and self.sent_bad_frame:
                            key += "_after_bad_frame"
                        stats.ws_closes[key] += 1
                        stats.sample(key, self.context())
                    return
                try:
                    self.ws.receive_data(data)
                    evs = list(self.ws.events())
                except Exception as exc:  # the server sent what a WebSocket client can't read
                    if stats is not None:
                        stats.undecodable.append(f"ws: {exc!r}"[:300])
                    return
                for ev in evs:
                    if isinstance(ev, TextMessage):
                        parts.append(ev.data)
                        if ev.message_finished:
                            self._event("".join(parts), stats)
                            parts.clear()
                    elif isinstance(ev, Ping):
                        await self.send_raw(self.ws.send(ev.response()))
                    elif isinstance(ev, CloseConnection):
                        self.close_code = ev.code
                        if stats is not None:
                            stats.ws_closes[f"{ev.code}@{self.phase}"] += 1
                            stats.sample(f"{ev.code}@{self.phase}", self.context())
                        if self.reply_close:
                            with contextlib.suppress(Exception):
                                await self.send_raw(self.ws.send(ev.response()))
                        return
                    elif isinstance(ev, BytesMessage) and stats is not None:
                        stats.undecodable.append("ws: a binary message downstream")
        finally:
            self.closed.set()

    def _event(self, text: str, stats: Stats | None) -> None:
        try:
            ev = json.loads(text)
            kind = ev["type"]
        except (ValueError, KeyError, TypeError) as exc:
            if stats is not None:
                stats.undecodable.append(f"ws event {text[:100]!r}: {exc!r}"[:300])
            return
        if kind == "record_url" and isinstance(ev.get("url"), str) and stats is not None:
            urls = stats.record_urls
            urls.append(ev["url"])
            del urls[:-50]
        self.saw_end = self.saw_end or kind == "end"
        self.errors += kind == "error"
        self.saw_fatal = self.saw_fatal or (kind == "error" and ev.get("fatal") is True)
        self.events.append(ev if kind != "error" or len(self.events) < 50 else {"type": kind})
        if len(self.events) > 200:
            del self.events[:100]
        if stats is None:
            return
        stats.ws_events[str(kind)] += 1
        if kind == "error":
            code = str(ev.get("code"))
            stats.ws_errors[code] += 1
            if ev.get("fatal"):
                stats.ws_fatal[code] += 1
            if code == "INTERNAL":
                stats.crash(f"INTERNAL error event: {ev.get('message', '')!r}")

    def context(self) -> str:
        last = [e.get("code") or e.get("type") for e in self.events[-3:]]
        return f"last sent {self.last_sent[-3:]}, last events {last}"

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()


# -- the normal session ----------------------------------------------------------------


async def normal_session(host: str, port: int, audio: np.ndarray, tag: str
                         ) -> dict[str, Any]:
    """Real speech in 20 ms chunks (4x real time), flush, wait for end."""
    rng = random.Random(0)
    out: dict[str, Any] = {"finals": [], "end": False, "errors": []}
    t0 = time.monotonic()
    with trio.move_on_after(90):
        ws = await WsClient.connect(host, port, None)
        if ws is None:
            out["errors"].append("refused")
            return out
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.reader, None)
            token = ""
            if AUTH_SECRET:
                token = hs256_token({"sub": "normal", "exp": time.time() + 600},
                                    AUTH_SECRET[0])
            await ws.send_text(valid_start(f"normal-{tag}-{os.getpid()}", False, "en", token))
            pcm16 = audio.astype("<i2").tobytes()
            for i in range(0, len(pcm16), 640):
                await ws.send_raw(_ws_frame(0x2, pcm16[i:i + 640], rng))
                if i % (640 * 10) == 0:
                    await trio.sleep(0.05)
            await ws.send_text('{"type":"flush"}')
            await ws.closed.wait()
            nursery.cancel_scope.cancel()
        await ws.aclose()
        out["finals"] = [e.get("text") for e in ws.events if e.get("type") == "asr_final"]
        out["end"] = any(e.get("type") == "end" for e in ws.events)
        out["errors"] = [e.get("code") for e in ws.events if e.get("type") == "error"]
        out["close_code"] = ws.close_code
    out["seconds"] = round(time.monotonic() - t0, 2)
    out["ok"] = bool(out["finals"]) and out["end"]
    return out


# -- WebSocket fuzz worker -------------------------------------------------------------


@dataclass
class Budget:
    """Frames left to send, shared by the workers of one kind."""

    left: int
    total: int = 0

    def __post_init__(self) -> None:
        self.total = self.total or self.left

    @property
    def done(self) -> float:
        """The part of the budget spent, 0..1."""
        return 1.0 - self.left / self.total if self.total else 1.0

    def take(self, n: int) -> int:
        n = min(n, self.left)
        self.left -= n
        return n


async def ws_worker(index: int, host: str, port: int, budget: Budget, stats: Stats,
                    rng: random.Random, rate_per_s: float) -> None:
    """Sessions one after the other; a finished session's tail (flush, then waiting for
    ``end`` and the close) overlaps the next one's sending, up to 4 at a time."""
    limit = trio.CapacityLimiter(4)
    session = 0
    async with trio.open_nursery() as nursery:
        while budget.left > 0:
            session += 1
            t_limit = trio.current_time()
            await limit.acquire_on_behalf_of(session)
            stats.timing["ws_wait_tail_slot_s"] += trio.current_time() - t_limit
            t_connect = trio.current_time()
            try:
                ws = await WsClient.connect(host, port, stats)
                stats.timing["ws_connect_s"] += trio.current_time() - t_connect
            except (OSError, trio.TooSlowError) as exc:
                stats.ws_session_ends[f"connect_failed:{type(exc).__name__}"] += 1
                ws = None
            if ws is None:
                limit.release_on_behalf_of(session)
                await trio.sleep(0.2)
                continue
            sending = trio.Event()
            nursery.start_soon(_ws_connection, ws, index, session, budget, stats,
                               random.Random(rng.random()), rate_per_s, sending, limit)
            t_session = trio.current_time()
            await sending.wait()
            stats.timing["ws_session_sending_s"] += trio.current_time() - t_session


async def _ws_connection(ws: WsClient, index: int, session: int, budget: Budget,
                         stats: Stats, rng: random.Random, rate_per_s: float,
                         sending: trio.Event, limit: trio.CapacityLimiter) -> None:
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.reader, stats)
            await _ws_session(ws, index, session, budget, stats, rng, rate_per_s, sending)
            nursery.cancel_scope.deadline = trio.current_time() + 15
            await ws.closed.wait()
            nursery.cancel_scope.cancel()
        await ws.aclose()
    finally:
        sending.set()
        limit.release_on_behalf_of(session)


async def _ws_session(ws: WsClient, index: int, session: int, budget: Budget, stats: Stats,
                      rng: random.Random, rate_per_s: float, sending: trio.Event) -> None:
    seq_header = rng.random() < 0.4
    seq = SeqState() if seq_header else None
    # Before start: a few frames that must be refused without ending the connection.
    pre = budget.take(rng.choice([0, 0, 0, 1, 3]))
    for _ in range(pre):
        if rng.random() < 0.5:
            label, data = binary_frame(rng, None)
            ok = await ws.send_raw(_ws_frame(0x2, data, rng))
            label = "pre_" + label
        else:
            label = "pre_start_mutated"
            ok = await ws.send_text(mutated_start(rng))
        stats.frames[label] += 1
        if not ok:
            stats.ws_session_ends["server_closed"] += 1
            return
    if budget.take(1) == 0:
        return
    # A few starts are valid JSON whose hint strings hold a lone surrogate ("\ud800"),
    # which must be refused at the start or survive the trip to the ASR service.
    hints: dict[str, Any] = {}
    if rng.random() < 0.03:
        hints = rng.choice([{"hotwords": ["\ud800"]}, {"domain": "a\udfff"}])
    token = ""
    if AUTH_SECRET:
        token_label, token = session_token(rng, f"tenant-{index % 3}")
        stats.ws_session_ends[f"start_with_{token_label}"] += 1
    await ws.send_text(valid_start(f"fz{index}-{session}-{rng.randrange(1 << 30)}",
                                   seq_header, rng.choice(["auto", "en", "en-US", "de"]),
                                   token, **hints))
    stats.frames["start_surrogate_hint" if hints else "start_valid"] += 1
    ws.phase = "sending"
    length = rng.choice([50, 200, 800, 2000])
    t0 = trio.current_time()
    sent = 0
    while sent < length and not ws.closed.is_set():
        n = budget.take(min(20, length - sent))
        if n == 0:
            break
        batch = []
        for _ in range(n):
            r = rng.random()
            # Frames that break RFC 6455 end the connection: rare enough that most
            # sessions live on to their flush.
            if r < 0.002:
                label, raw, breaks = ws_level_frame(rng)
                ws.sent_bad_frame = ws.sent_bad_frame or breaks
                batch.append(raw)
            elif r < 0.5:
                label, payload = text_frame(rng)
                if isinstance(payload, bytes):
                    ws.sent_bad_frame = True
                    batch.append(_ws_frame(0x1, payload, rng))
                else:
                    if '"flush"' in payload and _is_flush(payload):
                        ws.maybe_flushed = True  # a mutation that is still a flush
                    # A lone surrogate goes out as its JSON escape (valid UTF-8 text).
                    batch.append(_ws_frame(0x1, payload.encode("utf-8", "backslashreplace"),
                                           rng))
            else:
                label, data = binary_frame(rng, seq)
                batch.append(_ws_frame(0x2, data, rng))
            stats.frames[label] += 1
            ws.last_sent.append(label)
            ws.must_error += label in MUST_ERROR
        del ws.last_sent[:-5]
        sent += n
        t_send = trio.current_time()
        if not await ws.send_raw(b"".join(batch)):
            break
        stats.timing["ws_send_s"] += trio.current_time() - t_send
        # Absolute pacing below the gateway's MAX_MESSAGES_PER_S for one session.
        await trio.sleep_until(t0 + sent / rate_per_s)
    sending.set()
    if ws.closed.is_set():
        stats.ws_session_ends["server_closed"] += 1
        return
    end = rng.random()
    if end < 0.7:
        ws.phase = "flush"
        await ws.send_text('{"type":"flush"}')
        stats.ws_session_ends["flush"] += 1
        with trio.move_on_after(ANSWER_TIMEOUT_S[0]) as scope:
            await ws.closed.wait()
        if scope.cancelled_caught:
            stats.hang(f"no end/close within {ANSWER_TIMEOUT_S[0]:g} s of flush")
        elif ws.saw_end and not ws.saw_fatal and ws.maybe_flushed:
            # Not checked: the frames after that flush went unread. Counted to show it.
            stats.coded["sessions_ended_by_a_fuzzed_flush"] += 1
            stats.coded["of_which_with_fewer_errors"] += ws.errors < ws.must_error
        elif ws.saw_end and not ws.saw_fatal:
            # Everything before the flush was read: each malformed frame owes an error.
            stats.coded["sessions_checked"] += 1
            stats.coded["malformed_frames"] += ws.must_error
            stats.coded["error_events"] += ws.errors
            if ws.errors < ws.must_error:
                stats.coded["sessions_short"] += 1
                stats.sample("fewer errors than malformed frames",
                             f"{ws.must_error} malformed, {ws.errors} errors; {ws.context()}")
    elif end < 0.85:
        ws.phase = "close"
        await ws.send_raw(_ws_frame(0x8, struct.pack("!H", 1000), rng))
        stats.ws_session_ends["client_close"] += 1
        with trio.move_on_after(15):
            await ws.closed.wait()
    else:
        stats.ws_session_ends["client_abort"] += 1
        ws.aborted = True
        await ws.aclose()
        ws.closed.set()


# -- link (HTTP/2) fuzz worker ---------------------------------------------------------


class H2Client:
    """A minimal HTTP/2 client over a trio stream: one request at a time, flow control
    honoured both ways."""

    def __init__(self, stream: trio.SocketStream) -> None:
        import h2.config
        import h2.connection

        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.window = trio.Event()
        self.dead = False
        self.streams: dict[int, dict[str, Any]] = {}
        self.send_lock = trio.StrictFIFOLock()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            async with self.send_lock:
                await self.stream.send_all(data)

    async def reader(self) -> None:
        import h2.events
        import h2.exceptions

        try:
            while True:
                data = await self.stream.receive_some(RECV_BYTES)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self.streams.setdefault(0, {})["error"] = repr(exc)
                    break
                for ev in events:
                    st = self.streams.get(getattr(ev, "stream_id", 0) or 0)
                    if isinstance(ev, h2.events.ResponseReceived) and st is not None:
                        st["status"] = int(dict(ev.headers)[b":status"])
                        st["got_headers"].set()
                    elif isinstance(ev, h2.events.DataReceived) and st is not None:
                        st["body"].append(ev.data)
                        st["data"].set()
                        self.conn.acknowledge_received_data(
                            ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded) and st is not None:
                        st["ended"].set()
                        st["data"].set()
                    elif isinstance(ev, h2.events.StreamReset) and st is not None:
                        st["reset"] = ev.error_code
                        st["ended"].set()
                        st["got_headers"].set()
                        st["data"].set()
                    elif isinstance(ev, h2.events.WindowUpdated):
                        self.window.set()
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        self.streams.setdefault(0, {})["goaway"] = ev.error_code
                await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.dead = True
            self.window.set()
            for st in self.streams.values():
                for key in ("ended", "got_headers", "data"):
                    if key in st:
                        st[key].set()

    def open(self, path: str, headers: list[tuple[str, str]]) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = {"body": [], "ended": trio.Event(), "got_headers": trio.Event(),
                             "data": trio.Event(), "status": None, "reset": None}
        self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                     (":authority", "fuzz"), (":path", path), *headers])
        return sid

    async def send(self, sid: int, data: bytes, end: bool = False) -> bool:
        import h2.exceptions

        view = memoryview(data)
        try:
            while view:
                if self.dead or self.streams[sid]["ended"].is_set():
                    return False
                window = min(self.conn.local_flow_control_window(sid),
                             self.conn.max_outbound_frame_size)
                if window <= 0:
                    self.window = trio.Event()
                    await self.flush()
                    with trio.move_on_after(10):
                        await self.window.wait()
                    continue
                self.conn.send_data(sid, view[:window].tobytes())
                view = view[window:]
                await self.flush()
            if end:
                self.conn.end_stream(sid)
            await self.flush()
            return True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError,
                trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def reset(self, sid: int) -> None:
        with contextlib.suppress(Exception):
            self.conn.reset_stream(sid)
            await self.flush()


def _lf(kind: int, payload: bytes) -> bytes:
    return struct.pack("<BI", kind, len(payload)) + payload


def link_start_obj(rng: random.Random, flow_id: str) -> dict[str, Any]:
    return {"version": 2, "flow_id": flow_id, "codec": rng.choice(["opus", "pcm"]),
            "sr": 16000, "channels": 1, "frame_ms": 20, "bitrate": 20000, "vbr": True,
            "lang_hint": rng.choice(["", "en", "en-US", "de"]), "domain": "default",
            "hotwords": [], "traceparent": ""}


def link_mutated_start(rng: random.Random, flow_id: str) -> bytes:
    obj = link_start_obj(rng, flow_id)
    for _ in range(rng.randrange(1, 3)):
        op = rng.random()
        key = rng.choice(sorted(obj))
        if op < 0.7:
            obj[key] = weird(rng)
        elif op < 0.85:
            obj.pop(key, None)
        else:
            obj[rng.choice(["x", "", "type", "🙂"])] = weird(rng)
    return dumps_raw(obj).encode("utf-8", "surrogatepass")


def link_frame(rng: random.Random, state: dict[str, int], opus: list[bytes]) -> tuple[str, bytes]:
    """A non-fatal link frame (the server reports it and the stream goes on)."""
    r = rng.random()
    seq = state["seq"]
    if r < 0.35:
        state["seq"] += 1
        return "link_audio_opus", _lf(2, struct.pack("<II", seq, seq * 20) + rng.choice(opus))
    if r < 0.45:
        state["seq"] += 1
        return "link_audio_garbage", _lf(2, struct.pack("<II", seq, seq * 20)
                                         + rng.randbytes(rng.randrange(0, 200)))
    if r < 0.55:
        s = rng.choice([U32_MAX, 0, seq + rng.randrange(2, 50), rng.randrange(U32_MAX)])
        return "link_audio_wild_seq", _lf(2, struct.pack(
            "<II", s, rng.choice([0, U32_MAX, rng.randrange(U32_MAX)])) + rng.choice(opus))
    if r < 0.65:
        state["seq"] += 1
        return "link_pcm", _lf(5, struct.pack("<II", seq, seq * 20)
                               + pcm(rng, rng.choice([640, 640, 0, 1, 639, 1280])))
    if r < 0.75:
        return "link_audio_short", _lf(rng.choice([2, 5]), rng.randbytes(rng.randrange(0, 8)))
    if r < 0.90:
        return "link_finalize", _lf(3, dumps_raw(rng.choice([
            {}, {"utterance": weird(rng)}, {"utterance": rng.randrange(0, 5)},
            {"x": weird(rng)}])).encode("utf-8", "surrogatepass"))
    return "link_start_again", _lf(1, json.dumps(link_start_obj(rng, "again")).encode())


def link_fatal_frame(rng: random.Random) -> tuple[str, bytes]:
    r = rng.random()
    if r < 0.2:
        return "link_unknown_type", _lf(rng.choice([0, 6, 0x7F, 0x81, 0xFF]), b"x")
    if r < 0.35:
        return "link_oversize_len", struct.pack("<BI", 2, rng.choice([65537, U32_MAX]))
    if r < 0.5:
        return "link_truncated", struct.pack("<BI", 2, 100) + b"x" * 10
    if r < 0.7:
        return "link_finalize_not_json", _lf(3, rng.choice([
            b"{", b"\xff", b"[" * 20000, b"1" * 5000, b"[]", b"null"]))
    return "link_end", _lf(4, b"")


async def link_worker(index: int, host: str, port: int, budget: Budget, stats: Stats,
                      rng: random.Random, opus: list[bytes], rate_per_s: float,
                      pace: Budget | None = None) -> None:
    """HTTP/2 connections to the ASR service, each with up to ``LINK_IN_FLIGHT`` streams
    in flight (one sending, the others waiting for their response to end), so a stream
    the server never ends does not hold the others up."""
    n_stream = 0
    while budget.left > 0:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            stats.link_streams["connect_failed"] += 1
            await trio.sleep(0.5)
            continue
        client = H2Client(stream)
        limit = trio.CapacityLimiter(LINK_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            await client.flush()
            nursery.start_soon(client.reader)
            async with trio.open_nursery() as streams:
                while budget.left > 0 and not client.dead:
                    # Keep step with the WebSocket side, so that the ASR service is
                    # fuzzed while it also serves the gateway's streams.
                    while pace is not None and pace.left and budget.done > pace.done + 0.01:
                        await trio.sleep(0.05)
                    n_stream += 1
                    await limit.acquire_on_behalf_of(n_stream)
                    sending = trio.Event()
                    streams.start_soon(_one_link_request, client, index, n_stream, budget,
                                       stats, random.Random(rng.random()), opus, rate_per_s,
                                       sending, limit)
                    await sending.wait()
            nursery.cancel_scope.cancel()
        if 0 in client.streams and "goaway" in client.streams[0]:
            stats.link_streams[f"goaway:{client.streams[0]['goaway']}"] += 1
        with contextlib.suppress(Exception):
            await stream.aclose()


async def _one_link_request(client: H2Client, index: int, n: int, budget: Budget,
                            stats: Stats, rng: random.Random, opus: list[bytes],
                            rate_per_s: float, sending: trio.Event,
                            limit: trio.CapacityLimiter) -> None:
    try:
        if rng.random() < 0.04:
            await _lid_request(client, budget, stats, rng, sending)
        else:
            await _link_stream(client, index, n, budget, stats, rng, opus, rate_per_s,
                               sending)
    finally:
        sending.set()
        limit.release_on_behalf_of(n)


async def _lid_request(client: H2Client, budget: Budget, stats: Stats,
                       rng: random.Random, sending: trio.Event) -> None:
    if budget.take(1) == 0:
        return
    size = rng.choice([0, 1, 3, 640, 3200, 16001, 16000 * 2 * 11, 32000])
    body = pcm(rng, size)
    sid = client.open("/v1/lid", [("content-type", "application/octet-stream")])
    stats.frames["lid_body"] += 1
    await client.send(sid, body, end=True)
    sending.set()
    st = client.streams[sid]
    with trio.move_on_after(ANSWER_TIMEOUT_S[0]) as scope:
        await st["ended"].wait()
    if scope.cancelled_caught:
        stats.hang(f"/v1/lid with {size} bytes: no answer in {ANSWER_TIMEOUT_S[0]:g} s")
        await client.reset(sid)
    status = st["status"]
    stats.lid_status[str(status) if st["reset"] is None else f"reset:{st['reset']}"] += 1
    if status is not None and status >= 500 and status != 503:
        stats.crash(f"/v1/lid {size} bytes answered {status}: {b''.join(st['body'])[:200]!r}")
    client.streams.pop(sid, None)


async def _link_stream(client: H2Client, index: int, n: int, budget: Budget, stats: Stats,
                       rng: random.Random, opus: list[bytes], rate_per_s: float,
                       sending: trio.Event) -> None:
    from asr import link

    flow_id = f"lfz{index}-{n}"
    frames: list[bytes] = []
    labels: list[str] = []
    if rng.random() < 0.12:
        labels.append("link_start_mutated")
        frames.append(_lf(1, link_mutated_start(rng, flow_id)))
    else:
        labels.append("link_start_valid")
        frames.append(_lf(1, json.dumps(link_start_obj(rng, flow_id)).encode()))
    state = {"seq": 0}
    for _ in range(rng.choice([10, 50, 150, 400])):
        label, data = link_frame(rng, state, opus)
        labels.append(label)
        frames.append(data)
    ending = rng.random()
    if ending < 0.55:
        labels.append("link_end")
        frames.append(_lf(4, b""))
    elif ending < 0.85:
        label, data = link_fatal_frame(rng)
        labels.append(label)
        frames.append(data)
    n_take = budget.take(len(frames))
    if n_take == 0:
        return
    frames, labels = frames[:n_take], labels[:n_take]
    sid = client.open("/v1/recognize", [("content-type", LINK_CT)])
    st = client.streams[sid]
    decoder = link.FrameDecoder(accept=link.SERVER_FRAMES)
    t0 = trio.current_time()
    sent = 0
    ok = True
    for i in range(0, len(frames), 25):
        chunk = b"".join(frames[i:i + 25])
        for label in labels[i:i + 25]:
            stats.frames[label] += 1
        sent += len(frames[i:i + 25])
        ok = await client.send(sid, chunk)
        if not ok:
            break
        await trio.sleep_until(t0 + sent / rate_per_s)
    if ok and ending >= 0.85:
        # The client gives up on the stream: there is no response left to wait for, but
        # the server must take it in stride (the next streams and sessions go on).
        await client.reset(sid)
        stats.link_streams["client_reset"] += 1
        sending.set()
        client.streams.pop(sid, None)
        return
    if ok:
        await client.send(sid, b"", end=True)
    sending.set()
    with trio.move_on_after(ANSWER_TIMEOUT_S[0]) as scope:
        await st["ended"].wait()
    if scope.cancelled_caught:
        stats.link_streams["not_ended"] += 1
        stats.hang(f"/v1/recognize: response not ended {ANSWER_TIMEOUT_S[0]:g} s after the body "
                   f"({labels[-1]}, status {st['status']})")
        await client.reset(sid)
    status = st["status"]
    stats.link_status[str(status)] += 1
    if status is not None and status >= 500 and status != 503:
        stats.crash(f"/v1/recognize answered {status}")
    if st["reset"] is not None:
        stats.link_streams[f"server_reset:{st['reset']}"] += 1
    body = b"".join(st["body"])
    if status == 200 and body:
        try:
            for ev in decoder.feed(body):
                if isinstance(ev, link.AsrEvent):
                    stats.link_events[ev.type] += 1
                    if ev.type == "error":
                        stats.link_errors[ev.code] += 1
                        if ev.code == "INTERNAL":
                            stats.crash(f"link INTERNAL: {ev.message[:200]}")
        except Exception as exc:  # anything the gateway itself could not read
            stats.undecodable.append(f"link response: {exc!r}"[:300])
    stats.link_streams["done"] += 1
    client.streams.pop(sid, None)


# -- HTTP (records, metrics) fuzz worker ----------------------------------------------

RANGES = ["bytes=0-", "bytes=0-0", "bytes=-500", "bytes=5-2", "bytes=abc", "bytes=0-0,5-10",
          "bytes=99999999999999999999-", "bytes= 1-2", "bytes=-0", "bytes=0-" + "9" * 40,
          "items=0-1", "bytes=1-1-1", "bytes=" + "0-1," * 500]
PATHS = ["/records/../../etc/passwd", "/records/%2e%2e/%2e%2e/etc/passwd", "/records/",
         "/records", "//records/x.ogg", "/records/t/acme/x.ogg", "/metrics", "/healthz",
         "/readyz", "/", "/records/x.ogg?exp=1&sig=" + "A" * 43, "/records/\\x.ogg",
         "/records/" + "a" * 8000 + ".ogg", "/records/%00.ogg", "/records/x.ogg?exp=&sig=",
         "/ws/stream", "*"]


def _mutate_url_path(rng: random.Random, target: str) -> tuple[str, str]:
    """(label, target): a signed record URL changed in one place (must be refused)."""
    path, _, query = target.partition("?")
    r = rng.random()
    if r < 0.25:
        i = rng.randrange(len(path))
        ch = rng.choice([c for c in "aZ0._-/" if c != path[i]])
        return "record_path_changed", path[:i] + ch + path[i + 1:] + "?" + query
    if r < 0.5:
        return "record_sig_changed", path + "?" + query[:-1] + rng.choice(
            [c for c in "AB_-" if c != query[-1:]])
    if r < 0.65:
        return "record_exp_changed", path + "?" + query.replace("exp=", "exp=1", 1)
    if r < 0.8:
        return "record_query_dup", target + "&" + query
    return "record_unsigned", path


async def http_request(host: str, port: int, raw: bytes) -> int | None:
    """Send one raw HTTP/1.1 request; the status code, or None if the server answered
    nothing (closed the connection)."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(raw)
        buf = b""
        with trio.move_on_after(ANSWER_TIMEOUT_S[0]):
            while b"\r\n" not in buf and len(buf) < 4096:
                data = await stream.receive_some(4096)
                if not data:
                    break
                buf += data
        line = buf.split(b"\r\n", 1)[0].split()
        return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return None
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()


async def http_worker(host: str, port: int, budget: Budget, stats: Stats,
                      rng: random.Random, pace: Budget) -> None:
    """Requests to the gateway's HTTP port: signed record URLs (with odd Range headers),
    the same URLs changed in one place, hostile paths and methods, malformed requests."""
    while budget.take(1):
        while pace.left and budget.done > pace.done + 0.01:
            await trio.sleep(0.05)
        method = rng.choice(["GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
                             "FOO"])
        headers = [f"Host: {host}:{port}"]
        r = rng.random()
        urls = stats.record_urls
        if r < 0.35 and urls:
            url = rng.choice(urls)
            target = "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
            label = "record_signed"
            method = rng.choice(["GET", "HEAD"])
            if rng.random() < 0.6:
                headers.append(f"Range: {rng.choice(RANGES)}")
                label = "record_signed_range"
        elif r < 0.6 and urls:
            url = rng.choice(urls)
            target = "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
            label, target = _mutate_url_path(rng, target)
            method = rng.choice(["GET", "HEAD"])
        elif r < 0.9:
            label, target = "http_path", rng.choice(PATHS)
        else:
            which, raw = rng.choice(list(enumerate([
                b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                b"GET /records/x.ogg HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n",
                b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
                b"POST /records/x.ogg HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                b"\r\n\r\nzz\r\n",
                b"\x16\x03\x01\x00\x05hello"])))  # a TLS hello to a plain port
            stats.frames["http_malformed"] += 1
            status = await http_request(host, port, raw)
            stats.http_status[f"http_malformed{which}:{status}"] += 1
            if status is not None and status >= 500 and status != 503:
                stats.crash(f"malformed HTTP request answered {status}: {raw[:60]!r}")
            continue
        request = (f"{method} {target} HTTP/1.1\r\n" + "\r\n".join(headers)
                   + "\r\nConnection: close\r\n\r\n")
        stats.frames[label] += 1
        status = await http_request(host, port, request.encode("utf-8", "surrogateescape"))
        stats.http_status[f"{label}:{status}"] += 1
        if status is not None and status >= 500 and status != 503:
            stats.crash(f"{method} {target[:80]} answered {status}")
        if (label.startswith("record_") and status in (200, 206, 307)
                and label not in ("record_signed", "record_signed_range")):
            stats.crash(f"a changed record URL was served ({status}): {target[:120]}")
        if label == "record_signed" and status not in (200, 307):
            stats.sample("signed record URL not served", f"{method} {target[:120]} -> {status}")


# -- the run ---------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the ASR service's inference workers are children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            continue
    return out


def rss_mb(pid: int) -> float:
    """RSS of a service with its child processes, MB."""
    total = 0.0
    for p in _tree(pid):
        try:
            total += proc_sample(p).rss_mb
        except OSError:
            if p == pid:
                return float("nan")
    return total


def cpu_s(pid: int) -> float:
    """CPU seconds of a service and its live child processes."""
    total = 0.0
    for p in _tree(pid):
        try:
            total += proc_sample(p).cpu_s
        except OSError:
            if p == pid:
                return float("nan")
    return round(total, 2)


async def monitor(stats: Stats, gw: Service, asr: Service, t0: float) -> None:
    while True:
        stats.timeline.append((round(time.monotonic() - t0, 2), stats.total,
                               rss_mb(gw.proc.pid), rss_mb(asr.proc.pid),
                               cpu_s(gw.proc.pid), cpu_s(asr.proc.pid),
                               round(time.process_time(), 2)))
        for svc in (gw, asr):
            if svc.proc.poll() is not None:
                stats.crash(f"{svc.name} exited with {svc.proc.returncode}")
                return
        await trio.sleep(1.0)


def opus_packets() -> list[bytes]:
    from native import OpusEncoder

    enc = OpusEncoder(16000, 1, "voip", bitrate=20000, vbr=True)
    rng = np.random.default_rng(1)
    out = []
    for i in range(50):
        frame = (rng.normal(0, 3000 if i % 2 else 30, 320)).astype(np.int16)
        out.append(enc.encode(frame))
    return out


@dataclass
class Args:
    frames: int
    ws_connections: int
    link_connections: int
    link_share: float
    http_share: float
    ws_rate: float
    link_rate: float
    warmup_frames: int
    idle_s: float
    seed: int
    name: str


async def run(args: Args, gw: Service, asr: Service, speech: np.ndarray) -> dict[str, Any]:
    host, ws_port = "127.0.0.1", int(gw.line.rsplit(":", 1)[1].split("/")[0])
    asr_port = int(asr.line.rsplit(":", 1)[1])
    http_url = gw.url("http://")
    http_port = int(http_url.rsplit(":", 1)[1].split("/")[0]) if http_url else 0
    stats = Stats()
    t0 = time.monotonic()
    rss: dict[str, dict[str, float]] = {}

    def mark(name: str) -> None:
        rss[name] = {"gateway_mb": rss_mb(gw.proc.pid), "asr_mb": rss_mb(asr.proc.pid),
                     "t_s": round(time.monotonic() - t0, 1), "frames": stats.total}

    mark("start")
    before = await normal_session(host, ws_port, speech, "before")
    opus = opus_packets()
    rng = random.Random(args.seed)
    link_total = int(args.frames * args.link_share)
    http_total = int(args.frames * args.http_share) if http_port else 0
    ws_budget = Budget(args.frames - link_total - http_total)
    link_budget = Budget(link_total)
    http_budget = Budget(http_total)
    fuzz_t: dict[str, float] = {}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor, stats, gw, asr, t0)

        async def fuzz() -> None:
            fuzz_t["start"] = time.monotonic()
            async with trio.open_nursery() as workers:
                for i in range(args.ws_connections):
                    workers.start_soon(ws_worker, i, host, ws_port, ws_budget, stats,
                                       random.Random(rng.random()), args.ws_rate)
                for i in range(args.link_connections):
                    workers.start_soon(link_worker, i, host, asr_port, link_budget, stats,
                                       random.Random(rng.random()), opus, args.link_rate,
                                       ws_budget if args.link_share < 1 else None)
                if http_port:
                    workers.start_soon(http_worker, host, http_port, http_budget, stats,
                                       random.Random(rng.random()), ws_budget)
                while stats.total < args.warmup_frames and (ws_budget.left or
                                                            link_budget.left):
                    await trio.sleep(0.2)
                mark("warm")
                last = time.monotonic()
                while ws_budget.left or link_budget.left or http_budget.left:
                    await trio.sleep(0.1)
                    if time.monotonic() - last > 30:
                        last = time.monotonic()
                        print(f"  {stats.total} frames, {time.monotonic() - t0:.0f} s, "
                              f"gateway {rss_mb(gw.proc.pid):.0f} MB, "
                              f"asr {rss_mb(asr.proc.pid):.0f} MB", flush=True)
                fuzz_t["sent"] = time.monotonic()
            fuzz_t["end"] = time.monotonic()
            mark("end")

        await fuzz()
        await trio.sleep(args.idle_s)
        mark("idle")
        after = await normal_session(host, ws_port, speech, "after")
        mark("after")
        nursery.cancel_scope.cancel()

    fuzz_s = fuzz_t["end"] - fuzz_t["start"]
    send_s = fuzz_t["sent"] - fuzz_t["start"]
    base = rss["warm"]
    ratios = {
        "frames_per_s": round(stats.total / send_s, 1),
        "frames_per_s_incl_drain": round(stats.total / fuzz_s, 1),
        "ws_errors_per_1000_ws_frames": round(1000 * sum(stats.ws_errors.values()) / max(
            1, stats.family("ws")), 1),
        "link_errors_per_1000_link_frames": round(1000 * sum(stats.link_errors.values()) / max(
            1, stats.family("link")), 1),
        "gateway_rss_end_over_warm": round(rss["end"]["gateway_mb"] / base["gateway_mb"], 3),
        "gateway_rss_idle_over_warm": round(rss["idle"]["gateway_mb"] / base["gateway_mb"], 3),
        "asr_rss_end_over_warm": round(rss["end"]["asr_mb"] / base["asr_mb"], 3),
        "asr_rss_idle_over_warm": round(rss["idle"]["asr_mb"] / base["asr_mb"], 3),
    }
    return {"stats": stats, "rss": rss, "ratios": ratios, "fuzz_s": round(fuzz_s, 1),
            "send_s": round(send_s, 1),
            "normal_before": before, "normal_after": after}


def plot(result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result["stats"].timeline
    if len(tl) < 2:
        return
    t = np.array([p[0] for p in tl])
    frames = np.array([p[1] for p in tl], dtype=float)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ax1.plot(t, [p[2] for p in tl], label="gateway RSS")
    ax1.plot(t, [p[3] for p in tl], label="ASR service RSS")
    for name, mark in result["rss"].items():
        ax1.axvline(mark["t_s"], color="grey", lw=0.6, ls=":")
        ax1.text(mark["t_s"], mark["gateway_mb"], name,
                 fontsize=7, rotation=90, va="bottom")
    ax1.set_ylabel("RSS, MB")
    ax1.legend(loc="lower right")
    ax1.set_title(title, fontsize=9)
    rate = np.diff(frames) / np.maximum(np.diff(t), 1e-6)
    ax2.plot(t[1:], rate, color="tab:green")
    ax2.set_ylabel("frames/s sent")
    ax2.set_xlabel("time since start, s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--asr-standin"]:
        _asr_standin_main()
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=1_000_000, help="frames to send in all")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 10,000 frames, 3 s idle, 8 s answer timeout")
    p.add_argument("--ws-connections", type=int, default=6)
    p.add_argument("--link-connections", type=int, default=2)
    p.add_argument("--link-share", type=float, default=0.3,
                   help="part of the frames sent on the link (the rest on WebSockets)")
    p.add_argument("--http-share", type=float, default=0.02,
                   help="part of the frames sent as HTTP requests to the gateway's HTTP port")
    p.add_argument("--ws-rate", type=float, default=600.0,
                   help="messages/s per WebSocket session (the gateway's "
                        "MAX_MESSAGES_PER_S is 1000)")
    p.add_argument("--link-rate", type=float, default=3000.0, help="frames/s per link stream")
    p.add_argument("--idle-s", type=float, default=20.0,
                   help="quiet time before the RSS reading that must be back at baseline")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--real-asr", action="store_true",
                   help="`voxgate asr` with the Whisper models instead of the stand-in engine "
                        "(slow: every utterance is really recognized)")
    p.add_argument("--auth", action="store_true",
                   help="the gateway requires JWTs (AUTH_JWT_SECRET): sessions carry signed "
                        "tokens, 6%% of them expired, forged, alg none, tenant-less or garbage")
    p.add_argument("--answer-timeout-s", type=float, default=15.0,
                   help="a flush, link stream or /v1/lid left unanswered this long is a hang")
    p.add_argument("--name", default=None, help="output stem (default fuzz or fuzz_quick)")
    p.add_argument("--max-rss-ratio", type=float, default=1.25,
                   help="fail if a service's RSS after the idle period exceeds this times "
                        "its RSS after warm-up")
    a = p.parse_args(argv)
    if a.quick:
        a.frames, a.idle_s, a.answer_timeout_s = 10_000, 3.0, 8.0
    ANSWER_TIMEOUT_S[0] = a.answer_timeout_s
    if a.frames < 100 or not 0 <= a.link_share + a.http_share < 1 or min(
            a.link_share, a.http_share) < 0:
        p.error("--frames must be at least 100, and --link-share plus --http-share "
                "within 0..1")
    args = Args(frames=a.frames, ws_connections=a.ws_connections,
                link_connections=a.link_connections, link_share=a.link_share,
                http_share=a.http_share,
                ws_rate=a.ws_rate, link_rate=a.link_rate,
                warmup_frames=max(200, min(20_000, a.frames // 50)), idle_s=a.idle_s,
                seed=a.seed, name=a.name or (("fuzz_quick" if a.quick else "fuzz")
                                             + ("_auth" if a.auth else "")))

    from tests import speech

    clip = speech.goforward()[: 16000 * 4]
    archive = tempfile.TemporaryDirectory(prefix="voxgate-fuzz-archive-")
    gw_env = {"PUBLIC_BASE": "", "ENABLE_DENOISE": "false", "ARCHIVE_DIR": archive.name}
    if a.auth:
        AUTH_SECRET.append(os.urandom(32).hex().encode())
        gw_env["AUTH_JWT_SECRET"] = AUTH_SECRET[0].decode()
    if a.real_asr:
        asr = spawn("asr", [VOXGATE, "asr", "--host", "127.0.0.1", "--port", "0"],
                    "voxgate asr: ready on", {}, timeout_s=600)
        asr.line = "asr " + asr.line.rsplit(" ", 1)[1]
    else:
        asr = spawn("asr", [sys.executable, str(Path(__file__).resolve()), "--asr-standin"],
                    "asr http://", {})
    gw: Service | None = None
    codes: dict[str, int | None] = {}
    try:
        gw = spawn("gateway", [VOXGATE, "gateway", "--host", "127.0.0.1", "--port", "0",
                               "--http-port", "0", "--log-level", "warning"], "ws://",
                   {"ASR_URLS": asr.line.split(" ", 1)[1], **gw_env})
        print(f"fuzzing {gw.line} and {asr.line} with {args.frames} frames", flush=True)
        result = trio.run(run, args, gw, asr, clip)
    finally:
        if gw is not None:
            codes["gateway"] = stop(gw)
        codes["asr"] = stop(asr)
        archive.cleanup()
    stats: Stats = result["stats"]
    log_problems = {svc.name: svc.problems() for svc in (asr, gw) if svc is not None}
    drops = sum(v for k, v in stats.ws_closes.items()
                if k.startswith("no_close_frame") and "/silent" in k)
    checks = {  # name -> the problem, or "" when the check passed
        "no_crash": f"{len(stats.crashes)} crash signs" if stats.crashes else "",
        "no_hang": (f"{len(stats.hangs)} requests never finished by the server"
                    if stats.hangs else ""),
        "decodable": (f"{len(stats.undecodable)} undecodable server outputs"
                      if stats.undecodable else ""),
        "clean_logs": "; ".join(f"{len(lines)} traceback/error lines in the {name} log"
                                for name, lines in log_problems.items() if lines),
        "normal_sessions": "; ".join(f"{tag} produced no final or no end: {result[tag]}"
                                     for tag in ("normal_before", "normal_after")
                                     if not result[tag]["ok"]),
        "rss_back": "; ".join(
            f"{svc} RSS after idle is {result['ratios'][f'{svc}_rss_idle_over_warm']}x warm-up"
            for svc in ("gateway", "asr")
            if result["ratios"][f"{svc}_rss_idle_over_warm"] > a.max_rss_ratio),
        "all_sent": (f"only {stats.total} of {args.frames} frames sent"
                     if stats.total < args.frames else ""),
        "coded_errors": (f"{stats.coded['sessions_short']} of "
                         f"{stats.coded['sessions_checked']} flushed sessions got fewer error "
                         "events than malformed frames" if stats.coded["sessions_short"]
                         else ""),
        # RFC 6455 7.1.7: a failed connection gets a Close frame (1007 for bad UTF-8, ...)
        # first; a dropped socket also loses the session's record_url, metrics and end.
        "close_frames": (f"{drops} WebSocket connections dropped without a close frame, "
                         "an end or a fatal error" if drops else ""),
    }
    failures = [problem for problem in checks.values() if problem]

    data = {
        "meta": {"cpu": cpu_model(), "cores": os.cpu_count(),
                 "python": platform.python_version(), "argv": sys.argv[1:],
                 "config": args.__dict__,
                 "asr": "voxgate asr (Whisper)" if a.real_asr
                 else "stand-in engine (tests/standin.py)",
                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "frames_sent": stats.total,
        "fuzz_s": result["fuzz_s"],
        "send_s": result["send_s"],
        "ratios": result["ratios"],
        "rss": result["rss"],
        "frames_by_family": {f: stats.family(f) for f in ("ws", "link", "http")},
        "frames_by_kind": dict(stats.frames.most_common()),
        "ws": {"events": dict(stats.ws_events), "errors_by_code": dict(stats.ws_errors),
               "fatal_errors_by_code": dict(stats.ws_fatal),
               "server_closes_by_code": dict(stats.ws_closes),
               "session_ends": dict(stats.ws_session_ends),
               "handshakes": dict(stats.ws_handshake)},
        "http": {"statuses_by_kind": dict(stats.http_status)},
        "link": {"errors_by_code": dict(stats.link_errors), "events": dict(stats.link_events),
                 "statuses": dict(stats.link_status), "streams": dict(stats.link_streams),
                 "lid_statuses": dict(stats.lid_status)},
        "crashes": stats.crashes[:MAX_ERROR_SAMPLES],
        "crash_count": len(stats.crashes),
        "hangs": stats.hangs[:MAX_ERROR_SAMPLES],
        "hang_count": len(stats.hangs),
        "undecodable": stats.undecodable[:MAX_ERROR_SAMPLES],
        "log_problems": {k: v[:200] for k, v in log_problems.items()},
        "log_problem_counts": {k: len(v) for k, v in log_problems.items()},
        "exit_codes": codes,
        "samples": stats.samples,
        "timing_s": {k: round(v, 2) for k, v in stats.timing.items()},
        "coded_errors": dict(stats.coded),
        "normal_before": result["normal_before"],
        "normal_after": result["normal_after"],
        "checks": checks,
        "failures": failures,
        "timeline": stats.timeline,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    plot(result, RESULTS / f"{args.name}.png",
         f"fuzz: {stats.total} frames in {result['fuzz_s']} s "
         f"({result['ratios']['frames_per_s']}/s), {os.cpu_count()} cores")

    r = result["ratios"]
    print(f"frames sent: {stats.total} in {result['send_s']} s = {r['frames_per_s']} frames/s "
          f"(all answered or closed after {result['fuzz_s']} s)")
    print(f"  by family: { {f: stats.family(f) for f in ('ws', 'link', 'http')} }; "
          f"by kind: {dict(stats.frames.most_common(12))}")
    print(f"WebSocket errors by code: {dict(stats.ws_errors.most_common())}")
    print(f"  fatal: {dict(stats.ws_fatal)}; server closes: {dict(stats.ws_closes)}")
    print(f"  errors per 1000 WebSocket frames: {r['ws_errors_per_1000_ws_frames']}; "
          f"flushed sessions: {dict(stats.coded)}")
    print(f"link errors by code: {dict(stats.link_errors.most_common())}")
    print(f"  statuses: {dict(stats.link_status)}; /v1/lid: {dict(stats.lid_status)}; "
          f"streams: {dict(stats.link_streams)}")
    print(f"  errors per 1000 link frames: {r['link_errors_per_1000_link_frames']}")
    print(f"HTTP statuses by request kind: {dict(sorted(stats.http_status.items()))}")
    for name, mark in result["rss"].items():
        print(f"RSS {name:>6}: gateway {mark['gateway_mb']:.1f} MB, asr {mark['asr_mb']:.1f} MB")
    print(f"RSS end/warm: gateway {r['gateway_rss_end_over_warm']}, "
          f"asr {r['asr_rss_end_over_warm']}; idle/warm: gateway "
          f"{r['gateway_rss_idle_over_warm']}, asr {r['asr_rss_idle_over_warm']}")
    for tag in ("normal_before", "normal_after"):
        nb = result[tag]
        print(f"{tag}: finals={len(nb['finals'])} end={nb['end']} "
              f"errors={nb['errors']} ({nb.get('seconds')} s)")
    print(f"crash signs: {len(stats.crashes)}, hangs: {len(stats.hangs)}, "
          f"undecodable: {len(stats.undecodable)}, "
          f"log problems: { {k: len(v) for k, v in log_problems.items()} }, "
          f"exit codes: {codes}")
    for line in sorted(set(stats.crashes + stats.hangs + stats.undecodable))[:MAX_ERROR_SAMPLES]:
        print(f"  ! {line}")
    for name, lines in log_problems.items():
        for line in lines[:4]:
            print(f"  ! {name}: {line[:300]}")
    print(f"wrote {out} and .png")
    if failures:
        print(f"service logs: {asr.log} {gw.log if gw is not None else ''}")
        print("FAILED: " + "; ".join(failures))
        return 1
    for svc in (asr, gw):
        if svc is not None:
            svc.log.unlink(missing_ok=True)
    print("OK: no crash, every service alive, RSS back to baseline, normal sessions fine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
