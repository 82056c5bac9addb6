"""Language ID planning: which speech to ask about, when, and when the answer is final.

The gateway sends the first ``first_n_s`` seconds of a session's speech to the ASR
service's ``/v1/lid``. Asking once at the end of that window would make every session wait
``first_n_s`` seconds for its ``lid`` event (and for routing), so the planner asks early,
at checkpoints (by default 2 s of speech, then ``first_n_s``), and takes the first
answer that is sure enough (``min_score``). Otherwise the decision, on the whole window
(or at the end of a shorter session), pools every answer, each weighted by the speech it
heard: on 1-3 s of speech Whisper's language probabilities swing (synthetic French scored
0.75 on 2 s and 0.38 on 3 s), and the pooled answer is steadier than the last one alone.
A session that ends (or pauses: an utterance ended) with less speech asks with what it
has, if that is at least ``min_speech_s``. There is no 1 s checkpoint: on 1 s of synthetic
German and French Whisper base answered en, zh or th, sometimes above 0.9.

At most one request is in flight: a checkpoint passed while waiting is asked about when the
answer comes, with all the speech gathered by then. Sans-IO: the shell sends the requests
and feeds the answers back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SR = 16000
EARLY_MIN_SCORE = 0.95


@dataclass(frozen=True)
class LidRequest:
    """Ask the service about ``pcm`` (int16, 16 kHz): the session's speech so far."""

    pcm: npt.NDArray[np.int16]
    last: bool  # the answer will be final, whatever its score

    @property
    def speech_ms(self) -> int:
        return len(self.pcm) * 1000 // SR


@dataclass(frozen=True)
class LidDecision:
    """The session's language, decided on ``speech_ms`` of speech."""

    lang: str
    score: float
    top: tuple[tuple[str, float], ...]
    speech_ms: int
    sure: bool  # score reached ``min_score`` (else: the best answer on all there was)


class LidPlanner:
    """When to ask for a language ID, and when its answer is the decision.

    Args:
        first_n_s: the most speech ever sent.
        min_score: an answer at least this sure is the decision.
        checkpoints_s: earlier points (in seconds of speech) to ask at.
        min_speech_s: less speech than this is never sent.
    """

    def __init__(self, first_n_s: float = 3.0, min_score: float = 0.7, *,
                 checkpoints_s: Sequence[float] = (2.0,),
                 min_speech_s: float = 0.5) -> None:
        if first_n_s <= 0:
            raise ValueError("first_n_s must be positive")
        self.limit = int(first_n_s * SR)
        self.min_score = min_score
        self.min_speech = min(int(min_speech_s * SR), self.limit)
        points = sorted({int(c * SR) for c in checkpoints_s if 0 < c * SR < self.limit})
        self._points = [*points, self.limit]
        self._chunks: list[npt.NDArray[np.int16]] = []
        self._have = 0
        self._asked_at = 0  # speech samples in the last request sent
        self._in_flight: LidRequest | None = None
        self._due = False  # a checkpoint passed (or speech paused) while in flight
        self.decision: LidDecision | None = None
        self._best: LidDecision | None = None  # the pooled answers so far
        self._votes: dict[str, float] = {}
        self._finishing = False  # the session is ending: the next answer decides
        self._weight = 0
        self.failed = False

    @property
    def done(self) -> bool:
        return self.decision is not None or self.failed

    @property
    def waiting(self) -> bool:
        """A request is in flight."""
        return self._in_flight is not None

    @property
    def speech_samples(self) -> int:
        return self._have

    def speech(self, samples: npt.NDArray[np.int16]) -> LidRequest | None:
        """Take speech; returns a request when a checkpoint is reached."""
        if self.done or self._have >= self.limit or len(samples) == 0:
            return None
        take = samples[: self.limit - self._have]
        before = self._have
        self._chunks.append(np.array(take, dtype=np.int16))
        self._have += len(take)
        if any(before < p <= self._have for p in self._points):
            return self._ask()
        return None

    def pause(self) -> LidRequest | None:
        """Speech stopped (an utterance ended, or the session is ending): ask now with
        what there is, unless the last request already had all of it."""
        if self.done or self._have < self.min_speech or self._have <= self._asked_at:
            return None
        return self._ask(last=self._have >= self.limit)

    def answer(self, lang: str, score: float,
               top: Sequence[tuple[str, float]] = ()) -> LidDecision | LidRequest | None:
        """The service answered the request in flight.

        Returns the decision, or the next request (speech arrived meanwhile), or None
        (wait for more speech).
        """
        req = self._in_flight
        if req is None or self.done:
            return None
        self._in_flight = None
        if score >= self._sure_at(len(req.pcm)):
            self.decision = LidDecision(lang, score, tuple(top), req.speech_ms, True)
            self._chunks = []
            return self.decision
        self._best = self._pool(lang, score, top, len(req.pcm))
        if req.last or len(req.pcm) >= self.limit:
            return self._decide_best()
        if (self._due or self._finishing) and self._have > len(req.pcm):
            return self._ask(last=self._finishing)
        if self._finishing:
            return self._decide_best()
        self._due = False
        return None

    def _decide_best(self) -> LidDecision:
        assert self._best is not None
        self.decision = self._best
        self._chunks = []
        return self.decision

    def finish(self) -> LidDecision | LidRequest | None:
        """The session is ending: decide on the last answer if there was one, else ask
        a last time with what there is."""
        if self.done:
            return None
        if self._in_flight is not None:
            # its answer decides, or asks once more if speech came after it was sent
            self._finishing = True
            return None
        if self._best is not None and self._have <= self._asked_at:
            self.decision = self._best
            return self.decision
        if self._have < self.min_speech:
            return None
        return self._ask(last=True)

    def _sure_at(self, samples: int) -> float:
        """On less than 2 s of speech an answer must be surer: on 1 s of synthetic French
        Whisper base said Chinese at 0.86."""
        return self.min_score if samples >= 2 * SR else max(self.min_score, EARLY_MIN_SCORE)

    def _pool(self, lang: str, score: float, top: Sequence[tuple[str, float]], weight: int
              ) -> LidDecision:
        for la, sc in (top or [(lang, score)]):
            self._votes[la] = self._votes.get(la, 0.0) + sc * weight
        self._weight += weight
        ranked = sorted(self._votes.items(), key=lambda kv: -kv[1])
        top_pooled = tuple((la, v / self._weight) for la, v in ranked[:5])
        best, best_score = top_pooled[0]
        return LidDecision(best, best_score, top_pooled, weight * 1000 // SR,
                           best_score >= self.min_score)

    def error(self) -> LidRequest | None:
        """The request in flight failed. One failure ends language ID for the session
        only when there is nothing newer to ask about."""
        self._in_flight = None
        if self._due:
            return self._ask()
        self.failed = True
        self._chunks = []
        return None

    def _ask(self, last: bool = False) -> LidRequest | None:
        if self._in_flight is not None:
            self._due = True
            return None
        self._due = False
        pcm = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = [pcm]
        self._asked_at = len(pcm)
        self._in_flight = LidRequest(pcm, last or len(pcm) >= self.limit)
        return self._in_flight
