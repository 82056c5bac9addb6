"""``voxgate gateway --workers N``: one instance on several cores.

The supervisor (this module's :func:`run_supervisor`, no Trio) binds the listening
sockets once (WebSocket, HTTP, the optional METRICS_PORT) and runs N worker processes
that inherit them and serve them, each a whole gateway (:func:`gateway.server.serve`
with a :class:`WorkerLink`). The kernel hands each new connection to one of the workers
blocked in ``accept`` on the shared socket (see ``docs/operations.md`` section 5 for why
one shared socket and not one ``SO_REUSEPORT`` socket per worker).

State that a single process keeps in memory and that must hold for the instance lives
in a run directory (``mkdtemp``, mode 0700) that the workers share:

- ``workers/<index>``: ``pid port`` of each ready worker; ``port`` is its private
  loopback listener (the same WebSocket handler, plus ``/internal/metrics``), reachable
  only with the instance's secret (``secret``, a file in the run directory).
- ``flows/<sha1(flowId)>``: ``pid port`` of the worker that holds that flowId live
  (running or parked for resume). Created with ``link(2)``, which fails when the name
  exists, so two workers cannot both take one flowId; removed when the session ends, and
  by the supervisor for a worker that died.

A worker that reads a ``start`` whose flowId another live worker holds relays the
connection there (see ``server._relay``): the owner decides (resume, or FLOW_EXISTS)
exactly as a single process would. A scrape of ``/metrics`` on any worker gathers every
worker's exposition over the private listeners and sums it (:func:`merge_expositions`).

The supervisor restarts a worker that dies (backoff 0.5 s doubling to 10 s, reset after
a worker ran 30 s), forwards SIGTERM and SIGINT to the workers (each drains as a single
gateway does) and exits 1 when a worker crash-loops (CRASH_LOOP_RESTARTS exits within
CRASH_LOOP_WINDOW_S). It prints the ready lines once, after every worker is ready.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import GatewayConfig

log = logging.getLogger("voxgate.supervisor")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
HEALTHY_RUN_S = 30.0  # a worker that ran this long before dying restarts at once
CRASH_LOOP_RESTARTS = 5  # this many exits of one worker within the window: give up
CRASH_LOOP_WINDOW_S = 60.0
LISTEN_BACKLOG = 1024
SECRET_HEADER = "x-voxgate-worker"
INTERNAL_METRICS_PATH = "/internal/metrics"


# -- the shared registry (used by the workers) ---------------------------------------

def _flow_name(flow_id: str) -> str:
    return hashlib.sha1(flow_id.encode("utf-8", "surrogatepass")).hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(path: Path) -> tuple[int, int] | None:
    """``(pid, port)`` from a registry file, None when it is gone or unreadable."""
    try:
        pid, port = path.read_text().split()
        return int(pid), int(port)
    except (OSError, ValueError):
        return None


@dataclass
class WorkerLink:
    """What a worker process knows of its instance (built by :func:`worker_main`)."""

    index: int
    run_dir: Path
    secret: str
    ws_fd: int
    http_fd: int
    metrics_fd: int | None
    lifeline_fd: int  # reads EOF when the supervisor is gone
    pid: int = field(default_factory=os.getpid)
    port: int = 0  # the private listener's, once bound

    @property
    def flows_dir(self) -> Path:
        return self.run_dir / "flows"

    @property
    def workers_dir(self) -> Path:
        return self.run_dir / "workers"

    def publish(self, port: int) -> None:
        """Tell the siblings where this worker's private listener is."""
        self.port = port
        _write_atomic(self.workers_dir / str(self.index), f"{self.pid} {port}\n",
                      replace=True)

    def siblings(self) -> list[int]:
        """Private ports of the other live workers."""
        out = []
        for entry in self.workers_dir.iterdir():
            owner = _read_owner(entry)
            if owner is not None and owner[0] != self.pid and _alive(owner[0]):
                out.append(owner[1])
        return out

    def claim(self, flow_id: str) -> bool:
        """Take ``flow_id`` for this worker; False when another live worker holds it.
        A file left by a dead worker is removed and the claim tried once more."""
        path = self.flows_dir / _flow_name(flow_id)
        for _ in range(2):
            if _write_atomic(path, f"{self.pid} {self.port}\n", replace=False):
                return True
            owner = _read_owner(path)
            if owner is None or (owner[0] != self.pid and _alive(owner[0])):
                return False
            if owner[0] == self.pid:
                return True
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return False

    def release(self, flow_id: str) -> None:
        path = self.flows_dir / _flow_name(flow_id)
        owner = _read_owner(path)
        if owner is not None and owner[0] == self.pid:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _tenant_dir(self, tenant: str) -> Path:
        return self.run_dir / "tenants" / _flow_name(tenant)

    def tenant_add(self, tenant: str, flow_id: str) -> None:
        """Count a session of ``tenant`` (``tenants/<sha1(tenant)>/<sha1(flowId)>``)."""
        d = self._tenant_dir(tenant)
        for _ in range(3):  # a sibling may remove the folder between mkdir and the file
            d.mkdir(parents=True, exist_ok=True)
            try:
                (d / _flow_name(flow_id)).write_text(f"{self.pid} {self.port}\n")
                return
            except FileNotFoundError:
                continue

    def tenant_remove(self, tenant: str, flow_id: str) -> None:
        d = self._tenant_dir(tenant)
        with contextlib.suppress(FileNotFoundError):
            (d / _flow_name(flow_id)).unlink()
        with contextlib.suppress(OSError):  # not empty: the tenant has other sessions
            d.rmdir()

    def tenant_sessions(self, tenant: str) -> int:
        try:
            return len(os.listdir(self._tenant_dir(tenant)))
        except FileNotFoundError:
            return 0

    def owner_port(self, flow_id: str) -> int | None:
        """The private port of the live sibling that holds ``flow_id``, else None."""
        owner = _read_owner(self.flows_dir / _flow_name(flow_id))
        if owner is None or owner[0] == self.pid or not _alive(owner[0]):
            return None
        return owner[1]


