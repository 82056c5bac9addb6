"""The operations runbook documents every setting the code has, with the code's default.

Why: the docs drifted from the code more than once (a 60 s idle timeout documented while
the code said 3600 s; a scheduler knob documented after it was gone). This check reads
the settings the way an operator sees them (``voxgate gateway --help``, ``voxgate asr
--help``, the ``[server]``/``[workers]``/``[pools.<name>]`` TOML keys) and the settings
tables of ``docs/operations.md``, and fails with one list of everything missing, stale or
documented with another default.

Table convention in ``docs/operations.md``: the first cell names the setting in
backticks (an environment variable, a TOML key, or a ``--flag``; several names may share
a row), the second cell starts with the default. ``empty`` documents an empty string,
``none`` a missing value; anything after the first word (``empty (AWS S3)``) is
explanation. A table belongs to the paragraph right before it when that paragraph starts
with a name in backticks: `` `[server]` `` (a TOML table), `` `voxgate asr` `` (its
options); the gateway's table is the one that documents ``VOXGATE_HOST``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from asr.engine import PoolSpec
from asr.server import AsrServerConfig
from asr.workers import WorkerConfig
from gateway.cli import build_parser
from gateway.config import GatewayConfig

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"

# Names a gateway table may carry besides GatewayConfig's fields.
GATEWAY_EXTRA = {"VOXGATE_CONFIG"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a settings table: the names in its first cell, its default cell."""

    names: tuple[str, ...]
    default: str
    caption: str  # the backticked name opening the paragraph before the table
    line: int


def parse_tables(text: str) -> list[Row]:
    """Rows of every Markdown table whose first cell names something in backticks."""
    rows: list[Row] = []
    caption = ""
    paragraph_start = True
    in_table = False
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if in_table and not stripped.startswith("|"):
            caption = ""  # a caption names only the table right after it
        in_table = stripped.startswith("|")
        if not stripped:
            paragraph_start = True
            continue
        if in_table:
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if len(cells) < 2 or set(cells[0]) <= {"-", ":", " "}:
                continue
            names = tuple(re.findall(r"`([^`]+)`", cells[0]))
            if names:
                rows.append(Row(names, cells[1], caption, lineno))
            paragraph_start = False
            continue
        if stripped.startswith("#"):
            caption = ""
        elif paragraph_start:
            m = re.match(r"`([^`]+)`", stripped)
            caption = m.group(1) if m else ""
        paragraph_start = False
    return rows


def doc_value(cell: str) -> str:
    """The documented default: the first word of the cell, backticks removed."""
    text = cell.replace("`", "").strip()
    word = text.split()[0] if text.split() else ""
    if word.lower() in ("empty", "none"):
        return ""
    return word


def same(code: str, doc: str) -> bool:
    """Equal as numbers, as booleans, or as text."""
    if code.lower() in ("true", "false"):
        return code.lower() == doc.lower()
    try:
        return float(code) == float(doc)
    except ValueError:
        return code == doc


def gateway_settings() -> dict[str, str]:
    """Environment variable -> default, read from ``voxgate gateway --help``."""
    help_text = _subparser("gateway").format_help()
    settings = {}
    for line in help_text.splitlines():
        m = re.match(r"\s+([A-Z][A-Z0-9_]+)\s.*\[([^\]]*)\]\s*$", line)
        if m:
            settings[m.group(1)] = m.group(2)
    return settings


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices[name]
            return sub
    raise LookupError(name)


def flag_defaults(name: str) -> dict[str, str]:
    """``--flag`` -> default as ``voxgate <name> --help`` states it."""
    out = {}
    for action in _subparser(name)._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or flags[0] == "--help":
            continue
        if action.default is not None:
            out[flags[0]] = str(action.default)
        else:
            m = re.search(r"\(default ([^)\s]+)\)", action.help or "")
            out[flags[0]] = m.group(1) if m else ""
    return out


