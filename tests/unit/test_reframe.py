"""Reframer and SeqBuffer: no sample lost or doubled, however the client cuts or orders."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stages.reframe import FRAME_SAMPLES, IngestError, Reframer, SeqBuffer


def _pcm(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(-32768, 32767, n, dtype=np.int16).tobytes()


@given(st.integers(0, 3000), st.lists(st.integers(0, 2000), max_size=20))
def test_reframing_never_loses_or_duplicates(n: int, cut_samples: list[int]) -> None:
    data = _pcm(n)
    cuts = sorted({min(c, n) * 2 for c in cut_samples})
    r = Reframer()
    frames = []
    prev = 0
    for cut in [*cuts, len(data)]:
        frames += r.feed(data[prev:cut])
        prev = cut
    frames += r.flush()
    joined = np.concatenate([f.samples for f in frames]) if frames else np.zeros(0, np.int16)
    assert joined[:n].tobytes() == data
    assert not joined[n:].any()
    assert len(joined) - n < FRAME_SAMPLES
    assert [f.start for f in frames] == [i * FRAME_SAMPLES for i in range(len(frames))]


def test_exact_frames() -> None:
    r = Reframer()
    frames = r.feed(b"\x01\x00" * 700)
    assert [(f.start, len(f.samples)) for f in frames] == [(0, 320), (320, 320)]
    assert r.statistics().pending_samples == 60
    (last,) = r.flush()
    assert last.start == 640 and last.samples[:60].tolist() == [1] * 60
    assert r.flush() == []


@pytest.mark.parametrize(
    ("chunk", "code"),
    [(b"\x00" * 3, "ODD_BYTE_COUNT"), (b"\x00" * 70000, "FRAME_TOO_LARGE")],
)
def test_bad_chunk_is_refused_and_earlier_audio_kept(chunk: bytes, code: str) -> None:
    r = Reframer()
    assert r.feed(b"\x02\x00" * 300) == []
    with pytest.raises(IngestError) as info:
        r.feed(chunk)
    assert info.value.code == code
    (frame,) = r.feed(b"\x03\x00" * 20)
    assert frame.samples.tolist() == [2] * 300 + [3] * 20
    assert r.samples_in == 320


def test_seq_header_parse() -> None:
    assert SeqBuffer.parse(b"\x05\x00\x00\x00\x14\x00\x00\x00ab") == (5, 20, b"ab")
    with pytest.raises(IngestError) as info:
        SeqBuffer.parse(b"\x05\x00")
    assert info.value.code == "BAD_SEQ_HEADER"


@given(st.integers(1, 60), st.integers(1, 8), st.randoms(use_true_random=False),
       st.lists(st.integers(0, 59), max_size=10))
def test_seq_buffer_reorders_and_dedups(
    n: int, window: int, rnd: random.Random, dups: list[int]
) -> None:
    # Displace each packet by less than the window, then re-send some packets.
    order = sorted(range(n), key=lambda i: i + rnd.uniform(0, window))
    order += [d for d in dups if d < n]
    buf = SeqBuffer(window=window)
    out = []
    for seq in order:
        out += buf.feed(seq, seq.to_bytes(2, "little"))
    out += buf.flush()
    assert [int.from_bytes(p, "little") for p in out] == list(range(n))
    stats = buf.statistics()
    assert stats.lost == 0
    assert stats.duplicates == len(order) - n


def test_seq_buffer_gives_up_on_a_gap_past_the_window() -> None:
    buf = SeqBuffer(window=2)
    assert buf.feed(0, b"a") == [b"a"]
    assert buf.feed(2, b"c") == []
    assert buf.feed(3, b"d") == []
    assert buf.feed(4, b"e") == [b"c", b"d", b"e"]
    assert buf.statistics().lost == 1
    assert buf.feed(1, b"late") == []  # too late: counted as a duplicate, not doubled


def test_seq_buffer_resume_after_reconnect() -> None:
    buf = SeqBuffer()
    got = [p for s in range(5) for p in buf.feed(s, bytes([s]))]
    # The client reconnects and re-sends from seq 3 (it had no ack for 3 and 4).
    got += [p for s in range(3, 8) for p in buf.feed(s, bytes([s]))]
    assert got == [bytes([s]) for s in range(8)]


def test_seq_buffer_conceals_a_lost_packet_with_zeros_of_its_size() -> None:
    buf = SeqBuffer(window=2, conceal=True)
    assert buf.feed(0, b"aa") == [b"aa"]
    assert buf.feed(2, b"cc") == []
    assert buf.feed(3, b"dd") == []
    assert buf.feed(4, b"ee") == [b"\x00\x00", b"cc", b"dd", b"ee"]
    assert buf.statistics().lost == 1
    assert buf.feed(6, b"gg") == []
    assert buf.flush() == [b"\x00\x00", b"gg"]  # a gap at the end is concealed too


def test_seq_buffer_refuses_a_huge_jump_and_goes_on() -> None:
    """Finding 6: a seq of 2**32 - 1 used to be held, then skipped to (concealing ~4
    billion packets) and made every later packet an old "duplicate"."""
    buf = SeqBuffer(window=4, conceal=True)
    assert buf.feed(0, b"aa") == [b"aa"]
    with pytest.raises(IngestError) as info:
        buf.feed(2**32 - 1, b"zz")
    assert info.value.code == "BAD_SEQ_HEADER" and "4294967295" in info.value.message
    got = [p for s in range(1, 10) for p in buf.feed(s, bytes([s, s]))]
    assert got == [bytes([s, s]) for s in range(1, 10)]
    assert buf.flush() == []
    stats = buf.statistics()
    assert (stats.refused, stats.duplicates, stats.lost) == (1, 0, 0)


def test_seq_buffer_accepts_a_jump_up_to_max_ahead() -> None:
    buf = SeqBuffer(window=2, conceal=True, max_ahead=8)
    assert buf.feed(0, b"aa") == [b"aa"]
    assert buf.feed(9, b"jj") == []  # 8 ahead of next_seq 1: allowed
    with pytest.raises(IngestError):
        buf.feed(10, b"kk")  # 9 ahead: refused
    assert buf.flush() == [b"\x00\x00"] * 8 + [b"jj"]
    with pytest.raises(ValueError):
        SeqBuffer(window=8, max_ahead=4)


@given(st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)), max_size=60),
       st.integers(1, 8), st.integers(8, 64))
def test_seq_buffer_output_is_bounded_whatever_the_seqs(
        seqs: list[int], window: int, max_ahead: int) -> None:
    """Whatever seqs a client sends: no exception but BAD_SEQ_HEADER, never more out
    than (accepted packets + their concealed gaps, each at most max_ahead), payloads
    in strictly increasing seq order, and the next expected seq always deliverable."""
    buf = SeqBuffer(window=window, conceal=False, max_ahead=max(window, max_ahead))
    out: list[bytes] = []
    accepted = 0
    for s in seqs:
        before = buf.next_seq
        try:
            got = buf.feed(s, s.to_bytes(4, "little"))
        except IngestError as exc:
            assert exc.code == "BAD_SEQ_HEADER" and s - before > buf.max_ahead
            assert buf.next_seq == before
            continue
        accepted += 1
        out += got
    out += buf.flush()
    values = [int.from_bytes(p, "little") for p in out]
    assert values == sorted(set(values)) and len(values) <= accepted
    assert buf.next_seq <= len(seqs) * (buf.max_ahead + 1)
    nxt = buf.next_seq
    assert buf.feed(nxt, b"ok") == [b"ok"]  # never a silent duplicate
