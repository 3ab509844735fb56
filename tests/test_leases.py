"""Presence bound to WebSocket connections: holds, releases, node liveness and reaping.

The store-level tests run on fakeredis and on a real Redis (`any_redis`) with explicit times and
check exactly which events were published (EventTap, from tests/support/events.py: it
pattern-subscribes to the test's prefix and reads up to a marker it publishes itself, so
"nothing was published" needs no timeout, and it asserts seq continuity on every channel).
The LeaseKeeper tests drive a real PresenceService over RedisStore on fakeredis, the keeper on a
ManualTimer: each `advance(TICK)` runs exactly one of its ticks, with no real time to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest

import presence_svc.redis.nodes as redis_nodes_module
from presence_svc.clock import NodeClock
from presence_svc.leases import AUDIT_EVERY, LeaseKeeper
from presence_svc.models import (
    CURSOR_MOVED,
    USER_ACTIVE,
    USER_AWAY,
    USER_IDLE,
    USER_JOINED,
    USER_LEFT,
    CursorUpdate,
    Holder,
    Lease,
    Session,
    Status,
    SweepReport,
    iso_from_ms,
)
from presence_svc.redis.keys import Keys
from presence_svc.redis.nodes import REAP_RETRY_MS
from presence_svc.redis.store import EMPTY_STUDY_TTL_MS, RedisStore
from presence_svc.service import PresenceService
from presence_svc.store import NodeRenewal, StoreUnavailable
from tests.support.clock import FakeClock, ManualTimer, MovableClock
from tests.support.events import EventTap, kinds
from tests.support.store import (
    AWAY_MS,
    EXPIRE_MS,
    IDLE_MS,
    NO_CURSOR,
    THRESHOLDS,
    both,
    schedule_score,
)
from tests.support.tasks import stop

GRACE_MS = 10_000
TTL_MS = 5_000


def lease(study: str, user: str, conn: str, node: str = "n1") -> Lease:
    return Lease(study, user, Holder(node, conn))


# --- fixtures and helpers ---------------------------------------------------------------------


async def hold(
    store: RedisStore,
    user: str,
    study: str,
    conn: str,
    now_ms: int,
    node: str = "n1",
    cursor: CursorUpdate = NO_CURSOR,
) -> Session:
    """A heartbeat over WebSocket `conn` of `node`."""
    return await store.heartbeat(user, study, cursor, now_ms, Holder(node, conn))


async def late_hold(
    store: RedisStore,
    client: Any,
    keys: Keys,
    user: str,
    study: str,
    conn: str,
    now_ms: int,
    node: str,
) -> None:
    """A heartbeat of closed socket `conn` that Redis applies after its release, once the
    scripts' record of that release is gone (past RELEASED_KEEP_MS, or RELEASED_MAX later
    releases): the ghost hold they cannot refuse, left for the keeper's pass."""
    await client.delete(keys.study(study).released(user))
    await hold(store, user, study, conn, now_ms, node=node)


async def smembers(client: Any, key: str) -> set[str]:
    return {m.decode() for m in await client.smembers(key)}


async def pending_leaves(client: Any, keys: Keys, study: str) -> dict[str, int]:
    rows = await client.zrange(keys.study(study).leaving, 0, -1, withscores=True)
    return {m.decode(): int(score) for m, score in rows}


async def holders(client: Any, keys: Keys, study: str, user: str) -> set[str]:
    return await smembers(client, keys.study(study).conns(user))


async def live_nodes(client: Any, keys: Keys) -> dict[str, int]:
    rows = await client.zrange(keys.live_nodes, 0, -1, withscores=True)
    return {m.decode(): int(score) for m, score in rows}


async def dead_nodes(client: Any, keys: Keys) -> dict[str, int]:
    rows = await client.zrange(keys.dead_nodes, 0, -1, withscores=True)
    return {m.decode(): int(score) for m, score in rows}


async def users_of(store: RedisStore, study: str) -> dict[str, Status]:
    view = await store.presence(study)
    return {s.user_id: s.status for s in view.sessions}


async def assert_gone(client: Any, keys: Keys, study: str, user: str) -> None:
    sk = keys.study(study)
    assert await client.exists(sk.session(user)) == 0
    assert await client.exists(sk.conns(user)) == 0
    assert await client.zscore(sk.index, user) is None
    assert await client.zscore(sk.leaving, user) is None


# --- holding a session ------------------------------------------------------------------------


async def test_heartbeat_with_holder_holds_the_session_and_lists_the_lease(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    session = await hold(store, "alice", "s1", "c1", t0, cursor=both("ch1", "m1"))
    assert session.status is Status.ACTIVE
    assert session.last_heartbeat_ms == session.joined_at_ms == t0
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]
    assert await holders(any_redis, keys, "s1", "alice") == {"c1"}
    assert await smembers(any_redis, keys.node_leases("n1")) == {"s1 alice c1"}
    assert await pending_leaves(any_redis, keys, "s1") == {}
    assert await schedule_score(any_redis, keys, "s1") == t0 + IDLE_MS

    # The same connection again changes nothing but the heartbeat time.
    await hold(store, "alice", "s1", "c1", t0 + 1_000, cursor=both("ch1", "m1"))
    assert await tap.drain() == []
    assert await holders(any_redis, keys, "s1", "alice") == {"c1"}
    assert await smembers(any_redis, keys.node_leases("n1")) == {"s1 alice c1"}


