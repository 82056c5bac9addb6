"""The session's Trio shell on a virtual clock (``MockClock(autojump_threshold=0)``):
timers that take seconds in production (idle flush, START_TIMEOUT_S, MAX_SESSION_S, the
LID hold of a final) run here in no real time, with no sleeping.

The session runs whole (``Session(ctx, ws).run()``) over an in-memory WebSocket, with a
VAD service that decides windows from a script, a recognition channel that records
what the shell asks of it, and a language ID service that answers after a set delay.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pytest
import trio
import trio.testing
from trio_websocket import CloseReason, ConnectionClosed

import gateway.linkdriver as linkdriver_mod
import gateway.session as session_mod
from asr import link
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.session import GatewayContext, Session
from stages.vad import WINDOW_SAMPLES, VadWindow

pytestmark = pytest.mark.timeout(30)

SR = 16000
FRAME = 320


class FakeWs:
    """The client's side is ``to_server`` (messages in) and ``sent`` (events out)."""

    def __init__(self) -> None:
        self.to_server, self._inbox = trio.open_memory_channel[Any](math.inf)
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self.closed_with: int | None = None

    async def get_message(self) -> Any:
        try:
            return await self._inbox.receive()
        except trio.EndOfChannel:
            raise ConnectionClosed(CloseReason(1000, "client closed")) from None

    async def send_message(self, data: str) -> None:
        if self.closed_with is not None:
            raise ConnectionClosed(CloseReason(1000, "closed"))
        self.sent.append((trio.current_time(), json.loads(data)))

    async def aclose(self, code: int = 1000) -> None:
        self.closed_with = code

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for _, e in self.sent if e["type"] == kind]

    def at(self, kind: str) -> float:
        return next(t for t, e in self.sent if e["type"] == kind)


@dataclass
class _Stream:
    fed: int = 0

    def feed(self, samples: Any) -> None:
        self.fed += len(samples)


@dataclass
class _Client:
    stream: _Stream
    results: Any
    on_windows: Callable[[Any], None] | None = None
    done: int = 0


class FakeVad:
    """Decides every whole window at once, speech where ``speech(end)`` says."""

    def __init__(self, speech: Callable[[int], bool]) -> None:
        self.speech = speech
        self.clients: list[_Client] = []

    def register(self, results: Any = None, *, tag: str | None = None,
                 on_windows: Callable[[Any], None] | None = None) -> _Client:
        client = _Client(_Stream(), results, on_windows)
        self.clients.append(client)
        return client

    def unregister(self, client: _Client) -> None:
        self.clients.remove(client)

    def poke(self) -> None:
        for c in self.clients:
            windows = []
            while c.done + WINDOW_SAMPLES <= c.stream.fed:
                c.done += WINDOW_SAMPLES
                windows.append(VadWindow(c.done, 0.9 if self.speech(c.done) else 0.01))
            if windows and c.on_windows is not None:
                # Like the VAD service's tick: later, from outside the feeding call.
                trio.lowlevel.current_trio_token().run_sync_soon(c.on_windows, windows)
            elif windows:
                c.results.send_nowait(("vad", windows))


class FakeChannel:
    """Records the shell's calls (with the virtual time); a final follows a finalize."""

    calls: ClassVar[list[tuple[float, str, Any]]] = []
    instances: ClassVar[list[FakeChannel]] = []

    def __init__(self, pools: Any, pool: str, start: link.Start, **_kw: Any) -> None:
        self.pool, self.start = pool, start
        self.opus_failures = 0
        self.pending_utterances: list[int] = []
        self._send, self._recv = trio.open_memory_channel[link.AsrEvent](math.inf)
        self._open: int | None = None
        self._log("open", (pool, start.lang_hint))
        FakeChannel.instances.append(self)

    def _log(self, what: str, arg: Any = None) -> None:
        FakeChannel.calls.append((trio.current_time(), what, arg))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def begin(self, utterance: int, *, tentative: bool = False) -> None:
        self._open = utterance
        self._log("begin", utterance)

    def confirm(self) -> None:
        self._log("confirm")

    async def cancel(self) -> None:
        self._log("cancel")

    async def send_audio(self, frames: list[Any]) -> None:
        self._log("audio", len(frames))

    async def pause(self) -> None:
        self._log("pause", self._open)

    async def finalize(self) -> None:
        self._log("finalize", self._open)
        self._send.send_nowait(link.AsrEvent("final", self.start.flow_id,
                                             self._open or 0, "words", (0, 1), "en"))

    async def move(self, pool: str, start: link.Start) -> bool:
        self.pool, self.start = pool, start
        self._log("move", (pool, start.lang_hint))
        return True

    async def end(self) -> None:
        self._log("end")
        self._send.close()

    async def events(self) -> Any:
        async for ev in self._recv:
            yield ev

    async def aclose(self) -> None:
        pass


