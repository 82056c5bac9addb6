"""The gateway's ASR link client against real ASR service processes on loopback."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asr import link
from gateway.asrlink import (
    AsrBusy,
    AsrChannel,
    AsrPools,
    AsrRefused,
    AsrStream,
    AsrUnavailable,
    FailoverPolicy,
    parse_retry_after,
)
from gateway.h2client import H2Connection
from native import OpusError
from tests import speech
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

AUDIO = speech.goforward()
FRAMES = [(AUDIO[i:i + 320], i // 16) for i in range(0, len(AUDIO) - 319, 320)]


async def _pools(nursery: trio.Nursery, pools: dict[str, tuple[str, ...]], **kw: Any
                 ) -> AsrPools:
    p = AsrPools(pools, **kw)
    await nursery.start(p.run)
    return p


async def _recognize(stream: AsrStream, frames: list[tuple[np.ndarray, int]]
                     ) -> list[link.AsrEvent]:
    events: list[link.AsrEvent] = []

    async def read() -> None:
        async for ev in stream.events():
            events.append(ev)

    async with trio.open_nursery() as n:
        n.start_soon(read)
        for i in range(0, len(frames), 5):  # several packets per DATA frame
            await stream.send_audio(frames[i:i + 5])
        await stream.finalize()
        await stream.end()
    return events


@pytest.mark.parametrize("codec", ["opus", "pcm"])
async def test_stream_round_trip(nursery: trio.Nursery, codec: str) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine())
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    stream = await pools.open("default", link.Start(flow_id="rt", codec=codec),
                              codec=codec, bitrate=20000)
    events = await _recognize(stream, FRAMES)
    (final,) = [e for e in events if e.type == "final"]
    assert final.text.startswith(f"{len(FRAMES) * 320 / 16000:.2f}s")
    assert final.ts == (0, len(FRAMES) * 20)
    assert events[-1].type == "end"


async def test_busy_and_unavailable(nursery: trio.Nursery) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine(), max_streams=1)
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",),
                                   "dead": ("http://127.0.0.1:9",)})
    first = await pools.open("default", link.Start(flow_id="a"), codec="opus", bitrate=20000)
    with pytest.raises(AsrBusy) as info:
        await pools.open("default", link.Start(flow_id="b"), codec="opus", bitrate=20000)
    assert info.value.retry_after_s == 1
    with pytest.raises(AsrUnavailable):
        await pools.open("dead", link.Start(flow_id="c"), codec="opus", bitrate=20000)
    with pytest.raises(AsrUnavailable):
        await pools.open("nope", link.Start(flow_id="d"), codec="opus", bitrate=20000)
    assert (pools.counters.busy, pools.counters.unavailable) == (1, 1)
    await first.end()


async def test_settings_limit_opens_more_connections(nursery: trio.Nursery) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine(), h2_max_concurrent_streams=2)
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    streams = []
    with trio.fail_after(10):
        for i in range(5):
            streams.append(await pools.open("default", link.Start(flow_id=f"s{i}"),
                                            codec="opus", bitrate=20000))
    conns = {id(s._conn) for s in streams}
    assert len(conns) == 3  # 2 + 2 + 1 streams
    results = await _both(streams)
    assert all(r[-1].type == "end" for r in results)


async def _both(streams: list[AsrStream]) -> list[list[link.AsrEvent]]:
    out: list[list[link.AsrEvent]] = [[] for _ in streams]

    async def one(i: int) -> None:
        out[i] = await _recognize(streams[i], FRAMES[:50])

    async with trio.open_nursery() as n:
        for i in range(len(streams)):
            n.start_soon(one, i)
    return out


async def test_failure_before_first_event_is_retried_elsewhere_with_replay(
    nursery: trio.Nursery,
) -> None:
    doomed_scope = trio.CancelScope()
    doomed_port: list[int] = []

    async def doomed_server(task_status: trio.TaskStatus[None]) -> None:
        with doomed_scope:
            async with trio.open_nursery() as n:
                _, port, _ = await start_asr(n, StandInEngine())
                doomed_port.append(port)
                task_status.started()
                await trio.sleep_forever()

    await nursery.start(doomed_server)
    _, good_port, _ = await start_asr(nursery, StandInEngine())
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{doomed_port[0]}",
                                               f"http://127.0.0.1:{good_port}")})
    stream = await pools.open("default", link.Start(flow_id="retry"), codec="opus",
                              bitrate=20000)
    assert stream._conn is not None and stream._conn.authority.endswith(str(doomed_port[0]))
    await stream.send_audio(FRAMES[:40])
    doomed_scope.cancel()  # the first ASR server dies before saying anything
    await trio.sleep(0.2)
    events = await _recognize(stream, FRAMES[40:])
    (final,) = [e for e in events if e.type == "final"]
    # the replay carried the first 40 frames to the second server
    assert final.text.startswith(f"{len(FRAMES) * 320 / 16000:.2f}s")
    assert pools.counters.stream_retries == 1


async def test_opus_failure_falls_back_to_pcm_and_is_counted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine())
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    stream = await pools.open("default", link.Start(flow_id="fb"), codec="opus",
                              bitrate=20000)
    assert stream._encoder is not None
    real = stream._encoder.encode
    calls = {"n": 0}

    def flaky(pcm: np.ndarray) -> bytes:
        calls["n"] += 1
        if calls["n"] % 10 == 0:
            raise OpusError(-3, "OPUS_INTERNAL_ERROR", "opus_encode")
        return real(pcm)

    monkeypatch.setattr(stream._encoder, "encode", flaky)
    events = await _recognize(stream, FRAMES[:100])
    (final,) = [e for e in events if e.type == "final"]
    assert final.text.startswith("2.00s")  # every frame arrived, 10 of them as PCM
    assert not [e for e in events if e.type == "error"]
    assert pools.counters.pcm_to_opus_fail == 10 == stream.opus_failures


def test_bad_endpoint_url() -> None:
    with pytest.raises(ValueError):
        AsrPools({"default": ("asr:8090",)})


# -- a hostile or broken ASR peer ------------------------------------------------------
# A raw HTTP/2 server (h2, server side) that answers whatever the test says, down to
# malformed bytes. Nothing it sends may raise anything but AsrUnavailable (AsrBusy,
# AsrRefused) out of the link, nor reach the pools' nursery: the tests run the pools in
# the test's nursery, so an escaped exception fails the test.

EVENTS = [link.AsrEvent("partial", "x", 0, "hel", (0, 500), "en"),
          link.AsrEvent("final", "x", 0, "hello", (0, 900), "en"),
          link.AsrEvent("end", "x")]


@dataclass(frozen=True)
class Answer:
    """What the raw server answers to every request: ``status`` and ``headers``, then
    ``body`` (flow-controlled) and END_STREAM, then ``raw`` bytes as they are."""

    status: str = "200"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    raw: bytes = b""


async def _raw_server(nursery: trio.Nursery, answer: Answer, *, preface: bytes | None = None,
                      settings: dict[h2.settings.SettingCodes, int] | None = None) -> int:
    """Serve ``answer`` to every request; ``preface`` replaces the server's own first
    bytes (SETTINGS). Returns the port."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        if settings:
            conn.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        conn.initiate_connection()
        first = conn.data_to_send()
        pending: dict[int, bytes] = {}

        def pump() -> bytes:
            raw = b""
            for sid, rest in list(pending.items()):
                while rest:
                    n = min(len(rest), conn.local_flow_control_window(sid),
                            conn.max_outbound_frame_size)
                    if n <= 0:
                        break
                    conn.send_data(sid, rest[:n])
                    rest = rest[n:]
                pending[sid] = rest
                if not rest:
                    del pending[sid]
                    conn.end_stream(sid)
                    raw += answer.raw
            return conn.data_to_send() + raw

        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(first if preface is None else preface)
            while data := await stream.receive_some(65536):
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    return
                for ev in events:
                    if isinstance(ev, h2.events.RequestReceived):
                        conn.send_headers(ev.stream_id, [(b":status", answer.status.encode()),
                                                         *answer.headers])
                        pending[ev.stream_id] = answer.body
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    await stream.send_all(pump())
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    return int(listeners[0].socket.getsockname()[1])


