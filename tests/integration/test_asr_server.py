"""ASR service over real HTTP/2 sockets, with a stand-in engine.

These tests pin the shell: link v1 on the wire, admission, errors, and each hypercorn
pitfall (concurrent stream limit, keep_alive_max_requests, keep-alive timeout, a stream
whose peer stops reading, a stream reset mid-way, hypercorn #329). Recognition quality is
tested with the real engine elsewhere.
"""

from __future__ import annotations

import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from asr import link
from asr.server import AsrApp
from gateway.h2client import H2ClientError, connect
from tests import speech
from tests.linkclient import audio_frames, open_recognize, opus_packets
from tests.standin import StandInEngine
from tests.standin import start_asr as _start_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[tuple[AsrApp, int]]:
    app, port, shutdown = await _start_server(nursery, StandInEngine(), body_drain_s=1.0)
    yield app, port
    shutdown.set()


GOFORWARD = speech.goforward()


async def test_partials_before_body_ends_then_final_and_end(server: tuple[AsrApp, int]
                                                             ) -> None:
    _app, port = server
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="f1"))
        assert await ls.stream.response() == 200
        packets = opus_packets(GOFORWARD)
        frames = audio_frames(packets, first_pts_ms=1000)
        half = len(frames) // 2
        await ls.send(*frames[:half])
        partial = await ls.until("partial")  # the body is still open
        assert partial.flow_id == "f1" and partial.utterance == 0
        assert partial.ts[0] == 1000
        await ls.send(*frames[half:], link.Finalize())
        final = await ls.until("final")
        assert final.ts == (1000, 1000 + 20 * len(frames))
        assert final.text.startswith(f"{len(frames) * 320 / 16000:.2f}s")
        await ls.send(link.End())
        await ls.stream.end()
        events = await ls.rest()
    assert events[-1].type == "end"
    assert [e.type for e in events].count("final") == 1
    assert all(e.type in ("partial", "final", "end") for e in events)


async def test_two_utterances_and_pcm_fallback(server: tuple[AsrApp, int]) -> None:
    _, port = server
    pcm = [GOFORWARD[i:i + 320].tobytes() for i in range(0, 320 * 100, 320)]
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="f2", codec="pcm"))
        await ls.send(*audio_frames(pcm[:50]), link.Finalize())
        await ls.send(*audio_frames(pcm[50:], first_seq=50, first_pts_ms=3000), link.End())
        await ls.stream.end()
        events = await ls.rest()
    finals = [e for e in events if e.type == "final"]
    assert [(f.utterance, f.ts) for f in finals] == [(0, (0, 1000)), (1, (3000, 4000))]
    assert finals[0].text.startswith("1.00s")


async def test_sixteen_concurrent_streams_on_one_connection(server: tuple[AsrApp, int]
                                                            ) -> None:
    _, port = server
    packets = opus_packets(GOFORWARD)
    finals: dict[str, link.AsrEvent] = {}

    async def one(conn: object, i: int) -> None:
        ls = await open_recognize(conn, link.Start(flow_id=f"s{i}"))  # type: ignore[arg-type]
        await ls.send(*audio_frames(packets), link.End())
        await ls.stream.end()
        finals[f"s{i}"] = next(e for e in await ls.rest() if e.type == "final")

    async with connect("127.0.0.1", port) as conn, trio.open_nursery() as n:
        for i in range(16):
            n.start_soon(one, conn, i)
    assert len(finals) == 16
    assert len({f.text for f in finals.values()}) == 1


async def test_busy_at_capacity_gets_503_with_retry_after(nursery: trio.Nursery) -> None:
    _app, port, shutdown = await _start_server(nursery, StandInEngine(), max_streams=2)
    async with connect("127.0.0.1", port) as conn:
        a = await open_recognize(conn, link.Start(flow_id="a"))
        b = await open_recognize(conn, link.Start(flow_id="b"))
        assert await a.stream.response() == 200 and await b.stream.response() == 200
        c = await open_recognize(conn, link.Start(flow_id="c"))
        assert await c.stream.response() == 503
        assert c.stream.headers["retry-after"] == "1"
        for ls in (a, b):
            await ls.send(link.End())
            await ls.stream.end()
            assert (await ls.rest())[-1].type == "end"
        text = (await _get(port, "/metrics")).text
        assert "asr_busy_rejections_total 1.0" in text
    shutdown.set()


