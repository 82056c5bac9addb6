"""Structured JSON logs: one object per line, with the design's field names.

Fields: ``ts, flowId, stage, seq, sr, ns, bytes_in, bytes_out, lang, model, latency_ms,
err_code, asr_link_codec`` (those that apply), plus ``level``, ``logger`` and ``msg``.
Code logs with ``log.info("...", extra=fields(flowId=..., stage=...))``. A line logged
within a traced span also carries ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from asr.tracing import current_ids

FIELDS = ("flowId", "stage", "seq", "sr", "ns", "bytes_in", "bytes_out", "lang", "model",
          "latency_ms", "err_code", "asr_link_codec")


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call; unknown names are refused so field names stay stable."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}")
    return {"vg_fields": values}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "vg_fields", {}))
        trace_id, span_id = current_ids()
        if trace_id:
            out["trace_id"], out["span_id"] = trace_id, span_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: int = logging.INFO, *, json_format: bool = True) -> None:
    """Configure the root logger for a voxgate command (JSON lines on stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_format else
                         logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
