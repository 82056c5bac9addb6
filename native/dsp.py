"""The project's own DSP (``native._dsp``): conversion, levels, 16 <-> 48 kHz resampling.

Levels and conversions are normalised to full scale: int16 32768 is float 1.0.
The resampler keeps the scale it is fed (see :class:`Resampler`).
"""

from __future__ import annotations

from typing import Any, Final, Literal

import numpy as np

from ._dsp import ffi, lib
from ._resource import _F32, _I16, Owned, bad_pcm

__all__ = [
    "Direction",
    "Resampler",
    "ResamplerBank",
    "f32_to_s16",
    "levels",
    "peak",
    "rms",
    "s16_to_f32",
]

Direction = Literal["up", "down"]

_DIRECTIONS: Final = {"up": lib.VG_RESAMPLE_UP, "down": lib.VG_RESAMPLE_DOWN}
_RATES: Final = {"up": (16000, 48000), "down": (48000, 16000)}
_FMT: Final = {_I16: lib.VG_S16, _F32: lib.VG_F32}
FACTOR: Final[int] = lib.VG_RESAMPLE_FACTOR

_rms = {_I16: lib.vg_rms_s16, _F32: lib.vg_rms_f32}
_peak = {_I16: lib.vg_peak_s16, _F32: lib.vg_peak_f32}
_levels = {_I16: lib.vg_levels_s16, _F32: lib.vg_levels_f32}
_process = lib.vg_resampler_process
_output_len = lib.vg_resampler_output_len
_from_buffer = ffi.from_buffer
# Typed views: cffi refuses a plain char[] buffer for an int16_t* or float* parameter.
_ARRAY = {_I16: ffi.typeof("int16_t[]"), _F32: ffi.typeof("float[]")}
_DOUBLES = ffi.typeof("double[]")


def _pcm(x: object, what: str) -> np.ndarray:
    """*x* if it is a C-contiguous int16 or float32 array."""
    if isinstance(x, np.ndarray) and x.dtype in _FMT and x.flags.c_contiguous:
        return x
    if isinstance(x, np.ndarray) and x.dtype not in _FMT:
        raise ValueError(f"{what}: expected dtype int16 or float32, got {x.dtype}")
    raise bad_pcm(x, _I16, what)


def s16_to_f32(x: np.ndarray) -> np.ndarray:
    """Convert int16 samples to float32 in [-1, 1).

    Args:
        x: C-contiguous int16 array, any shape.

    Returns:
        A new float32 array of the same shape, ``x / 32768``.

    Raises:
        ValueError: wrong dtype or layout.
    """
    if not (isinstance(x, np.ndarray) and x.dtype == _I16 and x.flags.c_contiguous):
        raise bad_pcm(x, _I16, "s16_to_f32")
    out = np.empty(x.shape, dtype=_F32)
    lib.vg_s16_to_f32(
        _from_buffer(_ARRAY[_I16], x),
        _from_buffer(_ARRAY[_F32], out, require_writable=True),
        x.size,
    )
    return out


def f32_to_s16(x: np.ndarray) -> np.ndarray:
    """Convert float32 samples in [-1, 1] to int16, rounding and clipping.

    Args:
        x: C-contiguous float32 array, any shape.

    Returns:
        A new int16 array of the same shape, ``round(x * 32768)`` clipped.

    Raises:
        ValueError: wrong dtype or layout.
    """
    if not (isinstance(x, np.ndarray) and x.dtype == _F32 and x.flags.c_contiguous):
        raise bad_pcm(x, _F32, "f32_to_s16")
    out = np.empty(x.shape, dtype=_I16)
    lib.vg_f32_to_s16(
        _from_buffer(_ARRAY[_F32], x),
        _from_buffer(_ARRAY[_I16], out, require_writable=True),
        x.size,
    )
    return out


def rms(x: np.ndarray) -> float:
    """Root mean square, relative to full scale (0.0 for an empty array).

    Args:
        x: C-contiguous int16 (full scale 32768) or float32 (full scale 1.0) array.

    Returns:
        The RMS level; ``20 * log10(rms)`` is dBFS.

    Raises:
        ValueError: wrong dtype or layout.
    """
    x = _pcm(x, "rms")
    return float(_rms[x.dtype](_from_buffer(_ARRAY[x.dtype], x), x.size))


