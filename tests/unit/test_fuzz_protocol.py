"""Fuzzing the client side of protocol v1: text frames (``parse_text``) and binary frames
(the seq header, then the reframer), as the session calls them.

The property everywhere: whatever a client sends, the parser answers with a message or
with its own coded error (``ProtocolError`` / ``IngestError`` whose code is an
``ErrorCode``), never with another exception. Any other exception escapes the session's
``except ProtocolError`` and ends the session without an ``error`` event (a RecursionError
used to delete the recording), so each one found is a bug. Inputs come from hypothesis
(arbitrary text and bytes, and valid messages with mutated fields) and from a list of
literal hostile frames that earlier reviews found.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.protocol import (
    FEATURES,
    FLOW_ID_RE,
    MAX_HOTWORDS,
    MAX_TEXT_FRAME_BYTES,
    RETURNABLE,
    ErrorCode,
    Finalize,
    Flush,
    Ping,
    ProtocolError,
    Start,
    parse_text,
)
from stages.reframe import FRAME_SAMPLES, IngestError, Reframer, SeqBuffer

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

VALID: dict[str, dict[str, Any]] = {
    "start": {
        "type": "start", "flowId": "fuzz-1",
        "audio": {"codec": "pcm_s16le", "sr": 16000, "channels": 1, "chunk_ms": 20},
        "return": ["lid", "asr", "record_url", "metrics"],
        "hints": {"domain": "default", "user_lang_pref": "auto", "hotwords": ["voxgate"]},
        "auth": {"token": "t"}, "client_version": "1.2.3", "features": ["seq_header"],
        "trace_id": "tr", "tenant_id": "te",
    },
    "ping": {"type": "ping", "id": "p1"},
    "finalize": {"type": "finalize"},
    "flush": {"type": "flush"},
}
# Where a mutation may land: the top level or one of start's nested objects.
PLACES = ((), ("audio",), ("hints",), ("auth",))
KEYS = sorted({k for m in VALID.values() for k in m} | {"codec", "sr", "channels",
              "chunk_ms", "domain", "user_lang_pref", "hotwords", "token", "id"})

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
                | st.floats() | st.text(max_size=40)
                | st.sampled_from(["start", "ping", "flush", "finalize", "auto", "en-US", "",
                                   "seq_header", "lid", "\x00", "\ud800", "🙂" * 20]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
        st.sampled_from(KEYS) | st.text(max_size=12), inner, max_size=6),
    max_leaves=25)


def _check_message(msg: object) -> None:
    """What a parsed message may look like: bounded, whitelisted, typed."""
    assert isinstance(msg, Start | Flush | Finalize | Ping)
    if isinstance(msg, Ping):
        assert msg.id is None or (isinstance(msg.id, str) and len(msg.id) <= 128)
    if isinstance(msg, Start):
        assert FLOW_ID_RE.match(msg.flow_id)
        assert (msg.audio.codec, msg.audio.sr, msg.audio.channels) == ("pcm_s16le", 16000, 1)
        assert 10 <= msg.audio.chunk_ms <= 1000
        assert msg.returns <= RETURNABLE and msg.features <= FEATURES
        assert len(msg.hints.hotwords) <= MAX_HOTWORDS
        assert all(isinstance(w, str) and 0 < len(w) <= 64 for w in msg.hints.hotwords)
        assert isinstance(msg.hints.user_lang_pref, str) and len(msg.hints.user_lang_pref) <= 16
        assert isinstance(msg.hints.domain, str) and len(msg.hints.domain) <= 64
        for text in (msg.client_version, msg.trace_id, msg.tenant_id, msg.token,
                     msg.flow_id, msg.hints.domain, *msg.hints.hotwords):
            assert isinstance(text, str)
            # These go on the ASR link and into logs as UTF-8: a lone surrogate (valid
            # as a JSON escape, "\ud800") would fail the encoder there, not here.
            text.encode("utf-8")
        assert len(msg.trace_id) <= 128 and len(msg.tenant_id) <= 128


def parse_checked(text: str | bytes) -> object:
    """``parse_text``, asserting that it returns a sane message or a coded ProtocolError."""
    try:
        msg = parse_text(text)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert isinstance(exc.message, str) and isinstance(exc.fatal, bool)
        # A client's error text is sent back: it must stay small whatever was sent.
        assert len(exc.message) <= 1024, exc.message[:200]
        return exc
    _check_message(msg)
    return msg


@st.composite
def mutated_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message with fields replaced, removed or added at the top level or in
    start's nested objects."""
    msg: dict[str, Any] = json.loads(json.dumps(VALID[draw(st.sampled_from(sorted(VALID)))]))
    for _ in range(draw(st.integers(1, 4))):
        place: dict[str, Any] = msg
        for key in draw(st.sampled_from(PLACES)):
            nested = place.get(key)
            if not isinstance(nested, dict):
                break
            place = nested
        action = draw(st.sampled_from(["set", "set", "del", "add"]))
        key = draw(st.sampled_from(sorted(place) or ["type"]))
        if action == "set":
            place[key] = draw(json_values)
        elif action == "del":
            place.pop(key, None)
        else:
            place[draw(st.text(max_size=12))] = draw(json_values)
    return msg


