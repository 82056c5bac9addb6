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

    ``feed`` (the session, on the event loop) and ``take_window`` (the batcher, in a
    worker thread) may run at the same time; a lock keeps the pending buffer whole.
    Without it a feed that lands between the batcher's read and write of the buffer is
    lost, and the session's decisions drift from its audio.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = np.zeros(0, dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.position = 0  # session samples consumed by finished windows

    def feed(self, samples: npt.NDArray[np.int16]) -> None:
        """Queue int16 samples; they are evaluated at the next ``VadBatcher.run``."""
        f = samples.astype(np.float32) * np.float32(1.0 / 32768.0)
        with self._lock:
            self._pending = np.concatenate((self._pending, f))

    @property
    def ready(self) -> int:
        """Whole windows waiting to be evaluated."""
        return len(self._pending) // WINDOW_SAMPLES

    def take_window(self) -> npt.NDArray[np.float32]:
        """The next window with its context (576 samples); advances the context."""
        with self._lock:
            new = self._pending[:WINDOW_SAMPLES]
            self._pending = self._pending[WINDOW_SAMPLES:]
        window = np.concatenate((self._context, new))
        self._context = new[-CONTEXT_SAMPLES:].copy()
        return window

    def reset(self) -> None:
        """Forget the recurrent state (e.g. after a long gap)."""
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)


class VadBatcher:
    """Runs every stream's pending windows, one ONNX call per window depth."""

    def __init__(self, model: VadModel) -> None:
        self.model = model
        self.calls = 0
        self.windows = 0

    def run(self, streams: Sequence[VadStream]) -> list[list[VadWindow]]:
        """Evaluate all whole windows of ``streams``; return each stream's decisions."""
        results: list[list[VadWindow]] = [[] for _ in streams]
        while True:
            active = [i for i, s in enumerate(streams) if s.ready]
            if not active:
                return results
            windows = np.stack([streams[i].take_window() for i in active])
            state = np.stack([streams[i].state for i in active], axis=1)
            probs, new_state = self.model.run(windows, state)
            self.calls += 1
            self.windows += len(active)
            for j, i in enumerate(active):
                s = streams[i]
                s.state = np.ascontiguousarray(new_state[:, j])
                s.position += WINDOW_SAMPLES
                results[i].append(VadWindow(s.position, float(probs[j])))