async def _get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return await client.get(path)


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("<BI", kind, len(payload)) + payload


START = link.encode(link.Start(flow_id="bad"))


@pytest.mark.parametrize(
    ("body", "code", "fatal"),
    [
        (START + b"\x02\x40\x00", "TRUNCATED", True),
        (START + _frame(0x7E, b""), "UNKNOWN_FRAME", True),
        (START + struct.pack("<BI", 2, 10**6), "FRAME_TOO_LARGE", True),
        (START + link.encode(link.Audio(0, 0, b"\xff\xfe\xfd" * 40)), "BAD_AUDIO", False),
        (link.encode(link.Audio(0, 0, b"x")), "NO_START", True),
        (START + START, "DUPLICATE_START", False),
        (_frame(1, b'{"flow_id":"x","sr":8000}'), "BAD_START", True),
        (_frame(1, b"not json"), "BAD_START", True),
        (link.encode(link.Start(flow_id="x", domain="medical")), "BAD_START", True),
    ],
)
async def test_bad_frames_get_error_events_and_server_stays_up(
    server: tuple[AsrApp, int], body: bytes, code: str, fatal: bool
) -> None:
    _, port = server
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn)
        await ls.send_raw(body)
        await ls.stream.end()
        events = await ls.rest()
    errors = [e for e in events if e.type == "error"]
    assert errors and errors[0].code == code and errors[0].fatal is fatal
    assert events[-1].type == "end"
    assert (await _get(port, "/healthz")).status_code == 200


async def test_opus_garbage_keeps_the_audio_around_it(server: tuple[AsrApp, int]) -> None:
    _, port = server
    packets = opus_packets(GOFORWARD[:16000])  # 50 packets
    frames = audio_frames(packets)
    frames[10] = link.Audio(10, 200, b"\xff\xfe\xfd" * 40)
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="g"))
        await ls.send(*frames, link.End())
        await ls.stream.end()
        events = await ls.rest()
    (final,) = [e for e in events if e.type == "final"]
    assert final.text.startswith("1.00s")  # the bad packet was concealed, not dropped


async def test_lost_packets_are_concealed_and_duplicates_dropped(
    server: tuple[AsrApp, int]
) -> None:
    _, port = server
    frames = audio_frames(opus_packets(GOFORWARD[:16000]))
    sent = frames[:20] + frames[22:] + frames[30:35]  # two lost, five duplicated
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="l"))
        await ls.send(*sent, link.End())
        await ls.stream.end()
        (final,) = [e for e in await ls.rest() if e.type == "final"]
    assert final.text.startswith("1.00s")
    metrics = (await _get(port, "/metrics")).text
    assert "asr_concealed_packets_total 2.0" in metrics


async def test_reset_mid_stream_leaves_the_others_alone(server: tuple[AsrApp, int]) -> None:
    app, port = server
    packets = opus_packets(GOFORWARD)
    async with connect("127.0.0.1", port) as conn:
        streams = [await open_recognize(conn, link.Start(flow_id=f"r{i}")) for i in range(3)]
        for ls in streams:
            await ls.send(*audio_frames(packets[:40]))
        await streams[1].stream.reset()
        for ls in (streams[0], streams[2]):
            await ls.send(*audio_frames(packets[40:], first_seq=40, first_pts_ms=800),
                          link.End())
            await ls.stream.end()
            assert [e.type for e in await ls.rest()][-2:] == ["final", "end"]
    with trio.fail_after(5):  # the reset stream's session is gone on the server too
        while app.active:
            await trio.sleep(0.02)


