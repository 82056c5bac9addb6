"""Structured JSON logs for the ASR service: one object per line on stderr.

Fields: ``ts, level, logger, msg`` plus those of the design that apply (``flowId,
stage, seq, sr, ns, bytes_in, bytes_out, lang, model, latency_ms, err_code,
asr_link_codec``, ...). Code logs with ``log.info("...", extra=fields(flowId=...))``.
A line logged within a traced span also carries ``trace_id`` and ``span_id``. The
gateway uses this module too (``gateway.logs``); it lives here because ``asr/`` must
never import ``gateway/``: the ASR image and its worker processes run without it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .tracing import current_ids

FIELDS = ("flowId", "stage", "seq", "sr", "ns", "bytes_in", "bytes_out", "lang", "model",
          "latency_ms", "err_code", "asr_link_codec", "worker_pid", "utterance", "pool",
          "trace_id", "span_id")


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call; unknown names are refused so field names stay stable,
    and a field given as None is left out.

    Raises:
        ValueError: a name not in ``FIELDS``.
    """
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}")
    return {"vg_fields": {k: v for k, v in values.items() if v is not None}}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the design's field names."""

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
    """Configure the root logger of a voxgate process (JSON lines on stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_format else
                         logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
