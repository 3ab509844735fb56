"""Releasing a connection: the grace before its session leaves, tabs, reconnects: the store."""

from __future__ import annotations

from typing import Any

import pytest

from presence_svc.models import (
    CURSOR_MOVED,
    USER_ACTIVE,
    USER_AWAY,
    USER_IDLE,
    USER_JOINED,
    USER_LEFT,
    Holder,
    Status,
    SweepReport,
    iso_from_ms,
)
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.redis.sweep import EMPTY_STUDY_TTL_MS
from tests.support.events import EventTap, kinds
from tests.support.leases import (
    GRACE_MS,
    assert_gone,
    hold,
    holders,
    lease,
    pending_leaves,
    smembers,
    users_of,
)
from tests.support.store import AWAY_MS, EXPIRE_MS, IDLE_MS, NO_CURSOR, both, schedule_score

# --- releasing --------------------------------------------------------------------------------


async def test_release_leaves_after_the_grace_not_before(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    joined = await hold(store, "alice", "s1", "c1", t0, cursor=both("ch1", "m1"))
    await tap.drain()
    released_at = t0 + 1_000
    leave_at = released_at + GRACE_MS

    assert await store.release([lease("s1", "alice", "c1")], leave_at, released_at) == 1
    assert await tap.drain() == []
    assert await pending_leaves(any_redis, keys, "s1") == {"alice": leave_at}
    assert await holders(any_redis, keys, "s1", "alice") == set()
    assert await smembers(any_redis, keys.node_leases("n1")) == set()
    # The study is due exactly at the leave: a sweep 1 ms earlier does not even pick it.
    assert await schedule_score(any_redis, keys, "s1") == leave_at
    assert await store.sweep(leave_at - 1) == SweepReport()
    assert await tap.drain() == []
    assert await users_of(store, "s1") == {"alice": Status.ACTIVE}

    assert await store.sweep(leave_at) == SweepReport(studies=1, events=1)
    [left] = await tap.drain()
    assert left.type == USER_LEFT
    assert left.ts == leave_at
    assert left.data == {
        "session_id": joined.session_id,
        "user_id": "alice",
        "study_id": "s1",
        "chapter_id": "ch1",
        "move_path": "m1",
        "status": "active",
        "previous_status": None,
        "timestamp": iso_from_ms(leave_at),
        "seq": 2,
    }
    await assert_gone(any_redis, keys, "s1", "alice")
    assert 0 < await any_redis.pttl(keys.study("s1").meta) <= EMPTY_STUDY_TTL_MS
    assert await schedule_score(any_redis, keys, "s1") is None
    # Once only.
    assert await store.sweep(leave_at + EXPIRE_MS) == SweepReport()
    assert await tap.drain() == []


async def test_sweep_after_the_leave_time_publishes_user_left_once(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await hold(store, "alice", "s1", "c1", t0)
    await store.release([lease("s1", "alice", "c1")], t0 + GRACE_MS, t0)
    await tap.drain()
    # No sweep ran for a while: the overdue leave is applied by the first one, status as it was.
    late = t0 + GRACE_MS + 7_777
    assert await store.sweep(late) == SweepReport(studies=1, events=1)
    [left] = await tap.drain()
    assert (left.type, left.status, left.ts) == (USER_LEFT, "active", late)
    assert await store.sweep(late) == SweepReport()


async def test_grace_longer_than_idle_still_idles_then_leaves(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await hold(store, "alice", "s1", "c1", t0)
    leave_at = t0 + IDLE_MS + 20_000
    assert await store.release([lease("s1", "alice", "c1")], leave_at, t0) == 1
    # The idle sweep is still due at its own time (the earlier of the two).
    assert await schedule_score(any_redis, keys, "s1") == t0 + IDLE_MS
    await store.sweep(t0 + IDLE_MS)
    assert await schedule_score(any_redis, keys, "s1") == leave_at
    await store.sweep(leave_at - 1)
    await store.sweep(leave_at)
    events = await tap.drain()
    assert [(e.type, e.status, e.ts) for e in events] == [
        (USER_JOINED, "active", t0),
        (USER_IDLE, "idle", t0 + IDLE_MS),
        (USER_LEFT, "idle", leave_at),
    ]


async def test_release_of_an_old_held_session_still_waits_for_the_grace(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    """A held session close to (or past) its expiry age leaves at its leave time, not earlier."""
    await hold(store, "alice", "s1", "c1", t0)
    await hold(store, "bob", "s1", "c2", t0)
    await store.sweep(t0 + IDLE_MS)
    await store.sweep(t0 + AWAY_MS)
    assert len(await tap.drain()) == 6

    # alice's tab closes 5 s before her heartbeat is 10 min old; bob's 1 s after.
    alice_released = t0 + EXPIRE_MS - 5_000
    await store.release([lease("s1", "alice", "c1")], alice_released + GRACE_MS, alice_released)
    await store.sweep(t0 + EXPIRE_MS)
    bob_released = t0 + EXPIRE_MS + 1_000
    await store.release([lease("s1", "bob", "c2")], bob_released + GRACE_MS, bob_released)
    for now in range(bob_released, alice_released + GRACE_MS, 1_000):
        await store.sweep(now)
    assert await tap.drain() == [], "left before the grace was over"
    assert await users_of(store, "s1") == {"alice": Status.AWAY, "bob": Status.AWAY}

    await store.sweep(alice_released + GRACE_MS)
    assert kinds(await tap.drain()) == [(USER_LEFT, "alice")]
    # bob reconnects within his grace: no flap.
    await hold(store, "bob", "s1", "c3", bob_released + GRACE_MS - 1)
    assert kinds(await tap.drain()) == [(USER_ACTIVE, "bob")]
    await store.sweep(bob_released + GRACE_MS)
    assert await tap.drain() == []
    assert await users_of(store, "s1") == {"bob": Status.ACTIVE}


@pytest.mark.parametrize(
    "reconnect",
    # Not the released connection itself: a heartbeat of it is one sent before its release, and
    # holds nothing (tests/redis/test_store.py, "a hold by a released connection").
    [Holder("n1", "c2"), Holder("n2", "c9"), None],
    ids=["new-tab-same-node", "other-node", "rest"],
)
async def test_heartbeat_within_the_grace_calls_the_leave_off(
    store: RedisStore,
    tap: EventTap,
    any_redis: Any,
    keys: Keys,
    t0: int,
    reconnect: Holder | None,
) -> None:
    first = await hold(store, "alice", "s1", "c1", t0, cursor=both("ch1", "m1"))
    await tap.drain()
    leave_at = t0 + 2_000 + GRACE_MS
    await store.release([lease("s1", "alice", "c1")], leave_at, t0 + 2_000)

    again = await store.heartbeat("alice", "s1", NO_CURSOR, leave_at - 1, reconnect)
    assert again.session_id == first.session_id
    assert again.joined_at_ms == t0
    assert await tap.drain() == []  # no user_left, no second user_joined, nothing at all
    assert await pending_leaves(any_redis, keys, "s1") == {}
    expected_holders = set() if reconnect is None else {reconnect.connection_id}
    assert await holders(any_redis, keys, "s1", "alice") == expected_holders

    await store.sweep(leave_at)
    await store.sweep(leave_at + 1)
    assert await tap.drain() == []
    beat = leave_at - 1
    for at in (beat + IDLE_MS, beat + AWAY_MS, beat + EXPIRE_MS):
        await store.sweep(at)
    events = await tap.drain()
    if reconnect is None:
        # Kept by REST heartbeats only: the normal expiry.
        assert kinds(events) == [(USER_IDLE, "alice"), (USER_AWAY, "alice"), (USER_LEFT, "alice")]
        assert events[-1].ts == beat + EXPIRE_MS
        await assert_gone(any_redis, keys, "s1", "alice")
    else:
        assert kinds(events) == [(USER_IDLE, "alice"), (USER_AWAY, "alice")]
        assert await users_of(store, "s1") == {"alice": Status.AWAY}
    assert [e.seq for e in events] == list(range(2, 2 + len(events)))


async def test_reconnect_of_an_idle_user_within_the_grace_only_reactivates(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await hold(store, "alice", "s1", "c1", t0, cursor=both("ch1", "m1"))
    await store.sweep(t0 + IDLE_MS)
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice"), (USER_IDLE, "alice")]
    released = t0 + IDLE_MS + 1
    await store.release([lease("s1", "alice", "c1")], released + GRACE_MS, released)

    await hold(store, "alice", "s1", "c2", released + 3_000, node="n2", cursor=both("ch1", "m2"))
    events = await tap.drain()
    assert [(e.type, e.status, e.seq) for e in events] == [
        (USER_ACTIVE, "active", 3),
        (CURSOR_MOVED, "active", 4),
    ]
    await store.sweep(released + GRACE_MS)
    assert await tap.drain() == []


async def test_two_tabs_leave_only_when_both_closed(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await hold(store, "alice", "s1", "tab1", t0)
    await hold(store, "alice", "s1", "tab2", t0 + 500)
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]
    assert await holders(any_redis, keys, "s1", "alice") == {"tab1", "tab2"}

    assert (
        await store.release([lease("s1", "alice", "tab1")], t0 + 1_000 + GRACE_MS, t0 + 1_000) == 0
    )
    assert await tap.drain() == []
    assert await pending_leaves(any_redis, keys, "s1") == {}
    # Still held by tab2: idles and goes away, but never leaves.
    for at in (t0 + 1_000 + GRACE_MS, t0 + IDLE_MS + 500, t0 + AWAY_MS + 500, t0 + 3 * EXPIRE_MS):
        await store.sweep(at)
    assert kinds(await tap.drain()) == [(USER_IDLE, "alice"), (USER_AWAY, "alice")]

    # Releasing tab1 again is a no-op.
    now = t0 + 3 * EXPIRE_MS
    assert await store.release([lease("s1", "alice", "tab1")], now + GRACE_MS, now) == 0
    assert await pending_leaves(any_redis, keys, "s1") == {}

    assert await store.release([lease("s1", "alice", "tab2")], now + GRACE_MS, now) == 1
    assert await pending_leaves(any_redis, keys, "s1") == {"alice": now + GRACE_MS}
    await store.sweep(now + GRACE_MS - 1)
    assert await tap.drain() == []
    await store.sweep(now + GRACE_MS)
    [left] = await tap.drain()
    assert (left.type, left.status, left.seq) == (USER_LEFT, "away", 4)
    # A late duplicate release of either tab does nothing.
    assert await store.release([lease("s1", "alice", "tab2")], now + 2 * GRACE_MS, now) == 0
    assert await pending_leaves(any_redis, keys, "s1") == {}


async def test_releasing_both_tabs_in_one_call(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await hold(store, "alice", "s1", "tab1", t0)
    await hold(store, "alice", "s1", "tab2", t0)
    await hold(store, "bob", "s2", "tab3", t0)
    await tap.drain()
    leases = [
        lease("s1", "alice", "tab1"),
        lease("s1", "alice", "tab2"),
        lease("s2", "bob", "tab3"),
    ]
    assert await store.release(leases, t0 + GRACE_MS, t0) == 2
    await store.sweep(t0 + GRACE_MS)
    events = await tap.drain()
    assert sorted((e.type, e.user, e.study, e.seq) for e in events) == [
        (USER_LEFT, "alice", "s1", 2),
        (USER_LEFT, "bob", "s2", 2),
    ]


async def test_release_of_a_never_held_session_does_nothing(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    assert await store.release([], t0 + GRACE_MS, t0) == 0
    assert await store.release([lease("s1", "ghost", "c1")], t0 + GRACE_MS, t0) == 0
    # A REST session is not held by anyone: a stray release must not give it a pending leave.
    await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    assert await store.release([lease("s1", "alice", "c1")], t0 + GRACE_MS, t0) == 0
    assert await pending_leaves(any_redis, keys, "s1") == {}
    await store.sweep(t0 + GRACE_MS)
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]
    assert await any_redis.exists(keys.study("s1").session("ghost")) == 0


async def test_rest_sessions_follow_the_normal_expiry(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    assert await smembers(any_redis, keys.node_leases("n1")) == set()
    assert await holders(any_redis, keys, "s1", "alice") == set()
    await store.sweep(t0 + EXPIRE_MS - 1)
    await store.sweep(t0 + EXPIRE_MS)
    events = await tap.drain()
    assert kinds(events) == [(USER_JOINED, "alice"), (USER_AWAY, "alice"), (USER_LEFT, "alice")]
    assert events[-1].ts == t0 + EXPIRE_MS


async def test_rest_heartbeat_of_a_held_session_keeps_it_held(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await hold(store, "alice", "s1", "c1", t0)
    await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 1_000)
    assert await holders(any_redis, keys, "s1", "alice") == {"c1"}
    await store.sweep(t0 + 1_000 + EXPIRE_MS)
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice"), (USER_AWAY, "alice")]
