"""Ogg Opus streams over the system libopusenc (``native._opusenc``, cffi API mode).

:class:`OggOpusWriter` takes 16-bit PCM as numpy ``int16`` arrays and hands back
the Ogg Opus bytes as libopusenc produces them, so a caller can append them to a
file or a network stream while audio is still arriving.  libopusenc writes the
Ogg pages through a callback (Python, via ``extern "Python"``) into a buffer that
:meth:`OggOpusWriter.write` empties on each call.

libopusenc always encodes at 48 kHz: other input rates go through its own
resampler, whose delay it compensates, and the OpusHead records the input rate.
On :meth:`~OggOpusWriter.finish` it sets the end granule position so decoders
trim the padding: a stream decodes to exactly the number of samples written.
Not thread-safe: one instance belongs to one session.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import numpy as np

from ._opusenc import ffi, lib
from ._resource import _I16, Owned, bad_pcm
from .errors import OggOpusError

__all__ = [
    "BITRATE_MAX",
    "BITRATE_MIN",
    "FRAME_MS",
    "SAMPLE_RATES",
    "OggOpusWriter",
    "OpusSignal",
    "opusenc_version",
]

OpusSignal = Literal["auto", "voice", "music"]

#: Input rates accepted, in Hz (the rates Opus itself knows).
SAMPLE_RATES: Final = (8000, 12000, 16000, 24000, 48000)
#: Bitrate limits libopus honours, in bit/s.
BITRATE_MIN: Final = 500
BITRATE_MAX: Final = 512_000
#: Opus frame durations libopusenc can be asked for, in ms.
FRAME_MS: Final = (10, 20, 40, 60)
#: Range of ``max_page_ms``, in ms of audio.
PAGE_MS_MIN, PAGE_MS_MAX = 20, 10_000

_SIGNALS: Final[dict[str, int]] = {
    "auto": lib.OPUS_AUTO,
    "voice": lib.OPUS_SIGNAL_VOICE,
    "music": lib.OPUS_SIGNAL_MUSIC,
}
# Widest Opus band an input rate can fill (half the rate).  Capping the encoder
# there keeps it from spending bits, and CPU, on bands the input cannot have:
# 16 kHz input resampled to 48 kHz would otherwise be coded as fullband.
_MAX_BANDWIDTH: Final[dict[int, int]] = {
    8000: lib.OPUS_BANDWIDTH_NARROWBAND,
    12000: lib.OPUS_BANDWIDTH_MEDIUMBAND,
    16000: lib.OPUS_BANDWIDTH_WIDEBAND,
    24000: lib.OPUS_BANDWIDTH_SUPERWIDEBAND,
    48000: lib.OPUS_BANDWIDTH_FULLBAND,
}
_FRAME_SIZES: Final[dict[int, int]] = {
    10: lib.OPUS_FRAMESIZE_10_MS,
    20: lib.OPUS_FRAMESIZE_20_MS,
    40: lib.OPUS_FRAMESIZE_40_MS,
    60: lib.OPUS_FRAMESIZE_60_MS,
}
_OPUS_RATE: Final = 48000  # libopusenc's internal rate; its delays are counted in it
_INT_MAX: Final = 2**31 - 1
_I16_ARRAY: Final = ffi.typeof("opus_int16[]")
# Mapping family 0: mono or stereo, no channel mapping table.
_FAMILY_MONO_STEREO: Final = 0

# Bound once: attribute lookups on ``lib`` show up in per-frame profiles.
_write = lib.ope_encoder_write


@ffi.def_extern(error=1)  # type: ignore[untyped-decorator]
def vg_ope_write(user_data: Any, ptr: Any, length: int) -> int:
    """libopusenc's write callback: append one Ogg page to the writer's buffer.

    Returns 0 (success); an exception makes cffi return 1, which libopusenc turns
    into ``OPE_WRITE_FAIL`` on the call that was writing.
    """
    sink: bytearray = ffi.from_handle(user_data)
    sink += ffi.buffer(ptr, length)
    return 0


# Copied by libopusenc at creation, so one module-wide table serves every writer.
_CALLBACKS: Final = ffi.new(
    "OpusEncCallbacks *", {"write": lib.vg_ope_write, "close": lib.vg_ope_close}
)


def opusenc_version() -> str:
    """The libopusenc version string, e.g. ``"libopusenc 0.2.1"``.

    Returns:
        The string libopusenc reports about itself.
    """
    return str(ffi.string(lib.ope_get_version_string()).decode())


def _error(code: int, context: str) -> OggOpusError:
    return OggOpusError(code, ffi.string(lib.ope_strerror(code)).decode(), context)


def _check_range(name: str, value: int, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _check_comments(comments: dict[str, str] | None) -> dict[str, str]:
    if comments is None:
        return {}
    if not isinstance(comments, dict):
        raise ValueError(f"comments must be a dict of str to str, got {type(comments).__name__}")
    for tag, value in comments.items():
        if not isinstance(tag, str) or not isinstance(value, str):
            raise ValueError(f"comment {tag!r}: tag and value must be str")
        # Vorbis comment field names: printable ASCII 0x20..0x7D except '='.
        if not tag or "=" in tag or not all(" " <= c <= "}" for c in tag):
            raise ValueError(f"comment tag {tag!r}: must be non-empty printable ASCII without '='")
        if "\0" in tag + value:
            raise ValueError(f"comment {tag!r}: NUL characters are not allowed")
    return comments


class OggOpusWriter(Owned):
    """One Ogg Opus stream (``ope_encoder_create_callbacks``), written as it is encoded.

    Pages leave as soon as they are complete: each holds at most ``max_page_ms``
    of audio, and the encoder looks no further ahead than libopus needs (no
    libopusenc decision delay, whose default would hold audio back 2 s).

    Args:
        sample_rate: input rate in Hz, one of :data:`SAMPLE_RATES`; the encoder's
            bandwidth is capped at what that rate can carry.
        channels: 1 or 2 (interleaved when 2).
        bitrate: target in bit/s for the whole stream, 500..512000.
        complexity: libopus effort, 0 (fastest) .. 10 (best).
        vbr: variable bitrate (libopus' default) rather than CBR.
        signal: hint for libopus' SILK/CELT choice: ``"voice"``, ``"music"`` or
            ``"auto"``.  Below complexity 7 libopus (1.3) does not analyse the
            signal, and ``"auto"`` codes 24 kbit/s mono speech as music (CELT).
        frame_ms: Opus frame duration, one of :data:`FRAME_MS`.  Longer frames
            cost less CPU per second of audio: libopusenc makes several libopus
            calls per frame, whatever its length.
        max_page_ms: longest stretch of audio an Ogg page holds before it is
            written, in ms (20..10000).  Shorter means bytes leave sooner, at
            27 bytes of page header each time.
        comments: Vorbis comments for the OpusTags header (tag -> value); the
            vendor string there names libopus and libopusenc.

    Raises:
        ValueError: an argument is out of range.
        OggOpusError: libopusenc refused to create or configure the encoder.
    """

    _owned = ("_enc",)
    _ffi = ffi

    def __init__(
        self,
        sample_rate: int = 16000,
        channels: int = 1,
        *,
        bitrate: int = 24000,
        complexity: int = 5,
        vbr: bool = True,
        signal: OpusSignal = "auto",
        frame_ms: int = 20,
        max_page_ms: int = 1000,
        comments: dict[str, str] | None = None,
    ) -> None:
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {SAMPLE_RATES} Hz, got {sample_rate!r}")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels!r}")
        _check_range("bitrate", bitrate, BITRATE_MIN, BITRATE_MAX)
        _check_range("complexity", complexity, 0, 10)
        if signal not in _SIGNALS:
            raise ValueError(f"signal must be one of {sorted(_SIGNALS)}, got {signal!r}")
        if frame_ms not in _FRAME_SIZES or isinstance(frame_ms, bool):
            raise ValueError(f"frame_ms must be one of {FRAME_MS}, got {frame_ms!r}")
        _check_range("max_page_ms", max_page_ms, PAGE_MS_MIN, PAGE_MS_MAX)
        tags = _check_comments(comments)
        self.sample_rate = sample_rate
        self.channels = channels
        self._finished = False
        self._frames = 0  # samples per channel written
        # libopusenc writes pages into this buffer through vg_ope_write; the handle
        # points at the buffer, not at self, so no reference cycle keeps self alive.
        self._sink = bytearray()
        self._handle = ffi.new_handle(self._sink)
        self._val = ffi.new("opus_int32 *")

        cm = lib.ope_comments_create()
        if cm == ffi.NULL:
            raise MemoryError("ope_comments_create")
        cm = ffi.gc(cm, lib.ope_comments_destroy)
        try:
            for tag, value in tags.items():
                rc = lib.ope_comments_add(cm, tag.encode("ascii"), value.encode("utf-8"))
                if rc != lib.OPE_OK:
                    raise _error(rc, f"ope_comments_add({tag!r})")
            err = ffi.new("int *")
            enc = lib.ope_encoder_create_callbacks(
                _CALLBACKS, self._handle, cm, sample_rate, channels, _FAMILY_MONO_STEREO, err
            )
        finally:
            ffi.release(cm)  # the encoder keeps its own copy of the comments
        if enc == ffi.NULL or err[0] != lib.OPE_OK:
            raise _error(err[0], "ope_encoder_create_callbacks")
        self._enc: Any = ffi.gc(enc, lib.ope_encoder_destroy)
        for fn, setting, what in (
            (lib.vg_ope_set_bitrate, bitrate, "set bitrate"),
            (lib.vg_ope_set_complexity, complexity, "set complexity"),
            (lib.vg_ope_set_vbr, int(bool(vbr)), "set vbr"),
            (lib.vg_ope_set_signal, _SIGNALS[signal], "set signal"),
            (lib.vg_ope_set_frame_duration, _FRAME_SIZES[frame_ms], "set frame duration"),
            (lib.vg_ope_set_max_bandwidth, _MAX_BANDWIDTH[sample_rate], "set max bandwidth"),
            # The decision delay only lets libopus' signal analysis (complexity >= 7)
            # look ahead; libopusenc's default, 2 s, holds every page back that long.
            (lib.vg_ope_set_decision_delay, 0, "set decision delay"),
            (lib.vg_ope_set_muxing_delay, _OPUS_RATE * max_page_ms // 1000, "set muxing delay"),
            # The header is streamed and never rewritten: no room for later tags.
            (lib.vg_ope_set_comment_padding, 0, "set comment padding"),
        ):
            rc = fn(enc, setting)
            if rc != lib.OPE_OK:
                self.close()
                raise _error(rc, what)

    # -- hot path --------------------------------------------------------------

    def write(self, pcm: np.ndarray) -> bytes:
        """Encode more audio, of any length.

        Args:
            pcm: C-contiguous ``int16`` samples, interleaved if stereo (a whole
                number of frames: ``size`` a multiple of ``channels``).

        Returns:
            The Ogg bytes completed by this call, often empty: a page leaves once
            it is full or holds ``max_page_ms`` of audio.  The first call also
            returns the two header pages.

        Raises:
            ValueError: wrong type, dtype, layout or length.
            NativeClosedError: the writer is closed.
            OggOpusError: the stream is finished (``OPE_TOO_LATE``), or libopusenc
                failed.
        """
        enc = self._enc
        if enc is None:
            raise self._closed()
        if not isinstance(pcm, np.ndarray) or pcm.dtype != _I16 or not pcm.flags.c_contiguous:
            raise bad_pcm(pcm, _I16, "pcm")
        if self._finished:
            # libopusenc frees the stream on drain and does not check for writes after.
            raise _error(lib.OPE_TOO_LATE, "write after finish")
        frames = pcm.size // self.channels
        if frames * self.channels != pcm.size or frames > _INT_MAX:
            raise ValueError(
                f"pcm: {pcm.size} samples is not a whole number of {self.channels}-channel "
                "frames (or is more than 2**31 - 1 frames)"
            )
        if frames:
            rc = _write(enc, ffi.from_buffer(_I16_ARRAY, pcm), frames)
            if rc != lib.OPE_OK:
                raise _error(rc, "ope_encoder_write")
            self._frames += frames
        return self._take()

    def finish(self) -> bytes:
        """End the stream: encode what is buffered and write the last pages.

        The last page's granule position tells decoders where the audio ends, so
        the stream decodes to exactly the samples written.  Idempotent: later
        calls return ``b""``.

        With no samples written there is no audio to end the stream with
        (libopusenc 0.2.1 aborts the process if asked to), so the stream is only
        its two header pages, which decoders report as empty or malformed.

        Returns:
            The remaining Ogg bytes (the header pages too, if nothing was written).

        Raises:
            NativeClosedError: the writer was closed before it was finished.
            OggOpusError: libopusenc failed.
        """
        if self._finished:
            return b""
        enc = self._enc
        if enc is None:
            raise self._closed()
        self._finished = True
        if self._frames:
            rc = lib.ope_encoder_drain(enc)
            what = "ope_encoder_drain"
        else:
            rc = lib.ope_encoder_flush_header(enc)
            what = "ope_encoder_flush_header"
        if rc != lib.OPE_OK:
            raise _error(rc, what)
        return self._take()

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` has run."""
        return self._finished

    # -- settings ----------------------------------------------------------------

    def _get(self, fn: Any, what: str) -> int:
        enc = self._enc
        if enc is None:
            raise self._closed()
        rc = fn(enc, self._val)
        if rc != lib.OPE_OK:
            raise _error(rc, what)
        return int(self._val[0])

    @property
    def complexity(self) -> int:
        """libopus effort, 0..10, as libopus holds it."""
        return self._get(lib.vg_ope_get_complexity, "get complexity")

    # -- internals ---------------------------------------------------------------

    def _take(self) -> bytes:
        sink = self._sink
        if not sink:
            return b""
        out = bytes(sink)
        sink.clear()
        return out
