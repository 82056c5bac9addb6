"""The S3 archive store against a real S3-API server on loopback (moto in server mode):
multipart uploads while the session runs, aborts, idempotent keys, tenant-scoped keys
and ``exists``, retries through a proxy that kills connections, a server that restarts
mid-upload, ``/records/`` refusing unsigned requests before the store is asked, and the
gateway end to end (record_url redirects to a presigned URL that serves the Ogg Opus
with ranges)."""

from __future__ import annotations

import io
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import httpx
import numpy as np
import pytest
import soundfile
import trio
from botocore.config import Config

from gateway.client import stream_audio
from gateway.httpapp import GatewayHttpApp
from gateway.records import StoredRecord, tenant_part
from gateway.s3store import S3Store, S3StoreError
from gateway.signing import UrlSigner
from stages.vad import VadModel
from tests.integration.test_gateway import GOFORWARD, SILENCE, _audio, checked, start_gateway
from tests.integration.test_records_http import request, serve_app
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

PART = 64 * 1024  # bytes: the tests' part size (S3 and moto's default minimum is 5 MiB)
KEYS = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
MOTO_START_S = 20.0
URL_KEY = b"s3-gateway-test-url-key-0123456789abcdef"  # RECORDS_URL_KEY of the gateway test


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1, in a subprocess we can kill and restart."""

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # moto checks the minimum part size like S3 does, at our test size
        env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(PART)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        started = threading.Event()
        proc = self._proc

        def drain() -> None:  # werkzeug logs every request: keep the pipe empty
            assert proc.stderr is not None
            for line in proc.stderr:
                m = re.search(r"Running on http://127\.0\.0\.1:(\d+)", line)
                if m and not started.is_set():
                    self.port = int(m.group(1))
                    started.set()

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        if not started.wait(MOTO_START_S):
            self.stop()
            raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            assert self._proc.stderr is not None
            if self._drain is not None:
                self._drain.join(5)
            self._proc.stderr.close()
            self._proc = None

    def client(self) -> Any:
        return boto3.session.Session().client(
            "s3", endpoint_url=self.url, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
            **KEYS)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"voxgate-{uuid.uuid4().hex[:12]}"
    moto.client().create_bucket(Bucket=name)
    return name


def make_store(url: str, bucket: str, spool: Path, **kw: Any) -> S3Store:
    args: dict[str, Any] = {"part_size_bytes": PART, "min_part_size_bytes": PART,
                            "retry_deadline_s": 10.0, **kw}
    return S3Store(bucket=bucket, spool_dir=spool, endpoint_url=url,
                   access_key_id="test", secret_access_key="test", **args)


def chunks(data: bytes, rng: np.random.Generator) -> Iterator[bytes]:
    """``data`` in pieces of 1..4000 bytes, like the encoder's Ogg pages."""
    i = 0
    while i < len(data):
        n = int(rng.integers(1, 4000))
        yield data[i:i + n]
        i += n


async def write_all(writer: Any, data: bytes, seed: int = 0) -> None:
    for piece in chunks(data, np.random.default_rng(seed)):
        await writer.write(piece)


