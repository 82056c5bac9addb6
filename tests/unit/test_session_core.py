"""The session's sans-IO core, driven synchronously: no trio, no sockets, no clock.

A small harness plays the shell: it feeds client messages and VAD windows (speech where
a script says so), and records every action the core returns.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asr.link import AsrEvent
from gateway.core import (
    ASR_QUEUE_HIGH_FRAMES,
    MAX_IDLE_DEFERRALS,
    AcceptAudio,
    Action,
    AskLid,
    CoreConfig,
    LinkAudio,
    LinkBegin,
    LinkCancel,
    LinkConfirm,
    LinkEnd,
    LinkFinalize,
    LinkMove,
    LinkPause,
    SendEvent,
    SessionCore,
    StopIngest,
)
from gateway.protocol import RETURNABLE, Hints, OversizedMessage, ProtocolViolation, Start
from stages.endpoint import EndpointConfig
from stages.reframe import PcmFrame
from stages.vad import WINDOW_SAMPLES, VadWindow

SR = 16000
FRAME = 320  # samples in 20 ms


def pcm(n: int, offset: int = 0) -> bytes:
    """``n`` samples whose values count up from ``offset`` (so order can be checked)."""
    return (np.arange(offset, offset + n) % 30000).astype("<i2").tobytes()


def seq(n: int, payload: bytes) -> bytes:
    return struct.pack("<II", n, 0) + payload


@dataclass
class Harness:
    """The shell's part, synchronously. ``speech(sample)`` says whether the VAD window
    ending at ``sample`` is speech."""

    core: SessionCore
    speech: Any = lambda end: False
    now: float = 0.0
    actions: list[Action] = field(default_factory=list)
    vad_fed: int = 0
    vad_done: int = 0
    auto_vad: bool = True

    def drain(self) -> list[Action]:
        out = self.core.drain()
        self.actions += out
        for a in out:
            if isinstance(a, AcceptAudio):
                self.vad_fed += sum(len(f.samples) for f in a.frames)
            if isinstance(a, LinkAudio):
                self.core.link_sent(len(a.frames))  # the link takes it at once
        return out

    def send(self, message: Any) -> str | None:
        self.core.pace(self.now)
        reason = self.core.message(message, self.now)
        self.drain()
        if self.auto_vad:
            self.run_vad()
        return reason

    def run_vad(self) -> None:
        windows = []
        while self.vad_done + WINDOW_SAMPLES <= self.vad_fed:
            self.vad_done += WINDOW_SAMPLES
            windows.append(VadWindow(self.vad_done, 0.9 if self.speech(self.vad_done)
                                     else 0.01))
        if windows:
            self.core.vad(windows, self.now)
            self.drain()

    def finish(self) -> None:
        self.core.finish(self.now)
        self.drain()
        self.run_vad()

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [a.event for a in self.actions if isinstance(a, SendEvent)
                and (kind is None or a.event["type"] == kind)]

    def errors(self) -> list[str]:
        return [e["code"] for e in self.events("error")]

    def of(self, kind: type) -> list[Any]:
        return [a for a in self.actions if isinstance(a, kind)]

    def link(self) -> list[Any]:
        return [a for a in self.actions if isinstance(a, LinkBegin | LinkConfirm | LinkCancel
                                                      | LinkAudio | LinkFinalize | LinkPause
                                                      | LinkMove | LinkEnd)]


def make(*, features: frozenset[str] = frozenset(), returns: frozenset[str] | None = None,
         lang: str = "en", speech: Any = None, routes: dict[str, str] | None = None,
         **cfg: Any) -> Harness:
    endpoint = cfg.pop("endpoint", EndpointConfig(min_speech_ms=100, endpoint_silence_ms=300,
                                                  preroll_ms=100))
    route_map = routes or {}
    config = CoreConfig(endpoint=endpoint, route=lambda lg: route_map.get(lg, "default"),
                        **cfg)
    start = Start("flow-1", features=features, hints=Hints(user_lang_pref=lang),
                  returns=RETURNABLE if returns is None else returns)
    h = Harness(SessionCore(config, start, 0.0))
    if speech is not None:
        h.speech = speech
    return h


def speech_between(*spans: tuple[float, float]) -> Any:
    return lambda end: any(a * SR < end <= b * SR for a, b in spans)


# -- ingest ----------------------------------------------------------------------------

def test_odd_and_oversized_binary_give_nonfatal_coded_errors() -> None:
    h = make(max_frame_bytes=4000)
    assert h.send(b"\0" * 3) is None
    assert h.send(b"\0" * 4002) is None
    assert h.errors() == ["ODD_BYTE_COUNT", "FRAME_TOO_LARGE"]
    assert h.send(pcm(FRAME)) is None
    assert [len(a.frames) for a in h.of(AcceptAudio)] == [1]


def test_seq_header_errors_and_reorder() -> None:
    h = make(features=frozenset({"seq_header"}))
    h.send(b"\0\0\0")  # shorter than the header
    h.send(seq(0, b"\0" * 3))  # odd payload: refused before the buffer takes it
    h.send(seq(10_000, pcm(FRAME)))  # far ahead
    assert h.errors() == ["BAD_SEQ_HEADER", "ODD_BYTE_COUNT", "BAD_SEQ_HEADER"]
    h.send(seq(1, pcm(FRAME, FRAME)))
    assert not h.of(AcceptAudio)  # held for seq 0
    h.send(seq(0, pcm(FRAME)))
    h.send(seq(0, pcm(FRAME)))  # a duplicate: dropped silently
    got = np.concatenate([f.samples for a in h.of(AcceptAudio) for f in a.frames])
    assert got.tobytes() == pcm(2 * FRAME)


def test_fatal_messages_end_ingest_with_a_close_code() -> None:
    h = make()
    assert h.send(OversizedMessage(size=9_000_000, limit=1 << 20)) == "error"
    assert h.core.close_code == 1009
    assert h.events("error")[-1]["fatal"] is True
    h = make()
    assert h.send(ProtocolViolation(1007, "bad utf-8")) == "error"
    assert h.core.close_code == 1007
    h = make()
    assert h.send("{not json") is None  # a bad text message is not fatal
    assert h.events("error")[0]["fatal"] is False


def test_text_messages() -> None:
    h = make()
    assert h.send(json.dumps({"type": "ping", "id": "x"})) is None
    assert h.events("pong")[0]["id"] == "x"
    assert h.send(json.dumps({"type": "start", "flowId": "b"})) is None
    assert h.errors() == ["ALREADY_STARTED"]
    assert h.send(json.dumps({"type": "flush"})) == "flush"


def test_rate_pacing_waits_and_tells_once() -> None:
    h = make(max_messages_per_s=10)
    waits = [h.core.pace(0.0) for _ in range(25)]
    assert waits[:20] == [0.0] * 20 and all(w > 0 for w in waits[20:])
    h.drain()
    assert h.errors() == ["RATE_LIMITED"]  # once a second at most
    assert max(h.core.pace(1.5) for _ in range(40)) > 0
    h.drain()
    assert h.errors() == ["RATE_LIMITED"] * 2


class DelayDenoise:
    """A denoiser with one frame of delay, as RNNoise's resampling has some."""

    def __init__(self) -> None:
        self.pending: PcmFrame | None = None

    def feed(self, frame: PcmFrame) -> list[PcmFrame]:
        out = [] if self.pending is None else [self.pending]
        self.pending = frame
        return out

    def flush(self) -> list[PcmFrame]:
        out = [] if self.pending is None else [self.pending]
        self.pending = None
        return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=40), st.integers(1, 6),
       st.booleans(), st.lists(st.booleans(), min_size=1, max_size=12), st.booleans(),
       st.booleans())
