"""Shared fixtures: Redis (fake or real), unique key prefixes, clocks; the store tests' RedisStore.

The helpers themselves live in tests/support/ (app and TestClient, tokens, waiting, clocks,
recorders of events); FakeClock is still importable from here for the modules that do.

keys, store, tap and t0 serve test_redis_store.py and tests/leases/ alike (a module may define
its own fixture of the same name, as test_service.py does `store`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from tests.support import app as support_app
from tests.support.clock import FakeClock, ManualTimer
from tests.support.cluster import LocalCluster
from tests.support.events import ClusterEventTap, EventTap
from tests.support.processes import RedisServer
from tests.support.store import THRESHOLDS

HOW_TO_ENABLE = (
    "no real Redis: set PRESENCE_TEST_REDIS_URL, put redis-server on PATH, "
    "or make Docker available for testcontainers"
)


def _docker_redis() -> tuple[str, Any] | None:
    try:
        from testcontainers.redis import RedisContainer

        container = RedisContainer("redis:7-alpine").start()
    except Exception:
        return None
    host = container.get_container_host_ip()
    port = container.get_exposed_port(6379)
    return f"redis://{host}:{port}/0", container


@pytest.fixture(scope="session")
def real_redis_url() -> Iterator[str]:
    """URL of a real Redis 7 the tests may use (never flushed: tests use unique prefixes)."""
    configured = os.environ.get("PRESENCE_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    if shutil.which("redis-server"):
        server = RedisServer().start()
        try:
            yield server.url
        finally:
            server.stop()
        return
    docker = _docker_redis()
    if docker is None:
        pytest.skip(HOW_TO_ENABLE)
    url, container = docker
    try:
        yield url
    finally:
        container.stop()


@pytest.fixture
def key_prefix() -> str:
    return support_app.fresh_prefix()


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@pytest.fixture
def cleanup_real_redis(real_redis_url: str, key_prefix: str) -> Iterator[str]:
    """The real Redis URL; keys under this test's prefix are deleted afterwards."""
    yield real_redis_url
    _delete_prefix(real_redis_url, key_prefix)


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """Seed URL of a local 3-master Redis Cluster (redis-server binaries on free ports)."""
    configured = os.environ.get("PRESENCE_TEST_CLUSTER_URL")
    if configured:
        yield configured
        return
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("no Redis Cluster: put redis-server and redis-cli on PATH")
    cluster = LocalCluster().start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


async def _delete_prefix_cluster(client: RedisCluster, prefix: str) -> None:
    for node in client.get_primaries():
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", target_nodes=node)]
        for key in keys:
            await client.delete(key)


@contextlib.asynccontextmanager
async def open_redis(kind: str, request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Any]:
    """An asyncio client of kind fake (fakeredis with Lua), real (a server) or cluster."""
    client: Any
    if kind == "fake":
        client = support_app.fake_redis()
    elif kind == "real":
        url: str = request.getfixturevalue("cleanup_real_redis")
        client = aioredis.Redis.from_url(url)
    else:
        client = RedisCluster.from_url(request.getfixturevalue("cluster_url"))
    try:
        yield client
    finally:
        if kind == "cluster":
            await _delete_prefix_cluster(client, prefix)
        await client.aclose()


@pytest.fixture(params=["fake", "real", "cluster"])
async def any_redis(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Any]:
    """An asyncio Redis client: fakeredis (with Lua), a real server, or a Redis Cluster."""
    async with open_redis(request.param, request, key_prefix) as client:
        yield client


@pytest.fixture
async def fake_redis() -> AsyncIterator[Any]:
    client = support_app.fake_redis()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def timer() -> ManualTimer:
    """Monotonic time and a sleep that only the test moves (LeaseKeeper's clock)."""
    return ManualTimer()


# --- the store tests: a RedisStore under the test's prefix, and a tap on its channels ---------


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
async def store(any_redis: Any, keys: Keys) -> AsyncIterator[RedisStore]:
    opened = RedisStore(any_redis, keys, THRESHOLDS)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def tap(
    any_redis: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[EventTap | ClusterEventTap]:
    listener: EventTap | ClusterEventTap
    if isinstance(any_redis, RedisCluster):
        listener = ClusterEventTap(any_redis, keys, monkeypatch)
    else:
        listener = EventTap(any_redis, keys)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close()


@pytest.fixture
def t0(clock: FakeClock) -> int:
    return clock.ms
