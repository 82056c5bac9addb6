"""``voxgate asr``: run the ASR service until SIGINT/SIGTERM, then drain.

The optional TOML file holds ``[server]`` settings (the fields of ``AsrServerConfig``), a
``default`` pool name and ``[pools.<name>]`` tables (the fields of ``PoolSpec``)::

    default = "multi"
    [server]
    max_streams = 32
    [pools.en]
    model = "base"
    languages = ["en"]
    [pools.multi]
    model = "base"
    languages = ["*"]
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

import trio

from .engine import DEFAULT_POOL, DEFAULT_POOLS, PoolSpec, WhisperBackend, load_pools
from .server import AsrServerConfig, serve


def load_config(path: str | Path | None, **overrides: Any
                ) -> tuple[AsrServerConfig, dict[str, PoolSpec], str]:
    """Server settings and pools from an optional TOML file, then ``overrides``.

    Raises:
        ValueError: an unknown key or an invalid value.
    """
    server: dict[str, Any] = {}
    pools, default = dict(DEFAULT_POOLS), DEFAULT_POOL
    if path is not None:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        server = dict(data.get("server", {}))
        known = {f.name for f in dataclasses.fields(AsrServerConfig)}
        unknown = set(server) - known
        if unknown:
            raise ValueError(f"{path}: unknown [server] keys {sorted(unknown)}")
        if "pools" in data:
            pools, default = load_pools(path)
    server.update({k: v for k, v in overrides.items() if v is not None})
    return AsrServerConfig(**server), pools, default


async def run(cfg: AsrServerConfig, backend: WhisperBackend) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            app, port = await nursery.start(
                lambda task_status: serve(backend, cfg, shutdown=shutdown,
                                          task_status=task_status))
            scheme = "https" if cfg.certfile else "http"
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


def main(config: str | None, host: str | None, port: int | None) -> int:
    from gateway.logs import setup

    setup(logging.INFO)
    cfg, pools, default = load_config(config, host=host, port=port)
    backend = WhisperBackend(pools, default)
    trio.run(run, cfg, backend)
    return 0