async def test_a_stream_whose_client_stops_reading_does_not_stall_the_others(
    nursery: trio.Nursery,
) -> None:
    _app, port, shutdown = await _start_server(nursery, StandInEngine(), body_drain_s=0.2,
                                              stream_events=16)
    garbage = [link.Audio(i, 20 * i, b"\xff\xfe\xfd" * 40) for i in range(3000)]
    async with connect("127.0.0.1", port) as conn:
        stalled = await open_recognize(conn, link.Start(flow_id="stalled"))
        # 3000 error events (~0.4 MB) toward a client that never reads them: the server
        # must drop this stream, not block the connection.
        await stalled.send(*garbage[:1500])
        t0 = time.perf_counter()
        ok = await open_recognize(conn, link.Start(flow_id="ok"))
        await ok.send(*audio_frames(opus_packets(GOFORWARD[:16000])), link.End())
        await ok.stream.end()
        events = await ok.rest()
        assert events[-1].type == "end" and time.perf_counter() - t0 < 5
        await stalled.stream.reset()
    shutdown.set()


async def test_response_ending_while_client_still_sends_does_not_kill_the_server(
    nursery: trio.Nursery,
) -> None:
    """hypercorn #329: DATA on a stream whose response is complete."""
    _app, port, shutdown = await _start_server(nursery, StandInEngine(), body_drain_s=0.05)
    packets = opus_packets(GOFORWARD)
    async with connect("127.0.0.1", port) as conn:
        other = await open_recognize(conn, link.Start(flow_id="other"))
        doomed = await open_recognize(conn)
        await doomed.send_raw(_frame(1, b"{}"))  # fatal BAD_START: the server ends it
        events = await doomed.rest()
        assert events[-1].type == "end"
        for _ in range(20):  # ...while this client keeps sending on it
            try:
                await doomed.send(*audio_frames(packets[:10]))
            except H2ClientError:
                break
            await trio.sleep(0.01)
        await other.send(*audio_frames(packets), link.End())
        await other.stream.end()
        assert [e.type for e in await other.rest()][-2:] == ["final", "end"]
    assert (await _get(port, "/healthz")).status_code == 200
    shutdown.set()


async def test_more_requests_than_keep_alive_max_requests_default(server: tuple[AsrApp, int]
                                                                  ) -> None:
    """hypercorn's default closes a connection after 1000 requests, in-flight or not."""
    _, port = server
    async with connect("127.0.0.1", port) as conn:
        long = await open_recognize(conn, link.Start(flow_id="long"))
        for _ in range(1050):
            s = await conn.open_stream("GET", "/healthz", end_stream=True)
            assert await s.response() == 200
            await s.receive()
        await long.send(*audio_frames(opus_packets(GOFORWARD[:8000])), link.End())
        await long.stream.end()
        assert (await long.rest())[-1].type == "end"


async def test_quiet_stream_outlives_keep_alive_timeout(nursery: trio.Nursery) -> None:
    _app, port, shutdown = await _start_server(nursery, StandInEngine(),
                                              keep_alive_timeout_s=0.5)
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="quiet"))
        await ls.send(*audio_frames(opus_packets(GOFORWARD[:8000])))
        await trio.sleep(1.5)  # a pause in speech longer than the keep-alive timeout
        await ls.send(link.End())
        await ls.stream.end()
        assert [e.type for e in await ls.rest()][-2:] == ["final", "end"]
    shutdown.set()


async def test_concurrent_stream_limit_is_advertised_and_respected(nursery: trio.Nursery
                                                                   ) -> None:
    _app, port, shutdown = await _start_server(nursery, StandInEngine(),
                                              h2_max_concurrent_streams=4)
    async with connect("127.0.0.1", port) as conn:
        streams = [await open_recognize(conn, link.Start(flow_id=f"c{i}")) for i in range(4)]
        assert conn.max_streams == 4
        with trio.move_on_after(0.3) as waited:
            await conn.open_stream("GET", "/healthz", end_stream=True)
        assert waited.cancelled_caught  # the fifth waits for a free slot
        for ls in streams:
            await ls.send(link.End())
            await ls.stream.end()
            await ls.rest()
        s = await conn.open_stream("GET", "/healthz", end_stream=True)
        assert await s.response() == 200
    shutdown.set()


