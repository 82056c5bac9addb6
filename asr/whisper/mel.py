"""Whisper's log-mel front end in numpy.

This reproduces ``whisper.audio.log_mel_spectrogram``: a 400-point STFT with a periodic
Hann window and a 160-sample hop over reflect-padded audio (``torch.stft(center=True)``),
the power spectrum without its last frame, Slaney-style mel filters (librosa's
``filters.mel(sr=16000, n_fft=400, n_mels=80)``, ``htk=False``, ``norm="slaney"``),
``log10(max(x, 1e-10))``, a floor 8 decades below the loudest value, then ``(x + 4) / 4``.

Finals pad the audio with zeros to 30 s (``N_SAMPLES``) like Whisper's ``transcribe``
does, because the encoder was trained on 30 s windows and shorter inputs can fall into
repetition loops (see ``shared/notes/whisper-onnx.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 16000  # Hz
N_FFT = 400  # samples (25 ms)
HOP_LENGTH = 160  # samples (10 ms)
CHUNK_LENGTH_S = 30  # seconds in one Whisper window
N_SAMPLES = CHUNK_LENGTH_S * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30 s window
N_MELS = 80

_LOG_FLOOR = 1e-10  # power floor before log10, as in Whisper
_DYNAMIC_RANGE = 8.0  # decades kept below the maximum


def hz_to_mel(freqs: np.ndarray) -> np.ndarray:
    """Hz to mels on the Slaney (Auditory Toolbox) scale, like ``librosa.hz_to_mel``.

    Args:
        freqs: frequencies in Hz.

    Returns:
        The same shape in mels (float64): linear below 1 kHz, logarithmic above.
    """
    f = np.asarray(freqs, dtype=np.float64)
    f_sp = 200.0 / 3  # Hz per mel in the linear part
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = f >= min_log_hz
    # np.where evaluates both branches; clip to keep log() away from 0 Hz.
    log_part = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    out: np.ndarray = np.where(log_t, log_part, mels)
    return out


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Mels (Slaney scale) to Hz, the inverse of :func:`hz_to_mel`.

    Args:
        mels: values in mels.

    Returns:
        The same shape in Hz (float64).
    """
    m = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    out: np.ndarray = np.where(
        m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs
    )
    return out


