"""A session's recording: encoded inline as ingest accepts audio, stored by a task.

The encoder runs in the ingest call (no I/O, ~26 us a frame: a channel hop per frame to
a task of its own cost more than the encoding); the Ogg pages it yields (about one a
second) go to ``Archiver.run``, which writes them to the store through an
``ArchiveSink``. A failing store never stops that task from draining its queue (that
would freeze ingest): the recording goes on into a local fallback and is stored later
(``ArchiveRetrier``). A cancelled session's recording is salvaged: what was heard is
committed, never deleted. What the client hears of it is decided by
``lifecycle.ArchiveReport``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from stages.archive import CONTENT_TYPE, ArchiveEncoder

from .lifecycle import ArchiveReport
from .logs import fields
from .protocol import ErrorCode, EventWriter
from .records import ArchiveSink

if TYPE_CHECKING:
    from .context import GatewayContext
    from .tracing import SessionTrace

log = logging.getLogger("voxgate.gateway.session")

SALVAGE_S = 5.0  # a cancelled session's recording gets this long to be committed


def record_url(ctx: GatewayContext, key: str) -> str:
    """The recording's absolute URL: signed and expiring when a signer is set (the store
    holds people's voices; the link is the only way in)."""
    path = f"/records/{key}"
    if ctx.signer is not None:
        path = ctx.signer.sign(path)
    return f"{ctx.public_base}{path}"


class Archiver:
    """One session's recording: ``feed`` from ingest, ``run`` as a task, ``end_input``
    when ingest is over; ``result`` (for ``record_url``) once ``done`` is set."""

    def __init__(self, ctx: GatewayContext, flow_id: str, tenant: str, *,
                 ew: EventWriter, emit: Callable[[dict[str, Any]], None],
                 error: Callable[[ErrorCode, str, bool], None], stats: dict[str, Any],
                 trace: SessionTrace | None) -> None:
        self.ctx = ctx
        self.flow_id = flow_id
        self.tenant = tenant
        self.ew = ew
        self.emit = emit
        self.error = error
        self.stats = stats
        self.trace = trace
        self.encoder = ArchiveEncoder(complexity=ctx.cfg.archive_opus_complexity)
        self.report = ArchiveReport()
        self.done = trio.Event()
        self.result: dict[str, Any] | None = None
        self._page_ms = 0.0  # encode time since the last page left
        # Ogg page bytes and a final None.
        self._in, self._out = trio.open_memory_channel[bytes | None](math.inf)

    def feed(self, samples: np.ndarray) -> None:
        """Accepted audio, encoded now; a finished page goes to the store task."""
        enc = self.encoder
        if enc.closed:  # cancelled mid-ingest, the salvage closed it
            return
        t0 = time.perf_counter()
        data = enc.feed(samples)
        ms = (time.perf_counter() - t0) * 1000
        self.stats["compress_ms"] += ms
        self._page_ms += ms
        if data:
            self.ctx.metrics.compress_latency.observe(self._page_ms)
            self._page_ms = 0.0
            self._in.send_nowait(data)

    def end_input(self) -> None:
        """Ingest is over: the task writes the tail and commits."""
        self._in.send_nowait(None)

    def _problem(self, problem: str | None, *, final: bool = False, url: str = "") -> None:
        message = self.report.problem(problem, final=final, url=url)
        if message is not None:
            self.ctx.metrics.errors.labels(ErrorCode.ARCHIVE_FAILED.value).inc()
            self.emit(self.ew.error(ErrorCode.ARCHIVE_FAILED, message, fatal=False))

    async def run(self) -> None:
        """Store the recording as ingest encodes it (pages in, tail at the end)."""
        ctx = self.ctx
        assert ctx.store is not None
        encoder = self.encoder
        sink = ArchiveSink(ctx.store, self.flow_id, ctx.fallback_dir, tenant=self.tenant)
        committed = tail_done = False
        try:
            self._problem(await sink.open())
            async for data in self._out:
                if data is None:
                    break
                self._problem(await sink.write(data))
            tail, result = encoder.close()
            tail_done = True
            self._problem(await sink.write(tail))
            span = self.trace.archive_commit(sink.key) if self.trace is not None else None
            t_commit = time.perf_counter()
            try:
                stored, problem = await sink.commit()
                if span is not None:
                    span.set_attribute("voxgate.stored", stored is not None)
                log.info("recording %s", "committed" if stored is not None else "not stored",
                         extra=fields(flowId=self.flow_id, stage="archive",
                                      bytes_out=result.bytes,
                                      latency_ms=round((time.perf_counter() - t_commit)
                                                       * 1000, 1),
                                      err_code=None if stored is not None
                                      else "ARCHIVE_FAILED"))
            finally:
                if span is not None:
                    span.end()
            committed = True
            url = record_url(ctx, sink.key)
            if stored is None:
                self._problem(problem or "the recording could not be stored", final=True,
                              url=url)
                if ctx.archive_retrier is not None:
                    ctx.archive_retrier.poke()
                return
            self.result = {
                "url": url, "duration_ms": result.duration_ms, "size_bytes": result.bytes,
                "sha256": result.sha256, "content_type": CONTENT_TYPE,
            }
        except ValueError as exc:
            log.exception("archive failed for %s", self.flow_id)
            self.error(ErrorCode.INTERNAL, f"recording failed: {exc}", False)
            with trio.CancelScope(shield=True):
                await sink.abort()
            committed = True
        finally:
            if not committed:
                # Cancelled (shutdown grace over, a crash elsewhere): keep what was
                # heard, never delete it.
                await self._salvage(sink, tail_done)
            self.done.set()

    async def _salvage(self, sink: ArchiveSink, tail_done: bool) -> None:
        """Close and commit the recording of the audio received so far (what is still
        queued included), shielded and bounded; a store that cannot take it in time
        leaves it in the fallback folder."""
        with trio.CancelScope(shield=True), trio.move_on_after(SALVAGE_S):
            try:
                while not tail_done:
                    data = self._out.receive_nowait()
                    if data is None:
                        break
                    await sink.write(data)
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                pass
            try:
                if not tail_done:
                    tail, _result = self.encoder.close()
                    await sink.write(tail)
                stored, problem = await sink.commit()
            except (OSError, ValueError) as exc:
                log.error("recording of %s could not be salvaged: %s", self.flow_id, exc)
                return
            log.info("recording of %s committed on cancellation: %s", self.flow_id,
                     stored.key if stored else problem, extra=fields(
                         flowId=self.flow_id, stage="archive"))
            if stored is None and self.ctx.archive_retrier is not None:
                self.ctx.archive_retrier.poke()
