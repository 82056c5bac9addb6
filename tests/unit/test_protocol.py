"""Protocol v1 codec: parsing every upstream message, error codes, and event shapes."""

from __future__ import annotations

import json
import time

import fastjsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import (
    REJECT_CODES,
    WHISPER_LANGUAGES,
    ErrorCode,
    EventWriter,
    Finalize,
    Flush,
    MessageRate,
    Ping,
    ProtocolError,
    Start,
    normalize_language,
    parse_text,
)
from tests.contract import check_client_message, check_event

FULL_START = {
    "type": "start", "flowId": "abc-1",
    "audio": {"codec": "pcm_s16le", "sr": 16000, "channels": 1, "chunk_ms": 20},
    "return": ["lid", "asr", "record_url", "metrics"],
    "hints": {"domain": "default", "user_lang_pref": "auto", "hotwords": ["voxgate"]},
    "auth": {"token": "t"}, "client_version": "1.2.3", "features": ["seq_header", "x"],
    "trace_id": "tr", "tenant_id": "te",
}


def test_unhashable_features_are_ignored_like_unknown_ones() -> None:
    msg = parse_text('{"type":"start","features":[[], {"seq_header":1}, "seq_header"]}')
    assert isinstance(msg, Start) and msg.features == frozenset({"seq_header"})


def test_full_start() -> None:
    check_client_message(FULL_START)
    msg = parse_text(json.dumps(FULL_START))
    assert isinstance(msg, Start)
    assert msg.flow_id == "abc-1" and msg.token == "t" and msg.hints.hotwords == ("voxgate",)
    assert msg.features == frozenset({"seq_header"})  # unknown features are ignored
    assert not msg.flow_id_generated


def test_minimal_start_gets_defaults_and_a_flow_id() -> None:
    msg = parse_text('{"type":"start"}')
    assert isinstance(msg, Start) and msg.flow_id_generated and len(msg.flow_id) == 32
    assert msg.returns == frozenset({"lid", "asr", "record_url", "metrics"})


@pytest.mark.parametrize(
    ("text", "message"),
    [('{"type":"flush"}', Flush()), ('{"type":"finalize"}', Finalize()),
     ('{"type":"ping"}', Ping()), ('{"type":"ping","id":7}', Ping("7"))],
)
def test_commands(text: str, message: object) -> None:
    assert parse_text(text) == message


@pytest.mark.parametrize(
    ("text", "code", "fatal"),
    [
        ("{not json", ErrorCode.BAD_JSON, False),
        ("[1,2]", ErrorCode.BAD_JSON, False),
        ('{"type":"dance"}', ErrorCode.UNKNOWN_MESSAGE, False),
        ('{"kind":"start"}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"start","audio":{"sr":8000}}', ErrorCode.UNSUPPORTED_AUDIO, True),
        ('{"type":"start","audio":{"channels":2}}', ErrorCode.UNSUPPORTED_AUDIO, True),
        ('{"type":"start","audio":{"codec":"opus"}}', ErrorCode.UNSUPPORTED_AUDIO, True),
        ('{"type":"start","audio":{"sr":"16000"}}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"start","flowId":"a b"}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"start","return":["everything"]}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"start","hints":{"hotwords":[""]}}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"start","audio":{"chunk_ms":true}}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"ping","pad":"' + "x" * 20000 + '"}', ErrorCode.FRAME_TOO_LARGE, False),
        # found by the fuzz harness: each raised something other than ProtocolError
        ('{"type":"start","audio":{"sr":' + "1" * 5000 + "}}", ErrorCode.BAD_JSON, False),
        ('{"type":"start","return":[{}]}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"start","return":[["asr"]]}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"start","hints":{"hotwords":["\\ud800"]}}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"start","hints":{"domain":"a\\udfffb"}}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"ping","id":"\\ud800"}', ErrorCode.BAD_REQUEST, False),
        ('{"type":"ping","id":{"a":1}}', ErrorCode.BAD_REQUEST, False),
    ],
)
def test_errors(text: str, code: ErrorCode, fatal: bool) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_text(text)
    assert info.value.code is code
    assert info.value.fatal is fatal


def test_every_event_matches_its_schema_and_seq_counts() -> None:
    w = EventWriter("abc-1")
    events = [
        w.ack(session={"features": [], "asr_link_codec": "opus"}, limits={"max_frame_bytes": 1}),
        w.lid("en", 0.97, top=[("en", 0.97), ("de", 0.01)]),
        w.transcript(False, utterance=0, text="go", start_ms=0, end_ms=500, lang="en"),
        w.transcript(True, utterance=0, text="go forward", start_ms=0, end_ms=900, lang="en"),
        w.record_url("http://h/records/abc-1.ogg", duration_ms=900, size_bytes=10,
                     sha256="0" * 64, content_type="audio/ogg"),
        w.metrics({"audio_ms": 900}),
        w.error(ErrorCode.ODD_BYTE_COUNT, "odd", fatal=False),
        w.flow("SLOW_DOWN", reason="too fast", retry_after_ms=100),
        w.pong("7"),
        w.end("flush"),
    ]
    events = [w.stamp(e) for e in events]
    for ev in events:
        check_event(ev)
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert w.counts["asr_partial"] == 1


def test_schema_rejects_a_wrong_event() -> None:
    with pytest.raises(fastjsonschema.JsonSchemaException):
        check_event({"type": "asr_final", "flowId": "a", "seq": 0, "text": "x"})


def test_error_schema_lists_exactly_the_error_codes() -> None:
    from tests.contract import PROTOCOL_DIR

    schema = json.loads((PROTOCOL_DIR / "event.error.schema.json").read_text())
    assert set(schema["properties"]["code"]["enum"]) == {c.value for c in ErrorCode}