def payload(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def object_bytes(client: Any, bucket: str, key: str) -> bytes:
    body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def pending_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = client.list_multipart_uploads(Bucket=bucket).get(
        "Uploads", [])
    return uploads


# -- the writer ------------------------------------------------------------------------

async def test_parts_are_uploaded_while_writing_and_the_object_is_exact(
        moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client = moto.client()
    store = make_store(moto.url, bucket, tmp_path)
    data = payload(5 * PART + PART // 2)
    writer = await store.open("multi-1")
    await write_all(writer, data[:3 * PART + 100])
    # three parts are on the server before the recording ends
    (upload,) = pending_uploads(client, bucket)
    assert upload["Key"] == "records/multi-1.ogg"
    parts = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    assert [p["Size"] for p in parts["Parts"]] == [PART] * 3
    await write_all(writer, data[3 * PART + 100:], seed=2)
    stored = await writer.commit()
    assert stored == StoredRecord("multi-1.ogg", len(data))
    head = client.head_object(Bucket=bucket, Key="records/multi-1.ogg", PartNumber=1)
    assert head["PartsCount"] == 6
    # (moto answers a HEAD with PartNumber without the object's Content-Type)
    assert client.head_object(Bucket=bucket, Key="records/multi-1.ogg")["ContentType"] \
        == "audio/ogg"
    assert object_bytes(client, bucket, "records/multi-1.ogg") == data
    assert pending_uploads(client, bucket) == [] and list(tmp_path.iterdir()) == []
    s = store.statistics()
    assert (s.recordings, s.parts, s.puts, s.restarts, s.failures) == (1, 6, 0, 0, 0)


@pytest.mark.parametrize("size", [1, 1000, PART])
async def test_a_recording_within_one_part_is_one_put(
        moto: MotoServer, bucket: str, tmp_path: Path, size: int) -> None:
    client = moto.client()
    store = make_store(moto.url, bucket, tmp_path)
    data = payload(size)
    writer = await store.open("small")
    await write_all(writer, data)
    assert pending_uploads(client, bucket) == []  # nothing sent yet
    assert await writer.commit() == StoredRecord("small.ogg", size)
    head = client.head_object(Bucket=bucket, Key="records/small.ogg")
    assert "-" not in head["ETag"] and head["ContentType"] == "audio/ogg"
    assert object_bytes(client, bucket, "records/small.ogg") == data
    assert store.statistics().puts == 1 and list(tmp_path.iterdir()) == []


async def test_abort_leaves_no_object_and_no_pending_upload(
        moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client = moto.client()
    store = make_store(moto.url, bucket, tmp_path)
    writer = await store.open("aborted")
    await write_all(writer, payload(3 * PART + 10))
    assert len(pending_uploads(client, bucket)) == 1
    await writer.abort()
    assert pending_uploads(client, bucket) == []
    with pytest.raises(botocore.exceptions.ClientError):
        client.head_object(Bucket=bucket, Key="records/aborted.ogg")
    assert list(tmp_path.iterdir()) == []


async def test_the_same_flow_id_replaces_the_recording(
        moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client = moto.client()
    store = make_store(moto.url, bucket, tmp_path)
    first, second, third = payload(3 * PART, 1), payload(PART // 3, 2), payload(2 * PART, 3)
    w = await store.open("again")
    await write_all(w, first)
    await w.commit()
    w = await store.open("again")  # a retried flush: a small one this time
    await write_all(w, second)
    await w.commit()
    assert object_bytes(client, bucket, "records/again.ogg") == second
    # a resumed session while the old one is still uploading: the last commit wins
    old, new = await store.open("again"), await store.open("again")
    await write_all(old, first)
    await write_all(new, third)
    await old.commit()
    await new.commit()
    listed = client.list_objects_v2(Bucket=bucket, Prefix="records/")["Contents"]
    assert [o["Key"] for o in listed] == ["records/again.ogg"]
    assert object_bytes(client, bucket, "records/again.ogg") == third
    assert pending_uploads(client, bucket) == []


async def test_link_presigns_get_and_head_and_is_none_when_missing(
        moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    store = make_store(moto.url, bucket, tmp_path, presign_ttl_s=60)
    w = await store.open("linked")
    await write_all(w, b"OggS" + payload(5000))
    await w.commit()
    get_url = await store.link("linked.ogg")
    head_url = await store.link("linked.ogg", "HEAD")
    assert get_url and head_url and "X-Amz-Signature=" in get_url
    assert "X-Amz-Expires=60" in get_url
    async with httpx.AsyncClient() as http:
        r = await http.get(get_url, headers={"range": "bytes=0-3"})
        assert r.status_code == 206 and r.content == b"OggS"
        r = await http.head(head_url)
        assert r.status_code == 200 and r.headers["content-length"] == "5004"
    assert await store.link("missing.ogg") is None
    assert await store.link("../etc.ogg") is None


async def test_tenants_get_their_own_prefix_and_exists_asks_the_store(
        moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client = moto.client()
    store = make_store(moto.url, bucket, tmp_path)
    for tenant, data in (("acme", b"A" * 10), ("globex", b"G" * 20), ("", b"N" * 30),
                         ("x/../y", b"H" * 40)):
        w = await store.open("same", tenant)
        await write_all(w, data)
        stored = await w.commit()
        assert stored.bytes == len(data) and stored.key.endswith("same.ogg")
    hashed = tenant_part("x/../y")
    listed = sorted(o["Key"] for o in
                    client.list_objects_v2(Bucket=bucket, Prefix="records/")["Contents"])
    assert listed == sorted(["records/acme/same.ogg", "records/globex/same.ogg",
                             "records/same.ogg", f"records/{hashed}/same.ogg"])
    assert object_bytes(client, bucket, "records/acme/same.ogg") == b"A" * 10
    assert object_bytes(client, bucket, "records/globex/same.ogg") == b"G" * 20
    assert await store.exists("acme/same.ogg") and await store.exists("same.ogg")
    assert await store.exists(f"{hashed}/same.ogg")
    assert not await store.exists("initech/same.ogg")
    assert not await store.exists("acme/other.ogg")
    assert not await store.exists("../records/acme/same.ogg")  # never asked: unsafe
    assert not await store.exists("acme")
    # the retrier's way in: by key
    w = await store.open_key("acme/by-key.ogg")
    await write_all(w, b"K" * 5)
    assert await w.commit() == StoredRecord("acme/by-key.ogg", 5)
    assert object_bytes(client, bucket, "records/acme/by-key.ogg") == b"K" * 5
    with pytest.raises(ValueError):
        await store.open_key("acme/../by-key.ogg")
    assert list(tmp_path.iterdir()) == []  # flat spool files, all gone


async def test_exists_raises_when_the_store_cannot_be_asked(bucket: str,
                                                          tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = make_store(f"http://127.0.0.1:{port}", bucket, tmp_path)
    with trio.fail_after(10), pytest.raises(S3StoreError):
        await store.exists("acme/f1.ogg")


async def test_records_are_refused_unsigned_before_the_store_is_asked(
        nursery: trio.Nursery, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    store = make_store(moto.url, bucket, tmp_path / "spool", presign_ttl_s=60)
    w = await store.open("f1", "acme")
    await write_all(w, b"OggS" + payload(3000))
    await w.commit()
    signer = UrlSigner(b"s3-records-test-key-0123456789abcdef", 60)
    port, stop = await serve_app(nursery, GatewayHttpApp(
        store=store, metrics=lambda: b"", ready=lambda: True, signer=signer))
    for target in ("/records/acme/f1.ogg", "/records/acme/missing.ogg",
                   f"/records/acme/f1.ogg?{signer.sign('/records/acme/f2.ogg').split('?')[1]}",
                   signer.sign("/records/acme/f1.ogg", now=0)):
        for method in ("GET", "HEAD"):
            r = await request(port, method, target)
            assert r.status == 403 and "location" not in r.headers, (method, target)
    url = signer.sign("/records/acme/f1.ogg")
    for method in ("GET", "HEAD"):
        r = await request(port, method, url)
        assert r.status == 307 and r.headers["cache-control"] == "no-store"
        assert r.headers["location"].startswith(f"{moto.url}/{bucket}/records/acme/f1.ogg?")
    async with httpx.AsyncClient() as http:
        got = await http.get((await request(port, "GET", url)).headers["location"],
                             headers={"range": "bytes=0-3"})
        assert got.status_code == 206 and got.content == b"OggS"
    assert (await request(port, "GET", signer.sign("/records/acme/missing.ogg"))).status == 404
    stop.set()
    # a store that cannot answer: unsigned is still a plain 403, signed a 503
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    down = make_store(f"http://127.0.0.1:{dead}", bucket, tmp_path / "spool2")
    port, stop = await serve_app(nursery, GatewayHttpApp(
        store=down, metrics=lambda: b"", ready=lambda: True, signer=signer))
    assert (await request(port, "GET", "/records/acme/f1.ogg")).status == 403
    assert (await request(port, "HEAD", "/records/acme/f1.ogg")).status == 403
    with trio.fail_after(15):
        r = await request(port, "GET", url)
    assert r.status == 503 and r.headers["retry-after"] == "5"
    stop.set()


async def test_the_commit_raises_an_oserror_when_the_store_stays_away(
        bucket: str, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = make_store(f"http://127.0.0.1:{port}", bucket, tmp_path, retry_deadline_s=1.0)
    w = await store.open("unreachable")
    await write_all(w, payload(100))
    with pytest.raises(S3StoreError) as info:
        await w.commit()
    assert isinstance(info.value, OSError) and "unreachable.ogg" in str(info.value)
    await w.abort()
    assert list(tmp_path.iterdir()) == []
    assert store.statistics().failures == 1 and store.statistics().retries >= 2


async def test_a_missing_bucket_fails_at_once(moto: MotoServer, tmp_path: Path) -> None:
    store = make_store(moto.url, "voxgate-no-such-bucket", tmp_path)
    w = await store.open("nobucket")
    await write_all(w, payload(100))
    with trio.fail_after(5), pytest.raises(S3StoreError, match="NoSuchBucket"):
        await w.commit()
    await w.abort()


# -- failures mid-upload ---------------------------------------------------------------

def _reset(stream: trio.SocketStream) -> None:
    """Make the coming close send RST, as a killed peer or a dropped NAT entry does."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass
class ChaosProxy:
    """A TCP proxy on loopback that can reset connections mid-request, or be down."""

    upstream_port: int
    kill_after_bytes: int = 0  # reset a connection once it has carried this much upward
    kills_left: int = 0
    down: bool = False
    kills: int = 0
    port: int = 0
    _scopes: set[trio.CancelScope] = field(default_factory=set)

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(trio.serve_tcp, self._handle, 0)
        self.port = listeners[0].socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_down(self) -> None:
        """Refuse new connections and reset the open ones."""
        self.down = True
        for scope in list(self._scopes):
            scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream: trio.SocketStream | None = None
        try:
            if self.down:
                return
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                async with trio.open_nursery() as n:
                    n.start_soon(self._pump, client, upstream, n.cancel_scope, True)
                    n.start_soon(self._pump, upstream, client, n.cancel_scope, False)
            self._scopes.discard(scope)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    _reset(s)
                    await s.aclose()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream,
                    scope: trio.CancelScope, upward: bool) -> None:
        carried = 0
        try:
            async for chunk in src:
                if upward and self.kills_left > 0 \
                        and carried + len(chunk) > self.kill_after_bytes:
                    # the server gets the start of the request, then a reset
                    await dst.send_all(chunk[:self.kill_after_bytes - carried])
                    self.kills_left -= 1
                    self.kills += 1
                    break
                carried += len(chunk)
                await dst.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def test_killed_connections_mid_part_are_retried(
        nursery: trio.Nursery, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client = moto.client()
    proxy = ChaosProxy(moto.port)
    await proxy.start(nursery)
    store = make_store(proxy.url, bucket, tmp_path)
    data = payload(4 * PART + 777)
    writer = await store.open("killed")
    await write_all(writer, data[:PART + 1])  # part 1 goes through untouched
    proxy.kill_after_bytes, proxy.kills_left = PART // 3, 4  # reset the next 4 mid-part
    await write_all(writer, data[PART + 1:])
    stored = await writer.commit()
    assert proxy.kills == 4 and proxy.kills_left == 0
    assert stored.bytes == len(data)
    assert object_bytes(client, bucket, "records/killed.ogg") == data
    head = client.head_object(Bucket=bucket, Key="records/killed.ogg", PartNumber=1)
    assert head["PartsCount"] == 5
    s = store.statistics()
    assert s.retries >= 4 and s.restarts == 0 and s.failures == 0
    assert pending_uploads(client, bucket) == []


async def test_a_part_that_fails_mid_session_is_sent_later(
        nursery: trio.Nursery, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client = moto.client()
    proxy = ChaosProxy(moto.port)
    await proxy.start(nursery)
    store = make_store(proxy.url, bucket, tmp_path, retry_deadline_s=0.5)
    data = payload(4 * PART + 99)
    writer = await store.open("later")
    await write_all(writer, data[:PART + 1])
    assert store.statistics().parts == 1
    proxy.set_down()
    with trio.fail_after(5):  # each part gives up after its deadline; no error
        await write_all(writer, data[PART + 1:3 * PART + 1])
    assert store.statistics().parts == 1 and store.statistics().failures == 0
    proxy.down = False
    await write_all(writer, data[3 * PART + 1:])
    await writer.commit()
    assert object_bytes(client, bucket, "records/later.ogg") == data
    assert store.statistics().parts == 5 and pending_uploads(client, bucket) == []


async def test_an_upload_that_is_gone_starts_over_from_the_spool(
        moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client = moto.client()
    store = make_store(moto.url, bucket, tmp_path)
    data = payload(4 * PART + 5)
    writer = await store.open("gone")
    await write_all(writer, data[:2 * PART + 5])
    (upload,) = pending_uploads(client, bucket)
    client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                  UploadId=upload["UploadId"])
    await write_all(writer, data[2 * PART + 5:])
    await writer.commit()
    assert object_bytes(client, bucket, "records/gone.ogg") == data
    s = store.statistics()
    assert s.restarts == 1 and s.parts == 2 + 5  # two sent, then all five again
    assert pending_uploads(client, bucket) == []


async def test_a_server_restart_mid_upload_is_survived(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    server = MotoServer()
    server.start()
    try:
        client = server.client()
        client.create_bucket(Bucket="voxgate-restart")
        proxy = ChaosProxy(server.port)
        await proxy.start(nursery)
        store = make_store(proxy.url, "voxgate-restart", tmp_path / "spool")
        data = payload(3 * PART + 4321)
        writer = await store.open("restarted")
        await write_all(writer, data)
        assert store.statistics().parts == 3
        # the server dies with the upload and everything it held
        proxy.set_down()
        server.stop()
        done = trio.Event()
        result: list[StoredRecord] = []

        async def commit() -> None:
            result.append(await writer.commit())
            done.set()

        nursery.start_soon(commit)
        await trio.sleep(0.5)  # the commit is retrying against a dead server
        assert not done.is_set() and store.statistics().retries >= 1
        await trio.to_thread.run_sync(server.start)  # same port, empty state
        client = server.client()
        client.create_bucket(Bucket="voxgate-restart")
        proxy.down = False
        with trio.fail_after(10):
            await done.wait()
        assert result[0].bytes == len(data)
        assert object_bytes(client, "voxgate-restart", "records/restarted.ogg") == data
        assert store.statistics().restarts >= 1
        assert pending_uploads(client, "voxgate-restart") == []
    finally:
        server.stop()


# -- the gateway -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


@pytest.fixture
async def s3_gateway(nursery: trio.Nursery, vad_model: VadModel, moto: MotoServer,
                     bucket: str, tmp_path: Path) -> AsyncIterator[Any]:
    _, asr_port, asr_stop = await start_asr(nursery, StandInEngine())
    g = await start_gateway(
        nursery, vad_model, tmp_path, f"http://127.0.0.1:{asr_port}",
        archive_store="s3", s3_endpoint_url=moto.url, s3_bucket=bucket,
        s3_access_key_id="test", s3_secret_access_key="test",
        archive_spool_dir=str(tmp_path / "spool"), records_url_key=URL_KEY.decode())
    yield g
    g.shutdown.set()
    asr_stop.set()


def _envelope(x: np.ndarray, n: int) -> np.ndarray:
    """RMS per frame of ``n`` samples."""
    frames = x[:len(x) // n * n].astype(np.float64).reshape(-1, n)
    return np.sqrt(np.mean(frames ** 2, axis=1))


async def test_gateway_records_to_s3_and_redirects_to_it(
        s3_gateway: Any, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    g = s3_gateway
    audio = _audio(SILENCE, GOFORWARD, SILENCE)
    r = checked(await stream_audio(g.ws_url, audio, realtime=False,
                                   start={"flowId": "s3-rec-1"}))
    (rec,) = r.of("record_url")
    path, _, query = rec["url"].removeprefix(g.http).partition("?")
    assert path == "/records/s3-rec-1.ogg"  # no auth, no tenant: the key is the flowId's
    # signed with RECORDS_URL_KEY, valid now
    assert UrlSigner(URL_KEY, g.cfg.records_url_ttl_s).verify(path, query.encode())
    assert not r.of("error")
    client = moto.client()
    head = client.head_object(Bucket=bucket, Key="records/s3-rec-1.ogg")
    assert head["ContentType"] == "audio/ogg" and head["ContentLength"] == rec["bytes"]
    assert pending_uploads(client, bucket) == []
    assert list((tmp_path / "spool").iterdir()) == []
    assert not (tmp_path / "records" / "s3-rec-1.ogg").exists()  # nothing kept locally

    async with httpx.AsyncClient() as http:
        hop = await http.get(rec["url"])
        assert hop.status_code == 307 and hop.headers["cache-control"] == "no-store"
        assert hop.headers["location"].startswith(f"{moto.url}/{bucket}/records/s3-rec-1.ogg?")
        assert "X-Amz-Signature=" in hop.headers["location"]
        assert (await http.get(f"{g.http}/records/nope.ogg")).status_code == 403
        assert (await http.get(f"{g.http}/records/..%2Fetc.ogg")).status_code == 403
        unsigned = await http.get(f"{g.http}{path}")
        assert unsigned.status_code == 403 and "location" not in unsigned.headers
        missing = UrlSigner(URL_KEY, 60).sign("/records/nope.ogg")
        assert (await http.get(f"{g.http}{missing}")).status_code == 404
    async with httpx.AsyncClient(follow_redirects=True) as http:
        full = await http.get(rec["url"])
        assert full.status_code == 200 and full.headers["content-type"] == "audio/ogg"
        assert len(full.content) == rec["bytes"]
        part = await http.get(rec["url"], headers={"range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == full.content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{rec['bytes']}"
        head_r = await http.head(rec["url"])
        assert head_r.status_code == 200
        assert head_r.headers["content-length"] == str(rec["bytes"])
        exposed = (await http.get(f"{g.http}/metrics")).text
        assert "archive_s3_puts_total 1.0" in exposed
        assert "archive_s3_failures_total 0.0" in exposed

    decoded, sr = soundfile.read(io.BytesIO(full.content), dtype="int16")
    assert abs(len(decoded) / sr - len(audio) / 16000) <= 0.020
    assert abs(rec["duration_ms"] - len(audio) // 16) <= 20
    # the recording is the input: 20 ms loudness envelopes line up
    env_in, env_out = _envelope(audio, 320), _envelope(decoded, sr // 50)
    n = min(len(env_in), len(env_out))
    assert np.corrcoef(env_in[:n], env_out[:n])[0, 1] > 0.95
    # and sample by sample, at the best alignment within 10 ms (libsndfile decodes to
    # the input rate the Ogg Opus header names; resample if it ever does not)
    if sr != 16000:
        t = np.arange(len(decoded)) / sr
        decoded = np.interp(np.arange(int(t[-1] * 16000)) / 16000, t, decoded)
    x, y = audio.astype(np.float64), np.asarray(decoded, dtype=np.float64)
    best = max(_ncc(x, y, lag) for lag in range(-160, 161, 4))
    assert best > 0.9


def _ncc(x: np.ndarray, y: np.ndarray, lag: int) -> float:
    """Normalised correlation of ``x`` and ``y`` shifted by ``lag`` samples."""
    if lag > 0:
        y = y[lag:]
    elif lag < 0:
        x = x[-lag:]
    n = min(len(x), len(y))
    a, b = x[:n], y[:n]
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
