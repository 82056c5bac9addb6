"""ArchiveEncoder: streaming Ogg Opus that decodes back to the session's audio; and the
recording keys it is stored under: scoped by tenant, through the store, the local
fallback and the retrier."""

from __future__ import annotations

import errno
import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from gateway.records import (
    ArchiveRetrier,
    ArchiveSink,
    LocalStore,
    LocalWriter,
    StoredRecord,
    flat_name,
    key_of_flat,
    record_key,
    safe_key,
    tenant_part,
)
from stages.archive import ArchiveEncoder
from tests import speech


def _encode(audio: np.ndarray, chunk: int) -> tuple[bytes, list[int], object]:
    enc = ArchiveEncoder()
    parts, sizes = [], []
    for i in range(0, len(audio), chunk):
        out = enc.feed(audio[i:i + chunk])
        parts.append(out)
        sizes.append(len(out))
    tail, result = enc.close()
    parts.append(tail)
    return b"".join(parts), sizes, result


def test_round_trip_duration_and_correlation() -> None:
    gap = np.zeros(8000, dtype=np.int16)
    audio = np.concatenate([gap, speech.librivox()[0][1], gap])  # speech and silence
    blob, sizes, result = _encode(audio, 320)
    assert blob[:4] == b"OggS" and b"OpusHead" in blob[:100]
    assert result.bytes == len(blob) and result.sha256 == hashlib.sha256(blob).hexdigest()
    assert result.samples == len(audio)
    # streamed: bytes leave while the session runs, not only at close
    assert sum(1 for s in sizes if s) > 3
    decoded, sr = soundfile.read(io.BytesIO(blob), dtype="int16")
    assert sr == 16000
    assert abs(len(decoded) - len(audio)) <= 320  # within 20 ms
    n = min(len(decoded), len(audio))
    a, b = audio[:n].astype(float), decoded[:n].astype(float)
    lags = range(-400, 401, 8)
    best = max(np.corrcoef(a[1000 + lag: n - 1000 + lag], b[1000: n - 1000])[0, 1]
               for lag in lags)
    assert best > 0.9
    # about 24 kbps: a tenth of PCM's 256 kbps
    kbps = len(blob) * 8 / (len(audio) / 16000) / 1000
    assert 15 < kbps < 32


def test_close_is_idempotent_and_feed_after_close_fails() -> None:
    enc = ArchiveEncoder()
    enc.feed(np.zeros(320, dtype=np.int16))
    _, first = enc.close()
    assert enc.close() == (b"", first)
    with pytest.raises(ValueError):
        enc.feed(np.zeros(320, dtype=np.int16))


def test_rejects_non_int16_and_bad_bitrate() -> None:
    with pytest.raises(ValueError):
        ArchiveEncoder().feed(np.zeros(320, dtype=np.float32))
    with pytest.raises(ValueError):
        ArchiveEncoder(bitrate=1000)


@pytest.mark.parametrize("n", [1, 959, 960, 961, 16000, 3 * 16000 + 7])
@pytest.mark.parametrize("chunk", [320, 1000])
def test_decodes_to_exactly_the_samples_fed(n: int, chunk: int) -> None:
    audio = np.concatenate([a for _, a, _ in speech.librivox()])[:n]
    blob, _, result = _encode(audio, chunk)
    decoded, sr = soundfile.read(io.BytesIO(blob), dtype="int16")
    assert sr == 16000 and len(decoded) == n == result.samples


def test_aligned_with_the_input() -> None:
    """The pre-skip in the header is the encoder's real delay: no shift on decode."""
    audio = speech.librivox()[0][1]
    blob, _, _ = _encode(audio, 320)
    decoded, _ = soundfile.read(io.BytesIO(blob), dtype="int16")
    a, b = audio.astype(float), decoded.astype(float)
    corr = {lag: np.corrcoef(a[2000:-2000], b[2000 + lag:len(b) - 2000 + lag])[0, 1]
            for lag in (-2, -1, 0, 1, 2)}
    assert max(corr, key=corr.__getitem__) == 0
    assert corr[0] > 0.95


