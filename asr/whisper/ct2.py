"""Read a CTranslate2 ``model.bin`` (binary version 6) without copying the weights.

Layout (little-endian; a *string* is a ``uint16`` byte length, then that many bytes
ending in NUL):

* ``uint32`` binary version (6), string spec name (``WhisperSpec``), ``uint32`` revision;
* ``uint32`` variable count, then per variable: string name, ``uint8`` rank,
  ``uint32[rank]`` shape, ``uint8`` dtype, ``uint32`` byte count, the raw bytes;
* ``uint32`` alias count, then per alias: string alias, string target name.

The data offsets are not aligned (many fp16 tensors start at odd offsets), so the arrays
handed out are unaligned read-only views on the memory map; ``float32()`` makes an
aligned copy for the exporter.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asr.whisper.model import ModelDims

SUPPORTED_BINARY_VERSION = 6

# CTranslate2's DataType enum. bf16 has no numpy dtype: its raw bits come out as uint16.
CT2_DTYPES: dict[int, tuple[str, np.dtype]] = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),
}

N_VOCAB_MULTILINGUAL = 51865  # Whisper's multilingual vocabulary; English-only has 51864


class Ct2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands."""


@dataclass(frozen=True)
class Variable:
    """One stored tensor: where its bytes are and how to read them."""

    name: str
    shape: tuple[int, ...]
    ct2_dtype: int
    offset: int  # byte offset of the data in the file
    nbytes: int

    @property
    def dtype_name(self) -> str:
        return CT2_DTYPES[self.ct2_dtype][0]

    @property
    def np_dtype(self) -> np.dtype:
        return CT2_DTYPES[self.ct2_dtype][1]