def _write_atomic(path: Path, text: str, *, replace: bool) -> bool:
    """Write ``text`` to ``path`` in one step (a temporary file, then rename or link);
    with ``replace=False``, False when ``path`` exists already."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_text(text)
    try:
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class SharedFlows(dict[str, Any]):
    """``GatewayContext.flows`` of a worker: the worker's own flowIds (as the plain dict
    of a single process) backed by the instance's registry.

    The session checks ``flow_id in ctx.flows`` and, with no await in between, sets
    ``ctx.flows[flow_id]`` when it admits the session. ``in`` therefore takes the flowId
    in the registry when it is free (answering False); the claim is confirmed by the
    assignment, or dropped at the next scheduler pass when no assignment came (the start
    was refused for another reason, or awaits the store before checking again).
    """

    def __init__(self, link: WorkerLink) -> None:
        super().__init__()
        self.link = link
        self._tentative: set[str] = set()

    def __contains__(self, flow_id: object) -> bool:
        if not isinstance(flow_id, str):
            return False
        if dict.__contains__(self, flow_id) or flow_id in self._tentative:
            return True
        if not self.link.claim(flow_id):
            return True
        self._tentative.add(flow_id)
        import trio

        trio.lowlevel.current_trio_token().run_sync_soon(self._settle, flow_id)
        return False

    def _settle(self, flow_id: str) -> None:
        if flow_id in self._tentative:
            self._tentative.discard(flow_id)
            if not dict.__contains__(self, flow_id):
                self.link.release(flow_id)

    def __setitem__(self, flow_id: str, session: Any) -> None:
        if (flow_id not in self._tentative and not dict.__contains__(self, flow_id)
                and not self.link.claim(flow_id)):  # not expected: the session checked
            log.warning("flowId %s is held by another worker as well", flow_id)
        self._tentative.discard(flow_id)
        super().__setitem__(flow_id, session)
        tenant = getattr(session, "tenant", "")
        if tenant:
            self.link.tenant_add(tenant, flow_id)

    def __delitem__(self, flow_id: str) -> None:
        session = self[flow_id]
        super().__delitem__(flow_id)
        self.link.release(flow_id)
        tenant = getattr(session, "tenant", "")
        if tenant:
            self.link.tenant_remove(tenant, flow_id)

    def tenant_sessions(self, tenant: str) -> int:
        """Sessions of ``tenant`` live in the whole instance (MAX_SESSIONS_PER_TENANT)."""
        return self.link.tenant_sessions(tenant)


class SharedCounts:
    """Open connections per client address over the whole instance, for
    MAX_SESSIONS_PER_IP: one empty file per connection, ``ips/<sha1(address)>/<pid>.<n>``
    (the supervisor removes a dead worker's)."""

    def __init__(self, link: WorkerLink) -> None:
        self.dir = link.run_dir / "ips"
        self.pid = link.pid
        self._serial = 0
        self._held: dict[str, list[Path]] = {}

    def _dir(self, ip: str) -> Path:
        return self.dir / _flow_name(ip)

    def count(self, ip: str) -> int:
        try:
            return len(os.listdir(self._dir(ip)))
        except FileNotFoundError:
            return 0

    def add(self, ip: str) -> None:
        d = self._dir(ip)
        self._serial += 1
        path = d / f"{self.pid}.{self._serial}"
        for _ in range(3):  # a sibling may remove the folder between mkdir and the file
            d.mkdir(parents=True, exist_ok=True)
            try:
                path.touch()
                break
            except FileNotFoundError:
                continue
        self._held.setdefault(ip, []).append(path)

    def remove(self, ip: str) -> None:
        held = self._held.get(ip)
        if not held:
            return
        path = held.pop()
        if not held:
            del self._held[ip]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):  # not empty: another connection holds it
            path.parent.rmdir()