def test_rejects_bad_complexity() -> None:
    for bad in (-1, 11, True, 2.0):
        with pytest.raises(ValueError):
            ArchiveEncoder(complexity=bad)  # type: ignore[arg-type]


def test_closed_tells_when_feed_would_raise() -> None:
    enc = ArchiveEncoder()
    enc.feed(np.zeros(960, dtype=np.int16))
    assert not enc.closed
    enc.close()
    assert enc.closed
    with pytest.raises(ValueError, match="closed"):
        enc.feed(np.zeros(320, dtype=np.int16))


# -- recording keys: tenant-scoped, and nothing else -----------------------------------

HASHED = re.compile(r"t-[0-9a-f]{32}")


@pytest.mark.parametrize(("flow", "tenant", "key"), [
    ("f1", "", "f1.ogg"),
    ("f1", "acme", "acme/f1.ogg"),
    ("a.b:c-d_e", "Tenant_1.eu:prod-2", "Tenant_1.eu:prod-2/a.b:c-d_e.ogg"),
])
def test_record_key_scopes_by_tenant(flow: str, tenant: str, key: str) -> None:
    assert record_key(flow, tenant) == key
    assert safe_key(key)


@pytest.mark.parametrize("tenant", ["..", ".", ".hidden", "a/b", "a\\b", "acme corp", "é",
                                    "x" * 129, "a\n", "a\x00", "/", "%2F",
                                    "t-" + "0" * 32, "t-" + "a" * 32, "x.ogg", "X.OGG"])
def test_an_unsafe_or_hash_shaped_tenant_becomes_a_stable_hash(tenant: str) -> None:
    key = record_key("f1", tenant)
    part, name = key.split("/")
    assert HASHED.fullmatch(part) and name == "f1.ogg" and safe_key(key)
    assert part == "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:32]
    assert record_key("f1", tenant) == key  # stable
    assert tenant_part(tenant) != tenant  # no tenant can name another's hashed folder


def test_distinct_tenants_get_distinct_folders() -> None:
    tenants = ["acme", "ACME", "acme ", "acme/", "t-" + "0" * 32, "..", "x" * 128,
               "x" * 129, "é", "e"]
    parts = [tenant_part(t) for t in tenants]
    assert len(set(parts)) == len(parts)


@pytest.mark.parametrize("flow", ["", ".x", "..", "a/b", "a b", "x" * 129, "é", "a\n"])
@pytest.mark.parametrize("tenant", ["", "acme"])
def test_record_key_refuses_unsafe_flow_ids(flow: str, tenant: str) -> None:
    with pytest.raises(ValueError):
        record_key(flow, tenant)


@pytest.mark.parametrize("key", [
    "", ".ogg", "f1", "f1.ogg\n", "../f1.ogg", "/f1.ogg", "/acme/f1.ogg", "acme/../f1.ogg",
    "a/b/f1.ogg", "acme//f1.ogg", "acme/", "/", "./f1.ogg", "../etc/f1.ogg", ".acme/f1.ogg",
    "acme/.f1.ogg", "acme\\f1.ogg", "acme%2Ff1.ogg", "acme/f1.wav", "x" * 129 + "/f1.ogg",
    "acme/f1.ogg/", "é/f1.ogg", "x.ogg/f1.ogg",
])
def test_safe_key_accepts_only_the_two_shapes(key: str) -> None:
    assert not safe_key(key)


@pytest.mark.parametrize("key", ["f1.ogg", "acme/f1.ogg", "t-" + "0" * 32 + "/x.ogg"])
def test_flat_names_are_one_component_and_reversible(key: str) -> None:
    flat = flat_name(key)
    assert "/" not in flat and key_of_flat(flat) == key


