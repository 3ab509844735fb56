"""Cross-node fan-out: one Redis pub/sub connection per node, one channel per study.

A study's channel is subscribed while the node has at least one local subscriber (socket) for
it. Each message is decoded and turned into JSON text once, then handed to every local
subscriber of the study.

The connection is watched: a read error, or silence past `DEAD_AFTER` while pings go
unanswered, replaces it with a new one (capped exponential backoff with jitter). Every channel
is then subscribed again and, once Redis confirms, each study's subscribers get a fresh snapshot
from `resync`, since events published meanwhile are lost to them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from presence_svc.codec import EnvelopeError, Outgoing, decode_envelope
from presence_svc.keys import Keys

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0
PING_AFTER = 1.0  # seconds of silence before the node pings its pub/sub connection
DEAD_AFTER = 3.0  # seconds of silence (pings unanswered) before the connection is replaced
_POLL = 0.5
_BACKOFF_FIRST, _BACKOFF_CAP = 0.1, 5.0

Resync = Callable[[str], Awaitable[Outgoing]]
Observer = Callable[[Outgoing, int], None]  # an event, and how many local subscribers got it


class Subscriber(Protocol):
    def deliver(self, event: Outgoing) -> None:
        """Take one event; must not block (queue it or drop the subscriber)."""


@dataclass(eq=False, slots=True)
class _Channel:
    study_id: str
    subscribers: set[Subscriber] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    resync_due: bool = False


class Fanout:
    def __init__(
        self, redis: Any, keys: Keys, resync: Resync, observe: Observer | None = None
    ) -> None:
        self._redis = redis
        self._observe = observe
        self._keys = keys
        self._resync = resync
        self._pubsub = redis.pubsub()
        self._channels: dict[str, _Channel] = {}
        # Subscribe confirmations still owed per channel; a channel is ready when none are.
        self._unconfirmed: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._resyncs: set[asyncio.Task[None]] = set()
        self.connected = True
        self.dropped_messages = 0
        self.reconnects = 0

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
                entry = self._channels[channel] = _Channel(study_id)
                self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
                try:
                    await self._pubsub.subscribe(channel)
                except BaseException:
                    del self._channels[channel]
                    self._unconfirmed[channel] -= 1
                    raise
                self._wakeup.set()
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
                # A broken connection is replaced without the channels no longer tracked.
                log.warning("unsubscribe %s failed: %s", channel, exc)

    async def run(self) -> None:
        """Read the pub/sub connection until cancelled, replacing it whenever it fails."""
        backoff = _BACKOFF_FIRST
        while True:
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                log.error("pub/sub connection lost: %s", exc or type(exc).__name__)
            while True:
                # Full jitter keeps a fleet of nodes from reconnecting in lockstep.
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, _BACKOFF_CAP)
                try:
                    await self._reconnect()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("pub/sub reconnect failed: %s", exc or type(exc).__name__)
            backoff = _BACKOFF_FIRST

    async def _read(self) -> None:
        last_heard = time.monotonic()
        pinged = False
        while True:
            if self._pubsub.connection is None:
                # Nothing subscribed yet: there is no connection to read.
                self._wakeup.clear()
                await self._wakeup.wait()
                last_heard = time.monotonic()
                continue
            message = await self._pubsub.get_message(timeout=_POLL)
            now = time.monotonic()
            if message is not None:
                last_heard, pinged = now, False
                self.connected = True
                self._handle(message)
            elif now - last_heard > DEAD_AFTER:
                raise ConnectionError(f"no answer on pub/sub for {DEAD_AFTER:.0f}s")
            elif now - last_heard > PING_AFTER and not pinged:
                await self._pubsub.ping()
                pinged = True

    async def _reconnect(self) -> None:
        async with self._lock:
            old, self._pubsub = self._pubsub, self._redis.pubsub()
            try:
                await old.aclose()
            except Exception as exc:
                log.debug("closing the old pub/sub connection: %s", exc)
            self._unconfirmed.clear()
            channels = list(self._channels)
            for channel in channels:
                entry = self._channels[channel]
                entry.resync_due = True
                self._unconfirmed[channel] = 1
            if channels:
                await self._pubsub.subscribe(*channels)
        self.reconnects += 1
        self.connected = True
        log.warning("pub/sub reconnected; resubscribed %d studies", len(channels))

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind == "subscribe":
            self._confirmed(channel)
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
        subscribers = tuple(entry.subscribers)
        for subscriber in subscribers:
            subscriber.deliver(event)
        if self._observe is not None:
            self._observe(event, len(subscribers))

    def _confirmed(self, channel: str) -> None:
        owed = self._unconfirmed.get(channel, 0) - 1
        if owed > 0:
            self._unconfirmed[channel] = owed
            return
        self._unconfirmed.pop(channel, None)
        entry = self._channels.get(channel)
        if entry is None:
            return
        entry.ready.set()
        if entry.resync_due:
            entry.resync_due = False
            task = asyncio.create_task(self._send_snapshot(entry))
            self._resyncs.add(task)
            task.add_done_callback(self._resyncs.discard)

    async def _send_snapshot(self, entry: _Channel) -> None:
        try:
            snapshot = await self._resync(entry.study_id)
        except Exception as exc:
            # The next reconnect tries again; until then seq gaps tell clients what they miss.
            log.error("resync of study %s failed: %s", entry.study_id, exc)
            return
        for subscriber in tuple(entry.subscribers):
            subscriber.deliver(snapshot)

    async def close(self) -> None:
        for task in tuple(self._resyncs):
            task.cancel()
        await self._pubsub.aclose()
