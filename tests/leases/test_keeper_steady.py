"""What a node knows of its sockets' holds (issue 14): when a socket's heartbeat may be steady.

A socket's heartbeats through web/ws_heartbeats.Heartbeats and the LeaseKeeper, over a real
PresenceService and RedisStore on fakeredis: the first is full, the next ones steady (one
script), and every way that knowledge can go stale sends a full one again: a failed store
call, being declared dead, the lease-set pass missing the lease, the socket's release.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from presence_svc.leases import LeaseKeeper
from presence_svc.metrics import Metrics
from presence_svc.models import USER_JOINED, USER_LEFT, CursorUpdate
from presence_svc.web.ws_heartbeats import Heartbeats
from tests.support.events import EventTap, kinds
from tests.support.leases import (
    GRACE_MS,
    TICK,
    TTL_MS,
    Node,
    holders,
    live_nodes,
    pending_leaves,
    running,
    smembers,
)
from tests.support.store import EXPIRE_MS, NO_CURSOR

FULL = ["SADD", "EVALSHA", "EVALSHA"]
STEADY = ["EVALSHA"]


class Socket:
    """One socket's heartbeats, as ws.py drives them, and the store operations they send."""

    def __init__(self, node: Node, connection_id: str = "ws1", user: str = "alice") -> None:
        self.errors: list[str] = []
        self.operations: list[list[str]] = []
        owner: Any = type("NodeParts", (), {"leases": node.keeper, "metrics": Metrics()})()
        self.beats = Heartbeats(owner, self, connection_id, user, "s1")  # type: ignore[arg-type]
        batch: Any = node.store._batch
        if not hasattr(batch, "recorded_by"):
            run = batch.run

            def recording(commands: list[tuple[Any, ...]], *args: Any) -> Any:
                for socket in batch.recorded_by:
                    socket.operations.append([str(c[0]) for c in commands])
                return run(commands, *args)

            batch.run = recording
            batch.recorded_by = []
        batch.recorded_by.append(self)

    def deliver(self, event: Any) -> None:
        self.errors.append(json.loads(event.text)["data"]["code"])

    async def beat(self, cursor: CursorUpdate = NO_CURSOR) -> list[list[str]]:
        """One heartbeat, awaited to its answer; the operations sent meanwhile."""
        self.operations = []
        assert self.beats.start(cursor) is None
        idle = self.beats.idle()
        if idle is not None:
            await asyncio.wait_for(idle, 5)
        return self.operations


async def test_the_first_heartbeat_is_full_and_the_next_ones_steady(node: Node) -> None:
    k = node.keeper
    await k.start()
    socket = Socket(node)
    assert not k.steady("ws1")
    assert await socket.beat() == [FULL]
    assert k.steady("ws1")
    assert await socket.beat() == [STEADY]
    assert await socket.beat(CursorUpdate(move_path="main.3", sets_move_path=True)) == [STEADY]
    assert socket.errors == []
    assert await holders(node.client, node.keys, "s1", "alice") == {"ws1"}
    assert await smembers(node.client, node.keys.node_leases(k.node_id)) == {"s1 alice ws1"}
    # Closed: forgotten with its lease.
    await k.release("ws1")
    assert not k.steady("ws1")


async def test_heartbeats_in_flight_before_the_first_answer_are_all_full(node: Node) -> None:
    await node.keeper.start()
    socket = Socket(node)
    for _ in range(3):
        assert socket.beats.start(NO_CURSOR) is None
    idle = socket.beats.idle()
    assert idle is not None
    await asyncio.wait_for(idle, 5)
    assert socket.operations == [FULL, FULL, FULL]
    assert await socket.beat() == [STEADY]


async def test_a_failed_heartbeat_makes_every_sockets_next_one_full(node: Node) -> None:
    k = node.keeper
    await k.start()
    alice, bob = Socket(node), Socket(node, "ws2", "bob")
    await alice.beat()
    await bob.beat()
    assert k.steady("ws1") and k.steady("ws2")
    node.server.connected = False
    await alice.beat()
    assert alice.errors == ["unavailable"]
    node.server.connected = True
    # Bob's heartbeat did not fail, but what the outage lost may be his too.
    assert not k.steady("ws2")
    assert await bob.beat() == [FULL]
    assert await alice.beat() == [FULL]
    assert await alice.beat() == [STEADY]


