"""The gateway's ASR link client against real ASR service processes on loopback."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from asr import link
from gateway.asrlink import AsrBusy, AsrPools, AsrStream, AsrUnavailable
from native import OpusError
from tests import speech
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

AUDIO = speech.goforward()
FRAMES = [(AUDIO[i:i + 320], i // 16) for i in range(0, len(AUDIO) - 319, 320)]


async def _pools(nursery: trio.Nursery, pools: dict[str, tuple[str, ...]], **kw: int
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



