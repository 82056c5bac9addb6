"""``voxgate gateway --workers 2``: a supervisor and two worker processes on shared ports.

Sessions are served, a killed worker is replaced while the instance keeps serving,
SIGTERM drains every session, a flowId is live once across the workers, a reconnect that
lands on the other worker resumes its session, and ``/metrics`` counts the whole instance.
A reconnect is made to land on the other worker by stopping (SIGSTOP) the worker that
holds the session while the client connects: only its sibling can accept and answer the
handshake; the owner is continued before the relayed ``start`` needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import trio
from trio_websocket import ConnectionClosed

from gateway.client import StreamResult, connect, stream_audio
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.server import Admission, ConnectionTable
from gateway.supervisor import (
    CRASH_LOOP_RESTARTS,
    SharedCounts,
    SharedFlows,
    Supervisor,
    WorkerLink,
    merge_expositions,
)
from tests import speech
from tests.contract import check_event
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
GOFORWARD = speech.goforward()
SILENCE = np.zeros(16000, dtype=np.int16)
AUDIO = np.concatenate([SILENCE, GOFORWARD, SILENCE]).astype(np.int16)
STEP = 320  # 20 ms frames
N_FRAMES = (len(AUDIO) + STEP - 1) // STEP
MAIN = "import sys; from gateway.cli import main; sys.exit(main(sys.argv[1:]))"


class Instance:
    """``voxgate gateway --workers N`` in a subprocess, its run directory under
    ``tmp``."""

    def __init__(self, tmp: Path, asr_url: str, env: dict[str, str], workers: int = 2
                 ) -> None:
        self.tmp = tmp
        (tmp / "run").mkdir()
        self.stderr = open(tmp / "gateway.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MAIN, "gateway", "--workers", str(workers), "--port", "0",
             "--http-port", "0", "--log-format", "text"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "ASR_URLS": asr_url,
                 "ARCHIVE_DIR": str(tmp / "records"),
                 "ARCHIVE_FALLBACK_DIR": str(tmp / "fallback"), "TMPDIR": str(tmp / "run"),
                 **env})
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        self.ws_url = self.proc.stdout.readline().strip()
        assert self.ws_url.startswith("ws://"), (first, self.ws_url, self.log())
        self.http = first.split()[2]  # "voxgate gateway: http://127.0.0.1:PORT (..."
        assert self.http.startswith("http://"), first

    def log(self) -> str:
        self.stderr.flush()
        return (self.tmp / "gateway.log").read_text()

    def worker_pids(self) -> set[int]:
        return {int(p.read_text().split()[0]) for p in self.run_dir().glob("workers/*")}

    def run_dir(self) -> Path:
        return next((self.tmp / "run").glob("voxgate-gateway-*"))

    def owner(self, flow_id: str) -> int:
        path = self.run_dir() / "flows" / hashlib.sha1(flow_id.encode()).hexdigest()
        return int(path.read_text().split()[0])

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # the workers see their lifeline close and exit
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


async def _instance(tmp: Path, asr_url: str, **env: str) -> Instance:
    return await trio.to_thread.run_sync(lambda: Instance(tmp, asr_url, env))


def _frame(i: int) -> bytes:
    return struct.pack("<II", i, i * 20) + AUDIO[i * STEP:(i + 1) * STEP].tobytes()


async def _drain(ws: Any, events: list[dict[str, Any]], stop: str | None = None) -> None:
    try:
        while True:
            events.append(json.loads(await ws.get_message()))
            if stop and events[-1]["type"] == stop:
                return
    except ConnectionClosed:
        return


async def test_two_workers_serve_resume_and_flow_exists_across_workers(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine())
    gw = await _instance(tmp_path, f"http://127.0.0.1:{port}", RESUME_WINDOW_S="10")
    try:
        assert len(gw.worker_pids()) == 2
        # Plain sessions, several at once: every one served, whichever worker took it.
        results: list[StreamResult] = []

        async def client(i: int) -> None:
            results.append(await stream_audio(gw.ws_url, AUDIO, realtime=False,
                                              start={"flowId": f"plain{i}"}))

        with trio.fail_after(40):
            async with trio.open_nursery() as n:
                for i in range(4):
                    n.start_soon(client, i)
        for r in results:
            assert r.of("end")[0]["reason"] == "flush"
            assert [f["utterance"] for f in r.of("asr_final")] == [0]
            assert r.of("record_url")

        start = json.dumps({"type": "start", "flowId": "hop", "features": ["seq_header"]})
        cut = 100  # 2.0 s: inside the utterance
        first: list[dict[str, Any]] = []
        second: list[dict[str, Any]] = []
        with trio.fail_after(40):
            async with connect(gw.ws_url) as ws, trio.open_nursery() as n:
                n.start_soon(_drain, ws, first)
                await ws.send_message(start)
                for i in range(cut):
                    await ws.send_message(_frame(i))
                await trio.sleep(0.5)
                owner = gw.owner("hop")
                assert owner in gw.worker_pids()

                # The flowId is live: a second client is refused whichever worker
                # takes it (stopping the owner puts it on the sibling).
                os.kill(owner, signal.SIGSTOP)
                try:
                    async with connect(gw.ws_url) as other:
                        await other.send_message(json.dumps(
                            {"type": "start", "flowId": "hop"}))
                        await trio.sleep(0.3)
                        os.kill(owner, signal.SIGCONT)
                        refused = json.loads(await other.get_message())
                finally:
                    os.kill(owner, signal.SIGCONT)
                check_event(refused)
                assert (refused["type"], refused["code"]) == ("error", "FLOW_EXISTS")
                await ws._stream.aclose()  # the connection drops: no flush, no close

            # The reconnect lands on the sibling (the owner is stopped while the
            # handshake happens) and resumes the session held by the owner.
            os.kill(owner, signal.SIGSTOP)
            try:
                async with connect(gw.ws_url) as ws:
                    await ws.send_message(start)
                    await trio.sleep(0.3)
                    os.kill(owner, signal.SIGCONT)
                    ack = json.loads(await ws.get_message())
                    second.append(ack)
                    assert ack["type"] == "ack" and ack["session"]["resumed"] is True, ack
                    nxt = ack["session"]["next_seq"]
                    assert 0 < nxt <= cut
                    for i in range(max(0, nxt - 3), N_FRAMES):
                        await ws.send_message(_frame(i))
                    await ws.send_message(json.dumps({"type": "flush"}))
                    await _drain(ws, second, stop="end")
            finally:
                os.kill(owner, signal.SIGCONT)
        assert gw.log().count("relaying a connection to the worker") == 2
        events = first + second
        for e in events:
            check_event(e)
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs)), seqs  # one event stream, continued
        assert [f["utterance"] for f in events if f["type"] == "asr_final"] == [0]
        m = next(e for e in events if e["type"] == "metrics")
        assert m["audio_ms"] == len(AUDIO) // 16  # every sample once
        data, _sr = soundfile.read(tmp_path / "records" / "hop.ogg", dtype="int16")
        assert abs(len(data) - len(AUDIO)) <= 320

        # /metrics answers for the instance, whichever worker serves the scrape.
        for _ in range(4):
            metrics = await trio.to_thread.run_sync(gw.metrics)
            assert metrics["gateway_workers"] == 2
            assert metrics["orchestrator_sessions_total"] == 5  # 4 plain + hop
            assert metrics['orchestrator_rejected_sessions_total{code="FLOW_EXISTS"}'] == 1
            assert metrics["orchestrator_active_sessions"] == 0
    finally:
        await trio.to_thread.run_sync(gw.close)


async def test_killed_worker_is_replaced_and_sigterm_drains(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine(delay_s=1.0))
    gw = await _instance(tmp_path, f"http://127.0.0.1:{port}", SHUTDOWN_GRACE_S="15")
    try:
        before = gw.worker_pids()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(20):
            while True:
                pids = gw.worker_pids()
                if len(pids) == 2 and victim not in pids:
                    break
                await trio.sleep(0.1)
        assert "was killed by SIGKILL" in gw.log()

        results: list[StreamResult] = []

        async def client(i: int) -> None:
            results.append(await stream_audio(gw.ws_url, AUDIO, realtime=True,
                                              start={"flowId": f"term{i}"}))

        with trio.fail_after(40):
            async with trio.open_nursery() as n:
                for i in range(4):
                    n.start_soon(client, i)
                await trio.sleep(2.0)  # mid-utterance
                gw.proc.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(gw.proc.wait)
        assert code == 0, gw.log()
        assert len(results) == 4
        for r in results:
            assert r.of("end")[0]["reason"] == "server_shutdown"
            assert [f["utterance"] for f in r.of("asr_final")] == [0]
            assert r.of("record_url")
        for i in range(4):
            data, _sr = soundfile.read(tmp_path / "records" / f"term{i}.ogg", dtype="int16")
            assert 1.5 < len(data) / 16000 < 2.6
        assert not list((tmp_path / "run").glob("voxgate-gateway-*"))  # removed
    finally:
        await trio.to_thread.run_sync(gw.close)


async def test_a_crash_looping_worker_stops_the_instance_with_status_1(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine())
    gw = await _instance(tmp_path, f"http://127.0.0.1:{port}")
    try:
        killed: set[int] = set()
        slot = gw.run_dir() / "workers" / "0"
        with trio.fail_after(60):
            while gw.proc.poll() is None:
                try:
                    pid = int(slot.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    pid = 0
                if pid and pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                await trio.sleep(0.05)
        assert gw.proc.returncode == 1
        assert len(killed) == CRASH_LOOP_RESTARTS
        assert "worker 0 is crash-looping" in gw.log()
        assert not list((tmp_path / "run").glob("voxgate-gateway-*"))
    finally:
        await trio.to_thread.run_sync(gw.close)


def test_registry_takes_a_flow_id_once(tmp_path: Path) -> None:
    for sub in ("flows", "workers"):
        (tmp_path / sub).mkdir()
    # Two live processes: this one and its parent stand for two workers.
    a = WorkerLink(0, tmp_path, "s", 0, 0, None, 0, pid=os.getpid(), port=1111)
    b = WorkerLink(1, tmp_path, "s", 0, 0, None, 0, pid=os.getppid(), port=2222)
    assert a.claim("f1") and a.claim("f1")  # again by its holder: still its own
    assert not b.claim("f1")
    assert b.owner_port("f1") == 1111 and a.owner_port("f1") is None
    b.release("f1")  # not b's: kept
    assert b.owner_port("f1") == 1111
    a.release("f1")
    assert b.claim("f1") and a.owner_port("f1") == 2222
    # A holder that died: its entry does not keep the flowId.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    c = WorkerLink(2, tmp_path, "s", 0, 0, None, 0, pid=dead.pid, port=3333)
    assert c.claim("f2")
    assert a.owner_port("f2") is None and a.claim("f2")


async def test_shared_flows_confirm_or_drop_a_claim(tmp_path: Path) -> None:
    for sub in ("flows", "workers"):
        (tmp_path / sub).mkdir()
    a = WorkerLink(0, tmp_path, "s", 0, 0, None, 0, pid=os.getpid(), port=1111)
    b = WorkerLink(1, tmp_path, "s", 0, 0, None, 0, pid=os.getppid(), port=2222)
    flows = SharedFlows(a)
    assert "x" not in flows  # free: taken for the assignment that follows
    assert not b.claim("x")
    flows["x"] = object()
    await trio.sleep(0)
    assert not b.claim("x") and "x" in flows
    del flows["x"]
    assert b.claim("x")
    assert "x" in flows  # b holds it now
    b.release("x")
    assert "y" not in flows  # a refused start: no assignment, the claim is dropped
    await trio.sleep(0.01)
    assert b.claim("y")


class _Sess:
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant


async def test_tenant_sessions_are_counted_over_the_instance(tmp_path: Path) -> None:
    for sub in ("flows", "workers", "tenants"):
        (tmp_path / sub).mkdir()
    a = SharedFlows(WorkerLink(0, tmp_path, "s", 0, 0, None, 0, pid=os.getpid()))
    b = SharedFlows(WorkerLink(1, tmp_path, "s", 0, 0, None, 0, pid=os.getppid()))
    for flows, flow_id in ((a, "t1"), (b, "t2"), (b, "t3")):
        assert flow_id not in flows
        flows[flow_id] = _Sess("acme")
    assert "u1" not in a
    a["u1"] = _Sess("")  # no tenant (no authentication): not counted
    assert a.tenant_sessions("acme") == b.tenant_sessions("acme") == 3
    assert a.tenant_sessions("other") == 0
    del b["t2"]
    del a["t1"]
    assert a.tenant_sessions("acme") == 1
    del b["t3"]
    assert a.tenant_sessions("acme") == 0 and not list((tmp_path / "tenants").iterdir())


def test_per_ip_cap_counts_the_whole_instance(tmp_path: Path) -> None:
    (tmp_path / "ips").mkdir()
    a = WorkerLink(0, tmp_path, "s", 0, 0, None, 0, pid=os.getpid())
    b = WorkerLink(1, tmp_path, "s", 0, 0, None, 0, pid=os.getppid())
    ta = ConnectionTable(100, max_per_ip=2, shared=SharedCounts(a))
    tb = ConnectionTable(100, max_per_ip=2, shared=SharedCounts(b))
    assert ta.opened("10.0.0.1") and ta.admit("10.0.0.1") is Admission.OK
    assert tb.opened("10.0.0.1") and tb.admit("10.0.0.1") is Admission.OK
    # The third connection of the address is over the cap, on whichever worker.
    assert tb.opened("10.0.0.1") and tb.admit("10.0.0.1") is Admission.RATE_LIMITED
    assert ta.opened("10.0.0.1")  # 4 open: twice the cap
    assert not tb.opened("10.0.0.1") and tb.dropped == 1  # closed at the accept
    assert tb.admit("10.0.0.2") is Admission.OK  # other addresses are not affected
    for t in (ta, ta, tb, tb):
        t.closed("10.0.0.1")
    assert ta.opened("10.0.0.1") and ta.admit("10.0.0.1") is Admission.OK
    ta.closed("10.0.0.1")
    assert not list((tmp_path / "ips").iterdir())  # nothing left behind


class _Exited:
    """Stands for the Popen of a worker that has exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid


