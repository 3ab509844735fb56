"""The LeaseKeeper over a real PresenceService on fakeredis: its renewals and reaps."""

from __future__ import annotations

import pytest

from presence_svc.models import USER_AWAY, USER_JOINED, USER_LEFT
from presence_svc.store import NodeRenewal
from tests.support.events import EventTap, kinds
from tests.support.leases import (
    GRACE_MS,
    KEEPER_TTL,
    TICK,
    TTL_MS,
    Node,
    hold,
    holders,
    live_nodes,
    pending_leaves,
    redis_now_ms,
    running,
    smembers,
)
from tests.support.store import EXPIRE_MS, NO_CURSOR, both

# --- the keeper's renewals and reaps ----------------------------------------------------------


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
