"""Fuzzing the ASR link codec (``asr.link``) and the ASR service's ``Start`` validation.

* Round trip: any valid frames, encoded and fed back in arbitrary chunks, decode to the
  same frames.
* Arbitrary bytes, valid frame streams with bytes flipped, and frames with mutated JSON
  payloads, fed to the decoder on either side and to the server's stream state machine:
  the only exception is the module's ``LinkProtocolError`` (with an ``ErrorCode``),
  raised or returned in-band. Anything else escapes the ASR service's stream handler
  (or the gateway's link reader) as a crash instead of a coded ``error`` event.
* ``Start``: whatever JSON object arrives, ``Start.from_json`` gives a Start that passes
  ``validate`` and encodes, or ``BAD_START``; the language check that the service runs
  next (``asr.engine.normalize_language``) gives a Whisper code or ``UnsupportedLanguage``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from asr import link
from asr.engine import UnsupportedLanguage, normalize_language
from asr.whisper.tokenizer import LANGUAGES

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u32 = st.integers(0, link.U32_MAX)
# Text that survives UTF-8 (what a well-behaved peer sends).
utf8_text = st.text(st.characters(codec="utf-8"), max_size=30)

starts = st.builds(
    link.Start,
    flow_id=st.text(st.characters(codec="utf-8"), min_size=1, max_size=128),
    codec=st.sampled_from(["opus", "pcm"]),
    bitrate=st.integers(16000, 24000),
    vbr=st.booleans(),
    lang_hint=st.text(st.characters(codec="utf-8"), max_size=16),
    domain=st.text(st.characters(codec="utf-8"), max_size=128),
    hotwords=st.lists(st.text(st.characters(codec="utf-8"), max_size=64),
                      max_size=100).map(tuple),
    traceparent=st.text(st.characters(codec="utf-8"), max_size=64),
    version=st.sampled_from(sorted(link.SUPPORTED_VERSIONS)),
)
audios = st.builds(link.Audio, seq=u32, pts_ms=u32, data=st.binary(max_size=300),
                   pcm=st.booleans())
finalizes = st.builds(link.Finalize, st.none() | st.integers(0, 2**40))
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                | utf8_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(utf8_text, inner, max_size=4),
    max_leaves=12)
events = st.builds(
    link.AsrEvent,
    type=st.sampled_from(["partial", "final", "end", "error"]),
    flow_id=utf8_text, utterance=st.integers(0, 2**40), text=utf8_text,
    ts=st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)), lang=utf8_text,
    extra=st.dictionaries(st.sampled_from(["x", "rtf", "model", "words"]), json_values,
                          max_size=3),
) | st.builds(link.AsrEvent, type=st.just("flow"), flow_id=utf8_text,
              code=st.sampled_from(sorted(link.AsrEvent.FLOW_CODES)), message=utf8_text)
client_frames = st.one_of(starts, audios, finalizes, st.just(link.End()))


def _error_ok(exc: link.LinkProtocolError) -> None:
    assert isinstance(exc.code, link.ErrorCode)
    assert isinstance(exc.message, str) and isinstance(exc.fatal, bool)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def feed_all(decoder: link.FrameDecoder, chunks: list[bytes]) -> list[Any]:
    """Feed chunks; every outcome must be a frame or a LinkProtocolError (raised ones
    are returned as the last item, after which the decoder stays broken)."""
    out: list[Any] = []
    for chunk in chunks:
        try:
            got = decoder.feed(chunk)
        except link.LinkProtocolError as exc:
            _error_ok(exc)
            assert exc.fatal
            # A broken decoder refuses everything after, with the same error.
            with pytest.raises(link.LinkProtocolError):
                decoder.feed(b"\x04\x00\x00\x00\x00")
            return [*out, exc]
        for item in got:
            if isinstance(item, link.LinkProtocolError):
                _error_ok(item)
                assert not item.fatal
        out += got
    try:
        decoder.close()
    except link.LinkProtocolError as exc:
        _error_ok(exc)
        out.append(exc)
    return out


@FUZZ
@given(st.lists(client_frames, max_size=12), st.lists(st.integers(0, 5000), max_size=8))
def test_client_frames_round_trip_in_any_chunking(frames: list[link.Frame],
                                                  cuts: list[int]) -> None:
    data = link.encode_many(frames)
    got = feed_all(link.FrameDecoder(accept=link.CLIENT_FRAMES), _split(data, cuts))
    assert got == frames


@FUZZ
@given(st.lists(events, max_size=12), st.lists(st.integers(0, 5000), max_size=8))
def test_events_round_trip_in_any_chunking(evs: list[link.AsrEvent], cuts: list[int]) -> None:
    data = link.encode_many(list(evs))
    got = feed_all(link.FrameDecoder(accept=link.SERVER_FRAMES), _split(data, cuts))
    assert got == evs


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=6),
       st.sampled_from(["client", "server", "any"]))
@example(b"\x01\x03\x00\x00\x00[[[", [], "client")
@example(b"\xff\x00\x00\x00\x00", [], "any")
@example(b"\x02\xff\xff\xff\xff", [], "client")
def test_arbitrary_bytes_give_only_link_errors(data: bytes, cuts: list[int], side: str
                                               ) -> None:
    accept = {"client": link.CLIENT_FRAMES, "server": link.SERVER_FRAMES, "any": None}[side]
    feed_all(link.FrameDecoder(accept=accept), _split(data, cuts))


@st.composite
def corrupted_streams(draw: st.DrawFn) -> bytes:
    """A valid client stream with a few bytes overwritten, inserted or cut out."""
    data = bytearray(link.encode_many(draw(st.lists(client_frames, min_size=1, max_size=6))))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "cut"]))
        if op == "flip" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i:i + draw(st.integers(1, 8))]
    return bytes(data)


@FUZZ
@given(corrupted_streams(), st.lists(st.integers(0, 3000), max_size=4))
def test_corrupted_streams_give_only_link_errors(data: bytes, cuts: list[int]) -> None:
    feed_all(link.FrameDecoder(accept=link.CLIENT_FRAMES), _split(data, cuts))
    server = link.ServerStream()
    for chunk in _split(data, cuts):
        try:
            items = server.receive(chunk)
        except link.LinkProtocolError as exc:
            _error_ok(exc)
            return
        for item in items:
            assert isinstance(item, link.Start | link.AudioIn | link.Finalize | link.End
                              | link.LinkProtocolError)
            if isinstance(item, link.AudioIn):
                assert 0 <= item.lost <= link.ServerStream.MAX_CONCEALED
    try:
        server.close()
    except link.LinkProtocolError as exc:
        _error_ok(exc)


VALID_START = link.Start("fuzz-1", hotwords=("voxgate",)).to_json()
START_KEYS = sorted(VALID_START)


@st.composite
def start_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Start's JSON with fields replaced, removed or added."""
    obj = dict(VALID_START)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "set", "set", "del", "add"]))
        key = draw(st.sampled_from(START_KEYS))
        if action == "set":
            obj[key] = draw(json_values | st.sampled_from(
                [2**64, -1, 0, 16000, 20, 1, True, "", "en-US", "xx", "EN_us", "auto",
                 "zh-Hant-TW", "x" * 17, "\ud800", [1], ["a" * 65], ["w"] * 101]))
        elif action == "del":
            obj.pop(key, None)
        else:
            obj[draw(utf8_text)] = draw(json_values)
    return obj