def peak(x: np.ndarray) -> float:
    """Largest absolute sample, relative to full scale (0.0 for an empty array).

    Args:
        x: C-contiguous int16 (full scale 32768) or float32 (full scale 1.0) array.

    Returns:
        The peak level.

    Raises:
        ValueError: wrong dtype or layout.
    """
    x = _pcm(x, "peak")
    return float(_peak[x.dtype](_from_buffer(_ARRAY[x.dtype], x), x.size))


def levels(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RMS and peak of many frames in one C call (e.g. one frame per session).

    Args:
        frames: C-contiguous 2-D int16 or float32 array, one frame per row.

    Returns:
        ``(rms, peak)``: float64 arrays with one value per row, as :func:`rms`
        and :func:`peak` would give.

    Raises:
        ValueError: wrong dtype, layout or number of dimensions.
    """
    frames = _pcm(frames, "levels")
    if frames.ndim != 2:
        raise ValueError(f"levels: expected a 2-D array (frames x samples), got {frames.ndim}-D")
    n_frames, frame_len = frames.shape
    r = np.empty(n_frames)
    p = np.empty(n_frames)
    _levels[frames.dtype](
        _from_buffer(_ARRAY[frames.dtype], frames),
        n_frames,
        frame_len,
        _from_buffer(_DOUBLES, r, require_writable=True),
        _from_buffer(_DOUBLES, p, require_writable=True),
    )
    return r, p


def _direction(direction: str) -> int:
    try:
        return int(_DIRECTIONS[direction])
    except (KeyError, TypeError):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}") from None


class Resampler(Owned):
    """Streaming 16 kHz -> 48 kHz (``"up"``) or 48 kHz -> 16 kHz (``"down"``) resampler.

    A 121-tap Kaiser-windowed sinc (flat to 7 kHz, > 76 dB rejection from 9 kHz)
    run as a 3-phase polyphase filter.  Filter state is carried between calls,
    so the output never depends on how the input is chunked.  The filter is
    linear and keeps the scale of its input: int16 in gives int16 out (rounded
    and clipped), float32 in gives float32 out, on any scale.

    Args:
        direction: ``"up"`` or ``"down"``.

    Raises:
        ValueError: unknown direction.
        MemoryError: the C state could not be allocated.
    """

    _owned = ("_ptr",)
    _ffi = ffi

    def __init__(self, direction: Direction) -> None:
        code = _direction(direction)
        self.direction: Direction = direction
        self.in_rate, self.out_rate = _RATES[direction]
        #: Group delay in output samples: output sample ``delay + k`` lines up
        #: with input time ``k`` (60 at 48 kHz up, 20 at 16 kHz down).
        self.delay: int = lib.vg_resampler_delay(code)
        ptr = lib.vg_resampler_create(code)
        if ptr == ffi.NULL:
            raise MemoryError("vg_resampler_create failed")
        self._ptr: Any = ffi.gc(ptr, lib.vg_resampler_destroy)

    def output_len(self, n_in: int) -> int:
        """Samples that :meth:`process` will return for *n_in* input samples.

        Down-sampling emits one sample per three inputs, counted across calls,
        so this depends on what was fed before.

        Raises:
            NativeClosedError: the resampler is closed.
        """
        if self._ptr is None:
            raise self._closed()
        return int(_output_len(self._ptr, n_in))

    def process(self, x: np.ndarray) -> np.ndarray:
        """Resample the next chunk of the stream.

        Args:
            x: 1-D C-contiguous int16 or float32 samples, any length.

        Returns:
            A new array of the same dtype: ``3 * len(x)`` samples up, about
            ``len(x) / 3`` down (exactly :meth:`output_len`).

        Raises:
            ValueError: wrong dtype, layout or shape.
            NativeClosedError: the resampler is closed.
        """
        ptr = self._ptr
        if ptr is None:
            raise self._closed()
        x = _pcm(x, "Resampler.process")
        if x.ndim != 1:
            raise ValueError(f"Resampler.process: expected a 1-D array, got {x.ndim}-D")
        fmt = _FMT[x.dtype]
        n = x.shape[0]
        out = np.empty(_output_len(ptr, n), dtype=x.dtype)
        _process(ptr, _from_buffer(x), fmt, n, _from_buffer(out, require_writable=True), fmt)
        return out

    def reset(self) -> None:
        """Clear the filter history, as for a new stream.

        Raises:
            NativeClosedError: the resampler is closed.
        """
        if self._ptr is None:
            raise self._closed()
        lib.vg_resampler_reset(self._ptr)


class ResamplerBank(Owned):
    """Many independent resamplers (one per session) advanced by one C call.

    Slot ``s`` is a :class:`Resampler` of its own: row ``s`` of each
    :meth:`process` call is the next chunk of session ``s``.  A new session
    taking over a slot calls :meth:`reset` on it first.  Every slot gets the
    same number of samples per call, which keeps them all in phase.

    Args:
        direction: ``"up"`` or ``"down"``.
        n_slots: number of sessions, at least 1.

    Raises:
        ValueError: unknown direction or bad slot count.
        MemoryError: the C state could not be allocated.
    """

    _owned = ("_ptr",)
    _ffi = ffi

    def __init__(self, direction: Direction, n_slots: int) -> None:
        code = _direction(direction)
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or not 0 < n_slots < 2**31:
            raise ValueError(f"n_slots must be a positive integer, got {n_slots!r}")
        self.direction: Direction = direction
        self.n_slots = n_slots
        self.in_rate, self.out_rate = _RATES[direction]
        #: Group delay in output samples, as :attr:`Resampler.delay`.
        self.delay: int = lib.vg_resampler_delay(code)
        ptr = lib.vg_bank_create(code, n_slots)
        if ptr == ffi.NULL:
            raise MemoryError("vg_bank_create failed")
        self._ptr: Any = ffi.gc(ptr, lib.vg_bank_destroy)

    def process(self, frames: np.ndarray) -> np.ndarray:
        """Resample one chunk for every slot.

        Args:
            frames: C-contiguous int16 or float32 array of shape ``(n_slots, n)``;
                for ``"down"``, ``n`` must be a multiple of 3.

        Returns:
            A new array of the same dtype, shape ``(n_slots, 3 * n)`` up or
            ``(n_slots, n // 3)`` down.

        Raises:
            ValueError: wrong dtype, layout or shape.
            NativeClosedError: the bank is closed.
        """
        ptr = self._ptr
        if ptr is None:
            raise self._closed()
        frames = _pcm(frames, "ResamplerBank.process")
        if frames.ndim != 2 or frames.shape[0] != self.n_slots:
            raise ValueError(
                f"ResamplerBank.process: expected shape ({self.n_slots}, n), got {frames.shape}"
            )
        n = frames.shape[1]
        if self.direction == "down" and n % FACTOR:
            raise ValueError(f"ResamplerBank.process: down needs n % 3 == 0, got n={n}")
        n_out = n * FACTOR if self.direction == "up" else n // FACTOR
        out = np.empty((self.n_slots, n_out), dtype=frames.dtype)
        fmt = _FMT[frames.dtype]
        lib.vg_bank_process(
            ptr, _from_buffer(frames), fmt, n, _from_buffer(out, require_writable=True), fmt
        )
        return out

    def reset(self, slot: int | None = None) -> None:
        """Clear one slot's history (a new session takes it), or every slot's.

        Args:
            slot: the slot index, or ``None`` for all.

        Raises:
            ValueError: slot out of range.
            NativeClosedError: the bank is closed.
        """
        if self._ptr is None:
            raise self._closed()
        if slot is None:
            lib.vg_bank_reset(self._ptr, -1)
            return
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot must be in 0..{self.n_slots - 1}, got {slot!r}")
        lib.vg_bank_reset(self._ptr, slot)
