"""native._opusenc on real speech: Ogg Opus streams that decode back exactly, streaming,
bitrate, header and tags, lifecycle and errors."""

from __future__ import annotations

import gc
import io
import struct
from dataclasses import dataclass

import numpy as np
import pytest
import soundfile

from native import NativeClosedError, OggOpusError, OggOpusWriter, opusenc_version
from native._opusenc import lib
from native.opusenc import OpusSignal
from tests import speech

FRAME = 320  # 20 ms at 16 kHz
PRE_SKIP_48K = 312  # libopus' lookahead at 48 kHz (6.5 ms): libopusenc's pre-skip


# -- Ogg parsing (RFC 3533 pages, RFC 7845 headers) -------------------------------------


@dataclass
class Page:
    flags: int  # 1 continued, 2 first (BOS), 4 last (EOS)
    granule: int
    serial: int
    seq: int
    packets: list[bytes]


def pages(blob: bytes) -> list[Page]:
    """Every page of a single logical Ogg stream whose packets do not span pages."""
    out, i = [], 0
    while i < len(blob):
        assert blob[i : i + 4] == b"OggS" and blob[i + 4] == 0, f"no Ogg page at byte {i}"
        flags, granule, serial, seq = struct.unpack_from("<BqII", blob, i + 5)
        nseg = blob[i + 26]
        lacing = blob[i + 27 : i + 27 + nseg]
        pos = i + 27 + nseg
        packets, size = [], 0
        for lace in lacing:
            size += lace
            if lace < 255:
                packets.append(blob[pos : pos + size])
                pos += size
                size = 0
        assert size == 0, "a packet continues on the next page"
        out.append(Page(flags, granule, serial, seq, packets))
        i = pos
    return out


def opus_head(blob: bytes) -> tuple[int, int, int]:
    """(channels, pre-skip, input rate) from the OpusHead packet."""
    head = pages(blob)[0].packets[0]
    assert head[:8] == b"OpusHead" and head[8] == 1
    channels, pre_skip, rate = struct.unpack_from("<BHI", head, 9)
    return channels, pre_skip, rate


def opus_tags(blob: bytes) -> tuple[str, dict[str, str]]:
    """(vendor, comments) from the OpusTags packet."""
    tags = pages(blob)[1].packets[0]
    assert tags[:8] == b"OpusTags"
    (n,) = struct.unpack_from("<I", tags, 8)
    vendor = tags[12 : 12 + n].decode()
    pos = 12 + n
    (count,) = struct.unpack_from("<I", tags, pos)
    pos += 4
    comments = {}
    for _ in range(count):
        (n,) = struct.unpack_from("<I", tags, pos)
        key, _, value = tags[pos + 4 : pos + 4 + n].decode().partition("=")
        comments[key.upper()] = value
        pos += 4 + n
    return vendor, comments


# -- helpers -------------------------------------------------------------------------------


def encode(x: np.ndarray, chunk: int = FRAME, **kw: object) -> tuple[bytes, list[int]]:
    """The whole stream, and the size of what each write returned."""
    w = OggOpusWriter(**kw)  # type: ignore[arg-type]
    sizes, parts = [], []
    for i in range(0, len(x), chunk):
        out = w.write(x[i : i + chunk])
        sizes.append(len(out))
        parts.append(out)
    parts.append(w.finish())
    w.close()
    return b"".join(parts), sizes


def decode(blob: bytes) -> tuple[np.ndarray, int]:
    y, rate = soundfile.read(io.BytesIO(blob), dtype="int16")
    return y, rate


def best_lag(ref: np.ndarray, sig: np.ndarray, max_lag: int) -> int:
    """The d in -max_lag..max_lag that maximises the correlation of sig[n] with ref[n - d]."""
    n = min(len(ref), len(sig))
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spec = np.fft.rfft(sig[:n].astype(np.float64), size) * np.conj(
        np.fft.rfft(ref[:n].astype(np.float64), size)
    )
    xc = np.fft.irfft(spec, size)
    lags = np.r_[np.arange(0, max_lag + 1), np.arange(-max_lag, 0)]
    return int(lags[np.argmax(np.r_[xc[: max_lag + 1], xc[-max_lag:]])])


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def ten_seconds_of_speech() -> np.ndarray:
    clips: list[np.ndarray] = []
    for _, audio, _ in speech.librivox():
        clips.append(audio)
        if sum(map(len, clips)) >= 10 * 16000:
            return np.concatenate(clips)
    raise AssertionError("the LibriVox clips should give at least 10 s")


def test_version_is_libopusenc() -> None:
    assert opusenc_version().startswith("libopusenc ")


