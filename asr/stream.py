"""Per-stream recognition state on the ASR service, sans-IO.

``UtteranceAssembler`` collects the decoded PCM of the current utterance, keeps its span in
session time (from the link's ``pts_ms``), says when a partial is due (every
``partial_interval`` of new audio) and when the server-side length cap forces a final.
The shell turns its answers into scheduler jobs; nothing here waits or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
FRAME_SAMPLES = 320


@dataclass(frozen=True)
class Utterance:
    """A snapshot of one utterance: float32 audio and its span in session time."""

    index: int
    audio: np.ndarray
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class PartialDue:
    """Enough new audio arrived since the last partial: ask for one."""


@dataclass(frozen=True)
class CapReached:
    """The utterance reached the server's length cap: finalize it now."""


Action = PartialDue | CapReached


class UtteranceAssembler:
    """Args:
        partial_interval_ms: new audio between two partial requests.
        max_utterance_s: server-side cap; the shell finalizes when it is reached.
        min_partial_ms: no partial for an utterance shorter than this.
        first_partial_interval_ms: the interval until the shell says a partial of the
            utterance was shown (``partial_shown``); None: ``partial_interval_ms``.
    """

    def __init__(self, *, partial_interval_ms: int = 250, max_utterance_s: float = 30.0,
                 min_partial_ms: int = 300, first_partial_interval_ms: int | None = None
                 ) -> None:
        first = partial_interval_ms if first_partial_interval_ms is None \
            else first_partial_interval_ms
        if partial_interval_ms <= 0 or first <= 0 or max_utterance_s <= 0 \
                or min_partial_ms < 0:
            raise ValueError("intervals must be positive")
        self._interval = partial_interval_ms * SAMPLE_RATE // 1000
        self._first_interval = first * SAMPLE_RATE // 1000
        self._shown = False
        self._cap = int(max_utterance_s * SAMPLE_RATE)
        self._min_partial = min_partial_ms * SAMPLE_RATE // 1000
        self._chunks: list[np.ndarray] = []
        self._samples = 0
        self._since_partial = 0
        self._start_ms: int | None = None
        self._end_ms = 0
        self.index = 0
        self.cap_signalled = False

    @property
    def samples(self) -> int:
        return self._samples

    def add(self, pcm: np.ndarray, pts_ms: int) -> list[Action]:
        """Append decoded audio that starts at ``pts_ms`` (session time)."""
        if pcm.dtype != np.int16:
            raise ValueError("expected int16 PCM")
        if self._start_ms is None:
            self._start_ms = pts_ms
        self._end_ms = max(self._end_ms, pts_ms + len(pcm) * 1000 // SAMPLE_RATE)
        self._chunks.append(pcm)
        self._samples += len(pcm)
        self._since_partial += len(pcm)
        out: list[Action] = []
        if self._samples >= self._cap and not self.cap_signalled:
            self.cap_signalled = True
            out.append(CapReached())
        elif (self._since_partial >= (self._interval if self._shown else self._first_interval)
              and self._samples >= self._min_partial):
            out.append(PartialDue())
        return out

    def partial_requested(self) -> None:
        """The shell sent a partial request for the audio so far."""
        self._since_partial = 0

    def partial_shown(self) -> None:
        """A partial of the current utterance was shown: the regular interval applies."""
        self._shown = True

    @property
    def shown(self) -> bool:
        """A partial of the current utterance was shown."""
        return self._shown

    def snapshot(self) -> Utterance | None:
        """The current utterance so far (None if empty)."""
        if not self._samples or self._start_ms is None:
            return None
        audio = np.concatenate(self._chunks).astype(np.float32) / np.float32(32768.0)
        self._chunks = [np.concatenate(self._chunks)]  # keep it one piece for next time
        return Utterance(self.index, audio, self._start_ms, self._end_ms)

    def discard(self) -> bool:
        """Drop the current utterance's audio and start the next one, as ``finish`` does
        but with nothing to recognize. Returns whether there was audio (only then is the
        index used up, as by ``finish``)."""
        had = self._samples > 0
        self._chunks = []
        self._samples = 0
        self._since_partial = 0
        self._start_ms = None
        self._shown = False
        self.cap_signalled = False
        if had:
            self.index += 1
        return had

    def finish(self) -> Utterance | None:
        """Close the current utterance and start the next one; None if it was empty."""
        utt = self.snapshot()
        self._chunks = []
        self._samples = 0
        self._since_partial = 0
        self._start_ms = None
        self._shown = False
        self.cap_signalled = False
        if utt is not None:
            self.index += 1
        return utt