def _start_frame(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, ensure_ascii=True).encode()
    return link.HEADER.pack(link.FrameType.START, len(payload)) + payload


def check_start(obj: dict[str, Any]) -> link.Start | None:
    """The service's Start path: decode, validate, then the language check."""
    decoder = link.FrameDecoder(accept=link.CLIENT_FRAMES)
    try:
        (start,) = decoder.feed(_start_frame(obj))
    except link.LinkProtocolError as exc:
        _error_ok(exc)
        assert exc.code is link.ErrorCode.BAD_START and exc.fatal
        return None
    assert isinstance(start, link.Start)
    start.validate()  # what came out is valid...
    assert link.Start.from_json(start.to_json()) == start  # ...and stable
    try:
        lang = normalize_language(start.lang_hint)
    except UnsupportedLanguage:
        return start
    assert lang == "auto" or lang in LANGUAGES
    return start


@FUZZ
@given(start_objects())
@example({**VALID_START, "lang_hint": "en-US"})
@example({**VALID_START, "sr": 10**4000})
@example({**VALID_START, "hotwords": ["\ud800"]})
def test_any_start_object_is_a_valid_start_or_bad_start(obj: dict[str, Any]) -> None:
    start = check_start(obj)
    if start is not None:
        # Accepted means encodable: the gateway and the service both send it as UTF-8.
        link.encode(start)


