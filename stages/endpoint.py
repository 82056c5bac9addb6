"""Endpointing and the speech gate, sans-IO; every time is counted in samples.

``Endpointer`` turns VAD probabilities into utterances: speech must last
``min_speech`` before an utterance starts (with ``preroll`` of audio before the onset),
and ``endpoint_silence`` of silence ends it. An utterance longer than ``max_utterance``
is forced final, and speech that goes on starts the next one. The state machine is a
table; an input that is not in it is a bug and raises, naming state and input.

``SpeechGate`` decides which 20 ms frames go to recognition: the frames of each
utterance plus its pre-roll, as early as possible (frames of an open utterance leave at
once, without waiting for VAD), and nothing else.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from .reframe import SAMPLE_RATE, PcmFrame
from .vad import WINDOW_SAMPLES, VadWindow


def ms_to_samples(ms: float) -> int:
    return round(ms * SAMPLE_RATE / 1000)


@dataclass(frozen=True)
class EndpointConfig:
    """Endpointing knobs. Thresholds are probabilities; durations are in ms."""

    threshold: float = 0.5
    neg_threshold: float = 0.35  # hysteresis: below this is silence
    min_speech_ms: int = 250
    endpoint_silence_ms: int = 700
    preroll_ms: int = 300
    tail_ms: int = 200  # trailing audio kept after the last speech in an utterance
    max_utterance_s: float = 20.0
    # Announce an utterance on its first speech window (``UtteranceTentative``), before
    # min_speech confirms it, so recognition can start ~min_speech earlier; speech that
    # stops short of min_speech is then withdrawn (``UtteranceCancelled``).
    early_start: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.neg_threshold <= self.threshold < 1.0:
            raise ValueError("need 0 < neg_threshold <= threshold < 1")
        for name in ("min_speech_ms", "endpoint_silence_ms", "preroll_ms", "tail_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_utterance_s * 1000 <= self.min_speech_ms:
            raise ValueError("max_utterance_s must exceed min_speech_ms")


@dataclass(frozen=True)
class UtteranceStarted:
    """Speech confirmed: utterance ``index`` covers audio from ``start`` (with pre-roll)."""

    index: int
    start: int


@dataclass(frozen=True)
class UtteranceTentative:
    """Speech heard, not yet ``min_speech`` of it (``early_start``): utterance ``index``
    may start at ``start`` (with pre-roll). Either ``UtteranceStarted`` with the same
    index and start confirms it, or ``UtteranceCancelled`` withdraws it."""

    index: int
    start: int


@dataclass(frozen=True)
class UtteranceCancelled:
    """The tentative utterance ``index`` was not speech after all (a false start); its
    index is used again by the next one."""

    index: int


@dataclass(frozen=True)
class UtteranceEnded:
    """Utterance ``index`` is over at ``end``: time for its final.

    ``reason`` is ``silence``, ``max_length``, ``client`` (a ``finalize``) or ``flush``.
    """

    index: int
    start: int
    end: int
    reason: str


@dataclass(frozen=True)
class SpeechPaused:
    """The open utterance ``index``'s speech paused: silence past its trailing margin,
    so none of its audio goes to recognition unless speech resumes. Said once per
    pause, after the utterance's frames up to there (recognition may decode its final
    now, ahead of the endpoint)."""

    index: int


EndpointEvent = UtteranceStarted | UtteranceEnded | UtteranceTentative | UtteranceCancelled


class State(Enum):
    SILENCE = "silence"
    ONSET = "onset"  # speech heard, not yet min_speech of it
    SPEECH = "speech"
    TRAILING = "trailing"  # in an utterance, silence heard, not yet endpoint_silence


class Symbol(Enum):
    SPEECH = "speech"
    SILENCE = "silence"
    UNSURE = "unsure"  # between the two thresholds


# (state, symbol) -> next state. Timers are checked after the move (see ``feed``).
_TRANSITIONS: dict[tuple[State, Symbol], State] = {
    (State.SILENCE, Symbol.SPEECH): State.ONSET,
    (State.SILENCE, Symbol.SILENCE): State.SILENCE,
    (State.SILENCE, Symbol.UNSURE): State.SILENCE,
    (State.ONSET, Symbol.SPEECH): State.ONSET,
    (State.ONSET, Symbol.UNSURE): State.ONSET,
    (State.ONSET, Symbol.SILENCE): State.SILENCE,
    (State.SPEECH, Symbol.SPEECH): State.SPEECH,
    (State.SPEECH, Symbol.UNSURE): State.SPEECH,
    (State.SPEECH, Symbol.SILENCE): State.TRAILING,
    (State.TRAILING, Symbol.SPEECH): State.SPEECH,
    (State.TRAILING, Symbol.UNSURE): State.TRAILING,
    (State.TRAILING, Symbol.SILENCE): State.TRAILING,
}


class Endpointer:
    """VAD decisions in, utterance boundaries out."""

    def __init__(self, config: EndpointConfig | None = None) -> None:
        self.config = c = config or EndpointConfig()
        self._min_speech = ms_to_samples(c.min_speech_ms)
        self._silence = ms_to_samples(c.endpoint_silence_ms)
        self._preroll = ms_to_samples(c.preroll_ms)
        self._tail = ms_to_samples(c.tail_ms)
        self._max = round(c.max_utterance_s * SAMPLE_RATE)
        self.state = State.SILENCE
        self.position = 0  # end of the last window seen
        self.utterances = 0  # index of the next utterance
        self._onset = 0  # where the current speech run began
        self._utt_start = 0
        self._last_speech = 0  # end of the last speech window in the utterance
        self._floor = 0  # audio before this belongs to an earlier utterance
        self.tentative = 0  # early starts announced
        self.false_starts = 0  # early starts withdrawn

    @property
    def in_utterance(self) -> bool:
        return self.state in (State.SPEECH, State.TRAILING)

    @property
    def sendable(self) -> int:
        """How far the open utterance's audio may go to recognition now: up to the last
        speech plus the tail, never into silence that may turn out to be past its end."""
        if self.in_utterance:
            return min(self._last_speech + self._tail, self.position)
        return self.position

    @property
    def paused(self) -> bool:
        """In an utterance, silence has run past the trailing margin: ``sendable``
        stays where it is until speech resumes or the utterance ends."""
        return self.state is State.TRAILING and self.position >= self._last_speech + self._tail

    @property
    def horizon(self) -> int:
        """Where the next utterance can start at the earliest, before its pre-roll: the
        onset of speech not yet long enough to count, else how far VAD has looked. Audio
        held for pre-roll must reach back from here, not from ``position``: when VAD
        runs ahead in big batches (a client sending faster than real time), ``position``
        can be well past an onset that is confirmed only by the next batch."""
        return self._onset if self.state is State.ONSET else self.position

    def _symbol(self, prob: float) -> Symbol:
        if prob >= self.config.threshold:
            return Symbol.SPEECH
        if prob < self.config.neg_threshold:
            return Symbol.SILENCE
        return Symbol.UNSURE

    def feed(self, window: VadWindow) -> list[EndpointEvent]:
        """Advance by one VAD window; return the boundaries it reveals."""
        if window.end <= self.position:
            raise ValueError(f"VAD window ending at {window.end} is not after {self.position}")
        symbol = self._symbol(window.prob)
        key = (self.state, symbol)
        if key not in _TRANSITIONS:
            raise RuntimeError(f"no transition from {self.state.value} on {symbol.value}")
        before, self.state = self.state, _TRANSITIONS[key]
        self.position = window.end
        win_start = window.end - WINDOW_SAMPLES
        out: list[EndpointEvent] = []
        if before is State.SILENCE and self.state is State.ONSET:
            self._onset = max(win_start, self._floor)
            if self.config.early_start and window.end - self._onset < self._min_speech:
                self.tentative += 1
                out.append(UtteranceTentative(
                    self.utterances, max(self._onset - self._preroll, self._floor)))
        elif before is State.ONSET and self.state is State.SILENCE and self.config.early_start:
            self.false_starts += 1
            out.append(UtteranceCancelled(self.utterances))
        if symbol is Symbol.SPEECH and self.in_utterance:
            self._last_speech = window.end
        if self.state is State.ONSET and window.end - self._onset >= self._min_speech:
            out.append(self._start(max(self._onset - self._preroll, self._floor)))
            self._last_speech = window.end
        elif self.state is State.TRAILING and window.end - self._last_speech >= self._silence:
            out.append(self._end(min(self._last_speech + self._tail, window.end), "silence"))
        if self.in_utterance and self.position - self._utt_start >= self._max:
            # Forced final; speech that goes on opens the next utterance at once, with no
            # pre-roll overlap so no word is recognized twice.
            speaking = self.state is State.SPEECH
            out.append(self._end(self.position, "max_length"))
            if speaking:
                out.append(self._start(self.position))
                self._last_speech = self.position
        return out

    def force(self, reason: str) -> list[EndpointEvent]:
        """End the open utterance now (``finalize`` from the client, or a flush)."""
        if not self.in_utterance:
            withdrawn = self.state is State.ONSET and self.config.early_start
            self.state = State.SILENCE
            if withdrawn:
                self.false_starts += 1
                return [UtteranceCancelled(self.utterances)]
            return []
        return [self._end(self.position, reason)]

    def _start(self, start: int) -> UtteranceStarted:
        self.state = State.SPEECH
        self._utt_start = start
        return UtteranceStarted(self.utterances, start)

    def _end(self, end: int, reason: str) -> UtteranceEnded:
        ev = UtteranceEnded(self.utterances, self._utt_start, end, reason)
        self.utterances += 1
        self.state = State.SILENCE
        self._floor = end
        return ev


@dataclass(frozen=True)
class SendFrame:
    """Send this frame to recognition as part of utterance ``utterance``."""

    utterance: int
    frame: PcmFrame


GateEvent = SendFrame | UtteranceStarted | UtteranceEnded | UtteranceTentative | \
    UtteranceCancelled | SpeechPaused


class SpeechGate:
    """Frames and endpoint events in; what recognition should get out, in order.

    A frame goes to recognition only once VAD has looked at it (``decided``), so an
    utterance gets exactly its own frames however far the audio runs ahead of VAD (a
    client sending faster than real time): frames past an utterance's end stay held, as
    pre-roll for the next one. Frames of no utterance are held for pre-roll and then
    dropped (the archive gets all audio through its own path).
    """

    def __init__(self, preroll_ms: int = 300) -> None:
        self._preroll = ms_to_samples(preroll_ms)
        self._held: deque[PcmFrame] = deque()
        self._open: int | None = None  # index of the open utterance
        self._decided = 0  # how far VAD has looked
        self._sent_until = 0  # end of the last frame sent
        self._tentative: list[PcmFrame] | None = None  # sent for a tentative utterance
        self.frames_sent = 0
        self.frames_dropped = 0

    def frame(self, frame: PcmFrame) -> list[GateEvent]:
        """A new 20 ms frame arrived."""
        if self._open is not None and not self._held and frame.start < self._decided:
            return [self._send(self._open, frame)]
        self._held.append(frame)
        return []

    def boundary(self, event: EndpointEvent, decided: int, horizon: int | None = None
                 ) -> list[GateEvent]:
        """An endpoint event; ``decided`` is how far VAD has looked (samples), and
        ``horizon`` where pre-roll must reach back from (``Endpointer.horizon``)."""
        self._decided = max(self._decided, decided)
        out: list[GateEvent] = []
        if isinstance(event, UtteranceStarted) and self._tentative is not None:
            self._tentative = None  # confirmed: its frames are on their way already
            out.append(event)
            out += self._release(self._decided)
        elif isinstance(event, UtteranceCancelled):
            # A false start: its frames go back, as pre-roll a real utterance may need.
            if self._tentative:
                self._held.extendleft(reversed(self._tentative))
                self._sent_until = self._tentative[0].start
            self._tentative = None
            self._open = None
            out.append(event)
        elif isinstance(event, UtteranceStarted | UtteranceTentative):
            self._open = event.index
            if isinstance(event, UtteranceTentative):
                self._tentative = []
            out.append(event)
            while self._held and (self._held[0].end <= event.start
                                  or self._held[0].end <= self._sent_until):
                self._held.popleft()
                self.frames_dropped += 1
            out += self._release(self._decided)
        else:
            out += self._release(event.end)
            self._open = None
            out.append(event)
        self._trim(self._decided if horizon is None else horizon)
        return out

    def trim(self, decided: int, horizon: int | None = None) -> list[GateEvent]:
        """VAD has looked up to ``decided``: send the open utterance's frames up to
        there, and drop held frames older than the pre-roll before ``horizon``."""
        self._decided = max(self._decided, decided)
        out = self._release(self._decided)
        self._trim(self._decided if horizon is None else horizon)
        return out

    def _release(self, until: int) -> list[GateEvent]:
        out: list[GateEvent] = []
        while self._open is not None and self._held and self._held[0].start < until:
            f = self._held.popleft()
            if f.end > self._sent_until:
                out.append(self._send(self._open, f))
            else:
                self.frames_dropped += 1
        return out

    def _trim(self, horizon: int) -> None:
        if self._open is not None:
            return  # held frames of an open utterance are trailing audio it may yet need
        while self._held and self._held[0].end <= horizon - self._preroll:
            self._held.popleft()
            self.frames_dropped += 1

    def _send(self, utterance: int, frame: PcmFrame) -> SendFrame:
        self._sent_until = frame.end
        self.frames_sent += 1
        if self._tentative is not None:
            self._tentative.append(frame)
        return SendFrame(utterance, frame)


class SpeechFeeder:
    """The endpointer and the speech gate as one: 20 ms frames and VAD windows in, what
    recognition should get out (``GateEvent``), in order. This is all a session needs
    of the two; each stays usable (and tested) on its own."""

    def __init__(self, config: EndpointConfig | None = None) -> None:
        self.endpointer = Endpointer(config)
        self.gate = SpeechGate(self.endpointer.config.preroll_ms)
        self._pause_said = False  # SpeechPaused said for the current pause

    @property
    def position(self) -> int:
        """How far VAD has looked (samples)."""
        return self.endpointer.position

    def frame(self, frame: PcmFrame) -> list[GateEvent]:
        """A new 20 ms frame arrived (before VAD has looked at it)."""
        return self.gate.frame(frame)

    def windows(self, windows: list[VadWindow]) -> list[GateEvent]:
        """VAD decided ``windows`` (in order): the boundaries they reveal, and the open
        utterance's frames they release."""
        ep, gate = self.endpointer, self.gate
        out: list[GateEvent] = []
        for w in windows:
            for event in ep.feed(w):
                out += gate.boundary(event, ep.sendable, ep.horizon)
            if not ep.paused:
                self._pause_said = False
        out += gate.trim(ep.sendable, ep.horizon)
        if ep.paused and not self._pause_said:  # after the frames it follows
            self._pause_said = True
            out.append(SpeechPaused(ep.utterances))
        return out

    def force(self, reason: str) -> list[GateEvent]:
        """End the open utterance now (``finalize`` from the client, or a flush)."""
        ep, out = self.endpointer, []
        for event in ep.force(reason):
            out += self.gate.boundary(event, ep.sendable, ep.horizon)
        return out
