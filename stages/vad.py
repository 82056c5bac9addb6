"""Silero VAD, batched across sessions, sans-IO.

The model is the Silero VAD ONNX file shipped inside the ``silero-vad`` wheel (installed
with ``--no-deps``; its Python side needs torch, which we never import). onnxruntime runs
it directly.

One ``VadStream`` per session cuts its 16 kHz audio into 512-sample windows (each fed
with the 64 samples before it as context, as the model expects) and keeps the model's
recurrent state. ``VadBatcher.run`` evaluates the pending windows of *all* streams with one
ONNX call per window depth, which is where the saving is: a per-session call costs a
fixed ~100 µs of overhead 31 times a second per session, a batched call pays it once per
tick. The Trio shell (``gateway.vadservice``) calls ``run`` once per tick.
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
_SCALE = np.float32(1.0 / 32768.0)  # int16 to the model's float scale (exact)


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
        return (prob[:, 0].astype(np.float32, copy=False),
                new_state.astype(np.float32, copy=False))


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
        # The buffer holds the next window's 64 context samples, then the pending ones,
        # as int16: a window is one slice ``[0, 576)`` of it, and taking one moves what
        # follows 512 samples down (context included). It grows by doubling; a 20 ms
        # frame costs one plain copy. The batch converts its windows to float at once.
        self._buf = np.zeros(4 * WINDOW_SAMPLES, dtype=np.int16)
        self._n = CONTEXT_SAMPLES  # used length of _buf, context included
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.position = 0  # session samples consumed by finished windows
        # mean square of a window (float scale, full scale 1.0) below which it is gated
        self.gate_ms = None if gate_dbfs is None else 10.0 ** (gate_dbfs / 10.0)
        # the sum of squares of a window's new samples below which it is gated (-1: off)
        self._gate_energy = -1.0 if self.gate_ms is None else self.gate_ms * WINDOW_SAMPLES
        self.gated = 0  # windows decided by the gate, not the model

    def feed(self, samples: npt.NDArray[np.int16]) -> None:
        """Queue int16 samples; they are evaluated at the next ``VadBatcher.run``."""
        n = len(samples)
        with self._lock:
            start = self._n
            end = start + n
            if end > len(self._buf):
                grown = np.zeros(max(2 * len(self._buf), end), dtype=np.int16)
                grown[:start] = self._buf[:start]
                self._buf = grown
            self._buf[start:end] = samples
            self._n = end

    @property
    def ready(self) -> int:
        """Whole windows waiting to be evaluated."""
        return (self._n - CONTEXT_SAMPLES) // WINDOW_SAMPLES

    def _take_into(self, row: npt.NDArray[Any]) -> None:
        """Copy the next window with its context, as int16 samples, into ``row`` (576
        samples) and advance."""
        with self._lock:
            n = self._n
            if n < CONTEXT_SAMPLES + WINDOW_SAMPLES:
                raise ValueError("no whole window pending")
            buf = self._buf
            row[:] = buf[:CONTEXT_SAMPLES + WINDOW_SAMPLES]
            rest = n - WINDOW_SAMPLES  # the new context and what follows the window
            buf[:rest] = buf[WINDOW_SAMPLES:n]
            self._n = rest

    def take_window(self) -> npt.NDArray[np.float32]:
        """The next window with its context (576 samples); advances the context."""
        window = np.empty(CONTEXT_SAMPLES + WINDOW_SAMPLES, dtype=np.int16)
        self._take_into(window)
        return window * _SCALE

    def is_silent(self, window: npt.NDArray[np.float32]) -> bool:
        """Whether the gate decides ``window`` (from ``take_window``) without the model."""
        if self.gate_ms is None:
            return False
        new = window[CONTEXT_SAMPLES:]
        return bool(float(np.dot(new, new)) < self._gate_energy)

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
        every window is gated makes no ONNX call at all. Per depth the windows are
        copied into one ``[B, 576]`` array, gated with one vectorised energy, and the
        model runs on the rest: no per-window arrays or calls besides the copy.
        """
        results: list[list[VadWindow]] = [[] for _ in streams]
        active = [(i, s) for i, s in enumerate(streams)
                  if s._n >= CONTEXT_SAMPLES + WINDOW_SAMPLES]
        while active:
            b = len(active)
            pcm = np.empty((b, CONTEXT_SAMPLES + WINDOW_SAMPLES), dtype=np.int16)
            for row, (_, s) in zip(pcm, active, strict=True):
                s._take_into(row)
            win = pcm * _SCALE  # float32 in [-1, 1): one conversion for the batch
            new = win[:, CONTEXT_SAMPLES:]
            energy = np.einsum("ij,ij->i", new, new).tolist()
            run_pos: list[int] = []
            for k, (i, s) in enumerate(active):
                s.position += WINDOW_SAMPLES
                if energy[k] < s._gate_energy:
                    s.gated += 1
                    results[i].append(VadWindow(s.position, 0.0))
                else:
                    run_pos.append(k)
            n_gated = b - len(run_pos)
            self.gated += n_gated
            if run_pos:
                run = win if not n_gated else win[run_pos]
                state = np.empty((STATE_SHAPE[0], len(run_pos), STATE_SHAPE[1]),
                                 dtype=np.float32)
                for j, k in enumerate(run_pos):
                    state[:, j] = active[k][1].state
                probs, new_state = self.model.run(run, state)
                self.calls += 1
                self.windows += len(run_pos)
                for j, (k, p) in enumerate(zip(run_pos, probs.tolist(), strict=True)):
                    i, s = active[k]
                    s.state = new_state[:, j]  # a view; the next depth copies it in
                    results[i].append(VadWindow(s.position, p))
            active = [a for a in active if a[1]._n >= CONTEXT_SAMPLES + WINDOW_SAMPLES]
        return results
