"""The keeper's periodic pass over its own lease set (anti-entropy)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

import presence_svc.redis.nodes as redis_nodes_module
from presence_svc.leases import AUDIT_EVERY, LeaseKeeper
from presence_svc.models import USER_JOINED, USER_LEFT, Lease
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.service import PresenceService
from tests.support.clock import FakeClock, ManualTimer
from tests.support.events import EventTap, kinds
from tests.support.leases import (
    GRACE_MS,
    KEEPER_TTL,
    TICK,
    TTL_MS,
    Node,
    hold,
    holders,
    late_hold,
    lease,
    live_nodes,
    pending_leaves,
    running,
    smembers,
)
from tests.support.store import NO_CURSOR
from tests.support.tasks import stop

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