# Literal hostile payloads for each JSON-carrying frame type.
HOSTILE_JSON: dict[str, bytes] = {
    "deep_array": b"[" * 60000,
    "deep_object": b'{"a":' * 20000 + b"1" + b"}" * 20000,
    "huge_int": b"1" * 5000,
    "huge_int_field": b'{"flow_id":"f","sr":' + b"1" * 5000 + b"}",
    "inf_utterance": b'{"type":"final","flow_id":"f","utterance":1e400}',
    "nan_utterance": b'{"type":"final","flow_id":"f","utterance":NaN}',
    "inf_ts": b'{"type":"final","flow_id":"f","ts":[0,1e999]}',
    "ts_strings": b'{"type":"final","flow_id":"f","ts":["a","b"]}',
    "ts_short": b'{"type":"final","flow_id":"f","ts":[1]}',
    "type_list": b'{"type":["final"],"flow_id":"f"}',
    "utf16": '{"flow_id":"f"}'.encode("utf-16"),
    "bad_utf8": b'{"flow_id":"\xc3"}',
    "surrogate_escape": b'{"flow_id":"\\ud800","type":"end"}',
    "hotwords_unhashable": b'{"flow_id":"f","hotwords":[[1]]}',
    "finalize_float": b'{"utterance":1.5}',
    "finalize_bool": b'{"utterance":true}',
    "finalize_inf": b'{"utterance":1e400}',
}


@pytest.mark.parametrize("kind", [link.FrameType.START, link.FrameType.FINALIZE,
                                  link.FrameType.EVENT], ids=["start", "finalize", "event"])
@pytest.mark.parametrize("payload", list(HOSTILE_JSON.values()), ids=list(HOSTILE_JSON))
def test_hostile_json_payload_gives_a_link_error(kind: link.FrameType, payload: bytes) -> None:
    frame = link.HEADER.pack(kind, len(payload)) + payload
    feed_all(link.FrameDecoder(), [frame])


