"""Protocol v1 codec: parsing every upstream message, error codes, and event shapes."""

from __future__ import annotations

import json

import fastjsonschema
import pytest

from gateway.protocol import (
    ErrorCode,
    EventWriter,
    Finalize,
    Flush,
    Ping,
    ProtocolError,
    Start,
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
