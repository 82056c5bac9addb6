"""native._dsp: conversion and level edge cases, resampler accuracy, chunking, batch, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native import (
    NativeClosedError,
    Resampler,
    ResamplerBank,
    f32_to_s16,
    levels,
    peak,
    rms,
    s16_to_f32,
)
from tests import speech


def sine(freq_hz: float, rate: int, n: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq_hz * np.arange(n) / rate)).astype(np.float32)


def residual_db(y: np.ndarray, freq_hz: float, rate: int) -> float:
    """Power of everything but the *freq_hz* sinusoid (harmonics + noise + images), in dB
    relative to that sinusoid: the THD+N of *y*."""
    t = np.arange(len(y)) / rate
    basis = np.stack([np.sin(2 * np.pi * freq_hz * t), np.cos(2 * np.pi * freq_hz * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, y.astype(np.float64), rcond=None)
    fit = basis @ coef
    return float(10 * np.log10(np.mean((y - fit) ** 2) / np.mean(fit**2)))


def best_lag(ref: np.ndarray, sig: np.ndarray, max_lag: int) -> int:
    """The d that maximises the correlation of sig[n] with ref[n - d]."""
    n = min(len(ref), len(sig))
    size = 1 << int(np.ceil(np.log2(2 * n)))
    # By FFT: BLAS dot products thrash when other processes share the cores.
    spec = np.fft.rfft(sig[:n].astype(np.float64), size) * np.conj(
        np.fft.rfft(ref[:n].astype(np.float64), size)
    )
    return int(np.argmax(np.fft.irfft(spec, size)[: max_lag + 1]))


# -- conversion and levels ------------------------------------------------------


def test_s16_to_f32_literals() -> None:
    x = np.array([-32768, -1, 0, 1, 16384, 32767], dtype=np.int16)
    np.testing.assert_array_equal(
        s16_to_f32(x), np.array([-1.0, -1 / 32768, 0.0, 1 / 32768, 0.5, 32767 / 32768], np.float32)
    )


def test_f32_to_s16_rounds_and_clips() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0, 0.4 / 32768, 0.6 / 32768], np.float32)
    np.testing.assert_array_equal(
        f32_to_s16(x), np.array([0, 16384, -16384, 32767, -32768, 32767, -32768, 0, 1], np.int16)
    )


def test_every_int16_survives_the_float_round_trip() -> None:
    x = np.arange(-32768, 32768, dtype=np.int16)
    np.testing.assert_array_equal(f32_to_s16(s16_to_f32(x)), x)


def test_conversion_keeps_shape() -> None:
    x = np.arange(12, dtype=np.int16).reshape(3, 4)
    assert s16_to_f32(x).shape == (3, 4)
    assert f32_to_s16(s16_to_f32(x)).shape == (3, 4)


def test_levels_literals() -> None:
    assert rms(np.array([], np.int16)) == 0.0
    assert peak(np.array([], np.float32)) == 0.0
    assert peak(np.array([3, -32768, 5], np.int16)) == 1.0
    assert rms(np.array([16384, -16384], np.int16)) == 0.5
    assert rms(np.array([0.6, -0.8], np.float32)) == pytest.approx(np.sqrt(0.5), rel=1e-6)
    assert peak(np.array([0.25, -0.75], np.float32)) == 0.75


def test_levels_match_numpy_on_speech_for_both_dtypes() -> None:
    x = speech.goforward()
    ref_rms = np.sqrt(np.mean((x / 32768.0) ** 2))
    assert rms(x) == pytest.approx(ref_rms, rel=1e-12)
    assert rms(s16_to_f32(x)) == pytest.approx(ref_rms, rel=1e-6)
    assert peak(x) == np.abs(x.astype(np.int32)).max() / 32768
    assert peak(s16_to_f32(x)) == pytest.approx(peak(x), rel=1e-7)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_batch_levels_equal_per_frame_levels(dtype: type) -> None:
    x = speech.goforward()
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    if dtype is np.float32:
        frames = s16_to_f32(frames)
    r, p = levels(frames)
    assert r.shape == p.shape == (frames.shape[0],)
    np.testing.assert_array_equal(r, [rms(f) for f in frames])
    np.testing.assert_array_equal(p, [peak(f) for f in frames])


# -- resampler accuracy -----------------------------------------------------------


def test_up_thd_plus_noise_on_1khz_sine() -> None:
    x = sine(1000, 16000, 16000)
    y = Resampler("up").process(x)
    assert residual_db(y[1000:-1000], 1000, 48000) < -80


def test_down_thd_plus_noise_on_1khz_sine() -> None:
    x = sine(1000, 48000, 48000)
    y = Resampler("down").process(x)
    assert residual_db(y[500:-500], 1000, 16000) < -80


def test_int16_path_thd_is_limited_by_quantisation() -> None:
    x = (sine(1000, 16000, 16000) * 32767).round().astype(np.int16)
    y = Resampler("up").process(x)
    assert y.dtype == np.int16
    assert residual_db(y[1000:-1000].astype(np.float64), 1000, 48000) < -80


@pytest.mark.parametrize("freq_hz", [100, 1000, 3000, 6000, 7000])
def test_passband_gain_is_flat(freq_hz: int) -> None:
    up = Resampler("up").process(sine(freq_hz, 16000, 8000))
    down = Resampler("down").process(sine(freq_hz, 48000, 24000))
    for y in (up[2000:-2000], down[1000:-1000]):
        gain_db = 20 * np.log10(np.sqrt(2) * np.std(y) / 0.5)
        assert abs(gain_db) < 0.02


@pytest.mark.parametrize("freq_hz", [9500, 12000, 20000])
def test_down_rejects_what_would_alias(freq_hz: int) -> None:
    y = Resampler("down").process(sine(freq_hz, 48000, 24000))
    assert 20 * np.log10(np.std(y[1000:-1000]) * np.sqrt(2) / 0.5) < -70


def test_reported_delay_matches_cross_correlation() -> None:
    x = speech.goforward()[8000:24000].astype(np.float32)
    up = Resampler("up")
    y = up.process(x)
    assert up.delay == 60
    stuffed = np.zeros(3 * len(x), np.float32)
    stuffed[::3] = x  # the 16 kHz input placed at its 48 kHz instants
    assert best_lag(stuffed, y, 200) == up.delay
    down = Resampler("down")
    z = down.process(y)
    assert down.delay == 20
    assert best_lag(x, z, 100) == up.delay // 3 + down.delay


def test_round_trip_up_down_reproduces_speech() -> None:
    x = speech.goforward().astype(np.float32)
    y = Resampler("down").process(Resampler("up").process(x))
    d = 40  # 60 / 3 up + 20 down
    err = y[d:] - x[: len(y) - d]
    snr_db = 10 * np.log10(np.mean(x**2) / np.mean(err**2))
    # Only the 7-8 kHz transition band is lost; speech keeps little there.
    assert snr_db > 40


def test_output_lengths() -> None:
    up, down = Resampler("up"), Resampler("down")
    assert len(up.process(np.zeros(7, np.float32))) == 21
    lengths = [len(down.process(np.zeros(n, np.int16))) for n in (1, 1, 1, 2, 5, 0)]
    assert lengths == [1, 0, 0, 1, 2, 0]
    assert down.output_len(960) == 320


# -- chunking invariance ------------------------------------------------------------

_CHUNK_SOURCE = speech.goforward()[8000:9600]


@settings(max_examples=60, deadline=None)
@given(
    direction=st.sampled_from(["up", "down"]),
    dtype=st.sampled_from([np.int16, np.float32]),
    cuts=st.lists(st.integers(0, len(_CHUNK_SOURCE)), max_size=12),
)
def test_output_is_identical_however_the_input_is_chunked(
    direction: str, dtype: type, cuts: list[int]
) -> None:
    x = _CHUNK_SOURCE.astype(dtype)
    whole = Resampler(direction).process(x)  # type: ignore[arg-type]
    r = Resampler(direction)  # type: ignore[arg-type]
    pieces = [r.process(np.ascontiguousarray(c)) for c in np.split(x, sorted(cuts))]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


# -- batch ------------------------------------------------------------------------------


@pytest.mark.parametrize(("direction", "n_in"), [("up", 320), ("down", 960)])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_bank_equals_one_resampler_per_session(direction: str, n_in: int, dtype: type) -> None:
    clips = [c[1] for c in speech.cards()[:5]]
    n_frames = min(len(c) for c in clips) // n_in
    bank = ResamplerBank(direction, len(clips))  # type: ignore[arg-type]
    singles = [Resampler(direction) for _ in clips]  # type: ignore[arg-type]
    for k in range(n_frames):
        rows = np.stack([c[k * n_in : (k + 1) * n_in] for c in clips]).astype(dtype)
        got = bank.process(rows)
        want = np.stack(
            [r.process(np.ascontiguousarray(row)) for r, row in zip(singles, rows, strict=True)]
        )
        np.testing.assert_array_equal(got, want)


def test_bank_reset_gives_a_slot_a_fresh_history() -> None:
    x = speech.goforward()[:3200].reshape(10, 320)
    bank = ResamplerBank("up", 2)
    bank.process(np.stack([x[0], x[1]]))
    bank.reset(1)
    out = bank.process(np.stack([x[2], x[3]]))
    np.testing.assert_array_equal(out[1], Resampler("up").process(x[3]))
    assert not np.array_equal(out[0], Resampler("up").process(x[2]))


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(8, np.float64),
        np.zeros(8, np.int32),
        np.zeros(16, np.int16)[::2],
        np.zeros((2, 4), np.int16),
        [0, 1, 2],
    ],
)
def test_resampler_rejects_bad_input(bad: object) -> None:
    with pytest.raises(ValueError, match=r"Resampler\.process"):
        Resampler("up").process(bad)  # type: ignore[arg-type]


def test_conversion_and_levels_reject_bad_dtype() -> None:
    with pytest.raises(ValueError, match="int16"):
        s16_to_f32(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="float32"):
        f32_to_s16(np.zeros(4, np.int16))
    with pytest.raises(ValueError, match="float64"):
        rms(np.zeros(4))
    with pytest.raises(ValueError, match="2-D"):
        levels(np.zeros(4, np.int16))


def test_bad_direction_and_bank_arguments() -> None:
    with pytest.raises(ValueError, match="direction"):
        Resampler("sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_slots"):
        ResamplerBank("up", 0)
    bank = ResamplerBank("down", 2)
    with pytest.raises(ValueError, match="n % 3 == 0"):
        bank.process(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="shape"):
        bank.process(np.zeros((3, 99), np.float32))
    with pytest.raises(ValueError, match="slot"):
        bank.reset(2)


def test_use_after_close_raises_and_close_is_idempotent() -> None:
    r = Resampler("up")
    r.close()
    r.close()
    assert r.closed
    with pytest.raises(NativeClosedError):
        r.process(np.zeros(4, np.float32))
    with pytest.raises(NativeClosedError):
        r.reset()
    with ResamplerBank("up", 2) as bank:
        bank.process(np.zeros((2, 3), np.int16))
    with pytest.raises(NativeClosedError):
        bank.process(np.zeros((2, 3), np.int16))