async def test_held_session_idles_and_goes_away_but_never_expires(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await hold(store, "alice", "s1", "c1", t0)
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]

    assert await store.sweep(t0 + IDLE_MS - 1) == SweepReport()
    assert (await store.sweep(t0 + IDLE_MS)).events == 1
    [idle] = await tap.drain()
    assert (idle.type, idle.status, idle.seq, idle.ts) == (USER_IDLE, "idle", 2, t0 + IDLE_MS)

    assert (await store.sweep(t0 + AWAY_MS)).events == 1
    [away] = await tap.drain()
    assert (away.type, away.status, away.seq) == (USER_AWAY, "away", 3)

    # Past the expiry: a held session stays (the sweep looks once, then forgets the study).
    report = await store.sweep(t0 + EXPIRE_MS)
    assert (report.studies, report.events) == (1, 0)
    for later in (t0 + EXPIRE_MS + 1, t0 + 2 * EXPIRE_MS, t0 + 100 * EXPIRE_MS):
        assert await store.sweep(later) == SweepReport()
    assert await tap.drain() == []
    assert await users_of(store, "s1") == {"alice": Status.AWAY}
    assert await holders(any_redis, keys, "s1", "alice") == {"c1"}

    # A heartbeat of the holder brings it back.
    await hold(store, "alice", "s1", "c1", t0 + 100 * EXPIRE_MS)
    [active] = await tap.drain()
    assert (active.type, active.status, active.seq) == (USER_ACTIVE, "active", 4)


