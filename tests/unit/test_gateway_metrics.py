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


def test_link_counters_are_exported() -> None:
    # the asr_link_* counters read the pools' LinkCounters at each scrape
    from types import SimpleNamespace
    from typing import Any

    from gateway.asrlink import LinkCounters
    from gateway.server import _register_metrics

    counters = LinkCounters(discards=3, discards_by_finalize=2, failovers=1)
    pools: Any = SimpleNamespace(counters=counters)
    vad: Any = SimpleNamespace(stats=SimpleNamespace(windows=0, gated=0, last_tick_ms=0.0))
    table: Any = SimpleNamespace(open=0, refused_full=0, refused_rate_limited=0, dropped=0)
    metrics = GatewayMetrics()
    _register_metrics(metrics, vad, pools, None, table)
    samples = {s.name: s.value
               for fam in text_string_to_metric_families(metrics.render().decode())
               for s in fam.samples}
    assert samples["asr_link_discards_total"] == 3
    assert samples["asr_link_discards_by_finalize_total"] == 2
    assert samples["asr_link_failovers_total"] == 1
