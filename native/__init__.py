"""voxgate's native core: libopus, libopusenc, RNNoise and the project's own DSP, through cffi.

Every class here owns C memory: it is freed by ``close()`` (or ``with``), or at
the latest when the object is collected.  Inputs are validated in Python and
rejected with ``ValueError`` before any C code runs.
"""

from .dsp import Resampler, ResamplerBank, f32_to_s16, levels, peak, rms, s16_to_f32
from .errors import (
    NativeClosedError,
    NativeError,
    OggOpusError,
    OpusError,
    RNNoiseUnavailableError,
)
from .ogg import OggOpusMuxer
from .opus import OPUS_AUTO, OPUS_BITRATE_MAX, OpusDecoder, OpusEncoder, opus_version
from .opusenc import OggOpusWriter, opusenc_version
from .rnnoise import Denoiser

__all__ = [
    "OPUS_AUTO",
    "OPUS_BITRATE_MAX",
    "Denoiser",
    "NativeClosedError",
    "NativeError",
    "OggOpusError",
    "OggOpusMuxer",
    "OggOpusWriter",
    "OpusDecoder",
    "OpusEncoder",
    "OpusError",
    "RNNoiseUnavailableError",
    "Resampler",
    "ResamplerBank",
    "f32_to_s16",
    "levels",
    "opus_version",
    "opusenc_version",
    "peak",
    "rms",
    "s16_to_f32",
]
