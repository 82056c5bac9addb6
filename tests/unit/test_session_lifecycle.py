"""A session's decisions around its core (``gateway/lifecycle.py``), driven
synchronously: before ``start``, admission, the ``ack``, the archive's errors, the end."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway import lifecycle
from gateway.config import GatewayConfig
from gateway.protocol import (
    ErrorCode,
    EventWriter,
    Hints,
    OversizedMessage,
    ProtocolViolation,
    Start,
)
from stages.reframe import SeqBuffer


def _ew() -> EventWriter:
    return EventWriter("")


def _start_text(**extra: Any) -> str:
    msg: dict[str, Any] = {"type": "start", "flowId": "f-1"}
    msg.update(extra)
    return json.dumps(msg)


# -- before start ------------------------------------------------------------------------

def test_a_valid_start_begins_the_session_and_names_the_flow() -> None:
    ew = _ew()
    step = lifecycle.before_start(ew, _start_text())
    assert step.start is not None and step.start.flow_id == "f-1"
    assert step.events == () and step.close_code is None
    assert ew.flow_id == "f-1"


def test_audio_and_other_messages_before_start_get_a_non_fatal_error() -> None:
    for message in (b"\0\0" * 320, json.dumps({"type": "flush"})):
        step = lifecycle.before_start(_ew(), message)
        assert step.start is None and step.close_code is None
        (ev,) = step.events
        assert ev["type"] == "error" and ev["code"] == "NOT_STARTED" and not ev["fatal"]


def test_a_ping_before_start_is_answered() -> None:
    step = lifecycle.before_start(_ew(), json.dumps({"type": "ping", "id": "x"}))
    (ev,) = step.events
    assert ev["type"] == "pong" and ev.get("id") == "x"
    assert step.close_code is None and step.start is None


def test_an_oversized_message_closes_with_1009() -> None:
    step = lifecycle.before_start(_ew(), OversizedMessage(size=9_000_000, limit=65536))
    (ev,) = step.events
    assert ev["code"] == "FRAME_TOO_LARGE" and ev["fatal"]
    assert step.close_code == 1009 and step.rejected is None


def test_a_protocol_violation_closes_with_its_code() -> None:
    violation = ProtocolViolation(1007, "not UTF-8")
    step = lifecycle.before_start(_ew(), violation)
    (ev,) = step.events
    assert ev["fatal"] and ev["code"] == violation.error_code.value
    assert step.close_code == 1007


def test_a_fatally_bad_start_is_rejected_and_closes_with_1008() -> None:
    step = lifecycle.before_start(_ew(), _start_text(audio={"codec": "mp3"}))
    (ev,) = step.events
    assert ev["code"] == "UNSUPPORTED_AUDIO" and ev["fatal"] and step.start is None
    assert step.close_code == 1008 and step.rejected is ErrorCode.UNSUPPORTED_AUDIO


def test_bad_json_before_start_is_not_fatal() -> None:
    step = lifecycle.before_start(_ew(), "{not json")
    (ev,) = step.events
    assert ev["code"] == "BAD_JSON" and not ev["fatal"]
    assert step.close_code is None and step.rejected is None


def test_no_start_in_time_is_a_fatal_start_timeout() -> None:
    step = lifecycle.start_timeout(_ew(), 10.0)
    (ev,) = step.events
    assert ev["code"] == "START_TIMEOUT" and ev["fatal"] and "10 s" in ev["message"]
    assert step.close_code == 1008 and step.rejected is ErrorCode.START_TIMEOUT


# -- admission ---------------------------------------------------------------------------

def _start(features: frozenset[str] = frozenset()) -> Start:
    return Start(flow_id="f-1", features=features)


def test_only_the_same_tenant_with_seq_header_resumes_a_parked_session() -> None:
    seq = frozenset({"seq_header"})
    assert lifecycle.resumes(_start(seq), "acme", "acme")
    assert lifecycle.resumes(_start(seq), "", "")  # no authentication: no tenants
    assert not lifecycle.resumes(_start(seq), "evil", "acme")
    assert not lifecycle.resumes(_start(), "acme", "acme")
    assert not lifecycle.resumes(_start(seq), "acme", None)  # nothing parked


def test_a_session_waits_for_its_client_only_when_it_can_resume() -> None:
    assert lifecycle.may_park(seq_header=True, resume_window_s=30, shutting_down=False)
    assert not lifecycle.may_park(seq_header=False, resume_window_s=30,
                                  shutting_down=False)
    assert not lifecycle.may_park(seq_header=True, resume_window_s=0, shutting_down=False)
    assert not lifecycle.may_park(seq_header=True, resume_window_s=30, shutting_down=True)


def _capacity(**kw: Any) -> tuple[ErrorCode, str] | None:
    args: dict[str, Any] = {
        "shutting_down": False, "flow_live": lambda: False, "sessions": 0,
        "max_sessions": 10, "tenant_sessions": lambda: 0, "max_per_tenant": 0}
    args.update(kw)
    tenant = args.pop("tenant", "acme")
    return lifecycle.capacity_problem("f-1", tenant, **args)


def test_capacity_admits_within_every_cap() -> None:
    assert _capacity() is None
    assert _capacity(sessions=9, max_per_tenant=3, tenant_sessions=lambda: 2) is None


def test_capacity_checks_in_order_and_asks_only_what_it_needs() -> None:
    asked: list[str] = []

    def live() -> bool:
        asked.append("flow")
        return True

    def count() -> int:
        asked.append("tenant")
        return 99

    problem = _capacity(shutting_down=True, flow_live=live, tenant_sessions=count,
                        max_per_tenant=1)
    assert problem is not None and problem[0] is ErrorCode.BUSY
    assert "shutting down" in problem[1]
    assert asked == []  # the registry claims a flowId it is asked about
    problem = _capacity(flow_live=live, tenant_sessions=count, max_per_tenant=1)
    assert problem is not None and problem[0] is ErrorCode.FLOW_EXISTS
    assert asked == ["flow"]


def test_capacity_busy_at_max_sessions() -> None:
    problem = _capacity(sessions=10)
    assert problem == (ErrorCode.BUSY, "the gateway is at 10 sessions")


def test_capacity_per_tenant_cap() -> None:
    problem = _capacity(max_per_tenant=2, tenant_sessions=lambda: 2)
    assert problem is not None and problem[0] is ErrorCode.RATE_LIMITED
    assert "2 sessions open" in problem[1] and "most allowed is 2" in problem[1]
    # No cap, or no tenant (no authentication): not counted.
    assert _capacity(max_per_tenant=0, tenant_sessions=lambda: 50) is None
    assert _capacity(tenant="", max_per_tenant=1, tenant_sessions=lambda: 50) is None


def test_a_saved_recording_takes_the_flow() -> None:
    assert lifecycle.saved_problem("f-1", False) is None
    problem = lifecycle.saved_problem("f-1", True)
    assert problem is not None and problem[0] is ErrorCode.FLOW_EXISTS


def test_a_full_gateway_refuses_with_a_retry_hint_a_closing_one_without() -> None:
    busy = (ErrorCode.BUSY, "the gateway is at 1 sessions")
    events = lifecycle.refusal(_ew(), busy, shutting_down=False)
    assert [e["type"] for e in events] == ["flow", "error", "end"]
    assert events[0]["state"] == "BUSY" and events[0]["retry_after_ms"] == 1000
    assert events[1]["fatal"] and events[2]["reason"] == "error"
    events = lifecycle.refusal(_ew(), busy, shutting_down=True)
    assert [e["type"] for e in events] == ["error", "end"]
    events = lifecycle.refusal(_ew(), (ErrorCode.UNAUTHORIZED, "bad token"),
                               shutting_down=False)
    assert [e["type"] for e in events] == ["error", "end"]
    assert events[0]["code"] == "UNAUTHORIZED"


# -- the ack -----------------------------------------------------------------------------

def test_the_ack_describes_the_session_and_its_limits() -> None:
    cfg = GatewayConfig()
    start = Start(flow_id="f-1", features=frozenset({"seq_header"}),
                  hints=Hints(user_lang_pref="de"))
    ack = lifecycle.ack_event(_ew(), cfg, start, seqbuf=None, denoise=False, lid=False,
                              asr_pool="default", record=True, trace_id="abc")
    s, lim = ack["session"], ack["limits"]
    assert ack["type"] == "ack"
    assert s["features"] == ["seq_header"] and s["lang_pref"] == "de"
    assert s["sr"] == 16000 and s["frame_ms"] == 20 and s["record"] is True
    assert s["trace_id"] == "abc" and "resumed" not in s
    assert s["partial_interval_ms"] == cfg.partial_interval_ms
    assert s["flush_idle_ms"] == int(cfg.flush_idle_s * 1000)
    assert lim["max_frame_bytes"] == cfg.max_frame_bytes
    assert lim["max_text_frame_bytes"] == 16 * 1024
    assert lim["reorder_window"] == 0 and lim["max_seq_ahead"] == 0
    no_trace = lifecycle.ack_event(_ew(), cfg, start, seqbuf=None, denoise=False,
                                   lid=False, asr_pool="default", record=False)
    assert "trace_id" not in no_trace["session"]


def test_a_resumed_ack_names_the_next_seq() -> None:
    seqbuf = SeqBuffer(conceal=True)
    start = Start(flow_id="f-1", features=frozenset({"seq_header"}))
    ack = lifecycle.ack_event(_ew(), GatewayConfig(), start, seqbuf=seqbuf, denoise=True,
                              lid=True, asr_pool="multi", record=False, resumed=True)
    s = ack["session"]
    assert s["resumed"] is True and s["next_seq"] == seqbuf.next_seq
    assert s["denoise"] and s["lid"] and s["asr_pool"] == "multi"
    assert ack["limits"]["reorder_window"] == seqbuf.window


# -- the archive -------------------------------------------------------------------------

def test_the_archive_tells_its_first_failure_once_and_its_verdict_always() -> None:
    report = lifecycle.ArchiveReport()
    assert report.problem(None) is None and not report.told
    assert report.problem("the store is down") == "recording: the store is down"
    assert report.problem("the store is still down") is None  # once
    url = "https://gw/records/f-1.ogg"
    final = report.problem("kept in the fallback folder", final=True, url=url)
    assert final == f"recording: kept in the fallback folder (it will appear at {url})"
    assert lifecycle.ArchiveReport().problem("lost", final=True, url=url) == \
        "recording: lost"  # not kept: no promise of a URL


# -- the end -----------------------------------------------------------------------------

_ARCHIVE = {"url": "https://gw/records/f-1.ogg", "duration_ms": 1000, "size_bytes": 9,
            "sha256": "00", "content_type": "audio/ogg"}


@pytest.mark.parametrize(("returns", "archive", "types"), [
    ({"asr", "record_url", "metrics"}, _ARCHIVE, ["record_url", "metrics", "end"]),
    ({"asr", "metrics"}, _ARCHIVE, ["metrics", "end"]),
    ({"record_url"}, None, ["end"]),  # not stored: no record_url
    ({"record_url"}, _ARCHIVE, ["record_url", "end"]),
    (set(), _ARCHIVE, ["end"]),
])
def test_the_last_events_in_order(returns: set[str], archive: dict[str, Any] | None,
                                  types: list[str]) -> None:
    events = lifecycle.end_events(_ew(), "flush", returns, archive=archive,
                                  metrics={"audio_ms": 1000})
    assert [e["type"] for e in events] == types
    assert events[-1]["reason"] == "flush"
    if "record_url" in types:
        assert events[0]["url"] == _ARCHIVE["url"]


def test_the_final_wait_covers_the_failover_budget() -> None:
    assert lifecycle.final_wait_s(15.0, 5.0) == 20.0


# -- the shell's capacity inputs ---------------------------------------------------------

class _Flows(dict[str, Any]):
    """A multi-worker flow registry: it counts a tenant's sessions over the instance."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def tenant_sessions(self, tenant: str) -> int:
        return self.count


