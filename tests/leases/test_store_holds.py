"""Holding a session over a WebSocket connection, and leaving (DELETE) while held: the store."""

from __future__ import annotations

from typing import Any

from presence_svc.models import (
    USER_ACTIVE,
    USER_AWAY,
    USER_IDLE,
    USER_JOINED,
    USER_LEFT,
    Status,
    SweepReport,
)
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
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
from tests.support.store import AWAY_MS, EXPIRE_MS, IDLE_MS, both, schedule_score

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
