"""native._opus on real speech: round trip, bitrate, loss concealment and FEC, settings, errors."""

from __future__ import annotations

import numpy as np
import pytest

from native import OPUS_AUTO, NativeClosedError, OpusDecoder, OpusEncoder, OpusError, opus_version
from native.opus import OpusApplication
from tests import speech

FRAME = 320  # 20 ms at 16 kHz


def frames_of(x: np.ndarray, n: int = FRAME) -> np.ndarray:
    return x[: len(x) // n * n].reshape(-1, n)


def highpass(x: np.ndarray, cutoff_hz: float, rate: int = 16000) -> np.ndarray:
    spec = np.fft.rfft(x.astype(np.float64))
    spec[np.fft.rfftfreq(len(x), 1 / rate) < cutoff_hz] = 0
    return np.fft.irfft(spec, len(x))


def best_lag(ref: np.ndarray, sig: np.ndarray, max_lag: int) -> int:
    """The d that maximises the correlation of sig[n] with ref[n - d] (via FFT)."""
    n = min(len(ref), len(sig))
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spec = np.fft.rfft(sig[:n].astype(np.float64), size) * np.conj(
        np.fft.rfft(ref[:n].astype(np.float64), size)
    )
    return int(np.argmax(np.fft.irfft(spec, size)[: max_lag + 1]))


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def ten_seconds_of_speech() -> np.ndarray:
    """Whole LibriVox clips, concatenated until they last at least 10 s."""
    clips: list[np.ndarray] = []
    for _, audio, _ in speech.librivox():
        clips.append(audio)
        if sum(map(len, clips)) >= 10 * 16000:
            return np.concatenate(clips)
    raise AssertionError("the LibriVox clips should give at least 10 s")


def test_version_is_libopus() -> None:
    assert opus_version().startswith("libopus 1.")


# -- round trip -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("application", "min_corr"),
    [("voip", 0.9), ("audio", 0.95), ("restricted_lowdelay", 0.95)],
)
def test_round_trip_correlates_after_delay_alignment(
    application: OpusApplication, min_corr: float
) -> None:
    x = speech.goforward()
    enc = OpusEncoder(16000, 1, application, bitrate=24000)
    dec = OpusDecoder(16000)
    y = np.concatenate([dec.decode(enc.encode(f)) for f in frames_of(x)])
    assert len(y) == len(frames_of(x).ravel())
    # The encoder's lookahead is the whole codec delay, and cross-correlation agrees.
    lag = enc.lookahead
    assert best_lag(x, y, 400) == lag
    ref, out = x[: len(y) - lag], y[lag:]
    if application == "voip":
        # VOIP mode high-passes the input on purpose (pitch-adaptive, up to ~100 Hz);
        # compare what it is meant to keep.
        ref, out = highpass(ref, 150), highpass(out, 150)
    assert corr(ref, out) > min_corr


