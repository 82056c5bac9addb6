"""Former home of Whisper decoding, now split by concern:

* :mod:`asr.whisper.search`: the token search (:class:`WhisperDecoder`, beams, sampling,
  :class:`DecodeOptions`, :class:`DecodeResult`, :class:`FallbackPolicy`,
  :func:`token_budget`);
* :mod:`asr.whisper.engine`: audio to transcripts (:class:`WhisperEngine`,
  :class:`Utterance`, :class:`Transcript`, :func:`get_engine`);
* :mod:`asr.whisper.audio`: sample conversion and audio files (:func:`read_audio_file`);
* :mod:`asr.whisper.transcribe`: what ``voxgate transcribe`` runs (:func:`transcribe_file`).

Nothing is defined here. The block below keeps the old import path working for the
modules that still use it; delete each line once its importer is moved, and this module
with the last one.
"""

from __future__ import annotations

# -- re-exports, kept until these importers move to the new modules ----------------------
# asr/engine.py (FallbackPolicy, Utterance, WhisperEngine);
# gateway/cli.py and bench/asr_server.py (transcribe_file);
# tests/unit/test_engine_backend.py (DecodeOptions, DecodeRequest, FallbackPolicy,
#   WhisperDecoder, WhisperEngine, token_budget);
# tests/integration/test_asr_workers.py (read_audio_file).
from asr.whisper.audio import read_audio_file
from asr.whisper.engine import Utterance, WhisperEngine
from asr.whisper.search import (
    DecodeOptions,
    DecodeRequest,
    FallbackPolicy,
    WhisperDecoder,
    token_budget,
)
from asr.whisper.transcribe import transcribe_file

__all__ = [
    "DecodeOptions",
    "DecodeRequest",
    "FallbackPolicy",
    "Utterance",
    "WhisperDecoder",
    "WhisperEngine",
    "read_audio_file",
    "token_budget",
    "transcribe_file",
]
