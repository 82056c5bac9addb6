"""The client SDK's sans-IO parts: framing, flow control, resume, events, conversion."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from voxgate_client.audio import AudioConverter
from voxgate_client.core import Control, Frame, ProtocolStateError, StreamCore
from voxgate_client.events import (
    Ack,
    Final,
    Flow,
    Lid,
    UnknownEvent,
    parse_event,
)


def drain(core: StreamCore, now: float = 0.0) -> list[Frame | Control]:
    out: list[Frame | Control] = []
    while True:
        item, _ = core.next_outgoing(now)
        if item is None:
            return out
        core.sent(item, now)
        out.append(item)


def connected(**kwargs: int) -> StreamCore:
    core = StreamCore(**kwargs)
    core.on_ack(Ack("f", 0), reconnect=False)
    return core


@given(st.lists(st.integers(0, 2000), max_size=40))
def test_any_chunking_gives_the_same_audio_in_numbered_frames(sizes: list[int]) -> None:
    core = connected()
    pushed = b"".join(bytes([i % 256, i // 256 % 256]) * n for i, n in enumerate(sizes))
    pos = 0
    for n in sizes:
        core.push(pushed[pos:pos + 2 * n])
        pos += 2 * n
    core.flush()
    items = drain(core)
    frames = [i for i in items if isinstance(i, Frame)]
    assert b"".join(f.pcm for f in frames) == pushed
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert all(len(f.pcm) == 640 for f in frames[:-1])
    assert [f.pts_ms for f in frames] == [20 * k for k in range(len(frames))]
    assert isinstance(items[-1], Control) and items[-1].message == {"type": "flush"}
    wire = frames[0].wire() if frames else b""
    if frames:
        assert struct.unpack_from("<II", wire) == (0, 0) and wire[8:] == frames[0].pcm


def test_finalize_goes_after_the_audio_before_it_including_a_short_tail() -> None:
    core = connected()
    core.push(b"\x01\x00" * 400)  # 25 ms: one frame and a 5 ms tail
    core.finalize()
    core.push(b"\x02\x00" * 320)
    kinds = [type(i).__name__ if isinstance(i, Frame) else i.message["type"]
             for i in drain(core)]
    assert kinds == ["Frame", "Frame", "finalize", "Frame"]


def test_bad_input_is_refused_by_name() -> None:
    core = connected()
    with pytest.raises(ValueError, match="whole 16-bit"):
        core.push(b"\x00\x01\x02")
    core.flush()
    with pytest.raises(ProtocolStateError):
        core.push(b"\x00\x00")
    with pytest.raises(ValueError):
        StreamCore(chunk_ms=5)


def test_pause_holds_audio_and_resume_releases_it_in_order() -> None:
    core = connected(max_buffer_ms=100)
    core.push(b"\x00\x00" * 320 * 3)
    assert len(drain(core)) == 3
    core.on_flow("PAUSE", 0.0)
    core.push(b"\x00\x00" * 320 * 5)
    assert drain(core) == [] and core.buffered_ms == 100 and core.buffer_full
    core.on_flow("RESUME", 1.0)
    frames = drain(core)
    assert [f.seq for f in frames if isinstance(f, Frame)] == [3, 4, 5, 6, 7]
    assert not core.buffer_full
    core.on_flow("SOMETHING_NEW", 1.0)  # a newer server's state is ignored
    assert core.flow == "RESUME"


def test_slow_down_paces_audio_to_real_time() -> None:
    core = connected()
    core.on_flow("SLOW_DOWN", 10.0)
    core.push(b"\x00\x00" * 320 * 50)  # 1 s
    sent_at: list[float] = []
    now = 10.0
    while True:
        item, wait = core.next_outgoing(now)
        if item is None and wait is None:
            break
        if item is None:
            assert wait is not None
            now += wait
            continue
        core.sent(item, now)
        sent_at.append(now)
    assert len(sent_at) == 50
    # 50 frames of 20 ms take about a second of wall time, not zero
    assert 0.95 <= sent_at[-1] - sent_at[0] <= 1.0


def test_resume_sends_again_from_the_servers_next_seq() -> None:
    core = connected()
    core.push(b"\x00\x00" * 320 * 10)
    drain(core)
    core.flush()
    drain(core)  # flush went out, then the connection dropped
    core.on_disconnect()

    resumed = core.on_ack(Ack("f", 0, session={"resumed": True, "next_seq": 7}),
                          reconnect=True)
    assert resumed
    items = drain(core)
    assert [i.seq for i in items if isinstance(i, Frame)] == [7, 8, 9]
    assert isinstance(items[-1], Control) and items[-1].message["type"] == "flush"
    assert core.frames_resent == 3


def test_resume_without_next_seq_sends_every_kept_frame() -> None:
    core = connected(resume_buffer_ms=100)  # keeps the last 5 frames
    core.push(b"\x00\x00" * 320 * 10)
    drain(core)
    core.on_disconnect()
    core.on_ack(Ack("f", 0, session={"resumed": True}), reconnect=True)
    assert [i.seq for i in drain(core) if isinstance(i, Frame)] == [5, 6, 7, 8, 9]


def test_a_fresh_session_after_a_reconnect_renumbers_unsent_audio_from_zero() -> None:
    core = connected()
    core.push(b"\x01\x00" * 320 * 4)
    drain(core)
    core.on_disconnect()
    core.push(b"\x02\x00" * 320 * 3)  # queued while disconnected
    assert core.next_outgoing(0.0) == (None, None)
    assert not core.on_ack(Ack("f", 0, session={"resumed": False}), reconnect=True)
    frames = [i for i in drain(core) if isinstance(i, Frame)]
    assert [(f.seq, f.pts_ms) for f in frames] == [(0, 0), (1, 20), (2, 40)]
    core.push(b"\x03\x00" * 320)
    assert [(f.seq, f.pts_ms) for f in drain(core) if isinstance(f, Frame)] == [(3, 60)]


def test_events_parse_and_unknown_parts_are_kept_not_fatal() -> None:
    final = parse_event({"type": "asr_final", "flowId": "f", "seq": 3, "utterance": 1,
                         "text": "hi", "start_ms": 0, "end_ms": 500, "lang": "en",
                         "confidence": 0.9})
    assert isinstance(final, Final) and final.text == "hi" and final.seq == 3
    assert final.extra == {"confidence": 0.9}
    lid = parse_event({"type": "lid", "flowId": "f", "seq": 1, "lang": "de", "score": 0.9,
                       "top": [{"lang": "de", "score": 0.9}]})
    assert isinstance(lid, Lid) and lid.top == (("de", 0.9),)
    new = parse_event({"type": "sentiment", "flowId": "f", "seq": 9, "mood": "calm"})
    assert isinstance(new, UnknownEvent) and new.raw["mood"] == "calm"
    flow = parse_event({"type": "flow", "flowId": "f", "seq": 2, "state": "PAUSE"})
    assert isinstance(flow, Flow) and flow.state == "PAUSE"
    with pytest.raises(ValueError):
        parse_event({"no": "type"})


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_converter_resamples_any_rate_to_exact_16k_length(rate: int) -> None:
    t = np.arange(rate * 2) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    conv = AudioConverter(rate)
    out = b"".join(conv.convert(tone[i:i + 777]) for i in range(0, len(tone), 777))
    out += conv.finish()
    pcm = np.frombuffer(out, dtype="<i2")
    assert abs(len(pcm) - 32000) <= 2
    # still a 440 Hz tone at the same level
    spectrum = np.abs(np.fft.rfft(pcm[4000:20000].astype(np.float64)))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 2
    assert 0.45 < np.abs(pcm).max() / 32768 < 0.55


def test_converter_passes_16k_int16_through_exactly_and_downmixes() -> None:
    conv = AudioConverter()
    x = np.arange(-100, 100, dtype=np.int16)
    assert conv.convert(x) == x.tobytes() and conv.convert(x.tobytes()) == x.tobytes()
    stereo = np.stack([x, x], axis=1)
    assert np.array_equal(np.frombuffer(conv.convert(stereo), "<i2"), x)
    with pytest.raises(ValueError):
        conv.convert(b"\x00")
    with pytest.raises(ValueError):
        conv.convert(np.zeros(4, dtype=np.int32))
