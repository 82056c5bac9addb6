"""Structured JSON logs for the ASR service: one object per line on stderr.

The same line format as the gateway's (``ts, level, logger, msg`` plus the design's
fields), kept here so that ``asr/`` never imports ``gateway/``: the ASR image and the
worker processes must run without the gateway's dependencies.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

FIELDS = ("flowId", "stage", "seq", "sr", "ns", "bytes_in", "bytes_out", "lang", "model",
          "latency_ms", "err_code", "asr_link_codec", "worker_pid", "utterance", "pool",
          "trace_id", "span_id")


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call; unknown names are refused so field names stay stable.

    Raises:
        ValueError: a name not in ``FIELDS``.
    """
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}")
    return {"vg_fields": values}


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
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: int = logging.INFO, *, json_format: bool = True) -> None:
    """Configure the root logger of an ASR process (JSON lines on stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_format else
                         logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
