"""Structured JSON logs: the gateway writes the same lines as the ASR service.

See ``asr.logs`` (one object a line, the design's field names, ``trace_id`` and
``span_id`` inside a traced span).
"""

from __future__ import annotations

from asr.logs import FIELDS, JsonFormatter, fields, setup

__all__ = ["FIELDS", "JsonFormatter", "fields", "setup"]
