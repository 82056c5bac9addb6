"""Stateful fuzzing of the seq-header reorder buffer (``stages.reframe.SeqBuffer``).

Two hypothesis state machines play a client against the buffer:

* ``ReorderClient`` sends blocks of packets shuffled within the window, duplicates and
  stale re-sends (a reconnecting client resuming), and gaps (lost packets). Everything
  sent, except what was skipped as lost, must come out exactly once and in order.
* ``WildSeqClient`` sends an in-order stream with, now and then, one packet whose
  ``seq`` jumps far ahead (up to ``2**32 - 1``). The jump may be refused with an
  ``IngestError`` or held, but must never make the in-order packets that follow vanish
  as "duplicates", nor make the buffer produce unbounded concealment audio.

Invariants checked after every step: no payload doubled, payloads in ``seq`` order, at
most ``window`` packets held, and a bounded amount of audio out of any one call. Each
buffer call runs under an address-space cap, so a buffer that tries to allocate
gigabytes fails this test with MemoryError instead of exhausting the machine.
"""

from __future__ import annotations

import contextlib
import resource
import struct
from collections.abc import Iterator

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway.protocol import ErrorCode
from stages.reframe import IngestError, SeqBuffer

PAYLOAD_BYTES = 640  # 20 ms of PCM16 at 16 kHz, what clients send
MAX_CONCEAL_BYTES = 60 * 16000 * 2  # 60 s: more "lost" audio than this from one call is a bug
HEADROOM_BYTES = 256 << 20  # address space a buffer call may add before MemoryError
U32_MAX = 2**32 - 1
MARK = 0xA5  # first byte of every real payload; concealment is all zeros


def payload(seq: int) -> bytes:
    """A unique, never all-zero payload that names its seq."""
    return bytes([MARK]) + struct.pack("<Q", seq) + b"\x01" * (PAYLOAD_BYTES - 9)


def seq_of(p: bytes) -> int | None:
    """The seq a real payload names, or None for concealment (zeros)."""
    if p[:1] == bytes([MARK]):
        return int(struct.unpack_from("<Q", p, 1)[0])
    assert not any(p), "a payload that is neither a real one nor zeros"
    return None


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def memory_cap() -> Iterator[None]:
    """Cap this process's address space near its current size for one buffer call."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + HEADROOM_BYTES
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class _Client(RuleBasedStateMachine):
    """What both machines share: the buffer, its outputs, and the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = SeqBuffer()
        self.delivered: list[int] = []  # real seqs, in the order they came out
        self.concealed = 0
        self.sent: set[int] = set()
        self.finished = False

    def make(self, window: int, conceal: bool) -> None:
        self.buf = SeqBuffer(window, conceal=conceal)

    def feed(self, seq: int) -> list[bytes]:
        """Send one packet; an IngestError must carry a protocol error code."""
        self.sent.add(seq)
        try:
            with memory_cap():
                out = self.buf.feed(seq, payload(seq))
        except IngestError as exc:
            assert ErrorCode(exc.code)
            return []
        self.take(out)
        return out

    def take(self, out: list[bytes]) -> None:
        assert len(out) <= self.buf.window + 2 + MAX_CONCEAL_BYTES // PAYLOAD_BYTES, len(out)
        assert sum(len(p) for p in out) <= (
            (self.buf.window + 2) * PAYLOAD_BYTES + MAX_CONCEAL_BYTES), len(out)
        for p in out:
            seq = seq_of(p)
            if seq is None:
                self.concealed += 1
                continue
            assert seq in self.sent, f"seq {seq} came out but was never sent"
            assert not self.delivered or seq > self.delivered[-1], (
                f"seq {seq} after {self.delivered[-1]}: doubled or out of order")
            self.delivered.append(seq)

    def flush(self) -> None:
        with memory_cap():
            out = self.buf.flush()
        self.take(out)
        assert self.buf.statistics().held == 0

    @precondition(lambda self: self.finished)
    @rule(data=st.data())
    def resend_after_flush(self, data: st.DataObject) -> None:
        """After the end of audio, nothing already sent comes out again."""
        if not self.sent:
            self.flush()
            return
        assert self.feed(data.draw(st.sampled_from(sorted(self.sent)))) == []

    @invariant()
    def bounded(self) -> None:
        assert self.buf.statistics().held <= self.buf.window


