"""Build Whisper's ONNX graphs from the ct2 weights with ``onnx.helper`` (no torch).

Two graphs per checkpoint (letters as in ``model.py``):

* **encoder**: ``mel [B, n_mels, T]`` -> ``cross_k, cross_v [L, B, H, S, D/H]``. The conv
  stem, the transformer blocks and the final LayerNorm, then every decoder layer's
  cross-attention K/V projection, so the decoder never recomputes them.
* **decoder**: ``tokens [B, N]`` int64, ``self_k, self_v [L, B, P, D]`` (``P`` may be 0),
  ``cross_k_<i>, cross_v_<i> [B, H, S, D/H]`` for each layer ``i`` -> ``logits [B, n_vocab]``
  of the last position and ``new_self_k, new_self_v [L, B, P + N, D]``. Positions
  ``P .. P+N-1`` come from the cache's shape; the new tokens attend causally among
  themselves.

Why cross K/V are split into heads (``[B, H, S, D/H]``, "BNSH") and fed per layer: at batch 8
the decoder step is dominated by memory traffic over the ~300 MB of cross K/V (base).
One stacked ``[L, B, S, D]`` input costs a per-layer slice copy inside the graph, and the
``[B, S, D]`` layout makes ``MultiHeadAttention`` transpose K and V into heads on every
step; measured on 2 cores, base, B=8: 134 ms stacked, 100 ms per layer, 53 ms per layer in
BNSH (B=1: 37 / 24 / 20 ms, medians with a busy neighbour). The runtime passes the layer
slices of the encoder output as zero-copy views.

Attention uses ``com.microsoft.MultiHeadAttention`` (QKV projections stay plain MatMuls so
that weight quantization reaches them). ``com.microsoft.Attention`` with the fused QKV
weight inside (``build_encoder(fused_attention=True)``) cost the same process CPU time for
the base encoder at T=3000 (1.56 s each, measured under load), so it is not the default.
LayerNorm is ``LayerNormalization`` (opset 17),
GELU is ``com.microsoft.Gelu`` (exact erf form, as Whisper and ct2's activation 3).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from asr.whisper.ct2 import Ct2Model
from asr.whisper.model import ModelDims

OPSET = 17
MS_DOMAIN = "com.microsoft"
LN_EPS = 1e-5
MASK_NEG = -1e9  # additive mask for future positions (finite: avoids inf - inf)


class _Graph:
    """A tiny helper to emit nodes with unique names and keep initializers."""

    def __init__(self, model: Ct2Model) -> None:
        self.model = model
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple[Any, ...], str] = {}
        self._n = 0

    def _fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, name: str, arr: np.ndarray) -> str:
        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        # (not ascontiguousarray: it turns 0-d scalars into 1-d arrays)
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))
        return name

    def weight(self, name: str, transpose: bool = False) -> str:
        """The ct2 variable ``name`` as a float32 initializer (``[in, out]`` if transposed)."""
        arr = self.model.float32(name)
        if transpose:
            arr = arr.T
        return self.init(name.replace("/", ".") + (".T" if transpose else ""), arr)

    def i64(self, values: Sequence[int] | int) -> str:
        key = ("i64", values if isinstance(values, int) else tuple(values))
        if key not in self._consts:
            arr = np.array(values, dtype=np.int64)
            self._consts[key] = self.init(self._fresh("const_i64"), arr)
        return self._consts[key]

    def f32(self, value: float) -> str:
        key = ("f32", value)
        if key not in self._consts:
            self._consts[key] = self.init(self._fresh("const_f32"), np.array(value, np.float32))
        return self._consts[key]

    def op(
        self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "",
        hint: str | None = None, **attrs: Any,
    ) -> str:
        outs = self.ops(op_type, inputs, n_out, domain, hint, **attrs)
        return outs[0]

    def ops(
        self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "",
        hint: str | None = None, **attrs: Any,
    ) -> list[str]:
        base = self._fresh(hint or op_type)
        outs = [f"{base}_out{i}" if n_out > 1 else base for i in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=base, domain=domain or None,
                             **attrs)
        )
        return outs

    def rename_output(self, tensor: str, name: str) -> None:
        """Give the last producer of ``tensor`` the graph-output name ``name``."""
        for node in reversed(self.nodes):
            if tensor in node.output:
                node.output[list(node.output).index(tensor)] = name
                return
        raise KeyError(tensor)

    # -- layers ---------------------------------------------------------------------

    def linear(self, x: str, prefix: str, bias: bool = True) -> str:
        y = self.op("MatMul", [x, self.weight(prefix + "/weight", transpose=True)])
        if bias:
            y = self.op("Add", [y, self.weight(prefix + "/bias")])
        return y

    def layer_norm(self, x: str, prefix: str) -> str:
        return self.op(
            "LayerNormalization",
            [x, self.weight(prefix + "/gamma"), self.weight(prefix + "/beta")],
            axis=-1, epsilon=LN_EPS,
        )

    def gelu(self, x: str) -> str:
        return self.op("Gelu", [x], domain=MS_DOMAIN)

    def ffn(self, x: str, prefix: str) -> str:
        h = self.layer_norm(x, prefix + "/layer_norm")
        h = self.gelu(self.linear(h, prefix + "/linear_0"))
        return self.op("Add", [x, self.linear(h, prefix + "/linear_1")])

    def mha(self, q: str, k: str, v: str, n_head: int, attn_bias: str = "") -> str:
        inputs = [q, k, v, "", "", attn_bias] if attn_bias else [q, k, v]
        return self.op("MultiHeadAttention", inputs, domain=MS_DOMAIN, num_heads=n_head)

    def split3(self, qkv: str, d: int) -> list[str]:
        return self.ops("Split", [qkv, self.i64([d, d, d])], n_out=3, axis=-1)

    def heads(self, x: str, n_head: int, d: int) -> str:
        """``[B, S, D]`` -> ``[B, H, S, D/H]``."""
        x = self.op("Reshape", [x, self.i64([0, 0, n_head, d // n_head])])
        return self.op("Transpose", [x], perm=[0, 2, 1, 3])

    def stack(self, tensors: Sequence[str]) -> str:
        """``[...]`` x L -> ``[L, ...]``."""
        ax = self.i64([0])
        return self.op("Concat", [self.op("Unsqueeze", [t, ax]) for t in tensors], axis=0)


def _model(g: _Graph, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           name: str) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="voxgate",
    )
    model.ir_version = 8  # what onnxruntime >= 1.14 reads
    return model


def _f32(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def build_encoder(model: Ct2Model, n_layers: int | None = None, cross: bool = True,
                  fused_attention: bool = False) -> onnx.ModelProto:
    """The encoder graph: ``mel [B, n_mels, T]`` -> ``cross_k, cross_v [L, B, H, S, D/H]``.

    Args:
        model: the opened ct2 weights.
        n_layers: build only the first ``n_layers`` blocks (tests); the final LayerNorm
            is applied only when all blocks are built.
        cross: compute the cross K/V (else output the encoder states ``enc [B, S, D]``).
        fused_attention: use ``com.microsoft.Attention`` with the fused QKV weight inside
            (else a MatMul for QKV and ``MultiHeadAttention``).
    """
    dims = model.dims()
    g = _Graph(model)
    layers = dims.n_audio_layer if n_layers is None else n_layers
    x = g.op("Conv", ["mel", g.weight("encoder/conv1/weight"), g.weight("encoder/conv1/bias")],
             kernel_shape=[3], pads=[1, 1])
    x = g.gelu(x)
    x = g.op("Conv", [x, g.weight("encoder/conv2/weight"), g.weight("encoder/conv2/bias")],
             kernel_shape=[3], pads=[1, 1], strides=[2])
    x = g.gelu(x)
    x = g.op("Transpose", [x], perm=[0, 2, 1])  # [B, S, D]
    s_len = g.op("Shape", [x], start=1, end=2)
    pos = g.op("Slice", [g.weight("encoder/position_encodings/encodings"), g.i64([0]), s_len,
                         g.i64([0])])
    x = g.op("Add", [x, pos])
    d = dims.n_audio_state
    for i in range(layers):
        p = f"encoder/layer_{i}"
        h = g.layer_norm(x, p + "/self_attention/layer_norm")
        if fused_attention:
            qkv = p + "/self_attention/linear_0"
            a = g.op("Attention", [h, g.weight(qkv + "/weight", transpose=True),
                                   g.weight(qkv + "/bias")],
                     domain=MS_DOMAIN, num_heads=dims.n_audio_head)
        else:
            q, k, v = g.split3(g.linear(h, p + "/self_attention/linear_0"), d)
            a = g.mha(q, k, v, dims.n_audio_head)
        x = g.op("Add", [x, g.linear(a, p + "/self_attention/linear_1")])
        x = g.ffn(x, p + "/ffn")
    if layers == dims.n_audio_layer:
        x = g.layer_norm(x, "encoder/layer_norm")
    mel = _f32("mel", ["batch", dims.n_mels, "frames"])
    if not cross:
        g.rename_output(x, "enc")
        return _model(g, [mel], [_f32("enc", ["batch", "enc_frames", d])], "whisper_encoder")
    ks, vs = _cross_kv(g, x, dims)
    g.rename_output(g.stack(ks), "cross_k")
    g.rename_output(g.stack(vs), "cross_v")
    return _model(g, [mel], [_f32("cross_k", _cross_shape(dims)),
                             _f32("cross_v", _cross_shape(dims))], "whisper_encoder")


def _cross_shape(dims: ModelDims) -> list[int | str]:
    return [dims.n_text_layer, "batch", dims.n_text_head, "enc_frames",
            dims.n_text_state // dims.n_text_head]


def _cross_kv(g: _Graph, enc: str, dims: ModelDims) -> tuple[list[str], list[str]]:
    d = dims.n_text_state
    ks, vs = [], []
    for i in range(dims.n_text_layer):
        p = f"decoder/layer_{i}/attention/linear_1"
        w = g.model.float32(p + "/weight")
        b = g.model.float32(p + "/bias")
        if np.any(b[:d]):
            raise ValueError(f"{p}/bias: expected a zero K bias")
        k = g.op("MatMul", [enc, g.init(p.replace("/", ".") + ".k.T", w[:d].T)])
        v = g.op("MatMul", [enc, g.init(p.replace("/", ".") + ".v.T", w[d:].T)])
        v = g.op("Add", [v, g.init(p.replace("/", ".") + ".v.bias", b[d:])])
        ks.append(g.heads(k, dims.n_text_head, d))
        vs.append(g.heads(v, dims.n_text_head, d))
    return ks, vs


def build_cross_kv(model: Ct2Model) -> onnx.ModelProto:
    """Cross K/V alone: ``enc [B, S, D]`` -> ``cross_k, cross_v [L, B, H, S, D/H]`` (tests)."""
    dims = model.dims()
    g = _Graph(model)
    ks, vs = _cross_kv(g, "enc", dims)
    g.rename_output(g.stack(ks), "cross_k")
    g.rename_output(g.stack(vs), "cross_v")
    return _model(g, [_f32("enc", ["batch", "enc_frames", dims.n_audio_state])],
                  [_f32("cross_k", _cross_shape(dims)), _f32("cross_v", _cross_shape(dims))],
                  "whisper_cross_kv")


def build_decoder(model: Ct2Model, projection: str = "gemm") -> onnx.ModelProto:
    """The decoder graph with self-attention cache (see the module docstring).

    Args:
        model: the opened ct2 weights.
        projection: ``"gemm"`` ties the output projection to the embedding initializer
            (``Gemm`` with ``transB``, one fp32 copy); ``"matmul"`` stores the transposed
            embedding for a plain ``MatMul`` that weight quantizers recognise, and keeps
            the lookup table in fp16 (the stored precision) to halve its size.
    """
    if projection not in ("gemm", "matmul"):
        raise ValueError(f"projection must be 'gemm' or 'matmul', not {projection!r}")
    dims = model.dims()
    g = _Graph(model)
    d, nh, n_layers = dims.n_text_state, dims.n_text_head, dims.n_text_layer
    emb_name = "decoder/embeddings/weight"
    if projection == "gemm":
        emb = g.weight(emb_name)
        x = g.op("Gather", [emb, "tokens"])
    else:
        emb16 = g.init("decoder.embeddings.weight.f16", model.array(emb_name).astype(np.float16))
        x = g.op("Cast", [g.op("Gather", [emb16, "tokens"])], to=TensorProto.FLOAT)
    past = g.op("Shape", ["self_k"], start=2, end=3)  # [1]: P
    n_new = g.op("Shape", ["tokens"], start=1, end=2)  # [1]: N
    total = g.op("Add", [past, n_new])
    pos = g.op("Slice", [g.weight("decoder/position_encodings/encodings"), past, total,
                         g.i64([0])])
    x = g.op("Add", [x, pos])
    # additive causal mask [1, 1, N, P+N]: new token i sees cache and new tokens <= P+i
    zero = g.i64(0)
    one = g.i64(1)
    past_s = g.op("Squeeze", [past, g.i64([0])])
    total_s = g.op("Squeeze", [total, g.i64([0])])
    rows = g.op("Unsqueeze", [g.op("Range", [past_s, total_s, one]), g.i64([1])])
    cols = g.op("Range", [zero, total_s, one])
    future = g.op("Greater", [cols, rows])
    mask = g.op("Where", [future, g.f32(MASK_NEG), g.f32(0.0)])
    mask = g.op("Unsqueeze", [mask, g.i64([0, 1])])

    self_ks, self_vs = [], []
    for i in range(n_layers):
        p = f"decoder/layer_{i}"
        li = g.i64(i)
        h = g.layer_norm(x, p + "/self_attention/layer_norm")
        q, k, v = g.split3(g.linear(h, p + "/self_attention/linear_0"), d)
        k = g.op("Concat", [g.op("Gather", ["self_k", li], axis=0), k], axis=1)
        v = g.op("Concat", [g.op("Gather", ["self_v", li], axis=0), v], axis=1)
        self_ks.append(k)
        self_vs.append(v)
        a = g.mha(q, k, v, nh, attn_bias=mask)
        x = g.op("Add", [x, g.linear(a, p + "/self_attention/linear_1")])
        h = g.layer_norm(x, p + "/attention/layer_norm")
        q = g.linear(h, p + "/attention/linear_0")
        a = g.mha(q, f"cross_k_{i}", f"cross_v_{i}", nh)
        x = g.op("Add", [x, g.linear(a, p + "/attention/linear_2")])
        x = g.ffn(x, p + "/ffn")
    last = g.op("Sub", [n_new, one])
    x = g.op("Squeeze", [g.op("Gather", [x, last], axis=1), g.i64([1])])  # [B, D]
    x = g.layer_norm(x, "decoder/layer_norm")
    if projection == "gemm":
        logits = g.op("Gemm", [x, emb], transB=1)
    else:
        emb_t = g.init("decoder.projection.weight.T", model.float32(emb_name).T)
        logits = g.op("MatMul", [x, emb_t])
    g.rename_output(logits, "logits")
    g.rename_output(g.stack(self_ks), "new_self_k")
    g.rename_output(g.stack(self_vs), "new_self_v")
    cache_in: list[int | str] = [n_layers, "batch", "past", d]
    cache_out: list[int | str] = [n_layers, "batch", "total", d]
    inputs = [
        helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "n_new"]),
        _f32("self_k", cache_in), _f32("self_v", cache_in),
    ]
    per_layer = _cross_shape(dims)[1:]
    inputs += [_f32(f"cross_{kv}_{i}", per_layer) for i in range(n_layers) for kv in "kv"]
    outputs = [_f32("logits", ["batch", dims.n_vocab]), _f32("new_self_k", cache_out),
               _f32("new_self_v", cache_out)]
    return _model(g, inputs, outputs, "whisper_decoder")


PRECISIONS = ("fp32", "int8", "int8dyn")
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
NBITS_BLOCK = 32  # MatMulNBits block size along K (elements per scale)
NBITS_ACCURACY_LEVEL = 4  # int8 activations, quantized blockwise at run time
INT8_SCHEME = (
    f"decoder: MatMulNBits bits=8 symmetric block={NBITS_BLOCK} "
    f"accuracy_level={NBITS_ACCURACY_LEVEL} on every MatMul with a constant weight (incl. the "
    "tied output projection); encoder: fp32"
)


def quantize_nbits(model: onnx.ModelProto, block_size: int = NBITS_BLOCK,
                   accuracy_level: int = NBITS_ACCURACY_LEVEL) -> onnx.ModelProto:
    """Every MatMul with a constant weight -> ``MatMulNBits`` with 8-bit symmetric weights."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # it logs a line per node at INFO; keep an export quiet
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
        q.process()
    finally:
        log.setLevel(level)
    out: onnx.ModelProto = q.model.model
    return out


