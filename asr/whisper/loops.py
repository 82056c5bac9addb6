"""Telling a looping Whisper decode from a good one, and cutting a loop as a last resort.

Whisper's decoder, run greedily, can fall into a loop: it repeats a word, a phrase or a
whole sentence until its token budget runs out. The reference implementation
(``transcribe.py``'s ``decode_with_fallback``) spots that from the text alone: repeated
text compresses very well, so a gzip compression ratio above about 2.4 means a loop.
Sans-IO, no model: plain functions over text and token ids.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

COMPRESSION_RATIO_MAX = 2.4  # Whisper's compression_ratio_threshold: above it, a loop


def compression_ratio(text: str) -> float:
    """UTF-8 length of ``text`` over its zlib-compressed length (0 for empty text).

    Normal sentences come out near 1-1.8; a phrase repeated five times or more goes past
    2.4 (Whisper's threshold).

    Args:
        text: decoded text.

    Returns:
        The ratio.
    """
    b = text.encode("utf-8")
    if not b:
        return 0.0
    return len(b) / len(zlib.compress(b))


def find_loop(tokens: Sequence[int], min_repeats: int = 3,
              min_span: int = 6) -> tuple[int, int] | None:
    """The first place where a unit repeats back to back ``min_repeats`` times.

    Args:
        tokens: token ids (or words).
        min_repeats: consecutive copies that make a loop.
        min_span: the copies must cover at least this many tokens (a short unit needs
            more copies), so "no, no, no" or "one one one" in real speech is not a loop.

    Returns:
        ``(start, period)`` of the earliest loop, or None.
    """
    t = tuple(tokens)
    n = len(t)
    for i in range(n):
        for p in range(1, (n - i) // min_repeats + 1):
            reps = max(min_repeats, -(-min_span // p))  # short units need more copies
            if i + reps * p > n:
                continue
            unit = t[i : i + p]
            if all(t[i + k * p : i + (k + 1) * p] == unit for k in range(1, reps)):
                return i, p
    return None


def cut_loop(tokens: Sequence[int], min_repeats: int = 3,
             min_span: int = 6) -> tuple[tuple[int, ...], bool]:
    """Keep one copy of the first loop and drop everything after it.

    The last resort when no decode at any temperature came out clean: a sentence said
    once is closer to the speech than the same sentence twelve times.

    Args:
        tokens: token ids.
        min_repeats: see :func:`find_loop`.
        min_span: see :func:`find_loop`.

    Returns:
        The tokens, cut, and whether a loop was cut.
    """
    t = tuple(tokens)
    loop = find_loop(t, min_repeats, min_span)
    if loop is None:
        return t, False
    start, period = loop
    return t[: start + period], True


def repeated_ngrams(words: Sequence[str], n: int, min_count: int = 3) -> dict[tuple[str, ...], int]:
    """N-grams of ``words`` seen at least ``min_count`` times (a loop shows up here).

    Args:
        words: normalised words.
        n: n-gram length.
        min_count: the least count reported.

    Returns:
        n-gram -> count.
    """
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        counts[g] = counts.get(g, 0) + 1
    return {g: c for g, c in counts.items() if c >= min_count}
