"""Opus encoder and decoder over the system libopus (``native._opus``, cffi API mode).

Both wrappers take and return 16-bit PCM as numpy ``int16`` arrays, interleaved
when stereo.  Neither is thread-safe: one instance belongs to one session.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import numpy as np

from ._opus import ffi, lib
from ._resource import _I16, Owned, bad_pcm
from .errors import OpusError

__all__ = [
    "MAX_PACKET_BYTES",
    "OPUS_AUTO",
    "OPUS_BITRATE_MAX",
    "SAMPLE_RATES",
    "OpusApplication",
    "OpusDecoder",
    "OpusEncoder",
    "opus_version",
]

OpusApplication = Literal["voip", "audio", "restricted_lowdelay"]

#: Sample rates libopus accepts, in Hz.
SAMPLE_RATES: Final = (8000, 12000, 16000, 24000, 48000)
#: Let libopus pick the bitrate from the rate and channel count.
OPUS_AUTO: Final[int] = lib.OPUS_AUTO
#: As many bits as the packet size allows.
OPUS_BITRATE_MAX: Final[int] = lib.OPUS_BITRATE_MAX
#: Bitrate limits libopus honours, in bit/s.
BITRATE_MIN: Final = 500
BITRATE_MAX: Final = 512_000
#: Encoder output buffer, in bytes: one MTU.  libopus fits each packet into it,
#: which caps the instant bitrate (600 kbit/s at 20 ms, above BITRATE_MAX).
MAX_PACKET_BYTES: Final = 1500
#: Longest Opus packet (120 ms) in milliseconds.
MAX_FRAME_MS: Final = 120

_APPLICATIONS: Final[dict[str, int]] = {
    "voip": lib.OPUS_APPLICATION_VOIP,
    "audio": lib.OPUS_APPLICATION_AUDIO,
    "restricted_lowdelay": lib.OPUS_APPLICATION_RESTRICTED_LOWDELAY,
}
_APPLICATION_NAMES: Final = {v: k for k, v in _APPLICATIONS.items()}
# Frame durations an encoder accepts, in tenths of a millisecond (2.5 ms .. 120 ms).
_FRAME_TENTHS_MS: Final = (25, 50, 100, 200, 400, 600, 800, 1000, 1200)
_I16_ARRAY: Final = ffi.typeof("opus_int16[]")

# Bound once: attribute lookups on ``lib`` show up in per-frame profiles.
_encode = lib.opus_encode
_decode = lib.opus_decode


def opus_version() -> str:
    """The libopus version string, e.g. ``"libopus 1.3.1"``.

    Returns:
        The string libopus reports about itself.
    """
    return str(ffi.string(lib.opus_get_version_string()).decode())


def _error(code: int, context: str) -> OpusError:
    return OpusError(code, ffi.string(lib.opus_strerror(code)).decode(), context)


def _check_format(sample_rate: int, channels: int) -> None:
    if sample_rate not in SAMPLE_RATES:
        raise ValueError(f"sample_rate must be one of {SAMPLE_RATES} Hz, got {sample_rate!r}")
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels!r}")


def _check_range(name: str, value: int, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


class OpusEncoder(Owned):
    """One Opus encoder (``opus_encoder_create``).

    Args:
        sample_rate: input rate in Hz, one of :data:`SAMPLE_RATES`.
        channels: 1 or 2.
        application: ``"voip"`` (speech), ``"audio"`` or ``"restricted_lowdelay"``;
            fixed for the encoder's lifetime.
        bitrate: bit/s in 500..512000, :data:`OPUS_AUTO` or :data:`OPUS_BITRATE_MAX`;
            ``None`` keeps the libopus default.
        vbr: variable bitrate (the libopus default).
        vbr_constraint: constrained VBR (libopus default True); ``None`` keeps it.
        complexity: 0..10; ``None`` keeps the libopus default (9 in 1.3).
        packet_loss_perc: expected loss in percent, 0..100.  In-band FEC is only
            spent when this is above 0.
        inband_fec: add low-bitrate redundancy of the previous frame (SILK modes).
        dtx: discontinuous transmission: silent frames become 1-2 byte packets.

    Raises:
        ValueError: an argument is out of range.
        OpusError: libopus refused to create the encoder.
    """

    _owned = ("_st",)
    _ffi = ffi

    def __init__(
        self,
        sample_rate: int = 16000,
        channels: int = 1,
        application: OpusApplication = "voip",
        *,
        bitrate: int | None = None,
        vbr: bool = True,
        vbr_constraint: bool | None = None,
        complexity: int | None = None,
        packet_loss_perc: int = 0,
        inband_fec: bool = False,
        dtx: bool = False,
    ) -> None:
        _check_format(sample_rate, channels)
        if application not in _APPLICATIONS:
            raise ValueError(
                f"application must be one of {sorted(_APPLICATIONS)}, got {application!r}"
            )
        self.sample_rate = sample_rate
        self.channels = channels
        #: Samples per channel in each accepted frame (2.5 to 120 ms).
        self.frame_sizes: frozenset[int] = frozenset(
            sample_rate * t // 10_000 for t in _FRAME_TENTHS_MS
        )
        self._err = ffi.new("int *")
        self._val = ffi.new("opus_int32 *")
        self._out = ffi.new("unsigned char[]", MAX_PACKET_BYTES)
        st = lib.opus_encoder_create(sample_rate, channels, _APPLICATIONS[application], self._err)
        if st == ffi.NULL or self._err[0] != lib.OPUS_OK:
            raise _error(self._err[0], "opus_encoder_create")
        self._st: Any = ffi.gc(st, lib.opus_encoder_destroy)
        if bitrate is not None:
            self.bitrate = bitrate
        self.vbr = vbr
        if vbr_constraint is not None:
            self.vbr_constraint = vbr_constraint
        if complexity is not None:
            self.complexity = complexity
        self.packet_loss_perc = packet_loss_perc
        self.inband_fec = inband_fec
        self.dtx = dtx

    # -- hot path --------------------------------------------------------------

    def encode(self, pcm: np.ndarray) -> bytes:
        """Encode one frame.

        Args:
            pcm: C-contiguous ``int16`` samples, interleaved if stereo, of a length
                in :attr:`frame_sizes` (times ``channels``).

        Returns:
            The Opus packet.  With DTX on, 1-2 byte packets mark silence and need
            not be sent.

        Raises:
            ValueError: wrong dtype, layout or frame length.
            NativeClosedError: the encoder is closed.
            OpusError: libopus failed.
        """
        st = self._st
        if st is None:
            raise self._closed()
        if not isinstance(pcm, np.ndarray) or pcm.dtype != _I16 or not pcm.flags.c_contiguous:
            raise bad_pcm(pcm, _I16, "pcm")
        frame = pcm.size // self.channels
        if frame not in self.frame_sizes or pcm.size != frame * self.channels:
            raise ValueError(
                f"frame of {pcm.size} samples: expected {self.channels} channel(s) x one of "
                f"{sorted(self.frame_sizes)} samples (2.5..120 ms at {self.sample_rate} Hz)"
            )
        n = _encode(st, ffi.from_buffer(_I16_ARRAY, pcm), frame, self._out, MAX_PACKET_BYTES)
        if n < 0:
            raise _error(n, "opus_encode")
        return ffi.buffer(self._out, n)[:]  # type: ignore[no-any-return]

    # -- settings ----------------------------------------------------------------

    def _get(self, fn: Any, what: str) -> int:
        st = self._st
        if st is None:
            raise self._closed()
        rc = fn(st, self._val)
        if rc != lib.OPUS_OK:
            raise _error(rc, what)
        return int(self._val[0])

    def _set(self, fn: Any, value: int, what: str) -> None:
        st = self._st
        if st is None:
            raise self._closed()
        rc = fn(st, value)
        if rc != lib.OPUS_OK:
            raise _error(rc, what)

    @property
    def bitrate(self) -> int:
        """Target bitrate in bit/s (the resolved value when set to :data:`OPUS_AUTO`)."""
        return self._get(lib.vg_opus_enc_get_bitrate, "get bitrate")

    @bitrate.setter
    def bitrate(self, value: int) -> None:
        if value not in (OPUS_AUTO, OPUS_BITRATE_MAX):
            _check_range("bitrate", value, BITRATE_MIN, BITRATE_MAX)
        self._set(lib.vg_opus_enc_set_bitrate, value, "set bitrate")

    @property
    def vbr(self) -> bool:
        """Variable bitrate on (True) or CBR (False)."""
        return bool(self._get(lib.vg_opus_enc_get_vbr, "get vbr"))

    @vbr.setter
    def vbr(self, value: bool) -> None:
        self._set(lib.vg_opus_enc_set_vbr, int(bool(value)), "set vbr")

    @property
    def vbr_constraint(self) -> bool:
        """Constrained VBR: bounded buffering delay at some cost in quality."""
        return bool(self._get(lib.vg_opus_enc_get_vbr_constraint, "get vbr_constraint"))

    @vbr_constraint.setter
    def vbr_constraint(self, value: bool) -> None:
        self._set(lib.vg_opus_enc_set_vbr_constraint, int(bool(value)), "set vbr_constraint")

    @property
    def complexity(self) -> int:
        """Encoder effort, 0 (fastest) .. 10 (best)."""
        return self._get(lib.vg_opus_enc_get_complexity, "get complexity")

    @complexity.setter
    def complexity(self, value: int) -> None:
        _check_range("complexity", value, 0, 10)
        self._set(lib.vg_opus_enc_set_complexity, value, "set complexity")

    @property
    def packet_loss_perc(self) -> int:
        """Expected packet loss in percent; steers how much FEC the encoder adds."""
        return self._get(lib.vg_opus_enc_get_packet_loss_perc, "get packet_loss_perc")

    @packet_loss_perc.setter
    def packet_loss_perc(self, value: int) -> None:
        _check_range("packet_loss_perc", value, 0, 100)
        self._set(lib.vg_opus_enc_set_packet_loss_perc, value, "set packet_loss_perc")

    @property
    def inband_fec(self) -> bool:
        """In-band forward error correction (LBRR) on."""
        return bool(self._get(lib.vg_opus_enc_get_inband_fec, "get inband_fec"))

    @inband_fec.setter
    def inband_fec(self, value: bool) -> None:
        self._set(lib.vg_opus_enc_set_inband_fec, int(bool(value)), "set inband_fec")

    @property
    def dtx(self) -> bool:
        """Discontinuous transmission on."""
        return bool(self._get(lib.vg_opus_enc_get_dtx, "get dtx"))

    @dtx.setter
    def dtx(self, value: bool) -> None:
        self._set(lib.vg_opus_enc_set_dtx, int(bool(value)), "set dtx")

    @property
    def application(self) -> OpusApplication:
        """The application chosen at creation."""
        code = self._get(lib.vg_opus_enc_get_application, "get application")
        return _APPLICATION_NAMES[code]  # type: ignore[return-value]

    @property
    def lookahead(self) -> int:
        """Encoder delay in samples at :attr:`sample_rate`: decoded audio lags input by this."""
        return self._get(lib.vg_opus_enc_get_lookahead, "get lookahead")

    def reset(self) -> None:
        """Forget all history, as if freshly created (settings are kept).

        Raises:
            NativeClosedError: the encoder is closed.
            OpusError: libopus failed.
        """
        st = self._st
        if st is None:
            raise self._closed()
        rc = lib.vg_opus_enc_reset(st)
        if rc != lib.OPUS_OK:
            raise _error(rc, "reset")


class OpusDecoder(Owned):
    """One Opus decoder (``opus_decoder_create``) with loss concealment and FEC.

    Args:
        sample_rate: output rate in Hz, one of :data:`SAMPLE_RATES`.
        channels: 1 or 2.

    Raises:
        ValueError: an argument is out of range.
        OpusError: libopus refused to create the decoder.
    """

    _owned = ("_st",)
    _ffi = ffi

    def __init__(self, sample_rate: int = 16000, channels: int = 1) -> None:
        _check_format(sample_rate, channels)
        self.sample_rate = sample_rate
        self.channels = channels
        self._max_frame = sample_rate * MAX_FRAME_MS // 1000
        # Concealment needs a duration before any packet has told us one.
        self._last_frame = sample_rate // 50
        self._err = ffi.new("int *")
        self._pcm = ffi.new("opus_int16[]", self._max_frame * channels)
        st = lib.opus_decoder_create(sample_rate, channels, self._err)
        if st == ffi.NULL or self._err[0] != lib.OPUS_OK:
            raise _error(self._err[0], "opus_decoder_create")
        self._st: Any = ffi.gc(st, lib.opus_decoder_destroy)

    def decode(
        self,
        packet: bytes | bytearray | memoryview | None,
        *,
        fec: bool = False,
        frame_samples: int | None = None,
    ) -> np.ndarray:
        """Decode one packet, conceal a lost one, or recover a lost one from FEC.

        * ``decode(packet)``: the packet's audio.
        * ``decode(None)``: packet-loss concealment for one lost packet.
        * ``decode(next_packet, fec=True)``: the *lost* packet rebuilt from the
          redundancy carried in the packet after it (plain concealment if that
          packet has none).  Then call ``decode(next_packet)`` as usual.

        Args:
            packet: one Opus packet, or ``None`` for a lost one.
            fec: recover the packet before *packet* from its in-band FEC.
            frame_samples: for ``None`` or ``fec=True``, samples per channel to
                produce; libopus needs the exact duration of the gap, a multiple
                of 2.5 ms.  Defaults to the duration of the last packet decoded.

        Returns:
            ``int16`` samples, interleaved if stereo (a new array).

        Raises:
            ValueError: an empty packet, ``fec`` without a packet, or a bad
                ``frame_samples``.
            NativeClosedError: the decoder is closed.
            OpusError: libopus rejected the packet (e.g. ``OPUS_INVALID_PACKET``).
        """
        st = self._st
        if st is None:
            raise self._closed()
        if packet is None or fec:
            if packet is None and fec:
                raise ValueError("fec=True needs the packet that follows the lost one")
            if frame_samples is None:
                frame = self._last_frame
            else:
                step = self.sample_rate // 400
                if (
                    isinstance(frame_samples, bool)
                    or not isinstance(frame_samples, int)
                    or not 0 < frame_samples <= self._max_frame
                    or frame_samples % step
                ):
                    raise ValueError(
                        f"frame_samples must be a multiple of {step} (2.5 ms) up to "
                        f"{self._max_frame}, got {frame_samples!r}"
                    )
                frame = frame_samples
        else:
            frame = self._max_frame
        if packet is None:
            n = _decode(st, ffi.NULL, 0, self._pcm, frame, 0)
        else:
            if len(packet) == 0:
                raise ValueError("empty packet: pass None for a lost packet")
            n = _decode(st, ffi.from_buffer(packet), len(packet), self._pcm, frame, int(fec))
        if n < 0:
            raise _error(n, "opus_decode")
        if packet is not None and not fec:
            self._last_frame = n
        return np.frombuffer(ffi.buffer(self._pcm, n * self.channels * 2), dtype=_I16).copy()

    def reset(self) -> None:
        """Forget all history, as after a stream restart.

        Raises:
            NativeClosedError: the decoder is closed.
            OpusError: libopus failed.
        """
        st = self._st
        if st is None:
            raise self._closed()
        rc = lib.vg_opus_dec_reset(st)
        if rc != lib.OPUS_OK:
            raise _error(rc, "reset")
