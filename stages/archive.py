"""Session recording to Ogg Opus while the session runs, sans-IO.

libsndfile (through ``soundfile``) does the Opus encoding and the Ogg muxing; this class
only hands it samples and collects the bytes it writes, so the shell can append them to
a file or stream them as a multipart upload. Nothing is buffered whole: libsndfile emits
Ogg pages as they fill, and ``feed`` returns them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16000
CONTENT_TYPE = "audio/ogg; codecs=opus"
EXTENSION = ".ogg"
DEFAULT_BITRATE = 24000  # bit/s
_MIN_BITRATE, _MAX_BITRATE = 6000, 256000  # libsndfile's Opus range, bit/s


class _Sink(io.RawIOBase):
    """A write-only byte sink that libsndfile's virtual I/O can drive.

    libsndfile asks for the file length and position while writing Ogg; both are the
    count of bytes written so far. It never rewrites earlier bytes for Ogg Opus.
    """

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._chunks.append(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset,
                  io.SEEK_END: self._pos + offset}[whence]
        if target != self._pos:
            raise io.UnsupportedOperation("the archive sink only appends")
        return self._pos

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


@dataclass(frozen=True)
class ArchiveResult:
    """A finished recording: its length in samples and bytes, and its sha256."""

    samples: int
    bytes: int
    sha256: str

    @property
    def duration_ms(self) -> int:
        return self.samples * 1000 // SAMPLE_RATE


class ArchiveEncoder:
    """int16 16 kHz mono samples in, Ogg Opus bytes out, as they are produced.

    Args:
        bitrate: Opus target in bit/s (6000..256000). 24 kbps keeps speech clear for a
            listener at about a tenth of PCM's size.
    """

    def __init__(self, *, bitrate: int = DEFAULT_BITRATE) -> None:
        import soundfile

        if not _MIN_BITRATE <= bitrate <= _MAX_BITRATE:
            raise ValueError(f"bitrate must be between {_MIN_BITRATE} and {_MAX_BITRATE}")
        # libsndfile maps its compression level linearly onto the Opus bitrate:
        # bitrate = 6000 + (1 - level) * (256000 - 6000).
        quality = 1.0 - (bitrate - _MIN_BITRATE) / (_MAX_BITRATE - _MIN_BITRATE)
        self._sink = _Sink()
        self._file: Any = soundfile.SoundFile(
            self._sink, "w", samplerate=SAMPLE_RATE, channels=1, format="OGG",
            subtype="OPUS", compression_level=quality,
        )
        self._hash = hashlib.sha256()
        self._samples = 0
        self._bytes = 0
        self._result: ArchiveResult | None = None

    def feed(self, samples: npt.NDArray[np.int16]) -> bytes:
        """Encode more audio; return the Ogg bytes that became ready (often none).

        Raises:
            ValueError: not int16, or the encoder is closed.
        """
        if self._result is not None:
            raise ValueError("the archive is closed")
        if samples.dtype != np.int16 or samples.ndim != 1:
            raise ValueError("expected a 1-D int16 array")
        self._file.write(samples)
        self._samples += len(samples)
        return self._take()

    def close(self) -> tuple[bytes, ArchiveResult]:
        """Finish the stream: the last bytes, and what the whole recording is."""
        if self._result is not None:
            return b"", self._result
        self._file.close()
        tail = self._take()
        self._result = ArchiveResult(self._samples, self._bytes, self._hash.hexdigest())
        return tail, self._result

    def _take(self) -> bytes:
        data = self._sink.take()
        if data:
            self._hash.update(data)
            self._bytes += len(data)
        return data