def _frame(kind: int, payload: bytes) -> bytes:
    return link.HEADER.pack(kind, len(payload)) + payload


async def _events(pools: AsrPools) -> list[link.AsrEvent]:
    with trio.fail_after(10):
        stream = await pools.open("default", link.Start(flow_id="x", codec="pcm"),
                                  codec="pcm", bitrate=20000)
        out = [ev async for ev in stream.events()]
        await stream.aclose()
        return out


async def test_a_good_raw_peer_works(nursery: trio.Nursery) -> None:
    """The raw server's happy path (so the hostile cases below test the damage, not
    the harness); a header that is not UTF-8 is harmless."""
    port = await _raw_server(nursery, Answer(headers=((b"x-junk", b"\xff\xfe"),),
                                              body=link.encode_many(list(EVENTS))))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    assert await _events(pools) == EVENTS


@pytest.mark.parametrize(("header", "expected"), [
    ("2", 2.0), ("0.5", 0.5), ("abc", 1.0), ("inf", 1.0), ("-inf", 1.0), ("nan", 1.0),
    ("-5", 0.0), ("1e308", 30.0), ("", 1.0), (None, 1.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0)])
async def test_retry_after_garbage_is_clamped(
    nursery: trio.Nursery, header: str | None, expected: float
) -> None:
    extra = () if header is None else ((b"retry-after", header.encode()),)
    port = await _raw_server(nursery, Answer("503", extra))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    with pytest.raises(AsrBusy) as info:
        await _events(pools)
    assert info.value.retry_after_s == expected
    with pytest.raises(AsrBusy) as lid_info:
        await pools.lid("default", b"\0\0" * 160)
    assert lid_info.value.retry_after_s == expected
    assert parse_retry_after(header) == expected


