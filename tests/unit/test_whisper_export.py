"""The exported ONNX graphs against the float64 numpy reference, block by block and whole.

Blocks use tiny.en with short inputs (T = 200 mel frames) to stay fast; the whole-model
checks use the cached exports (``whisper_cache``) of both checkpoints.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from asr.whisper import cache, ct2, export, mel, reference, runtime, weights
from asr.whisper.model import CrossKV
from asr.whisper.normalize import normalize_english
from tests.speech import goforward

Prepare = Callable[..., cache.PreparedModel]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def run(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), runtime.session_options(2),
                                providers=["CPUExecutionProvider"])
    return list(sess.run(None, feed))


@pytest.fixture(scope="module")
def tiny() -> ct2.Ct2Model:
    return ct2.Ct2Model(weights.model_files("tiny.en").model_bin)


@pytest.fixture(scope="module")
def tiny_ref(tiny: ct2.Ct2Model) -> reference.Reference:
    return reference.Reference(tiny)


@pytest.fixture(scope="module")
def short_mel() -> np.ndarray:
    """goforward's first 2 s as log-mel, ``[1, 80, 200]``, plus a second random row."""
    m = mel.log_mel_spectrogram(goforward()[: 200 * 160], pad_to_frames=200)
    noise = np.random.default_rng(0).uniform(-1, 1, m.shape).astype(np.float32)
    return np.stack([m, noise])


# -- blocks -------------------------------------------------------------------------


def test_conv_stem(tiny: ct2.Ct2Model, tiny_ref: reference.Reference,
                   short_mel: np.ndarray) -> None:
    (out,) = run(export.build_encoder(tiny, n_layers=0, cross=False), {"mel": short_mel})
    want = tiny_ref.conv_stem(short_mel.astype(np.float64))
    assert out.shape == (2, 100, 384)
    assert rel(out, want) < 1e-5


def test_one_encoder_layer(tiny: ct2.Ct2Model, tiny_ref: reference.Reference,
                           short_mel: np.ndarray) -> None:
    (out,) = run(export.build_encoder(tiny, n_layers=1, cross=False), {"mel": short_mel})
    want = tiny_ref.encoder_layer(tiny_ref.conv_stem(short_mel.astype(np.float64)), 0)
    assert rel(out, want) < 1e-5


def test_cross_kv(tiny: ct2.Ct2Model, tiny_ref: reference.Reference) -> None:
    enc = np.random.default_rng(1).standard_normal((2, 37, 384)).astype(np.float32)
    k, v = run(export.build_cross_kv(tiny), {"enc": enc})
    assert k.shape == v.shape == (4, 2, 6, 37, 64)  # [L, B, H, S, D/H]
    want_k, want_v = tiny_ref.cross_kv(enc.astype(np.float64))
    assert rel(runtime.cross_to_bsd(k), want_k) < 1e-5
    assert rel(runtime.cross_to_bsd(v), want_v) < 1e-5


def test_layout_helpers_round_trip() -> None:
    x = np.arange(2 * 3 * 5 * 8, dtype=np.float32).reshape(2, 3, 5, 8)
    h = runtime.cross_to_heads(x, 4)
    assert h.shape == (2, 3, 4, 5, 2)
    assert h[1, 2, 3, 4].tolist() == x[1, 2, 4, 6:8].tolist()
    np.testing.assert_array_equal(runtime.cross_to_bsd(h), x)


@pytest.fixture(scope="module")
def tiny_fp32(whisper_cache: Prepare) -> runtime.OnnxWhisper:
    return runtime.OnnxWhisper(whisper_cache("tiny.en", "fp32"))


