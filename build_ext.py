"""Native extension declarations and the in-tree PEP 517 build backend.

Two roles live here, on purpose in one file:

* cffi *builders* (out-of-line API mode), one per library.  Each reads its
  ``cdef`` from a header-like file under ``native/`` and its C source from
  ``native/``; ``python build_ext.py`` compiles them in place for development.
* a PEP 517 backend (``pyproject.toml`` names this module as
  ``build-backend``) that re-exports setuptools' backend but runs
  ``setup(cffi_modules=...)`` so ``pip install .`` and ``pip install -e .``
  compile every module.  This keeps the top level free of a ``setup.py``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "native"

# cffi_modules entries: "<file>:<global FFI builder>".
CFFI_MODULES = [
    "build_ext.py:ffi_dsp",
    "build_ext.py:ffi_opus",
    "build_ext.py:ffi_opusenc",
]

_CFLAGS = ["-O3", "-std=c11", "-Wall", "-Wextra", "-fno-math-errno"]


def _read(name: str) -> str:
    return (NATIVE / name).read_text()


def _pkg_config(package: str) -> dict[str, list[str]]:
    """Compiler and linker flags for *package* from pkg-config.

    Raises:
        RuntimeError: pkg-config or the package is missing, with the fix.
    """
    try:
        cflags = subprocess.run(
            ["pkg-config", "--cflags", package], check=True, capture_output=True, text=True
        ).stdout
        libs = subprocess.run(
            ["pkg-config", "--libs", package], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        dev = package if package.startswith("lib") else f"lib{package}"
        raise RuntimeError(
            f"pkg-config could not find {package!r}; install it with "
            f"`apt-get install pkg-config {dev}-dev`"
        ) from exc
    out: dict[str, list[str]] = {"include_dirs": [], "libraries": [], "library_dirs": []}
    for flag in shlex.split(cflags):
        if flag.startswith("-I"):
            out["include_dirs"].append(flag[2:])
    for flag in shlex.split(libs):
        if flag.startswith("-l"):
            out["libraries"].append(flag[2:])
        elif flag.startswith("-L"):
            out["library_dirs"].append(flag[2:])
    return out


# --- native._dsp: the project's own C for hot loops -------------------------
# dsp.h doubles as the cdef, so it cannot include <stdint.h> itself.
ffi_dsp = FFI()
ffi_dsp.cdef(_read("dsp.h"))
ffi_dsp.set_source(
    "native._dsp",
    '#include <stdint.h>\n#include "dsp.h"',
    sources=[str(Path("native") / "dsp.c")],
    include_dirs=[str(Path("native"))],
    extra_compile_args=_CFLAGS,
    # pthread: the resampler's shared filter taps are built once (pthread_once).
    libraries=["m", "pthread"],
)

# --- native._opus: libopus (system, via pkg-config) --------------------------
ffi_opus = FFI()
ffi_opus.cdef(_read("opus_cdef.h"))
ffi_opus.set_source(
    "native._opus",
    '#include "opus_shim.h"',
    sources=[str(Path("native") / "opus_shim.c")],
    extra_compile_args=_CFLAGS,
    **{k: v + ([str(Path("native"))] if k == "include_dirs" else []) for k, v in
       _pkg_config("opus").items()},
)

# --- native._opusenc: libopusenc, Ogg Opus streams (system, via pkg-config) ------
# The write callback is Python (extern "Python" in the cdef); the shim holds the
# ctl wrappers and the no-op close callback.
ffi_opusenc = FFI()
ffi_opusenc.cdef(_read("opusenc_cdef.h"))
ffi_opusenc.set_source(
    "native._opusenc",
    '#include "opusenc_shim.h"',
    sources=[str(Path("native") / "opusenc_shim.c")],
    extra_compile_args=_CFLAGS,
    **{k: v + ([str(Path("native"))] if k == "include_dirs" else []) for k, v in
       _pkg_config("libopusenc").items()},
)


# --- PEP 517 backend ----------------------------------------------------------
from setuptools import build_meta as _build_meta  # noqa: E402


class _Backend(_build_meta._BuildMetaBackend):  # type: ignore[misc,name-defined]
    """setuptools' backend, with ``setup(cffi_modules=...)`` instead of a setup.py."""

    def run_setup(self, setup_script: str = "setup.py") -> None:
        import setuptools

        setuptools.setup(cffi_modules=CFFI_MODULES)


_BACKEND = _Backend()
get_requires_for_build_wheel = _BACKEND.get_requires_for_build_wheel
get_requires_for_build_sdist = _BACKEND.get_requires_for_build_sdist
get_requires_for_build_editable = _BACKEND.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _BACKEND.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _BACKEND.prepare_metadata_for_build_editable
build_wheel = _BACKEND.build_wheel
build_sdist = _BACKEND.build_sdist
build_editable = _BACKEND.build_editable


if __name__ == "__main__":
    # Development: compile every module in place (``python build_ext.py``).
    os.chdir(HERE)
    for spec in CFFI_MODULES:
        globals()[spec.split(":")[1]].compile(verbose=False)