def _toml_default(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return str(value)


def toml_keys(cls: type) -> dict[str, str]:
    """Field name -> default of a config dataclass (the TOML keys of its table)."""
    return {f.name: _toml_default(f.default) for f in dataclasses.fields(cls)}


def check(rows: list[Row]) -> list[str]:
    """Every problem found, one line each."""
    problems: list[str] = []
    by_name: dict[str, list[Row]] = {}
    for row in rows:
        for n in row.names:
            by_name.setdefault(n, []).append(row)

    def expect(name: str, default: str, where: str,
               scope: Callable[[Row], bool] = lambda r: True) -> None:
        found = [r for r in by_name.get(name, []) if scope(r)]
        if not found:
            problems.append(f"missing: {where} {name} (default {default!r})")
            return
        for r in found:
            if not same(default, doc_value(r.default)):
                problems.append(f"different default: {where} {name}: code {default!r}, "
                                f"docs {r.default!r} (line {r.line})")

    gateway = gateway_settings()
    in_gateway_table = partial(_is_gateway_table_row, rows=rows)
    for var, default in gateway.items():
        expect(var, default, "gateway setting", in_gateway_table)
    for flag, default in flag_defaults("gateway").items():
        expect(flag, default, "voxgate gateway", in_gateway_table)
    for flag, default in flag_defaults("asr").items():
        expect(flag, default, "voxgate asr", lambda r: r.caption == "voxgate asr")
    tables = {"[server]": AsrServerConfig, "[workers]": WorkerConfig,
              "[pools.<name>]": PoolSpec}
    for caption, cls in tables.items():
        keys = toml_keys(cls)
        for key, default in keys.items():
            expect(key, default, f"ASR {caption}",
                   lambda r, c=caption: r.caption == c)  # type: ignore[misc]
        for row in rows:
            if row.caption == caption:
                stale = [n for n in row.names if not n.startswith("-") and n not in keys]
                problems += [f"stale: ASR {caption} {n} is documented (line {row.line}) "
                             "but is not a key" for n in stale]
    for row in rows:
        if not _is_gateway_table_row(row, rows):
            continue
        stale = [n for n in row.names if re.fullmatch(r"[A-Z][A-Z0-9_]+", n)
                 and n not in gateway and n not in GATEWAY_EXTRA]
        problems += [f"stale: gateway setting {n} is documented (line {row.line}) but "
                     "voxgate gateway --help does not list it" for n in stale]
    return problems


def _is_gateway_table_row(row: Row, rows: list[Row]) -> bool:
    """A row of the table that documents VOXGATE_HOST (the gateway settings table)."""
    anchor = next((r for r in rows if "VOXGATE_HOST" in r.names), None)
    if anchor is None:
        return False
    # Rows on contiguous lines around the anchor form its table.
    lines = {r.line for r in rows}
    start = end = anchor.line
    while start - 1 in lines:
        start -= 1
    while end + 1 in lines:
        end += 1
    return start <= row.line <= end


def test_operations_documents_every_setting_with_its_default() -> None:
    problems = check(parse_tables(OPERATIONS.read_text()))
    assert not problems, "docs/operations.md does not match the code:\n" + "\n".join(
        problems)


def test_help_lists_the_settings_the_check_reads() -> None:
    # Guards the parsers above: an empty read would pass vacuously.
    gateway = gateway_settings()
    assert {"PARTIAL_INTERVAL_MS", "ASR_URLS", "PUBLIC_BASE"} <= set(gateway)
    assert len(gateway) == len(dataclasses.fields(GatewayConfig))
    assert gateway["PARTIAL_INTERVAL_MS"] == "250"
    asr = flag_defaults("asr")
    assert asr["--workers"] == str(WorkerConfig().workers)
    assert asr["--host"] == "127.0.0.1" and asr["--config"] == ""


TABLE = """\
## 4. ASR

`voxgate asr` options:

| option | default | meaning |
|---|---|---|
| `--port` | 8080 | wrong |

`[server]` (unknown keys are refused):

| key | default | meaning |
|---|---|---|
| `max_streams` | 31 | wrong default |
| `partial_max_pending` | 1 | gone |

| variable | default | meaning |
|---|---|---|
| `VOXGATE_HOST` (`--host`) | `127.0.0.1` | listen address |
| `OLD_SETTING` | 3 | removed |
| `PUBLIC_BASE` | empty (the listen address) | base |
"""


def test_check_reports_missing_stale_and_different() -> None:
    problems = check(parse_tables(TABLE))
    text = "\n".join(problems)
    assert "different default: ASR [server] max_streams: code '32'" in text
    assert "stale: ASR [server] partial_max_pending" in text
    assert "stale: gateway setting OLD_SETTING" in text
    assert "missing: ASR [server] stream_idle_timeout_s" in text
    assert "missing: gateway setting ASR_URLS" in text
    assert "VOXGATE_HOST" not in text and "PUBLIC_BASE" not in text
    assert "missing: voxgate gateway --host" not in text
    assert "different default: voxgate asr --port: code '8090', docs '8080'" in text
    assert "missing: voxgate gateway --port" in text  # the ASR table's row does not count


@pytest.mark.parametrize(("code", "doc", "equal"), [
    ("3.0", "3", True), ("3600.0", "60", False), ("False", "false", True),
    ("", "", True), ("int8", "int8", True), ('["*"]', '["*"]', True), ("a", "b", False),
])
def test_same(code: str, doc: str, equal: bool) -> None:
    assert same(code, doc) is equal