@pytest.mark.parametrize("name", ["acme%2Fb%2Ff1.ogg", "..%2Ff1.ogg", "acme%2f1.ogg",
                                  "acme%2F.ogg", "%2Ff1.ogg", "acme/f1.ogg", "f1.txt"])
def test_key_of_flat_refuses_names_it_did_not_make(name: str) -> None:
    assert key_of_flat(name) is None


# -- tenant keys through the local store, the fallback and the retrier ----------------

class Refusing(LocalStore):
    """A local store that refuses every write until ``heal()`` (a full disk)."""

    broken = True

    async def open_key(self, key: str) -> LocalWriter:
        if self.broken:
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        return await super().open_key(key)


@pytest.mark.timeout(10)
async def test_local_store_keeps_tenants_apart_and_exists(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "rec")
    for tenant, data in (("acme", b"A"), ("globex", b"G"), ("", b"N"), ("a b", b"H")):
        w = await store.open("same-flow", tenant)
        await w.write(data)
        stored = await w.commit()
        assert stored == StoredRecord(record_key("same-flow", tenant), 1)
    assert (tmp_path / "rec" / "acme" / "same-flow.ogg").read_bytes() == b"A"
    assert (tmp_path / "rec" / "globex" / "same-flow.ogg").read_bytes() == b"G"
    assert (tmp_path / "rec" / "same-flow.ogg").read_bytes() == b"N"
    assert (tmp_path / "rec" / tenant_part("a b") / "same-flow.ogg").read_bytes() == b"H"
    assert await store.exists("acme/same-flow.ogg")
    assert not await store.exists("acme/other.ogg")
    assert not await store.exists("initech/same-flow.ogg")
    assert not await store.exists("../rec/acme/same-flow.ogg")
    assert not await store.exists("acme")  # a folder is not a recording
    with pytest.raises(ValueError):
        await store.open_key("acme/../x.ogg")
    # no temporary files left behind anywhere
    assert sorted(p.name for p in (tmp_path / "rec").rglob(".*")) == []


@pytest.mark.timeout(10)
async def test_a_tenant_recording_goes_to_the_fallback_and_the_retrier_stores_it(
        tmp_path: Path) -> None:
    store = Refusing(tmp_path / "rec")
    fallback = tmp_path / "fallback"
    sink = ArchiveSink(store, "f1", fallback, tenant="acme")
    assert sink.key == "acme/f1.ogg"
    told = await sink.open()  # refused: the recording goes on locally
    assert told is not None and "stored later" in told
    assert await sink.write(b"OggS-1") is None
    stored, problem = await sink.commit()
    assert stored is None and problem and "No space left" in problem
    assert [p.name for p in fallback.iterdir()] == ["acme%2Ff1.ogg"]
    hashed = ArchiveSink(store, "f1", fallback, tenant="x/y")  # a tenant that is hashed
    await hashed.open()
    await hashed.write(b"OggS-2")
    await hashed.commit()
    plain = ArchiveSink(store, "f1", fallback)
    await plain.open()
    await plain.write(b"OggS-3")
    await plain.commit()
    (fallback / "junk%2Fa%2Fb.ogg").write_bytes(b"not ours")  # never taken as a key
    retrier = ArchiveRetrier(store, fallback)
    assert len(retrier.pending()) == 3
    assert not await retrier.attempt() and retrier.failures == 3
    store.broken = False
    assert await retrier.attempt() and retrier.stored == 3
    root = tmp_path / "rec"
    assert (root / "acme" / "f1.ogg").read_bytes() == b"OggS-1"
    assert (root / tenant_part("x/y") / "f1.ogg").read_bytes() == b"OggS-2"
    assert (root / "f1.ogg").read_bytes() == b"OggS-3"
    assert sorted(p.name for p in fallback.iterdir()) == ["junk%2Fa%2Fb.ogg"]
