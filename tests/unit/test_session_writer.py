"""The session's writer (``gateway/writer.py``) on a MockClock: partials held to the
interval, a final replacing its partials, SEND_TIMEOUT_S, and an event kept for the
client's next socket after a resume."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import CloseReason, ConnectionClosed

from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.protocol import EventWriter
from gateway.writer import ClientSocket, Writer

pytestmark = pytest.mark.timeout(30)


class FakeWs:
    def __init__(self, *, stall: bool = False, gone: bool = False) -> None:
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self.stall = stall
        self.gone = gone
        self.closed_with: int | None = None

    async def send_message(self, data: str) -> None:
        if self.gone:
            raise ConnectionClosed(CloseReason(1006, "gone"))
        if self.stall:
            await trio.sleep_forever()
        self.sent.append((trio.current_time(), json.loads(data)))

    async def aclose(self, code: int = 1000) -> None:
        self.closed_with = code


def _writer(ws: FakeWs, *, resumable: bool = False) -> tuple[Writer, ClientSocket]:
    cfg = GatewayConfig.load(env={}, overrides={"partial_interval_ms": 250,
                                                "send_timeout_s": 2.0})
    sock = ClientSocket(ws)  # type: ignore[arg-type]
    return Writer(sock, EventWriter("f1"), cfg, GatewayMetrics(),
                  resumable=lambda: resumable), sock


def _run(main: Any) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _partial(utt: int, text: str) -> dict[str, Any]:
    return {"type": "asr_partial", "utterance": utt, "text": text}


def test_partials_are_held_to_the_interval_and_the_newest_wins() -> None:
    ws = FakeWs()

    async def main() -> None:
        w, _ = _writer(ws)
        async with trio.open_nursery() as n:
            n.start_soon(w.run)
            w.emit(_partial(0, "a"))  # sent at once
            await trio.sleep(0.01)
            w.emit(_partial(0, "ab"))  # held...
            w.emit(_partial(0, "abc"))  # ...and replaced
            await trio.sleep(1)
            w.close_input()
        assert w.done.is_set()

    _run(main)
    texts = [(round(t, 3), e["text"]) for t, e in ws.sent]
    assert texts == [(0.0, "a"), (0.25, "abc")]
    assert [e["seq"] for _, e in ws.sent] == [0, 1]


def test_a_final_replaces_its_held_partial() -> None:
    ws = FakeWs()

    async def main() -> None:
        w, _ = _writer(ws)
        async with trio.open_nursery() as n:
            n.start_soon(w.run)
            w.emit(_partial(0, "a"))
            await trio.sleep(0.01)
            w.emit(_partial(0, "ab"))
            w.emit({"type": "asr_final", "utterance": 0, "text": "ab."})
            await trio.sleep(1)
            w.close_input()

    _run(main)
    assert [e["type"] for _, e in ws.sent] == ["asr_partial", "asr_final"]


def test_a_send_past_the_timeout_aborts_and_ends_the_writer() -> None:
    ws = FakeWs(stall=True)

    async def main() -> None:
        w, _ = _writer(ws)
        async with trio.open_nursery() as n:
            n.start_soon(w.run)
            w.emit({"type": "end", "reason": "flush"})
            with trio.fail_after(10):
                await w.done.wait()
            assert trio.current_time() == pytest.approx(2.0)

    _run(main)


def test_a_full_queue_drops_events_and_counts_them() -> None:
    async def main() -> None:
        w, _ = _writer(FakeWs())
        for i in range(1030):
            w.emit({"type": "pong", "i": i})
        assert w.dropped == 6

    _run(main)


def test_with_resume_an_event_waits_for_the_next_socket() -> None:
    old, new = FakeWs(gone=True), FakeWs()

    async def main() -> None:
        w, sock = _writer(old, resumable=True)
        async with trio.open_nursery() as n:
            n.start_soon(w.run)
            w.emit({"type": "asr_final", "utterance": 0, "text": "kept"})
            await trio.sleep(3)  # the client is away
            sock.replace(new)  # type: ignore[arg-type]
            await trio.sleep(0.1)
            w.close_input()

    _run(main)
    assert [(round(t, 1), e["text"], e["seq"]) for t, e in new.sent] == [(3.0, "kept", 0)]


def test_without_a_new_socket_the_writer_gives_up() -> None:
    async def main() -> None:
        w, sock = _writer(FakeWs(gone=True), resumable=True)
        async with trio.open_nursery() as n:
            n.start_soon(w.run)
            w.emit({"type": "end", "reason": "disconnect"})
            await trio.sleep(5)
            assert not w.done.is_set()  # waiting for the client to come back
            sock.give_up()
            with trio.fail_after(1):
                await w.done.wait()

    _run(main)