@pytest.mark.parametrize("status", ["abc", "2000", "", "20x"])
async def test_malformed_status_fails_the_stream(nursery: trio.Nursery, status: str) -> None:
    port = await _raw_server(nursery, Answer(status, body=link.encode_many(list(EVENTS))))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    with pytest.raises(AsrUnavailable):
        await _events(pools)
    with pytest.raises(AsrUnavailable):
        await pools.lid("default", b"\0\0" * 160)


async def test_refusal_is_not_busy(nursery: trio.Nursery) -> None:
    port = await _raw_server(nursery, Answer("401", body=b"no"))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    with pytest.raises(AsrRefused, match="ASR_TOKEN") as info:
        await _events(pools)
    assert info.value.status == 401 and pools.counters.busy == 0


BAD_EVENTS = {
    "unknown frame type": _frame(0x7F, b"{}"),
    "client frame type": _frame(link.FrameType.START, b"{}"),
    "frame too large": link.HEADER.pack(link.FrameType.EVENT, 2**31),
    "deep JSON": _frame(link.FrameType.EVENT, b"[" * 16384),
    "not JSON": _frame(link.FrameType.EVENT, b"\xff\xfe{"),
    "not an object": _frame(link.FrameType.EVENT, b"[1, 2]"),
    "no flow_id": _frame(link.FrameType.EVENT, b'{"type": "final"}'),
    "unknown type": _frame(link.FrameType.EVENT, b'{"type": "boom", "flow_id": "x"}'),
    "infinite ts": _frame(link.FrameType.EVENT,
                          b'{"type": "final", "flow_id": "x", "ts": [1e999, 0]}'),
    "ts not numbers": _frame(link.FrameType.EVENT,
                             b'{"type": "final", "flow_id": "x", "ts": ["a", {}]}'),
    "short ts": _frame(link.FrameType.EVENT, b'{"type": "final", "flow_id": "x", "ts": [1]}'),
    "negative ts": _frame(link.FrameType.EVENT,
                          b'{"type": "final", "flow_id": "x", "ts": [-5, 10]}'),
    "ts backwards": _frame(link.FrameType.EVENT,
                           b'{"type": "final", "flow_id": "x", "ts": [900, 100]}'),
    "negative utterance": _frame(link.FrameType.EVENT,
                                 b'{"type": "final", "flow_id": "x", "utterance": -1}'),
    "huge utterance": _frame(link.FrameType.EVENT,
                             b'{"type": "final", "flow_id": "x", "utterance": 1e999}'),
    "lang markup": _frame(link.FrameType.EVENT,
                          b'{"type": "final", "flow_id": "x", "lang": "<script>"}'),
    "flow code": _frame(link.FrameType.EVENT, b'{"type": "flow", "flow_id": "x"}'),
}