class _Event:
    def is_set(self) -> bool:
        return False


class _Sess:
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant


def _ctx(flows: dict[str, Any], sessions: set[Any]) -> Any:
    from types import SimpleNamespace

    cfg = SimpleNamespace(max_sessions=100, max_sessions_per_tenant=2)
    return SimpleNamespace(cfg=cfg, flows=flows, sessions=sessions,
                           shutting_down=_Event())


def test_the_tenant_cap_counts_the_instance_when_the_registry_can() -> None:
    from gateway.admission import capacity_problem

    mine = {_Sess("acme"), _Sess("other")}
    # One process: its own sessions of the tenant.
    assert capacity_problem(_ctx({}, mine), "f-1", "acme") is None
    two = mine | {_Sess("acme")}
    problem = capacity_problem(_ctx({}, two), "f-1", "acme")
    assert problem is not None and problem[0] is ErrorCode.RATE_LIMITED
    # --workers: the registry's count over every worker, whatever this one holds.
    problem = capacity_problem(_ctx(_Flows(2), mine), "f-1", "acme")
    assert problem is not None and problem[0] is ErrorCode.RATE_LIMITED
    assert capacity_problem(_ctx(_Flows(1), two), "f-1", "acme") is None
    live = _Flows(0)
    live["f-1"] = object()
    problem = capacity_problem(_ctx(live, set()), "f-1", "acme")
    assert problem is not None and problem[0] is ErrorCode.FLOW_EXISTS