class LinkStreamClient(RuleBasedStateMachine):
    """A gateway (or an impostor) driving the server's ``ServerStream`` with any order of
    frames, cut at any byte. Checked against a model: Start first (else fatal NO_START),
    one Start only (DUPLICATE_START, not fatal), audio in seq order with duplicates
    dropped and gaps reported (``lost`` capped), any frame after End fatal, nothing at
    all after a fatal error."""

    def __init__(self) -> None:
        super().__init__()
        self.server = link.ServerStream()
        self.pending = b""  # encoded frames not fed yet
        self.expect: list[str] = []  # what the model says comes out, in order
        self.got: list[str] = []
        self.started = self.ended = self.broken = False
        self.next_seq: int | None = None

    def _model(self, kind: str, seq: int = 0) -> str | None:
        if self.broken:
            return None
        if self.ended or (not self.started and kind != "start"):
            self.broken = True
            return "fatal:BAD_FRAME" if self.ended else "fatal:NO_START"
        if kind == "start":
            if self.started:
                return "error:DUPLICATE_START"
            self.started = True
            return "start"
        if kind == "end":
            self.ended = True
            return "end"
        if kind == "finalize":
            return "finalize"
        if self.next_seq is not None and seq < self.next_seq:
            return None  # a duplicate: dropped (counted), not an error
        lost = 0 if self.next_seq is None else seq - self.next_seq
        self.next_seq = seq + 1
        return f"audio:{seq}:{min(lost, link.ServerStream.MAX_CONCEALED)}"

    def _queue(self, frame: link.Frame, kind: str, seq: int = 0) -> None:
        self.pending += link.encode(frame)
        expected = self._model(kind, seq)
        if expected is not None:
            self.expect.append(expected)

    @rule()
    def start(self) -> None:
        self._queue(link.Start("lf"), "start")

    @rule(seq=st.integers(0, 40) | st.sampled_from([link.U32_MAX]))
    def audio(self, seq: int) -> None:
        self._queue(link.Audio(seq, min(seq * 20, link.U32_MAX), b"\x00" * 10), "audio", seq)

    @rule()
    def finalize(self) -> None:
        self._queue(link.Finalize(), "finalize")

    @rule()
    def end(self) -> None:
        self._queue(link.End(), "end")

    @rule(cut=st.integers(0, 64))
    def deliver(self, cut: int) -> None:
        """Feed part of what is pending (frames cross chunk boundaries)."""
        chunk, self.pending = self.pending[:cut], self.pending[cut:]
        self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        if self.got and self.got[-1].startswith("fatal:"):
            return  # the service stops reading a stream after a fatal error
        try:
            items = self.server.receive(chunk)
        except link.LinkProtocolError as exc:
            _error_ok(exc)
            # Frames decoded from this chunk before the fatal one are not returned: a
            # known gap (test_frames_before_a_fatal_one_in_the_same_chunk_come_out);
            # here the model drops them so the rest of the contract is still checked.
            fatal = f"fatal:{exc.code.value}"
            if fatal in self.expect[len(self.got):]:
                del self.expect[len(self.got):self.expect.index(fatal, len(self.got))]
            self.got.append(fatal)
            return
        for item in items:
            if isinstance(item, link.Start):
                self.got.append("start")
            elif isinstance(item, link.AudioIn):
                self.got.append(f"audio:{item.packet.seq}:{item.lost}")
            elif isinstance(item, link.Finalize):
                self.got.append("finalize")
            elif isinstance(item, link.End):
                self.got.append("end")
            else:
                assert isinstance(item, link.LinkProtocolError)
                self.got.append(f"error:{item.code.value}")

    @invariant()
    def a_prefix_of_the_model(self) -> None:
        assert self.got == self.expect[:len(self.got)], (self.got, self.expect)

    def teardown(self) -> None:
        self._feed(self.pending)
        assert self.got == self.expect, (self.got, self.expect)


TestLinkStreamClient = LinkStreamClient.TestCase
TestLinkStreamClient.settings = settings(max_examples=150, stateful_step_count=25,
                                         deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("bad", [
    link.HEADER.pack(0x7F, 0),  # an unknown frame type
    link.HEADER.pack(link.FrameType.AUDIO, 1 << 20),  # a length over the limit
], ids=["unknown_type", "oversize"])
def test_frames_before_a_fatal_one_in_the_same_chunk_come_out(bad: bytes) -> None:
    """A gateway batches frames into one DATA frame: the audio before a broken frame was
    sent in good faith and must be recognized, not dropped with the chunk."""
    good = [link.Start("f"), link.Audio(0, 0, b"\x01" * 20), link.Audio(1, 20, b"\x02" * 20)]
    server = link.ServerStream()
    got: list[object] = []
    with contextlib.suppress(link.LinkProtocolError):
        got += server.receive(link.encode_many(list(good)) + bad)
    got += _drain_after_fatal(server)
    kinds = [type(g).__name__ for g in got]
    assert kinds[:3] == ["Start", "AudioIn", "AudioIn"], kinds


def _drain_after_fatal(server: link.ServerStream) -> list[object]:
    """What a server gets on its next read (an implementation may report the frames
    before a fatal error first and raise on the next call)."""
    try:
        return list(server.receive(b""))
    except link.LinkProtocolError:
        return []