# -- metrics of the whole instance ---------------------------------------------------

# Gauges whose instance value is not the sum of the workers' values.
_GAUGE_MIN = {"process_start_time_seconds"}
_GAUGE_MAX = {"process_max_fds", "vad_tick_ms"}


def merge_expositions(texts: Iterable[bytes], workers_help: str | None = None) -> bytes:
    """One Prometheus exposition for the instance from every worker's: counters,
    histograms and most gauges are summed (``_created`` takes the earliest), the
    exceptions are in ``_GAUGE_MIN`` and ``_GAUGE_MAX``. With ``workers_help``, a
    ``gateway_workers`` gauge counts the expositions merged."""
    from prometheus_client.core import Metric
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    n = 0
    for text in texts:
        n += 1
        for fam in text_string_to_metric_families(text.decode()):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            acc = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in acc:
                    acc[key] = s.value
                elif s.name.endswith("_created") or fam.name in _GAUGE_MIN:
                    acc[key] = min(acc[key], s.value)
                elif fam.name in _GAUGE_MAX:
                    acc[key] = max(acc[key], s.value)
                else:
                    acc[key] = acc[key] + s.value
    if workers_help is not None:
        families["gateway_workers"] = Metric("gateway_workers", workers_help, "gauge")
        values["gateway_workers"] = {("gateway_workers", ()): float(n)}
    for name, fam in families.items():
        fam.samples = [Sample(sname, dict(labels), value)
                       for (sname, labels), value in values[name].items()]

    class _Merged:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


# -- the worker process --------------------------------------------------------------

def worker_main(argv: list[str]) -> int:
    """Entry of a worker process: ``<run_dir> <index> <status_fd>``."""
    run_dir, index, status_fd = Path(argv[0]), int(argv[1]), int(argv[2])
    with open(run_dir / "spec.pickle", "rb") as fh:
        spec = pickle.load(fh)
    from .logs import setup as setup_logs

    setup_logs(spec["log_level"], json_format=spec["json_logs"])
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerPid())
    cfg: GatewayConfig = spec["cfg"]
    link = WorkerLink(index, run_dir, spec["secret"], spec["ws_fd"], spec["http_fd"],
                      spec["metrics_fd"], spec["lifeline_fd"])
    import trio

    try:
        trio.run(_run_worker, cfg, link, status_fd)
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 130
    return 0


