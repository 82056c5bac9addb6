"""ArchiveEncoder: streaming Ogg Opus that decodes back to the session's audio."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import soundfile

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
