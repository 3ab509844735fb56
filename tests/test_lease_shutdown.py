"""Releases the keeper's loop is retrying when the node shuts down: never lost from memory.

A tick that retries deferred releases takes them out of `_unreleased` while it waits on Redis.
Cut short there (the node's shutdown cancels the loop, or anything else goes wrong), it must
hand them back, and the app must end that loop before `LeaseKeeper.shutdown` looks for them:
otherwise their users leave only once a peer reaps the node (TTL + grace), not after the grace.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

from presence_svc.app import create_app
from presence_svc.leases import LeaseKeeper
from presence_svc.models import Lease
from presence_svc.node import Node
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.service import PresenceService
from presence_svc.store import StoreUnavailable
from tests.support.app import make_settings
from tests.support.clock import FakeClock, ManualTimer
from tests.support.store import NO_CURSOR, THRESHOLDS
from tests.support.tasks import stop

GRACE_S = 10.0
KEEPER_TTL = 3.0


class StalledRetry:
    """`PresenceService.release` that fails the socket's own release (so it is deferred to the
    keeper's next tick), holds the tick's retry until the test lets it go, and lets every
    later release through."""

    def __init__(self, release: Any) -> None:
        self._release = release
        self.calls = 0
        self.entered = asyncio.Event()  # the tick's retry is waiting on "Redis"
        self.fail = asyncio.Event()  # the retry is to raise now (not StoreUnavailable)

    async def __call__(self, leases: Sequence[Lease]) -> int:
        self.calls += 1
        if self.calls == 1:
            raise StoreUnavailable("Redis stalled")
        if self.calls == 2:
            self.entered.set()
            await self.fail.wait()
            raise RuntimeError("a bug in the retry")
        result: int = await self._release(leases)
        return result


async def released(client: Any, keys: Keys, node_id: str, study: str, user: str) -> None:
    """The lease was released and its node deregistered: the user leaves after the grace."""
    sk = keys.study(study)
    assert await client.smembers(keys.node_leases(node_id)) == set()
    assert await client.smembers(sk.conns(user)) == set()
    assert await client.zscore(sk.leaving, user) is not None
    assert await client.zscore(keys.live_nodes, node_id) is None


@dataclass
class Keeper:
    client: fakeredis.FakeAsyncRedis
    keys: Keys
    service: PresenceService
    keeper: LeaseKeeper
    timer: ManualTimer


@pytest.fixture
async def keeper(key_prefix: str, clock: FakeClock, timer: ManualTimer) -> AsyncIterator[Keeper]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    keys = Keys(key_prefix)
    service = PresenceService(
        RedisStore(client, keys, THRESHOLDS), clock, leave_grace=GRACE_S, lease_ttl=KEEPER_TTL
    )
    try:
        k = LeaseKeeper(service, KEEPER_TTL, monotonic=timer.monotonic, sleep=timer.sleep)
        yield Keeper(client, keys, service, k, timer)
    finally:
        await client.aclose()


@pytest.mark.parametrize("cut", ["cancelled", "raised"])
async def test_a_retry_cut_short_keeps_its_releases_for_shutdown(
    keeper: Keeper, cut: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = keeper.keeper
    await k.start()
    await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)
    stalled = StalledRetry(keeper.service.release)
    monkeypatch.setattr(keeper.service, "release", stalled)
    await k.release("ws1")  # deferred to the next tick
    run = asyncio.create_task(k.run())
    try:
        await keeper.timer.wait_asleep()
        ticking = asyncio.create_task(keeper.timer.advance(KEEPER_TTL / 3))
        await stalled.entered.wait()  # the tick holds the lease in its own list now
        if cut == "cancelled":
            await stop(run)
        else:
            stalled.fail.set()  # the loop logs it and goes back to sleep
        await ticking
        await k.shutdown()
    finally:
        await stop(run)
    await released(keeper.client, keeper.keys, k.node_id, "s1", "alice")


async def test_the_app_stops_the_keepers_loop_before_releasing_at_shutdown(
    cleanup_real_redis: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = aioredis.Redis.from_url(cleanup_real_redis)
    keys = Keys(key_prefix)
    try:
        # The shortest TTL settings allow: the keeper's loop ticks every 1/6 s.
        app = create_app(make_settings(key_prefix, lease_ttl=0.5), redis=client)
        async with app.router.lifespan_context(app):
            node: Node = app.state.node
            k = node.leases
            await k.heartbeat("ws1", "alice", "s1", NO_CURSOR)
            stalled = StalledRetry(node.service.release)
            monkeypatch.setattr(node.service, "release", stalled)
            await k.release("ws1")  # deferred to the next tick
            # The shutdown starts while the tick's retry waits on "Redis".
            await asyncio.wait_for(stalled.entered.wait(), 5)
        await released(client, keys, k.node_id, "s1", "alice")
    finally:
        await client.aclose()
