"""native._rnnoise: loading without pyrnnoise's Python side, noise reduction on real speech,
delay, VAD, and errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from native import Denoiser, NativeClosedError, Resampler, RNNoiseUnavailableError, _rnnoise
from tests import speech

SR = 16000
FRAME = 320


def noisy(
    clean: np.ndarray, snr_db: float, colour: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """*clean* plus white or pink Gaussian noise at *snr_db*; returns (noisy int16, noise)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(len(clean))
    if colour == "pink":
        spec = np.fft.rfft(noise)
        f = np.fft.rfftfreq(len(noise))
        spec[1:] /= np.sqrt(f[1:])
        spec[0] = 0
        noise = np.fft.irfft(spec, len(noise))
    p_speech = np.mean(clean.astype(np.float64) ** 2)
    noise *= np.sqrt(p_speech / np.mean(noise**2) / 10 ** (snr_db / 10))
    return np.clip(clean + noise, -32768, 32767).astype(np.int16), noise


def best_lag(ref: np.ndarray, sig: np.ndarray, max_lag: int) -> int:
    """The d that maximises the correlation of sig[n] with ref[n - d] (via FFT)."""
    n = min(len(ref), len(sig))
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spec = np.fft.rfft(sig[:n].astype(np.float64), size) * np.conj(
        np.fft.rfft(ref[:n].astype(np.float64), size)
    )
    return int(np.argmax(np.fft.irfft(spec, size)[: max_lag + 1]))


def denoise_16k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with Denoiser() as d:
        results = [d.process_16k(f) for f in x[: len(x) // FRAME * FRAME].reshape(-1, FRAME)]
    return np.concatenate([r[0] for r in results]), np.array([r[1] for r in results])


# -- loading ----------------------------------------------------------------------------


def test_library_is_found_without_importing_pyrnnoise() -> None:
    Denoiser().close()
    assert _rnnoise.locate_library().name.startswith(("librnnoise", "rnnoise"))
    assert "pyrnnoise" not in sys.modules
    assert _rnnoise.lib.rnnoise_get_frame_size() == 480


def test_missing_package_says_how_to_install() -> None:
    with pytest.raises(RNNoiseUnavailableError, match=r"pip install --no-deps pyrnnoise==0\.4\.5"):
        _rnnoise.locate_library("voxgate_no_such_package")


def test_package_without_the_library_is_reported() -> None:
    # `tests` is a real package that ships no librnnoise.
    with pytest.raises(ImportError, match="not found"):
        _rnnoise.locate_library("tests")


def test_unloadable_library_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "librnnoise.so"
    fake.write_bytes(b"not an ELF file")
    with pytest.raises(RNNoiseUnavailableError, match="cannot load"):
        _rnnoise.load(fake)


# -- noise reduction --------------------------------------------------------------------


@pytest.mark.parametrize(("colour", "min_quiet_db"), [("white", 12), ("pink", 20)])
def test_noise_power_drops_on_noisy_speech(colour: str, min_quiet_db: float) -> None:
    clean = speech.goforward()
    x, noise = noisy(clean, 5, colour, seed=7)
    out, vad = denoise_16k(x)
    delay = Denoiser.delay_16k
    out = out[delay:].astype(np.float64)
    n = len(out) // FRAME * FRAME
    ref_frames = clean[:n].astype(np.float64).reshape(-1, FRAME)
    in_frames = x[:n].astype(np.float64).reshape(-1, FRAME)
    out_frames = out[:n].reshape(-1, FRAME)

    # Where the talker is quiet (the quietest 30% of frames of the clean
    # recording), whatever comes out is residual noise.
    level = np.sqrt(np.mean(ref_frames**2, axis=1))
    quiet = level < np.percentile(level, 30)
    before = np.mean(in_frames[quiet] ** 2)
    after = np.mean(out_frames[quiet] ** 2)
    assert 10 * np.log10(before / after) > min_quiet_db

    # Over the whole clip, the error against the clean speech (residual noise plus
    # speech distortion) is still smaller than the noise that went in.
    err = np.mean((out[:n] - clean[:n]) ** 2)
    assert err < np.mean(noise[:n] ** 2)

    # RNNoise's VAD separates the talker from the noise.
    frame_vad = vad[delay // FRAME :][: len(quiet)]
    assert (
        frame_vad[~quiet[: len(frame_vad)]].mean() > frame_vad[quiet[: len(frame_vad)]].mean() + 0.3
    )


# -- delay -----------------------------------------------------------------------------------


def test_48k_delay_matches_cross_correlation() -> None:
    x = speech.goforward()[: 2 * SR].astype(np.float32)
    x48 = Resampler("up").process(x)
    with Denoiser() as d:
        out = np.concatenate([d.process(x48[i : i + 480])[0] for i in range(0, len(x48), 480)])
        assert best_lag(x48, out, 2000) == d.delay_48k == 960


def test_16k_delay_matches_cross_correlation_and_clean_speech_passes() -> None:
    x = speech.goforward()[: 2 * SR]
    out, _ = denoise_16k(x)
    d = Denoiser.delay_16k
    assert d == 360
    assert best_lag(x, out, 1000) == d
    a, b = x[: len(out) - d].astype(np.float64), out[d:].astype(np.float64)
    assert np.corrcoef(a, b)[0, 1] > 0.9


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "bad", "match"),
    [
        ("process", np.zeros(479, np.float32), "480 samples"),
        ("process", np.zeros(480, np.float64), "float32"),
        ("process", np.zeros(960, np.float32)[::2], "contiguous"),
        ("process", np.zeros((2, 240), np.float32), "480 samples"),
        ("process_16k", np.zeros(160, np.int16), "320 samples"),
        ("process_16k", np.zeros(320, np.float32), "int16"),
        ("process_16k", b"\0" * 640, "numpy"),
    ],
)
def test_bad_frames_are_rejected(method: str, bad: object, match: str) -> None:
    with Denoiser() as d, pytest.raises(ValueError, match=match):
        getattr(d, method)(bad)


def test_use_after_close_raises_and_close_is_idempotent() -> None:
    d = Denoiser()
    d.process_16k(np.zeros(FRAME, np.int16))
    d.close()
    d.close()
    assert d.closed
    with pytest.raises(NativeClosedError, match="Denoiser is closed"):
        d.process(np.zeros(480, np.float32))
    with pytest.raises(NativeClosedError):
        d.process_16k(np.zeros(FRAME, np.int16))
