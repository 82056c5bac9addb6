"""ASR link codec (v1 to v3): exact bytes, round trips, chunking, and every protocol error."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asr import link
from asr.link import (
    CLIENT_FRAMES,
    SERVER_FRAMES,
    AsrEvent,
    Audio,
    AudioIn,
    Discard,
    End,
    ErrorCode,
    Finalize,
    FrameDecoder,
    LinkProtocolError,
    Pause,
    ServerStream,
    Start,
    encode,
    encode_many,
)


def test_audio_frame_exact_bytes() -> None:
    assert encode(Audio(seq=1, pts_ms=20, data=b"\xaa\xbb")) == (
        b"\x02" + struct.pack("<I", 10) + struct.pack("<II", 1, 20) + b"\xaa\xbb"
    )


def test_end_frame_exact_bytes() -> None:
    assert encode(End()) == b"\x04\x00\x00\x00\x00"


def test_start_is_json_object() -> None:
    raw = encode(Start(flow_id="f1"))
    assert raw[0] == 0x01
    assert raw[5:].startswith(b'{"version":2,"flow_id":"f1","codec":"opus"')


audio = st.builds(
    Audio,
    seq=st.integers(0, 2**32 - 1),
    pts_ms=st.integers(0, 2**32 - 1),
    data=st.binary(max_size=400),
    pcm=st.booleans(),
)
starts = st.builds(
    Start,
    flow_id=st.text(min_size=1, max_size=20),
    codec=st.sampled_from(["opus", "pcm"]),
    bitrate=st.integers(16000, 24000),
    vbr=st.booleans(),
    lang_hint=st.sampled_from(["", "en", "de"]),
    hotwords=st.lists(st.text(max_size=10), max_size=4).map(tuple),
)
client_frames = st.one_of(audio, starts, st.builds(Finalize, st.none() | st.integers(0, 99)),
                          st.builds(Discard, st.none() | st.integers(0, 99)), st.just(End()))
events = st.builds(
    AsrEvent,
    type=st.sampled_from(["partial", "final", "end", "error"]),
    flow_id=st.text(min_size=1, max_size=10),
    utterance=st.integers(0, 1000),
    text=st.text(max_size=50),
    ts=st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)),
    lang=st.sampled_from(["", "en", "fr"]),
)


def _normal(ev: AsrEvent) -> AsrEvent:
    # code/message/fatal only travel on errors.
    if ev.type == "error":
        return ev
    return AsrEvent(ev.type, ev.flow_id, ev.utterance, ev.text, ev.ts, ev.lang)


@given(st.lists(client_frames, max_size=12), st.data())
def test_client_frames_round_trip_however_chunked(frames: list, data: st.DataObject) -> None:
    blob = encode_many(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
    dec = FrameDecoder(accept=CLIENT_FRAMES)
    got = []
    prev = 0
    for cut in [*cuts, len(blob)]:
        got += dec.feed(blob[prev:cut])
        prev = cut
    dec.close()
    assert got == frames


@given(st.lists(events, max_size=8))
def test_events_round_trip(evs: list[AsrEvent]) -> None:
    dec = FrameDecoder(accept=SERVER_FRAMES)
    assert dec.feed(encode_many(evs)) == [_normal(e) for e in evs]


@pytest.mark.parametrize(
    ("blob", "code", "fatal"),
    [
        (b"\x7f\x00\x00\x00\x00", ErrorCode.UNKNOWN_FRAME, True),
        (b"\x02" + struct.pack("<I", 10**6), ErrorCode.FRAME_TOO_LARGE, True),
        (b"\x01\x03\x00\x00\x00{{{", ErrorCode.BAD_START, True),
        (b"\x01\x02\x00\x00\x00[]", ErrorCode.BAD_START, True),
        (b"\x81\x02\x00\x00\x00{}", ErrorCode.UNKNOWN_FRAME, True),
    ],
)
def test_decoder_errors(blob: bytes, code: ErrorCode, fatal: bool) -> None:
    dec = FrameDecoder(accept=CLIENT_FRAMES)
    with pytest.raises(LinkProtocolError) as info:
        dec.feed(blob)
    assert info.value.code is code
    assert info.value.fatal is fatal


def test_short_audio_frame_is_reported_in_band_and_neighbours_kept() -> None:
    dec = FrameDecoder(accept=CLIENT_FRAMES)
    out = dec.feed(encode(End()) + b"\x02\x03\x00\x00\x00abc" + encode(Audio(1, 0, b"z")))
    assert out[0] == End()
    assert isinstance(out[1], LinkProtocolError)
    assert (out[1].code, out[1].fatal) == (ErrorCode.BAD_FRAME, False)
    assert out[2] == Audio(1, 0, b"z")


def test_fatal_error_poisons_decoder() -> None:
    dec = FrameDecoder()
    with pytest.raises(LinkProtocolError):
        dec.feed(b"\x7f\x00\x00\x00\x00")
    with pytest.raises(LinkProtocolError):
        dec.feed(encode(End()))


def test_truncated_stream() -> None:
    dec = FrameDecoder()
    assert dec.feed(encode(Audio(0, 0, b"x" * 10))[:-3]) == []
    with pytest.raises(LinkProtocolError) as info:
        dec.close()
    assert info.value.code is ErrorCode.TRUNCATED


@pytest.mark.parametrize(
    ("field", "value"),
    [("codec", "mp3"), ("sr", 8000), ("channels", 2), ("frame_ms", 10), ("bitrate", 64000),
     ("version", 5), ("version", 0), ("flow_id", ""), ("sr", True), ("hotwords", [1]),
     ("surprise", 1)],
)
def test_bad_start_fields(field: str, value: object) -> None:
    obj = Start(flow_id="f").to_json()
    obj[field] = value
    with pytest.raises(LinkProtocolError) as info:
        Start.from_json(obj)
    assert info.value.code is ErrorCode.BAD_START


def test_server_stream_sequence_handling() -> None:
    s = ServerStream()
    out = s.receive(encode_many([Start(flow_id="f"), Audio(0, 0, b"a"), Audio(1, 20, b"b")]))
    assert out[0] == Start(flow_id="f")
    assert out[1:] == [AudioIn(Audio(0, 0, b"a"), 0), AudioIn(Audio(1, 20, b"b"), 0)]
    # a duplicate and a stale packet are dropped; a gap of two is reported as loss
    out = s.receive(encode_many([Audio(1, 20, b"b"), Audio(0, 0, b"a"), Audio(4, 80, b"e")]))
    assert out == [AudioIn(Audio(4, 80, b"e"), 2)]
    assert (s.duplicates, s.lost) == (2, 2)
    assert s.receive(encode_many([Finalize(0), End()])) == [Finalize(0), End()]


def test_second_start_is_reported_and_audio_after_it_kept() -> None:
    s = ServerStream()
    out = s.receive(encode_many([Start(flow_id="f"), Start(flow_id="g"), Audio(0, 0, b"a")]))
    assert out[0] == Start(flow_id="f")
    assert isinstance(out[1], LinkProtocolError)
    assert (out[1].code, out[1].fatal) == (ErrorCode.DUPLICATE_START, False)
    assert out[2] == AudioIn(Audio(0, 0, b"a"), 0)
    assert s.start == Start(flow_id="f")


@pytest.mark.parametrize(
    ("frames", "code", "fatal"),
    [
        ([Audio(0, 0, b"")], ErrorCode.NO_START, True),
        ([End()], ErrorCode.NO_START, True),
        ([Start(flow_id="f"), End(), Audio(0, 0, b"")], ErrorCode.BAD_FRAME, True),
    ],
)
def test_server_stream_state_errors(frames: list, code: ErrorCode, fatal: bool) -> None:
    s = ServerStream()
    with pytest.raises(LinkProtocolError) as info:
        s.receive(encode_many(frames))
    assert info.value.code is code
    assert info.value.fatal is fatal


def test_version_1_starts_are_still_accepted() -> None:
    obj = Start(flow_id="f").to_json()
    obj["version"] = 1
    assert Start.from_json(obj).version == 1
    assert link.CONTENT_TYPES[1].endswith(".v1") and link.CONTENT_TYPE.endswith(".v4")


def test_discard_frame_exact_bytes_and_round_trip() -> None:
    raw = encode(Discard(4))
    assert raw == b"\x06" + struct.pack("<I", 15) + b'{"utterance":4}'
    assert encode(Discard()) == b"\x06\x02\x00\x00\x00{}"
    dec = FrameDecoder(accept=CLIENT_FRAMES)
    assert dec.feed(raw + encode(Discard())) == [Discard(4), Discard()]


def test_discard_with_a_malformed_utterance_is_a_soft_error() -> None:
    raw = link.HEADER.pack(link.FrameType.DISCARD, 17) + b'{"utterance":"x"}'
    out = FrameDecoder(accept=CLIENT_FRAMES).feed(raw)
    assert isinstance(out[0], LinkProtocolError)
    assert (out[0].code, out[0].fatal) == (ErrorCode.BAD_FRAME, False)


def test_server_stream_v3_passes_discard_on() -> None:
    s = ServerStream(version=3)
    out = s.receive(encode_many([Start(flow_id="f"), Audio(0, 0, b"a"), Discard(0),
                                 Audio(1, 20, b"b"), Finalize()]))
    assert out[2:] == [Discard(0), AudioIn(Audio(1, 20, b"b"), 0), Finalize()]
    assert s.state is link.StreamState.STREAMING


@pytest.mark.parametrize("version", [1, 2])
def test_discard_on_a_v1_or_v2_stream_is_an_unknown_frame(version: int) -> None:
    """As a v2 server would see it: a client must send it only on a v3 stream."""
    s = ServerStream(version=version)
    s.receive(encode(Start(flow_id="f")))
    with pytest.raises(LinkProtocolError) as info:
        s.receive(encode(Discard()))
    assert (info.value.code, info.value.fatal) == (ErrorCode.UNKNOWN_FRAME, True)


def test_discard_before_start_is_no_start() -> None:
    with pytest.raises(LinkProtocolError) as info:
        ServerStream().receive(encode(Discard()))
    assert info.value.code is ErrorCode.NO_START


@pytest.mark.parametrize(("content_type", "version"), [
    ("application/vnd.voxgate.asr-link.v1", 1), ("application/vnd.voxgate.asr-link.v2", 2),
    ("application/vnd.voxgate.asr-link.v3", 3), ("Application/vnd.voxgate.asr-link.v3; x=1", 3),
    ("application/vnd.voxgate.asr-link.v4", 4), ("application/vnd.voxgate.asr-link.v5", None),
    ("application/json", None), (None, None)])
def test_version_of_content_type(content_type: str | None, version: int | None) -> None:
    assert link.version_of(content_type) == version


def test_a_v4_client_starts_as_v2_so_a_v2_server_takes_it() -> None:
    assert Start(flow_id="f").version == 2 == link.START_VERSION
    assert link.VERSION == 4 and {3, 4} <= link.SUPPORTED_VERSIONS


def test_pause_frame_exact_bytes_and_round_trip() -> None:
    raw = encode(Pause(2))
    assert raw == b"\x07" + struct.pack("<I", 15) + b'{"utterance":2}'
    dec = FrameDecoder(accept=CLIENT_FRAMES)
    assert dec.feed(raw + encode(Pause())) == [Pause(2), Pause()]


def test_server_stream_v4_passes_pause_on() -> None:
    s = ServerStream(version=4)
    out = s.receive(encode_many([Start(flow_id="f"), Audio(0, 0, b"a"), Pause(0),
                                 Audio(1, 20, b"b"), Finalize()]))
    assert out[2:] == [Pause(0), AudioIn(Audio(1, 20, b"b"), 0), Finalize()]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_pause_below_v4_is_an_unknown_frame_and_before_start_no_start(version: int) -> None:
    s = ServerStream(version=version)
    s.receive(encode(Start(flow_id="f")))
    with pytest.raises(LinkProtocolError) as info:
        s.receive(encode(Pause()))
    assert (info.value.code, info.value.fatal) == (ErrorCode.UNKNOWN_FRAME, True)
    with pytest.raises(LinkProtocolError) as info:
        ServerStream().receive(encode(Pause()))
    assert info.value.code is ErrorCode.NO_START


@pytest.mark.parametrize("code", ["BEHIND", "OK"])
def test_flow_event_round_trip(code: str) -> None:
    ev = AsrEvent("flow", "f", utterance=3, code=code, message="12.0 s of audio waiting")
    raw = encode(ev)
    obj = json.loads(raw[5:])
    assert (obj["type"], obj["code"], obj["message"]) == ("flow", code, ev.message)
    assert "fatal" not in obj
    dec = FrameDecoder(accept=link.SERVER_FRAMES)
    assert dec.feed(raw) == [ev]


def test_flow_event_with_an_unknown_code_is_rejected() -> None:
    raw = encode(AsrEvent("flow", "f", code="SLOWER"))
    with pytest.raises(LinkProtocolError) as info:
        FrameDecoder(accept=link.SERVER_FRAMES).feed(raw)
    assert info.value.code is ErrorCode.BAD_FRAME