class _WorkerPid(logging.Filter):
    """Every log line of a worker carries ``worker_pid`` (JSON logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        extra = getattr(record, "vg_fields", None) or {}
        if "worker_pid" not in extra:
            record.vg_fields = {**extra, "worker_pid": os.getpid()}
        return True


async def _run_worker(cfg: GatewayConfig, link: WorkerLink, status_fd: int) -> None:
    import functools

    import trio

    from asr import tracing

    from .main import _signals
    from .server import GatewayPorts, serve

    tracing.setup("voxgate-gateway")
    shutdown = trio.Event()

    async def until_stop(signals: Any) -> None:
        async def lifeline() -> None:
            await trio.lowlevel.wait_readable(link.lifeline_fd)  # EOF: supervisor gone
            log.warning("the supervisor is gone; worker %d drains and exits", link.index)

        async def signal() -> None:
            async for _ in signals:
                return

        async with trio.open_nursery() as n:
            for fn in (lifeline, signal):
                async def first(fn: Any = fn) -> None:
                    await fn()
                    n.cancel_scope.cancel()

                n.start_soon(first)
        shutdown.set()

    with _signals() as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, cfg, shutdown=shutdown,
                                                  ports=GatewayPorts(), worker=link))
            os.write(status_fd, b"ready\n")
            os.close(status_fd)
            await until_stop(signals)


# -- the supervisor ------------------------------------------------------------------

def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (the first address ``host`` resolves to;
    an empty host is every IPv4 and IPv6 address where the system allows it)."""
    if not host and socket.has_dualstack_ipv6():
        sock = socket.create_server(("", port), family=socket.AF_INET6,
                                    backlog=LISTEN_BACKLOG, dualstack_ipv6=True)
    else:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _type, _proto, _name, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    status: int | None = None  # read end of its status pipe
    ready: bool = False
    started_at: float = 0.0
    restart_at: float = 0.0  # when a dead worker is started again
    exits: deque[float] = field(default_factory=deque)
    backoff_s: float = 0.0


