"""NodeClock: the local clock corrected to Redis's, and the token checks that read it.

The local clock is a MovableClock the test sets; "Redis's time" is whatever the test reports
through `observe`, as LeaseKeeper does with each renewal's reply.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from presence_svc.auth import AuthError, TokenVerifier
from presence_svc.clock import MAX_READING_RTT, NodeClock
from tests.support.auth import SECRET, token
from tests.support.clock import MovableClock

LOCAL = 1_800_000_000.0


def node_clock(tolerance: float = 3.0) -> tuple[NodeClock, MovableClock]:
    local = MovableClock(LOCAL)
    return NodeClock(local, tolerance=tolerance), local


def test_time_is_the_local_clock_until_a_reading() -> None:
    clock, local = node_clock()
    assert (clock.time(), clock.skew, clock.skewed, clock.measured) == (LOCAL, 0.0, False, False)
    local.advance(2.5)
    assert clock.time() == LOCAL + 2.5


def test_a_reading_sets_the_offset_from_the_middle_of_the_round_trip() -> None:
    clock, local = node_clock()
    # The call left at LOCAL and came back 0.2 s later; Redis said LOCAL + 30.1 meanwhile.
    assert clock.observe(LOCAL + 30.1, LOCAL, LOCAL + 0.2) is True
    assert clock.offset == pytest.approx(30.0)
    assert clock.skew == pytest.approx(-30.0)  # the local clock is 30 s behind
    assert clock.measured
    local.advance(10)
    assert clock.time() == pytest.approx(LOCAL + 40.0)


def test_a_slow_reading_is_ignored() -> None:
    clock, _ = node_clock()
    clock.observe(LOCAL + 1.0, LOCAL, LOCAL)
    # A reply that waited behind a paused Redis: its time is not the time of its arrival.
    assert clock.observe(LOCAL + 100.0, LOCAL, LOCAL + MAX_READING_RTT + 0.01) is False
    assert clock.observe(LOCAL + 100.0, LOCAL + 1, LOCAL) is False  # the local clock jumped back
    assert clock.offset == 1.0


def test_skew_beyond_the_tolerance_is_reported_once_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, _ = node_clock(tolerance=3.0)
    with caplog.at_level(logging.INFO, logger="presence_svc.clock"):
        clock.observe(LOCAL - 2.9, LOCAL, LOCAL)
        assert not clock.skewed
        clock.observe(LOCAL - 30.0, LOCAL, LOCAL)
        clock.observe(LOCAL - 31.0, LOCAL, LOCAL)
        assert clock.skewed and clock.skew == 31.0
        clock.observe(LOCAL + 0.5, LOCAL, LOCAL)
        assert not clock.skewed
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(records) == 2, records
    assert records[0][0] == logging.WARNING and "+30.000s off Redis's" in records[0][1]
    assert records[1][0] == logging.INFO and "back within 3.0s" in records[1][1]


async def test_a_timer_fires_at_the_instant_on_redis_s_clock() -> None:
    clock, local = node_clock()
    clock.observe(LOCAL + 30.0, LOCAL, LOCAL)  # local clock 30 s behind
    fired = asyncio.Event()
    clock.call_at(LOCAL + 60.0, fired.set)  # 30 s from now, on the shared clock
    local.advance(29.9)
    await asyncio.sleep(0)  # a due timer runs in the loop soon: give it the chance
    assert not fired.is_set()
    local.advance(0.1)
    await asyncio.wait_for(fired.wait(), 1)


def test_tokens_are_checked_on_the_node_clock_not_the_local_one() -> None:
    # The local clock is 30 s behind: a fresh token's `iat` looks 30 s ahead of it, which
    # PyJWT's own check (on the local clock) refuses. On the node's clock it is fresh.
    local = MovableClock()
    local.advance(-30)
    behind = NodeClock(local)
    behind.observe(time.time(), local.time(), local.time())
    verifier = TokenVerifier(SECRET, clock=behind.time)
    assert verifier.user_id(token("alice", ttl=60)) == "alice"

    # The other way round: the shared clock is past the token's `exp`, the local one is not.
    ahead = MovableClock()
    ahead.advance(61)
    late = TokenVerifier(SECRET, clock=ahead.time)
    with pytest.raises(AuthError, match="token expired"):
        late.user_id(token("bob", ttl=60))
    early = TokenVerifier(SECRET, clock=lambda: ahead.time() - 120)
    with pytest.raises(AuthError, match=r"not yet valid \(iat\)"):
        early.user_id(token("carol", ttl=60))


def test_an_accepted_token_expires_on_the_node_clock() -> None:
    now = MovableClock()
    verifier = TokenVerifier(SECRET, clock=now.time)
    signed = token("alice", ttl=60)
    assert verifier.user_id(signed) == "alice"
    now.advance(61)
    with pytest.raises(AuthError, match="token expired"):
        verifier.user_id(signed)  # not served from the cache of accepted tokens
