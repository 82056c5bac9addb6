"""``voxgate gateway`` and ``voxgate serve`` (``voxgate stream`` is in ``stream_cli``)."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from typing import Any

import trio

from .config import GatewayConfig
from .logs import setup as setup_logs

log = logging.getLogger("voxgate")


async def _until_signal(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            print("voxgate: shutting down (finishing sessions)", file=sys.stderr, flush=True)
            shutdown.set()
            return


async def run_gateway(cfg: GatewayConfig) -> None:
    from asr import tracing

    from .server import serve

    tracing.setup("voxgate-gateway")  # only if the OTEL_* variables ask for it

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        ws_port, http_port = await nursery.start(functools.partial(serve, cfg,
                                                                   shutdown=shutdown))
        print(f"voxgate gateway: http://{cfg.host}:{http_port} (records, metrics)",
              flush=True)
        print(f"ws://{cfg.host}:{ws_port}/ws/stream", flush=True)
        await _until_signal(shutdown)


async def run_serve(cfg: GatewayConfig) -> None:
    """The embedded default: a local ASR service on a free loopback port, its models in
    inference worker processes (as ``voxgate asr`` runs them, so latency measured here is
    the production path's), then the gateway pointed at it. The WebSocket URL is printed
    once both are ready."""
    from asr import tracing
    from asr.engine import DEFAULT_POOL, DEFAULT_POOLS
    from asr.main import build_backend
    from asr.server import AsrServerConfig
    from asr.server import serve as serve_asr
    from asr.workers import ProcessBackend, WorkerConfig

    from .server import serve

    tracing.setup("voxgate")  # gateway and ASR spans, one process
    print("voxgate serve: loading and warming the models (first run exports them)...",
          file=sys.stderr, flush=True)
    asr_cfg = AsrServerConfig(host="127.0.0.1", port=0)
    backend, scheduler = build_backend(dict(DEFAULT_POOLS), DEFAULT_POOL, WorkerConfig(),
                                       asr_cfg, log_level=logging.WARNING)
    try:
        asr_shutdown, gw_shutdown = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            app, asr_port = await nursery.start(functools.partial(
                serve_asr, backend, asr_cfg, scheduler=scheduler, shutdown=asr_shutdown))
            await app.ready_event.wait()
            cfg = cfg.replace(asr_urls=(f"http://127.0.0.1:{asr_port}",))
            # serve() returns once its sessions have drained (their finals need the ASR
            # service), so the ASR service stops only after the gateway.
            async with trio.open_nursery() as gateway:
                ws_port, http_port = await gateway.start(functools.partial(
                    serve, cfg, shutdown=gw_shutdown))
                print(f"voxgate serve: ASR on http://127.0.0.1:{asr_port}, recordings and "
                      f"metrics on http://{cfg.host}:{http_port}", file=sys.stderr,
                      flush=True)
                print(f"ws://{cfg.host}:{ws_port}/ws/stream", flush=True)
                gateway.start_soon(_until_signal, gw_shutdown)
            asr_shutdown.set()
    finally:
        if isinstance(backend, ProcessBackend):
            backend.close()


def _config(args: Any) -> GatewayConfig:
    return GatewayConfig.load(file=args.config, overrides={
        "host": args.host, "port": args.port, "http_port": args.http_port})


def _logs(args: Any) -> None:
    setup_logs(getattr(logging, args.log_level.upper()), json_format=args.log_format == "json")


def gateway_main(args: Any) -> int:
    _logs(args)
    trio.run(run_gateway, _config(args))
    return 0


def serve_main(args: Any) -> int:
    _logs(args)  # default warning: the embedded default is for a person at a terminal
    try:
        trio.run(run_serve, _config(args))
    except KeyboardInterrupt:
        # Ctrl-C while the models load (the signal handler is not installed yet): the
        # worker processes were closed on the way out; no traceback for a person.
        print("voxgate serve: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
