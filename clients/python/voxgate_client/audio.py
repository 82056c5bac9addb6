"""Audio in any common shape to what the gateway takes: PCM16 LE, 16 kHz, mono.

``AudioConverter`` accepts bytes (PCM16 LE) or numpy arrays (int16, or float in
[-1, 1]; 1-D mono or 2-D ``[samples, channels]``, downmixed) at any sample rate, and
resamples with the SoX resampler (``soxr``) in streaming mode, so chunk boundaries leave
no clicks and the total length is exact.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np

TARGET_RATE = 16000


class AudioConverter:
    """Args:
        sample_rate: rate of the audio that will be pushed (Hz).
    """

    def __init__(self, sample_rate: int = TARGET_RATE) -> None:
        if not 4000 <= sample_rate <= 384_000:
            raise ValueError(f"sample_rate {sample_rate} Hz is out of range")
        self.sample_rate = sample_rate
        self._resampler: Any = None
        if sample_rate != TARGET_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(sample_rate, TARGET_RATE, 1,
                                                  dtype="float32", quality="HQ")

    def convert(self, audio: bytes | bytearray | memoryview | np.ndarray) -> bytes:
        """PCM16 LE 16 kHz mono bytes for ``audio``.

        Raises:
            ValueError: odd byte counts, or an array of an unsupported dtype or shape.
        """
        if isinstance(audio, (bytes, bytearray, memoryview)):
            raw = bytes(audio)
            if len(raw) % 2:
                raise ValueError(f"{len(raw)} bytes is not whole 16-bit samples")
            if self._resampler is None:
                return raw
            samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        else:
            a = np.asarray(audio)
            if self._resampler is None and a.dtype == np.int16 and a.ndim == 1:
                return a.astype("<i2", copy=False).tobytes()  # exact, no round trip
            samples = _mono_float(a)
            if self._resampler is None:
                return _to_pcm16(samples)
        return _to_pcm16(self._resampler.resample_chunk(samples, last=False))

    def finish(self) -> bytes:
        """What the resampler still holds (call once at the end of the audio)."""
        if self._resampler is None:
            return b""
        return _to_pcm16(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))


def _mono_float(a: np.ndarray) -> np.ndarray:
    if a.ndim not in (1, 2):
        raise ValueError("audio must be 1-D (mono) or 2-D [samples, channels]")
    if a.dtype == np.int16:
        x = a.astype(np.float32) / 32768.0
    elif a.dtype.kind == "f":
        x = a.astype(np.float32, copy=False)
    else:
        raise ValueError(f"audio must be int16 or float, not {a.dtype}")
    return x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x


def _to_pcm16(x: np.ndarray) -> bytes:
    pcm: bytes = (np.clip(x, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2").tobytes()
    return pcm


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM16 WAV file as ``(int16 samples [n] or [n, channels], sample_rate)``.

    Raises:
        ValueError: a sample width other than 16 bits.
    """
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: need 16-bit PCM WAV, not {8 * w.getsampwidth()}-bit")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        channels = w.getnchannels()
        rate = w.getframerate()
    if channels > 1:
        data = data.reshape(-1, channels)
    return data, rate
