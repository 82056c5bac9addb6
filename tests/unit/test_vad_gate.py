"""VadStream's buffer and RMS silence gate, and VadBatcher with gated windows."""

from __future__ import annotations

import numpy as np
import pytest

from bench.load import material
from stages.endpoint import EndpointConfig, Endpointer
from stages.vad import (
    DEFAULT_GATE_DBFS,
    WINDOW_SAMPLES,
    VadBatcher,
    VadModel,
    VadStream,
    VadWindow,
)


@pytest.fixture(scope="module")
def model() -> VadModel:
    return VadModel()


@pytest.mark.parametrize("chunks", [[320] * 8, [1, 511, 512, 700, 3], [2048], [100] * 30])
def test_windows_are_the_fed_samples_in_order(chunks: list[int]) -> None:
    rng = np.random.default_rng(len(chunks))
    audio = rng.integers(-32768, 32767, sum(chunks), dtype=np.int16)
    s = VadStream()
    pos, windows = 0, []
    for n in chunks:
        s.feed(audio[pos:pos + n])
        pos += n
        while s.ready:
            windows.append(s.take_window())
    whole = len(audio) // WINDOW_SAMPLES
    assert len(windows) == whole and s.ready == 0
    expect = audio.astype(np.float32) / 32768
    for k, w in enumerate(windows):
        assert w.shape == (576,)
        np.testing.assert_array_equal(w[64:], expect[k * 512:(k + 1) * 512])
        ctx = expect[k * 512 - 64:k * 512] if k else np.zeros(64, np.float32)
        np.testing.assert_array_equal(w[:64], ctx)


def test_take_window_without_a_window_raises() -> None:
    s = VadStream()
    s.feed(np.zeros(100, np.int16))
    with pytest.raises(ValueError):
        s.take_window()


@pytest.mark.parametrize("bad", [1.0, -121.0])
def test_gate_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError):
        VadStream(gate_dbfs=bad)


def test_gate_threshold_is_rms_in_dbfs() -> None:
    s = VadStream(gate_dbfs=-40.0)
    quiet = np.full(576, 10 ** (-41 / 20), np.float32)  # RMS -41 dBFS
    loud = np.full(576, 10 ** (-39 / 20), np.float32)
    assert s.is_silent(quiet) and not s.is_silent(loud)
    assert not VadStream().is_silent(quiet * 0)


def test_gated_windows_skip_the_model(model: VadModel) -> None:
    silent, ungated = VadStream(gate_dbfs=DEFAULT_GATE_DBFS), VadStream(gate_dbfs=None)
    for s in (silent, ungated):
        s.feed(np.zeros(4 * WINDOW_SAMPLES, np.int16))
    b = VadBatcher(model)
    out = b.run([silent])
    assert out == [[VadWindow(512 * (k + 1), 0.0) for k in range(4)]]
    assert b.calls == 0 and b.gated == 4 and silent.gated == 4 and silent.position == 2048
    out = b.run([ungated])
    assert b.calls == 4 and len(out[0]) == 4 and ungated.gated == 0


def test_mixed_batch_keeps_each_streams_order(model: VadModel) -> None:
    rng = np.random.default_rng(3)
    loud = rng.normal(0, 3000, 3 * WINDOW_SAMPLES).astype(np.int16)
    a, b_ = VadStream(gate_dbfs=-60.0), VadStream(gate_dbfs=-60.0)
    a.feed(np.concatenate([np.zeros(WINDOW_SAMPLES, np.int16), loud[:2 * WINDOW_SAMPLES]]))
    b_.feed(loud)
    batcher = VadBatcher(model)
    ra, rb = batcher.run([a, b_])
    assert [w.end for w in ra] == [512, 1024, 1536] and ra[0].prob == 0.0
    assert [w.end for w in rb] == [512, 1024, 1536]
    assert batcher.gated == 1 and batcher.windows == 5


def test_default_gate_keeps_every_utterance_of_the_librivox_clips(model: VadModel) -> None:
    """The measurement behind DEFAULT_GATE_DBFS: read speech with quiet pauses gives the
    same endpointer events with and without the gate, while the pauses are gated."""
    audio = material()
    cfg = EndpointConfig(threshold=0.5, neg_threshold=0.35, min_speech_ms=250,
                         endpoint_silence_ms=700, preroll_ms=300, max_utterance_s=20.0)

    def events(gate: float | None) -> tuple[list[object], int]:
        s = VadStream(gate_dbfs=gate)
        for i in range(0, len(audio) - 319, 320):
            s.feed(audio[i:i + 320])
        ep = Endpointer(cfg)
        evs: list[object] = []
        for w in VadBatcher(model).run([s])[0]:
            evs += ep.feed(w)
        return evs, s.gated

    ref, none_gated = events(None)
    got, gated = events(DEFAULT_GATE_DBFS)
    assert none_gated == 0 and len(ref) >= 8
    assert got == ref
    assert gated > 0.15 * len(audio) / WINDOW_SAMPLES  # the pauses did skip the model


async def test_vad_service_callback_gets_the_windows_on_its_tick(model: VadModel) -> None:
    """``register(on_windows=...)``: decisions arrive by a call on the tick (no channel),
    in order; a callback that raises fails its own session only."""
    import trio

    from gateway.vadservice import VadFailed, VadService

    rng = np.random.default_rng(4)
    loud = rng.normal(0, 3000, 6 * WINDOW_SAMPLES).astype(np.int16)
    vad = VadService(model, gate_dbfs=None)
    got: list[object] = []

    def boom(decided: object) -> None:
        raise RuntimeError("session bug")

    with pytest.raises(ValueError):
        vad.register()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            await n.start(vad.run)
            ok = vad.register(on_windows=got.append)
            bad = vad.register(on_windows=boom)
            for c in (ok, bad):
                c.stream.feed(loud[:3 * WINDOW_SAMPLES])
            vad.poke()
            while sum(len(x) for x in got if isinstance(x, list)) < 3:
                await trio.sleep(0.01)
            assert bad.closed and not ok.closed
            assert vad.stats.failed_callbacks == 1 and vad.stats.failed_ticks == 0
            ok.stream.feed(loud[3 * WINDOW_SAMPLES:])
            vad.poke()
            while sum(len(x) for x in got if isinstance(x, list)) < 6:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
    windows = [w for x in got if isinstance(x, list) for w in x]
    assert not any(isinstance(x, VadFailed) for x in got)
    assert [w.end for w in windows] == [512 * (k + 1) for k in range(6)]
