"""Where session recordings go: a local archive folder (the embedded default), or
S3-compatible object storage (``ARCHIVE_STORE=s3``, :mod:`gateway.s3store`).

A recording is written to a temporary file while the session runs and renamed into
place when it is complete, so a reader never sees half a file and a retried or resumed
session never leaves two recordings for one ``flowId``: the last complete one wins.
The S3 store keeps the same promise with a multipart upload that becomes visible only
when it is completed.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import trio

if TYPE_CHECKING:
    from .config import GatewayConfig

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


class LocalWriter:
    def __init__(self, final: Path, tmp: Path, fh: trio.abc.AsyncResource) -> None:
        self._final = final
        self._tmp = tmp
        self._fh = fh
        self._bytes = 0

    async def write(self, data: bytes) -> None:
        if data:
            await self._fh.write(data)  # type: ignore[attr-defined]
            self._bytes += len(data)

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
