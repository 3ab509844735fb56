"""Listening to the study channels: every presence event a test's operations publish, checked.

An EventTap pattern-subscribes to the test's key prefix and, to know it has seen everything an
operation published, publishes a marker of its own and reads up to it (Redis delivers a
connection's subscriptions in publish order), so "nothing was published" needs no timeout.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from redis.crc import key_slot

from presence_svc.codec import encode_envelope
from presence_svc.models import EVENT_TYPES, Status, iso_from_ms
from presence_svc.redis.cluster import ClusterBatcher, node_client
from presence_svc.redis.keys import Keys

DATA_FIELDS = [
    "session_id",
    "user_id",
    "study_id",
    "chapter_id",
    "move_path",
    "status",
    "previous_status",
    "timestamp",
    "seq",
]
# The statuses each event may change from (previous_status); None: the event carries none.
PREVIOUS = {
    "presence.user_idle": {"active"},
    "presence.user_away": {"active", "idle"},
    "presence.user_active": {"idle", "away"},
}


@dataclass(frozen=True)
class Event:
    channel: str
    type: str
    data: dict[str, Any]
    ts: int

    @property
    def user(self) -> str:
        return str(self.data["user_id"])

    @property
    def study(self) -> str:
        return str(self.data["study_id"])

    @property
    def seq(self) -> int:
        return int(self.data["seq"])

    @property
    def status(self) -> str:
        return str(self.data["status"])


class EventTap:
    """Every event published under the test's prefix, checked as it is read.

    Each message must be a well-formed presence envelope, byte-identical to what
    codec.encode_envelope makes of the same values, published on the channel Keys names for
    its study, with a timestamp matching its `ts` and a seq exactly one above the study's
    previous event.
    """

    def __init__(self, client: Any, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._marker_channel = f"{keys.prefix}:tap-marker"
        self.last_seq: dict[str, int] = {}

    async def start(self) -> None:
        self._pubsub = self._client.pubsub()
        await self._pubsub.psubscribe(f"{self._keys.prefix}:*")

    async def close(self) -> None:
        await self._pubsub.punsubscribe()
        await self._pubsub.aclose()

    async def drain(self) -> list[Event]:
        """Every event published since the last drain, in publish order."""
        marker = uuid.uuid4().hex.encode()
        await self._client.publish(self._marker_channel, marker)
        return await self._read_to_marker(self._pubsub, self._marker_channel, marker, [])

    async def _read_to_marker(
        self, pubsub: Any, marker_channel: str, marker: bytes, events: list[Event]
    ) -> list[Event]:
        """`events` plus every event `pubsub` receives before `marker` on `marker_channel`."""
        deadline = time.monotonic() + 10
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"marker not received; got {events}")
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=min(remaining, 1.0)
            )
            if message is None:
                continue
            channel = message["channel"].decode()
            if channel == marker_channel:
                if message["data"] == marker:
                    return events
                continue
            events.append(self._check(channel, message["data"]))

    def _check(self, channel: str, raw: bytes) -> Event:
        envelope = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        assert list(envelope) == ["type", "data", "ts"], envelope
        event_type, data, ts = envelope["type"], envelope["data"], envelope["ts"]
        assert event_type in EVENT_TYPES, envelope
        assert list(data) == DATA_FIELDS, envelope
        assert isinstance(ts, int)
        assert data["timestamp"] == iso_from_ms(ts)
        assert data["status"] in {s.value for s in Status}
        allowed = PREVIOUS.get(event_type)
        if allowed is None:
            assert data["previous_status"] is None, envelope
        else:
            assert data["previous_status"] in allowed, envelope
        assert channel == self._keys.channel(data["study_id"])
        assert raw == encode_envelope(event_type, data, ts)
        expected_seq = self.last_seq.get(channel, 0) + 1
        assert data["seq"] == expected_seq, f"seq gap on {channel}: {envelope}"
        self.last_seq[channel] = expected_seq
        return Event(channel, event_type, data, ts)

    def seq_of(self, study_id: str) -> int:
        return self.last_seq.get(self._keys.channel(study_id), 0)


def kinds(events: Sequence[Event]) -> list[tuple[str, str]]:
    """(type, user) of each event, in order."""
    return [(e.type, e.user) for e in events]


@dataclass
class _ShardLink:
    client: Any
    pubsub: Any
    marker_channel: str
    buffer: list[tuple[str, bytes]]


class ClusterEventTap(EventTap):
    """The tap on a Redis Cluster, where events travel on sharded channels (SPUBLISH).

    Sharded pub/sub has no patterns, so the tap subscribes each study's channel just before a
    store operation first touches it (it wraps ClusterBatcher.run for the test), on one link per
    primary, and drains each primary up to a marker of its own. Order is kept per primary;
    across primaries events are merged by timestamp.
    """

    def __init__(self, client: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(client, keys)
        self._monkeypatch = monkeypatch
        self._links: dict[str, _ShardLink] = {}
        self._watched: set[str] = set()
        self._lock = asyncio.Lock()  # one reader per link at a time

    async def start(self) -> None:
        await self._client.initialize()
        original = ClusterBatcher.run
        tap = self

        async def run(batcher: ClusterBatcher, commands: list[Any]) -> list[Any]:
            await tap._watch(commands)
            return await original(batcher, commands)

        self._monkeypatch.setattr(ClusterBatcher, "run", run)

    async def close(self) -> None:
        for link in self._links.values():
            await link.pubsub.aclose()
            await link.client.aclose()

    async def _watch(self, commands: list[Any]) -> None:
        async with self._lock:
            await self._watch_unlocked(commands)

    async def _watch_unlocked(self, commands: list[Any]) -> None:
        for command in commands:
            if command[0] != "EVALSHA":
                continue
            for key in command[3 : 3 + int(command[2])]:
                if isinstance(key, str) and key.endswith(":events") and key not in self._watched:
                    self._watched.add(key)
                    await self._subscribe(self._link_of(key), key)

    def _node_name(self, key: str) -> str:
        node = self._client.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        return str(node.name)

    def _link_of(self, channel: str) -> _ShardLink:
        name = self._node_name(channel)
        link = self._links.get(name)
        if link is None:
            marker = next(
                candidate
                for i in range(100_000)
                if self._node_name(candidate := f"{self._keys.prefix}:{{tap-{i}}}") == name
            )
            node = self._client.get_node(node_name=name)
            client = node_client(node, reconnect=False)
            link = self._links[name] = _ShardLink(client, client.pubsub(), marker, [])
        return link

    async def _subscribe(self, link: _ShardLink, channel: str) -> None:
        if not link.pubsub.subscribed:
            await self._subscribe_one(link, link.marker_channel)
        await self._subscribe_one(link, channel)

    async def _subscribe_one(self, link: _ShardLink, channel: str) -> None:
        # Confirmed before the operation runs, so none of its events can be missed.
        await link.pubsub.ssubscribe(channel)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = await link.pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            name = message["channel"].decode()
            if message["type"] == "ssubscribe" and name == channel:
                return
            if message["type"] == "smessage":
                link.buffer.append((name, message["data"]))
        pytest.fail(f"SSUBSCRIBE {channel} not confirmed")

    async def drain(self) -> list[Event]:
        """Every event published since the last drain: in order per primary, then by `ts`."""
        events: list[Event] = []
        async with self._lock:
            for link in self._links.values():
                events += await self._drain_link(link)
        return sorted(events, key=lambda e: e.ts)

    async def _drain_link(self, link: _ShardLink) -> list[Event]:
        marker = uuid.uuid4().hex.encode()
        await self._client.spublish(link.marker_channel, marker)
        pending, link.buffer = link.buffer, []
        events = [self._check(channel, raw) for channel, raw in pending]
        return await self._read_to_marker(link.pubsub, link.marker_channel, marker, events)