@pytest.mark.parametrize("text", [
    "[" * 16384, '{"type":"ping","id":' + "[" * 16000 + "}", "{" * 5000,
    '{"a":' * 2000 + "1" + "}" * 2000,
    # parses, but an error message's repr of it would recurse past the limit
    '{"type":"start","return":' + "[" * 900 + "]" * 900 + "}",
    '{"type":"ping","x":' + "[" * 33 + "]" * 33 + "}",
])
def test_deep_nesting_is_bad_json_not_a_recursion_error(text: str) -> None:
    """Finding 6: json.loads recursed until RecursionError, which ended the session."""
    with pytest.raises(ProtocolError) as info:
        parse_text(text)
    assert (info.value.code, info.value.fatal) == (ErrorCode.BAD_JSON, False)


def test_many_shallow_brackets_are_fine_and_cheap() -> None:
    text = '{"type":"ping","x":[' + ",".join(["[{}]"] * 3000) + "]}"
    t0 = time.perf_counter()
    assert parse_text(text) == Ping()
    assert time.perf_counter() - t0 < 0.05  # C-speed passes (a Python loop took 1 ms+)
    assert parse_text('{"type":"ping","x":' + "[" * 31 + "]" * 31 + "}") == Ping()


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    msg = parse_text(json.dumps({"type": "ping", "id": "[" * 100 + "{" * 20}))
    assert msg == Ping(("[" * 100 + "{" * 20)[:128])


@pytest.mark.parametrize(("pref", "lang"), [
    ("en-US", "en"), ("EN", "en"), ("en_GB", "en"), ("zh-Hans", "zh"), ("zh-Hant-TW", "zh"),
    ("auto", "auto"), ("", "auto"), ("AUTO", "auto"), ("yue", "yue"), ("haw-US", "haw"),
    ("iw", "he"), ("jv", "jw"), ("nb-NO", "no"),
])
def test_user_lang_pref_is_normalised(pref: str, lang: str) -> None:
    assert normalize_language(pref) == lang
    msg = parse_text(json.dumps({"type": "start", "hints": {"user_lang_pref": pref}}))
    assert isinstance(msg, Start) and msg.hints.user_lang_pref == lang


@pytest.mark.parametrize("pref", ["xx", "english", "en-US-" + "x" * 40, "e", "x\x00\n<b>",
                                  "\u202eevil", "klingon-tlh", "-en"])
def test_unknown_language_is_refused_and_echoed_only_escaped(pref: str) -> None:
    """Finding 3: an unknown code used to reach the decoder and fail its whole batch."""
    with pytest.raises(ProtocolError) as info:
        parse_text(json.dumps({"type": "start", "hints": {"user_lang_pref": pref}}))
    assert (info.value.code, info.value.fatal) == (ErrorCode.UNSUPPORTED_LANGUAGE, True)
    message = info.value.message
    assert message.isascii() and message.isprintable() and len(message) < 200
    assert "\x00" not in message and "\u202e" not in message


def test_the_language_list_is_whispers() -> None:
    from asr.whisper.tokenizer import LANGUAGES

    assert frozenset(LANGUAGES) == WHISPER_LANGUAGES


def test_every_error_code_and_end_reason_matches_the_schemas() -> None:
    w = EventWriter("f")
    for code in ErrorCode:
        check_event(w.stamp(w.error(code, "m", fatal=True)))
    for reason in ("flush", "disconnect", "idle", "server_shutdown", "max_duration", "error"):
        check_event(w.stamp(w.end(reason)))
    assert {ErrorCode.FLOW_EXISTS, ErrorCode.UNSUPPORTED_LANGUAGE, ErrorCode.RATE_LIMITED,
            ErrorCode.START_TIMEOUT} <= set(REJECT_CODES)


def test_message_rate_allows_bursts_within_two_seconds() -> None:
    r = MessageRate(10)
    assert all(r.take(0.0).wait_s == 0 for _ in range(20))  # 2 s worth at once
    v = r.take(0.0)
    assert v.wait_s == pytest.approx(0.1) and (v.notify, v.paced) == (True, 1)
    v = r.take(0.1)  # came back after its wait: the next one waits a full token
    assert v.wait_s == pytest.approx(0.1) and not v.notify  # one notice a second
    assert r.take(5.0).wait_s == 0  # refilled


def test_message_rate_paces_to_the_limit_and_drops_nothing() -> None:
    """A client that sends as fast as it can is read at per_s after its burst: the
    waits the session sleeps add up to exactly that, and every message is handled."""
    r = MessageRate(50)
    t, handled, notices = 0.0, 0, 0
    for _ in range(1100):  # the sender never waits; we sleep what we are told
        v = r.take(t)
        t += v.wait_s
        handled += 1
        notices += v.notify
    assert handled == 1100
    assert t == pytest.approx((1100 - 100) / 50)  # the 2 s burst, then 50 a second
    assert 19 <= notices <= 21  # one a second


@given(st.lists(st.floats(0, 0.5, allow_nan=False), min_size=1, max_size=300),
       st.floats(1, 1000))
def test_message_rate_never_lets_more_than_the_bucket_through(gaps: list[float],
                                                               per_s: float) -> None:
    """However the client times its messages, over any prefix the handled messages fit
    in the bucket plus what dripped in (the pacing holds the rate)."""
    r = MessageRate(per_s)
    t = 0.0
    for n, gap in enumerate(gaps, start=1):
        t += gap
        t += r.take(t).wait_s
        assert n <= r.capacity + t * per_s + 1e-6