# -- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signal", "frame_ms", "chunk"),
    [("voice", 20, FRAME), ("voice", 60, FRAME), ("auto", 20, 1234), ("voice", 60, 7)],
)
def test_round_trip_is_exact_in_length_and_correlates(
    signal: OpusSignal, frame_ms: int, chunk: int
) -> None:
    gap = np.zeros(8000, dtype=np.int16)
    x = np.concatenate([gap, speech.librivox()[0][1], gap])  # speech and silence
    blob, _ = encode(x, chunk, signal=signal, frame_ms=frame_ms)
    y, rate = decode(blob)
    assert rate == 16000
    # The pre-skip and the end trim in the last granule position make it exact;
    # the archive's contract is only +-20 ms.
    assert len(y) == len(x)
    assert abs(len(y) - len(x)) <= 320
    # ... and the pre-skip is right: no delay left to align.
    lag = best_lag(x, y, 400)
    assert lag == 0
    assert corr(x, y) > 0.9


def test_header_pre_skip_and_end_granule() -> None:
    x = speech.goforward()
    blob, _ = encode(x)
    channels, pre_skip, rate = opus_head(blob)
    assert (channels, pre_skip, rate) == (1, PRE_SKIP_48K, 16000)
    ps = pages(blob)
    assert ps[0].flags == 2 and ps[0].granule == 0  # BOS: OpusHead alone
    assert ps[1].granule == 0 and ps[1].packets[0][:8] == b"OpusTags"
    assert [p.seq for p in ps] == list(range(len(ps)))
    assert len({p.serial for p in ps}) == 1
    # RFC 7845: the last page's granule position (48 kHz) ends the audio exactly.
    assert ps[-1].flags & 4 and not any(p.flags & 4 for p in ps[:-1])
    assert ps[-1].granule == pre_skip + len(x) * 3
    granules = [p.granule for p in ps[2:]]
    assert granules == sorted(granules)


