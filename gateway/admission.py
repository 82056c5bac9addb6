"""A connection's way to a session: await ``start``, authenticate, admit or refuse.

The decisions are ``gateway/lifecycle.py``'s (sans-IO); this module does their I/O:
reads the socket until a valid ``start`` (within ``START_TIMEOUT_S``; until then the
connection holds a socket but no session slot), verifies the token, asks the store
whether the flowId already has a recording, and sends the refusals.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed

from . import lifecycle
from .lifecycle import PreStart, Problem
from .logs import fields
from .protocol import ErrorCode, Start
from .records import record_key
from .writer import Writer

if TYPE_CHECKING:
    from .context import GatewayContext

log = logging.getLogger("voxgate.gateway.session")


async def await_start(ctx: GatewayContext, writer: Writer) -> Start | None:
    """Read until a valid ``start``; earlier bad messages get non-fatal errors, fatal
    ones close the connection (None). A connection that sends no ``start`` within
    ``START_TIMEOUT_S`` is closed."""
    with trio.move_on_after(ctx.cfg.start_timeout_s):
        while True:
            try:
                message = await writer.sock.ws.get_message()
            except ConnectionClosed:
                return None
            step = lifecycle.before_start(writer.ew, message)
            if step.start is not None:
                return step.start
            if await _perform(ctx, writer, step):
                return None
    await _perform(ctx, writer, lifecycle.start_timeout(writer.ew, ctx.cfg.start_timeout_s))
    return None


async def _perform(ctx: GatewayContext, writer: Writer, step: PreStart) -> bool:
    """Send the step's events, close when it says so; returns whether it closed."""
    for event in step.events:
        await writer.send_now(event)
    if step.rejected is not None:
        ctx.metrics.rejected.labels(step.rejected.value).inc()
    if step.close_code is None:
        return False
    await writer.close(step.close_code)
    return True


async def authenticate(ctx: GatewayContext, writer: Writer, start: Start) -> str | None:
    """Verify ``start.auth.token`` when authentication is configured; return the tenant
    that owns this session's flowId and recording (the token's ``tenant`` claim, else
    ``sub``), ``""`` without authentication (``start.tenant_id`` is the client's word: it
    labels traces but never scopes storage), or None when refused."""
    if ctx.auth is None:
        return ""
    from .auth import AuthError

    try:
        claims = ctx.auth.verify(start.token)
    except AuthError as exc:
        await refuse(ctx, writer, (ErrorCode.UNAUTHORIZED, str(exc)))
        return None
    return claims.tenant


async def refuse(ctx: GatewayContext, writer: Writer, problem: Problem) -> None:
    """Refuse the session at ``start``: (a BUSY flow,) a fatal error, ``end``, close."""
    code, message = problem
    ctx.metrics.rejected.labels(code.value).inc()
    log.info("session refused: %s", message, extra=fields(
        flowId=writer.ew.flow_id, stage="session", err_code=code.value))
    for event in lifecycle.refusal(writer.ew, problem,
                                   shutting_down=ctx.shutting_down.is_set()):
        await writer.send_now(event)
    await writer.close(1008)


def capacity_problem(ctx: GatewayContext, flow_id: str, tenant: str) -> Problem | None:
    """Why no slot can be taken now (no await), or None. The per-tenant cap counts the
    whole instance when the flow registry can (``--workers``), else this process."""
    cfg = ctx.cfg
    flows = ctx.flows
    count = getattr(flows, "tenant_sessions", None)

    def tenant_sessions() -> int:
        if count is not None:
            return int(count(tenant))
        return sum(1 for s in ctx.sessions if s.tenant == tenant)

    return lifecycle.capacity_problem(
        flow_id, tenant, shutting_down=ctx.shutting_down.is_set(),
        flow_live=lambda: flow_id in flows, sessions=len(ctx.sessions),
        max_sessions=cfg.max_sessions, tenant_sessions=tenant_sessions,
        max_per_tenant=cfg.max_sessions_per_tenant)


async def admit(ctx: GatewayContext, writer: Writer, start: Start, tenant: str
                ) -> str | None:
    """Check that a slot may be taken for this flowId; return the recording's store key,
    or None when refused (the client has been told). Checks that await (the store) come
    first and capacity is checked again last: the caller takes the slot as this returns,
    with no await in between, so two starts of one flowId cannot both pass."""
    flow_id = start.flow_id
    problem = capacity_problem(ctx, flow_id, tenant)
    key = ""
    if problem is None:
        try:
            key = record_key(flow_id, tenant)
        except ValueError as exc:
            problem = (ErrorCode.BAD_REQUEST, str(exc))
    if (problem is None and not start.flow_id_generated
            and ctx.store is not None and ctx.cfg.enable_compress):
        problem = await saved_problem(ctx, flow_id, key)
    if problem is None:
        problem = capacity_problem(ctx, flow_id, tenant)  # again: the store check awaited
    if problem is not None:
        await refuse(ctx, writer, problem)
        return None
    return key


async def saved_problem(ctx: GatewayContext, flow_id: str, key: str) -> Problem | None:
    """FLOW_EXISTS when this tenant already has a recording under ``key``: a new session
    would replace it. A store that cannot say lets the session start (it is the same
    tenant's own recording at stake, and a start must not hang on it)."""
    assert ctx.store is not None
    try:
        with trio.fail_after(ctx.cfg.send_timeout_s):
            saved = await ctx.store.exists(key)
    except Exception as exc:  # the store's errors vary (OSError, S3, timeouts)
        log.warning("could not check for a saved recording %s: %r", key, exc,
                    extra=fields(flowId=flow_id, stage="archive"))
        return None
    return lifecycle.saved_problem(flow_id, bool(saved))
