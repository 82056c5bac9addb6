"""A float64 numpy reference of Whisper's layer math, read straight from the ct2 weights.

Used by the tests to check the exported ONNX graphs block by block. It is slow (exact
``erf`` through ``math.erf``), so keep inputs short. Conventions match ``model.py``:
weights are ``[out, in]``, cross/self K and V are ``[L, B, S|P, D]`` with heads unsplit.

The math (OpenAI Whisper, pre-LN transformer):

* encoder: ``gelu(conv1(mel))`` (kernel 3, pad 1), ``gelu(conv2(.))`` (kernel 3, pad 1,
  stride 2), add the sinusoid sliced to ``T // 2``, blocks ``x += attn(ln(x));
  x += mlp(ln(x))``, final ``ln``;
* attention: fused ``Q|K|V`` projection (K bias zero), ``softmax(q k^T / sqrt(d_head)) v``,
  output projection;
* decoder: token embedding + learned positions ``P..P+N-1``, blocks with causal
  self-attention over cache + new tokens, cross-attention on the encoder output (its K/V
  from the fused ``K|V`` projection), MLP; final ``ln``; logits = ``x @ embedding^T``.
"""

from __future__ import annotations

import math

import numpy as np

from asr.whisper.ct2 import Ct2Model
from asr.whisper.model import ModelDims

