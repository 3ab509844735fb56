"""The LeaseKeeper's releases: failures, retries, cancels and shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from presence_svc.models import Lease
from presence_svc.service import PresenceService
from presence_svc.store import StoreUnavailable
from tests.support.leases import (
    GRACE_MS,
    TICK,
    TTL_MS,
    Node,
    holders,
    lease,
    live_nodes,
    pending_leaves,
    running,
    smembers,
)
from tests.support.store import NO_CURSOR
from tests.support.tasks import stop

# --- the keeper's releases and retries --------------------------------------------------------


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
