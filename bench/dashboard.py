"""Render the Grafana dashboard's panels from a live Prometheus into PNGs (bench/out/).

Grafana is not installable here, so this is how the dashboard meets real data: it starts
an ASR service (the stand-in engine in one real inference worker process) and a gateway
in this process, the real ``prometheus`` server on loopback scraping both every second
with the project's rules (``for:`` shortened, see ``fast_rules``), drives a short load
through the gateway (streamed sessions, one bad frame, one refused start), then asks the
HTTP API for each panel's expressions over the load and draws them.

The helpers (``PrometheusProcess``, ``start_stack``, ``drive_load``, ``panel_targets``)
are shared with tests/integration/test_prometheus_live.py.

    python -m bench.dashboard [--load-s 12] [--out bench/out]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio
import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DASHBOARD = ROOT / "deploy" / "grafana" / "voxgate-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "voxgate-rules.yaml"
PROMETHEUS = shutil.which("prometheus")


# -- the dashboard's queries -------------------------------------------------------------

@dataclass(frozen=True)
class PanelTarget:
    """One query of one panel, with Grafana's variables replaced."""

    panel_id: int
    title: str
    ref: str
    expr: str
    legend: str
    unit: str
    thresholds: tuple[float, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.panel_id}{self.ref}"


def panel_targets(dashboard: Path = DASHBOARD, *, rate_interval_s: int = 5,
                  range_s: int = 60, pool: str = ".*") -> list[PanelTarget]:
    """Every panel query of the dashboard, ``$__rate_interval`` / ``$__range`` / ``$pool``
    replaced (``pool`` as the "All" value does: a regex).

    ``rate_interval_s`` of 5 suits a 1 s scrape (Grafana uses 4 scrape intervals).
    """
    data = json.loads(dashboard.read_text())
    out = []
    for panel in data["panels"]:
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        steps = defaults.get("thresholds", {}).get("steps", [])
        lines = tuple(float(s["value"]) for s in steps if s.get("value") is not None)
        for t in panel.get("targets", []):
            expr = (t["expr"].replace("$__rate_interval", f"{rate_interval_s}s")
                    .replace("$__range", f"{range_s}s").replace("$pool", pool))
            out.append(PanelTarget(panel["id"], panel["title"], t["refId"], expr,
                                   t.get("legendFormat", ""), defaults.get("unit", ""),
                                   lines))
    return out


def fast_rules(dst: Path, *, for_s: int = 3, interval_s: int = 1, src: Path = RULES
               ) -> Path:
    """The project's rules with every ``for:`` set to ``for_s`` and every group evaluated
    each ``interval_s``: the same expressions, on a test's time scale."""
    data = yaml.safe_load(src.read_text())
    for group in data["groups"]:
        group["interval"] = f"{interval_s}s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = f"{for_s}s"
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


# -- the Prometheus server ---------------------------------------------------------------

