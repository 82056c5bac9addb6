"""Do an utterance's first partials say what its final says? From ``--dump-events`` runs.

For each utterance of a ``bench/e2e_latency.py --dump-events`` run that got a partial and
a final, the first partial is *supported* when every word but its last is the final's
word at that place and its last word starts the final's word there (normalised English
text). A first partial is revised by later ones either way; this counts how often the
first thing a user reads is already right, so two settings can be compared.

    .venv/bin/python bench/partial_support.py bench/out/a-events.json bench/out/b-events.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asr.whisper.normalize import normalize_english  # noqa: E402


def supported(partial: list[str], final: list[str]) -> bool:
    return (0 < len(partial) <= len(final)
            and all(a == b for a, b in zip(partial[:-1], final, strict=False))
            and final[len(partial) - 1].startswith(partial[-1]))


def analyse(path: Path) -> dict[int, tuple[int, int, float]]:
    """sessions -> (first partials, supported, words per first partial)."""
    out: dict[int, tuple[int, int, float]] = {}
    for ev in json.loads(path.read_text())["events"]:
        total = ok = words = 0
        for lg in ev["logs"]:
            by_start: dict[float, list[dict[str, object]]] = {}
            for h in lg["hyps"]:
                by_start.setdefault(h["start_s"], []).append(h)
            for hs in by_start.values():
                parts = [h for h in hs if not h["final"]]
                finals = [h for h in hs if h["final"]]
                if not parts or not finals:
                    continue
                pw = normalize_english(str(parts[0]["text"])).split()
                if not pw:
                    continue
                total += 1
                words += len(pw)
                ok += supported(pw, normalize_english(str(finals[-1]["text"])).split())
        if total:
            out[ev["sessions"]] = (total, ok, words / total)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    for path in ap.parse_args().runs:
        for n, (total, ok, words) in sorted(analyse(path).items()):
            print(f"{path.name} N={n}: first partials {total}, supported by the final {ok} "
                  f"({100 * ok / total:.0f} %), words per first partial {words:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
