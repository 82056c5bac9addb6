"""Docs that other artifacts point into stay reachable, and ``voxgate --version`` works.

Why: every Prometheus alert carries a ``runbook: docs/operations.md#<anchor>`` link; an
anchor renamed in the runbook breaks the on-call link silently. The protocol examples
are copied from a real run; they must stay valid against the schemas.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest

from gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_anchor(m.group(1))
            for m in re.finditer(r"^#+\s+(.+)$", path.read_text(), re.MULTILINE)}


def test_every_runbook_link_has_its_section() -> None:
    links = set()
    for rules in (ROOT / "deploy" / "prometheus").glob("*.yaml"):
        links |= set(re.findall(r"runbook:\s*(docs/[\w./-]+)#([\w-]+)", rules.read_text()))
    assert len(links) >= 10  # the rules have a runbook link per alert
    missing = [f"{doc}#{anchor}" for doc, anchor in sorted(links)
               if anchor not in anchors(ROOT / doc)]
    assert not missing, f"runbook anchors without a section: {missing}"


def test_github_anchor() -> None:
    assert github_anchor("ASR worker restarts") == "asr-worker-restarts"
    assert github_anchor("4.1 Inference workers") == "41-inference-workers"


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"voxgate {version('voxgate')}"


def _schemas() -> dict[str, dict[str, object]]:
    out = {}
    for path in (ROOT / "docs" / "protocol").glob("*.schema.json"):
        out[path.name.removesuffix(".schema.json")] = json.loads(path.read_text())
    return out


def test_example_session_is_valid_against_the_schemas() -> None:
    """Every JSON message of the recorded example session passes its schema."""
    example = ROOT / "docs" / "protocol" / "example-session.jsonl"
    schemas = _schemas()
    seen = set()
    for line in example.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] != "text":
            continue
        msg = record["json"]
        name = msg["type"] if record["dir"] == "client" else f"event.{msg['type']}"
        jsonschema.validate(msg, schemas[name])
        seen.add(name)
    assert {"start", "flush", "event.ack", "event.asr_final", "event.record_url",
            "event.metrics", "event.end"} <= seen


METRIC_CALL = re.compile(
    r"\b(Counter|CounterMetricFamily|Gauge|GaugeMetricFamily|Histogram|counter_fn|gauge_fn)"
    r"\(\s*\"([a-z_]+)\"")


def metric_names(source: str) -> set[str]:
    """Exported names of the metrics a module registers with a literal name."""
    out = set()
    for kind, name in METRIC_CALL.findall(source):
        out.add(f"{name}_total" if kind in ("Counter", "CounterMetricFamily", "counter_fn")
                else name)
    return out


def test_operations_lists_every_metric() -> None:
    """Every metric the two services register by a literal name is in the runbook."""
    names = set()
    for module in ("asr/server.py", "gateway/metrics.py", "gateway/server.py"):
        names |= metric_names((ROOT / module).read_text())
    assert {"asr_jobs_total", "asr_rtf", "orchestrator_active_sessions",
            "archive_fallback_stored_total"} <= names
    text = (ROOT / "docs" / "operations.md").read_text()
    missing = sorted(n for n in names if f"`{n}" not in text)
    assert not missing, f"metrics missing from docs/operations.md: {missing}"


def test_metric_names() -> None:
    src = ('Counter("asr_streams", "x")\nGaugeMetricFamily("asr_rtf", "y")\n'
           'metrics.counter_fn("archive_fallback_stored", "z", f)\nHistogram(\n  "a_ms", "w")')
    assert metric_names(src) == {"asr_streams_total", "asr_rtf",
                                 "archive_fallback_stored_total", "a_ms"}