@pytest.mark.parametrize("name", list(BAD_EVENTS))
async def test_malformed_event_fails_the_stream_not_the_session(
    nursery: trio.Nursery, name: str
) -> None:
    body = link.encode(EVENTS[0]) + BAD_EVENTS[name] + link.encode_many(list(EVENTS[1:]))
    port = await _raw_server(nursery, Answer(body=body))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    with trio.fail_after(10):
        stream = await pools.open("default", link.Start(flow_id="x", codec="pcm"),
                                  codec="pcm", bitrate=20000)
        seen = []
        with pytest.raises(AsrUnavailable, match="malformed frame"):
            async for ev in stream.events():
                seen.append(ev)
        await stream.aclose()
    assert seen in ([], EVENTS[:1])  # nothing after the bad frame was passed on


async def test_long_error_message_is_cut(nursery: trio.Nursery) -> None:
    error = link.AsrEvent("error", "x", code="X" * 100, message="m" * 10000)
    port = await _raw_server(nursery, Answer(body=link.encode_many([error, EVENTS[2]])))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    got, end = await _events(pools)
    assert end == EVENTS[2] and got.type == "error"
    assert len(got.message) <= 503 and len(got.code) == 64


async def test_channel_fails_over_from_a_peer_sending_garbage(nursery: trio.Nursery) -> None:
    """A session's channel treats a peer that breaks the link like a dead one: the
    utterance is replayed on the good endpoint and recognized whole."""
    garbage = await _raw_server(nursery, Answer(body=BAD_EVENTS["deep JSON"]))
    _, good, _ = await start_asr(nursery, StandInEngine())
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{garbage}",
                                               f"http://127.0.0.1:{good}")})
    for i in range(2):  # the first one starts on the garbage endpoint (round-robin)
        channel = AsrChannel(pools, "default", link.Start(flow_id=f"g{i}"), codec="opus",
                             bitrate=20000, policy=FailoverPolicy(budget_s=5))
        events: list[link.AsrEvent] = []
        async with trio.open_nursery() as n:
            await n.start(channel.run)
            channel.begin(0)
            for j in range(0, 100, 5):
                await channel.send_audio(FRAMES[j:j + 5])
            await channel.finalize()
            await channel.end()
            with trio.fail_after(10):
                events = [ev async for ev in channel.events()]
            n.cancel_scope.cancel()
        assert [e.text[:5] for e in events if e.type == "final"] == ["2.00s"], events
    assert pools.breaker_states("default")[f"127.0.0.1:{garbage}"] == "open"


@pytest.mark.parametrize("preface", [
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
    b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\xff" * 64,  # SETTINGS, then junk
    b"\x00\x00\x00\x07\x00\x00\x00\x00\x01",  # GOAWAY on stream 1 (must be 0)
    b"",  # nothing, then the connection closes at our first request
])
async def test_garbage_instead_of_http2_is_a_connect_error(
    nursery: trio.Nursery, preface: bytes
) -> None:
    port = await _raw_server(nursery, Answer(body=b""), preface=preface)
    pools = AsrPools({"default": (f"http://127.0.0.1:{port}",)}, connect_timeout_s=0.5)
    await nursery.start(pools.run)
    with trio.fail_after(5), pytest.raises(AsrUnavailable):
        await _events(pools)
    with trio.fail_after(5), pytest.raises(AsrUnavailable):
        await pools.lid("default", b"\0\0" * 160)