async def test_held_and_away_study_leaves_the_schedule_until_a_release(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await hold(store, "alice", "s1", "c1", t0)
    for at in (t0 + IDLE_MS, t0 + AWAY_MS):
        await store.sweep(at)
    assert await schedule_score(any_redis, keys, "s1") == t0 + EXPIRE_MS
    await store.sweep(t0 + EXPIRE_MS)
    # Nothing can become due without a heartbeat or a release: no schedule entry, no cost.
    assert await schedule_score(any_redis, keys, "s1") is None
    assert await any_redis.hget(keys.study("s1").meta, "expire_wm") == str(t0).encode()
    assert await store.sweep(t0 + 50 * EXPIRE_MS) == SweepReport()
    assert kinds(await tap.drain()) == [
        (USER_JOINED, "alice"),
        (USER_IDLE, "alice"),
        (USER_AWAY, "alice"),
    ]

    released_at = t0 + 50 * EXPIRE_MS
    leave_at = released_at + GRACE_MS
    assert await store.release([lease("s1", "alice", "c1")], leave_at, released_at) == 1
    assert await schedule_score(any_redis, keys, "s1") == leave_at
    assert await store.sweep(leave_at - 1) == SweepReport()
    assert await tap.drain() == []
    assert await store.sweep(leave_at) == SweepReport(studies=1, events=1)
    [left] = await tap.drain()
    assert (left.type, left.status, left.seq, left.ts) == (USER_LEFT, "away", 4, leave_at)
    assert await schedule_score(any_redis, keys, "s1") is None


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


# --- leave (DELETE) ---------------------------------------------------------------------------


async def test_leave_while_held_ends_everything_and_a_later_release_is_a_no_op(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await hold(store, "alice", "s1", "c1", t0)
    await hold(store, "alice", "s1", "c2", t0)
    assert await store.leave("alice", "s1", t0 + 1_000) is True
    events = await tap.drain()
    assert [(e.type, e.seq, e.ts) for e in events] == [
        (USER_JOINED, 1, t0),
        (USER_LEFT, 2, t0 + 1_000),
    ]
    await assert_gone(any_redis, keys, "s1", "alice")

    assert await store.release([lease("s1", "alice", "c1")], t0 + 2_000, t0 + 1_500) == 0
    assert await store.release([lease("s1", "alice", "c2")], t0 + 2_000, t0 + 1_500) == 0
    assert await pending_leaves(any_redis, keys, "s1") == {}
    assert await smembers(any_redis, keys.node_leases("n1")) == set()
    for at in (t0 + 2_000, t0 + IDLE_MS, t0 + EXPIRE_MS):
        await store.sweep(at)
    assert await tap.drain() == []
    assert await store.leave("alice", "s1", t0 + 3_000) is False

    # Coming back is a new session.
    back = await hold(store, "alice", "s1", "c3", t0 + EXPIRE_MS)
    [joined] = await tap.drain()
    assert (joined.type, joined.seq, joined.data["session_id"]) == (USER_JOINED, 3, back.session_id)


async def test_leave_during_the_grace_removes_the_pending_leave(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await hold(store, "alice", "s1", "c1", t0)
    await store.release([lease("s1", "alice", "c1")], t0 + GRACE_MS, t0)
    assert await store.leave("alice", "s1", t0 + 1_000) is True
    await assert_gone(any_redis, keys, "s1", "alice")
    await store.sweep(t0 + GRACE_MS)
    events = await tap.drain()
    assert [(e.type, e.ts) for e in events] == [(USER_JOINED, t0), (USER_LEFT, t0 + 1_000)]


# --- nodes: renew, reap, reacquire, drop -------------------------------------------------------


async def test_renew_node_registers_then_renews(
    store: RedisStore, any_redis: Any, keys: Keys, t0: int
) -> None:
    assert (await store.renew_node("n1", t0)).alive is False  # unknown until now
    assert await live_nodes(any_redis, keys) == {"n1": t0}
    assert (await store.renew_node("n1", t0 + 1_000)).alive is True
    assert (await store.renew_node("n2", t0 + 1_500)).alive is False
    assert await live_nodes(any_redis, keys) == {"n1": t0 + 1_000, "n2": t0 + 1_500}
    assert await dead_nodes(any_redis, keys) == {}


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


async def test_a_reaper_never_claims_its_own_node(
    store: RedisStore, any_redis: Any, keys: Keys, t0: int
) -> None:
    # Its own entry can look stale (a renewal of its own still on its way): it is renewing,
    # so it is alive, whatever the entry says.
    await store.renew_node("n1", t0)
    await store.renew_node("n2", t0)
    await hold(store, "alice", "s1", "c1", t0, node="n1")
    await hold(store, "bob", "s1", "c2", t0, node="n2")
    assert await store.reap_dead_nodes("n1", TTL_MS, GRACE_MS, t0 + TTL_MS) == 1
    assert await live_nodes(any_redis, keys) == {"n1": t0}
    assert await holders(any_redis, keys, "s1", "alice") == {"c1"}
    assert set(await pending_leaves(any_redis, keys, "s1")) == {"bob"}
    # Nor a cleanup of its own node that someone else claimed long ago.
    await any_redis.zadd(keys.dead_nodes, {"n1": t0})
    retry = t0 + REAP_RETRY_MS
    assert await store.reap_dead_nodes("n1", TTL_MS, GRACE_MS, retry) == 0
    assert await dead_nodes(any_redis, keys) == {"n1": t0}


async def test_reap_releases_only_the_dead_nodes_leases(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.renew_node("n1", t0)
    await store.renew_node("n2", t0)
    await hold(store, "alice", "s1", "c1", t0, node="n1")
    await hold(store, "bob", "s2", "c2", t0, node="n1")
    await hold(store, "carol", "s1", "c3", t0, node="n2")
    # dave has a tab on each node: the live one keeps him.
    await hold(store, "dave", "s1", "c4", t0, node="n1")
    await hold(store, "dave", "s1", "c5", t0, node="n2")
    await tap.drain()

    last_seen = t0 + 1_000
    await store.renew_node("n1", last_seen)  # n1's last sign of life
    for at in range(t0, last_seen + TTL_MS, TTL_MS // 3):
        await store.renew_node("n2", at)
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, last_seen + TTL_MS - 1) == 0
    await store.renew_node("n2", last_seen + TTL_MS)

    reaped_at = last_seen + TTL_MS + 1_234
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, reaped_at) == 3
    assert await tap.drain() == []
    leave_at = reaped_at + GRACE_MS  # the whole grace, from the reap
    assert await pending_leaves(any_redis, keys, "s1") == {"alice": leave_at}
    assert await pending_leaves(any_redis, keys, "s2") == {"bob": leave_at}
    assert await holders(any_redis, keys, "s1", "dave") == {"c5"}
    assert await holders(any_redis, keys, "s1", "carol") == {"c3"}
    assert await live_nodes(any_redis, keys) == {"n2": last_seen + TTL_MS}
    assert await dead_nodes(any_redis, keys) == {}
    assert await any_redis.exists(keys.node_leases("n1")) == 0
    assert await smembers(any_redis, keys.node_leases("n2")) == {"s1 carol c3", "s1 dave c5"}
    assert await schedule_score(any_redis, keys, "s1") == leave_at
    assert await schedule_score(any_redis, keys, "s2") == leave_at
    # Each node is reaped once.
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, reaped_at) == 0

    await store.sweep(leave_at - 1)
    assert await tap.drain() == []
    await store.sweep(leave_at)
    events = await tap.drain()
    assert sorted((e.type, e.user, e.study, e.ts) for e in events) == [
        (USER_LEFT, "alice", "s1", leave_at),
        (USER_LEFT, "bob", "s2", leave_at),
    ]
    assert await users_of(store, "s1") == {"carol": Status.ACTIVE, "dave": Status.ACTIVE}


async def test_users_of_a_dead_node_who_reconnect_elsewhere_stay(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.renew_node("n1", t0)
    await hold(store, "alice", "s1", "c1", t0, node="n1")
    await hold(store, "bob", "s1", "c2", t0, node="n1")
    await tap.drain()
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, t0 + TTL_MS) == 2
    leave_at = t0 + TTL_MS + GRACE_MS
    # alice's client reconnects to n2 just before her leave; bob's never does.
    await hold(store, "alice", "s1", "c9", leave_at - 1, node="n2")
    assert await tap.drain() == []
    await store.sweep(leave_at)
    [left] = await tap.drain()
    assert (left.type, left.user, left.seq) == (USER_LEFT, "bob", 3)
    assert await users_of(store, "s1") == {"alice": Status.ACTIVE}
    assert await holders(any_redis, keys, "s1", "alice") == {"c9"}


async def test_a_late_reaper_still_gives_the_whole_grace(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.renew_node("n1", t0)
    await hold(store, "alice", "s1", "c1", t0, node="n1")
    await tap.drain()
    # Nobody reaped for a long time (all nodes paused with Redis, say): the users of the dead
    # node still get a grace to come back from the reap on, not a leave at once.
    reaped_at = t0 + TTL_MS + GRACE_MS + 20_000
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, reaped_at) == 1
    assert await pending_leaves(any_redis, keys, "s1") == {"alice": reaped_at + GRACE_MS}
    await store.sweep(reaped_at + GRACE_MS - 1)
    assert kinds(await tap.drain()) == [(USER_IDLE, "alice")]  # only idle: she is still there
    await store.sweep(reaped_at + GRACE_MS)
    assert kinds(await tap.drain()) == [(USER_LEFT, "alice")]


async def test_a_node_that_keeps_renewing_is_never_reaped(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.renew_node("n1", t0)
    await hold(store, "alice", "s1", "c1", t0, node="n1")
    step = TTL_MS // 3
    for now in range(t0 + step, t0 + 60 * TTL_MS, step):
        assert (await store.renew_node("n1", now)).alive is True
        assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, now) == 0
    assert await dead_nodes(any_redis, keys) == {}
    assert await smembers(any_redis, keys.node_leases("n1")) == {"s1 alice c1"}
    assert await holders(any_redis, keys, "s1", "alice") == {"c1"}
    assert await pending_leaves(any_redis, keys, "s1") == {}
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]


async def test_concurrent_reapers_release_each_lease_once(
    any_redis: Any, keys: Keys, tap: EventTap, t0: int
) -> None:
    reapers = [RedisStore(any_redis, keys, THRESHOLDS) for _ in range(4)]
    store = reapers[0]
    expected: set[tuple[str, str]] = set()
    for n in range(3):
        node = f"dead{n}"
        await store.renew_node(node, t0)
        for u in range(5):
            user, study = f"u{n}-{u}", f"s{u % 2}"
            await hold(store, user, study, f"c{n}-{u}", t0, node=node)
            expected.add((user, study))
    await store.renew_node("alive", t0 + TTL_MS)
    await hold(store, "keeper", "s0", "k1", t0, node="alive")
    await tap.drain()

    now = t0 + TTL_MS
    released = await asyncio.gather(
        *(r.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, now) for r in reapers)
    )
    assert sum(released) == 15
    assert await dead_nodes(any_redis, keys) == {}
    assert await live_nodes(any_redis, keys) == {"alive": t0 + TTL_MS}
    assert await tap.drain() == []

    leave_at = now + GRACE_MS
    reports = await asyncio.gather(*(r.sweep(leave_at) for r in reapers))
    assert sum(r.events for r in reports) == 15
    events = await tap.drain()
    assert all(e.type == USER_LEFT for e in events)
    assert sorted((e.user, e.study) for e in events) == sorted(expected)
    assert await users_of(store, "s0") == {"keeper": Status.ACTIVE}
    assert await users_of(store, "s1") == {}


