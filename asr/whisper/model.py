"""The contract between the ONNX runtime (``runtime.py``) and decoding (``search.py``).

Shapes use these letters:

* ``B``: batch rows (utterances, or utterances x beams);
* ``L``: decoder layers (``dims.n_text_layer``);
* ``T``: mel frames in (even, at most ``2 * dims.n_audio_ctx`` = 3000 for 30 s);
* ``S = T // 2``: encoder frames out;
* ``D``: ``dims.n_text_state``;
* ``P``: tokens already in the self-attention cache; ``N``: tokens fed now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ModelDims:
    """Hyper-parameters of one Whisper checkpoint, read from its weights."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


@dataclass(frozen=True)
class CrossKV:
    """Cross-attention keys and values of every decoder layer, computed once per utterance.

    ``k`` and ``v`` are float32 ``[L, B, ...]``: the batch is axis 1 (``select`` and
    concatenation work on it); the layout after the batch is the runtime's (the ONNX
    runtime keeps heads split, ``[L, B, H, S, D/H]``, which makes decoder steps ~2x faster
    at batch 8; ``runtime.cross_to_bsd`` converts to ``[L, B, S, D]``).
    """

    k: np.ndarray
    v: np.ndarray

    def select(self, rows: np.ndarray) -> CrossKV:
        """Rows ``rows`` of the batch (for beams: repeat or reorder rows)."""
        return CrossKV(self.k[:, rows], self.v[:, rows])


@dataclass(frozen=True)
class SelfKV:
    """Self-attention cache of every decoder layer: float32 ``[L, B, P, D]`` each."""

    k: np.ndarray
    v: np.ndarray

    @property
    def length(self) -> int:
        return int(self.k.shape[2])

    def select(self, rows: np.ndarray) -> SelfKV:
        return SelfKV(self.k[:, rows], self.v[:, rows])


class WhisperModel(Protocol):
    """What decoding needs from a loaded model (implemented by ``runtime.OnnxWhisper``)."""

    name: str  # "base" or "tiny.en"
    dims: ModelDims
    multilingual: bool
    model_dir: Path  # holds config.json, tokenizer.json, vocabulary.txt

    def encode(self, mel: np.ndarray) -> CrossKV:
        """Encode float32 log-mel ``[B, n_mels, T]`` into cross-attention K/V.

        ``T`` is even and at most ``2 * n_audio_ctx``; the positional embedding is sliced
        to ``T // 2``.
        """
        ...

    def decode(
        self, tokens: np.ndarray, cache: SelfKV | None, cross: CrossKV
    ) -> tuple[np.ndarray, SelfKV]:
        """Run the decoder on int64 ``tokens [B, N]`` after the ``P`` cached tokens.

        Positions are ``P .. P+N-1`` (``P = 0`` when ``cache`` is None). Every row has the
        same ``N`` and ``P``.

        Returns:
            The float32 logits of the last position only, ``[B, n_vocab]``, and the cache
            grown to ``P + N``.
        """
        ...
