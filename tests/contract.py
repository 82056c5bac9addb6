"""Contract checks: every event the server sends must match docs/protocol/ schemas."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import fastjsonschema

PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "docs" / "protocol"


@functools.cache
def _validator(name: str) -> Any:
    path = PROTOCOL_DIR / f"{name}.schema.json"
    return fastjsonschema.compile(json.loads(path.read_text()))


def check_event(event: dict[str, Any]) -> None:
    """Raise if ``event`` does not match the schema of its ``type``."""
    kind = event.get("type")
    if not isinstance(kind, str) or not (PROTOCOL_DIR / f"event.{kind}.schema.json").exists():
        raise AssertionError(f"event of unknown type: {event!r}")
    _validator(f"event.{kind}")(event)


def check_client_message(message: dict[str, Any]) -> None:
    _validator(str(message["type"]))(message)