INT8DYN_SCHEME = (
    "int8 decoder; encoder: quantize_dynamic (QInt8 weights, one uint8 activation scale per "
    "tensor) on self-attention QKV/output and ffn/linear_0 of layers 1..n-1; layer 0, "
    "ffn/linear_1, the cross K/V projections and the conv stem in fp32"
)
_DYN_MATMUL = re.compile(
    r"^encoder\.layer_([1-9][0-9]*)\.(self_attention\.linear_[01]|ffn\.linear_0)\.weight\.T$"
)


def quantize_encoder_dynamic(enc: onnx.ModelProto, out_path: Path) -> None:
    """Write ``enc`` with the ``INT8DYN_SCHEME`` MatMuls dynamically quantized to ``out_path``.

    The excluded MatMuls are where per-tensor activation scales cost most accuracy
    (measured, base: cross K/V error 16 % with only ``ffn/linear_1`` excluded, 3-6 % with
    this selection, vs 3.8 % for 8-bit ``MatMulNBits``).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    chosen = [n.name for n in enc.graph.node
              if n.op_type == "MatMul" and any(_DYN_MATMUL.match(i) for i in n.input)]
    logging.disable(logging.WARNING)  # it nags about pre-processing on the root logger
    try:
        quantize_dynamic(enc, out_path, weight_type=QuantType.QInt8, nodes_to_quantize=chosen,
                         op_types_to_quantize=["MatMul"],
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    finally:
        logging.disable(logging.NOTSET)


def export(model: Ct2Model, precision: str, out_dir: Path) -> dict[str, Path]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` for ``precision`` into ``out_dir``.

    ``"int8"`` quantizes the decoder only (``INT8_SCHEME``); ``"int8dyn"`` also quantizes
    most encoder MatMuls dynamically (``INT8DYN_SCHEME``), an opt-in trade of accuracy and
    batch-independence for encoder speed, for the WER/RTF bench to judge. Measured on the
    target machine (2 cores, AMD EPYC with AVX2 but no VNNI/AVX-512; base; 11 clips of
    pocketsphinx-testdata, greedy, 30 s padding), against the fp32 graphs:

    * ``MatMulNBits`` 8-bit, block 32, ``accuracy_level=4`` (activations quantized per
      32-element block at run time): cross K/V relative error 3.8 %, logits 4-6 %; greedy
      tokens identical on 11/11 clips with both graphs quantized. Block 128: 2 of 6
      combinations flipped a word. ``accuracy_level=0`` (fp32 compute): 20x slower.
    * ``quantize_dynamic`` (one activation scale per tensor), ``ffn/linear_1`` kept fp32
      as the notes advise: cross K/V error 16 %, one word changed on 11 clips; error
      concentrates in layer 0 and the cross K/V projections (keeping those fp32 too, the
      ``int8dyn`` selection: 3-6 %, greedy tokens identical on 10/11, same word errors).
      A per-tensor scale also spans the whole batch, so one utterance's result depends on
      what it is batched with: not acceptable as the default of a batching server.
    * Speed, as process CPU time (both threads; the machine was shared, so wall times were
      unreliable; idle wall time is a little over half of it). Decoder step, base, P=24:
      8-bit weights win where the step is memory-bound, B=1 11.4 ms vs 19.7 ms fp32,
      B=8 68 vs 78 ms (there cross-attention over ~300 MB of K/V dominates). Encoder,
      base, T=3000 (M = 1500 rows, compute-bound): ``MatMulNBits`` is ~30 % *slower* than
      fp32 SGEMM on this AVX2-only CPU (2.0-2.1 s vs 1.56 s); ``int8dyn`` saves ~12 %
      (1.37 s). So the default int8 keeps the encoder fp32: exact, batch-independent, and
      faster than the 8-bit kernels.

    Raises:
        ValueError: unknown precision.
        onnx.checker.ValidationError: a graph does not check (a bug here).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"encoder": out_dir / ENCODER_FILE, "decoder": out_dir / DECODER_FILE}
    enc = build_encoder(model)
    dec = build_decoder(model, projection="gemm" if precision == "fp32" else "matmul")
    if precision in ("int8", "int8dyn"):
        dec = quantize_nbits(dec)
    onnx.checker.check_model(dec)
    onnx.save_model(dec, paths["decoder"])
    onnx.checker.check_model(enc)
    if precision == "int8dyn":
        quantize_encoder_dynamic(enc, paths["encoder"])
        onnx.checker.check_model(str(paths["encoder"]))
    else:
        onnx.save_model(enc, paths["encoder"])
    return paths
