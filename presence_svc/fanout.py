"""Cross-node fan-out: one Redis pub/sub connection per node, one channel per study.

A study's channel is subscribed while the node has at least one local subscriber (socket) for
it. Each message is decoded and turned into JSON text once, then handed to every local
subscriber of the study.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from presence_svc.codec import EnvelopeError, Outgoing, decode_envelope
from presence_svc.keys import Keys

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0
_POLL_TIMEOUT = 1.0
_MAX_BACKOFF = 5.0


class Subscriber(Protocol):
    def deliver(self, event: Outgoing) -> None:
        """Take one event; must not block (queue it or drop the subscriber)."""


@dataclass(eq=False, slots=True)
class _Channel:
    subscribers: set[Subscriber] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Fanout:
    def __init__(self, redis: Any, keys: Keys) -> None:
        self._pubsub = redis.pubsub()
        self._keys = keys
        self._channels: dict[str, _Channel] = {}
        # Subscribe confirmations still owed per channel; a channel is ready when none are.
        self._unconfirmed: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._subscribed_once = asyncio.Event()
        self.dropped_messages = 0

    @property
    def studies(self) -> int:
        """Number of study channels this node is subscribed to."""
        return len(self._channels)

    async def add(self, study_id: str, subscriber: Subscriber) -> None:
        """Start delivering the study's events to `subscriber`.

        Returns once the channel subscription is confirmed by Redis, so anything the caller reads
        afterwards (a snapshot) cannot miss an event published after it.
        """
        channel = self._keys.channel(study_id)
        async with self._lock:
            entry = self._channels.get(channel)
            if entry is None:
                entry = self._channels[channel] = _Channel()
                self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
                try:
                    await self._pubsub.subscribe(channel)
                except BaseException:
                    del self._channels[channel]
                    self._unconfirmed[channel] -= 1
                    raise
                self._subscribed_once.set()
            entry.subscribers.add(subscriber)
        try:
            await asyncio.wait_for(entry.ready.wait(), SUBSCRIBE_TIMEOUT)
        except BaseException:
            await self.remove(study_id, subscriber)
            raise

    async def remove(self, study_id: str, subscriber: Subscriber) -> None:
        """Stop delivering to `subscriber`; unsubscribes the channel after its last subscriber."""
        channel = self._keys.channel(study_id)
        async with self._lock:
            entry = self._channels.get(channel)
            if entry is None or subscriber not in entry.subscribers:
                return
            entry.subscribers.discard(subscriber)
            if entry.subscribers:
                return
            del self._channels[channel]
            try:
                await self._pubsub.unsubscribe(channel)
            except Exception as exc:
                # The connection is gone; it will not resubscribe a channel we no longer track.
                log.warning("unsubscribe %s failed: %s", channel, exc)

    async def run(self) -> None:
        """Read the pub/sub connection until cancelled."""
        await self._subscribed_once.wait()
        backoff = 0.1
        while True:
            try:
                message = await self._pubsub.get_message(timeout=_POLL_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("pub/sub read failed, retrying in %.1fs: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            backoff = 0.1
            if message is not None:
                self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind == "subscribe":
            owed = self._unconfirmed.get(channel, 0) - 1
            if owed > 0:
                self._unconfirmed[channel] = owed
                return
            self._unconfirmed.pop(channel, None)
            entry = self._channels.get(channel)
            if entry is not None:
                entry.ready.set()
            return
        if kind != "message":
            return
        entry = self._channels.get(channel)
        if entry is None:
            return
        try:
            event = decode_envelope(message["data"])
        except EnvelopeError as exc:
            self.dropped_messages += 1
            log.warning("dropped a message on %s: %s", channel, exc)
            return
        for subscriber in tuple(entry.subscribers):
            subscriber.deliver(event)

    async def close(self) -> None:
        await self._pubsub.aclose()