@dataclass(frozen=True)
class ScrapeTarget:
    job: str
    address: str  # host:port
    labels: dict[str, str] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusProcess:
    """The real ``prometheus`` server on 127.0.0.1 with tmp storage (a context manager).

    Args:
        workdir: holds the config, the rules and the TSDB.
        targets: scraped every ``interval_s``; rules evaluated as often.
        rules: a rule file (``fast_rules``' output), or None.
    """

    def __init__(self, workdir: Path, targets: Sequence[ScrapeTarget], *,
                 rules: Path | None = None, interval_s: int = 1,
                 binary: str | None = None) -> None:
        binary = binary or PROMETHEUS
        if binary is None:
            raise RuntimeError("prometheus is not installed (Debian package 'prometheus')")
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config: dict[str, Any] = {
            "global": {"scrape_interval": f"{interval_s}s",
                       "scrape_timeout": f"{interval_s}s",
                       "evaluation_interval": f"{interval_s}s"},
            "rule_files": [str(rules)] if rules else [],
            "scrape_configs": [{"job_name": t.job, "static_configs": [
                {"targets": [t.address], "labels": t.labels}]} for t in targets],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start the server; returns its URL (``wait_ready`` tells when it answers)."""
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self.url

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> PrometheusProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def wait_ready(self, client: httpx.AsyncClient, timeout_s: float = 30.0) -> None:
        """Until ``/-/ready`` says 200 (the server gives no other signal).

        Raises:
            RuntimeError: it exited or did not get ready in time (its log attached).
        """
        with trio.move_on_after(timeout_s):
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/-/ready")).status_code == 200:
                        return
                await trio.sleep(0.2)
        raise RuntimeError(f"prometheus did not get ready: {self.log.read_text()[-2000:]}")

    async def query_range(self, client: httpx.AsyncClient, expr: str, start: float,
                          end: float, step_s: float = 1.0) -> list[dict[str, Any]]:
        """The ``matrix`` result of ``expr`` (raises on a query error)."""
        r = await client.get(f"{self.url}/api/v1/query_range", params={
            "query": expr, "start": start, "end": end, "step": step_s})
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return list(body["data"]["result"])

    async def query(self, client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
        r = await client.get(f"{self.url}/api/v1/query", params={"query": expr})
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return list(body["data"]["result"])

    async def alerts(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        """Active alerts (pending and firing)."""
        r = await client.get(f"{self.url}/api/v1/alerts")
        return list(r.json()["data"]["alerts"])

    async def targets_up(self, client: httpx.AsyncClient) -> int:
        return sum(float(s["value"][1]) == 1 for s in await self.query(client, "up"))

    async def wait_scraped(self, client: httpx.AsyncClient, n: int,
                           timeout_s: float = 30.0) -> None:
        """Until ``n`` targets have been scraped successfully.

        Raises:
            RuntimeError: not within ``timeout_s``.
        """
        with trio.move_on_after(timeout_s):
            while await self.targets_up(client) < n:
                await trio.sleep(0.2)
            return
        raise RuntimeError(f"fewer than {n} targets up after {timeout_s:g} s")


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with a finite value (a NaN-only quantile draws nothing)."""
    return any(math.isfinite(float(v)) for s in result for _, v in s.get("values", []))


# -- the services and the load -----------------------------------------------------------

@dataclass
class Stack:
    asr_port: int
    ws_url: str
    http_port: int
    asr_stop: trio.Event
    asr_done: trio.Event
    gateway_stop: trio.Event
    backend: Any

    def scrape_targets(self) -> list[ScrapeTarget]:
        return [ScrapeTarget("voxgate-asr", f"127.0.0.1:{self.asr_port}",
                             {"component": "asr", "pool": "multi"}),
                ScrapeTarget("voxgate-gateway", f"127.0.0.1:{self.http_port}",
                             {"component": "gateway"})]


async def start_stack(nursery: trio.Nursery, workdir: Path, *, job_delay_s: float = 0.02
                      ) -> Stack:
    """An ASR service whose stand-in engine runs in one real inference worker process
    (so the worker series are real), and a gateway in front of it."""
    from asr.scheduler import Scheduler
    from asr.server import AsrServerConfig, serve
    from asr.workers import ProcessBackend, WorkerConfig
    from gateway.config import GatewayConfig
    from gateway.server import serve as gateway_serve
    from tests.standin import StandInEngine

    backend = ProcessBackend(StandInEngine(), functools.partial(
        StandInEngine, job_delay_s=job_delay_s), WorkerConfig(workers=1, standby_workers=0))
    cfg = AsrServerConfig(port=0)
    scheduler = Scheduler(backend.run_batch, threads=1, policy=cfg.scheduler_policy())
    asr_stop, asr_done = trio.Event(), trio.Event()

    async def run_asr(task_status: trio.TaskStatus[tuple[Any, int]]) -> None:
        try:
            await serve(backend, cfg, scheduler=scheduler, shutdown=asr_stop,
                        task_status=task_status)
        finally:
            await trio.to_thread.run_sync(backend.close)
            asr_done.set()

    app, asr_port = await nursery.start(run_asr)
    await app.ready_event.wait()
    gcfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(workdir / "records"),
        "asr_urls": f"http://127.0.0.1:{asr_port}", "flush_idle_s": 1.0})
    gateway_stop = trio.Event()
    ws_port, http_port = await nursery.start(functools.partial(
        gateway_serve, gcfg, shutdown=gateway_stop))
    return Stack(asr_port, f"ws://127.0.0.1:{ws_port}/ws/stream", http_port, asr_stop,
                 asr_done, gateway_stop, backend)


async def drive_load(ws_url: str, *, sessions: int = 6, concurrency: int = 3,
                     speed: float = 2.0) -> dict[str, int]:
    """Streamed sessions (speech between silences, paced at ``speed`` x real time), one of
    them with a bad frame (an error event), plus one refused start: every gateway series
    the dashboard reads gets a value."""
    from gateway.client import connect, stream_audio
    from tests import speech

    silence = np.zeros(8000, dtype=np.int16)
    audio = np.concatenate([silence, speech.goforward(), silence]).astype(np.int16)
    counts = {"sessions": 0, "finals": 0, "errors": 0, "refused": 0}
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            r = await stream_audio(ws_url, audio, speed=speed,
                                   start={"flowId": f"dash-{i}"}, timeout_s=60)
        counts["sessions"] += 1
        counts["finals"] += len(r.of("asr_final"))

    async def bad_frame() -> None:
        async with connect(ws_url) as ws:
            await ws.send_message(json.dumps({"type": "start", "flowId": "dash-bad"}))
            await ws.get_message()
            await ws.send_message(b"\x01\x02\x03")  # odd byte count: ODD_BYTE_COUNT
            await ws.send_message(json.dumps({"type": "flush"}))
            while json.loads(await ws.get_message())["type"] != "end":
                pass
        counts["errors"] += 1

    async def refused() -> None:
        async with connect(ws_url) as ws:
            await ws.send_message('{"type":"start","audio":{"sr":8000}}')
            await ws.get_message()  # UNSUPPORTED_AUDIO, fatal
        counts["refused"] += 1

    async with trio.open_nursery() as n:
        for i in range(sessions):
            n.start_soon(one, i)
        n.start_soon(bad_frame)
        n.start_soon(refused)
    return counts


