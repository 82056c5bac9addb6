"""RNNoise, loaded from the ``pyrnnoise`` wheel in cffi ABI mode.

Why ABI mode (``ffi.dlopen``) and not the API mode used for libopus and our own
C: the only RNNoise build we ship is ``librnnoise.so`` inside another wheel.
Linking against it at build time would need that wheel inside the PEP 517
isolated build environment and an rpath into site-packages; loading it at run
time from wherever importlib finds the package needs neither.  The cost is that
the declarations in ``rnnoise_cdef.h`` are not checked by a compiler, so the
frame size is checked here, at import.

We locate the package without importing it: ``pyrnnoise/__init__.py`` pulls in
packages (audiolab, matplotlib, ...) that are not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Final

from cffi import FFI

from .errors import RNNoiseUnavailableError

#: RNNoise's sample rate in Hz and frame length in samples (10 ms).
SAMPLE_RATE: Final = 48000
FRAME_SIZE: Final = 480

INSTALL_HINT: Final = (
    "RNNoise comes from the pyrnnoise wheel, installed without its dependencies: "
    "`pip install --no-deps pyrnnoise==0.4.5` (deploy/requirements-nodeps.txt)"
)

if sys.platform == "darwin":
    _LIBNAME = "librnnoise.dylib"
elif sys.platform == "win32":
    _LIBNAME = "rnnoise.dll"
else:
    _LIBNAME = "librnnoise.so"


def locate_library(package: str = "pyrnnoise") -> Path:
    """Path of the RNNoise shared library inside *package*, without importing it.

    Args:
        package: the top-level package that ships the library.

    Returns:
        The library's path.

    Raises:
        RNNoiseUnavailableError: the package or the library file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RNNoiseUnavailableError(f"package {package!r} is not installed. {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _LIBNAME
        if path.is_file():
            return path
    raise RNNoiseUnavailableError(
        f"{_LIBNAME} not found in {list(spec.submodule_search_locations)}. {INSTALL_HINT}"
    )


def load(path: Path) -> Any:
    """``dlopen`` RNNoise at *path* and check its frame size.

    Args:
        path: the shared library.

    Returns:
        The cffi library object.

    Raises:
        RNNoiseUnavailableError: it does not load or has an unexpected frame size.
    """
    try:
        rn = ffi.dlopen(str(path))
    except OSError as exc:
        raise RNNoiseUnavailableError(f"cannot load {path}: {exc}. {INSTALL_HINT}") from exc
    size = rn.rnnoise_get_frame_size()
    if size != FRAME_SIZE:
        raise RNNoiseUnavailableError(
            f"{path} uses {size}-sample frames; voxgate needs {FRAME_SIZE} "
            f"(10 ms at 48 kHz). {INSTALL_HINT}"
        )
    return rn


ffi = FFI()
ffi.cdef((Path(__file__).with_name("rnnoise_cdef.h")).read_text())
lib: Any = load(locate_library())
