"""JSON log lines carry the design's field names and nothing unknown."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.logs import JsonFormatter, fields


def test_json_line_has_fields() -> None:
    rec = logging.LogRecord("voxgate.x", logging.INFO, __file__, 1, "hello %s", ("w",), None)
    for k, v in fields(flowId="f1", stage="session", asr_link_codec="opus")["vg_fields"].items():
        rec.vg_fields = {**getattr(rec, "vg_fields", {}), k: v}
    out = json.loads(JsonFormatter().format(rec))
    assert out["msg"] == "hello w" and out["flowId"] == "f1" and out["asr_link_codec"] == "opus"
    assert out["ts"].endswith("Z") and out["level"] == "info"


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValueError):
        fields(flow_id="x")


def test_fields_given_as_none_are_left_out() -> None:
    assert fields(flowId="f", ns=None, stage="endpoint") == {
        "vg_fields": {"flowId": "f", "stage": "endpoint"}}
