"""Native cost floor: microseconds per frame for every native call the pipeline makes.

Run from the repository root: ``.venv/bin/python bench/native.py``.  Prints the
tables, and writes ``bench/out/native.json`` (and ``native.png`` when matplotlib
is installed).  Audio is real speech (pocketsphinx-testdata), 16 kHz mono, 20 ms
frames unless a row says otherwise.

The archive rows compare the session recorder (``stages.archive.ArchiveEncoder``:
libopus at 16 kHz, CELT, with ``native.ogg``'s muxer), libopusenc (its previous
encoder, which resamples to 48 kHz) and libsndfile through ``soundfile`` (the one before
that), fed the same 20 ms frames in the same run.

Each figure is the best of several repeats of a loop over many frames, timed in
CPU time of the benchmark thread: the minimum is the run least disturbed by other
processes, which is what a floor should report.  "raw" calls ``lib.*`` through
cffi directly, with buffers made in advance, so wrapper/raw is the price of
validation, ownership checks and result objects.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.speech when run as a script

from native import (  # noqa: E402  # noqa: E402
    Denoiser,
    OggOpusWriter,
    OpusDecoder,
    OpusEncoder,
    Resampler,
    ResamplerBank,
    _dsp,
    _opus,
    _rnnoise,
    levels,
    opus_version,
    opusenc_version,
    peak,
    rms,
    s16_to_f32,
)
from stages.archive import DEFAULT_BITRATE, DEFAULT_COMPLEXITY, ArchiveEncoder  # noqa: E402
from tests import speech  # noqa: E402

FRAME = 320  # 20 ms at 16 kHz
BITRATE = 20000  # bit/s, the ASR link default
RNNOISE_FRAMES = 50  # 1 s: RNNoise costs ~0.5 ms per 10 ms frame
OUT = ROOT / "bench" / "out"


def pair_us(
    a: Callable[[int], object], b: Callable[[int], object], calls: int, repeats: int
) -> tuple[float, float]:
    """Best-of-*repeats* mean CPU time of ``a(i)`` and ``b(i)`` for i in range(calls), in
    µs per call.

    CPU time of this thread, not wall time: on a shared machine the wall clock also
    counts the time other processes hold the core.  The two loops alternate, so
    both see the same cache and frequency conditions.
    """
    for fn in (a, b):  # warm caches, branch predictors and lazy allocations
        for i in range(calls):
            fn(i)
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for k, fn in enumerate((a, b)):
            t0 = time.thread_time_ns()
            for i in range(calls):
                fn(i)
            best[k] = min(best[k], (time.thread_time_ns() - t0) / calls / 1000)
    return best[0], best[1]


def speech_frames(seconds: float) -> np.ndarray:
    x = np.concatenate([speech.goforward()] + [a for _, a, _ in speech.librivox()])
    n = int(seconds * 16000) // FRAME
    return np.ascontiguousarray(x[: n * FRAME].reshape(n, FRAME))


# -- cases ----------------------------------------------------------------------------


def opus_rows(frames: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    ffi, lib = _opus.ffi, _opus.lib
    encode, decode = lib.opus_encode, lib.opus_decode
    n = len(frames)
    ptrs = [ffi.from_buffer("opus_int16[]", f) for f in frames]
    buf = ffi.new("unsigned char[]", 1500)
    rows = []
    packets: list[bytes] = []
    for cx in (0, 3, 5, 8, 10):
        enc = OpusEncoder(16000, 1, "voip", bitrate=BITRATE, complexity=cx)
        st = ffi.gc(
            lib.opus_encoder_create(16000, 1, lib.OPUS_APPLICATION_VOIP, ffi.new("int *")),
            lib.opus_encoder_destroy,
        )
        lib.vg_opus_enc_set_bitrate(st, BITRATE)
        lib.vg_opus_enc_set_complexity(st, cx)

        def wrapped(i: int, enc: OpusEncoder = enc) -> bytes:
            return enc.encode(frames[i % n])

        def raw(i: int, st: Any = st) -> int:
            return int(encode(st, ptrs[i % n], FRAME, buf, 1500))

        rows.append(
            row(f"opus encode c{cx} {BITRATE // 1000}k VBR", *pair_us(wrapped, raw, n, repeats))
        )
        if cx == 5:
            enc.reset()
            packets = [enc.encode(f) for f in frames]

    dec = OpusDecoder(16000)
    st = ffi.gc(lib.opus_decoder_create(16000, 1, ffi.new("int *")), lib.opus_decoder_destroy)
    pcm = ffi.new("opus_int16[]", 5760)
    rows.append(
        row(
            "opus decode (c5 stream)",
            *pair_us(
                lambda i: dec.decode(packets[i % n]),
                lambda i: decode(st, packets[i % n], len(packets[i % n]), pcm, 5760, 0),
                n,
                repeats,
            ),
        )
    )
    rows.append(
        row(
            "opus decode PLC (lost packet)",
            *pair_us(
                lambda i: dec.decode(None),
                lambda i: decode(st, ffi.NULL, 0, pcm, FRAME, 0),
                n,
                repeats,
            ),
        )
    )
    return rows


def rnnoise_rows(frames: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    rn_ffi, rn = _rnnoise.ffi, _rnnoise.lib
    dsp_ffi, dsp = _dsp.ffi, _dsp.lib
    process_frame = rn.rnnoise_process_frame
    rows = []
    frames = frames[:RNNOISE_FRAMES]  # RNNoise is the slow one: keep the run short
    n = len(frames)
    f48 = Resampler("up").process(frames.ravel().astype(np.float32)).reshape(-1, 480)
    m = len(f48)
    ptrs = [rn_ffi.from_buffer("float[]", f) for f in f48]
    out = rn_ffi.new("float[]", 480)
    with Denoiser() as d:
        st = rn_ffi.gc(rn.rnnoise_create(rn_ffi.NULL), rn.rnnoise_destroy)
        rows.append(
            row(
                "rnnoise 10 ms @48k (float)",
                *pair_us(
                    lambda i: d.process(f48[i % m]),
                    lambda i: process_frame(st, out, ptrs[i % m]),
                    m,
                    repeats,
                ),
            )
        )

    with Denoiser() as d:
        up = dsp_ffi.gc(dsp.vg_resampler_create(dsp.VG_RESAMPLE_UP), dsp.vg_resampler_destroy)
        down = dsp_ffi.gc(dsp.vg_resampler_create(dsp.VG_RESAMPLE_DOWN), dsp.vg_resampler_destroy)
        st = rn_ffi.gc(rn.rnnoise_create(rn_ffi.NULL), rn.rnnoise_destroy)
        ptrs16 = [dsp_ffi.from_buffer(f) for f in frames]
        buf = dsp_ffi.new("float[]", 960)
        hi = buf + 480
        o16 = dsp_ffi.new("int16_t[]", FRAME)
        rp, s16, f32 = dsp.vg_resampler_process, dsp.VG_S16, dsp.VG_F32

        def raw(i: int) -> None:
            rp(up, ptrs16[i % n], s16, FRAME, buf, f32)
            process_frame(st, buf, buf)
            process_frame(st, hi, hi)
            rp(down, buf, f32, 960, o16, s16)

        rows.append(
            row(
                "denoise 20 ms @16k (up+2xRNNoise+down)",
                *pair_us(lambda i: d.process_16k(frames[i % n]), raw, n, repeats),
            )
        )
    return rows


def dsp_rows(frames: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    ffi, lib = _dsp.ffi, _dsp.lib
    process, f32 = lib.vg_resampler_process, lib.VG_F32
    n = len(frames)
    rows = []
    x16 = list(frames.astype(np.float32))  # int16 scale, as the denoiser feeds it
    x48 = list(Resampler("up").process(frames.ravel().astype(np.float32)).reshape(n, 3 * FRAME))
    out = ffi.new("float[]", 3 * FRAME)
    for direction, src, code, label in (
        ("up", x16, lib.VG_RESAMPLE_UP, "16k->48k"),
        ("down", x48, lib.VG_RESAMPLE_DOWN, "48k->16k"),
    ):
        rs = Resampler(direction)  # type: ignore[arg-type]
        st = ffi.gc(lib.vg_resampler_create(code), lib.vg_resampler_destroy)
        ptrs = [ffi.from_buffer(f) for f in src]
        n_in = len(src[0])

        def wrapped(i: int, rs: Resampler = rs, src: list[np.ndarray] = src) -> np.ndarray:
            return rs.process(src[i % n])

        def raw(i: int, st: Any = st, ptrs: list[Any] = ptrs, n_in: int = n_in) -> int:
            return int(process(st, ptrs[i % n], f32, n_in, out, f32))

        rows.append(row(f"resample {direction} {label}, 20 ms", *pair_us(wrapped, raw, n, repeats)))

    ptrs16 = [ffi.from_buffer(ffi.typeof("int16_t[]"), f) for f in frames]
    fbuf = ffi.new("float[]", FRAME)
    for name, wrapped_fn, raw_fn in (
        (
            "s16_to_f32, 320 samples",
            lambda i: s16_to_f32(frames[i % n]),
            lambda i: lib.vg_s16_to_f32(ptrs16[i % n], fbuf, FRAME),
        ),
        (
            "rms int16, 320 samples",
            lambda i: rms(frames[i % n]),
            lambda i: lib.vg_rms_s16(ptrs16[i % n], FRAME),
        ),
        (
            "peak int16, 320 samples",
            lambda i: peak(frames[i % n]),
            lambda i: lib.vg_peak_s16(ptrs16[i % n], FRAME),
        ),
    ):
        rows.append(row(name, *pair_us(wrapped_fn, raw_fn, n, repeats)))
    return rows


def batch_rows(frames: np.ndarray, sessions: int, repeats: int) -> list[dict[str, Any]]:
    """Per session-frame cost: one wrapper call per session vs one batch call for all."""
    n = len(frames) // sessions
    rows = []
    block16 = [np.ascontiguousarray(frames[k * sessions : (k + 1) * sessions]) for k in range(n)]
    blockf = [b.astype(np.float32) for b in block16]
    block48 = [Resampler("up").process(b.ravel()).reshape(sessions, 3 * FRAME) for b in blockf]

    for direction, blocks in (("up", blockf), ("down", block48)):
        singles = [Resampler(direction) for _ in range(sessions)]  # type: ignore[arg-type]
        bank = ResamplerBank(direction, sessions)  # type: ignore[arg-type]

        def per_session(
            i: int, singles: list[Resampler] = singles, blocks: list[np.ndarray] = blocks
        ) -> None:
            for r, f in zip(singles, blocks[i % n], strict=True):
                r.process(f)

        def batch(
            i: int, bank: ResamplerBank = bank, blocks: list[np.ndarray] = blocks
        ) -> np.ndarray:
            return bank.process(blocks[i % n])

        w, b = pair_us(per_session, batch, n, repeats)
        rows.append(batch_row(f"resample {direction} 20 ms", w / sessions, b / sessions))

    def per_session_levels(i: int) -> None:
        for f in block16[i % n]:
            rms(f)
            peak(f)

    w, b = pair_us(per_session_levels, lambda i: levels(block16[i % n]), n, repeats)
    rows.append(batch_row("rms+peak 20 ms", w / sessions, b / sessions))
    return rows


def numpy_rows(frames: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """The same work in plain numpy, the peer a Python implementation would use."""
    n = len(frames)
    rows = []

    def np_levels(i: int) -> None:
        f = frames[i % n].astype(np.float64)
        np.sqrt(np.mean(f * f))
        np.max(np.abs(f))

    rows.append(
        peer_row(
            "s16_to_f32, 320 samples",
            *pair_us(
                lambda i: s16_to_f32(frames[i % n]),
                lambda i: frames[i % n].astype(np.float32) / np.float32(32768),
                n,
                repeats,
            ),
        )
    )
    rows.append(
        peer_row(
            "rms+peak, 320 samples",
            *pair_us(lambda i: (rms(frames[i % n]), peak(frames[i % n])), np_levels, n, repeats),
        )
    )
    return rows


class _AppendSink(io.RawIOBase):
    """Write-only, append-only bytes that libsndfile's virtual I/O can drive."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._chunks.append(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if (offset if whence == io.SEEK_SET else self._pos + offset) != self._pos:
            raise io.UnsupportedOperation("append only")
        return self._pos

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


