"""English text normalisation and word error rate, for comparing ASR output with references.

The normaliser is deliberately light and symmetric: the bench applies it to the
reference and to every engine's output alike, so it only has to remove differences of
*form* that Whisper introduces and the references do not have (case, punctuation,
digits where the references spell numbers out, a few spoken abbreviations).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
         "seventeen", "eighteen", "nineteen"]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
         "ninety"]  # fmt: skip
_SCALES = [(10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}  # fmt: skip

# Spoken forms of abbreviations Whisper writes and read speech spells out.
_ABBREVIATIONS = {
    "mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint", "vs": "versus",
    "ok": "okay",
}  # fmt: skip

_NUMBER_RE = re.compile(
    r"(?P<cur>[$£€])?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?"
    r"(?P<ord>st|nd|rd|th)?(?P<pct>%)?"
)


def number_to_words(n: int) -> str:
    """Spell a non-negative integer in English words (``1204`` -> ``one thousand two
    hundred four``; no "and", as the references write it).

    Args:
        n: the number, below 10**12.

    Returns:
        Space-separated words.

    Raises:
        ValueError: negative or too large.
    """
    if n < 0 or n >= 10**12:
        raise ValueError(f"cannot spell {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for value, word in _SCALES:
        if n >= value:
            high, rest = divmod(n, value)
            head = number_to_words(high) + " " + word
            return head if rest == 0 else head + " " + number_to_words(rest)
    raise AssertionError("unreachable")  # n >= 1000 always matches a scale


def _ordinal(words: str) -> str:
    head, _, last = words.rpartition(" ")
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return f"{head} {last}".strip()


def _spell_number(m: re.Match[str]) -> str:
    digits = m.group("int").replace(",", "")
    # Long digit strings (phone numbers, ids) are read digit by digit.
    words = (
        number_to_words(int(digits)) if len(digits) <= 12
        else " ".join(_ONES[int(d)] for d in digits)
    )
    if m.group("frac"):
        words += " point " + " ".join(_ONES[int(d)] for d in m.group("frac"))
    elif m.group("ord"):
        words = _ordinal(words)
    if m.group("pct"):
        words += " percent"
    cur = m.group("cur")
    if cur:
        words += {"$": " dollars", "£": " pounds", "€": " euros"}[cur]
    return f" {words} "


def normalize_english(text: str) -> str:
    """Normalise English text for word error rate.

    Lowercases, folds accents, spells digits out (integers, decimals, ordinals, percent,
    currency), expands a few abbreviations (``Mr.`` -> ``mister``), turns hyphens into
    spaces, drops apostrophes and other punctuation, and collapses whitespace.

    Args:
        text: raw transcript.

    Returns:
        Lowercase words separated by single spaces.
    """
    t = unicodedata.normalize("NFKD", text)
    t = "".join(c for c in t if not unicodedata.combining(c))
    t = t.lower()
    t = t.replace("&", " and ")
    t = _NUMBER_RE.sub(_spell_number, t)
    # Apostrophes join (don't -> dont); every other non-alphanumeric splits words.
    t = re.sub(r"['’‘`]", "", t)
    t = re.sub(r"[^\w\s]|_", " ", t)
    words = [_ABBREVIATIONS.get(w, w) for w in t.split()]
    return " ".join(words)


@dataclass(frozen=True)
class WordErrors:
    """Edit-distance counts between a reference and a hypothesis (in words)."""

    substitutions: int
    deletions: int
    insertions: int
    ref_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """Errors per reference word (insertions against an empty reference count as 1
        each, so the rate stays finite)."""
        return self.errors / max(self.ref_words, 1)

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.ref_words + other.ref_words,
        )


def word_errors(ref: str, hyp: str, *, normalize: bool = True) -> WordErrors:
    """Levenshtein alignment of two word sequences.

    Args:
        ref: reference text.
        hyp: hypothesis text.
        normalize: apply :func:`normalize_english` to both first.

    Returns:
        Substitution, deletion and insertion counts of one minimal alignment (ties prefer
        substitutions, then deletions), and the reference length. Sum them over a corpus
        and take ``.wer`` for a corpus-level rate.
    """
    r = (normalize_english(ref) if normalize else ref).split()
    h = (normalize_english(hyp) if normalize else hyp).split()
    # Row-by-row DP over (cost, subs, dels, ins) so the counts come out with the distance.
    prev = [(j, 0, 0, j) for j in range(len(h) + 1)]
    for i in range(1, len(r) + 1):
        cur = [(i, 0, i, 0)]
        for j in range(1, len(h) + 1):
            c, s, d, n = prev[j - 1]
            diag = (c, s, d, n) if r[i - 1] == h[j - 1] else (c + 1, s + 1, d, n)
            c, s, d, n = prev[j]
            up = (c + 1, s, d + 1, n)
            c, s, d, n = cur[j - 1]
            left = (c + 1, s, d, n + 1)
            cur.append(min(diag, up, left, key=lambda x: x[0]))
        prev = cur
    _, s, d, n = prev[-1]
    return WordErrors(s, d, n, len(r))


def wer(ref: str, hyp: str, *, normalize: bool = True) -> float:
    """Word error rate of ``hyp`` against ``ref``.

    Args:
        ref: reference text.
        hyp: hypothesis text.
        normalize: apply :func:`normalize_english` to both first.

    Returns:
        (substitutions + deletions + insertions) / reference words; see
        :attr:`WordErrors.wer` for an empty reference.
    """
    return word_errors(ref, hyp, normalize=normalize).wer
