"""Where session recordings go: a local archive folder (the embedded default), or
S3-compatible object storage (``ARCHIVE_STORE=s3``, :mod:`gateway.s3store`).

A recording is written to a temporary file while the session runs and renamed into
place when it is complete, so a reader never sees half a file and a retried or resumed
session never leaves two recordings for one ``flowId``: the last complete one wins.
The S3 store keeps the same promise with a multipart upload that becomes visible only
when it is completed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import trio

if TYPE_CHECKING:
    from .config import GatewayConfig

log = logging.getLogger("voxgate.gateway.records")

SAFE_NAME = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\.ogg$")


@dataclass(frozen=True)
class StoredRecord:
    """A recording in the store: its key (``<flowId>.ogg``) and size."""

    key: str
    bytes: int


class RecordStoreError(OSError):
    """The store could not keep a recording (e.g. object storage stayed unreachable).

    An ``OSError``, so the session reports it like a failed local write.
    """


class RecordWriter(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def commit(self) -> StoredRecord: ...

    async def abort(self) -> None: ...


class RecordStore(Protocol):
    async def open(self, flow_id: str) -> RecordWriter: ...


@runtime_checkable
class LinkedRecordStore(Protocol):
    """A store whose recordings are fetched from elsewhere: ``/records/<key>`` redirects.

    ``link`` returns a short-lived URL for ``key`` (signed for ``method``), or None when
    there is no such recording; it raises :class:`RecordStoreError` when the store
    cannot be asked.
    """

    async def open(self, flow_id: str) -> RecordWriter: ...

    async def link(self, key: str, method: str = "GET") -> str | None: ...


def store_from_config(cfg: GatewayConfig) -> RecordStore | None:
    """The record store ``cfg`` asks for, or None when archiving is off.

    Raises:
        OSError: the archive or spool folder cannot be created.
    """
    if not cfg.enable_compress:
        return None
    if cfg.archive_store == "s3":
        from .s3store import S3Store  # imports boto3: only when it is used

        return S3Store.from_config(cfg)
    return LocalStore(cfg.archive_dir)


def safe_key(key: str) -> bool:
    """Whether ``key`` is a well-formed recording key (``<flowId>.ogg``, no path)."""
    return bool(SAFE_NAME.match(key)) and not key.startswith(".")


def record_key(flow_id: str) -> str:
    """The store key of a session's recording.

    Raises:
        ValueError: a flowId that is not safe as a file or object name.
    """
    key = f"{flow_id}.ogg"
    if not safe_key(key):
        raise ValueError(f"flowId {flow_id!r} cannot name a recording")
    return key


SYNC_WRITE_MAX_BYTES = 16 * 1024  # appends up to this size skip the thread hop


class LocalWriter:
    def __init__(self, final: Path, tmp: Path, fh: trio.abc.AsyncResource) -> None:
        self._final = final
        self._tmp = tmp
        self.local_copy = tmp  # what was written so far, for ArchiveSink's fallback
        self._fh = fh
        self._bytes = 0

    async def write(self, data: bytes) -> None:
        """Append ``data``. A recording page (~3 KB a second) is written in place: it
        lands in the file's buffer or the page cache in microseconds, while a worker
        thread hop per page cost 5.7 % of the gateway's CPU at 100 sessions. Larger
        writes still go through a thread, so a slow disk cannot stall the loop on them.

        Raises:
            OSError: the file system refused the bytes.
        """
        if not data:
            return
        if len(data) <= SYNC_WRITE_MAX_BYTES:
            self._fh.wrapped.write(data)  # type: ignore[attr-defined]
        else:
            await self._fh.write(data)  # type: ignore[attr-defined]
        self._bytes += len(data)

    async def flush_local(self) -> None:
        """Make ``local_copy`` hold every byte written so far."""
        await self._fh.flush()  # type: ignore[attr-defined]

    async def commit(self) -> StoredRecord:
        await self._fh.flush()  # type: ignore[attr-defined]
        await self._fh.aclose()
        await trio.to_thread.run_sync(os.replace, self._tmp, self._final)
        return StoredRecord(self._final.name, self._bytes)

    async def abort(self) -> None:
        await self._fh.aclose()
        await trio.to_thread.run_sync(lambda: self._tmp.unlink(missing_ok=True))


class LocalStore:
    """Recordings as files in ``root``; served by the gateway at ``/records/<key>``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    async def open(self, flow_id: str) -> LocalWriter:
        key = record_key(flow_id)
        # Unique across processes and hosts sharing the folder (every container is pid 1).
        tmp = self.root / f".{key}.{uuid.uuid4().hex}.part"
        fh = await trio.open_file(tmp, "wb")
        return LocalWriter(self.root / key, tmp, fh)

    def path(self, key: str) -> Path | None:
        """The file behind ``key``, or None if there is none (or the key is unsafe)."""
        if not safe_key(key):
            return None
        p = self.root / key
        return p if p.is_file() else None


def default_fallback_dir() -> Path:
    return Path(tempfile.gettempdir()) / "voxgate-archive-fallback"


