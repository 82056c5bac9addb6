"""Through the gateway in real time with the real engine (issue 10).

The gateway and the ASR service run in-process, real Whisper behind the default pools
(base finals, tiny.en partials for English). One session streams about 50 s of
long-form read speech in real time, 20 ms chunks: the LibriVox and cards clips and
"go forward", one after the other, with pauses of 0.3, 0.8, 1.5 and 3 s between them,
so endpointing cuts the stream into 10 utterances of 1.3-7 s (the longer pauses cut;
of the two 0.3 s ones, one does, with the clips' own silence, and one does not). The
stream runs once (51.5 s, about 65 s with warm-up and the offline decode) for all the
tests. What a user sees must hold:

- every utterance longer than 0.5 s gets an ``asr_partial`` before its ``asr_final``;
- no two partials of the session come closer than ``PARTIAL_INTERVAL_MS`` (read from
  the ``ack``) minus a small tolerance for the client's clock;
- no partial that its final does not support: none is only punctuation or a silence
  phrase ("Thank you."), and the last partial of an utterance says words its final
  says (an early partial may still be revised: it is not held to that);
- the finals, against the offline decode of the same audio (``WhisperEngine``
  transcribe of the whole stream with the finals' model, base), lose at most 2 points
  of WER, and their WER against the reference text stays within the measured value
  plus 2 points.

The first partial after each utterance's speech onset (from the client's first speech
sample), the final after its end, and the scheduler's counters go into every failure
message but are not asserted: timing on a shared CI machine is noisy.

Two of these found defects, now fixed: a partial whose utterance was cut while it
decoded was dropped although its final was not out yet (``asr/server.py``), and an early
misheard stable prefix ("How do you marry the more" for "Had he married a more") was
forced onto every later partial until the final (``StablePartials`` now re-checks it
unforced as the audio grows). Measured in 3 runs (load average 4-5): first partial
340-1200 ms after onset (median about 560 ms), final 735-1730 ms after the end of speech.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from asr.engine import DEFAULT_POOLS, WhisperBackend
from asr.server import AsrServerConfig, serve
from asr.whisper.normalize import WordErrors, normalize_english, word_errors
from gateway.client import StreamResult, stream_audio
from gateway.vadservice import VadService
from stages.vad import VadModel
from tests import speech

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SR = speech.SR
PAUSES_S = (0.3, 0.8, 1.5, 3.0)
LEAD_S, TAIL_S = 0.5, 1.5

# Streaming finals against the reference text (96 words): 4 errors (4.2 %) in each of 8
# runs on the 2-core dev machine; the offline decode 5 (5.2 %), the finals against it
# 2.1 %. The bound is the measured value plus 2 points.
STREAM_WER_MEASURED = 0.042
WER_SLACK = 0.02
# Client-side arrival times of two partials may come closer than the gateway sent them
# (the first one delayed in a busy event loop): this much is the client's clock, not the
# gateway's interval.
INTERVAL_TOLERANCE_S = 0.05
# The last partial of an utterance may say this many words, or this share of its words,
# that its final does not: partials are tiny.en, finals base, and tiny.en hears
# "ill-disposed" as "old-sposed" (2 words in 8) with or without a prefix.
LAST_PARTIAL_SLACK_WORDS, LAST_PARTIAL_SLACK_SHARE = 2, 0.25
SILENCE_PHRASES = {"", "thank you", "thanks", "thank you very much", "you", "bye",
                   "thanks for watching", "thank you for watching", "the end"}


@functools.cache
def long_form() -> tuple[np.ndarray, str, tuple[float, ...]]:
    """(audio, reference text, speech onsets in s): the clips joined with pauses."""
    lib, cards = speech.librivox(), speech.cards()
    clips: list[tuple[np.ndarray, str]] = []
    for i in range(max(len(lib), len(cards))):  # long and short utterances, mixed
        clips += [(a, t) for _, a, t in lib[i:i + 1]] + [(a, t) for _, a, t in cards[i:i + 1]]
    clips.append((speech.goforward(), "go forward ten meters"))
    parts = [np.zeros(int(LEAD_S * SR), dtype=np.int16)]
    onsets: list[float] = []
    pos = parts[0].size
    for i, (audio, _) in enumerate(clips):
        if i:
            gap = np.zeros(int(PAUSES_S[(i - 1) % len(PAUSES_S)] * SR), dtype=np.int16)
            parts.append(gap)
            pos += gap.size
        onsets.append((pos + _speech_onset(audio)) / SR)
        parts.append(audio)
        pos += audio.size
    parts.append(np.zeros(int(TAIL_S * SR), dtype=np.int16))
    return np.concatenate(parts), " ".join(t for _, t in clips), tuple(onsets)


def _speech_onset(audio: np.ndarray) -> int:
    """The first sample of the first 20 ms frame louder than a tenth of the clip's loud
    frames (informational timing only)."""
    frames = audio[: audio.size // 320 * 320].astype(np.float32).reshape(-1, 320)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    loud = np.flatnonzero(rms > 0.1 * np.percentile(rms, 95))
    return int(loud[0]) * 320 if loud.size else 0


@pytest.fixture(scope="module")
def backend(whisper_engine: Callable[..., Any]) -> WhisperBackend:
    """The production pools on the session's shared engines (loaded once)."""
    engines = {(m, "int8"): whisper_engine(m) for m in ("base", "tiny.en")}
    return WhisperBackend(pools_spec=dict(DEFAULT_POOLS), _engines=engines)


