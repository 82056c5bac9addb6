"""``voxgate gateway`` and ``voxgate serve`` (``voxgate stream`` is in ``stream_cli``)."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

import trio

from .auth import Authenticator, exposure_problem, is_loopback
from .config import GatewayConfig
from .logs import setup as setup_logs

if TYPE_CHECKING:
    from .server import GatewayPorts

log = logging.getLogger("voxgate")


def _signals() -> Any:
    """SIGINT/SIGTERM, caught from now on. Opened before the listeners start, so a signal
    that arrives as soon as the URL is printed drains the gateway instead of killing it."""
    return trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)


async def _until_signal(shutdown: trio.Event, signals: Any) -> None:
    async for _ in signals:
        print("voxgate: shutting down (finishing sessions)", file=sys.stderr, flush=True)
        shutdown.set()
        return


async def run_gateway(cfg: GatewayConfig) -> None:
    from asr import tracing

    from .server import GatewayPorts, serve

    tracing.setup("voxgate-gateway")  # only if the OTEL_* variables ask for it

    shutdown = trio.Event()
    with _signals() as signals:
        async with trio.open_nursery() as nursery:
            ports = GatewayPorts()
            await nursery.start(functools.partial(serve, cfg, shutdown=shutdown,
                                                  ports=ports))
            print(f"voxgate gateway: {_http_line(cfg, ports)}", flush=True)
            print(_ws_url(cfg, ports), flush=True)
            await _until_signal(shutdown, signals)


def _ws_url(cfg: GatewayConfig, ports: GatewayPorts) -> str:
    return f"ws{'s' if ports.tls else ''}://{cfg.host}:{ports.ws}/ws/stream"


def _http_line(cfg: GatewayConfig, ports: GatewayPorts) -> str:
    """Where recordings and metrics are: https:// with TLS_CERT_FILE; metrics on their
    own plain-HTTP port with METRICS_PORT."""
    http = f"http{'s' if ports.tls else ''}://{cfg.host}:{ports.http}"
    if ports.metrics is None:
        return f"{http} (records, metrics)"
    return f"{http} (records), metrics on http://{cfg.host}:{ports.metrics}/metrics"


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

    from .server import GatewayPorts, serve

    tracing.setup("voxgate")  # gateway and ASR spans, one process
    print("voxgate serve: loading and warming the models (first run exports them)...",
          file=sys.stderr, flush=True)
    # The embedded service asks for the token the gateway sends, when one is set.
    asr_cfg = AsrServerConfig(host="127.0.0.1", port=0, auth_token=cfg.asr_token or None)
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
            with _signals() as signals:
                async with trio.open_nursery() as gateway:
                    ports = GatewayPorts()
                    await gateway.start(functools.partial(serve, cfg, shutdown=gw_shutdown,
                                                          ports=ports))
                    print(f"voxgate serve: ASR on http://127.0.0.1:{asr_port}, gateway "
                          f"{_http_line(cfg, ports)}", file=sys.stderr, flush=True)
                    print(_ws_url(cfg, ports), flush=True)
                    gateway.start_soon(_until_signal, gw_shutdown, signals)
            asr_shutdown.set()
    finally:
        if isinstance(backend, ProcessBackend):
            backend.close()


def _config(args: Any) -> GatewayConfig:
    return GatewayConfig.load(file=args.config, overrides={
        "host": args.host, "port": args.port, "http_port": args.http_port,
        "workers": getattr(args, "workers", None)})


def _logs(args: Any) -> None:
    setup_logs(getattr(logging, args.log_level.upper()), json_format=args.log_format == "json")


def check_exposure(cfg: GatewayConfig, command: str) -> int | None:
    """The startup guard of ``voxgate gateway`` and ``voxgate serve``: an exit code when
    this config must not start, else ``None``.

    A listener other machines can reach needs AUTH_JWT_SECRET or AUTH_JWT_KEYS_FILE, or
    AUTH_DISABLED=true to say that something in front of it authenticates (then a warning
    is logged, so the choice shows in the logs). The key file is loaded here too, so a
    missing or unsafe one stops the command with its reason before anything listens.

    Raises:
        ValueError: AUTH_JWT_KEYS_FILE cannot be read or holds an unusable key set.
    """
    problem = exposure_problem(cfg)
    if problem:
        print(f"voxgate {command}: {problem}", file=sys.stderr, flush=True)
        return 2
    try:
        auth = Authenticator.from_config(cfg)
    except OSError as exc:
        raise ValueError(f"AUTH_JWT_KEYS_FILE {cfg.auth_jwt_keys_file}: "
                         f"{exc.strerror or exc}") from None
    if cfg.auth_disabled and auth is not None:
        log.warning("AUTH_DISABLED=true is ignored: AUTH_JWT_SECRET or AUTH_JWT_KEYS_FILE "
                    "is set, so every session's token is checked")
    elif cfg.auth_disabled and not is_loopback(cfg.host):
        log.warning("authentication is off (AUTH_DISABLED=true) on %s: whoever reaches "
                    "this address can open sessions; only something in front of the "
                    "gateway that authenticates clients makes that safe",
                    cfg.host or "every address")
    return None


def gateway_main(args: Any) -> int:
    _logs(args)
    cfg = _config(args)
    refused = check_exposure(cfg, "gateway")
    if refused is not None:
        return refused
    if cfg.workers > 1:
        from .supervisor import run_supervisor

        return run_supervisor(cfg, log_level=getattr(logging, args.log_level.upper()),
                              json_logs=args.log_format == "json")
    trio.run(run_gateway, cfg)
    return 0


def serve_main(args: Any) -> int:
    _logs(args)  # default warning: the embedded default is for a person at a terminal
    cfg = _config(args)
    # The embedded ASR service stays on loopback; the gateway listens on cfg.host, so the
    # same rule as voxgate gateway applies to it.
    refused = check_exposure(cfg, "serve")
    if refused is not None:
        return refused
    if cfg.workers > 1:
        log.warning("WORKERS=%d is for voxgate gateway; voxgate serve runs one gateway "
                    "process", cfg.workers)
    try:
        trio.run(run_serve, cfg)
    except KeyboardInterrupt:
        # Ctrl-C while the models load (the signal handler is not installed yet): the
        # worker processes were closed on the way out; no traceback for a person.
        print("voxgate serve: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
