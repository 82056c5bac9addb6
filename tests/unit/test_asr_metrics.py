"""The ASR service's /metrics: counters where things are counted, RTF from two counters,
process_* series, the inference workers' CPU and restarts, SLA-centred latency buckets.

The app is built around a scheduler stand-in whose ``statistics()`` we set, so the
values can be checked exactly; nothing here opens a socket.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from asr.scheduler import Scheduler, SchedulerStats
from asr.server import AsrApp
from asr.workers import WorkerStats
from tests.standin import StandInEngine


class _Sched:
    """What ``Metrics`` reads from the scheduler."""

    def __init__(self, stats: SchedulerStats) -> None:
        self.stats = stats
        self.queued = stats.queued

    def statistics(self) -> SchedulerStats:
        return self.stats


class _WorkerEngine(StandInEngine):
    """A stand-in with a worker backend's ``statistics()``."""

    def __init__(self, stats: WorkerStats) -> None:
        super().__init__()
        self.stats = stats

    def statistics(self) -> WorkerStats:
        return self.stats


STATS = SchedulerStats(queued=3, running=1, batches=10, jobs_done=40, partials_dropped=7,
                       busy_rejections=0, audio_s=12.5, compute_s=3.0, jobs_failed=2,
                       deadline_misses={"final": 4}, starved_promotions=5)
WSTATS = WorkerStats(workers=2, standby_workers=1, ready=3, busy=1, starting=0, batches=9,
                     jobs=30, restarts=4, crashes=3, hangs=1, failed_starts=0, reruns=2,
                     crash_looping=False, last_failover_s=0.2, cpu_s=(10.0, 2.5),
                     retired_cpu_s=7.5)


def _scrape(engine: StandInEngine, stats: SchedulerStats = STATS
            ) -> tuple[dict[str, str], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    app = AsrApp(engine, cast(Scheduler, _Sched(stats)))
    text = app.metrics.render().decode()
    types: dict[str, str] = {}
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            s = cast(Sample, s)
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, values


def _v(values: dict[Any, float], name: str, **labels: str) -> float:
    return values[(name, tuple(sorted(labels.items())))]


def test_counted_things_are_counters_and_rtf_has_its_counters() -> None:
    types, values = _scrape(StandInEngine())
    for name in ("asr_partials_dropped", "asr_partials_promoted", "asr_jobs_failed",
                 "asr_deadline_misses", "asr_audio_seconds", "asr_compute_seconds",
                 "asr_jobs", "asr_batches", "asr_streams", "asr_busy_rejections"):
        assert types[name] == "counter", name
    assert types["asr_rtf"] == "gauge" and types["asr_queue_depth"] == "gauge"
    assert _v(values, "asr_partials_dropped_total") == 7
    assert _v(values, "asr_partials_promoted_total") == 5
    assert _v(values, "asr_jobs_failed_total") == 2
    assert _v(values, "asr_audio_seconds_total") == 12.5
    assert _v(values, "asr_compute_seconds_total") == 3.0
    assert _v(values, "asr_rtf") == pytest.approx(3.0 / 12.5)
    assert _v(values, "asr_deadline_misses_total", kind="final") == 4
    assert _v(values, "asr_deadline_misses_total", kind="partial") == 0
    assert _v(values, "asr_queue_depth") == 3
    # no gauge is left under the old, un-suffixed name of a count
    assert ("asr_partials_dropped", ()) not in values


def test_degraded_finals_per_pool_and_discarded_utterances() -> None:
    """A pool that may degrade has its series from 0; counted pools show their count."""
    sched = _Sched(SchedulerStats(0, 0, 0, 0, 0, 0, 0.0, 0.0,
                                  degraded_finals={"en": 3}))
    sched.core = SimpleNamespace(degradable=frozenset({"en", "en2"}))  # type: ignore[attr-defined]
    app = AsrApp(StandInEngine(), cast(Scheduler, sched))
    app.metrics.discarded.inc()
    fams = {f.name: f for f in text_string_to_metric_families(app.metrics.render().decode())}
    assert fams["asr_degraded_finals"].type == "counter"
    got = {s.labels["pool"]: s.value for s in fams["asr_degraded_finals"].samples}
    assert got == {"en": 3, "en2": 0}
    assert fams["asr_discarded_utterances"].type == "counter"
    assert [s.value for s in fams["asr_discarded_utterances"].samples
            if s.name.endswith("_total")] == [1.0]


def test_labelled_counters_start_at_zero() -> None:
    _, values = _scrape(StandInEngine())
    assert _v(values, "asr_link_errors_total", code="BAD_AUDIO") == 0
    assert _v(values, "asr_events_total", type="final") == 0
    assert _v(values, "asr_flow_events_total", code="BEHIND") == 0


def test_process_series_are_exported() -> None:
    types, values = _scrape(StandInEngine())
    assert types["process_cpu_seconds"] == "counter"
    assert _v(values, "process_resident_memory_bytes") > 1e6
    assert _v(values, "process_open_fds") >= 3


def test_latency_buckets_surround_the_sla() -> None:
    _, values = _scrape(StandInEngine())
    bounds = {float(dict(k[1])["le"]) for k in values if k[0] == "asr_latency_ms_bucket"}
    for ms in (100, 200, 300, 400, 500, 600, 800, 1000, 1500, 2000):
        assert ms in bounds, ms


def test_worker_backend_cpu_and_restarts() -> None:
    types, values = _scrape(_WorkerEngine(WSTATS))
    assert types["asr_worker_cpu_seconds"] == "counter"
    assert _v(values, "asr_worker_cpu_seconds_total") == pytest.approx(20.0)
    assert _v(values, "asr_worker_restarts_total") == 4
    assert _v(values, "asr_worker_crashes_total") == 3
    assert _v(values, "asr_worker_hangs_total") == 1
    assert _v(values, "asr_worker_reruns_total") == 2
    assert _v(values, "asr_workers", state="busy") == 1
    assert _v(values, "asr_workers", state="idle") == 2
    assert _v(values, "asr_workers_wanted") == 3
    assert _v(values, "asr_workers_crash_looping") == 0


def test_no_worker_series_without_a_worker_backend() -> None:
    types, _ = _scrape(StandInEngine())
    assert not [n for n in types if n.startswith("asr_worker")]
