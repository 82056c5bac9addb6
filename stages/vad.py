"""Silero VAD, batched across sessions, sans-IO.

The model is the Silero VAD ONNX file shipped inside the ``silero-vad`` wheel (installed
with ``--no-deps``; its Python side needs torch, which we never import). onnxruntime runs
it directly.

One ``VadStream`` per session cuts its 16 kHz audio into 512-sample windows (each fed
with the 64 samples before it as context, as the model expects) and keeps the model's
recurrent state. ``VadBatcher.run`` evaluates the pending windows of *all* streams with one
ONNX call per window depth, which is where the saving is: a per-session call costs a
fixed ~100 µs of overhead 31 times a second per session, a batched call pays it once per
tick. The Trio shell calls ``run`` from a worker thread once per tick.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 512  # 32 ms: the window Silero VAD is trained on at 16 kHz
CONTEXT_SAMPLES = 64
STATE_SHAPE = (2, 128)  # per stream: the model's state is [2, batch, 128]
MODEL_FILE = "silero_vad.onnx"
# The RMS silence gate's default, dBFS of a 32 ms window. Measured on the LibriVox
# clips with pauses of -61 dBFS noise (``bench/stage_cost.py --gate-sweep``): the
# quietest window Silero scores as speech (p >= 0.35) is at -55 dBFS; the endpointer's
# utterances are identical to the ungated ones with any gate from -50 down (-45 changes
# them). -60 keeps 5 dB below the quietest speech window and 10 dB below the first gate
# that changed anything; it decides quiet rooms and digital silence, nothing louder.
DEFAULT_GATE_DBFS = -60.0


class VadModelMissing(ImportError):
    """The silero-vad wheel (or its ONNX file) is not installed."""


def model_path() -> Path:
    """Locate the Silero VAD ONNX file inside the installed ``silero-vad`` wheel.

    Raises:
        VadModelMissing: with the command that installs it.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadModelMissing(
            "the silero-vad wheel is not installed: pip install --no-deps silero-vad==6.2.3"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / MODEL_FILE
    if not path.is_file():
        raise VadModelMissing(f"{path} is missing: reinstall silero-vad==6.2.3 --no-deps")
    return path


class VadModel:
    """The ONNX session, shared by every stream of the process.

    Args:
        path: an ONNX file with Silero's interface; defaults to the packaged one.
        threads: intra-op threads (1: VAD runs beside recognition, and it is tiny).
    """

    def __init__(self, path: Path | None = None, *, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # the packaged graph carries unused initializers
        self._session: Any = ort.InferenceSession(
            str(path or model_path()), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def run(
        self, windows: npt.NDArray[np.float32], state: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Evaluate ``[B, 576]`` windows (context + 512 new samples) with ``[2, B, 128]`` state.

        Returns:
            Speech probabilities ``[B]`` and the new state ``[2, B, 128]``.
        """
        prob, new_state = self._session.run(
            None, {"input": windows, "state": state, "sr": self._sr}
        )
        return prob[:, 0].astype(np.float32), new_state.astype(np.float32)


@dataclass(frozen=True)
class VadWindow:
    """One VAD decision: the speech probability of samples ``[end - 512, end)``."""

    end: int
    prob: float


class VadStream:
    """One session's VAD state: pending samples, context and recurrent state.

    ``feed`` (the session, on the event loop) and ``take_window`` (the batcher, perhaps
    in a worker thread) may run at the same time; a lock keeps the pending buffer whole.
    Without it a feed that lands between the batcher's read and write of the buffer is
    lost, and the session's decisions drift from its audio.

    Args:
        gate_dbfs: the RMS silence gate. A window whose new 512 samples are quieter than
            this (dB relative to int16 full scale) is decided as silence (probability 0)
            without running the model; its recurrent state is kept as it was. ``None``
            runs the model on every window. ``DEFAULT_GATE_DBFS`` is measured on the
            LibriVox clips (see its comment).
    """

    def __init__(self, *, gate_dbfs: float | None = None) -> None:
        if gate_dbfs is not None and not -120.0 <= gate_dbfs <= 0.0:
            raise ValueError(f"gate_dbfs must be in -120..0 dBFS or None, got {gate_dbfs}")
        self._lock = threading.Lock()
        # Pending samples live in a buffer that grows by doubling and is compacted when
        # a window is taken: one copy per 20 ms frame instead of a new array each time.
        self._buf = np.zeros(4 * WINDOW_SAMPLES, dtype=np.float32)
        self._n = 0
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.position = 0  # session samples consumed by finished windows
        # mean square of a window (float scale, full scale 1.0) below which it is gated
        self.gate_ms = None if gate_dbfs is None else 10.0 ** (gate_dbfs / 10.0)
        self.gated = 0  # windows decided by the gate, not the model

    def feed(self, samples: npt.NDArray[np.int16]) -> None:
        """Queue int16 samples; they are evaluated at the next ``VadBatcher.run``."""
        n = len(samples)
        with self._lock:
            end = self._n + n
            if end > len(self._buf):
                grown = np.zeros(max(2 * len(self._buf), end), dtype=np.float32)
                grown[:self._n] = self._buf[:self._n]
                self._buf = grown
            np.multiply(samples, np.float32(1.0 / 32768.0), out=self._buf[self._n:end],
                        casting="unsafe")
            self._n = end

    @property
    def ready(self) -> int:
        """Whole windows waiting to be evaluated."""
        return self._n // WINDOW_SAMPLES

    def take_window(self) -> npt.NDArray[np.float32]:
        """The next window with its context (576 samples); advances the context."""
        window = np.empty(CONTEXT_SAMPLES + WINDOW_SAMPLES, dtype=np.float32)
        window[:CONTEXT_SAMPLES] = self._context
        with self._lock:
            if self._n < WINDOW_SAMPLES:
                raise ValueError("no whole window pending")
            window[CONTEXT_SAMPLES:] = self._buf[:WINDOW_SAMPLES]
            rest = self._n - WINDOW_SAMPLES
            self._buf[:rest] = self._buf[WINDOW_SAMPLES:self._n]
            self._n = rest
        self._context = window[-CONTEXT_SAMPLES:].copy()
        return window

    def is_silent(self, window: npt.NDArray[np.float32]) -> bool:
        """Whether the gate decides ``window`` (from ``take_window``) without the model."""
        if self.gate_ms is None:
            return False
        new = window[CONTEXT_SAMPLES:]
        return bool(float(np.dot(new, new)) < self.gate_ms * WINDOW_SAMPLES)

    def reset(self) -> None:
        """Forget the recurrent state (e.g. after a long gap)."""
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)


class VadBatcher:
    """Runs every stream's pending windows, one ONNX call per window depth."""

    def __init__(self, model: VadModel) -> None:
        self.model = model
        self.calls = 0
        self.windows = 0
        self.gated = 0

    def run(self, streams: Sequence[VadStream]) -> list[list[VadWindow]]:
        """Evaluate all whole windows of ``streams``; return each stream's decisions.

        Windows the streams' silence gates decide never reach the model; a depth where
        every window is gated makes no ONNX call at all.
        """
        results: list[list[VadWindow]] = [[] for _ in streams]
        while True:
            active = [i for i, s in enumerate(streams) if s.ready]
            if not active:
                return results
            run_idx: list[int] = []
            run_win: list[npt.NDArray[np.float32]] = []
            for i in active:
                s = streams[i]
                w = s.take_window()
                if s.is_silent(w):
                    s.position += WINDOW_SAMPLES
                    s.gated += 1
                    self.gated += 1
                    results[i].append(VadWindow(s.position, 0.0))
                else:
                    run_idx.append(i)
                    run_win.append(w)
            if not run_idx:
                continue
            state = np.stack([streams[i].state for i in run_idx], axis=1)
            probs, new_state = self.model.run(np.stack(run_win), state)
            self.calls += 1
            self.windows += len(run_idx)
            for j, i in enumerate(run_idx):
                s = streams[i]
                s.state = np.ascontiguousarray(new_state[:, j])
                s.position += WINDOW_SAMPLES
                results[i].append(VadWindow(s.position, float(probs[j])))
