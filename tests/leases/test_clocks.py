"""Renewals and reaps on Redis's clock, and the keeper's measure of its own."""

from __future__ import annotations

import time
from typing import Any

import pytest

from presence_svc.clock import NodeClock
from presence_svc.leases import LeaseKeeper
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from tests.support.clock import MovableClock
from tests.support.leases import GRACE_MS, KEEPER_TTL, TTL_MS, Node, live_nodes, redis_now_ms

# --- clocks -----------------------------------------------------------------------------------


async def test_renewals_and_reaps_run_on_redis_s_clock(
    store: RedisStore, any_redis: Any, keys: Keys
) -> None:
    # No time given: the renewal is stamped when Redis applies it (a renewal dated by its
    # sender looks older than it is when it waited behind a paused Redis).
    before = time.time()
    renewal = await store.renew_node("n1")
    after = time.time()
    assert renewal.alive is False  # new
    assert before * 1000 - 1 <= renewal.at_ms <= after * 1000 + 1
    assert await live_nodes(any_redis, keys) == {"n1": renewal.at_ms}
    # A node renewed a TTL ago by Redis's clock is dead to a reap on Redis's clock.
    await store.renew_node("n2", renewal.at_ms - TTL_MS)
    assert await store.reap_dead_nodes("n1", TTL_MS, GRACE_MS) == 0  # n2 holds nothing
    assert set(await live_nodes(any_redis, keys)) == {"n1"}


async def test_keeper_measures_its_clock_against_redis(node: Node) -> None:
    # The keeper's clock reads a local clock 30 s ahead of Redis's (fakeredis reads the real
    # time): one renewal is enough to correct it, and to call it skewed.
    local = MovableClock()
    local.advance(30)
    clock = NodeClock(local, tolerance=3.0)
    keeper = LeaseKeeper(node.service, KEEPER_TTL, clock=clock)
    await keeper.start()
    assert clock.skew == pytest.approx(30, abs=0.5)
    assert clock.skewed
    assert clock.time() == pytest.approx(await redis_now_ms(node) / 1000, abs=0.5)
    await keeper.shutdown()
