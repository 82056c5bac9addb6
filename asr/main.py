"""``voxgate asr``: run the ASR service until SIGINT/SIGTERM, then drain.

The optional TOML file holds ``[server]`` settings (the fields of ``AsrServerConfig``),
``[workers]`` settings (the fields of ``asr.workers.WorkerConfig``), a ``default`` pool
name and ``[pools.<name>]`` tables (the fields of ``PoolSpec``)::

    default = "multi"
    [server]
    max_streams = 32
    [workers]
    workers = 2
    worker_threads = 1
    [pools.en]
    model = "base"
    languages = ["en"]
    [pools.multi]
    model = "base"
    languages = ["*"]

Command-line options win over the file. With ``workers = 0`` the models run inside the
server process (the behaviour before worker processes existed).

The bearer token (``auth_token``) is a secret: rather than in the file or on the command
line (where ``ps`` shows it), give it in the ``ASR_TOKEN`` environment variable, the
name under which the gateway sends it, so that one Secret feeds both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from .backend import Backend
from .engine import DEFAULT_POOL, DEFAULT_POOLS, PoolSpec, WhisperBackend, load_pools
from .logs import setup
from .scheduler import Scheduler
from .server import AsrServerConfig, serve
from .workers import ProcessBackend, WorkerConfig

TOP_LEVEL_KEYS = {"default", "server", "workers", "pools"}


TOKEN_ENV = "ASR_TOKEN"


def load_config(path: str | Path | None, *, workers: dict[str, Any] | None = None,
                env: Mapping[str, str] | None = None, **overrides: Any
                ) -> tuple[AsrServerConfig, dict[str, PoolSpec], str, WorkerConfig]:
    """Server settings, pools and worker settings from an optional TOML file, then the
    overrides (``None`` values are ignored): ``overrides`` for ``[server]``, ``workers``
    for ``[workers]``. ``env`` (the process environment when None): a non-empty
    ``ASR_TOKEN`` there is ``auth_token`` unless the file or an override sets one.

    Raises:
        ValueError: an unknown key or an invalid value.
    """
    server: dict[str, Any] = {}
    wtable: dict[str, Any] = {}
    pools, default = dict(DEFAULT_POOLS), DEFAULT_POOL
    if path is not None:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        unknown_top = set(data) - TOP_LEVEL_KEYS
        if unknown_top:
            raise ValueError(f"{path}: unknown keys or tables {sorted(unknown_top)}")
        server = dict(data.get("server", {}))
        known = {f.name for f in dataclasses.fields(AsrServerConfig)}
        unknown = set(server) - known
        if unknown:
            raise ValueError(f"{path}: unknown [server] keys {sorted(unknown)}")
        wtable = dict(data.get("workers", {}))
        if "pools" in data:
            pools, default = load_pools(path)
    server.update({k: v for k, v in overrides.items() if v is not None})
    token = (os.environ if env is None else env).get(TOKEN_ENV, "")
    if token and server.get("auth_token") is None:
        server["auth_token"] = token
    wtable.update({k: v for k, v in (workers or {}).items() if v is not None})
    wcfg = WorkerConfig.from_dict(wtable, f"{path or 'options'}: [workers]")
    return AsrServerConfig(**server), pools, default, wcfg


def build_backend(pools: dict[str, PoolSpec], default: str, wcfg: WorkerConfig,
                  cfg: AsrServerConfig, *, log_level: int | None = logging.INFO
                  ) -> tuple[Backend, Scheduler | None]:
    """The backend for ``wcfg`` and, with worker processes, a scheduler that keeps one
    batch in flight per worker (None: ``serve``'s default scheduler).

    With ``wcfg.workers == 0`` the engine runs in this process with
    ``wcfg.worker_threads`` onnxruntime threads.
    """
    if wcfg.workers == 0:
        return WhisperBackend(pools, default, threads=wcfg.worker_threads), None
    backend = ProcessBackend.whisper(pools, default, wcfg, log_level=log_level)
    # One batch in flight per worker: more would only queue on the pipes, fewer would
    # leave a worker idle while jobs wait.
    scheduler = Scheduler(backend.run_batch, threads=wcfg.workers,
                          policy=cfg.scheduler_policy())
    return backend, scheduler


async def run(cfg: AsrServerConfig, backend: Backend,
              scheduler: Scheduler | None = None) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            app, port = await nursery.start(
                lambda task_status: serve(backend, cfg, scheduler=scheduler,
                                          shutdown=shutdown, task_status=task_status))
            scheme = "https" if cfg.certfile else "http"
            guards = [name for name, on in (("client certificates", cfg.client_ca_file),
                                            ("bearer token", cfg.auth_token)) if on]
            if guards:
                print(f"voxgate asr: requires {' and '.join(guards)}", flush=True)
            print(f"voxgate asr: listening on {scheme}://{cfg.host}:{port} "
                  "(ready once /readyz says so)", flush=True)
            nursery.start_soon(_announce_ready, app, scheme, cfg.host, port)
            async for _ in signals:
                print("voxgate asr: draining in-flight streams", file=sys.stderr, flush=True)
                shutdown.set()
                break


async def _announce_ready(app: Any, scheme: str, host: str, port: int) -> None:
    await app.ready_event.wait()
    print(f"voxgate asr: ready on {scheme}://{host}:{port}", flush=True)


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


def main(config: str | None, host: str | None = None, port: int | None = None, *,
         log_level: str = "info", log_format: str = "json",
         server: dict[str, Any] | None = None, **workers: Any) -> int:
    """Run the service; ``workers`` are ``[workers]`` overrides (None: keep the file's).

    Args:
        log_level: ``debug``, ``info``, ``warning`` or ``error`` (workers log the same).
        log_format: ``json`` (one object a line, the seed's fields) or ``text``.
        server: more ``[server]`` overrides, e.g. ``certfile``, ``keyfile`` and
            ``client_ca_file`` from command-line flags (None values keep the file's).

    Raises:
        ValueError: invalid configuration.
    """
    if log_level not in LOG_LEVELS or log_format not in LOG_FORMATS:
        raise ValueError(f"log level must be one of {LOG_LEVELS}, format one of {LOG_FORMATS}")
    level = getattr(logging, log_level.upper())
    setup(level, json_format=log_format == "json")
    cfg, pools, default, wcfg = load_config(config, workers=workers, host=host, port=port,
                                            **(server or {}))
    backend, scheduler = build_backend(pools, default, wcfg, cfg, log_level=level)
    try:
        trio.run(run, cfg, backend, scheduler)
    finally:
        if isinstance(backend, ProcessBackend):
            backend.close()
    return 0
