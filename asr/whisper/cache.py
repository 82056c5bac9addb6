"""Exported ONNX models, cached on disk in versioned directories.

Layout: ``<cache root>/onnx/<model>-<precision>-v<EXPORT_VERSION>-<sha256[:12]>/`` holding
``encoder.onnx``, ``decoder.onnx`` and ``manifest.json`` (export version, source sha256,
onnx and onnxruntime versions, sha256 of each file). The cache root is
``$VOXGATE_CACHE_DIR`` or ``~/.cache/voxgate`` (see ``weights.cache_root``).

:func:`prepare` exports when the directory is missing or its manifest does not match,
writing into a temporary sibling and renaming it into place, so a reader never sees a
half-written export and two concurrent preparers do not corrupt each other.
``python -m asr.whisper.cache [--model NAME] [--precision P]`` prepares ahead of time (what
``voxgate models prepare`` calls).

Bump ``EXPORT_VERSION`` whenever ``export.py`` changes the graphs it writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asr.whisper import weights

EXPORT_VERSION = 3
MANIFEST = "manifest.json"
DEFAULT_PRECISIONS = ("int8", "fp32")


class CacheError(RuntimeError):
    """The cached export does not match what this code would build, and may not be rebuilt."""


@dataclass(frozen=True)
class PreparedModel:
    """An export ready to load."""

    name: str
    precision: str
    dir: Path
    encoder: Path
    decoder: Path
    files: weights.ModelFiles
    manifest: dict[str, Any]


def export_dir(name: str, precision: str, source_sha256: str) -> Path:
    """Where the export of ``name`` at ``precision`` from weights ``source_sha256`` lives."""
    tag = f"{name}-{precision}-v{EXPORT_VERSION}-{source_sha256[:12]}"
    return weights.cache_root() / "onnx" / tag


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _expected_manifest(name: str, precision: str, source_sha256: str) -> dict[str, Any]:
    from asr.whisper import export

    return {
        "export_version": EXPORT_VERSION,
        "model": name,
        "precision": precision,
        "source_sha256": source_sha256,
        **_versions(),
        "files": {},
        "notes": {"int8": export.INT8_SCHEME, "int8dyn": export.INT8DYN_SCHEME}.get(precision, ""),
    }


def check(d: Path, name: str, precision: str, source_sha256: str) -> str | None:
    """Why the export in ``d`` cannot be used (``None`` if it can).

    Hashes every file (memoised per process on path, size and mtime).
    """
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as e:
        return f"unreadable manifest: {e}"
    want = _expected_manifest(name, precision, source_sha256)
    for key in ("export_version", "model", "precision", "source_sha256", "onnx", "onnxruntime"):
        if manifest.get(key) != want[key]:
            return f"manifest {key} is {manifest.get(key)!r}, expected {want[key]!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {"encoder.onnx", "decoder.onnx"}:
        return "manifest lists the wrong files"
    for fname, digest in files.items():
        path = d / fname
        if not path.is_file():
            return f"{fname} is missing"
        if weights.sha256_file(path) != digest:
            return f"{fname} does not match its sha256 in the manifest"
    return None


def prepare(
    name: str,
    precision: str = "int8",
    *,
    override_dir: str | os.PathLike[str] | None = None,
    allow_export: bool = True,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> PreparedModel:
    """Return the cached export of ``name`` at ``precision``, exporting it if needed.

    Args:
        name: ``"base"`` or ``"tiny.en"``.
        precision: ``"int8"`` or ``"fp32"``.
        override_dir: weights directory (see ``weights.model_files``).
        allow_export: if False, a missing or stale export raises instead of being rebuilt.
        force: rebuild even if the cached export is valid.
        log: called with one line per action (e.g. ``print``).

    Raises:
        CacheError: the export is missing or stale and ``allow_export`` is False, or the
            fresh export failed its own check.
        weights.WeightsError: the weights are missing or not the pinned ones.
    """
    from asr.whisper import export

    if precision not in export.PRECISIONS:
        raise ValueError(f"precision must be one of {export.PRECISIONS}, not {precision!r}")
    files = weights.model_files(name, override_dir)
    d = export_dir(name, precision, files.sha256)
    problem = "forced" if force else check(d, name, precision, files.sha256)
    if problem is not None:
        if not allow_export:
            raise CacheError(
                f"{d}: {problem}; run `voxgate models prepare` (python -m asr.whisper.cache)"
            )
        if log:
            log(f"exporting {name} {precision} -> {d} ({problem})")
        _export_atomically(d, name, precision, files, log)
        problem = check(d, name, precision, files.sha256)
        if problem is not None:
            raise CacheError(f"{d}: fresh export does not check: {problem}")
        _prune(d, name, precision, log)
    manifest = json.loads((d / MANIFEST).read_text())
    return PreparedModel(name, precision, d, d / export.ENCODER_FILE, d / export.DECODER_FILE,
                         files, manifest)


def _export_atomically(
    d: Path, name: str, precision: str, files: weights.ModelFiles,
    log: Callable[[str], None] | None,
) -> None:
    from asr.whisper import export
    from asr.whisper.ct2 import Ct2Model

    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
    try:
        t0 = time.perf_counter()
        model = Ct2Model(files.model_bin)
        paths = export.export(model, precision, tmp)
        manifest = _expected_manifest(name, precision, files.sha256)
        manifest["files"] = {p.name: weights.sha256_file(p) for p in paths.values()}
        manifest["created_unix_s"] = int(time.time())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        if d.exists():
            # stale or forced: move it aside first (rename is atomic, rmtree is not)
            old = d.parent / f".{d.name}.old.{os.getpid()}"
            os.replace(d, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, d)
        except OSError:
            # another process renamed its export into place first; keep theirs
            if check(d, name, precision, files.sha256) is not None:
                raise
        if log:
            log(f"exported {name} {precision} in {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(keep: Path, name: str, precision: str, log: Callable[[str], None] | None) -> None:
    """Delete other exports of ``name`` at ``precision`` (older export versions or weights).

    Only complete exports (with a manifest) are touched; temporary directories of a
    concurrent export are left alone. Open sessions keep working: they hold the bytes.
    """
    for other in keep.parent.glob(f"{name}-{precision}-v*"):
        if other != keep and (other / MANIFEST).is_file():
            if log:
                log(f"removing stale export {other}")
            shutil.rmtree(other, ignore_errors=True)


def prepare_all(
    names: Iterable[str] = weights.MODEL_NAMES,
    precisions: Iterable[str] = DEFAULT_PRECISIONS,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = print,
) -> list[PreparedModel]:
    """Prepare every model at every precision (``voxgate models prepare``)."""
    precisions = tuple(precisions)
    return [prepare(n, p, force=force, log=log) for n in names for p in precisions]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asr.whisper.cache",
                                 description="Export the Whisper ONNX models into the cache.")
    ap.add_argument("--model", action="append", choices=weights.MODEL_NAMES,
                    help="model to prepare (repeatable; default: all)")
    ap.add_argument("--precision", action="append", choices=("int8", "fp32", "int8dyn"),
                    help="precision (repeatable; default: int8 and fp32)")
    ap.add_argument("--force", action="store_true", help="re-export even if cached")
    args = ap.parse_args(argv)
    for p in prepare_all(args.model or weights.MODEL_NAMES,
                         args.precision or DEFAULT_PRECISIONS, force=args.force):
        print(f"{p.name} {p.precision}: {p.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
