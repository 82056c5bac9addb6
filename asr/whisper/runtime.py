"""Run the exported Whisper graphs with onnxruntime: ``OnnxWhisper`` implements ``WhisperModel``.

Sessions use ``threads`` intra-op threads, no inter-op parallelism, full graph
optimisation, and ``session.intra_op.allow_spinning = 0``: the gateway shares its cores,
and spinning threads doubled batch-1 latency when the CPU was oversubscribed.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from asr.whisper import cache
from asr.whisper.ct2 import N_VOCAB_MULTILINGUAL
from asr.whisper.model import CrossKV, ModelDims, SelfKV


@dataclass(frozen=True)
class RuntimeStatistics:
    """Counters of one loaded model (read by the metrics layer)."""

    encode_calls: int
    encode_frames: int  # mel frames encoded, summed over batch rows
    encode_s: float
    decode_calls: int
    decode_tokens: int  # tokens fed, summed over batch rows
    decode_s: float


def session_options(threads: int) -> ort.SessionOptions:
    """The options both sessions use (see the module docstring)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OnnxWhisper:
    """A Whisper checkpoint loaded into two onnxruntime sessions.

    Args:
        prepared: a cached export (``cache.prepare``).
        threads: intra-op threads per session.

    Thread safety: ``encode`` and ``decode`` may be called from several threads at once
    (onnxruntime sessions are); the statistics counters are best-effort then.
    """

    def __init__(self, prepared: cache.PreparedModel, threads: int = 2) -> None:
        from asr.whisper.ct2 import Ct2Model

        self.name: str = prepared.name
        self.precision: str = prepared.precision
        self.model_dir: Path = prepared.files.dir
        with Ct2Model(prepared.files.model_bin) as ct:
            self.dims: ModelDims = ct.dims()  # header only: no weights are read
        self.multilingual: bool = self.dims.n_vocab >= N_VOCAB_MULTILINGUAL
        self.threads = threads
        so = session_options(threads)
        providers = ["CPUExecutionProvider"]
        self._enc = ort.InferenceSession(os.fspath(prepared.encoder), so, providers=providers)
        self._dec = ort.InferenceSession(os.fspath(prepared.decoder), so, providers=providers)
        self._stats = [0, 0, 0.0, 0, 0, 0.0]
        # id(source array) -> (weak ref to it, its contiguous [L, B, H, S, D/H] float32 copy)
        self._memo: dict[int, tuple[weakref.ref[np.ndarray], np.ndarray]] = {}
        self._memo_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OnnxWhisper({self.name!r}, {self.precision!r}, threads={self.threads})"

    def encode(self, mel: np.ndarray) -> CrossKV:
        """Encode float32 log-mel ``[B, n_mels, T]`` into cross-attention K/V.

        The arrays are ``[L, B, H, S, D/H]`` (split into heads; see ``export.py`` for why),
        not the ``[L, B, S, D]`` of ``model.py``'s docstring: batch is still axis 1, so
        ``CrossKV.select`` and ``k.shape[1]`` work unchanged. :func:`cross_to_bsd` gives
        the documented layout.

        Raises:
            ValueError: wrong rank, mel count, odd ``T`` or ``T > 2 * n_audio_ctx``.
        """
        mel = np.ascontiguousarray(mel, dtype=np.float32)
        d = self.dims
        if mel.ndim != 3 or mel.shape[1] != d.n_mels or mel.shape[0] < 1:
            raise ValueError(f"mel must be [B, {d.n_mels}, T], got {mel.shape}")
        t = mel.shape[2]
        if t < 2 or t % 2 or t > 2 * d.n_audio_ctx:
            raise ValueError(f"mel frames T={t}: must be even and in [2, {2 * d.n_audio_ctx}]")
        t0 = time.perf_counter()
        k, v = self._enc.run(None, {"mel": mel})
        st = self._stats
        st[0] += 1
        st[1] += mel.shape[0] * t
        st[2] += time.perf_counter() - t0
        return CrossKV(k, v)

    def decode(
        self, tokens: np.ndarray, cache: SelfKV | None, cross: CrossKV
    ) -> tuple[np.ndarray, SelfKV]:
        """Run the decoder on int64 ``tokens [B, N]`` after the ``P`` cached tokens.

        Returns:
            Float32 logits of the last position ``[B, n_vocab]`` and the cache grown to
            ``P + N``.

        Raises:
            ValueError: shapes disagree, ``N == 0``, or ``P + N > n_text_ctx``.
        """
        d = self.dims
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be [B, N] with N >= 1, got {tokens.shape}")
        b, n = tokens.shape
        ck, cv = self._cross_heads(cross, b)
        if cache is None:
            empty = np.zeros((d.n_text_layer, b, 0, d.n_text_state), np.float32)
            self_k, self_v = empty, empty
        else:
            self_k, self_v = cache.k, cache.v
            if self_k.shape[:2] != (d.n_text_layer, b) or self_v.shape != self_k.shape:
                raise ValueError(f"self K/V {self_k.shape} do not fit tokens {tokens.shape}")
        if self_k.shape[2] + n > d.n_text_ctx:
            raise ValueError(
                f"{self_k.shape[2]} cached + {n} new tokens exceed n_text_ctx={d.n_text_ctx}"
            )
        t0 = time.perf_counter()
        logits, new_k, new_v = self._dec.run(
            None,
            {
                "tokens": tokens,
                "self_k": np.ascontiguousarray(self_k, dtype=np.float32),
                "self_v": np.ascontiguousarray(self_v, dtype=np.float32),
                **{f"cross_k_{i}": ck[i] for i in range(d.n_text_layer)},
                **{f"cross_v_{i}": cv[i] for i in range(d.n_text_layer)},
            },
        )
        st = self._stats
        st[3] += 1
        st[4] += b * n
        st[5] += time.perf_counter() - t0
        return logits, SelfKV(new_k, new_v)

    def _cross_heads(self, cross: CrossKV, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Cross K/V as C-contiguous float32 ``[L, B, H, S, D/H]``.

        ``CrossKV.select`` indexes axis 1, which numpy answers with a non-contiguous array,
        and the [L, B, S, D] layout needs its heads split: both would cost a full copy of
        the cross K/V (~300 MB for base at B=8) on *every* step. The converted copy is
        therefore kept for as long as the array it came from lives.
        """
        d = self.dims
        ck, cv = self._prepared_cross(cross.k), self._prepared_cross(cross.v)
        want = (d.n_text_layer, b, d.n_text_head)
        hd = d.n_text_state // d.n_text_head
        if ck.ndim != 5 or ck.shape[:3] != want or ck.shape[4] != hd or cv.shape != ck.shape:
            raise ValueError(f"cross K/V {cross.k.shape} do not fit {b} batch rows")
        return ck, cv

    def _prepared_cross(self, a: np.ndarray) -> np.ndarray:
        if a.ndim == 5 and a.dtype == np.float32 and a.flags.c_contiguous:
            return a
        key = id(a)
        with self._memo_lock:
            hit = self._memo.get(key)
        if hit is not None and hit[0]() is a:
            return hit[1]
        if a.ndim == 4:  # the [L, B, S, D] layout of model.py's docstring: split heads
            out = cross_to_heads(np.asarray(a, np.float32), self.dims.n_text_head)
        else:
            out = np.ascontiguousarray(a, dtype=np.float32)
        memo = self._memo
        ref = weakref.ref(a, lambda _r: memo.pop(key, None))  # dropped when ``a`` dies
        with self._memo_lock:
            memo[key] = (ref, out)
        return out

    def statistics(self) -> RuntimeStatistics:
        s = self._stats
        return RuntimeStatistics(int(s[0]), int(s[1]), float(s[2]), int(s[3]), int(s[4]),
                                 float(s[5]))


def cross_to_bsd(x: np.ndarray) -> np.ndarray:
    """``[L, B, H, S, D/H]`` -> ``[L, B, S, D]`` (a copy)."""
    n_layer, b, h, s, hd = x.shape
    return np.ascontiguousarray(x.transpose(0, 1, 3, 2, 4).reshape(n_layer, b, s, h * hd))


def cross_to_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """``[L, B, S, D]`` -> ``[L, B, H, S, D/H]`` (a copy)."""
    n_layer, b, s, d = x.shape
    return np.ascontiguousarray(x.reshape(n_layer, b, s, n_head, d // n_head)
                                .transpose(0, 1, 3, 2, 4))


def load_model(
    name: str = "base",
    precision: str = "int8",
    threads: int = 2,
    override_dir: str | os.PathLike[str] | None = None,
    *,
    allow_export: bool = True,
) -> OnnxWhisper:
    """Load ``name`` at ``precision``, exporting it into the cache first if needed.

    Args:
        name: ``"base"`` or ``"tiny.en"``.
        precision: ``"int8"`` (default; see ``export.INT8_SCHEME``), ``"fp32"``, or the
            opt-in ``"int8dyn"`` (``export.INT8DYN_SCHEME``: faster encoder, less exact).
        threads: intra-op threads per onnxruntime session.
        override_dir: a weights directory instead of the packages (``weights.model_files``).
        allow_export: if False, a missing or stale cache raises ``cache.CacheError``
            instead of exporting (for servers that must start fast).

    Raises:
        ValueError: unknown name or precision, bad ``threads``.
        cache.CacheError: see ``allow_export``.
        weights.WeightsError: the weights are missing or not the pinned ones.
    """
    prepared = cache.prepare(name, precision, override_dir=override_dir,
                             allow_export=allow_export)
    return OnnxWhisper(prepared, threads=threads)
