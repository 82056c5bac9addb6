"""ProcessBackend supervision with real worker processes.

A small fake backend (below; the workers import it from this module) can be told per
job to sleep, crash, hang or fail alone, so the supervisor's logic runs in real
processes in seconds. One slow test runs the real Whisper backend in a worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest

from asr.backend import LidResult, Recognition
from asr.workers import (
    ProcessBackend,
    WireJob,
    WorkerConfig,
    WorkerCrashed,
    WorkerHung,
    WorkersUnavailable,
)

if TYPE_CHECKING:
    from asr.scheduler import Job

ROOT = Path(__file__).resolve().parents[2]
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


class FakeBackend:
    """A backend whose jobs do what their options say (in the worker process).

    Options: ``text`` (echoed back with the worker's pid), ``sleep_s``, ``crash`` (the
    worker SIGKILLs itself), ``fail`` (this job's result is a ValueError),
    ``pidfile`` (the worker writes its pid there when the job starts).
    """

    def __init__(self, startup_s: float = 0.0) -> None:
        self.startup_s = startup_s

    def pools(self) -> dict[str, tuple[str, ...]]:
        return {"p": ("*",)}

    def select_pool(self, lang_hint: str, domain: str) -> str | None:
        return "p"

    def lid_pool(self) -> str | None:
        return None

    def partial_policy(self, pool: str) -> None:
        return None

    def warmup(self) -> None:
        time.sleep(self.startup_s)  # stands in for model load and warm-up

    def run_batch(self, pool: str, jobs: Sequence[Any]) -> list[Any]:
        out: list[Any] = []
        for job in jobs:
            opts = job.options
            if "pidfile" in opts:
                Path(opts["pidfile"]).write_text(str(os.getpid()))
            if opts.get("crash"):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(opts.get("sleep_s", 0.0))
            if "fail" in opts:
                out.append(ValueError(opts["fail"]))
            else:
                out.append(Recognition(f"{opts.get('text', '')}@{os.getpid()}", "en",
                                       no_speech_prob=float(job.audio.size)))
        return out


def make_fake(startup_s: float = 0.0) -> FakeBackend:
    return FakeBackend(startup_s)


def job(**options: Any) -> WireJob:
    return WireJob("final", "p", np.zeros(1600, dtype=np.float32), options)


def fake_pool(cfg: WorkerConfig, startup_s: float = 0.0) -> ProcessBackend:
    import functools

    return ProcessBackend(FakeBackend(), functools.partial(make_fake, startup_s), cfg)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped has exited: not alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(pred: Any, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


@pytest.fixture
def pool2() -> Iterator[ProcessBackend]:
    # Workers take 2 s to "load": a replacement cannot be cold-started within 1 s, so
    # a fast failover proves the warm standby did it.
    backend = fake_pool(WorkerConfig(workers=2, standby_workers=1, job_timeout_s=3.0),
                        startup_s=2.0)
    backend.warmup()
    yield backend
    backend.close()


@pytest.mark.timeout(60)
def test_kill9_mid_job_reruns_on_a_warm_worker(pool2: ProcessBackend, tmp_path: Path
                                               ) -> None:
    pids_before = {w["pid"] for w in pool2.health()["workers"]}
    assert len(pids_before) == 3 and pool2.health()["ok"]
    results: dict[str, Any] = {}

    def run(name: str, **opts: Any) -> None:
        results[name] = pool2.run_batch("p", [job(text=name, **opts)])

    victim = threading.Thread(target=run, args=("A",),
                              kwargs={"sleep_s": 0.6, "pidfile": str(tmp_path / "a")})
    other = threading.Thread(target=run, args=("B",),
                             kwargs={"sleep_s": 2.5, "pidfile": str(tmp_path / "b")})
    victim.start()
    other.start()
    assert wait_until(lambda: (tmp_path / "a").exists() and (tmp_path / "b").exists(), 5)
    pid_a = int((tmp_path / "a").read_text())
    pid_b = int((tmp_path / "b").read_text())
    assert pid_a != pid_b
    (tmp_path / "a").unlink()
    t_kill = time.monotonic()
    os.kill(pid_a, signal.SIGKILL)
    # The re-run starts on another worker well within 1 s of the kill ...
    assert wait_until(lambda: (tmp_path / "a").exists(), 1.0)
    t_rerun = time.monotonic() - t_kill
    victim.join(5)
    other.join(5)
    (a,) = results["A"]
    (b,) = results["B"]
    rerun_pid = int(a.text.split("@")[1])
    assert a.text.startswith("A@") and rerun_pid not in (pid_a, pid_b)
    # ... and the other stream's job ran on its own worker, once, untouched.
    assert b.text == f"B@{pid_b}" and b.no_speech_prob == 1600.0
    st = pool2.statistics()
    assert st.crashes == 1 and st.reruns == 1 and st.hangs == 0
    assert st.last_failover_s < 1.0 and t_rerun < 1.0
    # The supervisor starts a replacement in the background: the pool gets back to 3.
    assert wait_until(lambda: pool2.health()["ready"] == 3, 10)
    health = pool2.health()
    assert health["ok"] and health["restarts"] == 1 and health["crashes"] == 1
    assert pid_a not in {w["pid"] for w in health["workers"]}
    assert not alive(pid_a)


@pytest.mark.timeout(60)
def test_hung_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    cfg = WorkerConfig(workers=1, standby_workers=1, job_timeout_s=0.5,
                       job_timeout_per_audio_s=0.0)
    with fake_pool(cfg) as backend:
        backend.warmup()
        t0 = time.monotonic()
        with pytest.raises(WorkerHung, match="deadline"):
            backend.run_batch("p", [job(sleep_s=30, pidfile=str(tmp_path / "h"))])
        assert 0.5 <= time.monotonic() - t0 < 2.0
        hung_pid = int((tmp_path / "h").read_text())
        assert wait_until(lambda: not alive(hung_pid), 2)
        health = backend.health()
        assert health["hangs"] == 1 and health["ok"]  # one hang is not a crash loop
        # The standby answers the next job at once.
        (r,) = backend.run_batch("p", [job(text="next")])
        assert isinstance(r, Recognition) and r.text.startswith("next@")
        assert int(r.text.split("@")[1]) != hung_pid
        assert wait_until(lambda: backend.health()["ready"] == 2, 10)


@pytest.mark.timeout(60)
def test_crash_loop_makes_health_not_ok() -> None:
    cfg = WorkerConfig(workers=1, standby_workers=1, crash_loop_restarts=3,
                       crash_loop_window_s=60.0)
    with fake_pool(cfg) as backend:
        backend.warmup()
        assert backend.health()["ok"]
        # A poison batch kills its worker, and the one that re-runs it: two crashes.
        with pytest.raises(WorkerCrashed, match="two workers died"):
            backend.run_batch("p", [job(crash=True)])
        # Two crashes are not a crash loop; health is ok again once a replacement is up
        # (for an instant after both died, no worker is ready or starting).
        assert backend.statistics().crashes == 2 and not backend.health()["crash_looping"]
        assert wait_until(lambda: backend.health()["ready"] >= 1, 10)
        assert backend.health()["ok"]
        with pytest.raises(WorkerCrashed):
            backend.run_batch("p", [job(crash=True)])
        health = backend.health()
        assert health["crashes"] == 4 and health["crash_looping"]
        assert not health["ok"] and "crash-looping" in health["reason"]


@pytest.mark.timeout(30)
def test_a_failing_job_fails_only_its_slot() -> None:
    with fake_pool(WorkerConfig(workers=1, standby_workers=0)) as backend:
        backend.warmup()
        out = backend.run_batch("p", [job(text="ok1"), job(fail="unsupported language 'xx'"),
                                      job(text="ok2")])
        assert isinstance(out[0], Recognition) and out[0].text.startswith("ok1@")
        assert isinstance(out[1], ValueError) and str(out[1]) == "unsupported language 'xx'"
        assert isinstance(out[2], Recognition) and out[2].text.startswith("ok2@")
        st = backend.statistics()
        assert st.jobs == 3 and st.batches == 1 and st.crashes == 0
        assert len(st.cpu_s) == 1 and st.cpu_s[0] > 0


@pytest.mark.timeout(30)
def test_close_leaves_no_process_behind() -> None:
    backend = fake_pool(WorkerConfig(workers=2, standby_workers=1))
    backend.warmup()
    pids = [w["pid"] for w in backend.health()["workers"]]
    assert len(pids) == 3 and all(alive(p) for p in pids)
    # One worker busy at close time: it must go too.
    raised: list[BaseException] = []

    def busy() -> None:
        try:
            backend.run_batch("p", [job(sleep_s=20)])
        except WorkersUnavailable as exc:
            raised.append(exc)

    t = threading.Thread(target=busy)
    t.start()
    assert wait_until(lambda: backend.statistics().busy == 1, 5)
    t0 = time.monotonic()
    backend.close()
    t.join(5)
    assert time.monotonic() - t0 < 5
    assert not any(alive(p) for p in pids)
    assert not backend.health()["ok"]
    assert len(raised) == 1 and "closed" in str(raised[0])  # the batch learns why


PARENT_SCRIPT = """
import sys, threading, time
sys.path.insert(0, {root!r})
from asr.workers import ProcessBackend, WorkerConfig
from tests.integration.test_asr_workers import FakeBackend, job, make_fake
b = ProcessBackend(FakeBackend(), make_fake, WorkerConfig(workers=2, standby_workers=1,
                                                          job_timeout_s=60))
b.warmup()
# One worker is mid-job when the parent dies: it must not finish its 30 s first.
threading.Thread(target=b.run_batch, args=("p", [job(sleep_s=30)]), daemon=True).start()
while b.statistics().busy == 0:
    time.sleep(0.01)
print(" ".join(str(w["pid"]) for w in b.health()["workers"]), flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_workers_exit_when_the_parent_is_killed() -> None:
    proc = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT.format(root=str(ROOT))],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        proc.kill()
        proc.wait(5)
        assert wait_until(lambda: not any(alive(p) for p in pids), 3), \
            [p for p in pids if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_real_whisper_in_a_worker_matches_in_process() -> None:
    """The real engine in a worker answers as in-process; kill -9 of it mid-final is
    answered by the warm standby with the same text."""
    from asr.engine import DEFAULT_POOL, DEFAULT_POOLS, WhisperBackend
    from asr.whisper.audio import read_audio_file

    audio = read_audio_file(LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0880.wav")
    longer = read_audio_file(LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0870.wav")
    jobs = [WireJob("final", "en", audio, {"lang": "en"}),
            WireJob("lid", "multi", audio, {}),
            WireJob("final", "en", longer, {"lang": "en"})]
    cfg = WorkerConfig(workers=1, worker_threads=1, standby_workers=1)
    with ProcessBackend.whisper(DEFAULT_POOLS, DEFAULT_POOL, cfg) as backend:
        backend.start()  # the workers load while the reference decodes run here
        local = WhisperBackend(DEFAULT_POOLS, DEFAULT_POOL, threads=1)
        # The worker hands WireJobs to the engine as they are; do the same here.
        want_final = local.run_batch("en", cast("list[Job]", jobs[:1]))[0]
        want_lid = local.run_batch("multi", cast("list[Job]", jobs[1:2]))[0]
        want_longer = local.run_batch("en", cast("list[Job]", jobs[2:]))[0]
        backend.warmup()
        got_final = backend.run_batch("en", jobs[:1])[0]
        got_lid = backend.run_batch("multi", jobs[1:2])[0]
        partial = backend.run_batch("en", [WireJob("partial", "en", audio, {})])[0]
        policy = backend.partial_policy("en")
        # kill -9 of the worker in the middle of a 7 s final.
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.extend(backend.run_batch("en", jobs[2:])))
        t.start()
        assert wait_until(lambda: backend.statistics().busy == 1, 5)
        time.sleep(0.1)
        (busy,) = [w["pid"] for w in backend.health()["workers"] if w["state"] == "busy"]
        os.kill(busy, signal.SIGKILL)
        t.join(30)
        st = backend.statistics()
    assert isinstance(got_final, Recognition) and isinstance(want_final, Recognition)
    assert got_final.text == want_final.text
    assert "not an ill" in got_final.text.lower() and "young man" in got_final.text.lower()
    assert isinstance(got_lid, LidResult) and got_lid.lang == "en" == want_lid.lang
    # The parent's partial policy (tokenizer only, no model) reads the worker's tokens.
    assert isinstance(partial, Recognition) and partial.tokens
    assert policy is not None and policy.update(partial) == partial.text
    assert isinstance(want_longer, Recognition) and "dashwood" in want_longer.text.lower()
    assert [r.text for r in got] == [want_longer.text]
    assert st.crashes == 1 and st.reruns == 1 and st.last_failover_s < 1.0


def make_standin(delay_s: float) -> Any:
    from tests.standin import StandInEngine

    return StandInEngine(delay_s)


@pytest.mark.timeout(90)
async def test_server_stream_gets_its_final_when_its_worker_is_killed() -> None:
    """Through the real HTTP/2 service: the worker running a stream's final is killed;
    the final still arrives (re-run on the standby), and another stream is unaffected."""
    import functools

    import trio

    from asr import link
    from asr.scheduler import Scheduler
    from asr.server import AsrServerConfig, serve
    from gateway.h2client import connect
    from tests import speech
    from tests.linkclient import audio_frames, open_recognize, opus_packets
    from tests.standin import StandInEngine

    cfg = WorkerConfig(workers=2, standby_workers=1, job_timeout_s=5.0)
    backend = ProcessBackend(StandInEngine(), functools.partial(make_standin, 0.8), cfg)
    # No partials: the only batches are the two finals, so the busy worker is the final's.
    server_cfg = AsrServerConfig(port=0, partial_interval_ms=600_000)
    scheduler = Scheduler(backend.run_batch, threads=cfg.workers,
                          policy=server_cfg.scheduler_policy())
    audio = speech.goforward()
    packets = opus_packets(audio)
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            app, port = await nursery.start(functools.partial(
                serve, backend, server_cfg, scheduler=scheduler, shutdown=shutdown))
            with trio.fail_after(60):
                await app.ready_event.wait()
            finals: dict[str, link.AsrEvent] = {}

            async def stream(flow: str, kill: bool) -> None:
                async with connect("127.0.0.1", port) as conn:
                    ls = await open_recognize(conn, link.Start(flow_id=flow))
                    await ls.send(*audio_frames(packets), link.Finalize())
                    if kill:
                        while backend.statistics().busy == 0:
                            await trio.sleep(0.01)
                        await trio.sleep(0.1)
                        busy = [w["pid"] for w in backend.health()["workers"]
                                if w["state"] == "busy"]
                        assert len(busy) == 1
                        os.kill(busy[0], signal.SIGKILL)
                    finals[flow] = await ls.until("final")
                    await ls.send(link.End())
                    await ls.stream.end()
                    await ls.rest()

            with trio.fail_after(20):
                await stream("victim", kill=True)
                await stream("bystander", kill=False)
            shutdown.set()
    finally:
        backend.close()
    want = f"{len(packets) * 320 / 16000:.2f}s"
    assert finals["victim"].text.startswith(want), finals["victim"]
    assert finals["bystander"].text.startswith(want)
    st = backend.statistics()
    assert st.crashes == 1 and st.reruns == 1 and st.last_failover_s < 1.0
