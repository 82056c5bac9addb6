"""Where session recordings go: a local archive folder (the embedded default).

A recording is written to a temporary file while the session runs and renamed into
place when it is complete, so a reader never sees half a file and a retried or resumed
session never leaves two recordings for one ``flowId``: the last complete one wins.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

SAFE_NAME = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\.ogg$")


@dataclass(frozen=True)
class StoredRecord:
    """A recording in the store: its key (``<flowId>.ogg``) and size."""

    key: str
    bytes: int


class RecordWriter(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def commit(self) -> StoredRecord: ...

    async def abort(self) -> None: ...


class RecordStore(Protocol):
    async def open(self, flow_id: str) -> RecordWriter: ...


def record_key(flow_id: str) -> str:
    """The store key of a session's recording.

    Raises:
        ValueError: a flowId that is not safe as a file or object name.
    """
    key = f"{flow_id}.ogg"
    if not SAFE_NAME.match(key) or key.startswith("."):
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
        if not SAFE_NAME.match(key) or key.startswith("."):
            return None
        p = self.root / key
        return p if p.is_file() else None