@functools.cache
def mel_filters(n_mels: int = N_MELS, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """The Slaney-normalised triangular mel filter bank Whisper was trained with.

    Computed in float64 the way ``librosa.filters.mel(htk=False, norm="slaney")`` does and
    stored as float32 (Whisper's ``mel_filters.npz`` holds librosa's float32 output).

    Args:
        n_mels: number of bands (80 for every model we ship).
        sr: sample rate in Hz.
        n_fft: FFT size in samples.

    Returns:
        Read-only float32 ``[n_mels, n_fft // 2 + 1]``.
    """
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    min_mel, max_mel = hz_to_mel(np.array([0.0, sr / 2.0]))
    mel_f = mel_to_hz(np.linspace(min_mel, max_mel, n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney normalisation: each triangle gets unit area in Hz, so wide high bands do not
    # outweigh narrow low ones.
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, None]
    out: np.ndarray = weights.astype(np.float32)
    out.flags.writeable = False
    return out


@functools.cache
def _hann(n_fft: int) -> np.ndarray:
    # Periodic Hann (torch.hann_window default): the symmetric n+1 window without its end.
    w = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    w.flags.writeable = False
    return w


def _to_float32(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio)
    if a.ndim != 1:
        raise ValueError(f"audio must be 1-D samples, got shape {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"audio must be int16 or float, got {a.dtype}")
    return a.astype(np.float32, copy=False)


def log_mel_spectrogram(
    audio: np.ndarray, pad_to_frames: int | None = N_FRAMES, n_mels: int = N_MELS
) -> np.ndarray:
    """Whisper's normalised log-mel spectrogram of 16 kHz mono audio.

    Args:
        audio: samples, int16 (scaled by 1/32768) or float in [-1, 1].
        pad_to_frames: pad the audio with zeros to ``pad_to_frames * HOP_LENGTH`` samples
            first, giving exactly that many frames (3000 = 30 s, what finals use). ``None``
            keeps the audio as it is (``len(audio) // HOP_LENGTH`` frames).
        n_mels: mel bands.

    Returns:
        float32 ``[n_mels, T]``.

    Raises:
        ValueError: the audio is not 1-D numeric, is longer than ``pad_to_frames``
            allows (split it into windows first), or is too short to frame.
    """
    x = _to_float32(audio)
    n = x.shape[0]
    if pad_to_frames is not None:
        if pad_to_frames <= 0:
            raise ValueError(f"pad_to_frames must be positive, got {pad_to_frames}")
        total = pad_to_frames * HOP_LENGTH
        if n > total:
            raise ValueError(
                f"{n} samples do not fit in {pad_to_frames} frames ({total} samples): "
                "split long audio into windows"
            )
    else:
        total = n
    n_frames = total // HOP_LENGTH  # 1 + total // hop STFT frames, minus the last one
    half = N_FFT // 2
    if n_frames < 1 or total <= half:
        # torch.stft's reflect padding needs more samples than it pads.
        raise ValueError(f"{n} samples are too short for a {N_FFT}-point STFT")

    # Frames that only see appended zeros have exactly zero power, so only the frames
    # touching real samples go through the FFT; the rest get the floor directly. Frame t
    # reads samples [t*hop - half, t*hop + half) of the zero-padded signal, reflected at
    # both ends as torch.stft(center=True) does. Near the end the right reflection can
    # fold real samples back in, so then every frame is computed.
    n_live = n_frames
    if total - n > N_FFT:
        n_live = min(n_frames, (n + half) // HOP_LENGTH + 1)
    need = (n_live - 1) * HOP_LENGTH + half  # samples of the padded signal read, exclusive
    # The left reflection reads samples 1..half, so keep at least half + 1 of them.
    core = np.zeros(min(max(need, half + 1), total), dtype=np.float32)
    m = min(n, core.shape[0])
    core[:m] = x[:m]
    left = core[1 : half + 1][::-1]
    if need > total:
        right = core[-(need - total) - 1 : -1][::-1]
        padded = np.concatenate([left, core, right])
    else:
        padded = np.concatenate([left, core])
    frames = np.lib.stride_tricks.as_strided(
        padded,
        shape=(n_live, N_FFT),
        strides=(HOP_LENGTH * padded.strides[0], padded.strides[0]),
        writeable=False,
    )
    spec = np.fft.rfft(frames * _hann(N_FFT), axis=-1)  # complex64 [n_live, 201]
    power = spec.real**2 + spec.imag**2
    mel_live = mel_filters(n_mels) @ power.T  # [n_mels, n_live]
    log_spec = np.full((n_mels, n_frames), np.log10(_LOG_FLOOR), dtype=np.float32)
    np.log10(np.maximum(mel_live, _LOG_FLOOR), out=log_spec[:, :n_live])
    np.maximum(log_spec, log_spec.max() - _DYNAMIC_RANGE, out=log_spec)
    log_spec += 4.0
    log_spec /= 4.0
    return log_spec


def log_mel_batch(
    audios: Sequence[np.ndarray], pad_to_frames: int | None = N_FRAMES, n_mels: int = N_MELS
) -> np.ndarray:
    """Log-mel spectrograms of several clips stacked for one encoder run.

    Args:
        audios: clips as accepted by :func:`log_mel_spectrogram`.
        pad_to_frames: frames per row; ``None`` pads every clip with zeros to the frame
            count of the longest one (rounded up to even, as the encoder needs).
        n_mels: mel bands.

    Returns:
        float32 ``[B, n_mels, T]``.

    Raises:
        ValueError: no clips, or a clip that :func:`log_mel_spectrogram` rejects.
    """
    if not audios:
        raise ValueError("log_mel_batch needs at least one clip")
    if pad_to_frames is None:
        longest = max(np.asarray(a).shape[0] for a in audios) // HOP_LENGTH
        pad_to_frames = longest + (longest % 2)
    out = np.empty((len(audios), n_mels, pad_to_frames), dtype=np.float32)
    for i, a in enumerate(audios):
        out[i] = log_mel_spectrogram(a, pad_to_frames=pad_to_frames, n_mels=n_mels)
    return out