def test_decoder_steps_with_cache(tiny_fp32: runtime.OnnxWhisper,
                                  tiny_ref: reference.Reference) -> None:
    """A 3-token prompt (P = 0, causal within it), then 1 token, then 2 tokens at once."""
    rng = np.random.default_rng(2)
    ck = rng.standard_normal((4, 2, 30, 384)) * 0.5
    cv = rng.standard_normal((4, 2, 30, 384)) * 0.5
    cross = CrossKV(runtime.cross_to_heads(ck.astype(np.float32), 6),
                    runtime.cross_to_heads(cv.astype(np.float32), 6))
    sk = np.zeros((4, 2, 0, 384))
    sv = sk
    cache_kv = None
    for tokens in ([[50257, 50362, 440], [50257, 50362, 1]], [[2068], [7]], [[11, 12], [13, 14]]):
        t = np.array(tokens, np.int64)
        logits, cache_kv = tiny_fp32.decode(t, cache_kv, cross)
        want, sk, sv = tiny_ref.decode(t, sk, sv, ck, cv)
        assert logits.shape == (2, 51864) and logits.dtype == np.float32
        assert cache_kv.k.shape == sk.shape
        assert rel(logits, want[:, -1]) < 1e-5
        assert rel(cache_kv.k, sk) < 1e-5 and rel(cache_kv.v, sv) < 1e-5
    # the same cache and cross K/V given in model.py's [L, B, S, D] layout
    logits_bsd, _ = tiny_fp32.decode(np.array([[5], [6]]), cache_kv, CrossKV(
        ck.astype(np.float32), cv.astype(np.float32)))
    logits_bnsh, _ = tiny_fp32.decode(np.array([[5], [6]]), cache_kv, cross)
    np.testing.assert_allclose(logits_bsd, logits_bnsh, rtol=0, atol=1e-4)


def test_selected_cross_is_made_contiguous_once(tiny_fp32: runtime.OnnxWhisper) -> None:
    rng = np.random.default_rng(3)
    base = CrossKV(rng.standard_normal((4, 2, 6, 20, 64)).astype(np.float32),
                   rng.standard_normal((4, 2, 6, 20, 64)).astype(np.float32))
    picked = base.select(np.array([1, 1, 0]))
    assert not picked.k.flags.c_contiguous  # numpy's answer to indexing axis 1
    tokens = np.array([[50257], [50257], [50257]])
    before = len(tiny_fp32._memo)
    first, _ = tiny_fp32.decode(tokens, None, picked)
    again, _ = tiny_fp32.decode(tokens, None, picked)
    assert len(tiny_fp32._memo) == before + 2  # k and v, converted once
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[0], first[1])
    del picked
    assert len(tiny_fp32._memo) == before  # dropped with the arrays they came from


def test_runtime_rejects_bad_shapes(tiny_fp32: runtime.OnnxWhisper) -> None:
    with pytest.raises(ValueError, match="even"):
        tiny_fp32.encode(np.zeros((1, 80, 201), np.float32))
    with pytest.raises(ValueError, match=r"in \[2, 3000\]"):
        tiny_fp32.encode(np.zeros((1, 80, 3002), np.float32))
    with pytest.raises(ValueError, match=r"\[B, 80, T\]"):
        tiny_fp32.encode(np.zeros((1, 64, 200), np.float32))
    cross = CrossKV(np.zeros((4, 1, 6, 10, 64), np.float32), np.zeros((4, 1, 6, 10, 64),
                                                                    np.float32))
    with pytest.raises(ValueError, match="batch rows"):
        tiny_fp32.decode(np.zeros((2, 1), np.int64), None, cross)
    with pytest.raises(ValueError, match="n_text_ctx"):
        tiny_fp32.decode(np.zeros((1, 449), np.int64), None, cross)


# -- whole models -------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_exported_files_check(whisper_cache: Prepare, precision: str) -> None:
    p = whisper_cache("tiny.en", precision)
    for path in (p.encoder, p.decoder):
        onnx.checker.check_model(str(path))
    assert p.manifest["export_version"] == cache.EXPORT_VERSION
    assert p.manifest["source_sha256"] == weights.pinned_sha256("tiny.en")
    assert cache.check(p.dir, "tiny.en", precision, p.files.sha256) is None


# (cross K/V, logits) relative L2 error. Measured: fp32 ~1e-6 everywhere; int8 keeps the
# encoder in fp32 (export.INT8_SCHEME), its 8-bit decoder gives logits 0.008 (tiny.en), 0.04
# int8dyn (opt-in, encoder quantized dynamically): cross K/V 0.05-0.08, logits 0.09-0.21.
_TOL = {"fp32": (1e-5, 1e-5), "int8": (1e-5, 0.08), "int8dyn": (0.12, 0.3)}