def _words(text: str) -> list[str]:
    return normalize_english(text).split()


def _utterances(r: StreamResult) -> list[dict[str, Any]]:
    """One dict per final: its partials (event, arrival s) that came before it."""
    partials: dict[int, list[tuple[dict[str, Any], float]]] = {}
    out = []
    for e, t in zip(r.events, r.arrival_s, strict=True):
        if e["type"] == "asr_partial":
            partials.setdefault(e["utterance"], []).append((e, t))
        elif e["type"] == "asr_final":
            out.append({"final": e, "final_s": t, "partials": partials.pop(e["utterance"], [])})
    return out


def _report(utts: list[dict[str, Any]], onsets: tuple[float, ...]) -> str:
    """One line per utterance: its span, first partial after its onset, final after its
    end, partial count and text."""
    lines = []
    for u in utts:
        f = u["final"]
        s, e = f["start_ms"] / 1000, f["end_ms"] / 1000
        # The speech onset of this utterance: the first clip onset inside it (or its start).
        onset = next((o for o in onsets if s - 0.5 <= o <= e), s)
        first = u["partials"][0][1] - onset if u["partials"] else None
        lines.append(
            f"[{s:6.2f}-{e:6.2f}] first partial "
            f"{'none' if first is None else f'{first * 1000:5.0f} ms'} after onset, "
            f"final {1000 * (u['final_s'] - e):5.0f} ms after end, "
            f"{len(u['partials'])} partials: {f['text']!r}"
            + (f" (last partial {u['partials'][-1][0]['text']!r})" if u["partials"] else ""))
    return "\n".join(lines)


@dataclass
class Run:
    """One real-time session and what it is compared with."""

    result: StreamResult
    utterances: list[dict[str, Any]]
    stream: WordErrors  # the finals against the reference text
    offline: WordErrors  # the offline decode against the reference text
    report: str  # for every failure message


async def _stream_once(backend: WhisperBackend, archive: Path,
                       whisper_engine: Callable[..., Any]) -> Run:
    from gateway.config import GatewayConfig
    from gateway.server import serve as serve_gateway

    audio, reference, onsets = long_form()
    async with trio.open_nursery() as nursery:
        # Warm-up, so no first-decode costs. Finals stay on base (no ``degrade_finals``):
        # on a busy machine one session can look past capacity, and a final on tiny.en
        # would make the WER comparison a matter of timing.
        app, asr_port = await nursery.start(functools.partial(
            serve, backend, AsrServerConfig(port=0, degrade_finals=False)))
        await app.ready_event.wait()
        cfg = GatewayConfig.load(env={}, overrides={
            "port": 0, "http_port": 0, "archive_dir": str(archive),
            "asr_urls": f"http://127.0.0.1:{asr_port}"})
        ws_port, _ = await nursery.start(functools.partial(
            serve_gateway, cfg, vad=VadService(VadModel())))
        t0 = time.perf_counter()
        r = await stream_audio(f"ws://127.0.0.1:{ws_port}/ws/stream", audio,
                               realtime=True, chunk_ms=20,
                               start={"hints": {"user_lang_pref": "en"}}, timeout_s=150)
        stream_s = time.perf_counter() - t0
        stats = app.scheduler.statistics()
        nursery.cancel_scope.cancel()
    offline = await trio.to_thread.run_sync(functools.partial(
        whisper_engine("base").transcribe, audio.astype(np.float32) / 32768.0,
        language="en"))
    utts = _utterances(r)
    stream_we = word_errors(reference, r.transcript)
    offline_we = word_errors(reference, offline.text)
    apart = word_errors(offline.text, r.transcript)
    partial_s = [t for e, t in zip(r.events, r.arrival_s, strict=True)
                 if e["type"] == "asr_partial"]
    closest = np.diff(partial_s).min() * 1000 if len(partial_s) > 1 else math.nan
    report = (f"\n{_report(utts, onsets)}\nstream {stream_s:.1f} s for "
              f"{audio.size / SR:.1f} s of audio; WER stream {stream_we.wer:.3f} "
              f"({stream_we.errors}/{stream_we.ref_words}), offline {offline_we.wer:.3f} "
              f"({offline_we.errors}), stream against offline {apart.wer:.3f}; "
              f"{len(partial_s)} partials, the closest {closest:.0f} ms apart\n"
              f"stream:  {r.transcript}\noffline: {offline.text}\nscheduler: {stats}")
    print(report)
    return Run(r, utts, stream_we, offline_we, report)


