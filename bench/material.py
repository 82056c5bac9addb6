"""Long-form streaming material with ground truth, for the latency benches.

The Debian ``pocketsphinx-testdata`` recordings (five LibriVox sentences, five "cards"
phrases and "go forward ten meters", each with its transcript) are concatenated in a
session-specific shuffled order, with pauses of varied length between them, until the
stream is long enough. Because the bench builds the stream itself, it knows for every
utterance the sample where its speech starts and ends and what was said: latency can be
measured from the client's first speech sample, and WER against the whole reference.

Each clip is trimmed to its speech (frame energy, :func:`bench.common.speech_bounds`)
plus a short margin of its own room tone; the gaps are digital silence. Clips closer
than ``merge_gap_s`` form one utterance: an endpointer waiting ``ENDPOINT_SILENCE_MS``
(700 ms) cannot be expected to cut there, so a final is owed only after the run.
Everything here is pure: the same seed gives the same audio and the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SR = 16000  # samples per second
MARGIN_S = 0.1  # room tone kept on each side of a clip's speech
PAUSE_RANGE_S = (0.3, 2.5)  # silence between two clips' speech
MERGE_GAP_S = 0.8  # clips closer than this are one utterance (endpoint 700 ms + VAD slack)
TAIL_S = 4.0  # silence after the last clip, so a streaming peer can close its segment


@dataclass(frozen=True)
class Clip:
    """A recording with its transcript and the bounds of its speech (samples)."""

    name: str
    audio: np.ndarray
    text: str
    onset: int
    end: int


@dataclass(frozen=True)
class Utterance:
    """Speech the client sends without a pause an endpointer would cut at.

    ``onset``/``end`` are the first and one-past-last speech samples in the stream.
    """

    index: int
    onset: int
    end: int
    text: str

    @property
    def onset_s(self) -> float:
        return self.onset / SR

    @property
    def end_s(self) -> float:
        return self.end / SR


@dataclass(frozen=True)
class Material:
    """One session's audio (int16, 16 kHz) and its ground truth."""

    audio: np.ndarray
    utterances: tuple[Utterance, ...]
    seed: int

    @property
    def reference(self) -> str:
        return " ".join(u.text for u in self.utterances)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SR

    @property
    def speech_s(self) -> float:
        return sum(u.end - u.onset for u in self.utterances) / SR


def corpus() -> list[Clip]:
    """The LibriVox, cards and goforward recordings of pocketsphinx-testdata."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import speech_bounds
    from tests import speech

    raw = [(n, a, t) for n, a, t in speech.librivox()] + list(speech.cards())
    raw.append(("goforward", speech.goforward(), "go forward ten meters"))
    out = []
    for name, audio, text in raw:
        on, end = speech_bounds(audio)
        out.append(Clip(name, audio, text, on, end))
    return out


def plan(clips: Sequence[Clip], *, min_duration_s: float, seed: int,
         lead_s: float | None = None) -> Material:
    """Concatenate shuffled passes over ``clips`` until ``min_duration_s`` of audio.

    Args:
        clips: the recordings (each used once per pass, in a fresh order per pass).
        min_duration_s: the stream is at least this long (the tail included).
        seed: picks the orders, the pauses and (unless given) the leading silence, so
            that concurrent sessions do not speak in lockstep.
        lead_s: silence before the first clip; default 0.5-3 s from the seed.

    Returns:
        The audio and its utterances (clips closer than ``MERGE_GAP_S`` merged).

    Raises:
        ValueError: no clips, or a non-positive duration.
    """
    if not clips or min_duration_s <= 0:
        raise ValueError("need clips and a positive duration")
    rng = np.random.default_rng(seed)
    margin = int(MARGIN_S * SR)
    lead = int(SR * (lead_s if lead_s is not None else rng.uniform(0.5, 3.0)))
    parts: list[np.ndarray] = [np.zeros(max(lead - margin, 0), np.int16)]
    pos = len(parts[0])
    spans: list[tuple[int, int, str]] = []  # speech onset, end, text in the stream
    tail = int(TAIL_S * SR)
    while pos + tail < min_duration_s * SR:
        for k in rng.permutation(len(clips)):
            c = clips[int(k)]
            a, b = max(c.onset - margin, 0), min(c.end + margin, len(c.audio))
            spans.append((pos + c.onset - a, pos + c.end - a, c.text))
            parts.append(c.audio[a:b].astype(np.int16))
            pos += b - a
            pause = int(SR * rng.uniform(*PAUSE_RANGE_S))
            gap = max(pause - (b - c.end) - margin, 0)  # speech to next speech = pause
            parts.append(np.zeros(gap, np.int16))
            pos += gap
            if pos + tail >= min_duration_s * SR:
                break
    parts.append(np.zeros(tail, np.int16))
    return Material(np.concatenate(parts), merge(spans, int(MERGE_GAP_S * SR)), seed)


def merge(spans: Sequence[tuple[int, int, str]], gap: int) -> tuple[Utterance, ...]:
    """Join speech spans separated by less than ``gap`` samples into utterances."""
    out: list[Utterance] = []
    for on, end, text in spans:
        if out and on - out[-1].end < gap:
            last = out[-1]
            out[-1] = Utterance(last.index, last.onset, end, f"{last.text} {text}")
        else:
            out.append(Utterance(len(out), on, end, text))
    return tuple(out)
