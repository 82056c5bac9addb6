"""Recordings in S3-compatible object storage, uploaded while the session runs.

The session writes the Ogg Opus bytes as they are encoded. The writer appends them to a
spool file (``ARCHIVE_SPOOL_DIR``) and sends each part of a multipart upload as soon as
it fills (``S3_PART_SIZE_BYTES``), so memory holds at most one part per S3 call in
flight, never the recording. ``commit`` sends the rest and completes the upload; only
then does the object ``<prefix><key>`` (``<prefix>[<tenant>/]<flowId>.ogg``, see
:func:`gateway.records.record_key`) appear or replace the previous one, so a
retried flush or a resumed session leaves one object: the last complete recording.

A recording that never fills a part (at 24 kbit/s, 5 MiB is about 29 minutes: nearly
every session) is sent at commit with one plain ``PutObject`` instead of a one-part
multipart upload: one request instead of three, and a session that dies leaves no
pending upload behind to be cleaned up. Both are atomic for readers.

Failures: each S3 call is retried with jittered exponential backoff until a deadline
(``S3_RETRY_DEADLINE_S``, once per part and once for the whole commit). If the
multipart upload itself is gone (``NoSuchUpload``: the server lost it, or it was
aborted), a new one is started and every part is sent again from the spool file. A part
that still fails mid-session is left for the next part or the commit, and does not fail
the session. When the commit's deadline passes, ``commit`` raises
:class:`S3StoreError`, an ``OSError``.

boto3 blocks: every call runs in a worker thread, at most ``max_calls`` at once
(a ``trio.CapacityLimiter``), and a deadline abandons the thread (each call carries its
own connect and read timeouts, so an abandoned one ends by itself).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.exceptions
import trio
from botocore.config import Config

from .config import S3_MIN_PART_SIZE_BYTES
from .records import RecordStoreError, StoredRecord, flat_name, record_key, safe_key

if TYPE_CHECKING:
    from .config import GatewayConfig

log = logging.getLogger("voxgate.s3store")

T = TypeVar("T")

CONTENT_TYPE = "audio/ogg"
MAX_PARTS = 10000  # S3's limit per multipart upload
DEFAULT_MAX_CALLS = 16  # S3 calls (worker threads) in flight per process
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0  # per socket read; a 5 MiB part on a slow link needs some room
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
LINK_TIMEOUT_S = 5.0  # HEAD before a redirect: a client is waiting
ABORT_TIMEOUT_S = 5.0  # best effort; a bucket lifecycle rule catches what is left
STALE_SPOOL_S = 3600.0  # a live session touches its spool file every second of audio

# Errors worth another try: the network, and the server saying "not now".
_TRANSIENT_CODES = frozenset({
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
    "RequestTimeout", "Throttling", "ThrottlingException",
})
# The multipart upload cannot be continued: start a new one from the spool file.
_RESTART_CODES = frozenset({"NoSuchUpload", "InvalidPart", "InvalidPartOrder"})
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class S3StoreError(RecordStoreError):
    """Object storage did not take (or give) a recording in time; names the bucket and key."""


class _UploadGone(Exception):
    """The multipart upload no longer exists on the server."""


@dataclass(frozen=True)
class S3StoreStatistics:
    """Counters since the store was made."""

    recordings: int  # committed
    parts: int  # parts uploaded (including parts sent again)
    puts: int  # recordings sent with one PutObject
    retries: int  # S3 calls tried again
    restarts: int  # multipart uploads started over from the spool file
    failures: int  # commits that raised


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, botocore.exceptions.ClientError):
        return _code(exc) in _TRANSIENT_CODES or _status(exc) >= 500
    return isinstance(exc, (botocore.exceptions.ConnectionError,
                            botocore.exceptions.HTTPClientError,
                            botocore.exceptions.IncompleteReadError))


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"spool file {path} is shorter than expected ({offset}+{size})")
    return data


class S3Store:
    """Recordings as objects ``<prefix><key>`` in ``bucket`` (key: ``record_key``).

    Args:
        bucket: the bucket (it must exist).
        spool_dir: local folder for recordings being uploaded (created if missing).
        prefix: object key prefix.
        endpoint_url: an S3-compatible service; empty for AWS S3 in ``region``.
        region: signing region.
        access_key_id, secret_access_key: empty for botocore's credential chain.
        addressing_style: ``auto`` (path with an endpoint URL, virtual on AWS),
            ``path`` or ``virtual``.
        part_size_bytes: multipart part size (at least 5 MiB).
        presign_ttl_s: lifetime of the URLs ``link`` returns.
        retry_deadline_s: how long one part, or the commit, is retried.
        max_calls: S3 calls in flight at once.
        min_part_size_bytes: for tests only; S3 itself refuses parts under 5 MiB
            (but the last).

    Raises:
        ValueError: a part size under the minimum.
        OSError: the spool folder cannot be created.
    """

    def __init__(
        self,
        *,
        bucket: str,
        spool_dir: str | Path,
        prefix: str = "records/",
        endpoint_url: str = "",
        region: str = "us-east-1",
        access_key_id: str = "",
        secret_access_key: str = "",
        addressing_style: str = "auto",
        part_size_bytes: int = S3_MIN_PART_SIZE_BYTES,
        presign_ttl_s: int = 900,
        retry_deadline_s: float = 12.0,
        max_calls: int = DEFAULT_MAX_CALLS,
        min_part_size_bytes: int = S3_MIN_PART_SIZE_BYTES,
    ) -> None:
        if part_size_bytes < min_part_size_bytes:
            raise ValueError(f"part size {part_size_bytes} is under {min_part_size_bytes} bytes")
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = part_size_bytes
        self.presign_ttl_s = presign_ttl_s
        self.retry_deadline_s = retry_deadline_s
        self.spool_dir = Path(spool_dir).resolve()
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_spool()
        if addressing_style == "auto":
            addressing_style = "path" if endpoint_url else "virtual"
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            # One attempt per call: the retries, with their deadline, are ours.
            retries={"mode": "standard", "total_max_attempts": 1},
            max_pool_connections=max_calls,
            # botocore >= 1.36 adds CRC checksums by default, which several
            # S3-compatible services refuse; parts carry Content-MD5 instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="voxgate",
        )
        # A session of our own: boto3's default session is not safe to share across
        # threads while clients are made. The client itself is thread-safe.
        session = boto3.session.Session()
        self._client = session.client(
            "s3", endpoint_url=endpoint_url or None, region_name=region,
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None, config=config)
        self._limiter = trio.CapacityLimiter(max_calls)
        self._stats = {"recordings": 0, "parts": 0, "puts": 0, "retries": 0,
                       "restarts": 0, "failures": 0}

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> S3Store:
        """The store ``cfg`` describes (``ARCHIVE_STORE=s3``)."""
        return cls(
            bucket=cfg.s3_bucket,
            spool_dir=cfg.archive_spool_dir or Path(cfg.archive_dir) / ".spool",
            prefix=cfg.s3_prefix, endpoint_url=cfg.s3_endpoint_url, region=cfg.s3_region,
            access_key_id=cfg.s3_access_key_id, secret_access_key=cfg.s3_secret_access_key,
            addressing_style=cfg.s3_addressing_style, part_size_bytes=cfg.s3_part_size_bytes,
            presign_ttl_s=cfg.s3_presign_ttl_s, retry_deadline_s=cfg.s3_retry_deadline_s)

    def object_key(self, key: str) -> str:
        """The object key of a recording key (``[<tenant>/]<flowId>.ogg``)."""
        return f"{self.prefix}{key}"

    def statistics(self) -> S3StoreStatistics:
        return S3StoreStatistics(**self._stats)

    async def open(self, flow_id: str, tenant: str = "") -> S3Writer:
        """A writer for the recording of ``flow_id`` of ``tenant``; see :meth:`open_key`.

        Raises:
            ValueError: a flowId that cannot name a recording.
            OSError: the spool file cannot be created.
        """
        return await self.open_key(record_key(flow_id, tenant))

    async def open_key(self, key: str) -> S3Writer:
        """A writer for the recording ``key``; nothing is sent until a part fills.

        Raises:
            ValueError: not a safe recording key.
            OSError: the spool file cannot be created.
        """
        if not safe_key(key):
            raise ValueError(f"{key!r} is not a recording key")
        spool = self.spool_dir / f"{flat_name(key)}.{uuid.uuid4().hex}.spool"
        fh = await trio.open_file(spool, "wb")
        return S3Writer(self, key, spool, fh)

    async def exists(self, key: str) -> bool:
        """Whether the recording ``key`` is stored (a HEAD of its object; False for an
        unsafe key).

        Raises:
            S3StoreError: the store did not answer within ``LINK_TIMEOUT_S``, or refused.
        """
        if not safe_key(key):
            return False
        obj = self.object_key(key)
        try:
            with trio.fail_after(LINK_TIMEOUT_S):
                await self.call(self._client.head_object, Bucket=self.bucket, Key=obj)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return False
            raise S3StoreError(f"s3://{self.bucket}/{obj}: {exc}") from exc
        except (botocore.exceptions.BotoCoreError, trio.TooSlowError) as exc:
            raise S3StoreError(f"s3://{self.bucket}/{obj}: {str(exc) or 'timed out'}") from exc
        return True

    async def link(self, key: str, method: str = "GET") -> str | None:
        """A presigned URL (SigV4, ``presign_ttl_s``) for ``method`` (GET or HEAD) on the
        recording ``key``, or None when there is no such object.

        Raises:
            S3StoreError: the store did not answer within ``LINK_TIMEOUT_S``.
        """
        if not await self.exists(key):
            return None
        obj = self.object_key(key)
        op = "head_object" if method == "HEAD" else "get_object"
        url: str = await self.call(
            self._client.generate_presigned_url, op,
            Params={"Bucket": self.bucket, "Key": obj}, ExpiresIn=self.presign_ttl_s)
        return url

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run the blocking ``fn`` in a worker thread, within the store's call limit.

        A cancelled call leaves its thread to finish on its own (bounded by the client's
        timeouts); its result is dropped.
        """
        return await trio.to_thread.run_sync(
            lambda: fn(*args, **kwargs), limiter=self._limiter, abandon_on_cancel=True)

    async def retrying(self, what: str, fn: Callable[[], T], *,
                       upload: tuple[str, str] | None = None) -> T:
        """``fn()`` in a thread, tried again after transient errors with backoff.

        The caller's cancel scope sets the deadline. With ``upload`` (object key, upload
        id), a failed call first checks that the multipart upload still exists (some
        servers answer a part for an unknown upload with a 500, not ``NoSuchUpload``).

        Raises:
            _UploadGone: the multipart upload no longer exists.
            S3StoreError: an error that another try cannot fix.
        """
        attempt = 0
        while True:
            try:
                return await self.call(fn)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                if isinstance(exc, botocore.exceptions.ClientError) \
                        and _code(exc) in _RESTART_CODES:
                    raise _UploadGone(str(exc)) from exc
                if not _transient(exc):
                    raise S3StoreError(f"{what}: {exc}") from exc
                log.warning("s3 %s failed (try %d): %s", what, attempt + 1, exc)
                if upload is not None and not await self._upload_exists(*upload):
                    raise _UploadGone(f"{what}: the upload is gone") from exc
            attempt += 1
            self._stats["retries"] += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(attempt, 16))
            await trio.sleep(delay * random.uniform(0.5, 1.0))

    async def _upload_exists(self, key: str, upload_id: str) -> bool:
        try:
            await self.call(self._client.list_parts, Bucket=self.bucket, Key=key,
                            UploadId=upload_id, MaxParts=1)
        except botocore.exceptions.ClientError as exc:
            return _code(exc) != "NoSuchUpload"
        except botocore.exceptions.BotoCoreError:
            pass  # cannot tell; the next try will
        return True

    def _count(self, name: str, n: int = 1) -> None:
        self._stats[name] += n

    def _remove_stale_spool(self) -> None:
        """Spool files of sessions that died with their process."""
        cutoff = time.time() - STALE_SPOOL_S
        for p in self.spool_dir.glob("*.spool"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    log.info("removed stale spool file %s", p)
            except OSError:
                pass  # another process's, gone meanwhile


class S3Writer:
    """One recording on its way to S3. Use through :meth:`S3Store.open`."""

    def __init__(self, store: S3Store, key: str, spool: Path,
                 fh: trio.abc.AsyncResource) -> None:
        self._store = store
        self._key = key
        self._obj = store.object_key(key)
        self._spool = spool
        self.local_copy = spool  # what was written so far, for ArchiveSink's fallback
        self._fh = fh
        self._size = 0  # bytes written to the spool file
        self._sent = 0  # bytes covered by uploaded parts
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._next_try = 0  # after a part failed: spool size at which to try again
        self._closed = False

    async def flush_local(self) -> None:
        """Make ``local_copy`` (the spool file) hold every byte written so far."""
        await self._fh.flush()  # type: ignore[attr-defined]

    async def write(self, data: bytes) -> None:
        """Append ``data``; upload a part when one has filled.

        A part upload that fails past the deadline is logged and tried again when the
        next part fills, or at the commit: the recording is still whole on disk.
        """
        if not data:
            return
        await self._fh.write(data)  # type: ignore[attr-defined]
        self._size += len(data)
        part = self._store.part_size
        if self._size - self._sent > part and self._size >= self._next_try:
            # ">" not ">=": a recording that ends exactly on a part boundary stays a PUT
            try:
                with trio.fail_after(self._store.retry_deadline_s):
                    await self._send_parts(last=False)
            except (trio.TooSlowError, S3StoreError) as exc:
                self._next_try = self._size + part
                log.warning("s3 upload of %s is behind (%s); will try again", self._obj,
                            str(exc) or "deadline passed")

    async def commit(self) -> StoredRecord:
        """Send what is left and make the object visible.

        Raises:
            S3StoreError: the upload did not complete within the deadline.
            OSError: the spool file could not be read.
        """
        try:
            with trio.fail_after(self._store.retry_deadline_s):
                await self._fh.flush()  # type: ignore[attr-defined]
                if self._upload_id is None and self._size <= self._store.part_size:
                    await self._put()
                else:
                    await self._send_parts(last=True)
                    await self._complete()
        except trio.TooSlowError as exc:
            self._store._count("failures")
            raise S3StoreError(f"s3://{self._store.bucket}/{self._obj}: not stored within "
                               f"{self._store.retry_deadline_s:g} s") from exc
        except S3StoreError:
            self._store._count("failures")
            raise
        self._store._count("recordings")
        await self._close()
        return StoredRecord(self._key, self._size)

    async def abort(self) -> None:
        """Drop the recording: abort the multipart upload (best effort) and the spool file.

        Never raises; an upload that cannot be aborted now is left to the bucket's
        lifecycle rule (see docs/operations.md).
        """
        upload_id, self._upload_id = self._upload_id, None
        try:
            if upload_id is not None:
                with trio.move_on_after(ABORT_TIMEOUT_S) as scope:
                    await self._store.call(
                        self._store._client.abort_multipart_upload,
                        Bucket=self._store.bucket, Key=self._obj, UploadId=upload_id)
                if scope.cancelled_caught:
                    log.warning("s3 abort of %s (upload %s) timed out", self._obj, upload_id)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) != "NoSuchUpload":
                log.warning("s3 abort of %s (upload %s) failed: %s", self._obj, upload_id, exc)
        except botocore.exceptions.BotoCoreError as exc:
            log.warning("s3 abort of %s (upload %s) failed: %s", self._obj, upload_id, exc)
        finally:
            await self._close()

    # -- internals -------------------------------------------------------------------

    def _what(self, op: str) -> str:
        return f"{op} s3://{self._store.bucket}/{self._obj}"

    async def _put(self) -> None:
        st = self._store
        size = self._size

        def put() -> None:
            data = _read(self._spool, 0, size)
            st._client.put_object(Bucket=st.bucket, Key=self._obj, Body=data,
                                  ContentType=CONTENT_TYPE, ContentMD5=_md5(data))

        await st.retrying(self._what("PutObject"), put)
        st._count("puts")

    async def _send_parts(self, *, last: bool) -> None:
        """Upload every full part in the spool (and with ``last``, the tail too)."""
        await self._fh.flush()  # type: ignore[attr-defined]
        part = self._store.part_size
        while True:
            try:
                if self._upload_id is None:
                    await self._create()
                while self._size - self._sent > part or (last and self._sent < self._size):
                    await self._send_part(min(part, self._size - self._sent))
                return
            except _UploadGone as exc:
                log.warning("s3 upload of %s is gone (%s); starting over from the spool",
                            self._obj, exc)
                self._store._count("restarts")
                self._upload_id, self._parts, self._sent = None, [], 0

    async def _create(self) -> None:
        st = self._store

        def create() -> str:
            r = st._client.create_multipart_upload(Bucket=st.bucket, Key=self._obj,
                                                   ContentType=CONTENT_TYPE)
            return str(r["UploadId"])

        self._upload_id = await st.retrying(self._what("CreateMultipartUpload"), create)

    async def _send_part(self, size: int) -> None:
        st = self._store
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise S3StoreError(f"{self._obj}: more than {MAX_PARTS} parts; raise "
                               "S3_PART_SIZE_BYTES")
        upload_id, offset = self._upload_id, self._sent
        assert upload_id is not None

        def upload() -> str:
            data = _read(self._spool, offset, size)
            r = st._client.upload_part(Bucket=st.bucket, Key=self._obj, UploadId=upload_id,
                                       PartNumber=number, Body=data, ContentMD5=_md5(data))
            return str(r["ETag"])

        etag = await st.retrying(self._what(f"UploadPart {number}"), upload,
                                 upload=(self._obj, upload_id))
        self._parts.append({"ETag": etag, "PartNumber": number})
        self._sent += size
        st._count("parts")

    async def _complete(self) -> None:
        st = self._store
        while True:
            upload_id = self._upload_id
            assert upload_id is not None
            complete = functools.partial(
                st._client.complete_multipart_upload, Bucket=st.bucket, Key=self._obj,
                UploadId=upload_id, MultipartUpload={"Parts": list(self._parts)})
            try:
                await st.retrying(self._what("CompleteMultipartUpload"), complete,
                                  upload=(self._obj, upload_id))
                self._upload_id = None
                return
            except _UploadGone as exc:
                log.warning("s3 upload of %s is gone at completion (%s); starting over",
                            self._obj, exc)
                st._count("restarts")
                self._upload_id, self._parts, self._sent = None, [], 0
                await self._send_parts(last=True)

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):  # the spool file goes even when cancelled
            await self._fh.aclose()
            await trio.to_thread.run_sync(lambda: self._spool.unlink(missing_ok=True))
