"""Cross-node fan-out: Redis pub/sub links, one channel per study.

A study's channel is subscribed while the node has at least one local subscriber (socket) for
it. Each message is decoded and turned into JSON text once, then handed to every local
subscriber of the study.

Channels travel on links (pub/sub connections): one per node on a single Redis; in cluster
mode one per primary, carrying with `SSUBSCRIBE` the channels whose slot it owns (cluster.py),
so a message never crosses the cluster bus. Each link is watched: a read error, or silence
past `DEAD_AFTER` while pings go unanswered, replaces it with a new one (capped exponential
backoff with jitter). Its channels are then subscribed again (on whichever primary owns them
now) and, once Redis confirms, each study's subscribers get a fresh snapshot from `resync`,
since events published meanwhile are lost to them. A slot that moves to another primary
(`sunsubscribe` from the server) is followed the same way.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from presence_svc.codec import EnvelopeError, Outgoing, decode_envelope
from presence_svc.redis.keys import Keys

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0
PING_AFTER = 1.0  # seconds of silence before the node pings a pub/sub link
DEAD_AFTER = 3.0  # seconds of silence (pings unanswered) before the link is replaced
_POLL = 0.5
_BACKOFF_FIRST, _BACKOFF_CAP = 0.1, 5.0
_CONFIRMS = frozenset({"subscribe", "ssubscribe"})
_MESSAGES = frozenset({"message", "smessage"})

Resync = Callable[[str], Awaitable[Outgoing]]
Observer = Callable[[Outgoing, int], None]  # an event, and how many local subscribers got it


class Subscriber(Protocol):
    def deliver(self, event: Outgoing) -> None:
        """Take one event; must not block (queue it or drop the subscriber)."""


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


@dataclass(eq=False, slots=True)
class _Link:
    shard: str
    pubsub: Any
    channels: set[str] = field(default_factory=set)
    # Subscribe confirmations still owed per channel; a channel is ready when none are.
    unconfirmed: dict[str, int] = field(default_factory=dict)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    connected: bool = True
    task: asyncio.Task[None] | None = None


@dataclass(eq=False, slots=True)
class _Channel:
    study_id: str
    link: _Link
    subscribers: set[Subscriber] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    resync_due: bool = False
    # Events read while its resync snapshot is being read: delivered after the snapshot, so
    # no socket sees an event newer than a snapshot that then overwrites it.
    held: list[Outgoing] | None = None


class Fanout:
    def __init__(
        self, links: Links, keys: Keys, resync: Resync, observe: Observer | None = None
    ) -> None:
        self._links = links
        self._observe = observe
        self._keys = keys
        self._resync = resync
        self._by_shard: dict[str, _Link] = {}
        self._channels: dict[str, _Channel] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._new_link = asyncio.Event()
        self.dropped_messages = 0
        self.reconnects = 0

    @property
    def studies(self) -> int:
        """Number of study channels this node is subscribed to."""
        return len(self._channels)

    @property
    def links(self) -> int:
        """Pub/sub connections open (one per shard in use)."""
        return len(self._by_shard)

    @property
    def connected(self) -> bool:
        """False while any pub/sub link is being replaced."""
        return all(link.connected for link in self._by_shard.values())

    async def add(self, study_id: str, subscriber: Subscriber) -> None:
        """Start delivering the study's events to `subscriber`.

        Returns once the channel subscription is confirmed by Redis, so anything the caller reads
        afterwards (a snapshot) cannot miss an event published after it.
        """
        channel = self._keys.channel(study_id)
        async with self._lock:
            entry = self._channels.get(channel)
            if entry is None:
                link = self._link(self._links.shard_of(channel))
                entry = self._channels[channel] = _Channel(study_id, link)
                try:
                    await self._attach(link, [channel])
                except BaseException:
                    del self._channels[channel]
                    link.channels.discard(channel)
                    link.unconfirmed[channel] -= 1
                    raise
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
            entry.link.channels.discard(channel)
            try:
                await self._send(entry.link, "unsubscribe", [channel])
            except Exception as exc:
                # A broken link is replaced without the channels no longer tracked.
                log.warning("unsubscribe %s failed: %s", channel, exc)

    async def run(self) -> None:
        """Read every link, replacing those that fail, until cancelled (one task per link)."""
        try:
            while True:
                self._new_link.clear()
                for link in self._by_shard.values():
                    if link.task is None:
                        link.task = asyncio.create_task(self._serve(link), name="pubsub")
                await self._new_link.wait()
        finally:
            await self._stop_links()

    def _link(self, shard: str) -> _Link:
        link = self._by_shard.get(shard)
        if link is None:
            link = self._by_shard[shard] = _Link(shard, self._open(shard))
            self._new_link.set()  # run() starts its reader
        return link

    def _open(self, shard: str) -> Any:
        pubsub = self._links.open(shard)
        # redis-py's error handler reconnects a pub/sub connection even with retries off, and
        # its on_connect then resubscribes every channel in one command (across slots: a
        # CROSSSLOT error on a cluster). The fan-out replaces a failed connection itself, so
        # a reconnect inside redis-py must not resubscribe anything.
        pubsub.on_connect = types.MethodType(_resubscribe_nothing, pubsub)
        return pubsub

    async def _attach(self, link: _Link, channels: list[str]) -> None:
        for channel in channels:
            link.channels.add(channel)
            link.unconfirmed[channel] = link.unconfirmed.get(channel, 0) + 1
        await self._send(link, "subscribe", channels)
        link.wakeup.set()

    async def _send(self, link: _Link, verb: str, channels: list[str]) -> None:
        pubsub = link.pubsub
        send = getattr(pubsub, "s" + verb if self._links.sharded else verb)
        for batch in self._links.batches(channels):
            await send(*batch)

    async def _serve(self, link: _Link) -> None:
        backoff = _BACKOFF_FIRST
        while True:
            try:
                await self._read(link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                link.connected = False
                log.error("pub/sub connection lost%s: %s", _on(link), exc or type(exc).__name__)
            while True:
                # Full jitter keeps a fleet of nodes from reconnecting in lockstep.
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, _BACKOFF_CAP)
                try:
                    if not await self._reconnect(link):
                        return
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("pub/sub reconnect failed: %s", exc or type(exc).__name__)
            backoff = _BACKOFF_FIRST

    async def _read(self, link: _Link) -> None:
        last_heard = time.monotonic()
        pinged = False
        while True:
            pubsub = link.pubsub
            if pubsub.connection is None:
                # Nothing subscribed yet: there is no connection to read.
                link.wakeup.clear()
                await link.wakeup.wait()
                last_heard = time.monotonic()
                continue
            message = await pubsub.get_message(timeout=_POLL)
            now = time.monotonic()
            if message is not None:
                last_heard, pinged = now, False
                link.connected = True
                self._handle(link, message)
            elif now - last_heard > DEAD_AFTER:
                raise ConnectionError(f"no answer on pub/sub for {DEAD_AFTER:.0f}s")
            elif now - last_heard > PING_AFTER and not pinged:
                await pubsub.ping()
                pinged = True

    async def _reconnect(self, link: _Link) -> bool:
        """Replace a failed link; False if none of its channels belong on its shard any more."""
        # In a cluster the link's primary may have failed over: channels go where they are
        # owned now.
        await self._links.refresh()
        async with self._lock:
            staying = [c for c in link.channels if self._links.shard_of(c) == link.shard]
            if staying:
                old, link.pubsub = link.pubsub, self._open(link.shard)
            else:
                old = link.pubsub
                if self._by_shard.get(link.shard) is link:
                    del self._by_shard[link.shard]  # retired: a later add opens a new one
            try:
                await old.aclose()
            except Exception as exc:
                log.debug("closing the old pub/sub connection: %s", exc)
            link.unconfirmed.clear()
            channels, link.channels = list(link.channels), set()
            await self._resubscribe(channels)
        self.reconnects += 1
        link.connected = True
        log.warning("pub/sub reconnected%s; resubscribed %d studies", _on(link), len(channels))
        return self._by_shard.get(link.shard) is link

    async def _relocate(self, channel: str) -> None:
        """Follow a channel whose slot moved to another primary."""
        try:
            await self._links.refresh()
            async with self._lock:
                entry = self._channels.get(channel)
                if entry is None:
                    return
                entry.link.channels.discard(channel)
                await self._resubscribe([channel])
            log.warning("study channel %s moved to shard %s", channel, entry.link.shard)
        except Exception as exc:
            log.error("could not follow channel %s to its new shard: %s", channel, exc)

    async def _resubscribe(self, channels: list[str]) -> None:
        """Subscribe tracked channels again where they are owned now; resync once confirmed.

        Under the lock. A channel stays listed on its new link if this fails, so the next
        reconnect of that link subscribes it again.
        """
        groups: dict[_Link, list[str]] = {}
        for channel in channels:
            entry = self._channels[channel]
            entry.resync_due = True
            entry.link = self._link(self._links.shard_of(channel))
            groups.setdefault(entry.link, []).append(channel)
        for target, group in groups.items():
            await self._attach(target, group)

    def _handle(self, link: _Link, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind in _CONFIRMS:
            self._confirmed(link, channel)
            return
        if kind == "sunsubscribe" and channel in link.channels:
            # Not asked for: the slot moved (or the primary became a replica).
            self._spawn(self._relocate(channel))
            return
        if kind not in _MESSAGES:
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
        if entry.held is not None:
            entry.held.append(event)
            return
        self._to_subscribers(entry, event)

    def _to_subscribers(self, entry: _Channel, event: Outgoing) -> None:
        subscribers = tuple(entry.subscribers)
        for subscriber in subscribers:
            subscriber.deliver(event)
        if self._observe is not None and event.floor is None:
            self._observe(event, len(subscribers))

    def _confirmed(self, link: _Link, channel: str) -> None:
        owed = link.unconfirmed.get(channel, 0) - 1
        if owed > 0:
            link.unconfirmed[channel] = owed
            return
        link.unconfirmed.pop(channel, None)
        entry = self._channels.get(channel)
        if entry is None or entry.link is not link:
            return
        entry.ready.set()
        if entry.resync_due:
            entry.resync_due = False
            entry.held = []
            self._spawn(self._send_snapshot(entry))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_snapshot(self, entry: _Channel) -> None:
        snapshot: Outgoing | None = None
        try:
            snapshot = await self._resync(entry.study_id)
        except Exception as exc:
            # The next reconnect tries again; until then seq gaps tell clients what they miss.
            log.error("resync of study %s failed: %s", entry.study_id, exc)
        finally:
            held, entry.held = entry.held or [], None
            for event in [snapshot, *held] if snapshot is not None else held:
                self._to_subscribers(entry, event)

    async def _stop_links(self) -> None:
        tasks = [link.task for link in self._by_shard.values() if link.task is not None]
        for link in self._by_shard.values():
            link.task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        for task in tuple(self._tasks):
            task.cancel()
        await self._stop_links()
        links, self._by_shard = list(self._by_shard.values()), {}
        for link in links:
            await link.pubsub.aclose()


async def _resubscribe_nothing(pubsub: Any, connection: Any) -> None:
    return None


def _on(link: _Link) -> str:
    return f" (shard {link.shard})" if link.shard else ""
