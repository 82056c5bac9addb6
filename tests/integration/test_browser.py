"""The browser client (``gateway/web``) in a real headless Chromium against a real gateway.

Chromium's fake microphone plays a WAV file (silence, 'go forward ten meters', silence);
the page captures it through its AudioWorklet, streams it with ``seq_header``, shows the
stand-in engine's final (the duration it heard) and the recording's link, which the
browser must be able to load. Driven over the DevTools protocol with trio-websocket
(no WebDriver dependency): ``Runtime.evaluate`` with promises that a MutationObserver
resolves, so nothing polls the page.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import subprocess
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from trio_websocket import (
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from gateway.config import GatewayConfig
from gateway.httpapp import GatewayHttpApp
from gateway.server import serve
from gateway.vadservice import VadService
from stages.vad import VadModel
from tests import speech
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(90)

# Resolves with cond()'s first truthy value, re-checked on every DOM change.
WAIT_JS = """(cond) => new Promise((resolve) => {
  const check = () => { let v; try { v = cond(); } catch (e) { v = null; }
                        if (v) { resolve(v); return true; } return false; };
  if (!check()) {
    const mo = new MutationObserver(() => { if (check()) mo.disconnect(); });
    mo.observe(document, {subtree: true, childList: true, attributes: true,
                          characterData: true});
  }
})"""

# Logs the seq of every binary frame the page sends, one list per WebSocket.
SEQ_LOG_JS = """(() => {
  window.sentSeqs = [];
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    if (data instanceof ArrayBuffer) {
      if (!this.seqLog) { this.seqLog = []; window.sentSeqs.push(this.seqLog); }
      this.seqLog.push(new DataView(data).getUint32(0, true));
    }
    return send.call(this, data);
  };
})()"""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise FileNotFoundError("chromium is missing: deploy/setup.sh installs it (apt)")


class DevTools:
    """A minimal DevTools-protocol client: one page, commands in sequence."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_message(json.dumps(
            {"id": self.next_id, "method": method, "params": params}))
        while True:  # events (none are enabled) and stale replies are skipped
            reply = json.loads(await self.ws.get_message())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    async def js(self, expression: str) -> Any:
        """The value of ``expression`` (awaited if it is a promise)."""
        res = await self.call("Runtime.evaluate", expression=expression,
                              awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait(self, cond_js: str, timeout_s: float = 30) -> Any:
        """Wait until the arrow function ``cond_js`` returns a truthy value; return it.

        Raises:
            AssertionError: after ``timeout_s``, with what the page shows and has heard.
        """
        with trio.move_on_after(timeout_s):
            return await self.js(f"({WAIT_JS})({cond_js})")
        shown = await self.js("JSON.stringify({state: document.body?.innerText,"
                              " events: window.voxgate?.events})")
        raise AssertionError(f"waited {timeout_s} s for {cond_js}; the page: {shown}")


@contextlib.asynccontextmanager
async def open_browser(url: str, wav: Path, profile: Path
                       ) -> AsyncIterator[DevTools]:
    """Headless Chromium on ``url`` with ``wav`` as its microphone, driven over DevTools.

    Raises:
        RuntimeError: Chromium did not start listening within 20 s (with its log).
    """
    log = profile.with_suffix(".log")
    with log.open("wb") as log_fh:
        proc = await trio.lowlevel.open_process([
            find_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
            "--no-first-run", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "--window-size=900,900", "about:blank",
        ], stdout=subprocess.DEVNULL, stderr=log_fh)
    try:
        port_file = profile / "DevToolsActivePort"
        with trio.move_on_after(20):
            while proc.poll() is None and (not port_file.exists()
                                           or len(port_file.read_text().split()) < 2):
                await trio.sleep(0.05)  # Chromium writes this file once it listens
        if not port_file.exists():
            raise RuntimeError(f"chromium did not start (exit {proc.returncode}): "
                               + log.read_text(errors="replace")[-2000:])
        with trio.fail_after(10):
            port = int(port_file.read_text().split()[0])
            async with httpx.AsyncClient() as http:
                targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(t for t in targets if t["type"] == "page")
        async with open_websocket_url(page["webSocketDebuggerUrl"],
                                      max_message_size=64 * 1024 * 1024) as ws:
            dt = DevTools(ws)
            # navigating from here (not from the command line) means the page's
            # document is committed before the first evaluate: no destroyed context
            await dt.call("Page.navigate", url=url)
            yield dt
    finally:
        proc.terminate()  # SIGTERM: Chromium takes its renderer processes down with it
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                await proc.wait()
            proc.kill()
            await proc.wait()


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


async def start_gateway(nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
                        **overrides: Any) -> tuple[int, int]:
    """A real gateway on a stand-in ASR: ``(ws_port, http_port)``; stops with the test."""
    _, asr_port, asr_stop = await start_asr(nursery, StandInEngine())
    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "asr_urls": f"http://127.0.0.1:{asr_port}", "flush_idle_s": 2.0, **overrides})
    stop = trio.Event()
    ports: tuple[int, int] = await nursery.start(functools.partial(
        serve, cfg, shutdown=stop, vad=VadService(vad_model)))

    async def stop_later() -> None:  # the nursery fixture is cancelled after the test
        try:
            await trio.sleep_forever()
        finally:
            stop.set()
            asr_stop.set()

    nursery.start_soon(stop_later)
    return ports


