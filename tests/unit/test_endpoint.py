"""Endpointer and SpeechGate on literal probability sequences, and Silero VAD on real speech."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.endpoint import (
    EndpointConfig,
    Endpointer,
    SendFrame,
    SpeechFeeder,
    SpeechGate,
    SpeechPaused,
    UtteranceCancelled,
    UtteranceEnded,
    UtteranceStarted,
    UtteranceTentative,
)
from stages.reframe import PcmFrame, Reframer
from stages.vad import WINDOW_SAMPLES, VadBatcher, VadModel, VadStream, VadWindow
from tests import speech

W = WINDOW_SAMPLES  # 32 ms


def run(probs: list[float], config: EndpointConfig | None = None) -> list[object]:
    ep = Endpointer(config)
    out: list[object] = []
    for i, p in enumerate(probs):
        out += ep.feed(VadWindow((i + 1) * W, p))
    return out


def test_short_blip_is_not_speech() -> None:
    assert run([0.0] * 5 + [0.9] * 5 + [0.0] * 40) == []  # 160 ms < 250 ms


def test_one_utterance_with_preroll_and_tail() -> None:
    events = run([0.0] * 20 + [0.9] * 30 + [0.0] * 30)
    onset = 20 * W
    assert events == [
        UtteranceStarted(0, onset - 4800),
        UtteranceEnded(0, onset - 4800, 50 * W + 3200, "silence"),
    ]


def test_endpoint_needs_the_full_silence() -> None:
    # 21 silent windows = 672 ms < 700 ms: still one utterance.
    events = run([0.9] * 10 + [0.0] * 21 + [0.9] * 10 + [0.0] * 30)
    assert [type(e).__name__ for e in events] == ["UtteranceStarted", "UtteranceEnded"]


def test_hysteresis_keeps_unsure_windows_in_speech() -> None:
    events = run([0.9] * 10 + [0.4] * 40 + [0.0] * 30)
    (_start, end) = events
    assert isinstance(end, UtteranceEnded) and end.end == 10 * W + 3200


def test_two_utterances_in_order() -> None:
    events = run([0.9] * 20 + [0.0] * 47 + [0.9] * 20 + [0.0] * 30)
    assert [(type(e).__name__, e.index) for e in events] == [
        ("UtteranceStarted", 0), ("UtteranceEnded", 0),
        ("UtteranceStarted", 1), ("UtteranceEnded", 1),
    ]
    assert events[2].start >= events[1].end  # pre-roll never reaches into utterance 0


def test_max_length_forces_a_final_and_continues() -> None:
    cfg = EndpointConfig(max_utterance_s=1.0)
    events = run([0.9] * 70, cfg)
    ends = [e for e in events if isinstance(e, UtteranceEnded)]
    assert ends and all(e.reason == "max_length" for e in ends)
    starts = [e for e in events if isinstance(e, UtteranceStarted)]
    assert starts[1].start == ends[0].end  # no overlap, no gap


def test_force_ends_open_utterance_only() -> None:
    ep = Endpointer()
    assert ep.force("client") == []
    for i in range(20):
        ep.feed(VadWindow((i + 1) * W, 0.9))
    (ev,) = ep.force("client")
    assert isinstance(ev, UtteranceEnded) and ev.reason == "client" and ev.end == 20 * W


def test_windows_must_advance() -> None:
    ep = Endpointer()
    ep.feed(VadWindow(W, 0.1))
    with pytest.raises(ValueError):
        ep.feed(VadWindow(W, 0.1))


@pytest.mark.parametrize("kwargs", [{"threshold": 0.2, "neg_threshold": 0.3},
                                    {"min_speech_ms": -1}, {"max_utterance_s": 0.1}])
def test_bad_config(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EndpointConfig(**kwargs)  # type: ignore[arg-type]


def test_gate_sends_preroll_and_open_utterance_frames_only() -> None:
    gate = SpeechGate(preroll_ms=40)
    r = Reframer()
    frames = r.feed(b"\x00\x00" * 320 * 10)  # 10 frames, 200 ms
    out = []
    for f in frames[:6]:
        out += gate.frame(f)
    assert out == []
    gate.trim(6 * 320)  # VAD has seen 120 ms: frames ending <= 80 ms are dropped
    out += gate.boundary(UtteranceStarted(0, 5 * 320), decided=6 * 320)
    for f in frames[6:8]:
        out += gate.frame(f)
    out += gate.boundary(UtteranceEnded(0, 5 * 320, 8 * 320, "silence"), decided=8 * 320)
    for f in frames[8:]:
        out += gate.frame(f)
    sent = [e.frame.start // 320 for e in out if isinstance(e, SendFrame)]
    assert sent == [5, 6, 7]
    assert gate.frames_dropped == 5  # 0-3 aged out, 4 ends where the utterance starts


@pytest.fixture(scope="module")
def vad_model() -> VadModel:
    return VadModel()


def _endpoints(audio: np.ndarray, model: VadModel) -> list[object]:
    stream = VadStream()
    batcher = VadBatcher(model)
    ep = Endpointer()
    out: list[object] = []
    for i in range(0, len(audio), 320):
        stream.feed(audio[i:i + 320])
        for w in batcher.run([stream])[0]:
            out += ep.feed(w)
    return out + ep.force("flush")


def test_silero_finds_two_utterances_in_real_speech(vad_model: VadModel) -> None:
    gap = np.zeros(24000, dtype=np.int16)  # 1.5 s
    a, b = speech.goforward(), speech.librivox()[1][1]
    audio = np.concatenate([gap, a, gap, b, gap])
    events = _endpoints(audio, vad_model)
    ends = [e for e in events if isinstance(e, UtteranceEnded)]
    assert [e.index for e in ends] == [0, 1]
    assert all(e.reason == "silence" for e in ends)
    # utterance 1 starts within the second clip, give or take the pre-roll
    b_start = len(gap) * 2 + len(a)
    assert abs(ends[1].start - b_start) < 16000


def test_batched_vad_equals_per_session_vad(vad_model: VadModel) -> None:
    clips = [speech.goforward(), speech.cards()[4][1], speech.librivox()[4][1][:40000]]
    solo = []
    for c in clips:
        s = VadStream()
        s.feed(c)
        solo.append([w.prob for w in VadBatcher(vad_model).run([s])[0]])
    streams = [VadStream() for _ in clips]
    for s, c in zip(streams, clips, strict=True):
        s.feed(c)
    batcher = VadBatcher(vad_model)
    together = [[w.prob for w in ws] for ws in batcher.run(streams)]
    for a, b in zip(solo, together, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert batcher.calls == max(len(c) // W for c in clips)


@settings(max_examples=150, deadline=None)
@given(probs=st.lists(st.sampled_from([0.05, 0.3, 0.95]), min_size=5, max_size=120),
       lag=st.integers(0, 40), batch=st.integers(1, 12))
def test_gate_sends_each_utterance_exactly_its_frames_however_far_audio_runs_ahead(
        probs: list[float], lag: int, batch: int) -> None:
    """Frames may arrive up to ``lag`` frames ahead of VAD, whose decisions come in
    batches: each utterance still gets the frames overlapping [start, end) and only those,
    once each, in order, which is what it gets when audio and VAD move in lockstep."""

    def gate_run(lag: int, batch: int) -> dict[int, list[int]]:
        ep = Endpointer(EndpointConfig(min_speech_ms=64, endpoint_silence_ms=96,
                                       preroll_ms=60, tail_ms=40))
        gate = SpeechGate(preroll_ms=60)
        n_samples = len(probs) * 512
        frames = [PcmFrame(s, np.zeros(320, dtype=np.int16))
                  for s in range(0, n_samples - 319, 320)]
        windows = [VadWindow((i + 1) * 512, p) for i, p in enumerate(probs)]
        out: list[object] = []
        fi = 0
        for wi in range(0, len(windows), batch):
            chunk = windows[wi:wi + batch]
            # frames up to `lag` frames past what this batch of VAD will have seen
            while fi < len(frames) and frames[fi].start < chunk[-1].end + lag * 320:
                out += gate.frame(frames[fi])
                fi += 1
            for w in chunk:
                for e in ep.feed(w):
                    out += gate.boundary(e, ep.sendable, ep.horizon)
            out += gate.trim(ep.sendable, ep.horizon)
        for e in ep.force("flush"):
            out += gate.boundary(e, ep.sendable, ep.horizon)
        sent: dict[int, list[int]] = {}
        bounds: dict[int, tuple[int, int]] = {}
        for e in out:
            if isinstance(e, SendFrame):
                sent.setdefault(e.utterance, []).append(e.frame.start)
            elif isinstance(e, UtteranceEnded):
                bounds[e.index] = (e.start, e.end)
        for u, starts in sent.items():
            assert starts == sorted(set(starts))
            lo, hi = bounds[u]
            assert all(s < hi and s + 320 > lo for s in starts)
        return sent

    assert gate_run(lag, batch) == gate_run(0, 1)


EARLY = EndpointConfig(early_start=True)


def test_early_start_announces_on_the_first_speech_window_then_confirms() -> None:
    events = run([0.0] * 20 + [0.9] * 30 + [0.0] * 30, EARLY)
    onset = 20 * W
    assert events == [
        UtteranceTentative(0, onset - 4800),  # on the first speech window, 8 windows
        UtteranceStarted(0, onset - 4800),  # before min_speech confirms it (same start)
        UtteranceEnded(0, onset - 4800, 50 * W + 3200, "silence"),
    ]


def test_early_start_withdraws_a_blip_and_reuses_its_index() -> None:
    ep = Endpointer(EARLY)
    probs = [0.0] * 5 + [0.9] * 5 + [0.0] * 40 + [0.9] * 20 + [0.0] * 30
    events = []
    for i, p in enumerate(probs):
        events += ep.feed(VadWindow((i + 1) * W, p))
    assert [(type(e).__name__, e.index) for e in events] == [
        ("UtteranceTentative", 0), ("UtteranceCancelled", 0),
        ("UtteranceTentative", 0), ("UtteranceStarted", 0), ("UtteranceEnded", 0)]
    assert (ep.tentative, ep.false_starts) == (2, 1)


def test_early_start_off_changes_nothing() -> None:
    probs = [0.0] * 5 + [0.9] * 5 + [0.0] * 40 + [0.9] * 20 + [0.0] * 30
    assert run(probs) == [e for e in run(probs, EARLY)
                          if isinstance(e, UtteranceStarted | UtteranceEnded)]


def test_flush_withdraws_an_unconfirmed_start() -> None:
    ep = Endpointer(EARLY)
    events = []
    for i, p in enumerate([0.0] * 5 + [0.9] * 3):
        events += ep.feed(VadWindow((i + 1) * W, p))
    assert [type(e) for e in events] == [UtteranceTentative]
    assert ep.force("flush") == [UtteranceCancelled(0)]


def _frames(n: int) -> list[PcmFrame]:
    return [PcmFrame(i * 320, np.full(320, i, np.int16)) for i in range(n)]


def test_gate_gives_a_false_starts_frames_back_as_preroll() -> None:
    """Frames sent for a withdrawn early start are held again, so the utterance that
    really starts there gets them once more (its pre-roll) and nothing is skipped."""
    frames = _frames(60)
    gate = SpeechGate(preroll_ms=300)
    out: list[object] = []
    for f in frames[:20]:
        out += gate.frame(f)
    out += gate.boundary(UtteranceTentative(0, 10 * 320), 20 * 320)
    sent_early = [e.frame.start // 320 for e in out if isinstance(e, SendFrame)]
    assert sent_early == list(range(10, 20))
    out = gate.boundary(UtteranceCancelled(0), 22 * 320)
    assert out == [UtteranceCancelled(0)]
    for f in frames[20:30]:
        out += gate.frame(f)
    out += gate.boundary(UtteranceStarted(0, 12 * 320), 30 * 320)
    sent = [e.frame.start // 320 for e in out if isinstance(e, SendFrame)]
    assert sent == list(range(12, 30))  # from its own start, the returned frames again


def test_gate_confirmed_early_start_sends_each_frame_once() -> None:
    frames = _frames(40)
    gate = SpeechGate(preroll_ms=300)
    out: list[object] = []
    for f in frames[:20]:
        out += gate.frame(f)
    out += gate.boundary(UtteranceTentative(0, 10 * 320), 20 * 320)
    for f in frames[20:30]:
        out += gate.frame(f)
    out += gate.boundary(UtteranceStarted(0, 10 * 320), 30 * 320)
    out += gate.boundary(UtteranceEnded(0, 10 * 320, 30 * 320, "silence"), 30 * 320)
    sent = [e.frame.start // 320 for e in out if isinstance(e, SendFrame)]
    assert sent == list(range(10, 30))
    assert [type(e).__name__ for e in out if not isinstance(e, SendFrame)] == [
        "UtteranceTentative", "UtteranceStarted", "UtteranceEnded"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.4, 0.9]), min_size=1, max_size=120),
       st.integers(0, 30), st.integers(1, 8), st.booleans())
def test_feeder_is_the_endpointer_and_the_gate(probs: list[float], lag: int, batch: int,
                                               early: bool) -> None:
    """``SpeechFeeder`` gives what the endpointer and the gate wired by hand give."""
    config = EndpointConfig(min_speech_ms=64, endpoint_silence_ms=96, preroll_ms=60,
                            tail_ms=40, early_start=early)
    frames = [PcmFrame(s, np.zeros(320, dtype=np.int16))
              for s in range(0, len(probs) * 512 - 319, 320)]
    windows = [VadWindow((i + 1) * 512, p) for i, p in enumerate(probs)]

    def by_hand() -> list[object]:
        ep, gate = Endpointer(config), SpeechGate(config.preroll_ms)
        out: list[object] = []
        fi = 0
        for wi in range(0, len(windows), batch):
            chunk = windows[wi:wi + batch]
            while fi < len(frames) and frames[fi].start < chunk[-1].end + lag * 320:
                out += gate.frame(frames[fi])
                fi += 1
            for w in chunk:
                for e in ep.feed(w):
                    out += gate.boundary(e, ep.sendable, ep.horizon)
            out += gate.trim(ep.sendable, ep.horizon)
        for e in ep.force("flush"):
            out += gate.boundary(e, ep.sendable, ep.horizon)
        return out

    def feeder() -> list[object]:
        f = SpeechFeeder(config)
        out: list[object] = []
        fi = 0
        for wi in range(0, len(windows), batch):
            chunk = windows[wi:wi + batch]
            while fi < len(frames) and frames[fi].start < chunk[-1].end + lag * 320:
                out += f.frame(frames[fi])
                fi += 1
            out += f.windows(chunk)
            assert f.position == chunk[-1].end
        out += f.force("flush")
        return out

    out = feeder()
    assert [e for e in out if not isinstance(e, SpeechPaused)] == by_hand()
    # Each pause is said once, inside its utterance, after frames of it were sent.
    open_utt, sent_since_pause = None, False
    for e in out:
        if isinstance(e, UtteranceStarted):
            open_utt, sent_since_pause = e.index, True
        elif isinstance(e, UtteranceEnded | UtteranceCancelled):
            open_utt = None
        elif isinstance(e, SendFrame):
            sent_since_pause = True
        elif isinstance(e, SpeechPaused):
            assert e.index == open_utt and sent_since_pause
            sent_since_pause = False


def test_feeder_says_each_pause_once_after_the_frames_it_follows() -> None:
    config = EndpointConfig(min_speech_ms=64, endpoint_silence_ms=320, preroll_ms=0,
                            tail_ms=64)
    probs = [0.9] * 5 + [0.0] * 4 + [0.9] * 3 + [0.0] * 12
    f = SpeechFeeder(config)
    out: list[object] = []
    by_window: list[list[object]] = []
    k = 0
    for i, p in enumerate(probs):
        got: list[object] = []
        while k * 320 < (i + 1) * 512:  # VAD decides a window once its audio is in
            got += f.frame(PcmFrame(k * 320, np.zeros(320, np.int16)))
            k += 1
        got += f.windows([VadWindow((i + 1) * 512, p)])
        by_window.append(got)
        out += got
    kinds = [type(e).__name__ for e in out if not isinstance(e, SendFrame)]
    assert kinds == ["UtteranceStarted", "SpeechPaused", "SpeechPaused", "UtteranceEnded"]
    paused_at = [i for i, got in enumerate(by_window)
                 if any(isinstance(e, SpeechPaused) for e in got)]
    # Said when silence passed the last speech + the tail (windows 5-6), after that
    # window's frames; nothing of the utterance goes out again until speech resumes
    # (window 9), when the held silence and the new speech go.
    assert paused_at[0] == 6 and isinstance(by_window[6][-1], SpeechPaused)
    assert not any(isinstance(e, SendFrame) for got in by_window[7:9] for e in got)
    assert any(isinstance(e, SendFrame) for e in by_window[9])