LN_EPS = 1e-5  # Whisper's LayerNorm epsilon (not stored in model.bin)

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``x * (1 + erf(x / sqrt 2)) / 2``."""
    erf = np.asarray(_erf(x / math.sqrt(2.0)), dtype=np.float64)
    return np.asarray(0.5 * x * (1.0 + erf))


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return np.asarray((x - mu) / np.sqrt(var + LN_EPS) * gamma + beta)


def conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """``[B, C, T]`` -> ``[B, O, T_out]`` with kernel ``w [O, C, K]`` and padding ``K // 2``."""
    k = w.shape[2]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    t_out = (x.shape[2] + 2 * pad - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], t_out))
    for j in range(k):
        cols = xp[:, :, j : j + stride * (t_out - 1) + 1 : stride]
        out += np.einsum("oc,bct->bot", w[:, :, j], cols)
    return np.asarray(out + b[None, :, None])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return np.asarray(e / e.sum(-1, keepdims=True))


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """``q [B, N, D]``, ``k, v [B, S, D]`` -> ``[B, N, D]``; ``mask [N, S]`` is additive."""
    b, n, d = q.shape
    s = k.shape[1]
    h = d // n_head
    qh = q.reshape(b, n, n_head, h).transpose(0, 2, 1, 3)
    kh = k.reshape(b, s, n_head, h).transpose(0, 2, 1, 3)
    vh = v.reshape(b, s, n_head, h).transpose(0, 2, 1, 3)
    scores = qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(h)
    if mask is not None:
        scores = scores + mask
    out: np.ndarray = softmax(scores) @ vh
    return np.asarray(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class Reference:
    """Float64 forward passes of one checkpoint.

    Args:
        model: the opened ``model.bin``.
    """

    def __init__(self, model: Ct2Model) -> None:
        self.model = model
        self.dims: ModelDims = model.dims()
        self._cache: dict[str, np.ndarray] = {}

    def w(self, name: str) -> np.ndarray:
        """Weight ``name`` as float64 (memoised)."""
        arr = self._cache.get(name)
        if arr is None:
            arr = self.model.float32(name).astype(np.float64)
            self._cache[name] = arr
        return arr

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return np.asarray(x @ self.w(prefix + "/weight").T + self.w(prefix + "/bias"))

    def _ln(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return layer_norm(x, self.w(prefix + "/gamma"), self.w(prefix + "/beta"))

    def _ffn(self, x: np.ndarray, prefix: str) -> np.ndarray:
        h = self._ln(x, prefix + "/layer_norm")
        return self._linear(gelu(self._linear(h, prefix + "/linear_0")), prefix + "/linear_1")

    # -- encoder ------------------------------------------------------------------

    def conv_stem(self, mel: np.ndarray) -> np.ndarray:
        """``mel [B, n_mels, T]`` -> ``[B, T // 2, D]`` with positions added."""
        x = gelu(conv1d(mel, self.w("encoder/conv1/weight"), self.w("encoder/conv1/bias"), 1))
        x = gelu(conv1d(x, self.w("encoder/conv2/weight"), self.w("encoder/conv2/bias"), 2))
        x = x.transpose(0, 2, 1)
        return np.asarray(x + self.w("encoder/position_encodings/encodings")[: x.shape[1]])

    def encoder_layer(self, x: np.ndarray, i: int) -> np.ndarray:
        p = f"encoder/layer_{i}"
        d = self.dims.n_audio_state
        h = self._ln(x, p + "/self_attention/layer_norm")
        qkv = self._linear(h, p + "/self_attention/linear_0")
        a = attention(qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :], self.dims.n_audio_head)
        x = x + self._linear(a, p + "/self_attention/linear_1")
        return np.asarray(x + self._ffn(x, p + "/ffn"))

    def encode(self, mel: np.ndarray) -> np.ndarray:
        """``mel [B, n_mels, T]`` -> encoder output ``[B, T // 2, D]`` (after the final LN)."""
        x = self.conv_stem(np.asarray(mel, np.float64))
        for i in range(self.dims.n_audio_layer):
            x = self.encoder_layer(x, i)
        return self._ln(x, "encoder/layer_norm")

    def cross_kv(self, enc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Encoder output ``[B, S, D]`` -> cross K and V, each ``[L, B, S, D]``."""
        d = self.dims.n_text_state
        ks, vs = [], []
        for i in range(self.dims.n_text_layer):
            kv = self._linear(enc, f"decoder/layer_{i}/attention/linear_1")
            ks.append(kv[..., :d])
            vs.append(kv[..., d:])
        return np.stack(ks), np.stack(vs)

    # -- decoder ------------------------------------------------------------------

    def decoder_layer(
        self,
        x: np.ndarray,
        i: int,
        past_k: np.ndarray,
        past_v: np.ndarray,
        cross_k: np.ndarray,
        cross_v: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One block: ``x [B, N, D]``, ``past_k/v [B, P, D]``, ``cross_k/v [B, S, D]``.

        Returns:
            The block output and the self K/V grown to ``[B, P + N, D]``.
        """
        p = f"decoder/layer_{i}"
        d = self.dims.n_text_state
        nh = self.dims.n_text_head
        n, past = x.shape[1], past_k.shape[1]
        h = self._ln(x, p + "/self_attention/layer_norm")
        qkv = self._linear(h, p + "/self_attention/linear_0")
        k = np.concatenate([past_k, qkv[..., d : 2 * d]], axis=1)
        v = np.concatenate([past_v, qkv[..., 2 * d :]], axis=1)
        rows = np.arange(n)[:, None] + past
        cols = np.arange(past + n)[None, :]
        mask = np.where(cols > rows, -np.inf, 0.0)
        a = attention(qkv[..., :d], k, v, nh, mask)
        x = x + self._linear(a, p + "/self_attention/linear_1")
        h = self._ln(x, p + "/attention/layer_norm")
        q = self._linear(h, p + "/attention/linear_0")
        x = x + self._linear(attention(q, cross_k, cross_v, nh), p + "/attention/linear_2")
        return x + self._ffn(x, p + "/ffn"), k, v

    def decode(
        self,
        tokens: np.ndarray,
        self_k: np.ndarray,
        self_v: np.ndarray,
        cross_k: np.ndarray,
        cross_v: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits of every new position ``[B, N, V]`` and the grown caches ``[L, B, P+N, D]``."""
        past = self_k.shape[2]
        n = tokens.shape[1]
        x = self.w("decoder/embeddings/weight")[tokens]
        x = x + self.w("decoder/position_encodings/encodings")[past : past + n]
        ks, vs = [], []
        for i in range(self.dims.n_text_layer):
            x, k, v = self.decoder_layer(x, i, self_k[i], self_v[i], cross_k[i], cross_v[i])
            ks.append(k)
            vs.append(v)
        x = self._ln(x, "decoder/layer_norm")
        logits = x @ self.w("decoder/projection/weight").T
        return np.asarray(logits), np.stack(ks), np.stack(vs)