class ReorderClient(_Client):
    """Shuffles within the window, duplicates, resumes from earlier seqs, loses packets."""

    def __init__(self) -> None:
        super().__init__()
        self.next = 0  # the client's next new seq
        self.lost: set[int] = set()

    @initialize(window=st.sampled_from([1, 2, 4, 16]), conceal=st.booleans())
    def setup(self, window: int, conceal: bool) -> None:
        self.make(window, conceal)

    @precondition(lambda self: not self.finished)
    @rule(data=st.data())
    def shuffled_block(self, data: st.DataObject) -> None:
        k = data.draw(st.integers(1, self.buf.window))
        block = data.draw(st.permutations(range(self.next, self.next + k)))
        self.next += k
        for seq in block:
            self.feed(seq)
        # Nothing was displaced by a window or more: the whole block is out.
        assert self.delivered[-1] == self.next - 1
        assert set(range(self.next - k, self.next)) <= set(self.delivered)

    @precondition(lambda self: not self.finished and self.next > 0)
    @rule(data=st.data())
    def resend_earlier(self, data: st.DataObject) -> None:
        """A duplicate, or a reconnecting client re-sending from an earlier seq."""
        start = data.draw(st.integers(0, self.next - 1))
        count = data.draw(st.integers(1, min(8, self.next - start)))
        for seq in range(start, start + count):
            assert self.feed(seq) == []

    @precondition(lambda self: not self.finished)
    @rule(gap=st.integers(1, 5))
    def lose_then_continue(self, gap: int) -> None:
        """Packets lost for good; the buffer gives up on them after a window."""
        self.lost |= set(range(self.next, self.next + gap))
        self.next += gap
        before = self.concealed
        for seq in range(self.next, self.next + self.buf.window + 1):
            self.feed(seq)
        self.next += self.buf.window + 1
        assert self.delivered[-1] == self.next - 1
        if self.buf.conceal:
            assert self.concealed - before == gap
        # A lost packet that turns up late is not delivered out of order.
        for seq in sorted(self.lost)[:2]:
            assert self.feed(seq) == []

    @precondition(lambda self: not self.finished)
    @rule()
    def finish(self) -> None:
        self.flush()
        self.finished = True
        assert self.delivered == [s for s in range(self.next) if s not in self.lost]


class WildSeqClient(_Client):
    """An in-order stream with packets whose seq jumps far ahead."""

    def __init__(self) -> None:
        super().__init__()
        self.next = 0
        self.normal: list[int] = []
        self.wild: set[int] = set()

    @initialize(window=st.sampled_from([1, 4, 16]), conceal=st.booleans(),
                first=st.sampled_from([0, 1000, 2**31]))
    def setup(self, window: int, conceal: bool, first: int) -> None:
        self.make(window, conceal)
        self.buf.next_seq = self.next = first  # a resumed session starts mid-way

    @precondition(lambda self: not self.finished)
    @rule(k=st.integers(1, 6))
    def in_order(self, k: int) -> None:
        for seq in range(self.next, self.next + k):
            self.normal.append(seq)
            self.feed(seq)
        self.next += k

    @precondition(lambda self: not self.finished and self.next + 2**16 < U32_MAX)
    @rule(jump=st.integers(2**16, U32_MAX) | st.sampled_from([U32_MAX, 2**31, 10**6]))
    def wild_jump(self, jump: int) -> None:
        seq = min(self.next + jump, U32_MAX)
        self.wild.add(seq)
        self.feed(seq)

    @precondition(lambda self: not self.finished and bool(self.normal))
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        assert self.feed(data.draw(st.sampled_from(self.normal))) == []

    @precondition(lambda self: not self.finished)
    @rule()
    def finish(self) -> None:
        self.flush()
        self.finished = True
        real = [s for s in self.delivered if s not in self.wild]
        assert real == self.normal, (
            f"{len(self.normal) - len(real)} in-order packets vanished after a seq jump")


MACHINE = settings(max_examples=120, stateful_step_count=30, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])
TestReorderClient = ReorderClient.TestCase
TestReorderClient.settings = MACHINE
TestWildSeqClient = WildSeqClient.TestCase
TestWildSeqClient.settings = MACHINE