async def test_an_unfinished_cleanup_is_taken_over_after_the_retry_time(
    any_redis: Any, keys: Keys, tap: EventTap, t0: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(any_redis, keys, THRESHOLDS)
    crashing = RedisStore(any_redis, keys, THRESHOLDS)
    await store.renew_node("n1", t0)
    for u in range(3):
        await hold(store, f"u{u}", "s1", f"c{u}", t0, node="n1")
    await tap.drain()

    # The first reaper claims n1, releases one batch of one lease, then dies.
    monkeypatch.setattr(redis_nodes_module, "REAP_BATCH", 1)
    calls = 0
    real_release = crashing.release

    async def release_then_die(leases: Sequence[Lease], leave_at_ms: int, now_ms: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("reaper died")
        return await real_release(leases, leave_at_ms, now_ms)

    monkeypatch.setattr(crashing, "release", release_then_die)
    claimed_at = t0 + TTL_MS
    with pytest.raises(RuntimeError, match="reaper died"):
        await crashing.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, claimed_at)
    assert await dead_nodes(any_redis, keys) == {"n1": claimed_at}
    assert await any_redis.scard(keys.node_leases("n1")) == 2
    first_leaves = await pending_leaves(any_redis, keys, "s1")
    assert list(first_leaves.values()) == [t0 + TTL_MS + GRACE_MS]
    monkeypatch.setattr(redis_nodes_module, "REAP_BATCH", 500)

    # Not stale yet: nobody else takes it.
    assert (
        await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, claimed_at + REAP_RETRY_MS - 1) == 0
    )
    assert await dead_nodes(any_redis, keys) == {"n1": claimed_at}
    retaken = claimed_at + REAP_RETRY_MS
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, retaken) == 2
    assert await dead_nodes(any_redis, keys) == {}
    assert await any_redis.exists(keys.node_leases("n1")) == 0
    leaves = await pending_leaves(any_redis, keys, "s1")
    assert len(leaves) == 3
    rest = {u: at for u, at in leaves.items() if u not in first_leaves}
    assert set(rest.values()) == {retaken + GRACE_MS}
    # Only the first batch's user was due earlier; everyone leaves once.
    await store.sweep(retaken + GRACE_MS)
    events = await tap.drain()
    assert sorted(kinds(events)) == [(USER_LEFT, "u0"), (USER_LEFT, "u1"), (USER_LEFT, "u2")]
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, retaken + 2 * REAP_RETRY_MS) == 0


async def test_a_node_declared_dead_by_mistake_reacquires_its_sessions(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.renew_node("n1", t0)
    await hold(store, "alice", "s1", "c1", t0, node="n1")
    await hold(store, "bob", "s1", "c2", t0, node="n1")
    await hold(store, "carol", "s1", "c3", t0, node="n1")
    await tap.drain()
    # n1 stalls; a peer reaps it.
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, t0 + TTL_MS + 1) == 3
    leave_at = t0 + TTL_MS + 1 + GRACE_MS
    # Meanwhile bob leaves for good (DELETE), and carol's leave is swept already.
    await store.leave("bob", "s1", t0 + TTL_MS + 2)
    assert kinds(await tap.drain()) == [(USER_LEFT, "bob")]

    # n1 wakes up: its renewal tells it what happened.
    assert (await store.renew_node("n1", t0 + TTL_MS + 3)).alive is False
    assert await live_nodes(any_redis, keys) == {"n1": t0 + TTL_MS + 3}
    # Under new connection ids, as LeaseKeeper holds again (the reaped ones would hold nothing).
    leases = [lease("s1", "alice", "c1b"), lease("s1", "bob", "c2b")]
    assert await store.reacquire(leases) == [True, False]
    assert await store.reacquire([]) == []
    assert await tap.drain() == []  # holding again is not a heartbeat
    assert await pending_leaves(any_redis, keys, "s1") == {"carol": leave_at}
    assert await holders(any_redis, keys, "s1", "alice") == {"c1b"}
    assert await any_redis.exists(keys.study("s1").session("bob")) == 0
    assert "s1 alice c1b" in await smembers(any_redis, keys.node_leases("n1"))
    assert (await store.renew_node("n1", t0 + TTL_MS + 4)).alive is True

    await store.sweep(leave_at)
    assert kinds(await tap.drain()) == [(USER_LEFT, "carol")]
    assert await store.reacquire([lease("s1", "carol", "c3b")]) == [False]
    assert await holders(any_redis, keys, "s1", "carol") == set()
    # alice is held again: she idles and goes away but stays.
    await store.sweep(t0 + 2 * EXPIRE_MS)
    assert kinds(await tap.drain()) == [(USER_AWAY, "alice")]
    assert await users_of(store, "s1") == {"alice": Status.AWAY}
    # If n1 really dies later, alice's lease is still listed, so she is released then.
    last_seen = t0 + 2 * EXPIRE_MS
    assert (await store.renew_node("n1", last_seen)).alive is True
    # reacquire listed every lease it was given, the ended ones too (releasing them is harmless)
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, last_seen + TTL_MS) == 3
    assert await pending_leaves(any_redis, keys, "s1") == {"alice": last_seen + TTL_MS + GRACE_MS}
    await store.sweep(last_seen + TTL_MS + GRACE_MS)
    assert kinds(await tap.drain()) == [(USER_LEFT, "alice")]


