"""native.ogg: the Ogg page checksum and the Ogg Opus muxer."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile

from native import OggOpusWriter, OpusEncoder
from native.ogg import OggOpusMuxer, ogg_crc


def _pages(blob: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(blob):
        assert blob[i:i + 4] == b"OggS"
        nseg = blob[i + 26]
        size = 27 + nseg + sum(blob[i + 27:i + 27 + nseg])
        out.append(blob[i:i + size])
        i += size
    return out


def test_crc_of_known_vectors() -> None:
    assert ogg_crc(b"") == 0
    # CRC-32 with poly 0x04C11DB7, MSB first, init 0, no final xor ("CRC-32/MPEG-2"
    # without its init): the standard check value for "123456789" is 0x89A1897F.
    assert ogg_crc(b"123456789") == 0x89A1897F


def test_crc_matches_libopusenc_pages() -> None:
    w = OggOpusWriter(16000, 1, bitrate=24000, frame_ms=60, max_page_ms=1000)
    rng = np.random.default_rng(0)
    blob = w.write(rng.integers(-3000, 3000, 48000).astype(np.int16)) + w.finish()
    w.close()
    pages = _pages(blob)
    assert len(pages) >= 4
    for p in pages:
        zeroed = p[:22] + b"\0\0\0\0" + p[26:]
        assert ogg_crc(zeroed) == struct.unpack_from("<I", p, 22)[0]


def test_lacing_of_a_multiple_of_255_and_page_split() -> None:
    mux = OggOpusMuxer(16000, pre_skip=0, max_page_ms=10_000)
    head = mux.headers()
    out = b"".join(mux.packet(bytes(510), 320) for _ in range(100))  # 3 segments each
    out += mux.finish(100 * 320)
    pages = _pages(head + out)
    assert pages[0][5] == 0x02 and pages[-1][5] == 0x04  # BOS, EOS
    audio = pages[2:]
    assert all(p[26] <= 255 for p in audio) and len(audio) == 2  # 85 packets fill a page
    assert list(audio[0][27:30]) == [255, 255, 0]
    granules = [struct.unpack_from("<q", p, 6)[0] for p in pages]
    assert granules[:2] == [0, 0] and granules[2] == 85 * 960 and granules[3] == 100 * 960
    assert [struct.unpack_from("<I", p, 18)[0] for p in pages] == [0, 1, 2, 3]


def test_muxed_opus_decodes_to_the_trimmed_length() -> None:
    enc = OpusEncoder(16000, 1, "audio", bitrate=24000)
    mux = OggOpusMuxer(16000, pre_skip=enc.lookahead)
    rng = np.random.default_rng(1)
    n = 16000 + 123
    audio = np.concatenate([rng.integers(-2000, 2000, n), np.zeros(2 * 960)]).astype(np.int16)
    blob = mux.headers()
    for i in range(0, len(audio) - 959, 960):
        blob += mux.packet(enc.encode(np.ascontiguousarray(audio[i:i + 960])), 960)
    blob += mux.finish(n)
    assert mux.finish(n) == b""
    with pytest.raises(ValueError):
        mux.packet(b"x", 960)
    decoded, sr = soundfile.read(io.BytesIO(blob), dtype="int16")
    assert sr == 16000 and len(decoded) == n


@pytest.mark.parametrize("kw", [{"input_rate": 44100}, {"channels": 3},
                                {"pre_skip": 100_000}, {"max_page_ms": 0}])
def test_bad_arguments(kw: dict[str, int]) -> None:
    args = {"input_rate": 16000, "channels": 1, "pre_skip": 0, **kw}
    with pytest.raises(ValueError):
        OggOpusMuxer(args.pop("input_rate"), args.pop("channels"), **args)
