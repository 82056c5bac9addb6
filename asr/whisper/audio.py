"""Audio in the engine's format: float32 16 kHz mono, from sample arrays and from files.

:func:`to_float_audio` converts what callers pass the engine (int16 or float arrays);
:func:`read_audio_file` reads PCM WAV (any rate and channel count) or headerless 16 kHz
PCM16, resampling through the spectrum. Files are for ``voxgate transcribe``, tests and
benchmarks; the live path receives 16 kHz PCM already.
"""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np

from asr.whisper import mel as melmod

SAMPLE_RATE = melmod.SAMPLE_RATE  # Hz


def to_float_audio(audio: np.ndarray) -> np.ndarray:
    """int16 or float samples to float32 in [-1, 1].

    Args:
        audio: 1-D samples.

    Returns:
        float32 samples.

    Raises:
        ValueError: not 1-D, or not int16/float.
    """
    a = np.asarray(audio)
    if a.ndim != 1:
        raise ValueError(f"audio must be 1-D, got shape {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32, copy=False)
    raise ValueError(f"audio must be int16 or float, got {a.dtype}")



def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling through the spectrum (files only, not the live path)."""
    if sr_in == sr_out or x.size == 0:
        return x
    m = max(1, round(x.size * sr_out / sr_in))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(spec.size, m // 2 + 1)
    out_spec = np.zeros(m // 2 + 1, dtype=np.complex128)
    out_spec[:keep] = spec[:keep]
    y = np.fft.irfft(out_spec, n=m) * (m / x.size)
    return y.astype(np.float32)


def read_audio_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a PCM WAV file (any rate, channels averaged) or headerless 16 kHz PCM16
    (``.raw``/``.pcm``) into float32 16 kHz mono.

    Args:
        path: the file.

    Returns:
        float32 samples at 16 kHz.

    Raises:
        ValueError: an unsupported WAV encoding.
        OSError: the file cannot be read.
    """
    p = Path(path)
    if p.suffix.lower() in (".raw", ".pcm"):
        return np.frombuffer(p.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
    try:
        with wave.open(str(p), "rb") as w:
            sr, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            data = w.readframes(w.getnframes())
    except wave.Error as e:
        raise ValueError(f"{p}: not a PCM WAV file ({e})") from None
    if width == 1:
        x = (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    elif width == 4:
        x = np.frombuffer(data, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{p}: unsupported sample width {width}")
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return _resample(x, sr, SAMPLE_RATE)
