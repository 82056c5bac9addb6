"""promtool on what we ship and what we export: the rule file and its unit tests, and
``promtool check metrics`` on the ASR service's and the gateway's ``/metrics`` after real
traffic. Also the ASR service's JSON log lines for that traffic.

promtool comes with Debian's ``prometheus`` package; without it these tests skip.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from asr import link
from asr.logs import FIELDS, JsonFormatter
from gateway.config import GatewayConfig
from gateway.h2client import connect
from gateway.server import serve
from tests import speech
from tests.linkclient import audio_frames, open_recognize, opus_packets
from tests.standin import StandInEngine, start_asr

PROMTOOL = shutil.which("promtool")
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package "
                       "'prometheus'; deploy/setup.sh installs it for CI)"),
]
RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"

# promtool's lint flags `_ms` as an abbreviated unit. These names are the design's (the
# seed names asr_latency_ms and the stage latencies), so they stay; any other problem
# fails. vad_tick_ms is the gateway's and not seed-named (reported for a rename).
SEED_MS_NAMES = frozenset({
    "asr_latency_ms", "vad_latency_ms", "dn_latency_ms", "lid_latency_ms",
    "compress_latency_ms", "first_partial_latency_ms", "final_latency_ms", "vad_tick_ms"})


def _promtool(*args: str, stdin: str | None = None, cwd: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=30, check=False)


def lint_problems(text: str) -> set[tuple[str, str]]:
    """``promtool check metrics`` problems as (metric family, message), ``_created``
    folded into its family; an exposition it cannot parse is a failure of its own."""
    r = _promtool("check", "metrics", stdin=text)
    out = (r.stdout + r.stderr).strip()
    problems: set[tuple[str, str]] = set()
    for line in out.splitlines():
        name, _, message = line.partition(" ")
        assert message, f"promtool said {line!r}"
        problems.add((name.removesuffix("_created"), message))
    assert r.returncode in (0, 3), f"promtool check metrics failed: {out}"
    assert (r.returncode == 0) == (not problems), out
    return problems


def unexpected(problems: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(n, m) for n, m in problems
            if not (n in SEED_MS_NAMES and "abbreviated units" in m)}


def test_rules_check() -> None:
    r = _promtool("check", "rules", str(RULES_DIR / "voxgate-rules.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_rules_unit_tests() -> None:
    r = _promtool("test", "rules", "voxgate-rules.test.yaml", cwd=RULES_DIR)
    assert r.returncode == 0, r.stdout + r.stderr


def test_lint_catches_a_gauge_named_like_a_counter() -> None:
    """The check above can fail: a counter without ``_total`` is a problem."""
    text = "# HELP x_dropped d\n# TYPE x_dropped counter\nx_dropped 3\n"
    assert unexpected(lint_problems(text))


async def test_asr_metrics_pass_promtool_and_logs_carry_the_fields(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voxgate.asr")
    _, port, stop = await start_asr(nursery, StandInEngine())
    frames = audio_frames(opus_packets(speech.goforward()))
    async with connect("127.0.0.1", port) as conn:
        ls = await open_recognize(conn, link.Start(flow_id="promflow-1", lang_hint="en"))
        await ls.send(*frames, link.Finalize(), link.End())
        await ls.stream.end()
        events = await ls.rest()
        pcm = await open_recognize(conn, link.Start(flow_id="promflow-2", codec="pcm"))
        await pcm.send(*audio_frames([b"\0" * 100]), link.End())  # not 20 ms: BAD_AUDIO
        await pcm.stream.end()
        await pcm.rest()
    assert [e.type for e in events][-2:] == ["final", "end"]
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    stop.set()
    assert unexpected(lint_problems(text)) == set()
    assert "asr_audio_seconds_total" in text and "process_cpu_seconds_total" in text
    assert 'asr_events_total{type="final"} 1.0' in text
    assert 'asr_link_errors_total{code="BAD_AUDIO"}' in text

    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records
             if r.name == "voxgate.asr"]
    by = {(ln.get("flowId"), ln["msg"].split(":")[0]): ln for ln in lines}
    start, final, end = (by[("promflow-1", m)] for m in ("stream start", "final",
                                                        "stream end"))
    assert start["asr_link_codec"] == "opus" and start["lang"] == "en"
    assert start["sr"] == 16000 and start["model"] == "en"  # stand-in: the pool's name
    assert final["model"] == "en" and final["lang"] == "en" and final["utterance"] == 0
    assert final["latency_ms"] >= 0 and final["ns"] == len(frames) * 320
    assert end["ns"] == len(frames) * 320 and end["seq"] == len(frames) - 1
    assert end["bytes_in"] > 0 and end["bytes_out"] > 0 and end["err_code"] == ""
    err = by[("promflow-2", "stream error")]
    assert err["err_code"] == "BAD_AUDIO" and err["level"] == "warning"
    assert by[("promflow-2", "stream end")]["err_code"] == "BAD_AUDIO"
    for ln in lines:
        assert "promflow" not in ln["msg"]  # the flow id is a field, not message text
        assert set(ln) <= {"ts", "level", "logger", "msg", "exc", *FIELDS}


async def test_gateway_metrics_pass_promtool(nursery: trio.Nursery, tmp_path: Path
                                             ) -> None:
    _, asr_port, asr_stop = await start_asr(nursery, StandInEngine())
    cfg = GatewayConfig.load(env={}, overrides={
        "port": 0, "http_port": 0, "archive_dir": str(tmp_path / "records"),
        "asr_urls": f"http://127.0.0.1:{asr_port}"})
    shutdown = trio.Event()
    _, http_port = await nursery.start(functools.partial(serve, cfg, shutdown=shutdown))
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{http_port}/metrics")).text
    shutdown.set()
    asr_stop.set()
    assert "orchestrator_active_sessions" in text
    assert unexpected(lint_problems(text)) == set()