@dataclass
class FakePools:
    lid_delay_s: float = 0.5
    lid_lang: str = "fr"
    counters: Any = field(default_factory=lambda: type("C", (), {"bytes_sent": 0})())
    lid_asked: list[float] = field(default_factory=list)

    async def lid(self, pool: str, pcm: bytes) -> dict[str, Any]:
        self.lid_asked.append(trio.current_time())
        await trio.sleep(self.lid_delay_s)
        return {"lang": self.lid_lang, "score": 0.99, "top": []}


def run_session(script: Callable[[FakeWs], Any], *, speech: Callable[[int], bool] = lambda
                e: False, pools: FakePools | None = None, **overrides: Any
                ) -> tuple[FakeWs, Session, float]:
    """Run one session to its end on a MockClock; returns the socket, the session and
    the real seconds it took."""
    cfg = GatewayConfig.load(env={}, overrides={"enable_compress": False, **overrides})
    ws = FakeWs()
    holder: dict[str, Session] = {}

    async def main() -> None:
        ctx = GatewayContext(cfg, FakeVad(speech), pools or FakePools(),  # type: ignore[arg-type]
                             GatewayMetrics(), None, "http://gw")
        s = holder["s"] = Session(ctx, ws)  # type: ignore[arg-type]
        async with trio.open_nursery() as n:
            n.start_soon(script, ws)
            await s.run()
            n.cancel_scope.cancel()

    FakeChannel.calls = []
    FakeChannel.instances = []
    t0 = time.monotonic()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return ws, holder["s"], time.monotonic() - t0


@pytest.fixture(autouse=True)
def fake_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linkdriver_mod, "AsrChannel", FakeChannel)


def start(**extra: Any) -> str:
    return json.dumps({"type": "start", "flowId": "f1", **extra})


