"""The ASR endpoint circuit breaker (sans-IO, synchronous: the time is an argument)."""

from __future__ import annotations

import pytest

from gateway.asrlink import CircuitBreaker


def test_failure_opens_then_one_half_open_probe() -> None:
    b = CircuitBreaker(open_s=1.0)
    assert b.allow(0.0) and b.state == "closed"
    b.failure(0.0)
    assert b.state == "open"
    assert not b.allow(0.5)
    assert b.allow(1.0) and b.state == "half_open"  # the probe
    assert not b.allow(1.1)  # only one probe at a time
    b.success(1.2)
    assert b.state == "closed" and b.allow(1.2) and b.allow(1.3)


def test_failed_probes_back_off_up_to_the_cap() -> None:
    b = CircuitBreaker(open_s=1.0, max_factor=4.0)
    b.failure(0.0)
    now = 0.0
    waits = []
    for _ in range(4):
        t = now
        while not b.allow(t):
            t += 0.25
        waits.append(t - now)
        now = t
        b.failure(now)
    assert waits == [1.0, 2.0, 4.0, 4.0]
    assert b.failures == 5 and b.opened == 5  # each failed probe opens it again


def test_a_lost_probe_is_not_forever() -> None:
    b = CircuitBreaker(open_s=1.0)
    b.failure(0.0)
    assert b.allow(1.0)  # probe goes out and never reports
    assert not b.allow(1.5)
    assert b.allow(2.0)  # another probe after open_s


def test_success_after_a_stream_opened_before_the_failure() -> None:
    b = CircuitBreaker(open_s=1.0)
    b.failure(0.0)
    b.success(0.1)
    assert b.state == "closed"


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(open_s=0)
    with pytest.raises(ValueError):
        CircuitBreaker(open_s=1, max_factor=0.5)


async def test_streams_spread_over_endpoints_and_skip_open_breakers() -> None:
    from gateway.asrlink import AsrPools

    pools = AsrPools({"p": ("http://127.0.0.1:1", "http://127.0.0.1:2")},
                     breaker_open_s=5.0)
    firsts = [pools._candidates("p", None)[0].port for _ in range(4)]
    assert firsts == [1, 2, 1, 2]  # round-robin while the load is equal
    eps = pools._candidates("p", None)
    # The endpoint that just failed goes last, whatever the round-robin says.
    assert [ep.port for ep in pools._candidates("p", avoid=eps[0])][-1] == eps[0].port
    pools.report_failure(eps[0])
    assert [ep.port for ep in pools._candidates("p", None)] == [eps[1].port]
    assert pools.breaker_states()[eps[0].name] == "open"
    assert pools.counters.breaker_opened == 1
