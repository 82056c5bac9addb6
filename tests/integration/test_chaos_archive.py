"""Chaos: the archive store fails (disk full, read-only, S3 down) during a session.
Recognition goes on, the client gets a non-fatal ARCHIVE_FAILED, the recording is kept
on local disk and stored once the store works again; the session never freezes."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import soundfile
import trio

from gateway.client import stream_audio
from gateway.records import LocalStore, LocalWriter, StoredRecord
from stages.vad import VadModel
from tests import speech
from tests.contract import check_event
from tests.integration.test_gateway import start_gateway
from tests.standin import StandInEngine, start_asr

pytestmark = pytest.mark.timeout(60)

GOFORWARD = speech.goforward()
SILENCE = np.zeros(16000, dtype=np.int16)


class FlakyStore(LocalStore):
    """A local store that fails like a full disk once ``fail_after_bytes`` are written
    (or at once), until ``heal()``."""

    def __init__(self, root: Path, fail_after_bytes: int) -> None:
        super().__init__(root)
        self.budget = fail_after_bytes
        self.broken = True
        self.refused = 0

    def heal(self) -> None:
        self.broken = False

    def _enospc(self) -> OSError:
        self.refused += 1
        return OSError(errno.ENOSPC, "No space left on device (test)")

    async def open(self, flow_id: str, tenant: str = "") -> LocalWriter:
        if self.broken and self.budget <= 0:
            raise self._enospc()
        writer = await super().open(flow_id, tenant)
        store = self

        class Flaky(LocalWriter):
            async def write(self, data: bytes) -> None:
                if store.broken:
                    if len(data) > store.budget:
                        raise store._enospc()
                    store.budget -= len(data)
                await super().write(data)

            async def commit(self) -> StoredRecord:
                if store.broken:
                    raise store._enospc()
                return await super().commit()

        flaky = Flaky.__new__(Flaky)
        flaky.__dict__.update(writer.__dict__)
        return flaky


def _envelope(x: np.ndarray) -> np.ndarray:
    """RMS per 100 ms."""
    return np.sqrt(np.mean(x.astype(np.float64).reshape(-1, 1600) ** 2, axis=1))


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


@pytest.mark.parametrize("fail_after_bytes", [0, 6000])
async def test_store_failure_keeps_recognition_and_the_recording(
        nursery: trio.Nursery, vad_model: VadModel, tmp_path: Path,
        fail_after_bytes: int) -> None:
    _, port, _ = await start_asr(nursery, StandInEngine())
    store = FlakyStore(tmp_path / "records", fail_after_bytes)
    gw = await start_gateway(nursery, vad_model, tmp_path, f"http://127.0.0.1:{port}",
                             store=store, archive_retry_interval_s=0.2,
                             # 90 s in 20 ms frames at once: not paced, this is no rate test
                             max_messages_per_s=100000)
    # 90 s: past the ~82 s at which a stuck archive queue used to freeze the session.
    audio = np.concatenate([SILENCE, GOFORWARD, np.zeros(16000 * 80, np.int16), GOFORWARD,
                            SILENCE]).astype(np.int16)
    with trio.fail_after(45):
        r = await stream_audio(gw.ws_url, audio, realtime=False,
                               start={"flowId": f"flaky{fail_after_bytes}"})
    for e in r.events:
        check_event(e)
    errors = r.of("error")
    assert errors and {e["code"] for e in errors} == {"ARCHIVE_FAILED"}
    assert not any(e["fatal"] for e in errors)
    assert "kept on the gateway" in errors[0]["message"]
    assert [f["utterance"] for f in r.of("asr_final")] == [0, 1]  # recognition went on
    assert r.of("end")[0]["reason"] == "flush"
    assert not r.of("record_url")  # not stored yet: no URL that would 404
    assert r.of("metrics")[0]["audio_ms"] == len(audio) // 16
    target = tmp_path / "records" / f"flaky{fail_after_bytes}.ogg"
    assert not target.exists() and store.refused >= 1
    kept = tmp_path / "fallback" / f"flaky{fail_after_bytes}.ogg"
    assert kept.exists()
    store.heal()  # the disk has room again: the retrier stores it
    with trio.fail_after(10):
        while not target.exists():
            await trio.sleep(0.05)
    assert not kept.exists()
    data, sr = soundfile.read(target, dtype="int16")
    assert sr == 16000 and abs(len(data) - len(audio)) <= 320
    # The bytes the store took before it failed were carried over, not lost: the
    # decoded audio is the sent audio (Opus: compare the speech's energy envelope).
    n = min(len(data), len(audio)) // 1600 * 1600
    assert np.corrcoef(_envelope(data[:n]), _envelope(audio[:n]))[0, 1] > 0.95
    gw.shutdown.set()