def test_supervisor_restarts_with_backoff_and_gives_up_on_a_crash_loop(
        tmp_path: Path) -> None:
    sup = Supervisor(GatewayConfig.load(env={}, overrides={"workers": 2}),
                     log_level=0, json_logs=False)
    sup.run_dir = tmp_path
    for sub in ("flows", "workers", "ips", "tenants"):
        (tmp_path / sub).mkdir()
    w = sup.workers[0]
    (tmp_path / "flows" / "f").write_text("4242 1\n")  # the dead worker's flowId
    (tmp_path / "flows" / "g").write_text(f"{os.getpid()} 2\n")
    (tmp_path / "tenants" / "x").mkdir()
    (tmp_path / "tenants" / "x" / "f").write_text("4242 1\n")
    backoffs = []
    for _ in range(CRASH_LOOP_RESTARTS - 1):
        w.proc = _Exited(4242)  # type: ignore[assignment]
        w.started_at = time.monotonic()  # it dies at once
        sup._reaped(w, -signal.SIGKILL)
        backoffs.append(w.backoff_s)
        assert w.proc is None and not sup.failed and not sup.stopping
    assert backoffs == [0.5, 1.0, 2.0, 4.0]
    assert sorted(p.name for p in (tmp_path / "flows").iterdir()) == ["g"]
    assert not list((tmp_path / "tenants" / "x").iterdir())
    # A worker that had run long restarts at once.
    w.proc = _Exited(4243)  # type: ignore[assignment]
    w.started_at = time.monotonic() - 100
    w.exits.clear()
    sup._reaped(w, 1)
    assert w.backoff_s == 0 and not sup.failed
    # CRASH_LOOP_RESTARTS exits within the window: the instance stops, exit status 1.
    for _ in range(CRASH_LOOP_RESTARTS - 1):
        w.proc = _Exited(4244)  # type: ignore[assignment]
        w.started_at = time.monotonic()
        sup._reaped(w, 3)
    assert sup.failed and sup.stopping


def test_merged_metrics_sum_the_workers() -> None:
    one, two = GatewayMetrics(), GatewayMetrics()
    one.sessions.inc(3)
    two.sessions.inc(4)
    one.active_sessions.inc(2)
    two.final_latency.observe(300)
    one.final_latency.observe(300)
    # One worker alone comes out as it went in.
    alone = one.render()
    assert merge_expositions([alone]) == alone
    text = merge_expositions([one.render(), two.render()], workers_help="w").decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                 if line and not line.startswith("#"))
    assert float(lines["orchestrator_sessions_total"]) == 7
    assert float(lines["orchestrator_active_sessions"]) == 2
    assert float(lines['final_latency_ms_bucket{le="400.0"}']) == 2
    assert float(lines["final_latency_ms_count"]) == 2
    assert float(lines["gateway_workers"]) == 2