async def test_graceful_shutdown_drains_streams_with_finals(nursery: trio.Nursery) -> None:
    _app, port, shutdown = await _start_server(nursery, StandInEngine(), body_drain_s=0.2)
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="drain"))
        await ls.send(*audio_frames(opus_packets(GOFORWARD[:16000])))
        await trio.sleep(0.2)
        shutdown.set()
        events = await ls.rest()
    assert [e.type for e in events][-2:] == ["final", "end"]


async def test_probes_lid_and_metrics(server: tuple[AsrApp, int]) -> None:
    _, port = server
    assert (await _get(port, "/healthz")).json() == {"status": "ok"}
    assert (await _get(port, "/readyz")).json() == {"ready": True}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.post("/v1/lid", content=GOFORWARD[:16000].tobytes())
        assert r.status_code == 200 and r.json()["lang"] == "en"
        assert (await client.post("/v1/lid", content=b"abc")).status_code == 400
    text = (await _get(port, "/metrics")).text
    for name in ("asr_rtf", "asr_latency_ms_bucket", "asr_inflight_sessions",
                 "asr_queue_depth", "asr_busy_rejections_total",
                 "asr_opus_decode_errors_total"):
        assert name in text


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


async def test_tls_with_alpn_h2(nursery: trio.Nursery, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    _app, port, shutdown = await _start_server(nursery, StandInEngine(), certfile=str(cert),
                                              keyfile=str(key))
    ctx = ssl.create_default_context(cafile=str(cert))
    async with connect("127.0.0.1", port, ssl_context=ctx) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="tls"))
        await ls.send(*audio_frames(opus_packets(GOFORWARD[:8000])), link.End())
        await ls.stream.end()
        assert [e.type for e in await ls.rest()][-2:] == ["final", "end"]
    shutdown.set()


# -- finals cut at Finalize, Start validation, flow events, health (issue 10) -----------


async def _utterances_at_once(ls: object, spans: list[tuple[int, int]]) -> None:
    """Send each (pts_ms, samples) utterance followed by its Finalize, then End, in one
    write: far faster than the engine answers."""
    frames: list[link.Frame] = []
    seq = 0
    for pts, n in spans:
        packets = opus_packets(GOFORWARD[:n])
        frames += audio_frames(packets, first_seq=seq, first_pts_ms=pts)
        frames.append(link.Finalize())
        seq += len(packets)
    frames.append(link.End())
    await ls.send(*frames)  # type: ignore[attr-defined]
    await ls.stream.end()  # type: ignore[attr-defined]


async def test_each_finalize_cuts_its_own_final_however_far_behind_the_engine_is(
        nursery: trio.Nursery) -> None:
    engine = StandInEngine(delay_s=0.3)  # every batch takes longer than sending it all
    _app, port, shutdown = await _start_server(nursery, engine, body_drain_s=1.0)
    spans = [(0, 16000), (5000, 9600), (9000, 24000)]  # 1 s, 0.6 s, 1.5 s
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="fast"))
        await _utterances_at_once(ls, spans)
        events = await ls.rest()
    finals = [e for e in events if e.type == "final"]
    assert [f.utterance for f in finals] == [0, 1, 2]
    assert [f.ts for f in finals] == [(0, 1000), (5000, 5600), (9000, 10500)]
    assert [f.text.split()[0] for f in finals] == ["1.00s", "0.60s", "1.50s"]
    assert events[-1].type == "end"
    shutdown.set()


async def test_unsupported_language_gets_a_coded_error_and_spares_other_streams(
        server: tuple[AsrApp, int]) -> None:
    _, port = server
    async with connect("127.0.0.1", port) as conn:
        good = await open_recognize(conn, link.Start(flow_id="good", lang_hint="en-US"))
        bad = [await open_recognize(conn, link.Start(flow_id=f"bad{i}", lang_hint=hint))
               for i, hint in enumerate(("xx", "e$", "english"))]
        for ls in bad:
            await ls.send(*audio_frames(opus_packets(GOFORWARD[:8000])), link.End())
            await ls.stream.end()
            events = await ls.rest()
            assert [e.type for e in events] == ["error", "end"]
            assert events[0].code == "UNSUPPORTED_LANGUAGE" and events[0].fatal
        await good.send(*audio_frames(opus_packets(GOFORWARD[:8000])), link.End())
        await good.stream.end()
        final = await good.until("final")
        assert final.lang == "en"  # "en-US" was normalised before it reached the engine
        assert final.text.startswith("0.50s")