@FUZZ
@given(st.text(max_size=2000))
def test_any_text_gives_a_message_or_a_coded_error(text: str) -> None:
    parse_checked(text)


@FUZZ
@given(st.binary(max_size=2000))
@example(b"\xef\xbb\xbf{}")  # a UTF-8 byte order mark
@example(b"\xff\xfe{\x00}\x00")  # UTF-16 that json.loads would detect
@example(b'{"type":"ping","id":"\xc3"}')  # truncated UTF-8 sequence
def test_any_bytes_give_a_message_or_a_coded_error(data: bytes) -> None:
    parse_checked(data)


@FUZZ
@given(mutated_messages(), st.booleans())
def test_mutated_messages_give_a_message_or_a_coded_error(msg: dict[str, Any],
                                                          ascii_only: bool) -> None:
    text = json.dumps(msg, ensure_ascii=ascii_only)  # NaN/Infinity literals included
    result = parse_checked(text)
    parse_checked(text.encode("utf-8", "surrogatepass"))
    if isinstance(result, Start) and isinstance(msg.get("flowId"), str):
        assert result.flow_id == msg["flowId"]


@st.composite
def spliced_text(draw: st.DrawFn) -> str:
    """A valid message's text with characters inserted, deleted or truncated."""
    text = json.dumps(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 5))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["ins", "del", "cut", "dup"]))
        if op == "ins":
            text = text[:i] + draw(st.text(max_size=8) | st.sampled_from(
                ["[", "{", '"', "\\", "\\u", "\\ud800", ",", ":", "1e999", "-0", "NaN"])) + text[i:]
        elif op == "del":
            text = text[:i] + text[i + draw(st.integers(1, 8)):]
        elif op == "cut":
            text = text[:i]
        else:
            text = text[:i] + text[i:] * draw(st.integers(2, 4))
    return text


@FUZZ
@given(spliced_text())
def test_spliced_messages_give_a_message_or_a_coded_error(text: str) -> None:
    parse_checked(text)


def _start_with(**fields: Any) -> str:
    return json.dumps({**VALID["start"], **fields})


