"""Real speech for tests: Debian ``pocketsphinx-testdata`` recordings and ``espeak-ng``.

Everything returns 16 kHz mono int16 numpy arrays. Nothing here downloads.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

TESTDATA = Path("/usr/share/pocketsphinx/test/data")
SR = 16000


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: install the Debian package pocketsphinx-testdata "
            "(deploy/setup.sh does)"
        )
    return path


def read_wav(path: Path) -> np.ndarray:
    """Read a 16 kHz mono 16-bit WAV file into int16 samples."""
    with wave.open(str(_need(path)), "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SR, 1, 2):
            raise ValueError(f"{path}: expected 16 kHz mono 16-bit")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy()


def read_raw(path: Path) -> np.ndarray:
    """Read headerless 16 kHz mono PCM16 little-endian samples."""
    return np.frombuffer(_need(path).read_bytes(), dtype="<i2").copy()


def _strip_sentence_marks(text: str) -> str:
    return " ".join(w for w in text.split() if w not in ("<s>", "</s>"))


@functools.cache
def cards() -> list[tuple[str, np.ndarray, str]]:
    """The 'cards' clips with their transcripts: (name, audio, text)."""
    base = TESTDATA / "cards"
    out = []
    for line in (base / "cards.transcription").read_text().splitlines():
        if "(" not in line:
            continue
        text, _, ident = line.rpartition("(")
        name = ident.rstrip(")").strip()
        out.append((name, read_wav(base / f"{name}.wav"), _strip_sentence_marks(text)))
    return out


@functools.cache
def goforward() -> np.ndarray:
    """'go forward ten meters' (about 3.4 s)."""
    return read_raw(TESTDATA / "goforward.raw")


@functools.cache
def librivox() -> list[tuple[str, np.ndarray, str]]:
    """The LibriVox clips with their reference transcripts: (name, audio, text)."""
    base = TESTDATA / "librivox"
    refs: dict[str, str] = {}
    for line in (base / "transcription").read_text().splitlines():
        line = line.strip()
        if not line or "(" not in line:
            continue
        text, _, ident = line.rpartition("(")
        refs[ident.rstrip(")").strip()] = _strip_sentence_marks(text)
    out = []
    for wav in sorted(base.glob("*.wav")):
        out.append((wav.stem, read_wav(wav), refs.get(wav.stem, "")))
    return out


@functools.cache
def espeak(text: str, voice: str = "en", speed_wpm: int = 150) -> np.ndarray:
    """Synthesize *text* with espeak-ng and resample it to 16 kHz with sox."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        raise FileNotFoundError("espeak-ng and sox are required (deploy/setup.sh installs them)")
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed_wpm), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    raw = subprocess.run(
        ["sox", "-t", "wav", "-", "-t", "raw", "-r", str(SR), "-c", "1", "-b", "16",
         "-e", "signed-integer", "-L", "-"],
        input=wav,
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(raw, dtype="<i2").copy()
