"""RNNoise noise suppression (``native._rnnoise``) with a 16 kHz front end.

RNNoise works on 10 ms frames of 48 kHz float audio on the int16 scale.  The
gateway carries 20 ms frames of 16 kHz int16, so :meth:`Denoiser.process_16k`
resamples up in C, denoises the two 10 ms halves and resamples back down.

The library is loaded on first use, not when ``native`` is imported, so that
Opus and DSP users do not need the pyrnnoise wheel; a missing library raises
:class:`~native.errors.RNNoiseUnavailableError` (an ``ImportError``) from
:class:`Denoiser`.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from . import _dsp
from ._resource import _F32, _I16, Owned, bad_pcm
from .dsp import Resampler

__all__ = ["FRAME_16K", "FRAME_48K", "Denoiser"]

#: Samples per RNNoise frame: 10 ms at 48 kHz.
FRAME_48K: Final = 480
#: Samples per :meth:`Denoiser.process_16k` frame: 20 ms at 16 kHz.
FRAME_16K: Final = 320
#: RNNoise's own delay in 48 kHz samples.  Measured (cross-correlation on
#: speech) for the build in pyrnnoise 0.4.5: two frames, where the overlap-add
#: window alone would account for one.  tests/unit/test_native_rnnoise.py pins
#: it, so a wheel with another delay fails loudly instead of skewing timestamps.
RNNOISE_DELAY_48K: Final = 2 * FRAME_48K
_UP_DELAY_48K: Final[int] = _dsp.lib.vg_resampler_delay(_dsp.lib.VG_RESAMPLE_UP)
_DOWN_DELAY_16K: Final[int] = _dsp.lib.vg_resampler_delay(_dsp.lib.VG_RESAMPLE_DOWN)


def _library() -> tuple[Any, Any]:
    """The RNNoise ``(ffi, lib)``, importing (and so checking) them on first call."""
    from . import _rnnoise

    return _rnnoise.ffi, _rnnoise.lib


class Denoiser(Owned):
    """One RNNoise state: one session's noise suppressor.

    Use either :meth:`process` (48 kHz float) or :meth:`process_16k` (16 kHz
    int16) on one instance, not both: they share the RNNoise state, and the
    16 kHz path also keeps resampler history.

    Raises:
        RNNoiseUnavailableError: the RNNoise library is missing or unusable.
        MemoryError: ``rnnoise_create`` failed.
    """

    _owned = ("_st",)

    #: Delay of :meth:`process` in 48 kHz samples.
    delay_48k: Final = RNNOISE_DELAY_48K
    #: Delay of :meth:`process_16k` in 16 kHz samples: resampler up (60 at
    #: 48 kHz) + RNNoise (960 at 48 kHz) + resampler down (20 at 16 kHz) = 360.
    delay_16k: Final = (_UP_DELAY_48K + RNNOISE_DELAY_48K) // 3 + _DOWN_DELAY_16K

    def __init__(self) -> None:
        rn_ffi, rn_lib = _library()
        self._ffi = rn_ffi
        self._rn = rn_lib
        st = rn_lib.rnnoise_create(rn_ffi.NULL)
        if st == rn_ffi.NULL:
            raise MemoryError("rnnoise_create failed")
        self._st: Any = rn_ffi.gc(st, rn_lib.rnnoise_destroy)
        self._f32 = rn_ffi.typeof("float[]")
        self._up: Resampler | None = None
        self._down: Resampler | None = None
        # 20 ms at 48 kHz, on the int16 scale; the two halves are RNNoise frames.
        self._buf = _dsp.ffi.new("float[]", 2 * FRAME_48K)
        self._buf_hi = self._buf + FRAME_48K

    def close(self) -> None:
        """Free the RNNoise state and the resamplers.  Safe to call more than once."""
        super().close()
        for r in (self._up, self._down):
            if r is not None:
                r.close()

    def process(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """Denoise one 10 ms frame at 48 kHz.

        Args:
            frame: 480 float32 samples on the int16 scale ([-32768, 32767]),
                C-contiguous.

        Returns:
            ``(denoised, voice_probability)``: a new float32 array of 480 samples,
            delayed by :attr:`delay_48k`, and RNNoise's VAD estimate in [0, 1].

        Raises:
            ValueError: wrong dtype, layout or length.
            NativeClosedError: the denoiser is closed.
        """
        st = self._st
        if st is None:
            raise self._closed()
        if not (isinstance(frame, np.ndarray) and frame.dtype == _F32 and frame.flags.c_contiguous):
            raise bad_pcm(frame, _F32, "Denoiser.process")
        if frame.shape != (FRAME_48K,):
            raise ValueError(
                f"Denoiser.process: expected {FRAME_48K} samples (10 ms at 48 kHz), "
                f"got shape {frame.shape}"
            )
        out = np.empty(FRAME_48K, dtype=_F32)
        from_buffer = self._ffi.from_buffer
        vad = self._rn.rnnoise_process_frame(
            st, from_buffer(self._f32, out, require_writable=True), from_buffer(self._f32, frame)
        )
        return out, float(vad)

    def process_16k(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """Denoise one 20 ms frame at 16 kHz (resampled to 48 kHz and back in C).

        Args:
            frame: 320 int16 samples, C-contiguous.

        Returns:
            ``(denoised, voice_probability)``: a new int16 array of 320 samples,
            delayed by :attr:`delay_16k`, and the larger of the two 10 ms VAD
            estimates, in [0, 1].

        Raises:
            ValueError: wrong dtype, layout or length.
            NativeClosedError: the denoiser is closed.
        """
        st = self._st
        if st is None:
            raise self._closed()
        if not (isinstance(frame, np.ndarray) and frame.dtype == _I16 and frame.flags.c_contiguous):
            raise bad_pcm(frame, _I16, "Denoiser.process_16k")
        if frame.shape != (FRAME_16K,):
            raise ValueError(
                f"Denoiser.process_16k: expected {FRAME_16K} samples (20 ms at 16 kHz), "
                f"got shape {frame.shape}"
            )
        if self._up is None or self._down is None:
            self._up, self._down = Resampler("up"), Resampler("down")
        dsp_lib, from_buffer = _dsp.lib, _dsp.ffi.from_buffer
        buf, process = self._buf, self._rn.rnnoise_process_frame
        dsp_lib.vg_resampler_process(
            self._up._ptr, from_buffer(frame), dsp_lib.VG_S16, FRAME_16K, buf, dsp_lib.VG_F32
        )
        # In place: rnnoise_process_frame reads all of `in` before writing `out`.
        vad = max(process(st, buf, buf), process(st, self._buf_hi, self._buf_hi))
        out = np.empty(FRAME_16K, dtype=_I16)
        dsp_lib.vg_resampler_process(
            self._down._ptr,
            buf,
            dsp_lib.VG_F32,
            2 * FRAME_48K,
            from_buffer(out, require_writable=True),
            dsp_lib.VG_S16,
        )
        return out, float(vad)