# Literal hostile frames. Each must get a coded error (or a sane message), nothing else.
HOSTILE: dict[str, str | bytes] = {
    "deep_array": "[" * MAX_TEXT_FRAME_BYTES,
    "deep_array_closed": "[" * 4000 + "]" * 4000,
    "deep_object": '{"a":' * 3000 + "1" + "}" * 3000,
    "deep_ping_id": '{"type":"ping","id":' + "[" * 3000 + "]" * 3000 + "}",
    "deep_in_start_hints": _start_with(hints={"hotwords": [json.loads("[" * 900 + "]" * 900)]}),
    "deep_bytes": b"[" * MAX_TEXT_FRAME_BYTES,
    "huge_int_top": "1" * 5000,
    "huge_int_sr": '{"type":"start","audio":{"sr":' + "1" * 5000 + "}}",
    "huge_int_ping_id": '{"type":"ping","id":' + "9" * 4400 + "}",
    "huge_float": '{"type":"start","audio":{"chunk_ms":1e999}}',
    "nan_chunk_ms": '{"type":"start","audio":{"chunk_ms":NaN}}',
    "unhashable_return": _start_with(**{"return": [{}]}),
    "unhashable_return_list": _start_with(**{"return": [["asr"]]}),
    "unhashable_features": _start_with(features=[[]]),
    "unhashable_features_dict": _start_with(features=[{"seq_header": 1}]),
    "hotword_not_list": _start_with(hints={"hotwords": "abc"}),
    "hotwords_dict": _start_with(hints={"hotwords": {"a": 1}}),
    "type_list": '{"type":["start"]}',
    "type_dict": '{"type":{"start":1}}',
    "type_huge": json.dumps({"type": "x" * (MAX_TEXT_FRAME_BYTES - 20)}),
    "flow_id_newline": _start_with(flowId="abc\n"),
    "flow_id_int": _start_with(flowId=7),
    "lone_surrogate": '{"type":"ping","id":"\\ud800"}',
    "nul": '{"type":"ping\\u0000"}',
    "too_long_chars": "x" * (MAX_TEXT_FRAME_BYTES + 1),
    "too_long_multibyte": '{"type":"ping","id":"' + "🙂" * (MAX_TEXT_FRAME_BYTES // 2) + '"}',
    "lang_pref_weird": _start_with(hints={"user_lang_pref": "en-US-x-" + "a" * 40}),
    "lang_pref_int": _start_with(hints={"user_lang_pref": 3}),
    "auth_token_list": _start_with(auth={"token": ["a"]}),
    "auth_not_object": _start_with(auth="Bearer x"),
    "surrogate_hotword": _start_with(hints={"hotwords": ["\ud800"]}),
    "surrogate_domain": _start_with(hints={"domain": "a\udfffb"}),
    "empty": "",
    "null": "null",
    "array": "[]",
}


@pytest.mark.parametrize("frame", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_frame_gives_a_coded_error(frame: str | bytes) -> None:
    result = parse_checked(frame)
    # Every one of them is malformed or over a limit, except the few that are sane.
    assert isinstance(result, ProtocolError) or not isinstance(frame, bytes | str) or any(
        isinstance(result, kind) for kind in (Ping, Start))


# -- binary frames: the seq header, then the reframer ----------------------------------

def _ingest(seqbuf: SeqBuffer | None, reframer: Reframer, data: bytes) -> list[int]:
    """The session's binary path (``SessionCore.audio``) without the Trio parts: returns
    the start of every frame that came out; raises only IngestError."""
    payloads = [data]
    if seqbuf is not None:
        seq, _pts, payload = SeqBuffer.parse(data)
        payloads = seqbuf.feed(seq, payload)
    starts = []
    for p in payloads:
        starts += [f.start for f in reframer.feed(p)]
    return starts


binary_frames = st.one_of(
    st.binary(max_size=700),
    st.builds(lambda seq, pts, n, odd: struct.pack("<II", seq, pts) + bytes(2 * n + odd),
              st.integers(0, 40) | st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
              st.integers(0, 400), st.integers(0, 1)),
    st.sampled_from([b"", b"\x00", b"\x00" * 7, b"\xff" * 8, b"\x00" * 9,
                     b"\x00" * (64 * 1024 + 1), b"\x00" * (64 * 1024 + 8)]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(binary_frames, max_size=40))
def test_binary_frames_give_audio_or_a_coded_error(with_seq: bool, frames: list[bytes]
                                                   ) -> None:
    # A small window keeps the seq buffer's reordering in play on short runs.
    seqbuf = SeqBuffer(4, conceal=False) if with_seq else None
    reframer = Reframer()
    starts: list[int] = []
    for data in frames:
        try:
            starts += _ingest(seqbuf, reframer, data)
        except IngestError as exc:
            assert ErrorCode(exc.code)  # the session turns the code into an ErrorCode
            continue
        assert reframer.statistics().pending_samples < FRAME_SAMPLES
        if seqbuf is not None:
            assert seqbuf.statistics().held <= seqbuf.window
    assert starts == [i * FRAME_SAMPLES for i in range(len(starts))]