async def test_no_stream_slots_is_unavailable_not_a_hang(nursery: trio.Nursery) -> None:
    port = await _raw_server(nursery, Answer(body=b""), settings={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
    pools = AsrPools({"default": (f"http://127.0.0.1:{port}",)}, connect_timeout_s=0.5)
    await nursery.start(pools.run)
    with trio.fail_after(5), pytest.raises(AsrUnavailable):
        await _events(pools)


async def test_an_exception_in_dispatch_fails_only_that_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug or an unforeseen event in the reader's dispatch fails the connection and
    its streams; the pools (in the test's nursery, as in the gateway's) live on."""
    port = await _raw_server(nursery, Answer(body=link.encode_many(list(EVENTS))))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    real = H2Connection._dispatch

    def broken(self: H2Connection, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            raise RuntimeError("boom in dispatch")
        real(self, event)

    monkeypatch.setattr(H2Connection, "_dispatch", broken)
    with pytest.raises(AsrUnavailable, match="boom in dispatch"):
        await _events(pools)
    monkeypatch.setattr(H2Connection, "_dispatch", real)
    await trio.sleep(pools._pools["default"][0].breaker.open_s)  # the breaker's wait
    assert await _events(pools) == EVENTS  # a new connection, the pools alive


async def test_a_failing_connection_task_stays_in_its_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The task that holds a connection lives in the pools' nursery, beside every other
    connection: an exception in it (here its keepalive) ends that connection only."""
    port = await _raw_server(nursery, Answer(body=link.encode_many(list(EVENTS))))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)},
                         breaker_open_s=0.05)
    calls = []

    async def broken(self: AsrPools, ep: Any, conn: H2Connection) -> None:
        calls.append(conn)
        raise RuntimeError("boom in keepalive")

    monkeypatch.setattr(AsrPools, "_keepalive", broken)
    with contextlib.suppress(AsrUnavailable):  # the stream may beat the failure
        await _events(pools)
    with trio.fail_after(5):
        await calls[0].wait_closed()
    await trio.sleep(0.1)  # the holder's handler runs after the close; the breaker waits
    assert "boom in keepalive" in caplog.text
    monkeypatch.undo()
    assert await _events(pools) == EVENTS  # the pools live on, with a new connection
    assert len(calls) == 1


@pytest.mark.parametrize(("body", "problem"), [
    (b"[" * 16384, "not JSON"), (b"not json", "not JSON"), (b"[1]", "not a JSON object"),
    (b'{"score": 0.9}', "lang"), (b'{"lang": 5, "score": 0.9}', "lang"),
    (b'{"lang": "<b>", "score": 0.9}', "lang"), (b'{"lang": "en", "score": "x"}', "score"),
    (b'{"lang": "en", "score": NaN}', "score"), (b'{"lang": "en", "score": true}', "score"),
    (b'{"lang": "en", "score": 0.9, "top": {}}', "top"),
    (b'{"lang": "en", "score": 0.9, "top": [{"lang": "en"}]}', "top"),
    (b'{"lang": "en", "score": 0.9, "top": [7]}', "top"),
    (b"{" + b'"a": 1,' * 10000 + b'"lang": "en", "score": 0.9}', "bytes"),
])
async def test_malformed_lid_answer_is_unavailable(
    nursery: trio.Nursery, body: bytes, problem: str
) -> None:
    port = await _raw_server(nursery, Answer(body=body))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    with pytest.raises(AsrUnavailable, match=f"malformed answer.*{problem}"):
        await pools.lid("default", b"\0\0" * 160)


@pytest.mark.parametrize("bad", [Answer(body=b'{"lang": 7}'), Answer("401", body=b"no"),
                                 Answer("500", body=b"oops")])
async def test_lid_goes_on_to_the_next_endpoint(nursery: trio.Nursery, bad: Answer) -> None:
    """An endpoint that refuses or answers garbage is not asked again; the next is."""
    bad_port = await _raw_server(nursery, bad)
    _, good, _ = await start_asr(nursery, StandInEngine(lid=("nl", 0.8)))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{bad_port}",
                                               f"http://127.0.0.1:{good}")})
    for _ in range(2):  # round-robin: each endpoint comes first once
        answer = await pools.lid("default", b"\0\0" * 16000)
        assert (answer["lang"], answer["score"]) == ("nl", pytest.approx(0.8))


async def test_good_lid_answer_is_normalised(nursery: trio.Nursery) -> None:
    body = b'{"lang": "en", "score": 1, "top": [{"lang": "en", "score": 1, "x": 2}]}'
    port = await _raw_server(nursery, Answer(body=body))
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    answer = await pools.lid("default", b"\0\0" * 160)
    assert answer == {"lang": "en", "score": 1.0, "top": [{"lang": "en", "score": 1.0}]}