@pytest.fixture
async def gateway(nursery: trio.Nursery, vad_model: VadModel,
                  tmp_path: Path) -> tuple[int, int]:
    """A real gateway on a stand-in ASR: ``(ws_port, http_port)``."""
    return await start_gateway(nursery, vad_model, tmp_path)


def write_wav(path: Path, audio: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(audio.astype("<i2").tobytes())


async def test_static_files_headers(gateway: tuple[int, int]) -> None:
    _, http_port = gateway
    base = f"http://127.0.0.1:{http_port}"
    async with httpx.AsyncClient() as http:
        page = await http.get(base + "/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "connect-src 'self' ws://127.0.0.1:* wss://127.0.0.1:*" in csp
        assert "media-src 'self'" in csp and "frame-ancestors 'none'" in csp
        for path, ctype in (("/web/app.js", "text/javascript"),
                            ("/web/capture-worklet.js", "text/javascript"),
                            ("/web/style.css", "text/css")):
            r = await http.get(base + path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
            assert r.headers["cache-control"] == "no-cache"
            again = await http.get(base + path, headers={"if-none-match": r.headers["etag"]})
            assert again.status_code == 304 and again.content == b""
        app_js = await http.get(base + "/web/app.js")
        head = await http.head(base + "/web/app.js")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(app_js.content) > 1000
        assert (await http.get(base + "/web/../pyproject.toml")).status_code == 404
        assert (await http.get(base + "/web/nothing.js")).status_code == 404
        # a Host header that is not a host never reaches the CSP
        odd = await http.get(base + "/", headers={"host": "x; script-src *"})
        assert "script-src *" not in odd.headers["content-security-policy"]


async def test_page_names_the_websocket_port_once_known() -> None:
    """The HTTP side writes the WebSocket port into the page (a <meta>, no script), with
    its own ETag; without it the page says nothing and the script assumes 8080."""
    app = GatewayHttpApp(store=None, metrics=lambda: b"", ready=lambda: True)

    async def get() -> tuple[dict[bytes, bytes], bytes]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            raise AssertionError("a GET has no body to read")

        await app({"type": "http", "method": "GET", "path": "/",
                   "headers": [(b"host", b"127.0.0.1:8081")]}, receive, send)
        return dict(sent[0]["headers"]), sent[1]["body"]

    headers, body = await get()
    assert b'<meta name="voxgate-ws-port" content="">' in body
    app.ws_port = 18080
    headers2, body2 = await get()
    assert b'<meta name="voxgate-ws-port" content="18080">' in body2
    assert headers2[b"etag"] != headers[b"etag"]
    assert int(headers2[b"content-length"]) == len(body2)


@pytest.mark.parametrize(("ctx_rate", "lang"), [(16000, "en"), (48000, "auto")])
async def test_page_streams_microphone(gateway: tuple[int, int], tmp_path: Path,
                                       ctx_rate: int, lang: str) -> None:
    """16 kHz context with lang=en (no LID asked: a lid-free flow) and a 48 kHz context
    (the worklet resamples) with lang=auto (the stand-in's LID says en)."""
    ws_port, http_port = gateway
    speech_audio = speech.goforward()
    silence = np.zeros(16000, dtype=np.int16)
    wav = tmp_path / "mic.wav"
    write_wav(wav, np.concatenate([silence, speech_audio, silence, silence, silence]))
    flow = f"browser-{ctx_rate}"
    url = (f"http://127.0.0.1:{http_port}/?ws=ws://127.0.0.1:{ws_port}/ws/stream"
           f"&lang={lang}&ctx={ctx_rate}&flow={flow}")
    async with open_browser(url, wav, tmp_path / "profile") as dt:
        with trio.fail_after(60):
            assert await dt.wait("() => document.body?.dataset.state === 'idle'")
            await dt.js("document.getElementById('start').click()")
            # The fake microphone loops the file from wherever it is when capture starts:
            # take the first final whose speech began after that (start_ms > 0).
            ev = await dt.wait("() => window.voxgate?.events.find("
                               "(e) => e.type === 'asr_final' && e.start_ms > 0)")
            final = await dt.js(f"document.querySelector('#transcript .final"
                                f"[data-utterance=\"{ev['utterance']}\"]').textContent")
            await dt.js("document.getElementById('stop').click()")
            end = await dt.wait("() => document.body.dataset.state === 'ended' && "
                                "document.getElementById('state').textContent")
            href = await dt.js("document.getElementById('record-link').href")
            # media state is no DOM mutation: wait on the element's own event
            duration = await dt.js(
                "new Promise((r) => { const a = document.getElementById('player');"
                " if (a.readyState >= 1) r(a.duration);"
                " else a.addEventListener('loadedmetadata', () => r(a.duration)); })")
            page = await dt.js("""({
                rate: document.getElementById('rate').textContent,
                lang: document.getElementById('lang').textContent,
                errors: Array.from(document.querySelectorAll('#errors li'),
                                   (li) => li.textContent),
                types: window.voxgate.events.map((e) => e.type),
                audio_ms: window.voxgate.events.find((e) => e.type === 'metrics')?.audio_ms,
            })""")
    assert end == "ended: flush"
    assert page["errors"] == []  # no protocol error, no CSP violation
    assert page["rate"].startswith(f"{ctx_rate} Hz")
    m = re.fullmatch(r"(\d+\.\d+)s rms=(\d+\.\d+)", final)
    assert m and final == ev["text"], (final, ev)
    heard_s, rms = float(m[1]), float(m[2])
    assert abs(heard_s * 1000 - (ev["end_ms"] - ev["start_ms"])) <= 20
    # The file's speech with its pre-roll: 2.22-2.24 s measured at 16 kHz and 48 kHz
    # (the file is 3.4 s with its pauses). A wrong resampling ratio would scale it by 3.
    assert 1.8 <= heard_s <= 2.8, final
    assert rms > 0.01  # real samples from the file, not silence
    types = page["types"]
    assert types[0] == "ack" and types[-3:] == ["record_url", "metrics", "end"]
    assert "asr_final" in types
    if lang == "en":
        assert "lid" not in types and page["lang"] == "—"
    else:
        assert "lid" in types and page["lang"].startswith("en ")
    assert href.split("?")[0] == f"http://127.0.0.1:{http_port}/records/{flow}.ogg"
    assert "sig=" in href  # the signed link, as the session gave it
    assert abs(duration * 1000 - page["audio_ms"]) < 100  # the browser decoded it
    async with httpx.AsyncClient() as http:
        rec = await http.get(href)
    assert rec.status_code == 200 and rec.headers["content-type"] == "audio/ogg"
    assert rec.content.startswith(b"OggS")



async def test_page_resumes_after_drop(gateway: tuple[int, int], tmp_path: Path) -> None:
    """The socket drops mid-stream: the page reconnects with the same flowId, the ack says
    resumed, and it re-sends from next_seq; the session hears every frame exactly once."""
    ws_port, http_port = gateway
    silence = np.zeros(16000, dtype=np.int16)
    wav = tmp_path / "mic.wav"
    write_wav(wav, np.concatenate([silence, speech.goforward(), silence, silence]))
    url = (f"http://127.0.0.1:{http_port}/?ws=ws://127.0.0.1:{ws_port}/ws/stream"
           f"&lang=en&flow=browser-resume")
    async with open_browser(url, wav, tmp_path / "profile") as dt:
        with trio.fail_after(60):
            assert await dt.wait("() => document.body?.dataset.state === 'idle'")
            await dt.js(SEQ_LOG_JS)
            await dt.js("document.getElementById('start').click()")
            await dt.wait("() => window.voxgate?.nextSeq >= 50")  # 1 s captured
            # an abrupt drop as the gateway sees it (no flush)
            await dt.js("window.voxgate.ws.close(4000, 'test drop')")
            await dt.wait("() => document.getElementById('resumes').textContent === '1'"
                          " && document.body.dataset.state === 'streaming'")
            await dt.wait("() => window.voxgate.nextSeq >= 150")  # 2 s more after it
            await dt.js("document.getElementById('stop').click()")
            end = await dt.wait("() => document.body.dataset.state === 'ended' && "
                                "document.getElementById('state').textContent")
            page = await dt.js("""({
                captured: window.voxgate.nextSeq,
                errors: Array.from(document.querySelectorAll('#errors li'),
                                   (li) => li.textContent),
                acks: window.voxgate.events.filter((e) => e.type === 'ack')
                                           .map((e) => e.session),
                audio_ms: window.voxgate.events.find((e) => e.type === 'metrics')?.audio_ms,
                sent: window.sentSeqs,
            })""")
    assert end == "ended: flush" and page["errors"] == []
    # what went over each socket: 0..k, then from the resumed ack's next_seq to the end
    before, after = page["sent"]
    assert before == list(range(len(before)))
    assert after == list(range(page["acks"][1]["next_seq"], page["captured"]))
    assert after[0] <= len(before)  # no gap between the two
    first, again = page["acks"]
    assert "resumed" not in first and again["resumed"] is True
    assert 50 <= again["next_seq"] <= page["captured"]
    assert page["audio_ms"] == page["captured"] * 20  # none lost, none doubled


async def test_page_shows_fatal_error_and_does_not_retry(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path) -> None:
    """A gateway with auth on and a page without a token: the page shows the error's code
    and message and keeps showing it after the ``end`` that follows, and does not
    reconnect to be refused again."""
    ws_port, http_port = await start_gateway(nursery, vad_model, tmp_path,
                                             auth_jwt_secret="s" * 32)
    wav = tmp_path / "mic.wav"
    write_wav(wav, np.zeros(16000, dtype=np.int16))
    url = f"http://127.0.0.1:{http_port}/?ws=ws://127.0.0.1:{ws_port}/ws/stream"
    async with open_browser(url, wav, tmp_path / "profile") as dt:
        with trio.fail_after(30):
            assert await dt.wait("() => document.body?.dataset.state === 'idle'")
            await dt.js("document.getElementById('start').click()")
            state = await dt.wait("() => document.body.dataset.state === 'error' && "
                                  "document.getElementById('state').textContent")
            # the page's own onclose runs first (registered earlier): retries is final
            await dt.js("new Promise((r) => { const ws = window.voxgate.ws;"
                        " if (!ws) r(1); else ws.addEventListener('close', () => r(1)); })")
            page = await dt.js("""({
                state: document.getElementById('state').textContent,
                types: window.voxgate.events.map((e) => e.type),
                errors: Array.from(document.querySelectorAll('#errors li'),
                                   (li) => [li.dataset.code, li.textContent]),
                retries: window.voxgate.retries,
                start: document.getElementById('start').disabled,
            })""")
    assert state == page["state"] == "error: UNAUTHORIZED"
    assert page["types"] == ["error", "end"]
    ((code, text),) = page["errors"]
    assert code == "UNAUTHORIZED" and len(text) > len("UNAUTHORIZED: ")
    assert page["retries"] == 0 and page["start"] is False


async def test_page_sends_the_typed_token(nursery: trio.Nursery, vad_model: VadModel,
                                          tmp_path: Path) -> None:
    """The same gateway with auth on, and a token typed into the page's field: the session
    is admitted (ack, then finals, record_url and end), the token went in
    ``start.auth.token`` and nowhere into the page's URL."""
    import jwt

    secret = "s" * 32
    ws_port, http_port = await start_gateway(nursery, vad_model, tmp_path,
                                             auth_jwt_secret=secret)
    token = jwt.encode({"sub": "browser-user", "exp": int(time.time()) + 600}, secret,
                       algorithm="HS256")
    wav = tmp_path / "mic.wav"
    silence = np.zeros(16000, dtype=np.int16)
    write_wav(wav, np.concatenate([silence, speech.goforward(), silence, silence]))
    url = f"http://127.0.0.1:{http_port}/?ws=ws://127.0.0.1:{ws_port}/ws/stream"
    async with open_browser(url, wav, tmp_path / "profile") as dt:
        with trio.fail_after(40):
            assert await dt.wait("() => document.body?.dataset.state === 'idle'")
            await dt.js(f"document.getElementById('token').value = {json.dumps(token)}")
            await dt.js("document.getElementById('start').click()")
            assert await dt.wait("() => window.voxgate.events.some((e) => e.type === "
                                 "'asr_final')")
            await dt.js("document.getElementById('stop').click()")
            assert await dt.wait("() => window.voxgate.events.some((e) => e.type === "
                                 "'end')")
            page = await dt.js("""({
                types: window.voxgate.events.map((e) => e.type),
                href: document.getElementById('record-link').href,
                url: location.href,
            })""")
    assert page["types"][0] == "ack" and "error" not in page["types"]
    assert page["types"][-1] == "end" and "record_url" in page["types"]
    # the recording lies in the token's tenant (its sub), behind a signed link
    assert "/records/browser-user/" in page["href"] and "sig=" in page["href"]
    assert token not in page["url"]


async def test_page_holds_frames_while_paused(gateway: tuple[int, int], nursery: trio.Nursery,
                                              tmp_path: Path) -> None:
    """Against a scripted stream server: after ``flow PAUSE`` the page sends nothing and
    says paused; after ``RESUME`` it sends what it held, in order, none lost or doubled;
    on stop it sends the rest, then ``flush``."""
    _, http_port = gateway
    seqs: list[int] = []
    in_pause: list[int] = []
    paused, resumed, flushed = trio.Event(), trio.Event(), trio.Event()

    async def script(request: WebSocketRequest) -> None:
        ws = await request.accept()
        start = json.loads(await ws.get_message())
        flow = start["flowId"]
        await ws.send_message(json.dumps({
            "type": "ack", "flowId": flow, "seq": 0, "protocol": 1,
            "session": {"features": ["seq_header"]}, "limits": {}}))

        async def frame() -> int | None:
            msg = await ws.get_message()
            if isinstance(msg, str):
                assert json.loads(msg)["type"] == "flush"
                return None
            seq = int.from_bytes(msg[:4], "little")
            assert int.from_bytes(msg[4:8], "little") == seq * 20 and len(msg) == 8 + 640
            seqs.append(seq)
            return seq

        while await frame() is not None and len(seqs) < 25:
            pass
        await ws.send_message(json.dumps({"type": "flow", "flowId": flow, "seq": 1,
                                          "state": "PAUSE"}))
        with trio.move_on_after(0.3):  # frames already on their way
            while True:
                await frame()
        paused.set()
        with trio.move_on_after(1.0):
            while True:
                in_pause.append(await frame() or -1)
        await ws.send_message(json.dumps({"type": "flow", "flowId": flow, "seq": 2,
                                          "state": "RESUME"}))
        resumed.set()
        while await frame() is not None:
            pass
        flushed.set()
        await ws.send_message(json.dumps({"type": "end", "flowId": flow, "seq": 3,
                                          "reason": "flush"}))

    listeners = await nursery.start(functools.partial(
        serve_websocket, script, "127.0.0.1", 0, ssl_context=None))
    ws_port = listeners.port
    wav = tmp_path / "mic.wav"
    write_wav(wav, speech.goforward())
    url = f"http://127.0.0.1:{http_port}/?ws=ws://127.0.0.1:{ws_port}/ws/stream&lang=en"
    async with open_browser(url, wav, tmp_path / "profile") as dt:
        with trio.fail_after(30):
            assert await dt.wait("() => document.body?.dataset.state === 'idle'")
            await dt.js("document.getElementById('start').click()")
            await paused.wait()
            state = await dt.js("document.getElementById('state').textContent")
            await resumed.wait()
            await dt.wait("() => window.voxgate.sendSeq >= window.voxgate.nextSeq - 1 && "
                          "document.body.dataset.state === 'streaming'")
            await dt.js("document.getElementById('stop').click()")
            await flushed.wait()
            end = await dt.wait("() => document.body.dataset.state === 'ended' && "
                                "document.getElementById('state').textContent")
            captured = await dt.js("window.voxgate.nextSeq")
    assert state == "paused" and in_pause == []
    assert seqs == list(range(captured))  # all held frames came, in order, once
    assert captured >= 25 + 60  # more than a second was held through the pause
    assert end == "ended: flush"
