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

`publish_signal` sends a signal (`signal.<name>`, say a bot's `typing`) as a node would for a
socket of that user, checked as a node checks a socket's: the name's grammar, the data's size.
"""

from __future__ import annotations

import re
from typing import Any

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from presence_svc.codec import PRESENCE_PREFIX, encode_envelope, encode_signal, json_text
from presence_svc.models import ID_PATTERN, SignalMessage
from presence_svc.redis.keys import Keys
from presence_svc.signals import data_size

_STUDY_ID = re.compile(ID_PATTERN)
# PRESENCE_SIGNAL_MAX_BYTES's default: what nodes accept from a socket unless configured.
SIGNAL_MAX_BYTES = 1024


def study_event(study_id: str, event_type: str, data: dict[str, Any]) -> bytes:
    """The envelope bytes for one event, after checking what nodes would refuse to relay."""
    if not _STUDY_ID.fullmatch(study_id):
        raise ValueError(f"study_id {study_id!r} does not match {ID_PATTERN}")
    if not event_type or event_type.startswith(PRESENCE_PREFIX):
        raise ValueError(f"event type must be non-empty and outside {PRESENCE_PREFIX!r}")
    if not isinstance(data, dict):
        raise TypeError("data must be a dict")
    return encode_envelope(event_type, data)


def study_signal(
    study_id: str,
    name: str,
    user_id: str,
    data: dict[str, Any],
    max_bytes: int = SIGNAL_MAX_BYTES,
) -> bytes:
    """The envelope bytes of a signal from `user_id`, checked as a node checks a socket's.

    ValueError (pydantic's ValidationError is one) for a bad id or name, data over `max_bytes`
    as compact JSON, or values a socket could not send (NaN, integers beyond 64 bits);
    TypeError for data that is not a dict or not JSON at all.
    """
    if not _STUDY_ID.fullmatch(study_id):
        raise ValueError(f"study_id {study_id!r} does not match {ID_PATTERN}")
    if not _STUDY_ID.fullmatch(user_id):
        raise ValueError(f"user_id {user_id!r} does not match {ID_PATTERN}")
    if not isinstance(data, dict):
        raise TypeError("data must be a dict")
    size = data_size(data)
    if size > max_bytes:
        raise ValueError(f"signal data is {size} bytes as compact JSON, over {max_bytes}")
    # Validated as the JSON a socket would send, so the data is what a node would relay (a
    # non-string key deep inside, which msgpack would keep and nodes refuse, becomes a string).
    sent = json_text({"type": "signal", "name": name, "data": data})
    message = SignalMessage.model_validate_json(sent)
    return encode_signal(message.name, user_id, message.data)


class StudyEventPublisher:
    """Publishes with a synchronous `redis.Redis` or `redis.cluster.RedisCluster` client."""

    def __init__(
        self, redis: Any, key_prefix: str = "presence", signal_max_bytes: int = SIGNAL_MAX_BYTES
    ) -> None:
        self._redis = redis
        self._keys = Keys(key_prefix)
        self._signal_max_bytes = signal_max_bytes  # the nodes' PRESENCE_SIGNAL_MAX_BYTES

    def publish(self, study_id: str, event_type: str, data: dict[str, Any]) -> int:
        """Publish one event; returns how many nodes (subscriptions) received it."""
        payload = study_event(study_id, event_type, data)
        channel = self._keys.channel(study_id)
        if isinstance(self._redis, RedisCluster):
            sharded: int = self._redis.spublish(channel, payload)
            return sharded
        receivers: int = self._redis.publish(channel, payload)
        return receivers

    def publish_signal(
        self, study_id: str, name: str, user_id: str, data: dict[str, Any] | None = None
    ) -> int:
        """Publish `signal.<name>` from `user_id` to every socket of the study (nothing is
        stored); returns how many nodes (subscriptions) received it."""
        payload = study_signal(study_id, name, user_id, data or {}, self._signal_max_bytes)
        channel = self._keys.channel(study_id)
        if isinstance(self._redis, RedisCluster):
            sharded: int = self._redis.spublish(channel, payload)
            return sharded
        receivers: int = self._redis.publish(channel, payload)
        return receivers


class AsyncStudyEventPublisher:
    """Publishes with a `redis.asyncio.Redis` or `redis.asyncio.cluster.RedisCluster` client."""

    def __init__(
        self, redis: Any, key_prefix: str = "presence", signal_max_bytes: int = SIGNAL_MAX_BYTES
    ) -> None:
        self._redis = redis
        self._keys = Keys(key_prefix)
        self._signal_max_bytes = signal_max_bytes  # the nodes' PRESENCE_SIGNAL_MAX_BYTES

    async def publish(self, study_id: str, event_type: str, data: dict[str, Any]) -> int:
        """Publish one event; returns how many nodes (subscriptions) received it."""
        payload = study_event(study_id, event_type, data)
        channel = self._keys.channel(study_id)
        if isinstance(self._redis, AsyncRedisCluster):
            sharded: int = await self._redis.spublish(channel, payload)
            return sharded
        receivers: int = await self._redis.publish(channel, payload)
        return receivers

    async def publish_signal(
        self, study_id: str, name: str, user_id: str, data: dict[str, Any] | None = None
    ) -> int:
        """Publish `signal.<name>` from `user_id` to every socket of the study (nothing is
        stored); returns how many nodes (subscriptions) received it."""
        payload = study_signal(study_id, name, user_id, data or {}, self._signal_max_bytes)
        channel = self._keys.channel(study_id)
        if isinstance(self._redis, AsyncRedisCluster):
            sharded: int = await self._redis.spublish(channel, payload)
            return sharded
        receivers: int = await self._redis.publish(channel, payload)
        return receivers