@pytest.mark.parametrize("name", ["tiny.en", "base"])
@pytest.mark.parametrize("precision", ["fp32", "int8", "int8dyn"])
def test_whole_model_matches_reference(whisper_cache: Prepare, name: str,
                                       precision: str) -> None:
    m = runtime.OnnxWhisper(whisper_cache(name, precision))
    ref = _reference(name)
    x = mel.log_mel_spectrogram(goforward()[: 240 * 160], pad_to_frames=240)[None]
    cross = m.encode(x)
    want_k, want_v = _ref_cross(name, x)
    tol_cross, tol_logits = _TOL[precision]
    assert rel(runtime.cross_to_bsd(cross.k), want_k) < tol_cross
    assert rel(runtime.cross_to_bsd(cross.v), want_v) < tol_cross
    prompt = [50258, 50259, 50359, 50363] if m.multilingual else [50257, 50362]
    tokens = np.array([[*prompt, 1037 if m.multilingual else 1514]], np.int64)
    logits, kv = m.decode(tokens, None, cross)
    # the reference decoder on the reference cross K/V: the whole chain's error
    d = m.dims
    empty = np.zeros((d.n_text_layer, 1, 0, d.n_text_state))
    want, _, _ = ref.decode(tokens, empty, empty, want_k, want_v)
    assert rel(logits, want[:, -1]) < tol_logits
    assert int(logits.argmax()) == int(want[0, -1].argmax())
    assert kv.length == tokens.shape[1]


_REFS: dict[str, reference.Reference] = {}
_REF_CROSS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _reference(name: str) -> reference.Reference:
    if name not in _REFS:
        _REFS[name] = reference.Reference(ct2.Ct2Model(weights.model_files(name).model_bin))
    return _REFS[name]


def _ref_cross(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if name not in _REF_CROSS:
        ref = _reference(name)
        _REF_CROSS[name] = ref.cross_kv(ref.encode(x))
    return _REF_CROSS[name]


# -- end to end ---------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def detokenize(ids: list[int], vocabulary: Path) -> str:
    vocab = vocabulary.read_text(encoding="utf-8").split("\n")
    table = _byte_decoder()
    return b"".join(bytes(table[ch] for ch in vocab[i]) for i in ids).decode("utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny.en", "base"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_greedy_goforward(whisper_cache: Prepare, name: str, precision: str) -> None:
    m = runtime.OnnxWhisper(whisper_cache(name, precision))
    vocab = m.model_dir / "vocabulary.txt"
    words = vocab.read_text(encoding="utf-8").split("\n")
    eot = words.index("<|endoftext|>")
    specials = (["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
                if m.multilingual else ["<|startoftranscript|>", "<|notimestamps|>"])
    cross = m.encode(mel.log_mel_spectrogram(goforward())[None])
    tokens = np.array([[words.index(s) for s in specials]], np.int64)
    kv = None
    out: list[int] = []
    for _ in range(30):
        logits, kv = m.decode(tokens, kv, cross)
        nxt = int(logits[0].argmax())
        if nxt == eot:
            break
        out.append(nxt)
        tokens = np.array([[nxt]], np.int64)
    assert normalize_english(detokenize(out, vocab)) == "go forward ten meters"


# -- cache ----------------------------------------------------------------------------


def test_cache_verifies_and_rebuilds(whisper_cache: Prepare, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    src = whisper_cache("tiny.en", "fp32")
    monkeypatch.setenv("VOXGATE_CACHE_DIR", str(tmp_path))
    d = cache.export_dir("tiny.en", "fp32", src.files.sha256)
    assert d.parent == tmp_path / "onnx"
    assert d.name == f"tiny.en-fp32-v{cache.EXPORT_VERSION}-1a5afae06a4d"
    with pytest.raises(cache.CacheError, match="no manifest"):
        cache.prepare("tiny.en", "fp32", allow_export=False)
    shutil.copytree(src.dir, d)
    assert cache.prepare("tiny.en", "fp32", allow_export=False).dir == d
    # a stale export of an older version is removed once a current one is prepared
    stale = d.parent / "tiny.en-fp32-v0-1a5afae06a4d"
    stale.mkdir()
    (stale / cache.MANIFEST).write_text("{}")
    # another onnxruntime wrote it: refused, then rebuilt in place
    manifest = json.loads((d / cache.MANIFEST).read_text())
    (d / cache.MANIFEST).write_text(json.dumps({**manifest, "onnxruntime": "0.0"}))
    with pytest.raises(cache.CacheError, match="onnxruntime"):
        cache.prepare("tiny.en", "fp32", allow_export=False)
    p = cache.prepare("tiny.en", "fp32")
    assert p.manifest["onnxruntime"] == ort.__version__
    assert not stale.exists()
    assert sorted(x.name for x in d.parent.iterdir()) == [d.name]  # no temp dirs left
    # a damaged file is caught by its sha256
    with p.decoder.open("r+b") as f:
        f.seek(1000)
        f.write(b"\0\1\2\3")
    assert "sha256" in (cache.check(d, "tiny.en", "fp32", src.files.sha256) or "")
