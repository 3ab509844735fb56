"""RedisStore.publish_signal on fakeredis, a real Redis and a Redis Cluster (`any_redis`): the
envelope on the study's channel as given (SPUBLISH on a cluster), nothing stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from presence_svc.codec import encode_signal
from presence_svc.redis.cluster import node_client
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.store import StoreUnavailable
from tests.support.processes import free_port
from tests.support.store import THRESHOLDS


@pytest.fixture
async def listener(any_redis: Any, keys: Keys) -> AsyncIterator[Any]:
    """A subscription to study s1's channel, confirmed (sharded on a cluster)."""
    channel = keys.channel("s1")
    plain: Any = None
    if isinstance(any_redis, RedisCluster):
        await any_redis.initialize()
        plain = node_client(any_redis.get_node_from_key(channel), reconnect=False)
        pubsub = plain.pubsub()
        await pubsub.ssubscribe(channel)
    else:
        pubsub = any_redis.pubsub()
        await pubsub.subscribe(channel)
    confirmation = await pubsub.get_message(timeout=5)
    assert confirmation is not None and confirmation["type"] in {"subscribe", "ssubscribe"}
    try:
        yield pubsub
    finally:
        await pubsub.aclose()
        if plain is not None:
            await plain.aclose()


async def test_a_signal_is_published_as_given_and_nothing_is_stored(
    store: RedisStore, listener: Any, any_redis: Any, keys: Keys
) -> None:
    payload = encode_signal("typing", "alice", {"chapter_id": "c1"}, 1_800_000_000_000, "conn")
    assert await store.publish_signal("s1", payload) == 1
    message = await listener.get_message(timeout=5)
    assert message is not None and message["data"] == payload
    assert message["channel"].decode() == keys.channel("s1")
    sk = keys.study("s1")
    assert await any_redis.exists(sk.index, sk.meta, sk.session("alice")) == 0
    assert store.events_published == 0  # not a presence event


async def test_a_signal_nobody_watches_reaches_nobody(store: RedisStore) -> None:
    assert await store.publish_signal("unwatched", encode_signal("typing", "alice", {})) == 0


async def test_an_unreachable_redis_is_store_unavailable() -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        store = RedisStore(client, Keys("p"), THRESHOLDS)
        with pytest.raises(StoreUnavailable):
            await store.publish_signal("s1", encode_signal("typing", "alice", {}))
        assert store.redis_errors == 1
    finally:
        await client.aclose()