async def test_flow_behind_then_ok_on_v2_and_nothing_on_v1(nursery: trio.Nursery) -> None:
    engine = StandInEngine(delay_s=0.25)
    _app, port, shutdown = await _start_server(nursery, engine, body_drain_s=1.0,
                                               behind_threshold_s=2.0)
    spans = [(i * 2000, 16000) for i in range(5)]  # 5 s of speech, sent at once
    async with connect("127.0.0.1", port) as conn:
        v2 = await open_recognize(conn, link.Start(flow_id="v2"))
        v1_stream = await conn.open_stream(
            "POST", "/v1/recognize", [("content-type", link.CONTENT_TYPES[1])])
        from tests.linkclient import LinkStream
        v1 = LinkStream(v1_stream)
        await v1.send(link.Start(flow_id="v1", version=1))
        assert await v1.stream.response() == 200
        assert v1.stream.headers["content-type"] == link.CONTENT_TYPES[1]
        assert await v2.stream.response() == 200
        assert v2.stream.headers["content-type"] == link.CONTENT_TYPE
        await _utterances_at_once(v2, spans)
        await _utterances_at_once(v1, spans)
        ev2, ev1 = await v2.rest(), await v1.rest()
    flows = [(e.code, i) for i, e in enumerate(ev2) if e.type == "flow"]
    assert [c for c, _ in flows] == ["BEHIND", "OK"], ev2
    finals_before_ok = sum(1 for e in ev2[:flows[1][1]] if e.type == "final")
    assert flows[0][1] == 0 and finals_before_ok >= 3  # behind at once; OK below 1 s left
    assert "2 s" in ev2[0].message
    assert not any(e.type == "flow" for e in ev1)
    assert [e.type for e in ev1].count("final") == 5
    shutdown.set()


async def test_healthz_reports_the_backends_worker_health(nursery: trio.Nursery) -> None:
    from tests.standin import WorkerStandIn
    engine = WorkerStandIn()
    _app, port, shutdown = await _start_server(nursery, engine)
    r = await _get(port, "/healthz")
    assert r.status_code == 200
    assert r.json() == {"ok": True, "workers": 2, "restarts": 0, "status": "ok"}
    engine.health_report = {"ok": False, "workers": 1, "hung": [0]}
    r = await _get(port, "/healthz")
    assert r.status_code == 503
    assert r.json() == {"ok": False, "workers": 1, "hung": [0], "status": "unhealthy"}

    def broken() -> dict[str, object]:
        raise RuntimeError("pipe closed")

    engine.health = broken  # type: ignore[method-assign]
    r = await _get(port, "/healthz")
    assert r.status_code == 503 and "pipe closed" in r.json()["error"]
    shutdown.set()


async def test_lid_requests_past_the_bound_get_busy(nursery: trio.Nursery) -> None:
    engine = StandInEngine(lid_delay_s=0.5)
    _app, port, shutdown = await _start_server(nursery, engine, lid_max_inflight=1)
    codes: list[int] = []

    async def ask() -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.post("/v1/lid", content=GOFORWARD[:16000].tobytes())
            codes.append(r.status_code)
            if r.status_code == 503:
                assert r.json() == {"error": "BUSY"} and r.headers["retry-after"] == "1"

    async with trio.open_nursery() as inner:
        inner.start_soon(ask)
        await trio.sleep(0.2)
        inner.start_soon(ask)
    assert sorted(codes) == [200, 503]
    async with trio.open_nursery() as inner:  # the slot is free again
        inner.start_soon(ask)
    assert codes[-1] == 200
    shutdown.set()


async def test_more_finalizes_than_the_cut_queue_holds_still_end_the_stream(
        server: tuple[AsrApp, int]) -> None:
    _, port = server
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="flood"))
        await ls.send(*audio_frames(opus_packets(GOFORWARD[:3200])),
                      *[link.Finalize()] * 1100, link.End())
        await ls.stream.end()
        with trio.fail_after(10):
            events = await ls.rest()
    errors = [e for e in events if e.type == "error"]
    assert [(e.code, e.fatal) for e in errors] == [("BUSY", True)]
    assert [e.type for e in events].count("final") == 1  # the audio before the flood
    assert events[-1].type == "end"