async def test_a_node_back_from_the_dead_holds_again_under_new_holders_mid_reap(
    any_redis: Any, keys: Keys, t0: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Re-holding under the old holder would race the reap (it removes what it released from
    # the old lease set afterwards); LeaseKeeper therefore comes back as a new node.
    node = RedisStore(any_redis, keys, THRESHOLDS)
    reaper = RedisStore(any_redis, keys, THRESHOLDS)
    await node.renew_node("n1", t0)
    await hold(node, "alice", "s1", "c1", t0)
    real_release = reaper.release
    fresh = Lease("s1", "alice", Holder("n2", "c2"))

    async def release_then_the_node_wakes_up(
        leases: Sequence[Lease], leave_at_ms: int, now_ms: int
    ) -> int:
        released = await real_release(leases, leave_at_ms, now_ms)
        assert (await node.renew_node("n1", now_ms)).alive is False
        await node.renew_node("n2", now_ms)
        assert await node.reacquire([fresh]) == [True]
        return released

    monkeypatch.setattr(reaper, "release", release_then_the_node_wakes_up)
    assert await reaper.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, t0 + TTL_MS) == 1
    assert await holders(any_redis, keys, "s1", "alice") == {"c2"}
    assert await smembers(any_redis, keys.node_leases("n2")) == {"s1 alice c2"}
    assert await smembers(any_redis, keys.node_leases("n1")) == set()
    assert await any_redis.zscore(keys.study("s1").leaving, "alice") is None


async def test_drop_node_forgets_the_node_and_its_lease_set(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.renew_node("n1", t0)
    await store.renew_node("n2", t0)
    await hold(store, "alice", "s1", "c1", t0, node="n1")
    await hold(store, "bob", "s1", "c2", t0, node="n2")
    await tap.drain()
    await store.release([lease("s1", "alice", "c1")], t0 + GRACE_MS, t0)
    await store.drop_node("n1")
    assert await live_nodes(any_redis, keys) == {"n2": t0}
    assert await any_redis.exists(keys.node_leases("n1")) == 0
    assert await smembers(any_redis, keys.node_leases("n2")) == {"s1 bob c2"}
    await store.drop_node("n1")  # idempotent
    # A dropped node is not reaped (nothing to release), n2 is.
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, t0 + TTL_MS) == 1
    await store.sweep(t0 + GRACE_MS)
    await store.sweep(t0 + TTL_MS + GRACE_MS)
    events = await tap.drain()
    assert [(e.type, e.user, e.ts) for e in events] == [
        (USER_LEFT, "alice", t0 + GRACE_MS),
        (USER_LEFT, "bob", t0 + TTL_MS + GRACE_MS),
    ]


# --- LeaseKeeper over a real PresenceService on fakeredis -------------------------------------

# The keeper's time (its renewal ticks) is a ManualTimer; the service's is FakeClock.
TICK = 1.0
KEEPER_TTL = 3 * TICK


@dataclass
class Node:
    server: Any
    client: Any
    keys: Keys
    store: RedisStore
    service: PresenceService
    keeper: LeaseKeeper
    clock: FakeClock
    timer: ManualTimer


@pytest.fixture
async def node(key_prefix: str, clock: FakeClock, timer: ManualTimer) -> AsyncIterator[Node]:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    keys = Keys(key_prefix)
    store = RedisStore(client, keys, THRESHOLDS)
    service = PresenceService(store, clock, leave_grace=GRACE_MS / 1000, lease_ttl=TTL_MS / 1000)
    try:
        keeper = LeaseKeeper(service, KEEPER_TTL, monotonic=timer.monotonic, sleep=timer.sleep)
        yield Node(server, client, keys, store, service, keeper, clock, timer)
    finally:
        server.connected = True
        await client.aclose()


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[asyncio.Task[None]]:
    """The keeper's loop, waiting for its first tick."""
    task = asyncio.create_task(node.keeper.run())
    try:
        await node.timer.wait_asleep()
        yield task
    finally:
        await stop(task)


async def test_keeper_heartbeat_release_and_shutdown(node: Node) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    tap = EventTap(redis, keys)
    await tap.start()
    try:
        await k.start()
        assert k.node_id in await live_nodes(redis, keys)
        t0 = node.clock.ms
        session = await k.heartbeat("ws1", "alice", "s1", both("ch1", "m1"))
        assert (session.user_id, session.chapter_id, session.move_path) == ("alice", "ch1", "m1")
        await k.heartbeat("ws2", "alice", "s1", NO_CURSOR)
        await k.heartbeat("ws3", "bob", "s2", NO_CURSOR)
        assert k.held == 3
        assert await holders(redis, keys, "s1", "alice") == {"ws1", "ws2"}
        assert await smembers(redis, keys.node_leases(k.node_id)) == {
            "s1 alice ws1",
            "s1 alice ws2",
            "s2 bob ws3",
        }
        assert kinds(await tap.drain()) == [(USER_JOINED, "alice"), (USER_JOINED, "bob")]

        node.clock.advance(1)
        await k.release("ws1")
        await k.release("ws1")  # twice: nothing more
        await k.release("never-seen")
        assert k.held == 2
        assert await holders(redis, keys, "s1", "alice") == {"ws2"}
        assert await pending_leaves(redis, keys, "s1") == {}

        node.clock.advance(1)
        await k.shutdown()
        assert k.held == 0
        leave_at = t0 + 2_000 + GRACE_MS
        assert await pending_leaves(redis, keys, "s1") == {"alice": leave_at}
        assert await pending_leaves(redis, keys, "s2") == {"bob": leave_at}
        assert k.node_id not in await live_nodes(redis, keys)
        assert await redis.exists(keys.node_leases(k.node_id)) == 0

        assert (await node.store.sweep(leave_at - 1)).events == 0
        assert (await node.store.sweep(leave_at)).events == 2
        assert sorted(kinds(await tap.drain())) == [(USER_LEFT, "alice"), (USER_LEFT, "bob")]
    finally:
        await tap.close()


async def test_store_unavailable_through_fakeredis_disconnect(node: Node) -> None:
    node.server.connected = False
    with pytest.raises(StoreUnavailable):
        await node.service.renew_node("x")
    with pytest.raises(StoreUnavailable):
        await node.service.release([lease("s1", "alice", "c1")])
    node.server.connected = True
    assert (await node.service.renew_node("x")).alive is False


async def test_keeper_retries_a_release_that_failed_while_redis_was_down(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    await k.start()
    await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)
    await k.heartbeat("ws2", "bob", "s1", NO_CURSOR)

    node.server.connected = False
    node.clock.advance(1)
    await k.release("ws1")  # must not raise
    assert k.held == 1
    async with running(node):
        with caplog.at_level(logging.WARNING, logger="presence_svc.leases"):
            await node.timer.advance(3 * TICK)  # three ticks fail while Redis is down
        failed = [r for r in caplog.records if "lease renewal failed" in r.getMessage()]
        assert len(failed) == 3
        node.clock.advance(2)
        retry_at = node.clock.ms
        node.server.connected = True
        await node.timer.advance(TICK)  # the next one retries the release
    assert await pending_leaves(redis, keys, "s1") == {"alice": retry_at + GRACE_MS}
    assert await holders(redis, keys, "s1", "alice") == set()
    assert await holders(redis, keys, "s1", "bob") == {"ws2"}
    assert await smembers(redis, keys.node_leases(k.node_id)) == {"s1 bob ws2"}

    # A deferred release still pending at shutdown is released there too.
    node.server.connected = False
    await k.release("ws2")
    node.server.connected = True
    await k.shutdown()
    assert set(await pending_leaves(redis, keys, "s1")) == {"alice", "bob"}
    assert await redis.exists(keys.node_leases(k.node_id)) == 0


class FailingReleases:
    """Stands in for the service's release: the next `failures` calls fail with `error`."""

    def __init__(self, service: PresenceService, error: BaseException, failures: int = 1) -> None:
        self._release = service.release
        self.error, self.failures = error, failures

    async def __call__(self, leases: Sequence[Lease]) -> int:
        if self.failures:
            self.failures -= 1
            raise self.error
        return await self._release(leases)


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("the Redis connection was lost before these replies"),
        TimeoutError(),
        RuntimeError("anything else"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_keeper_retries_a_release_that_failed_in_any_way(
    node: Node, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    await k.start()
    await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)
    monkeypatch.setattr(node.service, "release", FailingReleases(node.service, error))
    await k.release("ws1")  # must not raise, nor forget the lease
    assert await holders(redis, keys, "s1", "alice") == {"ws1"}
    async with running(node):
        await node.timer.advance(TICK)  # the next tick releases it
    assert await holders(redis, keys, "s1", "alice") == set()
    assert set(await pending_leaves(redis, keys, "s1")) == {"alice"}
    assert await smembers(redis, keys.node_leases(k.node_id)) == set()


async def test_keeper_keeps_a_release_cut_short_by_a_cancel(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    await k.start()
    await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)
    entered, never = asyncio.Event(), asyncio.Event()

    async def hangs(leases: Sequence[Lease]) -> int:
        entered.set()
        await never.wait()
        raise AssertionError("not reached")

    monkeypatch.setattr(node.service, "release", hangs)
    closing = asyncio.create_task(k.release("ws1"))
    await entered.wait()
    await stop(closing)  # the socket's task cancelled (the server shutting down)
    monkeypatch.undo()
    await k.shutdown()
    assert await holders(redis, keys, "s1", "alice") == set()
    assert set(await pending_leaves(redis, keys, "s1")) == {"alice"}


async def test_shutdown_releases_a_release_still_in_flight_before_dropping_the_node(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    await k.start()
    await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)
    entered, fail = asyncio.Event(), asyncio.Event()
    release = node.service.release

    async def stalls_then_fails(leases: Sequence[Lease]) -> int:
        if leases[0].holder.connection_id == "ws1" and not entered.is_set():
            entered.set()
            await fail.wait()
            raise StoreUnavailable("Redis stalled")
        return await release(leases)

    monkeypatch.setattr(node.service, "release", stalls_then_fails)
    closing = asyncio.create_task(k.release("ws1"))
    await entered.wait()
    await k.shutdown()  # meanwhile: the socket's release is still waiting for Redis
    fail.set()
    await closing
    assert await holders(redis, keys, "s1", "alice") == set()
    assert set(await pending_leaves(redis, keys, "s1")) == {"alice"}
    assert await redis.exists(keys.node_leases(k.node_id)) == 0


async def test_shutdown_that_cannot_release_leaves_the_leases_to_a_reaper(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    await k.start()
    await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)
    error = StoreUnavailable("Redis stalled")
    monkeypatch.setattr(node.service, "release", FailingReleases(node.service, error))
    with pytest.raises(StoreUnavailable):
        await k.shutdown()
    # Neither the lease set nor the liveness entry is gone: a peer reaps them after the TTL.
    assert await smembers(redis, keys.node_leases(k.node_id)) == {"s1 alice ws1"}
    last_seen = (await live_nodes(redis, keys))[k.node_id]
    assert await node.store.reap_dead_nodes("peer", TTL_MS, GRACE_MS, last_seen + TTL_MS) == 1
    assert set(await pending_leaves(redis, keys, "s1")) == {"alice"}


async def test_drop_node_keeps_a_node_whose_lease_set_is_not_empty(
    store: RedisStore, any_redis: Any, keys: Keys, t0: int
) -> None:
    # A lease whose release was lost must stay where a reaper finds it.
    await store.renew_node("n1", t0)
    await hold(store, "alice", "s1", "c1", t0, node="n1")
    await store.drop_node("n1")
    assert await smembers(any_redis, keys.node_leases("n1")) == {"s1 alice c1"}
    assert set(await live_nodes(any_redis, keys)) == {"n1"}
    assert await store.reap_dead_nodes("reaper", TTL_MS, GRACE_MS, t0 + TTL_MS) == 1
    assert set(await pending_leaves(any_redis, keys, "s1")) == {"alice"}


async def redis_now_ms(node: Node) -> int:
    """Redis's time now (the clock renewals and reaps run on), in ms."""
    seconds, micros = await node.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_keeper_declared_dead_reacquires_its_sessions(node: Node) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    tap = EventTap(redis, keys)
    await tap.start()
    try:
        await k.start()
        await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)
        assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]
        # The keeper is paused (not running) past its TTL on Redis's clock; a peer declares it
        # dead.
        renewed_at = (await live_nodes(redis, keys))[k.node_id]
        reap_at = renewed_at + TTL_MS + 500
        assert await node.store.reap_dead_nodes("peer", TTL_MS, GRACE_MS, reap_at) == 1
        assert set(await pending_leaves(redis, keys, "s1")) == {"alice"}
        leave_at = (await pending_leaves(redis, keys, "s1"))["alice"]

        old_node = k.node_id
        async with running(node):
            await node.timer.advance(TICK)  # its first renewal learns that it was declared dead
        # Under a new node id and a fresh holder id, out of reach of the running reap.
        [holder] = await holders(redis, keys, "s1", "alice")
        assert holder != "ws1"
        assert k.node_id != old_node
        assert await pending_leaves(redis, keys, "s1") == {}
        assert k.node_id in await live_nodes(redis, keys)
        assert (await node.store.renew_node(k.node_id, node.clock.ms)).alive is True
        await node.store.sweep(leave_at)
        await node.store.sweep(node.clock.ms + EXPIRE_MS)
        assert kinds(await tap.drain()) == [(USER_AWAY, "alice")]
    finally:
        await tap.close()


