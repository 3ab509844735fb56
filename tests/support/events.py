"""Listening to the study channels: every presence event a test's operations publish, checked.

An EventTap pattern-subscribes to the test's key prefix and, to know it has seen everything an
operation published, publishes a marker of its own and reads up to it (Redis delivers a
connection's subscriptions in publish order), so "nothing was published" needs no timeout.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from presence_svc.codec import encode_envelope
from presence_svc.keys import Keys
from presence_svc.models import EVENT_TYPES, Status, iso_from_ms

DATA_FIELDS = [
    "session_id",
    "user_id",
    "study_id",
    "chapter_id",
    "move_path",
    "status",
    "timestamp",
    "seq",
]


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
        self._pubsub = client.pubsub()
        self._marker_channel = f"{keys.prefix}:tap-marker"
        self.last_seq: dict[str, int] = {}

    async def start(self) -> None:
        await self._pubsub.psubscribe(f"{self._keys.prefix}:*")

    async def close(self) -> None:
        await self._pubsub.punsubscribe()
        await self._pubsub.aclose()

    async def drain(self) -> list[Event]:
        """Every event published since the last drain, in publish order."""
        marker = uuid.uuid4().hex.encode()
        await self._client.publish(self._marker_channel, marker)
        events: list[Event] = []
        deadline = time.monotonic() + 10
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"marker not received; got {events}")
            message = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=min(remaining, 1.0)
            )
            if message is None:
                continue
            channel = message["channel"].decode()
            if channel == self._marker_channel:
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