async def test_a_full_heartbeat_sent_before_a_failure_does_not_confirm_after_it(
    node: Node,
) -> None:
    k = node.keeper
    await k.start()
    socket = Socket(node)
    assert socket.beats.start(NO_CURSOR) is None  # full, sent in generation g
    k.heartbeat_failed()  # another socket's call failed meanwhile: generation g + 1
    idle = socket.beats.idle()
    assert idle is not None
    await asyncio.wait_for(idle, 5)
    assert not k.steady("ws1")
    assert await socket.beat() == [FULL]
    assert k.steady("ws1")


async def test_a_socket_of_a_node_declared_dead_holds_again_then_goes_steady(
    node: Node,
) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    tap = EventTap(redis, keys)
    await tap.start()
    try:
        await k.start()
        socket = Socket(node)
        await socket.beat()
        await socket.beat()
        # Paused past its TTL; a peer reaps it. Its socket heartbeats on before it knows:
        # steady, refused (the holder was released), sent whole, holding nothing.
        renewed_at = (await live_nodes(redis, keys))[k.node_id]
        assert await node.store.reap_dead_nodes("peer", TTL_MS, GRACE_MS, renewed_at + TTL_MS) == 1
        leave_at = (await pending_leaves(redis, keys, "s1"))["alice"]
        assert await socket.beat() == [STEADY, FULL]
        assert await holders(redis, keys, "s1", "alice") == set()
        assert await pending_leaves(redis, keys, "s1") == {"alice": leave_at}

        async with running(node):
            await node.timer.advance(TICK)  # learns it was declared dead: holds again
        [holder] = await holders(redis, keys, "s1", "alice")
        assert not k.steady("ws1")
        assert await socket.beat() == [FULL]
        assert await socket.beat() == [STEADY]
        assert await holders(redis, keys, "s1", "alice") == {holder}
        assert f"s1 alice {holder}" in await smembers(redis, keys.node_leases(k.node_id))
        await node.store.sweep(leave_at)
        await node.store.sweep(node.clock.ms + EXPIRE_MS)
        assert USER_LEFT not in [t for t, _ in kinds(await tap.drain())]
    finally:
        await tap.close()


async def test_the_lease_set_pass_sends_a_full_heartbeat_for_a_lease_it_misses(
    node: Node,
) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    await k.start()
    alice, bob = Socket(node), Socket(node, "ws2", "bob")
    await alice.beat()
    await bob.beat()
    # A failover lost alice's listing: a reaper would not find her lease were the node to die.
    await redis.srem(keys.node_leases(k.node_id), "s1 alice ws1")
    await k._audit()
    assert not k.steady("ws1") and k.steady("ws2")
    assert await alice.beat() == [FULL]
    assert await smembers(redis, keys.node_leases(k.node_id)) == {"s1 alice ws1", "s1 bob ws2"}
    assert await bob.beat() == [STEADY]


async def test_a_session_that_ended_under_an_open_socket_is_joined_again_and_held(
    node: Node,
) -> None:
    k, keys, redis = node.keeper, node.keys, node.client
    tap = EventTap(redis, keys)
    await tap.start()
    try:
        await k.start()
        socket = Socket(node)
        await socket.beat()
        assert await node.service.leave("alice", "s1")  # a DELETE over REST
        assert k.steady("ws1")  # the node cannot know: the store finds out
        assert await socket.beat() == [STEADY, FULL]
        assert await holders(redis, keys, "s1", "alice") == {"ws1"}
        assert await socket.beat() == [STEADY]
        assert kinds(await tap.drain()) == [
            (USER_JOINED, "alice"),
            (USER_LEFT, "alice"),
            (USER_JOINED, "alice"),
        ]
    finally:
        await tap.close()


def test_a_keeper_starts_knowing_nothing(node: Node) -> None:
    k: LeaseKeeper = node.keeper
    assert k.generation == 0 and not k.steady("ws1")
    k.confirm("ws1", 0)  # not a socket that heartbeated: nothing to confirm
    assert not k.steady("ws1")
