"""The node's clients on Redis Sentinel: found through the sentinels, on the primary only, and
moved to the new one by a manual failover (SENTINEL FAILOVER) with the old primary still up.

One deployment for the module (a primary, a replica, three sentinels, with a password); the
failover test comes last and leaves the roles swapped.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from presence_svc.models import USER_JOINED, Status
from presence_svc.redis.client import RedisClients, connect
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.settings import Settings, load_settings
from presence_svc.store import StoreUnavailable
from tests.support.events import EventTap
from tests.support.processes import SentinelDeployment
from tests.support.store import NO_CURSOR, THRESHOLDS
from tests.support.waiting import eventually_async

PASSWORD = "sentinel-store-password"


@pytest.fixture(scope="module")
def deployment() -> Iterator[SentinelDeployment]:
    if shutil.which("redis-server") is None:
        pytest.skip("Sentinel tests need redis-server on PATH")
    started = SentinelDeployment(password=PASSWORD).start()
    try:
        yield started
    finally:
        started.stop()


def sentinel_settings(deployment: SentinelDeployment, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_sentinels": deployment.addresses,
        "redis_sentinel_master": deployment.master,
        "redis_url": f"redis://:{PASSWORD}@{deployment.master}/0",
        "jwt_secret": "x" * 32,
        "redis_call_timeout": 1,
    }
    return load_settings(**{**values, **overrides})


@pytest.fixture
async def clients(deployment: SentinelDeployment) -> AsyncIterator[RedisClients]:
    opened = await connect(sentinel_settings(deployment))
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
async def store(clients: RedisClients, key_prefix: str) -> AsyncIterator[RedisStore]:
    opened = RedisStore(clients.commands, Keys(key_prefix), THRESHOLDS, call_timeout=1)
    try:
        yield opened
    finally:
        await opened.close()


def primary_of(deployment: SentinelDeployment) -> int:
    current = deployment.current_primary()
    assert current is not None
    return current[1]


async def test_commands_and_events_go_through_the_primary_the_sentinels_name(
    deployment: SentinelDeployment, clients: RedisClients, store: RedisStore, key_prefix: str
) -> None:
    pool = clients.commands.connection_pool
    assert pool.master_address == ("127.0.0.1", primary_of(deployment))
    assert pool.max_connections == 50 and pool.timeout == 1  # bounded, blocking, as one Redis
    tap = EventTap(clients.commands, Keys(key_prefix))
    await tap.start()
    try:
        session = await store.heartbeat("alice", "s1", NO_CURSOR, 1_000)
        assert session.status is Status.ACTIVE
        assert [e.type for e in await tap.drain()] == [USER_JOINED]
    finally:
        await tap.close()
    assert [s.user_id for s in (await store.presence("s1")).sessions] == ["alice"]


async def test_a_demoted_primary_answers_unavailable_not_a_script_error(
    deployment: SentinelDeployment, key_prefix: str
) -> None:
    # What a node's connection to the old primary gets once it is a replica: READONLY, through
    # the batcher's raw replies (a heartbeat) and through redis-py's (a leave).
    replica = aioredis.Redis(host="127.0.0.1", port=deployment.replica.port, password=PASSWORD)
    store = RedisStore(replica, Keys(key_prefix), THRESHOLDS, call_timeout=1)
    try:
        with pytest.raises(StoreUnavailable, match=r"READONLY|read only"):
            await store.heartbeat("alice", "s1", NO_CURSOR, 1_000)
        with pytest.raises(StoreUnavailable):
            await store.leave("alice", "s1", 2_000)
        assert store.redis_errors == 2
    finally:
        await store.close()
        await replica.aclose()


async def test_a_manual_failover_moves_every_connection_to_the_new_primary(
    deployment: SentinelDeployment, clients: RedisClients, store: RedisStore
) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, 1_000)  # the batcher holds a connection
    old = primary_of(deployment)
    sentinel = aioredis.Redis(host="127.0.0.1", port=deployment.sentinels[0].port)
    try:
        command: Any = sentinel.execute_command
        assert await command("SENTINEL", "FAILOVER", deployment.master)
    finally:
        await sentinel.aclose()

    async def moved() -> bool:
        now = deployment.current_primary()
        return now is not None and now[1] != old

    await eventually_async(moved, within=20, what="the replica promoted")
    new = primary_of(deployment)

    pool = clients.commands.connection_pool

    async def served() -> bool:
        # The old primary may take writes until the sentinels demote it (they are lost then:
        # docs/topologies.md); what counts is a heartbeat after the watch moved the pool.
        if pool.master_address != ("127.0.0.1", new):
            return False
        try:
            await store.heartbeat("bob", "s1", NO_CURSOR, 2_000)
        except StoreUnavailable:
            return False  # until the batcher's connection has left the old primary
        return True

    waited = await eventually_async(served, within=10, what="a heartbeat on the new primary")
    assert waited < 5
    # The read goes to the new primary too, and finds what was written there.
    presence = await store.presence("s1")
    assert {"bob"} <= {s.user_id for s in presence.sessions}
    direct = deployment.replica if new == deployment.replica.port else deployment.primary
    assert direct.role() == "master"
