"""The CTranslate2 reader and the weights locator, on the packaged checkpoints."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from asr.whisper import ct2, weights
from asr.whisper.model import ModelDims


@pytest.fixture(scope="module")
def base() -> ct2.Ct2Model:
    return ct2.Ct2Model(weights.model_files("base").model_bin)


@pytest.fixture(scope="module")
def tiny() -> ct2.Ct2Model:
    return ct2.Ct2Model(weights.model_files("tiny.en").model_bin)


def test_base_header(base: ct2.Ct2Model) -> None:
    assert (base.binary_version, base.spec, base.revision) == (6, "WhisperSpec", 3)
    assert len(base.names()) == 212
    assert base.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}


@pytest.mark.parametrize(
    ("name", "shape", "dtype"),
    [
        ("encoder/conv1/weight", (512, 80, 3), "float16"),
        ("encoder/conv2/weight", (512, 512, 3), "float16"),
        ("encoder/conv2/bias", (512,), "float16"),
        ("encoder/position_encodings/encodings", (1500, 512), "float16"),
        ("encoder/layer_5/self_attention/linear_0/weight", (1536, 512), "float16"),
        ("encoder/layer_0/ffn/linear_1/weight", (512, 2048), "float16"),
        ("decoder/layer_0/attention/linear_1/weight", (1024, 512), "float16"),
        ("decoder/embeddings/weight", (51865, 512), "float16"),
        ("decoder/projection/weight", (51865, 512), "float16"),
        ("decoder/position_encodings/encodings", (448, 512), "float16"),
        ("decoder/activation", (), "int8"),
        ("decoder/num_heads", (), "int16"),
        ("decoder/alignment_layer", (), "int16"),
    ],
)
def test_base_shapes_and_dtypes(
    base: ct2.Ct2Model, name: str, shape: tuple[int, ...], dtype: str
) -> None:
    assert base.shape(name) == shape
    assert base.dtype_name(name) == dtype
    assert base.array(name).shape == shape


def test_flags(base: ct2.Ct2Model) -> None:
    assert base.scalar("decoder/activation") == 3
    assert base.scalar("decoder/pre_norm") == 1
    assert base.scalar("decoder/scale_embeddings") == 0
    assert base.scalar("encoder/num_heads") == 8
    assert base.scalar("decoder/alignment_layer") == -1


def test_arrays_are_views_and_alias_shares_bytes(base: ct2.Ct2Model) -> None:
    emb = base.array("decoder/embeddings/weight")
    proj = base.array("decoder/projection/weight")
    assert not emb.flags.owndata and not emb.flags.writeable
    assert np.shares_memory(emb, proj)
    # the K part of the fused QKV bias is zero (Whisper has no key bias)
    b = base.float32("encoder/layer_0/self_attention/linear_0/bias")
    assert np.all(b[512:1024] == 0) and np.any(b[:512] != 0)
    assert base.float32("encoder/conv1/weight").dtype == np.float32


def test_dims(base: ct2.Ct2Model, tiny: ct2.Ct2Model) -> None:
    assert base.dims() == ModelDims(80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6)
    assert tiny.dims() == ModelDims(80, 1500, 384, 6, 4, 51864, 448, 384, 6, 4)
    assert ct2.is_multilingual(base.dims()) and not ct2.is_multilingual(tiny.dims())
    assert len(tiny.names()) == 148


def _tiny_file(path: Path, version: int = 6, dtype: int = 4, nbytes: int = 4) -> Path:
    def s(x: str) -> bytes:
        b = x.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    body = struct.pack("<I", version) + s("WhisperSpec") + struct.pack("<II", 3, 1)
    body += s("w") + struct.pack("<BI", 1, 2)  # rank 1, shape (2,)
    body += struct.pack("<BI", dtype, nbytes) + np.array([1.5, -2], "<f2").tobytes()
    body += struct.pack("<I", 1) + s("v") + s("w")
    path.write_bytes(body)
    return path


def test_synthetic_file(tmp_path: Path) -> None:
    m = ct2.Ct2Model(_tiny_file(tmp_path / "m.bin"))
    assert m.names() == ["w"] and m.shape("v") == (2,)
    assert m.array("v").tolist() == [1.5, -2.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"version": 5}, "binary version 5"), ({"dtype": 9}, "unknown dtype"),
     ({"nbytes": 6}, "needs 4 bytes")],
)
def test_bad_files(tmp_path: Path, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ct2.Ct2FormatError, match=match):
        ct2.Ct2Model(_tiny_file(tmp_path / "m.bin", **kwargs))


def test_weights_override_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = weights.model_files("tiny.en")
    d = tmp_path / "tiny"
    d.mkdir()
    for f in (src.model_bin, src.config_json, src.tokenizer_json, src.vocabulary_txt):
        (d / f.name).symlink_to(f)
    monkeypatch.setenv(weights.override_env_var("tiny.en"), str(d))
    assert weights.override_env_var("tiny.en") == "VOXGATE_WHISPER_DIR_TINY_EN"
    got = weights.model_files("tiny.en")
    assert got.dir == d and got.pinned and got.sha256 == weights.pinned_sha256("tiny.en")
    # a directory with other bytes is refused unless verify=False
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (src.config_json, src.tokenizer_json, src.vocabulary_txt):
        (bad / f.name).symlink_to(f)
    (bad / "model.bin").write_bytes(b"not a model")
    with pytest.raises(weights.WeightsError, match="does not match the pin"):
        weights.model_files("tiny.en", bad)
    assert not weights.model_files("tiny.en", bad, verify=False).pinned


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="unknown Whisper model"):
        weights.model_files("large")


def test_base_join_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXGATE_CACHE_DIR", str(tmp_path))
    assert weights.cache_root() == tmp_path
    f = weights.model_files("base")
    assert f.model_bin.is_relative_to(tmp_path / "weights")
    assert f.model_bin.stat().st_size == 145_217_532
    assert [p.name for p in f.model_bin.parent.iterdir()] == ["model.bin"]  # no temp left
    assert (f.dir / "vocabulary.txt").is_file()