@pytest.fixture(scope="module")
def run(backend: WhisperBackend, tmp_path_factory: pytest.TempPathFactory,
        whisper_engine: Callable[..., Any]) -> Run:
    """The session, streamed once (a minute) for all the tests below."""
    audio = long_form()[0]
    assert 40 <= audio.size / SR <= 60, audio.size / SR
    return trio.run(_stream_once, backend, tmp_path_factory.mktemp("archive"),
                    whisper_engine)


def test_session_ends_cleanly_cut_into_utterances(run: Run) -> None:
    r = run.result
    assert r.of("end")[0]["reason"] == "flush", run.report
    assert not r.of("error"), (r.of("error"), run.report)
    assert len(run.utterances) >= 5, run.report  # endpointing did cut the stream
    assert all(f["lang"] == "en" for f in r.of("asr_final")), run.report


def test_every_utterance_gets_a_partial_before_its_final(run: Run) -> None:
    missing = [f"utterance {u['final']['utterance']} ({u['final']['start_ms']}-"
               f"{u['final']['end_ms']} ms, {u['final']['text']!r})"
               for u in run.utterances
               if u["final"]["end_ms"] - u["final"]["start_ms"] > 500 and not u["partials"]]
    assert not missing, f"no partial before the final of {missing}" + run.report


def test_partials_respect_partial_interval_ms(run: Run) -> None:
    """Between any two partials of the session, as the ack says."""
    r = run.result
    interval = r.of("ack")[0]["session"]["partial_interval_ms"] / 1000
    times = [t for e, t in zip(r.events, r.arrival_s, strict=True)
             if e["type"] == "asr_partial"]
    gaps = np.diff(times)
    assert gaps.size, run.report
    assert gaps.min() >= interval - INTERVAL_TOLERANCE_S, (
        f"two partials {gaps.min() * 1000:.0f} ms apart (PARTIAL_INTERVAL_MS "
        f"{interval * 1000:.0f})" + run.report)


def test_no_partial_is_only_punctuation_or_a_silence_phrase(run: Run) -> None:
    problems = []
    for u in run.utterances:
        final_words = _words(u["final"]["text"])
        for p, _ in u["partials"]:
            said = " ".join(_words(p["text"]))
            if said in SILENCE_PHRASES and said != " ".join(final_words):
                problems.append(f"partial {p['text']!r} before {u['final']['text']!r}")
    assert not problems, "\n".join(problems) + run.report


def test_last_partial_says_what_its_final_supports(run: Run) -> None:
    problems = []
    for u in run.utterances:
        if u["partials"]:
            # What the last partial says that its final does not: substituted and
            # inserted words against the final (missing words are not counted: the
            # final has more audio).
            last = u["partials"][-1][0]["text"]
            we = word_errors(u["final"]["text"], last)
            if we.substitutions + we.insertions > max(
                    LAST_PARTIAL_SLACK_WORDS, LAST_PARTIAL_SLACK_SHARE * len(_words(last))):
                problems.append(f"last partial {last!r} against its final "
                                f"{u['final']['text']!r}: {we}")
    assert not problems, "\n".join(problems) + run.report


def test_finals_within_two_points_of_the_offline_decode(run: Run) -> None:
    assert run.stream.wer <= run.offline.wer + WER_SLACK, run.report
    assert run.stream.wer <= STREAM_WER_MEASURED + WER_SLACK, run.report
