"""Where the gateway's CPU goes at N real-time sessions: py-spy samples, by category.

    .venv/bin/python bench/profile_gateway.py --sessions 100 --seconds 40
    .venv/bin/python bench/profile_gateway.py --aggregate bench/out/profile_gw_100.raw

Starts ``voxgate gateway`` record-only (its ASR unreachable: VAD, archive, framing), pinned
to CPU 0, drives it with ``bench/load.py --url`` (pinned to CPU 1), and once every session
streams records the gateway with ``py-spy record --format raw --native`` (idle stacks
left out, so every sample is CPU spent). Each sample is charged to one category: the
innermost frame that belongs to one (numpy under ``stages/vad.py`` is VAD; a
``trio`` memory-channel send called from ``gateway/session.py`` is a channel hop). It
also reports, per category, the share of samples with that category anywhere on the
stack (inclusive), the ``gateway/session.py`` functions by self and inclusive share,
and the top leaf frames.

Writes ``bench/out/profile_gw_<N>.json``, ``.png`` and the raw py-spy file, plus
the load run's ``bench/out/profile_gw_<N>_load.json``. py-spy pauses the process
for each sample, so the load figures of a profiled run are not the gateway's cost:
measure that with ``bench/load.py`` alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OUT  # noqa: E402

PY_SPY = str(Path(sys.executable).with_name("py-spy"))

# (category, pattern on one frame "function (file:line)"), first match wins per frame.
# Order matters only within one frame; across frames the innermost matching frame wins.
RULES: list[tuple[str, str]] = [
    ("gc", r"gc_collect_main|gc_collect_with_callback|collect_generations"),
    ("vad", r"stages/vad\.py|gateway/vadservice\.py|onnxruntime|libonnx|Ort|MlasSgemm"
            r"|MlasConv|MlasGemm|MlasCompute"),
    ("archive", r"stages/archive\.py|native/opus|native/ogg|libopus|opus_|celt_|silk_"
                r"|_opus\.abi3|_opusenc"),
    ("asr_link", r"gateway/asrlink\.py|gateway/h2client\.py|/h2/|/hpack/"),
    ("metrics", r"gateway/metrics\.py|prometheus_client"),
    ("logging", r"/logging/|gateway/logs\.py"),
    ("json_events", r"/json/|gateway/protocol\.py"),
    ("reframe_seq", r"stages/reframe\.py"),
    ("endpoint_gate", r"stages/endpoint\.py|stages/denoise\.py|stages/lid\.py"),
    ("ws_receive", r"trio_websocket|wsproto"),
    ("trio_channels_sync", r"trio/_channel\.py|trio/_sync\.py|trio/_core/_parking_lot\.py"),
    ("trio_socket_io", r"trio/_highlevel_socket\.py|trio/_socket\.py|trio/_core/_io_epoll"
                       r"|epoll_wait|__libc_recv|__libc_send|recvfrom|sendto|__send|__recv"),
    ("trio_scheduler", r"trio/_core/|trio/_timeouts\.py|outcome/"),
    ("session_core", r"gateway/core\.py"),
    ("session_py", r"gateway/(session|admission|writer|archiver|linkdriver|context)\.py"),
    ("ws_server", r"gateway/server\.py"),
    ("gateway_other", r"gateway/(?!cli\.py|main\.py)"),
    ("stages_other", r"stages/"),
]
_COMPILED = [(name, re.compile(pat)) for name, pat in RULES]
CATEGORIES = [name for name, _ in RULES] + ["other"]
# the trio run loop and its channels are charged to their caller in the "owner" view
_LOOP = {"trio_scheduler", "trio_channels_sync", "trio_socket_io", "gc"}
# A thread parked on a lock or condition (trio's thread cache, onnxruntime's pool) is not
# CPU: with --native py-spy cannot always tell, so such stacks are dropped here.
_IDLE = re.compile(r"PyThread_acquire_lock_timed|pthread_cond_(timed)?wait|sem_(timed)?wait"
                   r"|futex_wait|__futex")
_LINE = re.compile(r"^(.*) (\d+)$")
_SESSION_FN = re.compile(
    r"^(\S+) \(.*gateway/(?:session|admission|writer|archiver|linkdriver|context)\.py"
    r"(?::\d+)?\)$")


def classify(frame: str) -> str | None:
    for name, pat in _COMPILED:
        if pat.search(frame):
            return name
    return None


def aggregate(raw: Path) -> dict[str, Any]:
    """A py-spy ``raw`` (collapsed stacks, root first) file, as shares by category."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    sess_self: Counter[str] = Counter()
    sess_incl: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    owner_c: dict[str, Counter[str]] = {}
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        frames = m.group(1).split(";")
        n = int(m.group(2))
        if any(_IDLE.search(f) for f in frames[-3:]):
            idle += n
            continue
        total += n
        cats = [classify(f) for f in frames]
        leaf_cat = next((c for c in reversed(cats) if c is not None), "other")
        self_c[leaf_cat] += n
        owner = next((c for c in reversed(cats) if c is not None and c not in _LOOP),
                     "trio_run_loop")
        owner_c.setdefault(owner, Counter())[leaf_cat] += n
        for c in set(cats) - {None}:
            incl_c[str(c)] += n
        leaves[frames[-1][:120]] += n
        fns = [fm.group(1) for f in frames if (fm := _SESSION_FN.match(f))]
        for fn in set(fns):
            sess_incl[fn] += n
        # the innermost session.py function, charged with the samples under it that
        # are not another category's (its own Python work)
        if leaf_cat == "session_py" and fns:
            sess_self[fns[-1]] += n

    def share(c: Counter[str]) -> dict[str, float]:
        return {k: round(100.0 * v / total, 2) for k, v in c.most_common() if total}

    return {
        "samples": total,
        "idle_samples_dropped": idle,
        "self_pct": {k: round(100.0 * self_c[k] / total, 2) if total else 0.0
                     for k in CATEGORIES},
        "inclusive_pct": share(incl_c),
        "session_py_self_pct": share(sess_self),
        "session_py_inclusive_pct": dict(list(share(sess_incl).items())[:25]),
        "top_leaves_pct": dict(list(share(leaves).items())[:40]),
        # per owning code (innermost frame that is not trio's loop/channels or gc): its
        # share in all, and what that share was spent in
        "owner_pct": {o: {"total": round(100.0 * sum(c.values()) / total, 2),
                          **share(c)}
                      for o, c in sorted(owner_c.items(), key=lambda kv: -sum(kv[1].values()))}
        if total else {},
    }