def test_no_accepted_audio_is_lost(sizes: list[int], seconds: int, with_seq: bool,
                                   pattern: list[bool], early: bool, denoise: bool) -> None:
    """However the audio is split into messages (``sizes`` in bytes, over and over, for
    ``seconds`` of audio or 600 messages), every accepted sample reaches the archive
    (AcceptAudio) exactly once and in order, and each utterance's frames to recognition
    are contiguous."""
    def speech(end: int) -> bool:  # 0.15 s blocks of speech or silence, repeating
        return pattern[(end // (SR * 15 // 100)) % len(pattern)]

    h = make(features=frozenset({"seq_header"}) if with_seq else frozenset(),
             speech=speech, endpoint=EndpointConfig(
                 min_speech_ms=100, endpoint_silence_ms=200, preroll_ms=100,
                 early_start=early, max_utterance_s=1.0))
    if denoise:
        h.core.denoise = DelayDenoise()
    sent = i = 0
    while sent < seconds * SR and i < 600:
        n = sizes[i % len(sizes)] // 2
        data = pcm(n, sent)
        sent += n
        h.send(seq(i, data) if with_seq else data)
        h.now += 0.02
        i += 1
    h.finish()
    frames = [f for a in h.of(AcceptAudio) for f in a.frames]
    assert [f.start for f in frames] == [i * FRAME for i in range(len(frames))]
    archived = b"".join(f.samples.tobytes() for f in frames)
    assert archived[:sent * 2] == pcm(sent)  # the tail is padded to a whole frame
    assert len(archived) - sent * 2 < FRAME * 2
    assert h.core.drained and isinstance(h.link()[-1], LinkEnd)
    # each utterance: Begin, contiguous audio, Finalize (or Cancel)
    current: int | None = None
    last_end: int | None = None
    if any(pattern):
        assert h.of(LinkBegin) or sent < SR // 2
    for a in h.link():
        if isinstance(a, LinkBegin):
            current, last_end = a.utterance, None
        elif isinstance(a, LinkAudio):
            for sf in a.frames:
                assert sf.utterance == current
                assert last_end is None or sf.frame.start == last_end
                last_end = sf.frame.end
        elif isinstance(a, LinkFinalize | LinkCancel):
            if isinstance(a, LinkFinalize):
                assert a.utterance == current
            current = None


# -- flow control ----------------------------------------------------------------------

def test_pause_past_high_water_and_resume_below_low_water() -> None:
    h = make()
    h.auto_vad = False
    for i in range(300):  # 6 s that VAD has not looked at
        h.send(pcm(FRAME, i * FRAME))
    assert h.core.paused
    flows = h.events("flow")
    assert [f["state"] for f in flows] == ["PAUSE"]
    h.run_vad()
    assert not h.core.paused
    assert [f["state"] for f in h.events("flow")] == ["PAUSE", "RESUME"]


def test_link_backlog_pauses() -> None:
    h = make(speech=lambda end: True)
    core = h.core
    core.link_backlog = ASR_QUEUE_HIGH_FRAMES + 1
    h.send(pcm(FRAME))
    assert core.paused
    core.link_sent(ASR_QUEUE_HIGH_FRAMES)
    assert not core.paused


def test_asr_behind_holds_the_client_until_ok() -> None:
    h = make()
    h.core.link_event(AsrEvent("flow", "flow-1", code="BEHIND"), 0.0)
    h.drain()
    assert h.core.paused
    h.core.link_event(AsrEvent("flow", "flow-1", code="BEHIND"), 0.0)  # no second PAUSE
    h.core.link_event(AsrEvent("flow", "flow-1", code="OK"), 0.0)
    h.drain()
    assert not h.core.paused
    assert [f["state"] for f in h.events("flow")] == ["PAUSE", "RESUME"]
    assert "recognition is behind" in h.events("flow")[0]["reason"]


def test_vad_failure_ends_ingest() -> None:
    h = make()
    h.core.paused = True
    h.core.vad_failure(1.0)
    out = h.drain()
    assert StopIngest("error") in out and not h.core.paused
    assert h.events("error")[0]["code"] == "INTERNAL" and h.events("error")[0]["fatal"]
    assert h.core.vad_caught_up()


# -- timers ----------------------------------------------------------------------------

def test_idle_tick_and_its_deferrals() -> None:
    h = make(flush_idle_s=2.0, max_session_s=100.0)
    assert h.core.ingest_deadline() == 2.0
    h.now = 1.5
    h.send(pcm(FRAME))  # a frame's worth of new audio resets the timer
    assert h.core.ingest_deadline() == 3.5
    h.send(pcm(10))  # less than a frame: not activity
    assert h.core.ingest_deadline() == 3.5
    deferred = [h.core.idle_tick(3.5 + i, intake_waiting=True)
                for i in range(MAX_IDLE_DEFERRALS + 1)]
    assert deferred == [None] * MAX_IDLE_DEFERRALS + ["idle"]
    assert h.core.idle_tick(20.0) == "idle"


def test_max_session_duration() -> None:
    h = make(flush_idle_s=50.0, max_session_s=10.0)
    assert h.core.ingest_deadline() == 10.0
    assert h.core.idle_tick(10.0, intake_waiting=True) == "max_duration"
    h.now = 10.0
    assert h.send(pcm(FRAME)) == "max_duration"


# -- the pipeline ----------------------------------------------------------------------

def feed_seconds(h: Harness, seconds: float) -> None:
    start = h.vad_fed
    for i in range(int(seconds * SR) // FRAME):
        h.send(pcm(FRAME, start + i * FRAME))
        h.now += 0.02


def test_utterance_begin_audio_finalize_end() -> None:
    h = make(speech=speech_between((0.5, 1.5)))
    feed_seconds(h, 3.0)
    kinds = [type(a).__name__ for a in h.link()]
    # The pause is hinted once silence passes the tail (200 ms), after the audio it
    # follows, and the final is asked for at the endpoint (300 ms).
    assert kinds[0] == "LinkBegin" and kinds[-2:] == ["LinkPause", "LinkFinalize"]
    assert set(kinds[1:-2]) == {"LinkAudio"}
    assert h.link()[-2] == LinkPause(0)
    h.finish()
    assert isinstance(h.link()[-1], LinkEnd) and h.core.drained
    assert h.core.stats["utterances"] == 1


def test_finalize_and_flush_end_the_open_utterance() -> None:
    h = make(speech=lambda end: True)
    feed_seconds(h, 1.0)
    h.send(json.dumps({"type": "finalize"}))
    assert isinstance(h.link()[-1], LinkFinalize)
    feed_seconds(h, 1.0)  # speech goes on: a new utterance
    h.finish()
    link = h.link()
    assert [type(a).__name__ for a in link[-2:]] == ["LinkFinalize", "LinkEnd"]
    assert [a.utterance for a in link if isinstance(a, LinkBegin)] == [0, 1]


def test_tentative_start_then_cancel() -> None:
    h = make(speech=speech_between((0.5, 0.55)), endpoint=EndpointConfig(
        min_speech_ms=250, endpoint_silence_ms=300, preroll_ms=100, early_start=True))
    feed_seconds(h, 1.5)
    link = h.link()
    assert link[0] == LinkBegin(0, tentative=True)
    assert isinstance(link[-1], LinkCancel)
    assert h.core.stats["false_starts"] == 1 and h.core.stats["utterances"] == 0


def test_tentative_start_then_confirm() -> None:
    h = make(speech=speech_between((0.5, 1.5)), endpoint=EndpointConfig(
        min_speech_ms=250, endpoint_silence_ms=300, preroll_ms=100, early_start=True))
    feed_seconds(h, 2.5)
    kinds = [type(a).__name__ for a in h.link() if not isinstance(a, LinkAudio)]
    assert kinds == ["LinkBegin", "LinkConfirm", "LinkPause", "LinkFinalize"]


def test_a_pause_that_speech_ends_is_hinted_once_and_none_with_denoise() -> None:
    h = make(speech=speech_between((0.5, 1.2), (1.45, 2.0)))  # a 250 ms pause inside
    feed_seconds(h, 3.0)
    kinds = [type(a).__name__ for a in h.link() if not isinstance(a, LinkAudio)]
    assert kinds == ["LinkBegin", "LinkPause", "LinkPause", "LinkFinalize"]
    assert h.core.stats["utterances"] == 1
    # Denoise holds the last frames back until the utterance ends: no hint then.
    d = make(speech=speech_between((0.5, 1.2)))
    d.core.denoise = DelayDenoise()
    feed_seconds(d, 2.0)
    assert not d.of(LinkPause) and d.of(LinkFinalize)


def test_record_only_session_sends_nothing_to_recognition() -> None:
    h = make(returns=frozenset({"record_url"}), speech=speech_between((0.5, 1.5)))
    feed_seconds(h, 2.5)
    h.finish()
    assert [type(a) for a in h.link()] == [LinkEnd]
    assert h.core.stats["utterances"] == 1


# -- language ID -----------------------------------------------------------------------

def lid_session() -> Harness:
    return make(returns=frozenset({"asr", "lid"}), lang="auto", lid_hold_s=2.0,
                routes={"fr": "pool-fr"}, speech=speech_between((0.2, 1.2)))


def test_lid_hold_then_answer_moves_before_the_final() -> None:
    h = lid_session()
    feed_seconds(h, 2.0)
    assert h.of(AskLid)  # the utterance ended with ~1 s of speech: LID is asked
    assert not any(isinstance(a, LinkFinalize) for a in h.link())  # held
    assert h.core.next_timer() < 4.0
    h.core.lid_answer({"lang": "fr", "score": 0.99, "top": []}, h.now)
    h.drain()
    link = h.link()
    assert [type(a) for a in link[-2:]] == [LinkMove, LinkFinalize]
    assert link[-2] == LinkMove("pool-fr", "fr", "default", "en")
    assert h.events("lid")[0]["lang"] == "fr" and h.core.route_pool == "pool-fr"
    assert h.core.next_timer() == float("inf")


def test_lid_hold_times_out() -> None:
    h = lid_session()
    feed_seconds(h, 2.0)
    at = h.core.next_timer()
    h.core.tick(at - 0.1)
    assert not [a for a in h.drain() if isinstance(a, LinkFinalize)]
    h.core.tick(at)
    assert [type(a) for a in h.drain()] == [LinkFinalize]
    # the answer after the timeout still decides, and routes the next utterances
    h.core.lid_answer({"lang": "fr", "score": 0.99}, h.now)
    assert LinkMove("pool-fr", "fr", "default", "en") in h.drain()


def test_lid_failure_releases_the_hold_and_settles() -> None:
    h = lid_session()
    feed_seconds(h, 2.0)
    h.core.lid_failed(h.now)
    assert [type(a) for a in h.drain()] == [LinkFinalize]
    assert h.core.lid_decided


def test_refused_lid_answer_counts_as_a_failure() -> None:
    h = lid_session()
    feed_seconds(h, 2.0)
    h.core.lid_answer({"lang": "xx", "score": "high"}, h.now)
    assert [type(a) for a in h.drain()] == [LinkFinalize]


def test_failed_move_reverts_the_route() -> None:
    h = lid_session()
    h.core.move_failed("pool-fr", "fr", "default", "en")
    h.drain()
    assert h.errors() == ["ASR_UNAVAILABLE"] and h.core.route_pool == "default"


# -- recognition's events --------------------------------------------------------------

def test_link_events_become_client_events() -> None:
    h = make(speech=speech_between((0.2, 0.8)))
    feed_seconds(h, 0.5)
    h.core.link_event(AsrEvent("partial", "flow-1", 0, "hel", (200, 400), "en"), 0.7)
    feed_seconds(h, 1.0)
    h.core.link_event(AsrEvent("final", "flow-1", 0, "hello", (200, 800), "en"), 2.0)
    h.core.link_event(AsrEvent("error", "flow-1", code="UNAVAILABLE", message="host:1"),
                      2.0)
    h.core.link_event(AsrEvent("error", "flow-1", code="BUSY", message="full"), 2.0)
    h.drain()
    assert [e["type"] for e in h.events() if e["type"].startswith("asr")] == [
        "asr_partial", "asr_final"]
    final = h.events("asr_final")[0]
    assert final["text"] == "hello" and final["utterance"] == 0
    assert h.errors() == ["ASR_UNAVAILABLE", "BUSY"]
    assert "host:1" not in h.events("error")[0]["message"]
    assert h.core.first_partial_ms is not None and h.core.first_partial_ms >= 0
    metrics = h.core.session_metrics("opus")
    assert metrics["lang"] == "en" and metrics["utterances"] == 1
