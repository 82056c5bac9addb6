"""``voxgate transcribe``: one audio file to one transcript with a packaged model."""

from __future__ import annotations

import os

from asr.whisper.audio import read_audio_file
from asr.whisper.engine import Transcript, get_engine
from asr.whisper.search import FallbackPolicy


def transcribe_file(
    path: str | os.PathLike[str],
    model: str = "base",
    beam: int = 1,
    *,
    language: str | None = None,
    prompt: str | None = None,
    precision: str = "int8",
    threads: int = 2,
) -> Transcript:
    """Transcribe an audio file with a packaged model (what ``voxgate transcribe`` runs).

    Args:
        path: WAV (any PCM rate/channels) or headerless 16 kHz PCM16 ``.raw``.
        model: ``"base"`` or ``"tiny.en"``.
        beam: beam width (1 = greedy).
        language: language code, or None to detect.
        prompt: initial prompt / hotwords.
        precision: ``"int8"`` or ``"fp32"``.
        threads: onnxruntime intra-op threads.

    Returns:
        The transcript; ``.to_dict()`` is JSON-serialisable (language, timings, RTF).
    """
    audio = read_audio_file(path)
    engine = get_engine(model, precision, threads)
    # Whisper's own temperature fallback, as the reference transcribe does: a file has
    # no partials to hide a looping window behind.
    return engine.transcribe(audio, language=language, beam_size=beam, prompt=prompt,
                             fallback=FallbackPolicy())
