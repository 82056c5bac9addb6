"""Exceptions raised by the native wrappers.

Input that the wrappers reject before calling C raises plain ``ValueError``;
these types cover what only the native side or the wrapper's lifecycle can
report.
"""

from __future__ import annotations


class NativeError(Exception):
    """Base class for errors from the native core."""


class NativeClosedError(NativeError):
    """A wrapper was used after ``close()`` released its C resource."""


class OpusError(NativeError):
    """libopus returned a negative error code.

    Attributes:
        code: the libopus error code (``OPUS_BAD_ARG`` is -1, ...).
        message: libopus' own description, from ``opus_strerror``.
    """

    def __init__(self, code: int, message: str, context: str = "") -> None:
        self.code = code
        self.message = message
        self.context = context
        prefix = f"{context}: " if context else ""
        super().__init__(f"{prefix}{message} (opus error {code})")


class OggOpusError(NativeError):
    """libopusenc returned a negative error code, or refused a call at this point.

    Attributes:
        code: the libopusenc error code (``OPE_BAD_ARG`` is -11, ``OPE_TOO_LATE``
            -31, ...; libopus' own codes come back shifted by -10).
        message: libopusenc's own description, from ``ope_strerror``.
    """

    def __init__(self, code: int, message: str, context: str = "") -> None:
        self.code = code
        self.message = message
        self.context = context
        prefix = f"{context}: " if context else ""
        super().__init__(f"{prefix}{message} (opusenc error {code})")


class RNNoiseUnavailableError(NativeError, ImportError):
    """The RNNoise shared library could not be found or loaded."""