async def test_under_load_every_utterance_gets_a_partial_before_its_final(
        nursery: trio.Nursery) -> None:
    """Six real-time streams ask for a partial every 250 ms; the engine can run about
    three partials per stream per second besides the finals. The partial cadence
    stretches, but no utterance ends without one, and first partials come quickly."""
    engine = StandInEngine(job_delay_s=0.06)
    _app, port, shutdown = await _start_server(nursery, engine, body_drain_s=1.0)
    streams: list[list[link.AsrEvent]] = []
    first_audio: dict[tuple[int, int], float] = {}
    first_partial_ms: list[float] = []

    async def one(conn: object, i: int) -> None:
        ls = await open_recognize(conn, link.Start(flow_id=f"load{i}"))  # type: ignore[arg-type]
        packets = opus_packets(GOFORWARD[:19200])  # 1.2 s
        t0, sent, seq = trio.current_time() + 0.07 * i, 0.0, 0
        async with trio.open_nursery() as reading:
            reading.start_soon(ls.rest)  # stamps each event as it arrives
            await trio.sleep_until(t0)
            for u in range(3):
                first_audio[(i, u)] = time.perf_counter()
                for k in range(0, len(packets), 5):  # 100 ms a write, in real time
                    await ls.send(*audio_frames(packets[k:k + 5], first_seq=seq,
                                                first_pts_ms=u * 2000 + 20 * k))
                    seq += len(packets[k:k + 5])
                    sent += 0.1
                    await trio.sleep_until(t0 + sent)
                await ls.send(link.Finalize())
            await ls.send(link.End())
            await ls.stream.end()
        events = ls.events
        for ev, at in zip(ls.events, ls.times, strict=True):
            if ev.type == "partial" and not any(
                    e.type == "partial" and e.utterance == ev.utterance
                    for e in ls.events[:ls.events.index(ev)]):
                first_partial_ms.append(1000 * (at - first_audio[(i, ev.utterance)]))
        streams.append(events)

    async with connect("127.0.0.1", port) as conn, trio.open_nursery() as inner:
        for i in range(6):
            inner.start_soon(one, conn, i)
    assert len(streams) == 6
    for events in streams:
        finals = [e for e in events if e.type == "final"]
        assert [f.utterance for f in finals] == [0, 1, 2]
        for f in finals:
            before = events[:events.index(f)]
            assert any(e.type == "partial" and e.utterance == f.utterance for e in before), \
                [(e.type, e.utterance) for e in events]
    assert len(first_partial_ms) == 18
    # min_partial_ms (300) of audio, then a job or two of 60 ms: well under 1 s
    assert sorted(first_partial_ms)[len(first_partial_ms) // 2] < 700, first_partial_ms
    shutdown.set()


class _JobLog(StandInEngine):
    """Also records every job's kind and audio length (samples)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.jobs: list[tuple[str, int]] = []

    def run_batch(self, pool: str, jobs: Any) -> Any:
        self.jobs += [(j.kind, len(j.audio)) for j in jobs]
        return super().run_batch(pool, jobs)


async def test_v3_discard_drops_the_utterance_without_a_final(nursery: trio.Nursery) -> None:
    engine = _JobLog()
    _app, port, shutdown = await _start_server(nursery, engine, body_drain_s=1.0)
    pcm = [GOFORWARD[i:i + 320].tobytes() for i in range(0, 320 * 100, 320)]
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="d3", codec="pcm"))
        assert await ls.stream.response() == 200
        assert ls.stream.headers["content-type"] == link.CONTENT_TYPE  # v4: Discard too
        # A false start of 0.6 s, withdrawn; a Discard naming another utterance and
        # one with nothing open change nothing.
        await ls.send(*audio_frames(pcm[:30]), link.Discard(0), link.Discard(0),
                      link.Discard())
        await ls.send(*audio_frames(pcm[30:80], first_seq=30, first_pts_ms=2000),
                      link.Discard(7), link.Finalize(), link.End())
        await ls.stream.end()
        events = await ls.rest()
    finals = [e for e in events if e.type == "final"]
    # Its index is used up, as a Finalize would: the next utterance is 1.
    assert [(f.utterance, f.ts) for f in finals] == [(1, (2000, 3000))], events
    assert finals[0].text.startswith("1.00s")
    assert not any(e.type == "error" for e in events)
    assert ("final", 30 * 320) not in engine.jobs
    assert [k for k, _ in engine.jobs].count("final") == 1
    metrics = (await _get(port, "/metrics")).text
    assert "asr_discarded_utterances_total 1.0" in metrics
    shutdown.set()


async def test_discard_on_a_v2_stream_is_an_unknown_frame(server: tuple[AsrApp, int]
                                                          ) -> None:
    _, port = server
    async with connect("127.0.0.1", port) as conn:
        stream = await conn.open_stream(
            "POST", "/v1/recognize", [("content-type", link.CONTENT_TYPES[2])])
        from tests.linkclient import LinkStream
        ls = LinkStream(stream)
        await ls.send(link.Start(flow_id="d2", codec="pcm"))
        assert await ls.stream.response() == 200
        assert ls.stream.headers["content-type"] == link.CONTENT_TYPES[2]
        await ls.send(*audio_frames([GOFORWARD[:320].tobytes()] * 10), link.Discard())
        events = await ls.rest()
    errors = [e for e in events if e.type == "error"]
    assert [(e.code, e.fatal) for e in errors] == [("UNKNOWN_FRAME", True)]
    assert events[-1].type == "end"


class _GatedPartials(StandInEngine):
    """Partials wait in the engine until the test lets them go (``release``);
    ``running`` is set while one waits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import threading
        self.running = threading.Event()
        self.release = threading.Event()

    def run_batch(self, pool: str, jobs: Any) -> Any:
        if any(j.kind == "partial" for j in jobs):
            self.running.set()
            self.release.wait(10)
        return super().run_batch(pool, jobs)


async def _cut_while_partial_runs(nursery: trio.Nursery, cut: link.Frame
                                  ) -> list[link.AsrEvent]:
    """One utterance of 1 s; ``cut`` (Finalize or Discard) arrives while its partial runs."""
    engine = _GatedPartials()
    _app, port, shutdown = await _start_server(nursery, engine, body_drain_s=1.0)
    pcm = [GOFORWARD[i:i + 320].tobytes() for i in range(0, 320 * 50, 320)]
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="cut", codec="pcm"))
        await ls.send(*audio_frames(pcm))
        with trio.fail_after(5):
            while not engine.running.is_set():
                await trio.sleep(0.01)
        await ls.send(cut)
        await trio.sleep(0.2)  # the cut is in before the partial returns
        engine.release.set()
        await ls.send(link.End())
        await ls.stream.end()
        events = await ls.rest()
    shutdown.set()
    return events