def test_stereo_round_trip_keeps_interleaving() -> None:
    x = speech.goforward()[:16000]
    st = np.ascontiguousarray(np.stack([x, (x // 2).astype(np.int16)], axis=1))
    blob, _ = encode(st.ravel(), 2 * FRAME, channels=2, bitrate=64000, signal="auto")
    y, _ = decode(blob)
    assert y.shape == st.shape
    assert 0.4 < np.std(y[:, 1].astype(float)) / np.std(y[:, 0].astype(float)) < 0.6


def test_48k_input_round_trip() -> None:
    x = np.repeat(speech.goforward()[:16000], 3)  # crude 48 kHz: the rate path, not quality
    blob, _ = encode(x, 960, sample_rate=48000)
    y, rate = decode(blob)
    assert rate == 48000 and len(y) == len(x)
    assert opus_head(blob)[2] == 48000


# -- streaming -----------------------------------------------------------------------------


def test_bytes_leave_while_audio_arrives() -> None:
    x = ten_seconds_of_speech()
    w = OggOpusWriter(max_page_ms=200)
    first = w.write(x[:FRAME])
    # The header pages come with the first write.
    assert first[:4] == b"OggS" and b"OpusHead" in first and b"OpusTags" in first
    sizes = [len(w.write(x[i : i + FRAME])) for i in range(FRAME, len(x), FRAME)]
    tail = w.finish()
    # A page at least every 200 ms of audio (plus a frame): >= ~45 non-empty writes.
    produced = [i for i, s in enumerate(sizes) if s]
    assert len(produced) >= 0.9 * len(x) / 16000 / 0.2
    assert max(np.diff(produced)) <= 11  # 220 ms of 20 ms writes
    # All but the last page arrived before finish.
    assert len(pages(tail)) <= 2 and pages(tail)[-1].flags & 4


def test_default_pages_hold_about_a_second() -> None:
    _, sizes = encode(ten_seconds_of_speech())
    produced = [i for i, s in enumerate(sizes) if s]
    assert 9 <= len(produced) <= 12
    assert all(45 <= d <= 55 for d in np.diff(produced[1:]))


# -- bitrate -------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_ms", [20, 60])
@pytest.mark.parametrize("target", [16000, 24000, 32000])
def test_average_bitrate_is_near_target(target: int, frame_ms: int) -> None:
    x = ten_seconds_of_speech()
    blob, _ = encode(x, bitrate=target, signal="voice", frame_ms=frame_ms)
    rate = len(blob) * 8 / (len(x) / 16000)  # everything: headers and Ogg framing too
    assert abs(rate - target) / target < 0.15


@pytest.mark.parametrize(("frame_ms", "config"), [(20, 9), (60, 11)])
def test_voice_is_silk_wideband_in_frames_of_the_asked_duration(frame_ms: int, config: int) -> None:
    blob, _ = encode(speech.goforward(), frame_ms=frame_ms, signal="voice")
    audio = [pk for p in pages(blob)[2:] for pk in p.packets]
    # TOC configs 8..11: SILK-only wideband, 10/20/40/60 ms; code 0: one frame per packet.
    # The last packet may be shorter: libopusenc encodes no more padding than it must.
    assert {pk[0] >> 3 for pk in audio[:-1]} == {config}
    assert 8 <= audio[-1][0] >> 3 <= config
    assert {pk[0] & 3 for pk in audio} == {0}


# -- tags ----------------------------------------------------------------------------------


def test_comments_are_in_the_opus_tags() -> None:
    blob, _ = encode(
        speech.goforward()[:3200],
        comments={"TITLE": "séance 42", "voxgate_flow": "f-123", "EMPTY": ""},
    )
    vendor, comments = opus_tags(blob)
    assert vendor.startswith("libopus 1.") and "libopusenc" in vendor
    assert comments["TITLE"] == "séance 42"
    assert comments["VOXGATE_FLOW"] == "f-123"
    assert comments["EMPTY"] == ""
    assert len(comments) == 3
    assert decode(blob)[0].shape == (3200,)


@pytest.mark.parametrize(
    "comments",
    [{"A=B": "x"}, {"": "x"}, {"TÍTLE": "x"}, {"TITLE": "a\0b"}, {"TITLE": 3}, ["TITLE"]],
)
def test_bad_comments_are_refused(comments: object) -> None:
    with pytest.raises(ValueError):
        OggOpusWriter(comments=comments)  # type: ignore[arg-type]


# -- settings and errors -------------------------------------------------------------------


def test_complexity_is_applied() -> None:
    for cx in (0, 5, 10):
        with OggOpusWriter(complexity=cx) as w:
            assert w.complexity == cx


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bitrate": 0},
        {"bitrate": 499},
        {"bitrate": 512_001},
        {"bitrate": 24000.0},
        {"bitrate": True},
        {"complexity": -1},
        {"complexity": 11},
        {"complexity": 5.0},
        {"sample_rate": 44100},
        {"channels": 3},
        {"frame_ms": 30},
        {"frame_ms": True},
        {"max_page_ms": 0},
        {"max_page_ms": 60_000},
        {"signal": "speech"},
    ],
)
def test_bad_settings_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        OggOpusWriter(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pcm",
    [
        np.zeros(320, dtype=np.float32),
        np.zeros(320, dtype=np.int32),
        np.zeros(640, dtype=np.int16)[::2],  # not contiguous
        [0] * 320,
        b"\0" * 640,
    ],
)
def test_write_rejects_what_is_not_contiguous_int16(pcm: object) -> None:
    with OggOpusWriter() as w, pytest.raises(ValueError):
        w.write(pcm)  # type: ignore[arg-type]


def test_stereo_write_needs_whole_frames() -> None:
    with OggOpusWriter(channels=2) as w:
        with pytest.raises(ValueError, match="whole number"):
            w.write(np.zeros(641, dtype=np.int16))
        assert w.write(np.zeros((320, 2), dtype=np.int16))[:4] == b"OggS"


def test_write_after_finish_is_too_late_and_finish_is_idempotent() -> None:
    w = OggOpusWriter()
    w.write(np.zeros(FRAME, dtype=np.int16))
    assert w.finish()
    assert w.finished
    assert w.finish() == b""
    with pytest.raises(OggOpusError) as err:
        w.write(np.zeros(FRAME, dtype=np.int16))
    assert err.value.code == lib.OPE_TOO_LATE
    assert err.value.message == "call cannot be made at this point"  # ope_strerror's text
    w.close()
    assert w.finish() == b""  # still idempotent once closed


def test_use_after_close_raises_closed() -> None:
    with OggOpusWriter() as w:
        w.write(np.zeros(FRAME, dtype=np.int16))
    assert w.closed
    with pytest.raises(NativeClosedError):
        w.write(np.zeros(FRAME, dtype=np.int16))
    with pytest.raises(NativeClosedError):
        w.finish()
    with pytest.raises(NativeClosedError):
        _ = w.complexity
    w.close()  # twice is fine


def test_empty_stream_is_just_the_headers() -> None:
    w = OggOpusWriter()
    assert w.write(np.zeros(0, dtype=np.int16)) == b""
    blob = w.finish()  # libopusenc 0.2.1 would abort on draining no audio
    assert [p.packets[0][:8] for p in pages(blob)] == [b"OpusHead", b"OpusTags"]
    w.close()


def test_tiny_streams_decode_to_their_length() -> None:
    for n in (1, 7, 320, 1000):
        x = (np.random.default_rng(n).standard_normal(n) * 3000).astype(np.int16)
        blob, _ = encode(x)
        assert len(decode(blob)[0]) == n


def test_unfinished_writers_are_freed_by_the_collector() -> None:
    for _ in range(20):
        w = OggOpusWriter()
        w.write(np.zeros(4 * FRAME, dtype=np.int16))
        del w
    gc.collect()
