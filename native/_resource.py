"""Lifecycle shared by the wrappers that own C resources."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import numpy as np

from .errors import NativeClosedError

_I16 = np.dtype(np.int16)
_F32 = np.dtype(np.float32)


class Owned:
    """Owns C resources: ``close()`` frees them now, ``ffi.gc`` frees them at worst later.

    Subclasses keep each owned pointer in an attribute listed in ``_owned``,
    created with ``ffi.gc(ptr, destroy)``.  ``close()`` releases them at once
    (``ffi.release`` runs the destructor) and sets them to ``None``, so any later
    use hits ``_closed()`` instead of a dangling pointer.
    """

    _owned: tuple[str, ...] = ()
    #: The FFI whose ``release`` frees the owned pointers.
    _ffi: Any = None

    def close(self) -> None:
        """Free the C resources now.  Safe to call more than once."""
        for name in self._owned:
            ptr: Any = getattr(self, name, None)
            if ptr is not None:
                setattr(self, name, None)
                self._ffi.release(ptr)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has run."""
        return all(getattr(self, name, None) is None for name in self._owned)

    def _closed(self) -> NativeClosedError:
        return NativeClosedError(f"{type(self).__name__} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def bad_pcm(x: object, dtype: np.dtype[Any], what: str) -> ValueError:
    """The error for an *x* that is not a C-contiguous numpy array of *dtype*.

    Hot paths test that inline (a helper call would cost as much as the test)
    and build the message only on failure.
    """
    if not isinstance(x, np.ndarray):
        return ValueError(f"{what}: expected a numpy {dtype} array, got {type(x).__name__}")
    if x.dtype != dtype:
        return ValueError(f"{what}: expected dtype {dtype}, got {x.dtype}")
    return ValueError(f"{what}: array must be C-contiguous (use np.ascontiguousarray)")
