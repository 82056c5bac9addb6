"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from asr.whisper import cache
from asr.whisper.engine import WhisperEngine


@pytest.fixture(scope="session")
def whisper_cache() -> Callable[..., cache.PreparedModel]:
    """``get(name, precision="fp32")``: the cached ONNX export, exported at most once.

    Uses the real cache (``$VOXGATE_CACHE_DIR`` or ``~/.cache/voxgate``), which
    ``voxgate models prepare`` fills during setup, so tests reuse it and a fresh checkout
    pays each export once (a few seconds per model and precision).
    """
    prepared: dict[tuple[str, str], cache.PreparedModel] = {}

    def get(name: str, precision: str = "fp32") -> cache.PreparedModel:
        key = (name, precision)
        if key not in prepared:
            prepared[key] = cache.prepare(name, precision)
        return prepared[key]

    return get


@pytest.fixture(scope="session")
def whisper_engine(
    whisper_cache: Callable[..., cache.PreparedModel],
) -> Callable[..., WhisperEngine]:
    """``get(name, precision="int8")``: a ``WhisperEngine`` on the cached export, loaded
    once per session (2 threads, as the service runs it)."""
    from asr.whisper.runtime import OnnxWhisper

    engines: dict[tuple[str, str], WhisperEngine] = {}

    def get(name: str, precision: str = "int8") -> WhisperEngine:
        key = (name, precision)
        if key not in engines:
            engines[key] = WhisperEngine(OnnxWhisper(whisper_cache(name, precision), threads=2))
        return engines[key]

    return get
