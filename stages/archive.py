"""Session recording to Ogg Opus while the session runs, sans-IO.

libopusenc (through :class:`native.OggOpusWriter`) does the Opus encoding and the Ogg
muxing; this class hands it samples and passes on the bytes it writes, so the shell
can append them to a file or stream them as a multipart upload. Nothing is buffered
whole: a page leaves at least once a second of audio, and ``feed`` returns it.

The settings are chosen for speech heard later by a person, at a fraction of a core:

* ``signal="voice"``: SILK wideband, the mode libopus itself picks for speech once
  it analyses the signal (complexity 7 and up). Below that, left to itself, it codes
  24 kbit/s mono as music (CELT): wideband PESQ 4.12 against SILK's 4.39 at complexity 5.
* 60 ms frames: libopusenc makes a fixed number of libopus calls per frame, some of
  them costly under virtualisation (libopus 1.3 probes the CPU with ``cpuid`` on each
  multistream ctl), so three times fewer frames cut the CPU by about a third at the
  same quality and slightly fewer bytes.
* complexity 5: the knee of CPU against quality. On the LibriVox clips at 24 kbit/s,
  wideband PESQ was 4.32 at complexity 3, 4.38 at 5, 4.42 at 6, and 4.42 for the
  libsndfile encoder this replaced (complexity 10), for 0.83%, 1.02%, 1.36% and 5.60%
  of a core (``feed`` on 20 ms chunks, one run on one VM; ``bench/native.py`` has the
  per-frame row).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from native import OggOpusWriter

SAMPLE_RATE = 16000
CONTENT_TYPE = "audio/ogg; codecs=opus"
EXTENSION = ".ogg"
DEFAULT_BITRATE = 24000  # bit/s
DEFAULT_COMPLEXITY = 5  # libopus effort, 0..10
_MIN_BITRATE, _MAX_BITRATE = 6000, 256000  # bit/s
_FRAME_MS = 60  # Opus frame duration
_PAGE_MS = 1000  # longest audio an Ogg page holds back before it is written


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

    The recording decodes to exactly the samples fed: libopusenc writes the Opus
    pre-skip into the header and the end trim into the last page's granule position.

    Args:
        bitrate: Opus target in bit/s (6000..256000). 24 kbps keeps speech clear for a
            listener at about a tenth of PCM's size.
        complexity: libopus effort, 0 (fastest) .. 10 (best); see the module docstring
            for why 5.

    Raises:
        ValueError: bitrate or complexity out of range.
    """

    def __init__(
        self, *, bitrate: int = DEFAULT_BITRATE, complexity: int = DEFAULT_COMPLEXITY
    ) -> None:
        if not _MIN_BITRATE <= bitrate <= _MAX_BITRATE:
            raise ValueError(f"bitrate must be between {_MIN_BITRATE} and {_MAX_BITRATE}")
        if isinstance(complexity, bool) or not isinstance(complexity, int) or not (
            0 <= complexity <= 10
        ):
            raise ValueError(f"complexity must be an integer in 0..10, got {complexity!r}")
        self._writer = OggOpusWriter(
            SAMPLE_RATE, 1, bitrate=bitrate, complexity=complexity, signal="voice",
            frame_ms=_FRAME_MS, max_page_ms=_PAGE_MS,
        )
        self._hash = hashlib.sha256()
        self._samples = 0
        self._bytes = 0
        self._result: ArchiveResult | None = None

    def feed(self, samples: npt.NDArray[np.int16]) -> bytes:
        """Encode more audio; return the Ogg bytes that became ready (often none).

        Raises:
            ValueError: not a 1-D int16 array, or the encoder is closed.
            native.OggOpusError: libopusenc failed.
        """
        if self._result is not None:
            raise ValueError("the archive is closed")
        if not isinstance(samples, np.ndarray) or samples.dtype != np.int16 or samples.ndim != 1:
            raise ValueError("expected a 1-D int16 array")
        data = self._writer.write(np.ascontiguousarray(samples))
        self._samples += len(samples)
        return self._take(data)

    def close(self) -> tuple[bytes, ArchiveResult]:
        """Finish the stream: the last bytes, and what the whole recording is.

        Idempotent: later calls return ``b""`` and the same result.

        Raises:
            native.OggOpusError: libopusenc failed.
        """
        if self._result is not None:
            return b"", self._result
        try:
            tail = self._take(self._writer.finish())
        finally:
            self._writer.close()
        self._result = ArchiveResult(self._samples, self._bytes, self._hash.hexdigest())
        return tail, self._result

    def _take(self, data: bytes) -> bytes:
        if data:
            self._hash.update(data)
            self._bytes += len(data)
        return data
