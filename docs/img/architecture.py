"""Draw ``docs/img/architecture.png``: one audio frame's path through voxgate.

Why a script: the picture must change when the pipeline does, and a script in the repo
is easier to keep true than a binary drawing. Run from the repository root:
``.venv/bin/python docs/img/architecture.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().with_suffix(".png")
W, H = 1.75, 1.15  # box size, inches at 1:1

MAIN = "#dbe9f6"
SIDE = "#fdebd0"
ASR = "#e3f1df"
CLIENT = "#eeeeee"


def box(ax: Axes, x: float, y: float, title: str, body: str, color: str,
        w: float = W, h: float = H) -> tuple[float, float, float, float]:
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                boxstyle="round,pad=0.03,rounding_size=0.08",
                                fc=color, ec="#333333", lw=1.2))
    ax.text(x, y + h / 2 - 0.17, title, ha="center", va="top", fontsize=10.5,
            weight="bold")
    ax.text(x, y + h / 2 - 0.45, body, ha="center", va="top", fontsize=8.3,
            linespacing=1.25)
    return (x, y, w, h)


def arrow(ax: Axes, a: tuple[float, float], b: tuple[float, float], label: str = "",
          color: str = "#222222", style: str = "-|>", offset: tuple[float, float] = (0, 0.12),
          ls: str = "-", fontsize: float = 8.3) -> None:
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=13, lw=1.5,
                                 color=color, linestyle=ls, shrinkA=0, shrinkB=0))
    if label:
        ax.text((a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1], label,
                ha="center", va="bottom", fontsize=fontsize, color=color)


def region(ax: Axes, x0: float, y0: float, x1: float, y1: float, label: str,
           color: str) -> None:
    ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0,
                                boxstyle="round,pad=0.02,rounding_size=0.15",
                                fc=color, ec="#777777", lw=1, ls="--", alpha=0.35))
    ax.text(x0 + 0.15, y1 - 0.12, label, ha="left", va="top", fontsize=11.5,
            weight="bold", color="#444444")


def main() -> None:
    fig = plt.figure(figsize=(15.5, 9.2), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 15.5)
    ax.set_ylim(0, 9.2)
    ax.axis("off")

    region(ax, 2.05, 4.15, 15.35, 8.95,
           "voxgate gateway  (one Trio nursery per session; stages are sans-IO)", "#c9dcf0")
    region(ax, 5.25, 0.15, 15.35, 3.65,
           "voxgate asr  (HTTP/2 service, one per pool: en, multi, ...)", "#cfe8c8")

    ytop = 7.35
    xs = [2.95, 4.85, 6.75, 8.65, 10.55, 12.45, 14.35]
    box(ax, 1.0, ytop, "Client", "SDK, browser page,\nvoxgate stream,\nwebsocat", CLIENT,
        w=1.6)
    box(ax, xs[0], ytop, "WebSocket", "/ws/stream, protocol v1\nstart, PCM16 frames,\n"
        "flush, finalize, ping", MAIN)
    box(ax, xs[1], ytop, "Reframe / seq", "20 ms frames (320 samples)\nseq_header: dedup,\n"
        "reorder, conceal, resume", MAIN)
    box(ax, xs[2], ytop, "VAD", "RMS gate, then Silero\non 512-sample windows,\n"
        "batched over sessions", MAIN)
    box(ax, xs[3], ytop, "Early start /\nendpointer", "\nspeech gate + 300 ms\npre-roll; "
        "final after\n700 ms silence", MAIN, h=1.35)
    box(ax, xs[4], ytop, "Denoise", "RNNoise 48 kHz,\n16<->48 kHz in C\n(off by default)",
        MAIN)
    box(ax, xs[5], ytop, "Opus + AsrChannel", "20 ms, 20 kbit/s VBR\nspeech only; replay,\n"
        "failover, breaker", MAIN)

    for i, x0 in enumerate([1.0 + 0.8, *xs[:5]]):
        x1 = xs[i] - W / 2
        arrow(ax, (x0 + (0 if i == 0 else W / 2), ytop), (x1, ytop))
    ax.text(1.0, ytop + 0.8, "PCM16 16 kHz mono", ha="center", fontsize=8.5)

    # Side paths inside the gateway.
    yside = 5.5
    box(ax, xs[1], yside, "Archive", "the whole session,\nOgg Opus (libopus\n16 kHz), "
        "streaming", SIDE)
    box(ax, xs[2] + 0.35, yside, "Store", "ARCHIVE_DIR (/records)\nor S3 multipart;\n"
        "fallback + retry", SIDE, w=2.0)
    box(ax, xs[3] + 0.55, yside, "Language ID", "first LID_FIRST_N_SECONDS\nof speech (PCM);"
        "\nroutes to a pool", SIDE, w=1.95)
    arrow(ax, (xs[1], ytop - H / 2), (xs[1], yside + H / 2), "every frame", offset=(0.48, 0))
    arrow(ax, (xs[1] + W / 2, yside), (xs[2] + 0.35 - 1.0, yside))
    arrow(ax, (xs[3], ytop - 1.35 / 2), (xs[3] + 0.2, yside + H / 2), "speech",
          offset=(-0.38, 0))

    # The link.
    ylink_top = ytop - H / 2
    yasr = 2.0
    arrow(ax, (xs[5] - 0.3, ylink_top), (xs[5] - 0.3, yasr + H / 2),
          "", color="#1f5fa8")
    ax.text(xs[5] - 0.4, 4.05, "ASR link v2\nHTTP/2 (h2c or TLS),\none stream per session:\n"
            "Start, Audio (Opus), Finalize, End", ha="right", va="center", fontsize=8.3,
            color="#1f5fa8")
    arrow(ax, (xs[5] + 0.35, yasr + H / 2), (xs[5] + 0.35, ylink_top), "", color="#a83232")
    ax.text(xs[5] + 0.45, 4.05, "events back:\npartial, final,\nflow BEHIND/OK", ha="left",
            va="center", fontsize=8.3, color="#a83232")

    box(ax, xs[5], yasr, "/v1/recognize", "hypercorn on Trio\nOpus decode (PLC/FEC)\n"
        "cut at Finalize", ASR)
    box(ax, xs[3] + 0.55, yasr, "Scheduler", "deadlines: LID, finals,\nfirst partials; "
        "batches\nsized to the deadline", ASR, w=2.0)
    box(ax, xs[2] - 0.2, yasr, "Inference workers", "ONNX Whisper (int8)\n2 processes x 1 "
        "thread\n+ 1 warm standby", ASR, w=1.95)
    arrow(ax, (xs[5] - W / 2, yasr + 0.15), (xs[3] + 0.55 + 1.0, yasr + 0.15), "jobs",
          offset=(0, 0.03))
    arrow(ax, (xs[3] + 0.55 - 1.0, yasr + 0.15), (xs[2] - 0.2 + 0.975, yasr + 0.15),
          "batches", offset=(0, 0.03))
    arrow(ax, (xs[2] - 0.2 + 0.975, yasr - 0.3), (xs[3] + 0.55 - 1.0, yasr - 0.3), "texts",
          color="#a83232", offset=(0, -0.3))
    arrow(ax, (xs[3] + 0.55 + 1.0, yasr - 0.3), (xs[5] - W / 2, yasr - 0.3), "",
          color="#a83232")
    arrow(ax, (xs[3] + 0.55, yside - H / 2), (xs[3] + 0.55, yasr + H / 2),
          "", color="#1f5fa8", ls="--")
    ax.text(xs[3] + 0.65, 4.05, "POST /v1/lid (PCM)", ha="left", va="center", fontsize=8.3,
            color="#1f5fa8")

    # Events to the client.
    yev = 4.55
    arrow(ax, (xs[5] + 0.35, yev), (1.0, yev), color="#a83232")
    arrow(ax, (1.0, yev), (1.0, ytop - H / 2), color="#a83232")
    ax.text(5.3, yev + 0.06, "events to the client: ack, lid, asr_partial, asr_final, flow "
            "(PAUSE/RESUME), record_url, metrics, end, error", ha="center", va="bottom",
            fontsize=8.6, color="#a83232")

    ax.text(0.25, 0.3, "blue: audio toward recognition    red: results back    orange: "
            "side paths (archive, language ID)\nsee docs/architecture.md",
            fontsize=8.5, color="#444444", va="bottom")
    fig.savefig(OUT)
    print(OUT)


if __name__ == "__main__":
    main()