# -- rendering ---------------------------------------------------------------------------

def _legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
    return text or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")


def render(results: dict[str, list[dict[str, Any]]], targets: Sequence[PanelTarget],
           out_dir: Path, t0: float, *, prefix: str = "dashboard") -> list[Path]:
    """One PNG per panel (``<prefix>_<id>.png``) and an overview grid
    (``<prefix>.png``); thresholds are drawn as dashed lines (the SLA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[int, list[PanelTarget]] = {}
    for t in targets:
        panels.setdefault(t.panel_id, []).append(t)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    cols = 4
    rows = -(-len(panels) // cols)
    grid, axes = plt.subplots(rows, cols, figsize=(cols * 5, rows * 3.2), squeeze=False)
    for k, (pid, ts) in enumerate(panels.items()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for a in (ax, axes[k // cols][k % cols]):
            _draw(a, ts, results, t0)
        fig.tight_layout()
        path = out_dir / f"{prefix}_{pid:02d}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    grid.tight_layout()
    path = out_dir / f"{prefix}.png"
    grid.savefig(path, dpi=70)
    plt.close(grid)
    return [path, *paths]


def _draw(ax: Any, ts: Sequence[PanelTarget], results: dict[str, list[dict[str, Any]]],
          t0: float) -> None:
    drew = False
    for t in ts:
        for series in results.get(t.key, []):
            xs = [float(x) - t0 for x, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            if any(math.isfinite(y) for y in ys):
                name = _legend(t.legend, series["metric"])
                ax.plot(xs, ys, lw=1.2, label=f"{t.ref}: {name}"[:48] if name else t.ref)
                drew = True
    for y in ts[0].thresholds:
        ax.axhline(y, ls="--", lw=0.8, color="tab:red" if y == max(ts[0].thresholds)
                   else "tab:orange")
    ax.set_title(f"{ts[0].title} (#{ts[0].panel_id})", fontsize=9)
    ax.set_xlabel("s since load start", fontsize=7)
    ax.set_ylabel(ts[0].unit, fontsize=7)
    ax.tick_params(labelsize=7)
    if drew:
        ax.legend(fontsize=6, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


# -- the benchmark -----------------------------------------------------------------------

async def run(out_dir: Path, load_s: float) -> dict[str, Any]:
    targets = panel_targets()
    with tempfile.TemporaryDirectory(prefix="vg-dash-") as tmp:
        work = Path(tmp)
        async with trio.open_nursery() as nursery:
            stack = await start_stack(nursery, work)
            rules = fast_rules(work / "rules.yaml")
            with PrometheusProcess(work, stack.scrape_targets(), rules=rules) as prom:
                async with httpx.AsyncClient(timeout=10) as client:
                    await prom.wait_ready(client)
                    await prom.wait_scraped(client, 2)
                    t0 = time.time()
                    counts: dict[str, int] = {}
                    rounds = 0
                    while time.time() - t0 < load_s:
                        got = await drive_load(stack.ws_url)
                        counts = {k: counts.get(k, 0) + v for k, v in got.items()}
                        rounds += 1
                    await trio.sleep(3)  # the last scrapes and rule evaluations
                    end = time.time()
                    results = {t.key: await prom.query_range(client, t.expr, t0, end)
                               for t in targets}
            stack.gateway_stop.set()
            stack.asr_stop.set()
    paths = render(results, targets, out_dir, t0)
    empty = sorted(t.key for t in targets if not has_data(results[t.key]))
    return {"load": counts, "rounds": rounds, "queries": len(targets),
            "without_data": empty, "pngs": [str(p.relative_to(ROOT)) for p in paths[:1]]
            + [f"{len(paths) - 1} panel PNGs"]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load-s", type=float, default=12.0, help="seconds of load")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if PROMETHEUS is None:
        print("prometheus is not installed (Debian package 'prometheus')", file=sys.stderr)
        return 2
    summary = trio.run(run, args.out, args.load_s)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