def test_stereo_round_trip_keeps_interleaving() -> None:
    x = speech.goforward()[:16000]
    st = np.stack([x, (x // 2).astype(np.int16)], axis=1)  # (n, 2): right is half the left
    enc = OpusEncoder(16000, 2, "audio", bitrate=64000)
    dec = OpusDecoder(16000, 2)
    y = np.concatenate(
        [dec.decode(enc.encode(np.ascontiguousarray(f))) for f in st.reshape(-1, FRAME, 2)]
    )
    assert y.shape == (st.size,)
    left, right = y[0::2].astype(np.float64), y[1::2].astype(np.float64)
    assert 0.4 < np.std(right) / np.std(left) < 0.6


# -- bitrate ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [16000, 20000, 24000])
def test_vbr_average_bitrate_is_within_20_percent(target: int) -> None:
    x = ten_seconds_of_speech()
    enc = OpusEncoder(16000, 1, "voip", bitrate=target, vbr=True)
    assert enc.bitrate == target and enc.vbr
    packets = [enc.encode(f) for f in frames_of(x)]
    seconds = len(packets) * FRAME / 16000
    rate = 8 * sum(map(len, packets)) / seconds
    assert abs(rate - target) / target < 0.2
    # VBR really varies: packets are not all one size.
    assert len({len(p) for p in packets}) > 5


# -- loss ----------------------------------------------------------------------------------


def _loud_frames(x: np.ndarray, n: int) -> list[int]:
    """n frame indices, at least 10 apart, among the louder half of the speech."""
    energy = np.sqrt(np.mean(frames_of(x).astype(np.float64) ** 2, axis=1))
    loud = [int(i) for i in np.flatnonzero(energy > np.median(energy)) if i >= 5]
    chosen: list[int] = []
    for i in loud:
        if not chosen or i - chosen[-1] >= 10:
            chosen.append(i)
    assert len(chosen) >= n
    return chosen[:: len(chosen) // n][:n]


def _decode_with_losses(packets: list[bytes], lost: set[int], fec: bool) -> np.ndarray:
    """Decode a stream in which the packets in *lost* never arrived; a lost one is
    concealed (PLC) or, with *fec*, rebuilt from the next packet's redundancy."""
    dec = OpusDecoder(16000)
    out = []
    for i, p in enumerate(packets):
        if i in lost:
            if not fec or i + 1 >= len(packets):
                out.append(dec.decode(None))
            else:
                out.append(dec.decode(packets[i + 1], fec=True))
        else:
            out.append(dec.decode(p))
    return np.concatenate(out)


def test_lost_packets_are_concealed_and_fec_recovers_them() -> None:
    x = ten_seconds_of_speech()
    frames = frames_of(x)
    lost = set(_loud_frames(x, 12))
    enc = OpusEncoder(16000, 1, "voip", bitrate=24000, inband_fec=True, packet_loss_perc=20)
    packets = [enc.encode(f) for f in frames]
    la = enc.lookahead
    clean = _decode_with_losses(packets, set(), fec=False)
    plc = _decode_with_losses(packets, lost, fec=False)
    rec = _decode_with_losses(packets, lost, fec=True)
    assert len(clean) == len(plc) == len(rec) == frames.size
    # Compare the speech band: VOIP mode drops the rumble below ~100 Hz anyway.
    x_hp, clean_hp, plc_hp, rec_hp = (highpass(s, 150) for s in (frames.ravel(), clean, plc, rec))

    plc_corr, fec_corr, clean_corr = [], [], []
    for i in sorted(lost):
        ref = x_hp[i * FRAME : (i + 1) * FRAME]
        span = slice(i * FRAME + la, (i + 1) * FRAME + la)
        # Concealment is never silence and never a blast: a plausible level.
        level = np.std(plc_hp[span]) / np.std(ref)
        assert 0.05 < level < 2.0
        plc_corr.append(corr(plc_hp[span], ref))
        fec_corr.append(corr(rec_hp[span], ref))
        clean_corr.append(corr(clean_hp[span], ref))
        # The decoder converges back onto the loss-free output within a few frames.
        after = slice((i + 3) * FRAME + la, (i + 4) * FRAME + la)
        assert corr(plc[after], clean[after]) > 0.95

    # FEC rebuilds the lost frames almost as well as receiving them; PLC only guesses.
    assert np.mean(fec_corr) > 0.7
    assert np.mean(fec_corr) > np.mean(plc_corr) + 0.2
    assert np.mean(fec_corr) > np.mean(clean_corr) - 0.1


def test_fec_without_redundancy_falls_back_to_concealment() -> None:
    x = speech.goforward()
    enc = OpusEncoder(16000, bitrate=24000)  # no FEC
    packets = [enc.encode(f) for f in frames_of(x)[:20]]
    a, b = OpusDecoder(16000), OpusDecoder(16000)
    for p in packets[:10]:
        a.decode(p)
        b.decode(p)
    np.testing.assert_array_equal(a.decode(packets[11], fec=True), b.decode(None))


def test_concealment_length_follows_the_last_packet_or_the_caller() -> None:
    x = speech.goforward()[:1600]
    enc = OpusEncoder(16000)
    dec = OpusDecoder(16000)
    assert len(dec.decode(None)) == 320  # 20 ms before any packet
    dec.decode(enc.encode(x[:160]))  # a 10 ms packet
    assert len(dec.decode(None)) == 160
    assert len(dec.decode(None, frame_samples=400)) == 400


def test_dtx_sends_tiny_packets_for_silence() -> None:
    enc = OpusEncoder(16000, dtx=True, bitrate=20000)
    sizes = [len(enc.encode(np.zeros(FRAME, np.int16))) for _ in range(60)]
    # After 200 ms of silence: 1-byte packets, with a comfort-noise update every 400 ms.
    assert sum(n <= 2 for n in sizes[10:]) >= 45


# -- settings ----------------------------------------------------------------------------


def test_settings_read_back() -> None:
    enc = OpusEncoder(
        24000,
        1,
        "audio",
        bitrate=32000,
        vbr=False,
        vbr_constraint=False,
        complexity=3,
        packet_loss_perc=15,
        inband_fec=True,
        dtx=True,
    )
    assert (enc.bitrate, enc.vbr, enc.vbr_constraint, enc.complexity) == (32000, False, False, 3)
    assert (enc.packet_loss_perc, enc.inband_fec, enc.dtx) == (15, True, True)
    assert enc.application == "audio"
    assert enc.lookahead > 0
    enc.bitrate = OPUS_AUTO
    assert 500 <= enc.bitrate <= 512000
    assert OpusEncoder(16000, 1, "restricted_lowdelay").application == "restricted_lowdelay"


def test_reset_makes_the_encoder_deterministic_again() -> None:
    x = frames_of(speech.goforward())[:10]
    enc = OpusEncoder(16000, bitrate=20000)
    first = [enc.encode(f) for f in x]
    enc.reset()
    assert [enc.encode(f) for f in x] == first


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 100, 319, 321, 640 + 1, 2000, 3 * 1920])
def test_wrong_frame_size_is_rejected(n: int) -> None:
    with pytest.raises(ValueError, match="frame of"):
        OpusEncoder(16000).encode(np.zeros(n, np.int16))


@pytest.mark.parametrize("n", [40, 80, 160, 320, 640, 960, 1280, 1600, 1920])
def test_every_opus_frame_duration_is_accepted(n: int) -> None:
    assert len(OpusDecoder(16000).decode(OpusEncoder(16000).encode(np.zeros(n, np.int16)))) == n


@pytest.mark.parametrize(
    "bad",
    [np.zeros(320, np.float32), np.zeros(320, np.int32), np.zeros(640, np.int16)[::2], b"\0" * 640],
)
def test_wrong_pcm_type_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="pcm"):
        OpusEncoder(16000).encode(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bitrate", [0, 499, 512001, -5, True, 20000.0])
def test_invalid_bitrate_is_rejected(bitrate: object) -> None:
    with pytest.raises(ValueError, match="bitrate"):
        OpusEncoder(16000, bitrate=bitrate)  # type: ignore[arg-type]
    enc = OpusEncoder(16000, bitrate=20000)
    with pytest.raises(ValueError, match="bitrate"):
        enc.bitrate = bitrate  # type: ignore[assignment]
    assert enc.bitrate == 20000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sample_rate": 44100}, "sample_rate"),
        ({"channels": 3}, "channels"),
        ({"application": "music"}, "application"),
        ({"complexity": 11}, "complexity"),
        ({"packet_loss_perc": 101}, "packet_loss_perc"),
    ],
)
def test_invalid_encoder_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OpusEncoder(**kwargs)  # type: ignore[arg-type]