def _transcript(body: bytes) -> tuple[bytes, bytes]:
    """What an ASR peer sends: its preface (SETTINGS), and its whole answer to the
    first request (SETTINGS ACK, HEADERS 200, ``body`` in DATA frames, END_STREAM)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "a"),
                            (":path", "/v1/recognize")])
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    preface = server.data_to_send()
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200"), ("content-type", link.CONTENT_TYPE)])
    for i in range(0, len(body), 16384):
        server.send_data(1, body[i:i + 16384])
    server.end_stream(1)
    return preface, server.data_to_send()


BODY = link.encode_many(list(EVENTS))
PREFACE, RESPONSE = _transcript(BODY)
# Spliced into the link body: what a hostile peer would try on a JSON/length codec.
NASTY = [b"[" * 3000, b"1e999", b"-1", b"NaN", b"\xff\xfe", b'"ts":[5,1],', b"null",
         b'"lang":"<b>",', b"\x81\xff\xff\xff\x7f", b"\x81\x00\x00\x00\x00", b"{}" * 50]


@st.composite
def _mutation(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "splice", "delete", "truncate"]))
        # From either end: hypothesis favours small integers.
        i = draw(st.integers(0, max(len(out) - 1, 0)))
        at = i if draw(st.booleans()) else max(len(out) - 1 - i, 0)
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[at] = draw(st.integers(0, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif op == "splice":
            out[at:at] = draw(st.sampled_from(NASTY))
        elif op == "delete":
            del out[at:at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del out[at:]
    return bytes(out)


async def _mutant_server(nursery: trio.Nursery, preface: bytes, response: bytes) -> int:
    """Send ``preface``; at the first request, ``response``; then read (and ignore:
    no PING is answered) until the client goes."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        answered = False
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(preface)
            while data := await stream.receive_some(65536):
                if answered:
                    continue
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                if any(isinstance(ev, h2.events.RequestReceived) for ev in events):
                    await stream.send_all(response)
                    answered = True
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    return int(listeners[0].socket.getsockname()[1])


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), part=st.sampled_from(["preface", "http2", "link", "link", "all"]))
def test_fuzzed_peer_never_crashes_the_client(data: st.DataObject, part: str) -> None:
    """Mutated bytes from the peer (flipped, replaced, inserted, spliced, deleted, cut)
    in its HTTP/2 framing or in the link frames it carries give either events or
    AsrUnavailable, within a bound; never another exception."""
    preface, response = PREFACE, RESPONSE
    if part in ("link", "all"):
        preface, response = _transcript(data.draw(_mutation(BODY)))
    if part in ("preface", "all"):
        preface = data.draw(_mutation(preface))
    if part in ("http2", "all"):
        response = data.draw(_mutation(response))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _mutant_server(nursery, preface, response)
            # A peer that stops sending mid-answer is caught by the unanswered PINGs.
            pools = AsrPools({"default": (f"http://127.0.0.1:{port}",)},
                             connect_timeout_s=0.3, ping_interval_s=0.05,
                             ping_timeout_s=0.2)
            await nursery.start(pools.run)
            with trio.fail_after(5):
                try:
                    stream = await pools.open(
                        "default", link.Start(flow_id="x", codec="pcm"), codec="pcm",
                        bitrate=20000)
                    async for ev in stream.events():
                        assert isinstance(ev, link.AsrEvent)
                    await stream.aclose()
                except AsrUnavailable:
                    pass
            nursery.cancel_scope.cancel()

    trio.run(main)


