"""Where study channels are subscribed: which shard carries a channel, and connections to it.

`Links` is what pubsub.py's PubSubLinks keeps alive; `SingleLinks` serves one Redis, and
cluster.py's `ClusterLinks` a Redis Cluster (one sharded pub/sub connection per primary).
"""

from __future__ import annotations

from typing import Any, Protocol


class Links(Protocol):
    """Where channels are subscribed: which shard carries a channel, and connections to it."""

    sharded: bool  # SSUBSCRIBE (Redis Cluster) rather than SUBSCRIBE

    def shard_of(self, channel: str) -> str: ...

    def batches(self, channels: list[str]) -> list[list[str]]:
        """`channels` split into groups that one (S)SUBSCRIBE command may name together."""

    def open(self, shard: str) -> Any:
        """A new redis-py PubSub on `shard` that never reconnects on its own."""

    async def refresh(self) -> None:
        """Learn again which shard owns which channel."""

    async def aclose(self) -> None:
        """Close the clients the links were opened with (at shutdown)."""


class SingleLinks:
    """One Redis: every channel on the one link of the node."""

    sharded = False

    def __init__(self, redis: Any, owned: bool = False) -> None:
        self._redis = redis
        self._owned = owned

    def shard_of(self, channel: str) -> str:
        return ""

    def batches(self, channels: list[str]) -> list[list[str]]:
        return [channels]

    def open(self, shard: str) -> Any:
        return self._redis.pubsub()

    async def refresh(self) -> None:
        return None

    async def aclose(self) -> None:
        if self._owned:
            await self._redis.aclose()
