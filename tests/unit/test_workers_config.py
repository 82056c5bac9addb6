"""Worker settings: validation, the [workers] TOML table, command-line overrides."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from asr.engine import DEFAULT_POOL, DEFAULT_POOLS
from asr.main import load_config
from asr.workers import WorkerConfig
from gateway.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kwargs", [
    {"workers": -1}, {"workers": 65}, {"worker_threads": 0}, {"standby_workers": -1},
    {"job_timeout_s": 0.0}, {"job_timeout_per_audio_s": -1.0}, {"start_timeout_s": -5.0},
    {"crash_loop_restarts": 0}, {"crash_loop_window_s": 0.0},
])
def test_invalid_values_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        WorkerConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("table", "match"), [
    ({"wrokers": 2}, "unknown keys"),
    ({"workers": "2"}, "workers must be int"),
    ({"workers": 1.5}, "workers must be int"),
    ({"standby_workers": True}, "standby_workers must be int"),
    ({"job_timeout_s": "10"}, "job_timeout_s must be float"),
])
def test_bad_table_is_refused(table: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WorkerConfig.from_dict(table)


def test_toml_table_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "asr.toml"
    path.write_text("[server]\nmax_streams = 8\n[workers]\nworkers = 3\njob_timeout_s = 4\n"
                    "standby_workers = 0\n")
    cfg, pools, default, wcfg = load_config(path, workers={"workers": 1,
                                                           "worker_threads": None})
    assert cfg.max_streams == 8 and default in pools
    assert wcfg == WorkerConfig(workers=1, job_timeout_s=4.0, standby_workers=0)
    assert isinstance(wcfg.job_timeout_s, float)


def test_unknown_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "asr.toml"
    path.write_text("[worker]\nworkers = 3\n")
    with pytest.raises(ValueError, match="unknown keys or tables"):
        load_config(path)


def test_shipped_asr_toml_loads() -> None:
    _, pools, default, wcfg = load_config(ROOT / "deploy/docker/asr.toml")
    assert wcfg == WorkerConfig()  # the image runs the code defaults
    # The image's pools are the code's defaults, not a stale copy of older ones.
    assert pools == DEFAULT_POOLS and default == DEFAULT_POOL


def test_help_lists_every_worker_knob_with_its_default() -> None:
    sub = build_parser()._subparsers._group_actions[0].choices["asr"]  # type: ignore[union-attr]
    text = " ".join(sub.format_help().split("options:", 1)[1].split())
    d = WorkerConfig()
    for flag, value in (("--workers", d.workers), ("--worker-threads", d.worker_threads),
                        ("--standby-workers", d.standby_workers),
                        ("--job-timeout-s", f"{d.job_timeout_s:g}")):
        # Up to the next option (a flag followed by its upper-case metavar).
        entry = re.split(r" --[a-z-]+ [A-Z]+ ", text.split(f" {flag} ", 1)[1])[0]
        assert f"(default {value})" in entry, (flag, entry)
    args = build_parser().parse_args(["asr", "--workers", "0", "--job-timeout-s", "2.5"])
    assert args.workers == 0 and args.job_timeout_s == 2.5 and args.standby_workers is None


@pytest.mark.timeout(60)
def test_asr_does_not_import_gateway() -> None:
    code = ("import sys, asr.main, asr.workers; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'gateway'); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_health_before_start_and_after_close() -> None:
    from asr.engine import WhisperBackend
    from asr.workers import ProcessBackend

    front = WhisperBackend()  # routing only: nothing is loaded or spawned here
    with pytest.raises(ValueError, match="workers >= 1"):
        ProcessBackend(front, WhisperBackend, WorkerConfig(workers=0))
    backend = ProcessBackend(front, WhisperBackend, WorkerConfig(workers=1))
    health = backend.health()
    # Not started yet (models may still be exporting): nothing wrong to report.
    assert health["ok"] and health["workers"] == [] and health["wanted"] == 2
    assert backend.select_pool("en", "default") == "en"
    backend.close()
    assert backend.health() == {**health, "ok": False, "reason": "closed"}
    backend.close()  # idempotent


def test_whisper_front_checks_languages_without_models() -> None:
    from asr.backend import LanguageNormalizer
    from asr.engine import DEFAULT_POOL, DEFAULT_POOLS
    from asr.workers import ProcessBackend

    backend = ProcessBackend.whisper(DEFAULT_POOLS, DEFAULT_POOL, WorkerConfig(workers=1))
    try:
        assert isinstance(backend, LanguageNormalizer)
        assert backend.normalize_language("en-US") == "en"
        for bad in ("xx", "english"):
            with pytest.raises(ValueError, match="unsupported language"):
                backend.normalize_language(bad)
        assert backend.health()["workers"] == []  # nothing was spawned
    finally:
        backend.close()


def test_first_partial_and_degrade_settings_load_and_are_checked(tmp_path: Path) -> None:
    cfg_file = tmp_path / "asr.toml"
    cfg_file.write_text("[server]\nfirst_partial_interval_ms = 120\nmin_partial_ms = 400\n"
                        "degrade_finals = false\ndegrade_final_late_ms = 900\n")
    cfg, _, _, _ = load_config(cfg_file, env={})
    policy = cfg.scheduler_policy()
    assert (cfg.first_partial_interval_ms, cfg.min_partial_ms) == (120, 400)
    assert (policy.degrade_finals, policy.degrade_final_late_ms) == (False, 900)
    for bad in ("first_partial_interval_ms = 10", "min_partial_ms = -1",
                "degrade_final_late_ms = -1"):
        cfg_file.write_text(f"[server]\n{bad}\n")
        with pytest.raises(ValueError):
            load_config(cfg_file, env={})