def test_decoder_argument_errors() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        OpusDecoder(22050)
    dec = OpusDecoder(16000)
    with pytest.raises(ValueError, match="empty packet"):
        dec.decode(b"")
    with pytest.raises(ValueError, match="fec=True"):
        dec.decode(None, fec=True)
    with pytest.raises(ValueError, match="frame_samples"):
        dec.decode(None, frame_samples=100)  # not a multiple of 2.5 ms
    with pytest.raises(ValueError, match="frame_samples"):
        dec.decode(None, frame_samples=1940)  # over 120 ms


def test_corrupt_packet_raises_opus_error_with_libopus_message() -> None:
    dec = OpusDecoder(16000)
    # TOC byte 0xFF: code 3 (arbitrary frame count) with a missing count byte.
    with pytest.raises(OpusError) as info:
        dec.decode(b"\xff")
    assert info.value.code == -4  # OPUS_INVALID_PACKET
    assert info.value.message == "corrupted stream"
    assert "opus_decode" in str(info.value)


def test_use_after_close_raises_and_close_is_idempotent() -> None:
    enc, dec = OpusEncoder(16000), OpusDecoder(16000)
    packet = enc.encode(np.zeros(FRAME, np.int16))
    enc.close()
    enc.close()
    dec.close()
    assert enc.closed and dec.closed
    with pytest.raises(NativeClosedError, match="OpusEncoder is closed"):
        enc.encode(np.zeros(FRAME, np.int16))
    with pytest.raises(NativeClosedError):
        _ = enc.bitrate
    with pytest.raises(NativeClosedError):
        enc.complexity = 5
    with pytest.raises(NativeClosedError, match="OpusDecoder is closed"):
        dec.decode(packet)
    with pytest.raises(NativeClosedError):
        dec.decode(None)


def test_context_manager_closes() -> None:
    with OpusEncoder(16000) as enc, OpusDecoder(16000) as dec:
        dec.decode(enc.encode(np.zeros(FRAME, np.int16)))
    assert enc.closed and dec.closed