async def test_keeper_reaps_dead_peers(node: Node) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    await k.start()
    # The peer's last renewal is a TTL old on Redis's clock, which reaps go by.
    await node.store.renew_node("peer", await redis_now_ms(node) - TTL_MS)
    await hold(node.store, "alice", "s1", "c1", node.clock.ms, node="peer")
    async with running(node):
        # The peer looks dead at once, but the keeper reaps only after a whole TTL of its own
        # unbroken renewals (after an outage, live peers need that long to show up again).
        await node.timer.advance(KEEPER_TTL - TICK)
        assert k.released_dead == 0
        assert set(await live_nodes(redis, keys)) == {k.node_id, "peer"}
        await node.timer.advance(TICK)
        assert k.released_dead == 1
        reaped_by = await redis_now_ms(node)
    renewed_at = (await live_nodes(redis, keys))[k.node_id]  # the same tick, just before
    assert set(await live_nodes(redis, keys)) == {k.node_id}
    # The whole grace from the reap, on Redis's clock.
    [(user, leave_at)] = (await pending_leaves(redis, keys, "s1")).items()
    assert user == "alice"
    assert renewed_at + GRACE_MS <= leave_at <= reaped_by + GRACE_MS


async def test_a_renewal_that_waited_a_ttl_restarts_the_wait_before_reaping(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a Redis freeze, the renewal sent before it comes back after it: the keeper must
    # not take that for a run of unbroken renewals and reap peers whose own renewals are still
    # queued behind it (found: every node reaped every other, itself included).
    k = node.keeper
    await k.start()
    await node.store.renew_node("peer", await redis_now_ms(node) - TTL_MS)
    await hold(node.store, "alice", "s1", "c1", node.clock.ms, node="peer")
    real_renew = node.service.renew_node
    calls = 0

    async def third_renewal_waits(node_id: str) -> NodeRenewal:
        nonlocal calls
        calls += 1
        if calls == 3:
            await node.timer.sleep(KEEPER_TTL + TICK)  # Redis is stopped meanwhile
        return await real_renew(node_id)

    monkeypatch.setattr(node.service, "renew_node", third_renewal_waits)
    async with running(node):
        await node.timer.advance(3 * TICK)  # two ticks; the third is waiting for Redis
        assert (calls, k.released_dead) == (3, 0)
        await node.timer.advance(KEEPER_TTL + TICK)  # the third renewal comes back
        assert k.released_dead == 0, "reaped right after the freeze"
        await node.timer.advance(KEEPER_TTL - TICK)
        assert k.released_dead == 0
        await node.timer.advance(TICK)  # a whole TTL of unbroken renewals since the freeze
        assert k.released_dead == 1


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


# --- the keeper's pass over its lease set (anti-entropy) --------------------------------------


async def test_leases_of_lists_each_lease_of_the_node_once_over_many_pages(
    store: RedisStore,
    any_redis: Any,
    keys: Keys,
    t0: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert await store.leases_of("n1") == []
    # More members than a small set's compact encoding keeps, so real Redis pages them too.
    monkeypatch.setattr(redis_nodes_module, "LEASE_PAGE", 25)
    await hold(store, "alice", "s1", "c1", t0)
    await hold(store, "bob", "s2", "c2", t0, node="n2")
    members = [f"s{n % 3} u{n} c{n}" for n in range(3, 303)]
    await any_redis.sadd(keys.node_leases("n1"), *members, "a-malformed-member")
    with caplog.at_level(logging.ERROR, logger="presence_svc.redis.calls"):
        listed = await store.leases_of("n1")
    assert len(listed) == len(set(listed)) == 301
    assert set(listed) == {lease("s1", "alice", "c1")} | {
        lease(f"s{n % 3}", f"u{n}", f"c{n}") for n in range(3, 303)
    }
    assert any("malformed" in r.getMessage() for r in caplog.records)
    assert await store.leases_of("n2") == [lease("s2", "bob", "c2", node="n2")]

    await store.release([lease("s1", "alice", "c1")], t0 + GRACE_MS, t0)
    assert lease("s1", "alice", "c1") not in await store.leases_of("n1")


def audited_keeper(service: PresenceService, timer: ManualTimer, every: int) -> LeaseKeeper:
    """A keeper on the test's timer whose pass runs every `every` renewals."""
    return LeaseKeeper(
        service, KEEPER_TTL, monotonic=timer.monotonic, sleep=timer.sleep, audit_every=every
    )


async def test_a_pass_releases_a_lease_no_open_socket_holds_with_the_grace(
    store: RedisStore,
    tap: EventTap,
    any_redis: Any,
    keys: Keys,
    clock: FakeClock,
    timer: ManualTimer,
) -> None:
    service = PresenceService(store, clock, leave_grace=GRACE_MS / 1000, lease_ttl=TTL_MS / 1000)
    k = audited_keeper(service, timer, every=3)
    await k.start()
    await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)
    await k.heartbeat("ws2", "bob", "s1", NO_CURSOR)
    await k.release("ws2")
    # ws2's heartbeat that Redis applied after ws2's release (it was left on a connection the
    # batcher dropped during a stall): the node's very commands, holding bob for a gone socket.
    await late_hold(store, any_redis, keys, "bob", "s1", "ws2", clock.ms, k.node_id)
    assert await holders(any_redis, keys, "s1", "bob") == {"ws2"}
    assert await pending_leaves(any_redis, keys, "s1") == {}
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice"), (USER_JOINED, "bob")]

    task = asyncio.create_task(k.run())
    try:
        await timer.wait_asleep()
        await timer.advance(2 * TICK)  # two renewals: no pass yet
        assert await holders(any_redis, keys, "s1", "bob") == {"ws2"}
        assert k.released_stale == 0
        clock.advance(1)
        released_at = clock.ms
        await timer.advance(TICK)  # the third renewal's pass
    finally:
        await stop(task)
    assert k.released_stale == 1
    assert await holders(any_redis, keys, "s1", "bob") == set()
    assert await holders(any_redis, keys, "s1", "alice") == {"ws1"}
    assert await smembers(any_redis, keys.node_leases(k.node_id)) == {"s1 alice ws1"}
    leave_at = released_at + GRACE_MS
    assert await pending_leaves(any_redis, keys, "s1") == {"bob": leave_at}
    assert (await store.sweep(leave_at - 1)).events == 0  # ws2's own release made it due
    assert (await store.sweep(leave_at)).events == 1
    assert kinds(await tap.drain()) == [(USER_LEFT, "bob")]
    await k.shutdown()


async def test_a_pass_keeps_held_just_sent_and_releasing_leases(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = node.keeper = audited_keeper(node.service, node.timer, every=1)
    keys, redis = node.keys, node.client
    await k.start()
    await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)  # held
    await k.heartbeat("ws3", "bob", "s1", NO_CURSOR)  # its release will be on its way
    await k.heartbeat("ws4", "dave", "s1", NO_CURSOR)  # closed; its late heartbeat replayed
    await k.release("ws4")
    await late_hold(node.store, redis, keys, "dave", "s1", "ws4", node.clock.ms, k.node_id)
    # carol's first heartbeat, not sent yet: listed already, as its SADD comes first.
    first = k.heartbeat("ws2", "carol", "s1", NO_CURSOR)
    await redis.sadd(keys.node_leases(k.node_id), "s1 carol ws2")

    released: list[list[str]] = []
    entered, go_on = asyncio.Event(), asyncio.Event()
    release = node.service.release

    async def recorded(leases: Sequence[Lease]) -> int:
        released.append(sorted(lease.holder.connection_id for lease in leases))
        if leases[0].holder.connection_id == "ws3":
            entered.set()
            await go_on.wait()
        return await release(leases)

    monkeypatch.setattr(node.service, "release", recorded)
    closing = asyncio.create_task(k.release("ws3"))
    await entered.wait()
    async with running(node):
        await node.timer.advance(TICK)  # a pass while ws3's release waits for Redis
        assert released == [["ws3"], ["ws4"]]
        assert await holders(redis, keys, "s1", "bob") == {"ws3"}
        go_on.set()
        await closing
        await first
        await node.timer.advance(TICK)  # and the next pass finds nothing to release
    assert released == [["ws3"], ["ws4"]]
    assert k.released_stale == 1
    assert await smembers(redis, keys.node_leases(k.node_id)) == {"s1 alice ws1", "s1 carol ws2"}
    assert await holders(redis, keys, "s1", "carol") == {"ws2"}
    assert set(await pending_leaves(redis, keys, "s1")) == {"bob", "dave"}


async def test_a_pass_runs_every_few_renewals_and_at_the_renewal_after_a_failure(
    node: Node,
) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    await k.start()

    async def lost_socket(conn: str, user: str) -> None:
        await k.heartbeat(conn, user, "s1", NO_CURSOR)
        await k.release(conn)
        await late_hold(node.store, redis, keys, user, "s1", conn, node.clock.ms, k.node_id)

    await lost_socket("ws1", "alice")
    async with running(node):
        await node.timer.advance((AUDIT_EVERY - 1) * TICK)
        assert await holders(redis, keys, "s1", "alice") == {"ws1"}
        await node.timer.advance(TICK)
        assert await holders(redis, keys, "s1", "alice") == set()
        assert k.released_stale == 1

        # A renewal that failed (calls may have been left on a dropped connection): the pass
        # comes at the next renewal that gets through, not AUDIT_EVERY renewals later.
        await lost_socket("ws2", "bob")
        node.server.connected = False
        await node.timer.advance(TICK)
        node.server.connected = True
        await node.timer.advance(TICK)
        assert await holders(redis, keys, "s1", "bob") == set()
        assert k.released_stale == 2
    assert set(await pending_leaves(redis, keys, "s1")) == {"alice", "bob"}


async def test_a_pass_after_coming_back_keeps_the_re_held_sessions(node: Node) -> None:
    # Re-held under fresh holder ids: the pass must go by the holders the keeper now has, not by
    # the sockets' own connection ids.
    k = node.keeper = audited_keeper(node.service, node.timer, every=1)
    keys, redis = node.keys, node.client
    await k.start()
    await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)
    renewed_at = (await live_nodes(redis, keys))[k.node_id]
    assert await node.store.reap_dead_nodes("peer", TTL_MS, GRACE_MS, renewed_at + TTL_MS) == 1
    async with running(node):
        await node.timer.advance(TICK)  # comes back, then the pass over the new lease set
        await node.timer.advance(TICK)
    [holder] = await holders(redis, keys, "s1", "alice")
    assert holder != "ws1"
    assert await smembers(redis, keys.node_leases(k.node_id)) == {f"s1 alice {holder}"}
    assert await pending_leaves(redis, keys, "s1") == {}
    assert k.released_stale == 0