class Ct2Model:
    """A memory-mapped CTranslate2 model.

    Args:
        path: the ``model.bin`` file.

    Raises:
        Ct2FormatError: wrong binary version, unknown dtype, truncated or inconsistent file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mm: np.memmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.variables: dict[str, Variable] = {}
        self.aliases: dict[str, str] = {}
        self._parse()

    # -- header -------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._mm.data  # memoryview: what struct wants
        size = len(buf)
        pos = 0

        def take(fmt: str) -> tuple[int, ...]:
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise Ct2FormatError(f"{self.path}: truncated at byte {pos}")
            out = struct.unpack_from(fmt, buf, pos)
            pos += n
            return out

        def string() -> str:
            nonlocal pos
            (n,) = take("<H")
            if pos + n > size:
                raise Ct2FormatError(f"{self.path}: truncated string at byte {pos}")
            raw = bytes(buf[pos : pos + n])
            pos += n
            return raw.rstrip(b"\0").decode("utf-8")

        (self.binary_version,) = take("<I")
        if self.binary_version != SUPPORTED_BINARY_VERSION:
            raise Ct2FormatError(
                f"{self.path}: binary version {self.binary_version}, "
                f"this reader supports {SUPPORTED_BINARY_VERSION}"
            )
        self.spec = string()
        (self.revision,) = take("<I")
        (count,) = take("<I")
        for _ in range(count):
            name = string()
            (rank,) = take("<B")
            shape = take(f"<{rank}I") if rank else ()
            dtype, nbytes = take("<BI")
            if dtype not in CT2_DTYPES:
                raise Ct2FormatError(f"{self.path}: {name} has unknown dtype {dtype}")
            var = Variable(name, tuple(int(d) for d in shape), dtype, pos, nbytes)
            expect = int(np.prod(var.shape, dtype=np.int64)) * var.np_dtype.itemsize
            if expect != nbytes:
                raise Ct2FormatError(
                    f"{self.path}: {name} {var.shape} {var.dtype_name} needs {expect} bytes, "
                    f"file says {nbytes}"
                )
            if pos + nbytes > size:
                raise Ct2FormatError(f"{self.path}: {name} runs past the end of the file")
            pos += nbytes
            self.variables[name] = var
        (n_alias,) = take("<I")
        for _ in range(n_alias):
            alias = string()
            target = string()
            self.aliases[alias] = target
        for alias, target in self.aliases.items():
            if target not in self.variables:
                raise Ct2FormatError(f"{self.path}: alias {alias} -> unknown {target}")
        if pos != size:
            raise Ct2FormatError(f"{self.path}: {size - pos} trailing bytes")

    # -- access ---------------------------------------------------------------------

    def names(self) -> list[str]:
        """Stored variable names, in file order (aliases excluded)."""
        return list(self.variables)

    def resolve(self, name: str) -> str:
        """The stored name behind ``name`` (itself unless it is an alias)."""
        return self.aliases.get(name, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.resolve(name) in self.variables

    def info(self, name: str) -> Variable:
        """Shape, dtype and location of ``name`` (aliases resolved).

        Raises:
            KeyError: no such variable or alias.
        """
        try:
            return self.variables[self.resolve(name)]
        except KeyError:
            raise KeyError(f"{self.path}: no variable {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype_name(self, name: str) -> str:
        return self.info(name).dtype_name

    def array(self, name: str) -> np.ndarray:
        """A read-only, zero-copy view of ``name`` in its stored dtype (bf16 as uint16)."""
        var = self.info(name)
        flat = np.frombuffer(
            self._mm, dtype=var.np_dtype, count=var.nbytes // var.np_dtype.itemsize,
            offset=var.offset,
        )
        return flat.reshape(var.shape)

    def float32(self, name: str) -> np.ndarray:
        """An aligned float32 copy of ``name`` (fp16, bf16, fp32 and integer types)."""
        var = self.info(name)
        raw = self.array(name)
        if var.ct2_dtype == 5:
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(raw, dtype=np.float32)

    def scalar(self, name: str) -> int | float:
        """The value of a rank-0 variable (the spec's flags and head counts)."""
        var = self.info(name)
        if var.shape != ():
            raise ValueError(f"{name} is not a scalar: shape {var.shape}")
        value = self.float32(name).item() if var.ct2_dtype in (4, 5) else self.array(name).item()
        return value  # type: ignore[no-any-return]

    def layer_count(self, prefix: str) -> int:
        """Number of ``{prefix}/layer_<i>/`` blocks (``prefix`` is ``encoder``/``decoder``)."""
        pat = re.compile(rf"^{re.escape(prefix)}/layer_(\d+)/")
        idx = {int(m.group(1)) for n in self.variables if (m := pat.match(n))}
        if idx != set(range(len(idx))):
            raise Ct2FormatError(f"{self.path}: {prefix} layers are not numbered 0..n-1")
        return len(idx)

    def dims(self) -> ModelDims:
        """Whisper hyper-parameters derived from shapes and the stored head counts.

        Raises:
            Ct2FormatError: not a Whisper spec, or a flag this exporter does not implement
                (non-GELU activation, post-norm, ALiBi, scaled embeddings).
        """
        if self.spec != "WhisperSpec":
            raise Ct2FormatError(f"{self.path}: spec {self.spec!r}, expected WhisperSpec")
        expected_flags = {
            "decoder/activation": 3,  # GELU
            "decoder/pre_norm": 1,
            "decoder/scale_embeddings": 0,
            "decoder/alibi": 0,
            "decoder/start_from_zero_embedding": 0,
        }
        for flag, want in expected_flags.items():
            if flag in self and self.scalar(flag) != want:
                raise Ct2FormatError(f"{self.path}: {flag} = {self.scalar(flag)}, need {want}")
        conv1 = self.shape("encoder/conv1/weight")
        apos = self.shape("encoder/position_encodings/encodings")
        emb = self.shape("decoder/embeddings/weight")
        tpos = self.shape("decoder/position_encodings/encodings")
        return ModelDims(
            n_mels=conv1[1],
            n_audio_ctx=apos[0],
            n_audio_state=apos[1],
            n_audio_head=int(self.scalar("encoder/num_heads")),
            n_audio_layer=self.layer_count("encoder"),
            n_vocab=emb[0],
            n_text_ctx=tpos[0],
            n_text_state=emb[1],
            n_text_head=int(self.scalar("decoder/num_heads")),
            n_text_layer=self.layer_count("decoder"),
        )

    def close(self) -> None:
        """Drop the memory map (views handed out keep it alive until they go)."""
        self.__dict__.pop("_mm", None)

    def __enter__(self) -> Ct2Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_multilingual(dims: ModelDims) -> bool:
    """Whisper's rule: the multilingual vocabulary has 51865 tokens or more."""
    return dims.n_vocab >= N_VOCAB_MULTILINGUAL