class _SndfileArchive:
    """The libsndfile Ogg Opus recorder ``stages.archive`` used before libopusenc.

    Same settings and the same I/O: 16 kHz mono at *bitrate*, the bytes taken from
    an append-only sink after each write.
    """

    def __init__(self, bitrate: int) -> None:
        import soundfile

        # libsndfile maps its compression level linearly onto 6..256 kbit/s.
        level = 1.0 - (bitrate - 6000) / (256000 - 6000)
        self._sink = _AppendSink()
        self._file = soundfile.SoundFile(
            self._sink, "w", samplerate=16000, channels=1, format="OGG", subtype="OPUS",
            compression_level=level,
        )

    def feed(self, samples: np.ndarray) -> bytes:
        self._file.write(samples)
        return self._sink.take()

    def close(self) -> None:
        self._file.close()


def archive_rows(frames: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """Ogg Opus recording per 20 ms frame: libopusenc vs libsndfile, same run, same frames."""
    n = len(frames)
    rows = []
    sndfile = _SndfileArchive(DEFAULT_BITRATE)
    archive = ArchiveEncoder()
    rows.append(
        archive_row(
            f"ogg opus archive {DEFAULT_BITRATE // 1000}k: ArchiveEncoder (libopus 16 kHz "
            f"CELT c{DEFAULT_COMPLEXITY}, 60 ms frames)",
            *pair_us(lambda i: archive.feed(frames[i % n]), lambda i: sndfile.feed(frames[i % n]),
                     n, repeats),
        )
    )
    before = OggOpusWriter(bitrate=DEFAULT_BITRATE, complexity=5, signal="voice", frame_ms=60)
    rows.append(
        archive_row(
            f"ogg opus {DEFAULT_BITRATE // 1000}k: OggOpusWriter (libopusenc c5, 60 ms frames: "
            "the archive before)",
            *pair_us(lambda i: before.write(frames[i % n]), lambda i: sndfile.feed(frames[i % n]),
                     n, repeats),
        )
    )
    before.close()
    writer = OggOpusWriter(bitrate=DEFAULT_BITRATE, complexity=5, signal="voice", frame_ms=20)
    rows.append(
        archive_row(
            f"ogg opus {DEFAULT_BITRATE // 1000}k: OggOpusWriter (c5, 20 ms frames)",
            *pair_us(lambda i: writer.write(frames[i % n]), lambda i: sndfile.feed(frames[i % n]),
                     n, repeats),
        )
    )
    archive.close()
    writer.close()
    sndfile.close()
    return rows


# -- output ----------------------------------------------------------------------------


def vad_rows(frames: np.ndarray, sessions: int, repeats: int) -> list[dict[str, Any]]:
    """Silero VAD per 32 ms window: the ONNX call by batch size (16 kHz, and the model's
    8 kHz branch for comparison), and ``VadBatcher``'s own Python around the call (a
    null model), with each stream fed 20 ms frames. ``ms_per_session_s`` is the cost of
    one session's 31.25 windows a second when none is gated."""
    from stages.vad import VadBatcher, VadModel, VadStream

    model = VadModel()
    ort: Any = model._session
    audio = frames.ravel().astype(np.float32) / 32768
    rows = []
    for sr, width in ((16000, 576), (8000, 288)):
        for b in sorted({1, 8, 32, sessions}):
            starts = [k * 397 % (len(audio) - width) for k in range(b)]
            x = np.ascontiguousarray(np.stack([audio[o:o + width] for o in starts]))
            st = np.zeros((2, b, 128), np.float32)
            rate = np.array(sr, np.int64)

            def call(i: int, x: np.ndarray = x, st: np.ndarray = st,
                     rate: np.ndarray = rate) -> object:
                return ort.run(None, {"input": x, "state": st, "sr": rate})

            us, _ = pair_us(call, call, 20, repeats)
            rows.append(vad_row(f"onnx {sr // 1000} kHz, batch {b}", us / b))

    class _Null:
        def run(self, w: np.ndarray, st: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return np.zeros(len(w), np.float32), st

    per = len(frames) // sessions
    blocks = [frames[k * per:(k + 1) * per] for k in range(sessions)]
    streams = [VadStream(gate_dbfs=-60.0) for _ in range(sessions)]
    batcher = VadBatcher(_Null())  # type: ignore[arg-type]

    def feed(i: int) -> None:
        for s, blk in zip(streams, blocks, strict=True):
            s.feed(blk[i % per])

    def feed_and_batch(i: int) -> None:
        feed(i)
        if i % 2:
            batcher.run(streams)

    f, fb = pair_us(feed, feed_and_batch, 2 * (per // 2), repeats)
    # per call: one 20 ms frame of every session; a window is 1.6 frames
    rows.append(vad_row("stream feed (per window)", f / sessions * 1.6))
    rows.append(vad_row("batcher python (null model)", (fb - f) / sessions * 1.6))
    return rows


def vad_row(name: str, us_per_window: float) -> dict[str, Any]:
    return {"case": name, "us_per_window": round(us_per_window, 2),
            "ms_per_session_s": round(us_per_window * 31.25 / 1000, 3)}


def row(name: str, wrapper_us: float, raw_us: float) -> dict[str, Any]:
    return {
        "case": name,
        "wrapper_us": round(wrapper_us, 3),
        "raw_us": round(raw_us, 3),
        "overhead_us": round(wrapper_us - raw_us, 3),
        "wrapper_over_raw": round(wrapper_us / raw_us, 3),
    }


def batch_row(name: str, per_session_us: float, batch_us: float) -> dict[str, Any]:
    return {
        "case": name,
        "per_session_us": round(per_session_us, 3),
        "batch_us": round(batch_us, 3),
        "speedup": round(per_session_us / batch_us, 2),
    }


def peer_row(name: str, native_us: float, numpy_us: float) -> dict[str, Any]:
    return {
        "case": name,
        "native_us": round(native_us, 3),
        "numpy_us": round(numpy_us, 3),
        "numpy_over_native": round(numpy_us / native_us, 2),
    }


def archive_row(name: str, libopusenc_us: float, libsndfile_us: float) -> dict[str, Any]:
    return {
        "case": name,
        "libopusenc_us": round(libopusenc_us, 3),
        "libsndfile_us": round(libsndfile_us, 3),
        "libsndfile_over_libopusenc": round(libsndfile_us / libopusenc_us, 2),
        "libopusenc_core_pct": round(libopusenc_us / (FRAME / 16000 * 1e6) * 100, 3),
        "libsndfile_core_pct": round(libsndfile_us / (FRAME / 16000 * 1e6) * 100, 3),
    }


def print_table(title: str, rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> None:
    width = max(len(r["case"]) for r in rows)
    print(f"\n{title}")
    print(f"{'case':<{width}}  " + "  ".join(f"{h:>12}" for h, _ in cols))
    for r in rows:
        print(f"{r['case']:<{width}}  " + "  ".join(f"{r[k]:>12.2f}" for _, k in cols))


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["per_call"]
    names = [r["case"] for r in rows]
    y = np.arange(len(rows))
    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [3, 2]}, constrained_layout=True
    )
    ax.barh(y - 0.2, [r["wrapper_us"] for r in rows], 0.4, label="Python wrapper")
    ax.barh(y + 0.2, [r["raw_us"] for r in rows], 0.4, label="raw cffi call")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("µs per call (log)")
    ax.set_title("native cost per frame")
    ax.legend()
    batch = result["batch"]
    yb = np.arange(len(batch))
    bx.barh(yb - 0.2, [r["per_session_us"] for r in batch], 0.4, label="one call per session")
    bx.barh(yb + 0.2, [r["batch_us"] for r in batch], 0.4, label="one batch call")
    bx.set_yticks(yb, [r["case"] for r in batch])
    bx.invert_yaxis()
    bx.set_xlabel("µs per session-frame")
    bx.set_title("batch vs per-session")
    bx.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="speech per loop (s)")
    parser.add_argument("--repeats", type=int, default=7, help="repeats; the best is kept")
    parser.add_argument("--sessions", type=int, default=64, help="sessions in the batch rows")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    frames = speech_frames(args.seconds)
    per_call = (
        opus_rows(frames, args.repeats)
        + rnnoise_rows(frames, args.repeats)
        + dsp_rows(frames, args.repeats)
    )
    batch = batch_rows(frames, args.sessions, args.repeats)
    peers = numpy_rows(frames, args.repeats)
    archive = archive_rows(frames, args.repeats)
    vad = vad_rows(frames, args.sessions, args.repeats)
    result = {
        "meta": {
            "libopus": opus_version(),
            "libopusenc": opusenc_version(),
            "rnnoise": str(_rnnoise.locate_library()),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "frames": len(frames),
            "repeats": args.repeats,
            "sessions": args.sessions,
            "units": "microseconds of CPU time per call (best of repeats)",
        },
        "per_call": per_call,
        "batch": batch,
        "numpy_peer": peers,
        "archive_peer": archive,
        "vad": vad,
    }

    print(f"native cost floor: {opus_version()}, {len(frames)} frames of real speech, ", end="")
    print(f"best of {args.repeats}; µs of CPU time per call")
    print_table(
        "per call: Python wrapper vs raw cffi call",
        per_call,
        [
            ("wrapper µs", "wrapper_us"),
            ("raw µs", "raw_us"),
            ("overhead µs", "overhead_us"),
            ("wrapper/raw", "wrapper_over_raw"),
        ],
    )
    print_table(
        f"batch: {args.sessions} sessions, µs per session-frame: one wrapper call each vs one call",
        batch,
        [("per-session", "per_session_us"), ("batch", "batch_us"), ("speedup", "speedup")],
    )
    print_table(
        "peer: native wrapper vs the same work in numpy",
        peers,
        [
            ("native µs", "native_us"),
            ("numpy µs", "numpy_us"),
            ("numpy/native", "numpy_over_native"),
        ],
    )
    print_table(
        "peer: Ogg Opus recording per 20 ms frame, libopusenc vs libsndfile (soundfile)",
        archive,
        [
            ("opusenc µs", "libopusenc_us"),
            ("sndfile µs", "libsndfile_us"),
            ("sndfile/ope", "libsndfile_over_libopusenc"),
            ("opusenc %cpu", "libopusenc_core_pct"),
            ("sndfile %cpu", "libsndfile_core_pct"),
        ],
    )
    print_table(
        f"VAD (Silero, onnxruntime, 1 thread): µs per 32 ms window; {args.sessions} streams "
        "in the Python rows",
        vad,
        [("µs/window", "us_per_window"), ("ms/session-s", "ms_per_session_s")],
    )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "native.json").write_text(json.dumps(result, indent=2) + "\n")
    wrote = [str(args.out / "native.json")]
    if plot(result, args.out / "native.png"):
        wrote.append(str(args.out / "native.png"))
    else:
        print("(matplotlib not installed: no PNG; `pip install -e .[bench]`)")
    print(f"\nwrote {', '.join(wrote)} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