class _Kinds(StandInEngine):
    """Also records every job's kind and audio length (samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[tuple[str, int]] = []

    def run_batch(self, pool: str, jobs: Any) -> Any:
        self.jobs += [(j.kind, len(j.audio)) for j in jobs]
        return super().run_batch(pool, jobs)


async def _false_start_then_speech(pools: AsrPools) -> list[link.AsrEvent]:
    """A tentative utterance of 0.6 s withdrawn, then one of 1 s finalized."""
    channel = AsrChannel(pools, "default", link.Start(flow_id="fs", codec="pcm"), codec="pcm",
                         bitrate=20000)
    async with trio.open_nursery() as n:
        await n.start(channel.run)
        channel.begin(0, tentative=True)
        await channel.send_audio(FRAMES[:5])
        with trio.fail_after(5):  # the first audio opens the stream; the rest goes on it
            while channel._stream is None or channel._recovering:
                await trio.sleep(0.01)
        for j in range(5, 30, 5):
            await channel.send_audio(FRAMES[j:j + 5])
        await channel.cancel()
        channel.begin(0)
        for j in range(30, 80, 5):
            await channel.send_audio(FRAMES[j:j + 5])
        await channel.finalize()
        await channel.end()
        with trio.fail_after(10):
            events = [ev async for ev in channel.events()]
        n.cancel_scope.cancel()
    return events


async def test_channel_withdraws_a_false_start_with_discard_on_v3(nursery: trio.Nursery
                                                                   ) -> None:
    engine = _Kinds()
    app, port, _ = await start_asr(nursery, engine)
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    events = await _false_start_then_speech(pools)
    finals = [e for e in events if e.type == "final"]
    assert [(f.utterance, f.text[:5]) for f in finals] == [(0, "1.00s")], events
    assert [k for k, _ in engine.jobs].count("final") == 1  # none for the false start
    assert (pools.counters.discards, pools.counters.discards_by_finalize) == (1, 0)
    assert "asr_discarded_utterances_total 1.0" in app.metrics.render().decode()


async def test_channel_against_a_v2_service_finalizes_the_false_start_and_drops_it(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A v2 service answers v2 to our v3 request (it knows no v3 content type) and
    would refuse Discard: the channel falls back to Finalize and drops that final."""
    import asr.server
    monkeypatch.setattr(asr.server, "_content_type", lambda scope: link.CONTENT_TYPES[2])
    engine = _Kinds()
    app, port, _ = await start_asr(nursery, engine)
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    events = await _false_start_then_speech(pools)
    finals = [e for e in events if e.type == "final"]
    assert [(f.utterance, f.text[:5]) for f in finals] == [(0, "1.00s")], events
    assert not any(e.type == "error" for e in events)
    assert [k for k, _ in engine.jobs].count("final") == 2  # the false start's, wasted
    assert (pools.counters.discards, pools.counters.discards_by_finalize) == (0, 1)
    assert "asr_discarded_utterances_total 0.0" in app.metrics.render().decode()


async def _speech_pause_finalize(pools: AsrPools) -> list[link.AsrEvent]:
    """1 s of an utterance, a pause hinted, then its Finalize 0.3 s later."""
    channel = AsrChannel(pools, "default", link.Start(flow_id="pz", codec="pcm"), codec="pcm",
                         bitrate=20000)
    async with trio.open_nursery() as n:
        await n.start(channel.run)
        channel.begin(0)
        await channel.send_audio(FRAMES[:5])
        with trio.fail_after(5):  # the first audio opens the stream; the rest goes on it
            while channel._stream is None or channel._recovering:
                await trio.sleep(0.01)
        for j in range(5, 50, 5):
            await channel.send_audio(FRAMES[j:j + 5])
        await channel.pause()
        await trio.sleep(0.3)
        await channel.finalize()
        await channel.end()
        with trio.fail_after(10):
            events = [ev async for ev in channel.events()]
        n.cancel_scope.cancel()
    return events


@pytest.mark.parametrize("version", [3, 4])
async def test_channel_hints_a_pause_only_on_v4(nursery: trio.Nursery,
                                                monkeypatch: pytest.MonkeyPatch,
                                                version: int) -> None:
    """On a v4 stream the pause starts the final's decode (the service's own gap timer
    is set out of reach); a v3 service (which would refuse the frame) gets nothing."""
    import asr.server
    monkeypatch.setattr(asr.server, "_content_type",
                        lambda scope: link.CONTENT_TYPES[version])
    engine = _Kinds()
    app, port, _ = await start_asr(nursery, engine, speculative_final_ms=10_000)
    pools = await _pools(nursery, {"default": (f"http://127.0.0.1:{port}",)})
    events = await _speech_pause_finalize(pools)
    finals = [e for e in events if e.type == "final"]
    assert [(f.utterance, f.text[:5]) for f in finals] == [(0, "1.00s")], events
    assert not any(e.type == "error" for e in events)
    assert pools.counters.pauses == (1 if version == 4 else 0)
    text = app.metrics.render().decode()
    assert f"asr_pause_hints_total {float(version == 4)}" in text
    assert f'asr_speculative_finals_total{{outcome="used"}} {float(version == 4)}' in text
