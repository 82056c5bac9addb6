"""The rules and the dashboard against a real Prometheus server.

The real ``prometheus`` (Debian's package) runs on 127.0.0.1 with tmp storage, scraping
every second an ASR service (stand-in engine in one real inference worker process) and a
gateway, both started here, with the project's rules (``for:`` cut to 3 s by
``bench.dashboard.fast_rules``, same expressions). Under a short load:
- every Grafana panel query returns data, except the ones named in ``EXPECTED_EMPTY``
  (their series exist only under other conditions), and those indeed return none;
- stopping the ASR service takes ``VoxgateAsrDown`` from nothing to pending to firing.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import trio

from bench.dashboard import (
    PROMETHEUS,
    PrometheusProcess,
    drive_load,
    fast_rules,
    has_data,
    panel_targets,
    start_stack,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus server is not installed "
                       "(Debian package 'prometheus'; deploy/setup.sh installs it for CI)"),
]

# Panel queries (panel id + refId) that cannot return data under this load, and why.
EXPECTED_EMPTY: dict[str, str] = {}  # the gateway pre-creates its label values


async def test_panels_have_data_and_asr_down_goes_pending_then_firing(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    targets = panel_targets()
    assert set(EXPECTED_EMPTY) <= {t.key for t in targets}, "a listed panel is gone"
    stack = await start_stack(nursery, tmp_path)
    rules = fast_rules(tmp_path / "rules.yaml", for_s=3)
    with PrometheusProcess(tmp_path, stack.scrape_targets(), rules=rules) as prom:
        async with httpx.AsyncClient(timeout=10) as client:
            await prom.wait_ready(client)
            await prom.wait_scraped(client, 2)
            t0 = time.time()
            counts = await drive_load(stack.ws_url, sessions=4, concurrency=2, speed=3.0)
            assert counts["finals"] == counts["sessions"] == 4
            await trio.sleep(3)  # the last scrapes and a few rule evaluations
            end = time.time()
            empty = set()
            for t in targets:
                result = await prom.query_range(client, t.expr, t0 - 2, end)
                if not has_data(result):
                    empty.add(t.key)
            assert empty == set(EXPECTED_EMPTY), {
                k: next(t.expr for t in targets if t.key == k) for k in empty ^ set(EXPECTED_EMPTY)}

            # the recording rules ran on the live data too
            rtf = await prom.query(client, "voxgate:asr_rtf:rate5m")
            assert rtf and float(rtf[0]["value"][1]) > 0

            names = {a["labels"]["alertname"] for a in await prom.alerts(client)}
            assert "VoxgateAsrDown" not in names and "VoxgateAsrMetricsAbsent" not in names

            stack.asr_stop.set()
            with trio.fail_after(30):
                await stack.asr_done.wait()
            seen: list[str] = []
            with trio.fail_after(30):
                while "firing" not in seen:
                    for a in await prom.alerts(client):
                        if a["labels"]["alertname"] == "VoxgateAsrDown":
                            assert a["labels"]["component"] == "asr"
                            if not seen or seen[-1] != a["state"]:
                                seen.append(a["state"])
                    await trio.sleep(0.25)
            assert seen == ["pending", "firing"]
    stack.gateway_stop.set()
