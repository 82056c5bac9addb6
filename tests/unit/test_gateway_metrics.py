"""The gateway's metric registry: process_* series, and label values that exist at 0
before their first increment (so rate() sees that increment)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from gateway.protocol import EVENT_TYPES, REJECT_CODES, ErrorCode

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "protocol"


def _samples() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(GatewayMetrics().render().decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_process_collector_is_on_the_gateway_registry() -> None:
    s = _samples()
    assert s["process_cpu_seconds_total"][()] >= 0
    assert s["process_resident_memory_bytes"][()] > 0


def test_label_values_are_created_at_zero() -> None:
    s = _samples()
    rejected = s["orchestrator_rejected_sessions_total"]
    assert {dict(k)["code"] for k in rejected} == {c.value for c in REJECT_CODES}
    assert {dict(k)["code"] for k in s["client_errors_total"]} == {c.value for c in ErrorCode}
    assert {dict(k)["type"] for k in s["egress_events_total"]} == set(EVENT_TYPES)
    for series in (rejected, s["client_errors_total"], s["egress_events_total"]):
        assert set(series.values()) == {0.0}


def test_event_types_are_the_documented_events() -> None:
    documented = {p.name.split(".")[1] for p in SCHEMAS.glob("event.*.schema.json")}
    assert documented == set(EVENT_TYPES)


def test_reject_codes_are_error_codes() -> None:
    assert all(isinstance(c, ErrorCode) for c in REJECT_CODES)
