"""DenoiseStage: aligned output, frames preserved across utterances, noise reduced."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import native.rnnoise
from native import NativeClosedError, RNNoiseUnavailableError
from stages.denoise import DELAY_MS, DELAY_SAMPLES, HOLD_FRAMES, DenoiseStage
from stages.reframe import FRAME_SAMPLES, PcmFrame
from tests import speech

SR = 16000
Audio = npt.NDArray[np.int16]
GOFORWARD = "goforward"  # 3.4 s, one talker
SHORT_CLIP = "sense_and_sensibility_01_austen_64kb-0880"  # LibriVox, 3.0 s
LONG_CLIP = "sense_and_sensibility_01_austen_64kb-0870"  # LibriVox, 7.1 s


def clip(name: str) -> Audio:
    if name == GOFORWARD:
        return speech.goforward()
    return next(a for n, a, _ in speech.librivox() if n == name)


def frames_of(x: Audio, start: int) -> list[PcmFrame]:
    """*x* cut into whole 20 ms frames (the remainder dropped), the first at *start*."""
    n = len(x) // FRAME_SAMPLES
    return [
        PcmFrame(start + i * FRAME_SAMPLES, x[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES].copy())
        for i in range(n)
    ]


def run(stage: DenoiseStage, frames: list[PcmFrame]) -> list[PcmFrame]:
    """One utterance through *stage*: feed every frame, then flush."""
    out: list[PcmFrame] = []
    for f in frames:
        out += stage.feed(f)
    return out + stage.flush()


def denoise(x: Audio) -> Audio:
    """*x* (whole frames used) through a fresh stage as one utterance, joined."""
    with DenoiseStage() as stage:
        out = run(stage, frames_of(x, 0))
    return np.concatenate([f.samples for f in out])


def noisy(clean: Audio, snr_db: float, colour: str, seed: int) -> Audio:
    """*clean* plus white or pink Gaussian noise at *snr_db* (over the whole clip)."""
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
    return np.clip(clean + noise, -32768, 32767).astype(np.int16)


def lag_of(ref: Audio, sig: Audio, max_lag: int) -> int:
    """The d in [-max_lag, max_lag] maximising sum(sig[n] * ref[n - d])."""
    a, b = ref.astype(np.float64), sig.astype(np.float64)
    n = min(len(a), len(b))

    def corr(d: int) -> float:
        return float(np.dot(b[max(d, 0) : n + min(d, 0)], a[max(-d, 0) : n - max(d, 0)]))

    return max(range(-max_lag, max_lag + 1), key=corr)


def seg_snr(clean: Audio, out: Audio, active: npt.NDArray[np.bool_]) -> float:
    """Mean per-frame SNR of *out* against *clean* (dB, each clipped to [-10, 35])
    over the *active* frames."""
    n = len(active) * FRAME_SAMPLES
    c = clean[:n].astype(np.float64).reshape(-1, FRAME_SAMPLES)
    e = out[:n].astype(np.float64).reshape(-1, FRAME_SAMPLES) - c
    snr = 10 * np.log10(np.sum(c**2, axis=1) / np.maximum(np.sum(e**2, axis=1), 1e-9))
    return float(np.mean(np.clip(snr, -10, 35)[active]))


def frame_levels(x: Audio) -> npt.NDArray[np.float64]:
    """RMS of each whole frame of *x*."""
    n = len(x) // FRAME_SAMPLES * FRAME_SAMPLES
    rms: npt.NDArray[np.float64] = np.sqrt(
        np.mean(x[:n].astype(np.float64).reshape(-1, FRAME_SAMPLES) ** 2, axis=1)
    )
    return rms


# -- alignment --------------------------------------------------------------------------


def test_constants() -> None:
    assert DELAY_SAMPLES == 360 and DELAY_MS == 22.5 and HOLD_FRAMES == 2
    with DenoiseStage() as stage:
        assert stage.delay_ms == 22.5 and stage.statistics().delay_ms == 22.5


@pytest.mark.parametrize("name", [GOFORWARD, SHORT_CLIP])
def test_output_is_aligned_with_input(name: str) -> None:
    x = clip(name)
    n = len(x) // FRAME_SAMPLES * FRAME_SAMPLES
    out = denoise(x)
    assert len(out) == n
    assert lag_of(x[:n], out, 400) == 0
    # Clean speech passes nearly unchanged, in place.
    assert np.corrcoef(x[:n].astype(np.float64), out.astype(np.float64))[0, 1] > 0.9


# -- frames in, frames out ----------------------------------------------------------------


def test_two_utterances_with_a_gap_keep_count_and_starts() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(80 * FRAME_SAMPLES) * 1000).astype(np.int16)
    first = frames_of(x[: 50 * FRAME_SAMPLES], 6400)
    second = frames_of(x[50 * FRAME_SAMPLES :], 40000)  # the gate skipped the silence
    with DenoiseStage() as stage:
        got = [len(stage.feed(f)) for f in first]
        # Held back HOLD_FRAMES frames, then one out per frame in.
        assert got == [0] * HOLD_FRAMES + [1] * (len(first) - HOLD_FRAMES)
        assert stage.statistics().held_frames == HOLD_FRAMES
        tail = stage.flush()
        assert len(tail) == HOLD_FRAMES
        assert stage.flush() == []
        out2 = run(stage, second)
        assert [f.start for f in out2] == [f.start for f in second]
        assert all(f.samples.dtype == np.int16 and len(f.samples) == FRAME_SAMPLES for f in out2)
        s = stage.statistics()
    assert (s.frames_in, s.frames_out, s.held_frames, s.utterances) == (80, 80, 0, 2)
    assert s.frames_processed == 80 + 2 * HOLD_FRAMES


def test_one_frame_utterance() -> None:
    with DenoiseStage() as stage:
        assert stage.feed(PcmFrame(960, np.full(FRAME_SAMPLES, 100, np.int16))) == []
        (only,) = stage.flush()
    assert only.start == 960 and len(only.samples) == FRAME_SAMPLES


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 20_000),  # samples skipped before the utterance
            # per frame, frames skipped before it (a hole in the utterance), mostly none
            st.lists(st.sampled_from([0, 0, 0, 0, 0, 1, 7]), max_size=12),
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 2**31),
)
def test_frame_starts_survive_any_split(
    utterances: list[tuple[int, list[int]]], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    pos = 0
    with DenoiseStage() as stage:
        for gap, skips in utterances:
            pos += gap
            frames = []
            for skip in skips:
                pos += skip * FRAME_SAMPLES
                x = (rng.standard_normal(FRAME_SAMPLES) * 3000).astype(np.int16)
                frames.append(PcmFrame(pos, x))
                pos += FRAME_SAMPLES
            out = run(stage, frames)
            assert [f.start for f in out] == [f.start for f in frames]
        total = sum(len(skips) for _, skips in utterances)
        s = stage.statistics()
        assert s.frames_in == s.frames_out == total and s.held_frames == 0


def test_no_audio_leaks_into_the_next_utterance() -> None:
    # The first utterance stops on its loudest frame (a max_length cut mid-word), so
    # the native delay line is full of speech when the next one starts. Without the
    # flush and the dropped delay, the next first frame peaks above 1000.
    x = speech.goforward()
    loudest = int(np.argmax(frame_levels(x)))
    with DenoiseStage() as stage:
        first = run(stage, frames_of(x[: (loudest + 1) * FRAME_SAMPLES], 0))
        assert np.abs(first[-1].samples).max() > 5000
        out = run(stage, frames_of(np.zeros(10 * FRAME_SAMPLES, np.int16), 100_000))
    assert max(int(np.abs(f.samples).max()) for f in out) <= 2


def test_state_is_kept_across_utterances() -> None:
    x = noisy(speech.goforward(), 5, "white", seed=4)
    with DenoiseStage() as fresh:
        once = run(fresh, frames_of(x, 0))
    with DenoiseStage() as stage:
        run(stage, frames_of(x, 0))
        again = run(stage, frames_of(x, 200_000))
    # Same audio, same start of its utterance; only RNNoise's state differs.
    assert any(not np.array_equal(a.samples, b.samples) for a, b in zip(once, again, strict=True))


# -- noise reduction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "colour"),
    list(itertools.product([GOFORWARD, LONG_CLIP], ["white", "pink"])),
)
def test_noise_is_reduced_at_5_db(name: str, colour: str) -> None:
    clean = clip(name)
    x = noisy(clean, 5, colour, seed=11)
    out = denoise(x)
    level = frame_levels(clean)
    # No-speech frames (the quietest 30% of the clean recording): whatever comes out
    # is residual noise. Aligned output, so the frames compare one to one.
    quiet = level < np.percentile(level, 30)
    before, after = frame_levels(x)[quiet], frame_levels(out)[quiet]
    assert 20 * np.log10(np.sqrt(np.mean(before**2) / np.mean(after**2))) > 10
    # Where the talker speaks, the error against the clean speech (residual noise plus
    # speech distortion) shrinks too: segmental SNR rises.
    active = level > np.percentile(level, 30)
    gain = seg_snr(clean, out, active) - seg_snr(clean, x, active)
    assert gain > 2.0


# -- lifecycle and errors -------------------------------------------------------------------


def test_close_twice_is_safe_and_use_after_close_raises() -> None:
    stage = DenoiseStage()
    stage.feed(PcmFrame(0, np.zeros(FRAME_SAMPLES, np.int16)))
    stage.close()
    stage.close()
    assert stage.closed
    assert stage.flush() == []  # the held frame went with close()
    with pytest.raises(NativeClosedError):
        stage.feed(PcmFrame(0, np.zeros(FRAME_SAMPLES, np.int16)))


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        (np.zeros(319, np.int16), "320 int16 samples"),
        (np.zeros(320, np.float32), "float32"),
        (np.zeros((2, 160), np.int16), "shape"),
    ],
)
def test_bad_frames_are_refused_and_state_kept(samples: Audio, match: str) -> None:
    with DenoiseStage() as stage:
        stage.feed(PcmFrame(0, np.zeros(FRAME_SAMPLES, np.int16)))
        with pytest.raises(ValueError, match=match):
            stage.feed(PcmFrame(320, samples))
        stage.feed(PcmFrame(320, np.zeros(FRAME_SAMPLES, np.int16)))
        assert [f.start for f in stage.flush()] == [0, 320]


def test_non_contiguous_frames_work() -> None:
    x = np.zeros(2 * FRAME_SAMPLES, np.int16)[::2]
    with DenoiseStage() as stage:
        stage.feed(PcmFrame(0, x))
        assert len(stage.flush()) == 1


@pytest.mark.parametrize("start", [2240, 0, 330])  # a hole, an overlap, off the grid
def test_a_frame_out_of_place_starts_a_new_run(start: int) -> None:
    x = noisy(speech.goforward(), 5, "pink", seed=5)
    before = frames_of(x[: 2 * FRAME_SAMPLES], 0)
    after = frames_of(x[10 * FRAME_SAMPLES : 13 * FRAME_SAMPLES], start)
    with DenoiseStage() as stage:
        out = [f for frame in before for f in stage.feed(frame)]
        assert out == []
        out += stage.feed(after[0])
        # The held frames came out at the hole, as at an utterance's end.
        assert [f.start for f in out] == [0, 320]
        out += run(stage, after[1:])
        assert stage.statistics().discontinuities == 1
    assert [f.start for f in out] == [f.start for f in before + after]
    with DenoiseStage() as ref:
        expected = run(ref, before)
    for got, want in zip(out, expected, strict=False):
        np.testing.assert_array_equal(got.samples, want.samples)


def test_counters_use_the_injected_clocks() -> None:
    wall = itertools.count(0.0, 0.002)  # each read 2 ms after the previous one
    cpu = itertools.count(0.0, 0.0005)
    with DenoiseStage(clock=lambda: next(wall), cpu_clock=lambda: next(cpu)) as stage:
        run(stage, frames_of(np.zeros(10 * FRAME_SAMPLES, np.int16), 0))
        s = stage.statistics()
    calls = 10 + HOLD_FRAMES
    assert s.frames_processed == calls
    # Each clock is read once before and once after each native call.
    assert s.wall_s == pytest.approx(calls * 0.002)
    assert s.cpu_s == pytest.approx(calls * 0.0005)
    assert s.last_frame_ms == pytest.approx(2.0)
    # 12 calls of 0.5 ms CPU for 0.2 s of audio taken in.
    assert s.cpu_ms_per_audio_s == pytest.approx(calls * 0.5 / 0.2)


def test_unavailable_rnnoise_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise RNNoiseUnavailableError("no librnnoise here")

    monkeypatch.setattr(native.rnnoise, "_library", missing)
    with pytest.raises(RNNoiseUnavailableError, match="no librnnoise"):
        DenoiseStage()