def plot(agg: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(agg["self_pct"].items(), key=lambda kv: kv[1])
    ms = agg.get("ms_per_session_s")
    fig, ax = plt.subplots(figsize=(9, 6), constrained_layout=True)
    ax.barh([k for k, _ in items], [v for _, v in items])
    for i, (k, v) in enumerate(items):
        label = f"{v:.1f}%" + (f"  {ms[k]:.2f} ms" if ms and k in ms else "")
        ax.text(v, i, " " + label, va="center", fontsize=8)
    ax.set_xlabel("share of gateway CPU samples (innermost category)")
    ax.set_title(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_profile(args: argparse.Namespace) -> Path:
    from bench.common import stop
    from bench.load import set_affinity, spawn_gateway

    tmp = tempfile.TemporaryDirectory(prefix="voxgate-profile-")
    stem = OUT / f"{args.name}"
    raw = stem.with_suffix(".raw")
    proc, line = spawn_gateway(False, tmp.name, max(200, args.sessions + 10))
    url = line.split()[0] if " " in line else line
    load = None
    try:
        set_affinity(proc.pid, {0})
        load = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "load.py"), "--url", url, "--pid",
             str(proc.pid), "--sessions", str(args.sessions), "--seconds",
             str(args.seconds), "--pin", "--name", f"{args.name}_load"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(args.delay_s)  # ramp and connect: profile the steady part only
        cmd = [PY_SPY, "record", "--pid", str(proc.pid), "--format", "raw", "--rate",
               str(args.rate), "--duration", str(args.duration_s), "--output", str(raw)]
        if args.native:
            cmd.append("--native")
        spy = subprocess.run(["taskset", "-c", "1", *cmd], capture_output=True, text=True)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {spy.stderr[-2000:]}")
        _, err = load.communicate(timeout=args.seconds + 180)
        if load.returncode != 0:
            print(err[-2000:], file=sys.stderr)
    finally:
        if load is not None and load.poll() is None:
            load.kill()
        stop(proc)
        tmp.cleanup()
    return raw


# -- WebSocket receive: what a 20 ms binary message costs the server ------------------


def _ws_client_bytes(n: int, payload_len: int = 640) -> tuple[bytes, list[bytes]]:
    """A client's upgrade request and ``n`` masked binary frames (as ``bench/load.py``)."""
    import numpy as np
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import Request

    from bench.load import ws_binary_frame

    client = WSConnection(ConnectionType.CLIENT)
    hello = client.send(Request(host="127.0.0.1", target="/ws/stream"))
    rng = np.random.default_rng(0)
    return hello, [ws_binary_frame(rng.bytes(payload_len), rng.bytes(4)) for _ in range(n)]


def _feeder(sock: Any, hello: bytes, frames: list[bytes], gap_s: float) -> None:
    """Client thread: the upgrade, then one frame every ``gap_s`` (each is read alone)."""
    sock.sendall(hello)
    sock.recv(4096)  # the 101
    for f in frames:
        sock.sendall(f)
        t = time.perf_counter() + gap_s
        while time.perf_counter() < t:
            pass
    sock.shutdown(1)


class _MinimalReader:
    """The least a server can do per message: parse the header in Python, unmask with
    one big-integer XOR (or numpy), keep the payload. Client frames only (masked), no
    fragments or control frames: a measure of the floor, not a server."""

    def __init__(self, unmask: str = "int") -> None:
        self.buf = bytearray()
        self.unmask = unmask

    def feed(self, data: bytes) -> list[bytes]:
        import numpy as np

        buf = self.buf
        buf += data
        out = []
        while len(buf) >= 6:
            n = buf[1] & 0x7F
            head = 2
            if n == 126:
                n = int.from_bytes(buf[2:4], "big")
                head = 4
            elif n == 127:
                n = int.from_bytes(buf[2:10], "big")
                head = 10
            end = head + 4 + n
            if len(buf) < end:
                break
            mask = bytes(buf[head:head + 4])
            body = bytes(buf[head + 4:end])
            if self.unmask == "numpy":
                m = np.frombuffer(mask * ((n + 3) // 4), np.uint8)[:n]
                payload = (np.frombuffer(body, np.uint8) ^ m).tobytes()
            else:
                key = int.from_bytes(mask * ((n + 3) // 4), "little") & ((1 << (8 * n)) - 1)
                payload = (int.from_bytes(body, "little") ^ key).to_bytes(n, "little")
            out.append(payload)
            del buf[:end]
        return out


def ws_micro(n: int, gap_s: float) -> dict[str, float]:
    """Server CPU per 20 ms binary message (640 bytes), in microseconds, for four
    receive paths over a real socket pair, each message read alone (as at 100 sessions
    in real time): trio-websocket (what the gateway uses: its reader task, wsproto, a
    memory channel to ``get_message``), wsproto alone (receive_some, receive_data,
    events), a minimal parser with int or numpy unmasking, and ``receive_some`` alone
    (the trio wake-up and the syscall every path pays). The client is another
    thread; the figure is the trio thread's CPU time."""
    import socket
    import threading

    import trio
    import trio_websocket
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, Request

    hello, frames = _ws_client_bytes(n)
    results: dict[str, float] = {}

    async def run(kind: str) -> float:
        a, b = socket.socketpair()
        feeder = threading.Thread(target=_feeder, args=(b, hello, frames, gap_s))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
        feeder.start()
        got = 0
        t0 = 0.0
        if kind == "trio_websocket":
            async with trio.open_nursery() as nursery:
                req = await trio_websocket.wrap_server_stream(nursery, stream)
                conn = await req.accept()
                t0 = time.thread_time()
                while got < n:
                    await conn.get_message()
                    got += 1
                dt = time.thread_time() - t0
                nursery.cancel_scope.cancel()
        else:
            ws = WSConnection(ConnectionType.SERVER)
            data = await stream.receive_some(65536)
            ws.receive_data(data)
            for ev in ws.events():
                if isinstance(ev, Request):
                    await stream.send_all(ws.send(AcceptConnection()))
            minimal = _MinimalReader("numpy" if kind == "minimal_numpy" else "int")
            t0 = time.thread_time()
            nbytes = 0
            while got < n:
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError(f"{kind}: the client closed after {got} messages")
                if kind == "receive_only":  # counts bytes only: trio + the syscall
                    nbytes += len(data)
                    got = nbytes // len(frames[0])
                elif kind == "wsproto":
                    ws.receive_data(data)
                    for ev in ws.events():
                        if isinstance(ev, BytesMessage):
                            got += 1
                else:
                    got += len(minimal.feed(data))
            dt = time.thread_time() - t0
        feeder.join()
        a.close()
        b.close()
        return dt * 1e6 / n

    for kind in ("trio_websocket", "wsproto", "minimal_int", "minimal_numpy",
                 "receive_only"):
        results[kind] = round(min(trio.run(run, kind) for _ in range(3)), 2)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--seconds", type=float, default=40.0, help="audio per session, s")
    p.add_argument("--delay-s", type=float, default=12.0,
                   help="wait after starting the load before sampling (ramp + connect)")
    p.add_argument("--duration-s", type=int, default=20, help="sampling time, s")
    p.add_argument("--rate", type=int, default=100, help="samples per second")
    p.add_argument("--no-native", dest="native", action="store_false",
                   help="Python frames only")
    p.add_argument("--ms-per-session-s", type=float, default=None,
                   help="the gateway's measured CPU per session-second (bench/load.py "
                        "without the profiler): shares are also given in ms")
    p.add_argument("--aggregate", type=Path, default=None,
                   help="only aggregate an existing py-spy raw file")
    p.add_argument("--name", default=None, help="output stem (default profile_gw_<N>)")
    p.add_argument("--ws-micro", type=int, default=0, metavar="N",
                   help="only the WebSocket receive micro-benchmark, N messages per path")
    args = p.parse_args(argv)
    if args.ws_micro:
        res = ws_micro(args.ws_micro, gap_s=0.0002)
        print("server CPU per 640-byte binary message, us:", res)
        print("as ms per session-second at 50 messages/s:",
              {k: round(v * 50 / 1000, 3) for k, v in res.items()})
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "ws_micro.json").write_text(json.dumps(
            {"us_per_message": res, "messages": args.ws_micro}, indent=1))
        return 0
    args.name = args.name or f"profile_gw_{args.sessions}"
    OUT.mkdir(parents=True, exist_ok=True)
    if args.aggregate is not None:
        raw = args.aggregate
        args.name = raw.stem
    else:
        raw = run_profile(args)
    agg = aggregate(raw)
    if args.ms_per_session_s:
        agg["ms_per_session_s"] = {k: round(v * args.ms_per_session_s / 100, 2)
                                   for k, v in agg["self_pct"].items()}
    agg["meta"] = {"raw": str(raw), "sessions": args.sessions, "native": args.native,
                   "rate": args.rate, "rules": RULES, "cores": os.cpu_count()}
    out = OUT / f"{args.name}.json"
    out.write_text(json.dumps(agg, indent=1))
    plot(agg, OUT / f"{args.name}.png",
         f"gateway CPU by category ({agg['samples']} samples, {args.sessions} sessions)")
    for k, v in sorted(agg["self_pct"].items(), key=lambda kv: -kv[1]):
        extra = f"  {agg['ms_per_session_s'][k]:6.2f} ms" if "ms_per_session_s" in agg else ""
        print(f"{k:<20} {v:6.2f} %  (incl {agg['inclusive_pct'].get(k, 0.0):6.2f} %){extra}")
    print("by owner:")
    for o, d in agg["owner_pct"].items():
        print(f"  {o:<18} {d['total']:6.2f} %  ", {k: v for k, v in d.items() if k != "total"})
    print("session.py self:", agg["session_py_self_pct"])
    print(f"wrote {out} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