async def stream(ws: FakeWs, seconds: float, *, offset: int = 0) -> None:
    """Real-time audio: a 20 ms frame every 20 ms (virtual)."""
    for i in range(int(seconds * SR) // FRAME):
        ws.to_server.send_nowait(np.full(FRAME, (offset + i) % 100, "<i2").tobytes())
        await trio.sleep(0.02)


# -- the tests -------------------------------------------------------------------------

def test_start_timeout_on_the_virtual_clock() -> None:
    async def script(ws: FakeWs) -> None:
        await trio.sleep_forever()

    ws, _s, real = run_session(script, start_timeout_s=30.0)
    err = ws.events("error")[0]
    assert err["code"] == "START_TIMEOUT" and err["fatal"]
    assert ws.at("error") == pytest.approx(30.0, abs=0.01)
    assert ws.closed_with == 1008 and real < 5


def test_idle_flush() -> None:
    async def script(ws: FakeWs) -> None:
        ws.to_server.send_nowait(start())
        await stream(ws, 1.0)
        await trio.sleep_forever()

    ws, s, real = run_session(script, flush_idle_s=7.0)
    assert ws.events("end")[0]["reason"] == "idle" and s.reason == "idle"
    # the last audio came at ~1 s; idle 7 s after it
    assert ws.at("end") == pytest.approx(8.0, abs=0.1)
    assert ws.events("metrics")[0]["audio_ms"] == 1000
    assert real < 5


def test_max_session_duration() -> None:
    async def script(ws: FakeWs) -> None:
        ws.to_server.send_nowait(start())
        await stream(ws, 100.0)

    ws, _s, real = run_session(script, max_session_s=20.0, flush_idle_s=5.0)
    assert ws.events("end")[0]["reason"] == "max_duration"
    assert ws.at("end") == pytest.approx(20.0, abs=0.1)
    assert 19_900 <= ws.events("metrics")[0]["audio_ms"] <= 20_020
    assert real < 10


def test_flush_gets_the_final_first() -> None:
    speech = lambda end: SR // 2 < end <= 2 * SR  # noqa: E731

    async def script(ws: FakeWs) -> None:
        ws.to_server.send_nowait(start(**{"return": ["asr", "metrics"]}))
        await stream(ws, 3.0)
        ws.to_server.send_nowait(json.dumps({"type": "flush"}))

    ws, _s, _real = run_session(script, speech=speech)
    kinds = [e["type"] for _, e in ws.sent]
    assert kinds.index("asr_final") < kinds.index("end")
    assert ws.events("end")[0]["reason"] == "flush"
    calls = [what for _, what, _ in FakeChannel.calls]
    assert calls[:2] == ["open", "begin"] and calls[-2:] == ["finalize", "end"]


def lid_speech(end: int) -> bool:
    return int(0.2 * SR) < end <= int(1.4 * SR)  # 1.2 s of speech


def test_lid_hold_waits_for_the_answer_and_moves_first() -> None:
    pools = FakePools(lid_delay_s=0.8)

    async def script(ws: FakeWs) -> None:
        ws.to_server.send_nowait(start(**{"return": ["asr", "lid"]}))
        await stream(ws, 4.0)
        ws.to_server.send_nowait(json.dumps({"type": "flush"}))

    ws, _s, real = run_session(script, speech=lid_speech, pools=pools,
                               asr_routes="fr=pool-fr")
    calls = [(t, what, arg) for t, what, arg in FakeChannel.calls
             if what not in ("audio", "confirm")]
    names = [what for _, what, _ in calls]
    assert names[:2] == ["open", "begin"]
    assert names[2:4] == ["move", "finalize"]  # the final waited, on the new pool
    assert calls[2][2] == ("pool-fr", "fr")
    asked = pools.lid_asked[0]
    assert calls[3][0] == pytest.approx(asked + 0.8, abs=0.05)
    assert ws.events("lid")[0]["lang"] == "fr"
    assert real < 10


def test_lid_hold_times_out() -> None:
    pools = FakePools(lid_delay_s=60.0)

    async def script(ws: FakeWs) -> None:
        ws.to_server.send_nowait(start(**{"return": ["asr", "lid"]}))
        await stream(ws, 4.0)
        ws.to_server.send_nowait(json.dumps({"type": "flush"}))

    ws, _s, real = run_session(script, speech=lid_speech, pools=pools,
                               asr_routes="fr=pool-fr")
    finalize = next(t for t, what, _ in FakeChannel.calls if what == "finalize")
    assert finalize == pytest.approx(pools.lid_asked[0] + session_mod.LID_HOLD_S, abs=0.05)
    assert not [c for c in FakeChannel.calls if c[1] == "move"]
    assert ws.events("end")[0]["reason"] == "flush"
    assert real < 10


def test_asr_behind_holds_the_client_and_nothing_is_dropped() -> None:
    """The ASR service says BEHIND: the client is told PAUSE and its messages stay
    unread until OK (then RESUME); every frame it sent is still taken."""
    speech = lambda end: end > SR // 2  # noqa: E731 - speech from 0.5 s on

    async def script(ws: FakeWs) -> None:
        ws.to_server.send_nowait(start(**{"return": ["asr", "metrics"]}))
        await stream(ws, 2.0)
        channel = FakeChannel.instances[-1]
        channel._send.send_nowait(link.AsrEvent("flow", "f1", code="BEHIND"))
        await stream(ws, 3.0, offset=100)  # queued in the socket, unread while held
        channel._send.send_nowait(link.AsrEvent("flow", "f1", code="OK"))
        ws.to_server.send_nowait(json.dumps({"type": "flush"}))

    ws, _s, _real = run_session(script, speech=speech, max_utterance_s=30.0)
    flows = ws.events("flow")
    assert [f["state"] for f in flows] == ["PAUSE", "RESUME"]
    paused = [t for t, e in ws.sent if e["type"] == "flow"]
    assert paused[0] == pytest.approx(2.0, abs=0.05)
    assert paused[1] == pytest.approx(5.0, abs=0.05)
    assert ws.events("metrics")[0]["audio_ms"] == 5000
    assert ws.events("end")[0]["reason"] == "flush"
