"""English normaliser and word error rate."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asr.whisper.normalize import (
    WordErrors,
    normalize_english,
    number_to_words,
    wer,
    word_errors,
)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("Go forward 10 meters.", "go forward ten meters"),
        ("Go forward ten meters", "go forward ten meters"),
        ("Mr. John Dashwood had then leisure", "mister john dashwood had then leisure"),
        ("Mrs. Dashwood's", "missus dashwoods"),
        ("Eight of spades, four of clubs, seven of hearts.",
         "eight of spades four of clubs seven of hearts"),
        ("  He was NOT an ill-disposed   young man ", "he was not an ill disposed young man"),
        ("I don't know—really?!", "i dont know really"),
        ("It costs $20,000 (50%).", "it costs twenty thousand dollars fifty percent"),
        ("the 2nd and 21st time", "the second and twenty first time"),
        ("pi is 3.14", "pi is three point one four"),
        ("Café naïve", "cafe naive"),
        ("rock & roll", "rock and roll"),
        ("", ""),
    ],
)
def test_normalize(raw: str, want: str) -> None:
    assert normalize_english(raw) == want


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (13, "thirteen"),
        (40, "forty"),
        (99, "ninety nine"),
        (100, "one hundred"),
        (1204, "one thousand two hundred four"),
        (2_000_017, "two million seventeen"),
        (1_000_000_000, "one billion"),
    ],
)
def test_number_to_words(n: int, words: str) -> None:
    assert number_to_words(n) == words


def test_number_to_words_range() -> None:
    with pytest.raises(ValueError):
        number_to_words(-1)


def test_word_errors_counts() -> None:
    e = word_errors("the cat sat on the mat", "the cat sit on mat")
    assert (e.substitutions, e.deletions, e.insertions, e.ref_words) == (1, 1, 0, 6)
    assert e.wer == pytest.approx(2 / 6)
    e = word_errors("a b c", "a x b c")
    assert (e.substitutions, e.deletions, e.insertions) == (0, 0, 1)
    assert wer("Go forward ten meters", "go forward 10 meters!") == 0.0
    assert wer("a b", "") == 1.0
    assert wer("", "a b") == 2.0  # insertions against nothing: finite, counted per word
    assert wer("", "") == 0.0


def test_corpus_sum() -> None:
    total = word_errors("a b c", "a x c") + word_errors("d e", "d e f")
    assert total == WordErrors(1, 0, 1, 5)
    assert total.wer == pytest.approx(0.4)


words = st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=8).map(" ".join)


@given(words, words)
def test_wer_is_a_distance(ref: str, hyp: str) -> None:
    e = word_errors(ref, hyp)
    r, h = len(ref.split()), len(hyp.split())
    assert e.errors == word_errors(hyp, ref).errors  # symmetric
    assert abs(r - h) <= e.errors <= max(r, h)
    assert (e.errors == 0) == (ref == hyp)
    # Every reference word is matched, substituted or deleted.
    assert e.ref_words - e.deletions - e.substitutions >= 0
    assert h == e.ref_words - e.deletions + e.insertions
