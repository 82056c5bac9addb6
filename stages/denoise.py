"""Noise suppression between the speech gate and the ASR link, sans-IO.

:class:`DenoiseStage` runs one session's RNNoise (:class:`native.Denoiser`, 16 kHz
front end) over the frames the gate sends to recognition. The native path delays its
output by :data:`DELAY_SAMPLES` (360 samples, 22.5 ms); the stage undoes that, so a
frame it returns with ``start=s`` holds the denoised version of input samples
``[s, s + 320)``, and every timestamp downstream stays right. To do so it holds back
:data:`HOLD_FRAMES` frames (40 ms) while an utterance runs and releases each one as
later input arrives; :meth:`DenoiseStage.flush` at the end of an utterance pushes the
held tail out by feeding silence, so an utterance leaves with exactly the frames that
went in, with the same starts. A hole in an utterance's frames is handled the same
way: the frames before it leave as at an utterance's end, and a new run starts.

One RNNoise state serves the whole session, so its picture of the noise carries over
from one utterance to the next. Audio does not: the silence fed by ``flush`` fills the
native delay line, so the first frames of the next utterance hold none of the last one.

The stage keeps counters for the shell (``statistics()``): frames, and the time spent
in the native call. Timing is the one clock read here; it only feeds those counters,
never what comes out, and tests inject fake clocks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import numpy as np
import numpy.typing as npt

from native import Denoiser

from .reframe import FRAME_SAMPLES, SAMPLE_RATE, PcmFrame

#: Delay of the native 16 kHz path (resampler up, RNNoise, resampler down), in samples.
DELAY_SAMPLES: Final[int] = Denoiser.delay_16k
#: The same delay in ms (22.5).
DELAY_MS: Final[float] = DELAY_SAMPLES * 1000 / SAMPLE_RATE
#: Frames held back while an utterance runs: the delay rounded up to whole frames.
HOLD_FRAMES: Final[int] = -(-DELAY_SAMPLES // FRAME_SAMPLES)

_SILENCE: Final = np.zeros(FRAME_SAMPLES, dtype=np.int16)
_EMPTY: Final = np.zeros(0, dtype=np.int16)


@dataclass(frozen=True)
class DenoiseStats:
    """Counters of one :class:`DenoiseStage`.

    Attributes:
        frames_in: frames given to ``feed``.
        frames_out: frames returned by ``feed`` and ``flush``.
        frames_processed: native calls, including the silence ``flush`` feeds.
        held_frames: frames taken in and not yet returned.
        utterances: flushes that released at least one frame.
        discontinuities: frames that did not start where the previous one ended, within
            an utterance (each started a new run).
        wall_s: wall time spent in the native call, in seconds.
        cpu_s: CPU time of the calling thread spent in the native call, in seconds.
        last_frame_ms: wall time of the latest native call, in ms (0 before the first).
        delay_ms: the algorithmic delay the stage compensates, in ms.
    """

    frames_in: int
    frames_out: int
    frames_processed: int
    held_frames: int
    utterances: int
    discontinuities: int
    wall_s: float
    cpu_s: float
    last_frame_ms: float
    delay_ms: float

    @property
    def cpu_ms_per_audio_s(self) -> float:
        """CPU ms per second of audio taken in (0 before the first frame)."""
        audio_s = self.frames_in * FRAME_SAMPLES / SAMPLE_RATE
        return self.cpu_s * 1000 / audio_s if audio_s else 0.0


class DenoiseStage:
    """One session's denoiser: 20 ms frames of an utterance in, aligned denoised frames out.

    Feed the frames of an utterance in order, then call :meth:`flush`. The next
    utterance may start anywhere.

    Args:
        clock: wall clock for the latency counters (seconds).
        cpu_clock: CPU clock of the calling thread for the cost counters (seconds);
            per thread, because the gateway's process runs model threads too.

    Raises:
        RNNoiseUnavailableError: the RNNoise library is missing or unusable.
        MemoryError: the native state could not be created.
    """

    delay_samples: Final = DELAY_SAMPLES
    delay_ms: Final = DELAY_MS
    hold_frames: Final = HOLD_FRAMES

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self._dn = Denoiser()
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._starts: deque[int] = deque()  # starts of the frames held back
        self._next: int | None = None  # where the next frame must start; None between
        self._skip = 0  # native output still to drop: the delay, at an utterance's start
        self._tail = _EMPTY  # aligned denoised samples not yet returned
        self._frames_in = 0
        self._frames_out = 0
        self._processed = 0
        self._utterances = 0
        self._discontinuities = 0
        self._wall_s = 0.0
        self._cpu_s = 0.0
        self._last_ms = 0.0

    def feed(self, frame: PcmFrame) -> list[PcmFrame]:
        """Take one frame of the current utterance; return the frames now ready.

        A frame that does not start where the previous one ended (audio missing within
        the utterance) is taken as the start of a new run: the frames held are pushed
        out first, as by :meth:`flush`, and counted in ``discontinuities``. Every frame
        still comes out once, aligned, with its own start.

        Args:
            frame: 320 int16 samples; the first frame of an utterance may start
                anywhere.

        Returns:
            Denoised frames, oldest first, each with the ``start`` of the input frame
            it comes from. Empty for the first :data:`HOLD_FRAMES` frames of an utterance.

        Raises:
            ValueError: wrong length or dtype; nothing is taken in.
            NativeClosedError: the stage is closed.
        """
        samples = frame.samples
        if samples.dtype != np.int16 or samples.shape != (FRAME_SAMPLES,):
            raise ValueError(
                f"DenoiseStage.feed: expected {FRAME_SAMPLES} int16 samples, got "
                f"{samples.dtype} of shape {samples.shape}"
            )
        out: list[PcmFrame] = []
        if self._next is not None and frame.start != self._next:
            # A hole in the audio (or an overlap): RNNoise must not join the two sides,
            # so the run ends here as at an utterance's end, and a new one starts.
            self._discontinuities += 1
            out = self._end_run()
        if self._next is None:
            self._skip = DELAY_SAMPLES
        self._run(np.ascontiguousarray(samples))
        self._next = frame.end
        self._starts.append(frame.start)
        self._frames_in += 1
        return out + self._release()

    def flush(self) -> list[PcmFrame]:
        """End of the utterance: return every frame still held, denoised and aligned.

        Feeds silence through the native path until the held frames are out; the
        RNNoise state is kept for the next utterance. A no-op between utterances.

        Raises:
            NativeClosedError: the stage is closed while frames are held.
        """
        out = self._end_run()
        if out:
            self._utterances += 1
        return out

    def close(self) -> None:
        """Free the native state; frames still held are dropped. Safe to call twice."""
        self._dn.close()
        self._starts.clear()
        self._next = None
        self._tail = _EMPTY

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has run."""
        return self._dn.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def statistics(self) -> DenoiseStats:
        """The counters so far."""
        return DenoiseStats(
            frames_in=self._frames_in,
            frames_out=self._frames_out,
            frames_processed=self._processed,
            held_frames=len(self._starts),
            utterances=self._utterances,
            discontinuities=self._discontinuities,
            wall_s=self._wall_s,
            cpu_s=self._cpu_s,
            last_frame_ms=self._last_ms,
            delay_ms=DELAY_MS,
        )

    def _run(self, samples: npt.NDArray[np.int16]) -> None:
        """One native call; its output joins the tail, minus the delay still to drop."""
        t0, c0 = self._clock(), self._cpu_clock()
        y, _vad = self._dn.process_16k(samples)
        c1, t1 = self._cpu_clock(), self._clock()
        self._processed += 1
        self._wall_s += t1 - t0
        self._cpu_s += c1 - c0
        self._last_ms = (t1 - t0) * 1000
        if self._skip:
            drop = min(self._skip, len(y))
            self._skip -= drop
            y = y[drop:]
        self._tail = np.concatenate((self._tail, y)) if len(self._tail) else y

    def _end_run(self) -> list[PcmFrame]:
        """Push the held frames out with silence; the next frame starts a new run."""
        out: list[PcmFrame] = []
        while self._starts:
            self._run(_SILENCE)
            out += self._release()
        self._next = None
        self._tail = _EMPTY  # the denoised silence past the last frame
        return out

    def _release(self) -> list[PcmFrame]:
        """The held frames whose aligned samples are all in the tail."""
        out = []
        while self._starts and len(self._tail) >= FRAME_SAMPLES:
            out.append(PcmFrame(self._starts.popleft(), self._tail[:FRAME_SAMPLES].copy()))
            self._tail = self._tail[FRAME_SAMPLES:]
        self._frames_out += len(out)
        return out
