"""A session's side of the ASR link: the core's link commands performed over its
``AsrChannel``, and the channel's events fed back to the core.

The core queues its commands without waiting (one list per core call, in order); the
sender performs them in order and joins the audio of everything queued into one DATA
frame. The channel is made at the first utterance and outlives every stream failure
(rerouting, replay and the encoder are the channel's, ``gateway/asrlink.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from asr import link

from .asrlink import AsrChannel, AsrUnavailable, FailoverPolicy
from .core import (
    SAMPLE_RATE,
    LinkAudio,
    LinkBegin,
    LinkCancel,
    LinkConfirm,
    LinkEnd,
    LinkFinalize,
    LinkMove,
    LinkPause,
    SessionCore,
)
from .logs import fields

if TYPE_CHECKING:
    from .context import GatewayContext
    from .protocol import Start
    from .tracing import SessionTrace

log = logging.getLogger("voxgate.gateway.session")


class LinkDriver:
    """Performs one session's link commands; ``done`` once recognition has ended (or
    never began)."""

    def __init__(self, ctx: GatewayContext, core: SessionCore, start: Start,
                 trace: SessionTrace | None, perform: Callable[[], None]) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.core = core
        self.start = start
        self.flow_id = start.flow_id
        self.trace = trace
        self.perform = perform  # the shell performs what the core decided since
        # Lists of link commands, in order (bounded by the core's flow control on the
        # frames waiting for the link).
        self._in, self._out = trio.open_memory_channel[list[Any]](math.inf)
        self.done = trio.Event()
        self.channel: AsrChannel | None = None
        self.pool, self.lang = core.route_pool, core.route_lang  # the channel's route

    def send(self, cmds: list[Any]) -> None:
        """Queue the commands of one core call (no wait)."""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._in.send_nowait(cmds)

    async def aclose(self) -> None:
        if self.channel is not None:
            with trio.CancelScope(shield=True):
                await self.channel.aclose()

    async def run(self, nursery: trio.Nursery) -> None:
        """Perform the core's link commands in order; the audio of everything queued
        now goes in one DATA frame."""
        try:
            while True:
                cmds = await self._out.receive()
                while True:  # take what else is queued: consecutive audio is joined
                    try:
                        cmds += self._out.receive_nowait()
                    except trio.WouldBlock:
                        break
                audio: list[Any] = []
                for cmd in cmds:
                    if type(cmd) is LinkAudio:
                        audio += cmd.frames
                        continue
                    if audio:
                        await self._send_frames(audio)
                        audio = []
                    if await self._command(cmd, nursery):
                        return
                if audio:
                    await self._send_frames(audio)
        finally:
            if self.channel is None:
                self.done.set()

    async def _command(self, cmd: Any, nursery: trio.Nursery) -> bool:
        """Perform one command; True after the last (``LinkEnd``)."""
        kind = type(cmd)
        if kind is LinkBegin:
            (await self._ensure_channel(nursery)).begin(cmd.utterance,
                                                        tentative=cmd.tentative)
        elif kind is LinkConfirm:
            (await self._ensure_channel(nursery)).confirm()
        elif kind is LinkCancel:
            if self.channel is not None:
                await self.channel.cancel()
        elif kind is LinkFinalize:
            if self.channel is not None:
                await self.channel.finalize()
        elif kind is LinkPause:
            if self.channel is not None:
                await self.channel.pause()
        elif kind is LinkMove:
            await self._move(cmd)
        elif kind is LinkEnd:
            if self.channel is not None:
                await self.channel.end()
            else:
                self.done.set()
            return True
        return False

    def _link_start(self) -> link.Start:
        hints = self.start.hints
        return link.Start(
            flow_id=self.flow_id, codec=self.cfg.asr_link_codec,
            bitrate=self.cfg.asr_link_bitrate, lang_hint=self.lang,
            domain=hints.domain or "default", hotwords=hints.hotwords,
            traceparent=(self.trace.asr_traceparent(self.pool)
                         if self.trace is not None else ""),
        )

    async def _move(self, cmd: LinkMove) -> bool:
        """Recognize ``cmd.lang`` from now on: if that is another pool (or another
        language hint), the channel opens a stream there and replays the utterances
        still waiting for their final; the old stream's events are ignored from then on.
        Finals already sent stand; none is sent twice (an utterance is replayed only
        while its final is missing). Returns whether a live stream moved."""
        pool, lang = cmd.pool, cmd.lang
        if (pool, lang) == (self.pool, self.lang):
            return False
        old_pool, old_lang = self.pool, self.lang
        self.pool, self.lang = pool, lang
        if self.channel is None:
            return False  # the first utterance opens on the new route
        t0 = time.perf_counter()
        pending = self.channel.pending_utterances
        try:
            moved = await self.channel.move(pool, self._link_start())
        except AsrUnavailable as exc:
            self.pool, self.lang = old_pool, old_lang
            # The cause names internal hosts and TLS details: the log gets it, the
            # client a summary.
            log.warning("could not move recognition to pool %s: %s", pool, exc,
                        extra=fields(flowId=self.flow_id, stage="asr", lang=lang,
                                     err_code="ASR_UNAVAILABLE"))
            self.core.move_failed(pool, lang, old_pool, old_lang)
            self.perform()
            return False
        log.info("recognition moved from pool %s to %s (%s), utterances %s replayed in "
                 "%.0f ms", old_pool, pool, lang, pending, (time.perf_counter() - t0) * 1000,
                 extra=fields(flowId=self.flow_id, stage="lid", lang=lang))
        return moved

    async def _ensure_channel(self, nursery: trio.Nursery) -> AsrChannel:
        """The session's recognition channel, made at the first utterance; it outlives
        every stream failure (see ``AsrChannel``)."""
        if self.channel is None:
            c = self.cfg
            self.channel = AsrChannel(
                self.ctx.pools, self.pool, self._link_start(),
                codec=c.asr_link_codec, bitrate=c.asr_link_bitrate,
                complexity=c.asr_link_opus_complexity,
                policy=FailoverPolicy(final_deadline_s=c.asr_final_deadline_s,
                                      budget_s=c.asr_failover_budget_s))
            await nursery.start(self.channel.run)
            nursery.start_soon(self._receiver, self.channel)
        return self.channel

    async def _send_frames(self, batch: list[Any]) -> None:
        core = self.core
        channel = self.channel
        if channel is not None:
            stats = core.stats
            before = channel.opus_failures
            sent_before = self.ctx.pools.counters.bytes_sent
            await channel.send_audio(
                [(f.frame.samples, f.frame.start * 1000 // SAMPLE_RATE) for f in batch])
            stats["link_bytes"] += self.ctx.pools.counters.bytes_sent - sent_before
            if channel.opus_failures > before:
                failed = channel.opus_failures - before
                stats["pcm_to_opus_fail"] += failed
                self.ctx.metrics.pcm_to_opus_fail.inc(failed)
        core.link_sent(len(batch))
        self.perform()

    async def _receiver(self, channel: AsrChannel) -> None:
        core = self.core
        try:
            async with contextlib.aclosing(channel.events()) as events:
                async for ev in events:
                    core.link_event(ev, trio.current_time())
                    self.perform()
        finally:
            self.done.set()
