"""Nodes on the store: renew, reap, reacquire, drop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

import presence_svc.redis.nodes as redis_nodes_module
from presence_svc.models import USER_AWAY, USER_IDLE, USER_JOINED, USER_LEFT, Holder, Lease, Status
from presence_svc.redis.keys import Keys
from presence_svc.redis.nodes import REAP_RETRY_MS
from presence_svc.redis.store import RedisStore
from tests.support.events import EventTap, kinds
from tests.support.leases import (
    GRACE_MS,
    TTL_MS,
    dead_nodes,
    hold,
    holders,
    lease,
    live_nodes,
    pending_leaves,
    smembers,
    users_of,
)
from tests.support.store import EXPIRE_MS, THRESHOLDS, schedule_score

# --- nodes: renew, reap, reacquire, drop ------------------------------------------------------


async def test_renew_node_registers_then_renews(
    store: RedisStore, any_redis: Any, keys: Keys, t0: int
) -> None:
    assert (await store.renew_node("n1", t0)).alive is False  # unknown until now
    assert await live_nodes(any_redis, keys) == {"n1": t0}
    assert (await store.renew_node("n1", t0 + 1_000)).alive is True
    assert (await store.renew_node("n2", t0 + 1_500)).alive is False
    assert await live_nodes(any_redis, keys) == {"n1": t0 + 1_000, "n2": t0 + 1_500}
    assert await dead_nodes(any_redis, keys) == {}


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
