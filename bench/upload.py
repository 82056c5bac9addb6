"""A file upload: the same long-form speech streamed in real time and 40x faster.

A client that sends a recording as fast as it can must get the transcript it would get
in real time (issue 10: WER within 1 point), and the service must hold it back while
recognition is behind (``flow PAUSE`` / ``RESUME``) rather than merge or cut utterances.
Starts ``voxgate serve`` (the embedded default), streams one session of
``bench/material.py`` (130 s of concatenated LibriVox/cards speech with pauses of
0.3-2.5 s) through the gateway's WebSocket, once at each speed, one after the other, and
prints per speed: WER of the finals against the reference, the number of finals, the
longest final, the client's holds (``flow PAUSE``), wall time, and the archive's length
against the audio sent. The real-time run is the peer: the upload's figures print as
differences from it.

    .venv/bin/python bench/upload.py                 # 1x and 40x, 130 s of speech
    .venv/bin/python bench/upload.py --speeds 1,10,40 --duration 60

Writes ``bench/out/<name>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import material as mat  # noqa: E402
from bench.common import OUT, start, stop, wait_idle, write_json  # noqa: E402


async def one(url: str, audio: np.ndarray, speed: float, flow_id: str) -> dict[str, Any]:
    from gateway.client import stream_audio

    t0 = time.monotonic()
    r = await stream_audio(url, audio, realtime=True, speed=speed,
                           start={"flowId": flow_id, "hints": {"user_lang_pref": "en"},
                                  "return": ["asr", "record_url", "metrics"]},
                           timeout_s=600.0)
    wall = time.monotonic() - t0
    finals = r.of("asr_final")
    flows = [e["state"] for e in r.of("flow")]
    records = r.of("record_url")
    return {
        "speed": speed,
        "wall_s": round(wall, 1),
        "finals": [f["text"] for f in finals],
        "final_spans_ms": [f["end_ms"] - f["start_ms"] for f in finals],
        "partials": len(r.of("asr_partial")),
        "holds": flows.count("PAUSE"),
        "resumes": flows.count("RESUME"),
        "errors": [e.get("code") for e in r.of("error")],
        "archived_ms": records[0]["duration_ms"] if records else None,
        "sent_ms": len(audio) * 1000 // 16000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speeds", default="1,40")
    ap.add_argument("--duration", type=float, default=125.0, help="seconds of material")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="upload")
    args = ap.parse_args()
    from asr.whisper.normalize import word_errors

    m = mat.plan(mat.corpus(), min_duration_s=args.duration, seed=args.seed)
    speeds = [float(s) for s in args.speeds.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="upload-"))
    proc, url = start(["serve", "--port", "0", "--http-port", "0"], "ws://",
                      env={"ARCHIVE_DIR": str(tmp / "records")})
    runs: list[dict[str, Any]] = []
    try:
        for i, speed in enumerate(speeds):
            wait_idle(proc.pid)
            run = trio.run(one, url, m.audio, speed, f"upload-{i}")
            e = word_errors(m.reference, " ".join(run["finals"]))
            run["wer"] = e.wer
            runs.append(run)
            print(f"{speed:g}x: WER {100 * e.wer:.1f}%, {len(run['finals'])} finals "
                  f"(longest {max(run['final_spans_ms'], default=0) / 1000:.1f} s), "
                  f"{run['holds']} holds, {run['wall_s']} s wall for "
                  f"{run['sent_ms'] / 1000:.0f} s of audio, archived {run['archived_ms']} "
                  f"of {run['sent_ms']} ms, errors {run['errors'] or 'none'}", flush=True)
    finally:
        stop(proc)
    base = runs[0]
    for r in runs[1:]:
        print(f"{r['speed']:g}x against {base['speed']:g}x: WER "
              f"{100 * (r['wer'] - base['wer']):+.1f} points, finals "
              f"{len(r['finals'])} vs {len(base['finals'])}")
    data = {"material_s": m.duration_s, "utterances": len(m.utterances), "seed": args.seed,
            "runs": runs}
    path = write_json(args.name, data)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([f"{r['speed']:g}x" for r in runs], [100 * r["wer"] for r in runs])
    ax.set_ylabel("WER of the finals, %")
    ax.set_title(f"{m.duration_s:.0f} s of speech through voxgate serve")
    fig.tight_layout()
    fig.savefig(OUT / f"{args.name}.png", dpi=120)
    print(f"wrote {path} and {args.name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