async def test_a_partial_of_an_utterance_cut_while_it_ran_still_comes_before_its_final(
        nursery: trio.Nursery) -> None:
    events = await _cut_while_partial_runs(nursery, link.Finalize())
    kinds = [(e.type, e.utterance) for e in events]
    assert kinds[:2] == [("partial", 0), ("final", 0)], kinds
    partial, final = events[0], events[1]
    assert partial.ts[0] == final.ts[0] and partial.ts[1] <= final.ts[1]
    assert not any(e.type == "partial" for e in events[2:]), kinds


async def test_a_partial_of_a_discarded_utterance_is_never_sent(nursery: trio.Nursery
                                                                ) -> None:
    events = await _cut_while_partial_runs(nursery, link.Discard())
    assert [e.type for e in events] == ["end"], events


def _spec_metric(text: str, outcome: str) -> float:
    line = f'asr_speculative_finals_total{{outcome="{outcome}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


async def _pause_then(nursery: trio.Nursery, more: int, **cfg: Any
                      ) -> tuple[_JobLog, list[link.AsrEvent], str]:
    """1 s of audio, a 0.5 s pause, ``more`` frames, then Finalize and End."""
    engine = _JobLog(job_delay_s=0.02)
    _app, port, shutdown = await _start_server(nursery, engine, body_drain_s=1.0, **cfg)
    pcm = [GOFORWARD[i:i + 320].tobytes() for i in range(0, 320 * 100, 320)]
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="sp", codec="pcm"))
        assert await ls.stream.response() == 200
        await ls.send(*audio_frames(pcm[:50]))
        await trio.sleep(0.5)  # a pause: nothing arrives
        if more:
            await ls.send(*audio_frames(pcm[50:50 + more], first_seq=50, first_pts_ms=1000))
        await ls.send(link.Finalize(), link.End())
        await ls.stream.end()
        events = await ls.rest()
        metrics = (await _get(port, "/metrics")).text
    shutdown.set()
    return engine, events, metrics


