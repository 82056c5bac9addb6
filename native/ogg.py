"""Ogg Opus muxing (RFC 3533 pages, RFC 7845 Opus mapping) of packets made elsewhere.

Why not libopusenc: it always encodes at 48 kHz, so 16 kHz speech goes through its
resampler first, and that resampler plus its per-frame overhead cost more than the
encoding itself (``bench/native.py``: 7.5 ms of CPU per second of audio at complexity 5
through libopusenc, 4.2 ms with libopus at 16 kHz and this muxer, 60 ms frames). With
the muxer apart, the packets of any ``native.OpusEncoder`` can be stored, which also
lets one encoder feed both the ASR link and the archive.

Sans-IO: packets in, page bytes out. The page CRC (Ogg's, polynomial 0x04C11DB7 not
reflected) is computed with zlib's reflected CRC-32 on bit-reversed bytes, so it runs in
C without a native module of our own.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

__all__ = ["OggOpusMuxer", "ogg_crc"]

_REV: Final = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))
_PAGE_HEAD = struct.Struct("<4sBBqIIIB")
_MAX_SEGMENTS = 255
_OPUS_RATE = 48000  # granule positions count 48 kHz samples, whatever the input rate


def _rev32(x: int) -> int:
    return int(f"{x:032b}"[::-1], 2)


def ogg_crc(data: bytes) -> int:
    """The Ogg page checksum (CRC-32, poly 0x04C11DB7, MSB first, init 0, no final xor).

    Reflecting every input byte and the result turns it into zlib's reflected CRC-32
    (whose init and final xor are cancelled through the start value).
    """
    return _rev32(zlib.crc32(data.translate(_REV), 0xFFFFFFFF) ^ 0xFFFFFFFF)


class OggOpusMuxer:
    """One logical Ogg Opus stream, mono or stereo, written page by page.

    Args:
        input_rate: the rate the audio was encoded at (recorded in OpusHead; decoders
            may play it back at that rate).
        channels: 1 or 2 (mapping family 0).
        pre_skip: decoder delay in samples at ``input_rate`` (the encoder's lookahead);
            stored in 48 kHz units.
        serial: the stream's serial number.
        max_page_ms: a page is written once it holds this much audio, so a reader of a
            growing file is never more than this behind.
        vendor: the OpusTags vendor string.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(self, input_rate: int, channels: int = 1, *, pre_skip: int,
                 serial: int = 0x766F7867, max_page_ms: int = 1000,
                 vendor: str = "voxgate") -> None:
        if input_rate not in (8000, 12000, 16000, 24000, 48000):
            raise ValueError(f"input_rate must be an Opus rate, got {input_rate}")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        if not 0 <= pre_skip * _OPUS_RATE // input_rate <= 0xFFFF:
            raise ValueError(f"pre_skip out of range: {pre_skip}")
        if max_page_ms <= 0:
            raise ValueError("max_page_ms must be positive")
        self._scale = _OPUS_RATE // input_rate
        self.pre_skip48 = pre_skip * self._scale
        self._serial = serial & 0xFFFFFFFF
        self._seq = 0
        self._max_page48 = max_page_ms * 48
        self._segments: list[int] = []
        self._body: list[bytes] = []
        self._page_start48 = 0  # granule at the end of the last page written
        self._granule48 = 0  # decoded samples (48 kHz) after the packets taken so far
        self._finished = False
        head = struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, self.pre_skip48,
                           input_rate, 0, 0)
        v = vendor.encode()
        tags = b"OpusTags" + struct.pack("<I", len(v)) + v + struct.pack("<I", 0)
        self._headers = self._page([len(head)], [head], 0, bos=True) + self._page(
            *self._lacing(tags), 0)

    def headers(self) -> bytes:
        """The two header pages (OpusHead, OpusTags); write them first, once."""
        return self._headers

    def packet(self, data: bytes, samples: int) -> bytes:
        """Add one Opus packet that decodes to ``samples`` samples at ``input_rate``.

        Returns:
            The page bytes completed by this packet (usually none).
        """
        if self._finished:
            raise ValueError("the stream is finished")
        lacing, body = self._lacing(data)
        out = b""
        if len(self._segments) + len(lacing) > _MAX_SEGMENTS:
            out = self._flush(self._granule48)
        self._segments += lacing
        self._body += body
        self._granule48 += samples * self._scale
        if self._granule48 - self._page_start48 >= self._max_page48:
            out += self._flush(self._granule48)
        return out

    def finish(self, total_samples: int) -> bytes:
        """End the stream: the last page, with the granule position that trims the
        decoded audio to ``total_samples`` (at ``input_rate``) after the pre-skip."""
        if self._finished:
            return b""
        self._finished = True
        end = min(self._granule48, self.pre_skip48 + total_samples * self._scale)
        return self._flush(end, eos=True)

    # -- pages ----------------------------------------------------------------------

    @staticmethod
    def _lacing(data: bytes) -> tuple[list[int], list[bytes]]:
        n = len(data)
        return [255] * (n // 255) + [n % 255], [data]

    def _flush(self, granule48: int, eos: bool = False) -> bytes:
        if not self._segments and not eos:
            return b""
        page = self._page(self._segments, self._body, granule48, eos=eos)
        self._segments, self._body = [], []
        self._page_start48 = self._granule48
        return page

    def _page(self, segments: list[int], body: list[bytes], granule48: int, *,
              bos: bool = False, eos: bool = False) -> bytes:
        flags = (0x02 if bos else 0) | (0x04 if eos else 0)
        head = _PAGE_HEAD.pack(b"OggS", 0, flags, granule48, self._serial, self._seq, 0,
                               len(segments))
        self._seq += 1
        page = head + bytes(segments) + b"".join(body)
        crc = ogg_crc(page)
        return page[:22] + crc.to_bytes(4, "little") + page[26:]
