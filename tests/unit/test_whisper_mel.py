"""Whisper log-mel front end.

``tests/data/whisper_mel_ref.npz`` was made once (faster-whisper is a bench-only peer and
is not needed here): 2.5 s (40000 samples) of the LibriVox clip
``sense_and_sensibility_01_austen_64kb-0880`` from ``pocketsphinx-testdata``, its
log-mel from ``faster_whisper.feature_extractor.FeatureExtractor()(audio / 32768,
padding=0)`` and that extractor's mel filters (its numpy port of librosa's Slaney
filters). The ``source`` entry in the file records the exact call and version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asr.whisper import mel

FIXTURE = Path(__file__).parent.parent / "data" / "whisper_mel_ref.npz"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def test_matches_reference_extractor(ref: dict[str, np.ndarray]) -> None:
    got = mel.log_mel_spectrogram(ref["audio"], pad_to_frames=None)
    assert got.dtype == np.float32
    assert got.shape == ref["mel"].shape == (80, 250)
    np.testing.assert_allclose(got, ref["mel"], atol=2e-5, rtol=0)


def test_int16_and_float_input_agree(ref: dict[str, np.ndarray]) -> None:
    audio = ref["audio"]
    a = mel.log_mel_spectrogram(audio, pad_to_frames=None)
    b = mel.log_mel_spectrogram(audio.astype(np.float32) / 32768.0, pad_to_frames=None)
    np.testing.assert_array_equal(a, b)


def test_filters_match_reference(ref: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(mel.mel_filters(80), ref["filters"], atol=1e-7, rtol=1e-6)


def test_filter_bank_properties() -> None:
    fb = mel.mel_filters(80).astype(np.float64)
    assert fb.shape == (80, 201)
    assert (fb >= 0).all()
    freqs = np.fft.rfftfreq(400, 1 / 16000)
    peaks = fb.argmax(axis=1)
    # Centres rise monotonically (the lowest bands are narrower than one FFT bin, so two
    # neighbours may peak on the same bin).
    assert (np.diff(peaks) >= 0).all()
    assert peaks[-1] > peaks[0]
    for row in fb:
        support = np.flatnonzero(row > 0)
        # Triangles: one contiguous run that rises then falls.
        assert support.size > 0
        assert (np.diff(support) == 1).all()
        top = int(row.argmax())
        assert (np.diff(row[support[0] : top + 1]) >= 0).all()
        assert (np.diff(row[top : support[-1] + 1]) <= 0).all()
    # Slaney normalisation gives each triangle unit area in Hz. The sampled sum is close
    # for every band and closer where a triangle spans enough bins.
    area = fb.sum(axis=1) * (freqs[1] - freqs[0])
    np.testing.assert_allclose(area, 1.0, rtol=0.1)
    wide = (fb > 0).sum(axis=1) >= 5
    assert wide.sum() > 25
    np.testing.assert_allclose(area[wide], 1.0, rtol=0.03)
    # The top band ends just below Nyquist.
    assert fb[:, -1].max() == 0.0
    assert freqs[np.flatnonzero(fb[-1])[-1]] > 7900


def test_slaney_scale_round_trip() -> None:
    hz = np.array([0.0, 100.0, 999.0, 1000.0, 1001.0, 4000.0, 8000.0])
    np.testing.assert_allclose(mel.mel_to_hz(mel.hz_to_mel(hz)), hz, rtol=1e-12, atol=1e-9)
    # Linear below 1 kHz (3 mels per 200 Hz), 15 mels at 1 kHz.
    np.testing.assert_allclose(mel.hz_to_mel(np.array([200.0, 1000.0])), [3.0, 15.0])


def test_padding_equals_padding_the_audio(ref: dict[str, np.ndarray]) -> None:
    audio = ref["audio"]
    padded = np.zeros(mel.N_SAMPLES, dtype=np.int16)
    padded[: audio.size] = audio
    full = mel.log_mel_spectrogram(padded, pad_to_frames=None)
    fast = mel.log_mel_spectrogram(audio)  # 30 s by default, skipping the silent frames
    assert fast.shape == (80, mel.N_FRAMES)
    np.testing.assert_allclose(fast, full, atol=1e-6, rtol=0)
    # The padding sits on the floor, 8 decades under the peak at most.
    assert fast[:, -1].max() == pytest.approx(fast.min())


@pytest.mark.parametrize("n", [201, 300, 320, 359, 360, 361, 961, 4000])
@pytest.mark.parametrize("extra_frames", [0, 1, 2, 3, 7])
def test_short_and_odd_lengths_equal_explicit_padding(n: int, extra_frames: int) -> None:
    rng = np.random.default_rng(n)
    audio = (rng.standard_normal(n) * 3000).astype(np.int16)
    frames = -(-n // mel.HOP_LENGTH) + extra_frames
    if frames * mel.HOP_LENGTH <= mel.N_FFT // 2:
        pytest.skip("too short to frame")
    padded = np.zeros(frames * mel.HOP_LENGTH, dtype=np.int16)
    padded[:n] = audio
    want = mel.log_mel_spectrogram(padded, pad_to_frames=None)
    got = mel.log_mel_spectrogram(audio, pad_to_frames=frames)
    assert got.shape == want.shape == (80, frames)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_batch_stacks_rows(ref: dict[str, np.ndarray]) -> None:
    a = ref["audio"]
    b = a[:12345]
    batch = mel.log_mel_batch([a, b])
    assert batch.shape == (2, 80, 3000)
    np.testing.assert_array_equal(batch[1], mel.log_mel_spectrogram(b))
    unpadded = mel.log_mel_batch([a, b], pad_to_frames=None)
    assert unpadded.shape == (2, 80, 250)  # even frame count for the encoder


@pytest.mark.parametrize(
    ("bad", "pad"),
    [
        (np.zeros((2, 100), np.float32), 3000),
        (np.zeros(100, np.int32), 3000),
        (np.zeros(100, np.float32), None),  # shorter than the STFT's reflect padding
        (np.zeros(mel.N_SAMPLES + 1, np.float32), 3000),  # longer than the window
        (np.zeros(100, np.float32), 0),
    ],
)
def test_rejects_bad_input(bad: np.ndarray, pad: int | None) -> None:
    with pytest.raises(ValueError):
        mel.log_mel_spectrogram(bad, pad_to_frames=pad)