class Supervisor:
    def __init__(self, cfg: GatewayConfig, *, log_level: int, json_logs: bool) -> None:
        self.cfg = cfg
        self.n = cfg.workers
        self.log_level, self.json_logs = log_level, json_logs
        self.workers = [_Worker(i) for i in range(self.n)]
        self.stopping = False
        self.failed = False
        self.announced = False
        self.sel = selectors.DefaultSelector()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            print("voxgate: shutting down (finishing sessions)", file=sys.stderr,
                  flush=True)
        self.stopping = True
        self._forward(signal.SIGTERM)

    def _forward(self, signum: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signum)

    def run(self) -> int:
        from .server import server_ssl_context

        server_ssl_context(self.cfg)  # a bad certificate stops us before any bind
        cfg = self.cfg
        self.run_dir = Path(tempfile.mkdtemp(prefix="voxgate-gateway-"))
        for sub in ("flows", "workers", "ips", "tenants"):
            (self.run_dir / sub).mkdir()
        socks: list[socket.socket] = []
        lifeline_r, self.lifeline_w = os.pipe()
        os.set_inheritable(lifeline_r, True)
        try:
            ws = _listen(cfg.host, cfg.port)
            http = _listen(cfg.host, cfg.http_port)
            socks += [ws, http]
            metrics = None
            if cfg.metrics_port is not None:
                metrics = _listen(cfg.host, cfg.metrics_port)
                socks.append(metrics)
            self.ports = (ws.getsockname()[1], http.getsockname()[1],
                          metrics.getsockname()[1] if metrics is not None else None)
            self.fds = [s.fileno() for s in socks] + [lifeline_r]
            spec = {"cfg": cfg, "secret": secrets.token_hex(16), "ws_fd": ws.fileno(),
                    "http_fd": http.fileno(),
                    "metrics_fd": metrics.fileno() if metrics is not None else None,
                    "lifeline_fd": lifeline_r, "log_level": self.log_level,
                    "json_logs": self.json_logs}
            fd = os.open(self.run_dir / "spec.pickle", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600)
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(spec, fh)
            old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT,
                                                                  signal.SIGTERM)}
            try:
                return self._loop()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        finally:
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
            os.close(self.lifeline_w)
            os.close(lifeline_r)
            for sock in socks:
                sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _spawn(self, w: _Worker) -> None:
        r, wr = os.pipe()
        os.set_blocking(r, False)
        code = ("import sys; from gateway.supervisor import worker_main; "
                "sys.exit(worker_main(sys.argv[1:]))")
        w.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(self.run_dir), str(w.index), str(wr)],
            pass_fds=(*self.fds, wr))
        os.close(wr)
        w.status, w.ready, w.started_at = r, False, time.monotonic()
        self.sel.register(r, selectors.EVENT_READ, w)

    def _reaped(self, w: _Worker, rc: int) -> None:
        """``w`` exited with ``rc``: clean its registry entries; plan its restart."""
        assert w.proc is not None
        pid = w.proc.pid
        w.proc = None
        if w.status is not None:
            self.sel.unregister(w.status)
            os.close(w.status)
            w.status = None
        w.ready = False
        self._clean(pid)
        if self.stopping:
            # Killed by the forwarded signal before it could install its handler: it
            # had no sessions yet.
            if rc not in (0, 130, -signal.SIGTERM, -signal.SIGINT):
                log.error("worker %d (pid %d) exited with %s while draining", w.index, pid,
                          _exit_text(rc))
                self.failed = True
            return
        now = time.monotonic()
        ran = now - w.started_at
        w.exits.append(now)
        while w.exits and now - w.exits[0] > CRASH_LOOP_WINDOW_S:
            w.exits.popleft()
        if len(w.exits) >= CRASH_LOOP_RESTARTS:
            log.error("worker %d exited %d times within %g s (last: %s); stopping the "
                      "gateway", w.index, len(w.exits), CRASH_LOOP_WINDOW_S, _exit_text(rc))
            print(f"voxgate gateway: worker {w.index} is crash-looping "
                  f"({_exit_text(rc)}); stopping", file=sys.stderr, flush=True)
            self.failed = True
            self.stopping = True
            self._forward(signal.SIGTERM)
            return
        w.backoff_s = 0.0 if ran >= HEALTHY_RUN_S else max(
            BACKOFF_FIRST_S, min(BACKOFF_MAX_S, w.backoff_s * 2))
        w.restart_at = now + w.backoff_s
        log.error("worker %d (pid %d) %s after %.1f s; restarting it in %.1f s", w.index,
                  pid, _exit_text(rc), ran, w.backoff_s)

    def _clean(self, pid: int) -> None:
        """Remove what a dead worker left in the registry."""
        for sub in ("flows", "workers", "tenants/*"):
            for entry in self.run_dir.glob(f"{sub}/*"):
                owner = _read_owner(entry)
                if owner is not None and owner[0] == pid:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
        for entry in (self.run_dir / "ips").glob(f"*/{pid}.*"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()

    def _announce(self) -> None:
        cfg = self.cfg
        tls = bool(cfg.tls_cert_file)
        ws, http, metrics = self.ports
        base = f"http{'s' if tls else ''}://{cfg.host}:{http}"
        where = (f"{base} (records, metrics)" if metrics is None else
                 f"{base} (records), metrics on http://{cfg.host}:{metrics}/metrics")
        log.info("%d workers ready", self.n)
        print(f"voxgate gateway: {where}", flush=True)
        print(f"ws{'s' if tls else ''}://{cfg.host}:{ws}/ws/stream", flush=True)
        self.announced = True

    def _loop(self) -> int:
        for w in self.workers:
            self._spawn(w)
        while True:
            for key, _ in self.sel.select(timeout=0.1):
                w = key.data
                try:
                    data = os.read(key.fd, 64)
                except BlockingIOError:
                    continue
                if b"ready" in data:
                    w.ready = True
                    log.info("worker %d (pid %d) ready", w.index,
                             w.proc.pid if w.proc else -1)
                self.sel.unregister(key.fd)
                os.close(key.fd)
                w.status = None
            for w in self.workers:
                if w.proc is not None:
                    rc = w.proc.poll()
                    if rc is not None:
                        self._reaped(w, rc)
            alive = [w for w in self.workers if w.proc is not None]
            if self.stopping:
                if not alive:
                    return 1 if self.failed else 0
                continue
            if not self.announced and all(w.ready for w in self.workers):
                self._announce()
            now = time.monotonic()
            for w in self.workers:
                if w.proc is None and now >= w.restart_at:
                    self._spawn(w)


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def run_supervisor(cfg: GatewayConfig, *, log_level: int, json_logs: bool) -> int:
    """Run ``cfg.workers`` gateway workers on shared sockets until SIGTERM or SIGINT;
    the exit status (1 after a crash loop or a worker failing its drain)."""
    return Supervisor(cfg, log_level=log_level, json_logs=json_logs).run()


__all__ = ["SharedCounts", "SharedFlows", "Supervisor", "WorkerLink", "merge_expositions",
           "run_supervisor", "worker_main"]
