"""Record the wire-level example session of ``docs/protocol/example-session.md``.

Why a script: the example in the docs must be what the server really sends, not what
someone remembers it sends. This starts a real ASR service (``voxgate asr``, real
Whisper, in-process) and a real gateway (``voxgate gateway``) on free loopback ports,
streams ``goforward.raw`` (pocketsphinx's test clip, "go forward ten meters") with a
plain WebSocket client in real time, and writes every frame in both directions to
``example-session.jsonl`` (binary frames as their size and seq header).

Run from the repository root: ``.venv/bin/python docs/protocol/record_example.py``
(about a minute; both servers are stopped at the end).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket_url

HERE = Path(__file__).resolve().parent
CLIP = Path("/usr/share/pocketsphinx/test/data/goforward.raw")
CHUNK_MS = 100  # one binary frame: 100 ms, to keep the recording short to read
SILENCE_MS = 1000  # before and after the clip, so VAD sees an onset and an endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process ended before printing {needle!r}")
        if needle in line:
            return line.strip()
    raise TimeoutError(needle)


async def session(url: str, log: list[dict[str, Any]], *, seq_header: bool,
                  flow_id: str) -> None:
    t0 = time.monotonic()

    def rec(direction: str, **fields: Any) -> None:
        log.append({"session": flow_id, "t_ms": round((time.monotonic() - t0) * 1000),
                    "dir": direction, **fields})

    pcm = CLIP.read_bytes()
    silence = b"\0\0" * (16 * SILENCE_MS)
    audio = silence + pcm + silence
    step = 32 * CHUNK_MS
    async with open_websocket_url(url) as ws:
        start = {"type": "start", "flowId": flow_id,
                 "audio": {"codec": "pcm_s16le", "sr": 16000, "channels": 1,
                           "chunk_ms": CHUNK_MS},
                 "return": ["lid", "asr", "record_url", "metrics"],
                 "hints": {"domain": "default", "user_lang_pref": "auto", "hotwords": []},
                 "client_version": "0.1.0",
                 "features": ["seq_header"] if seq_header else []}
        await ws.send_message(json.dumps(start))
        rec("client", kind="text", json=start)

        async def reader() -> None:
            while True:
                msg = await ws.get_message()
                event = json.loads(msg)
                rec("server", kind="text", json=event)
                if event["type"] == "end":
                    return

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.05)
            ping = {"type": "ping", "id": "p1"}
            await ws.send_message(json.dumps(ping))
            rec("client", kind="text", json=ping)
            begin = trio.current_time()
            for i, off in enumerate(range(0, len(audio), step)):
                chunk = audio[off:off + step]
                header = struct.pack("<II", i, i * CHUNK_MS) if seq_header else b""
                await ws.send_message(header + chunk)
                fields: dict[str, Any] = {"bytes": len(header + chunk)}
                if seq_header:
                    fields["seq"], fields["pts_ms"] = i, i * CHUNK_MS
                rec("client", kind="binary", **fields)
                await trio.sleep_until(begin + (i + 1) * CHUNK_MS / 1000)
            flush = {"type": "flush"}
            await ws.send_message(json.dumps(flush))
            rec("client", kind="text", json=flush)


def main() -> int:
    asr_port, ws_port, http_port = free_port(), free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="voxgate-example-")
    voxgate = str(Path(sys.executable).with_name("voxgate"))
    env = {**os.environ, "ASR_URLS": f"http://127.0.0.1:{asr_port}",
           "ARCHIVE_DIR": f"{tmp}/records", "PUBLIC_BASE": f"http://127.0.0.1:{http_port}"}
    asr = subprocess.Popen([voxgate, "asr", "--port", str(asr_port), "--workers", "0",
                            "--log-level", "warning"], stdout=subprocess.PIPE, text=True,
                           env=env)
    gw = None
    try:
        print(wait_for_line(asr, "asr: ready on", 300))
        gw = subprocess.Popen([voxgate, "gateway", "--port", str(ws_port), "--http-port",
                               str(http_port)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
        url = wait_for_line(gw, "/ws/stream", 60)
        log: list[dict[str, Any]] = []
        trio.run(partial(session, url, log, seq_header=True, flow_id="example-1"))
        trio.run(partial(session, url, log, seq_header=False, flow_id="example-2"))
        # The local store's /records URLs are on this run's random port: name it.
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in log) + "\n"
        text = text.replace(f"127.0.0.1:{http_port}", "127.0.0.1:8081")
        (HERE / "example-session.jsonl").write_text(text)
        print(f"wrote {len(log)} frames to {HERE / 'example-session.jsonl'}")
        return 0
    finally:
        for proc in (gw, asr):
            if proc is not None:
                proc.terminate()
                proc.wait(60)


if __name__ == "__main__":
    raise SystemExit(main())
