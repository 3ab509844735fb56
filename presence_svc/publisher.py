"""Publishing a backend's own study events to the WebSocket clients of that study.

Any backend can do this with one `PUBLISH` (on Redis Cluster: `SPUBLISH`, see
docs/redis-protocol.md); this module is the Python shortcut, and picks the right one for the
client it is given. Every node with watchers of the study relays the event to them unchanged, as
`{"type": <event_type>, "data": <data>}`. Types under `presence.` belong to this service and
are refused.

    from redis import Redis
    from presence_svc.publisher import StudyEventPublisher

    StudyEventPublisher(Redis.from_url("redis://...")).publish(
        "study123", "study.chapter_renamed", {"chapter_id": "c1", "name": "Najdorf"}
    )
"""

from __future__ import annotations

import re
from typing import Any

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from presence_svc.codec import PRESENCE_PREFIX, encode_envelope
from presence_svc.models import ID_PATTERN
from presence_svc.redis.keys import Keys

_STUDY_ID = re.compile(ID_PATTERN)


def study_event(study_id: str, event_type: str, data: dict[str, Any]) -> bytes:
    """The envelope bytes for one event, after checking what nodes would refuse to relay."""
    if not _STUDY_ID.fullmatch(study_id):
        raise ValueError(f"study_id {study_id!r} does not match {ID_PATTERN}")
    if not event_type or event_type.startswith(PRESENCE_PREFIX):
        raise ValueError(f"event type must be non-empty and outside {PRESENCE_PREFIX!r}")
    if not isinstance(data, dict):
        raise TypeError("data must be a dict")
    return encode_envelope(event_type, data)


class StudyEventPublisher:
    """Publishes with a synchronous `redis.Redis` or `redis.cluster.RedisCluster` client."""

    def __init__(self, redis: Any, key_prefix: str = "presence") -> None:
        self._redis = redis
        self._keys = Keys(key_prefix)

    def publish(self, study_id: str, event_type: str, data: dict[str, Any]) -> int:
        """Publish one event; returns how many nodes (subscriptions) received it."""
        payload = study_event(study_id, event_type, data)
        channel = self._keys.channel(study_id)
        if isinstance(self._redis, RedisCluster):
            sharded: int = self._redis.spublish(channel, payload)
            return sharded
        receivers: int = self._redis.publish(channel, payload)
        return receivers


class AsyncStudyEventPublisher:
    """Publishes with a `redis.asyncio.Redis` or `redis.asyncio.cluster.RedisCluster` client."""

    def __init__(self, redis: Any, key_prefix: str = "presence") -> None:
        self._redis = redis
        self._keys = Keys(key_prefix)

    async def publish(self, study_id: str, event_type: str, data: dict[str, Any]) -> int:
        """Publish one event; returns how many nodes (subscriptions) received it."""
        payload = study_event(study_id, event_type, data)
        channel = self._keys.channel(study_id)
        if isinstance(self._redis, AsyncRedisCluster):
            sharded: int = await self._redis.spublish(channel, payload)
            return sharded
        receivers: int = await self._redis.publish(channel, payload)
        return receivers