async def test_a_pause_decodes_the_final_early_and_the_finalize_takes_it(
        nursery: trio.Nursery) -> None:
    engine, events, metrics = await _pause_then(nursery, 0)
    finals = [e for e in events if e.type == "final"]
    assert [(f.utterance, f.ts) for f in finals] == [(0, (0, 1000))]
    assert finals[0].text.startswith("1.00s")
    # One decode of the final's audio, during the pause; none after the Finalize.
    assert [n for k, n in engine.jobs if k == "final"] == [50 * 320]
    assert _spec_metric(metrics, "used") == 1
    assert _spec_metric(metrics, "wasted") == 0


async def test_speech_after_the_pause_makes_the_final_cover_all_of_it(
        nursery: trio.Nursery) -> None:
    engine, events, metrics = await _pause_then(nursery, 25)
    finals = [e for e in events if e.type == "final"]
    assert [(f.utterance, f.ts) for f in finals] == [(0, (0, 1500))]
    assert finals[0].text.startswith("1.50s")
    # The decode at the pause ran and went unused; the final decoded all 1.5 s.
    assert [n for k, n in engine.jobs if k == "final"] == [50 * 320, 75 * 320]
    assert _spec_metric(metrics, "used") == 0
    assert _spec_metric(metrics, "wasted") == 1


async def test_speculative_finals_off(nursery: trio.Nursery) -> None:
    engine, events, metrics = await _pause_then(nursery, 0, speculative_final_ms=0)
    assert [e.text[:5] for e in events if e.type == "final"] == ["1.00s"]
    assert [n for k, n in engine.jobs if k == "final"] == [50 * 320]
    assert _spec_metric(metrics, "used") == 0


async def test_a_v4_pause_decodes_the_final_at_once(nursery: trio.Nursery) -> None:
    """With the gap timer out of reach (10 s), only the gateway's Pause can start the
    decode before the Finalize; a Pause naming another utterance changes nothing."""
    engine = _JobLog(job_delay_s=0.02)
    _app, port, shutdown = await _start_server(nursery, engine, body_drain_s=1.0,
                                               speculative_final_ms=10_000)
    pcm = [GOFORWARD[i:i + 320].tobytes() for i in range(0, 320 * 100, 320)]
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="p4", codec="pcm"))
        assert await ls.stream.response() == 200
        assert link.version_of(ls.stream.headers["content-type"]) == 4
        await ls.send(*audio_frames(pcm[:50]), link.Pause(3))
        await trio.sleep(0.3)
        assert not [k for k, _ in engine.jobs if k == "final"]
        await ls.send(link.Pause(0))
        await trio.sleep(0.3)  # decoded now, before any Finalize
        assert [n for k, n in engine.jobs if k == "final"] == [50 * 320]
        await ls.send(link.Finalize(), link.End())
        await ls.stream.end()
        events = await ls.rest()
        metrics = (await _get(port, "/metrics")).text
    assert [e.text[:5] for e in events if e.type == "final"] == ["1.00s"]
    assert [n for k, n in engine.jobs if k == "final"] == [50 * 320]  # that one only
    assert _spec_metric(metrics, "used") == 1
    assert "asr_pause_hints_total 2.0" in metrics
    shutdown.set()