class ArchiveSink:
    """A session's recording on its way to the store, which may fail at any step.

    When the store fails (disk full, read-only, object storage down), the recording goes
    on into a local fallback file: the bytes the store had accepted are copied from the
    writer's own local file (``local_copy``: the ``.part`` file, or the S3 spool), then
    everything after. The session never stops draining its audio into it. At the end
    the fallback file is completed as ``<fallback_dir>/<key>``, where ``ArchiveRetrier``
    uploads it to the store once the store works again.

    Each method returns a message the first time something fails (for the client's
    ``ARCHIVE_FAILED``), else None.
    """

    def __init__(self, store: RecordStore, flow_id: str, fallback_dir: Path) -> None:
        self.store = store
        self.flow_id = flow_id
        self.key = record_key(flow_id)
        self.fallback_dir = fallback_dir
        self._writer: RecordWriter | None = None
        self._accepted = 0  # bytes the store's writer took without error
        self._fallback: Any = None  # open file (sync: small appends, see _fb_write)
        self._fallback_path: Path | None = None
        self._lost = False  # even the fallback failed: what follows is not kept
        self.failed: str | None = None

    async def open(self) -> str | None:
        try:
            self._writer = await self.store.open(self.flow_id)
        except OSError as exc:
            return await self._fail(f"the archive store refused the recording: {exc}")
        return None

    async def write(self, data: bytes) -> str | None:
        if not data:
            return None
        if self._writer is not None and self.failed is None:
            try:
                await self._writer.write(data)
            except OSError as exc:
                problem = await self._fail(f"writing the recording failed: {exc}")
                await self._fb_write(data)
                return problem
            self._accepted += len(data)
            return None
        await self._fb_write(data)
        return None

    async def commit(self) -> tuple[StoredRecord | None, str | None]:
        """The stored recording; or None and why, with the recording kept locally."""
        if self._writer is not None and self.failed is None:
            try:
                return await self._writer.commit(), None
            except OSError as exc:
                problem = await self._fail(f"storing the recording failed: {exc}")
                return None, await self._finish_fallback(problem)
        return None, await self._finish_fallback(self.failed or "")

    async def abort(self) -> None:
        if self._writer is not None:
            with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                await self._writer.abort()

    async def _fail(self, message: str) -> str:
        """Switch to the fallback file, carrying over what the store had accepted."""
        log.warning("archive of %s: %s; keeping it in %s", self.flow_id, message,
                    self.fallback_dir)
        self.failed = message
        prefix = b""
        lost = ""
        copy = getattr(self._writer, "local_copy", None)
        if self._accepted and copy is not None:
            try:
                flush = getattr(self._writer, "flush_local", None)
                if flush is not None:
                    await flush()
                prefix = await trio.to_thread.run_sync(_read_prefix, Path(copy),
                                                       self._accepted)
            except OSError as exc:
                lost = f"{message}; the recording so far is lost: {exc}"
        elif self._accepted:
            lost = f"{message}; the recording so far is lost"
        await self.abort()
        self._writer = None
        if lost:
            self._lost = True
            return lost
        try:
            self.fallback_dir.mkdir(parents=True, exist_ok=True)
            self._fallback_path = self.fallback_dir / f".{self.key}.{uuid.uuid4().hex}.part"
            self._fallback = await trio.open_file(self._fallback_path, "wb")
        except OSError as exc:
            self._lost = True
            return f"{message}; no local fallback either: {exc}"
        await self._fb_write(prefix)
        return f"{message}; the recording is kept on the gateway and stored later"

    async def _fb_write(self, data: bytes) -> None:
        if self._fallback is None or self._lost or not data:
            return
        try:
            await self._fallback.write(data)
        except OSError as exc:
            log.error("archive of %s: the fallback file failed too (%s); the recording "
                      "is lost", self.flow_id, exc)
            self._lost = True

    async def _finish_fallback(self, problem: str) -> str:
        if self._fallback is None or self._fallback_path is None or self._lost:
            return problem or "the recording could not be kept"
        try:
            await self._fallback.aclose()
            final = self.fallback_dir / self.key
            await trio.to_thread.run_sync(os.replace, self._fallback_path, final)
        except OSError as exc:
            return f"{problem}; the local fallback failed too: {exc}"
        return problem


def _read_prefix(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path} holds {len(data)} of {size} bytes")
    return data


class ArchiveRetrier:
    """Uploads recordings left in the fallback folder to the store, until it takes
    them (a recording is removed from the folder only once the store has it).

    ``run`` retries every ``interval_s`` (doubling up to ``max_interval_s`` while the
    store keeps failing); ``poke`` asks for an attempt now (a session just left one).
    """

    def __init__(self, store: RecordStore, fallback_dir: Path, *, interval_s: float = 5.0,
                 max_interval_s: float = 60.0) -> None:
        self.store = store
        self.fallback_dir = fallback_dir
        self.interval_s = interval_s
        self.max_interval_s = max_interval_s
        self._poke = trio.Event()
        self.stored = 0
        self.failures = 0

    def poke(self) -> None:
        self._poke.set()

    def pending(self) -> list[Path]:
        if not self.fallback_dir.is_dir():
            return []
        return sorted(p for p in self.fallback_dir.glob("*.ogg") if safe_key(p.name))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        wait = self.interval_s
        while True:
            with trio.move_on_after(wait):
                await self._poke.wait()
            self._poke = trio.Event()
            ok = await self.attempt()
            wait = self.interval_s if ok else min(wait * 2, self.max_interval_s)

    async def attempt(self) -> bool:
        """Try every pending recording once; return whether none failed."""
        ok = True
        for path in self.pending():
            flow_id = path.name[:-len(".ogg")]
            writer: RecordWriter | None = None
            try:
                data = await trio.to_thread.run_sync(path.read_bytes)
                writer = await self.store.open(flow_id)
                await writer.write(data)
                await writer.commit()
                writer = None
                await trio.to_thread.run_sync(functools.partial(path.unlink, missing_ok=True))
                self.stored += 1
                log.info("archive: %s stored from the local fallback", path.name)
            except OSError as exc:
                ok = False
                self.failures += 1
                log.warning("archive: %s still not stored: %s", path.name, exc)
            finally:
                if writer is not None:
                    with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                        await writer.abort()
        return ok
