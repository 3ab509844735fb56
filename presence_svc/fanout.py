"""Cross-node fan-out: which local subscribers (sockets) each study has, and delivery to them.

A study's channel is subscribed while the node has at least one local subscriber for it: the
first `add` subscribes, the last `remove` unsubscribes (`subscription` does both around a
block). Each message is decoded and turned into JSON text once, then handed to every local
subscriber of the study. The connections the channels are subscribed on (reading,
reconnecting, following slots) are a `Subscriptions`' (redis/pubsub.py's PubSubLinks, wired
by app.build_node); after a loss it reports each channel subscribed again, and its
subscribers get a fresh snapshot from `resync`, since events published meanwhile are lost to
them.

Add and remove are serialised per study, not globally: a subscription that waits on Redis
delays nobody else.

A study with more local subscribers than the batch threshold is delivered in ticks of the batch
window instead (part 2 of the big-rooms protocol): its messages are collected from the first of
a tick on, and one presence.batch (batching.py) goes to every subscriber when the tick ends, on
the node's clock. Below the threshold each message goes out as it comes, which costs the small
studies one check. A tick pending when a resync begins, when the study drops back to
immediate delivery, or at close is flushed at once, so nothing overtakes a snapshot, nothing
pending is lost and order is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from presence_svc.batching import build_batch
from presence_svc.clock import Clock, SystemClock, Timer
from presence_svc.codec import EnvelopeError, Outgoing, decode_envelope

log = logging.getLogger(__name__)

Resync = Callable[[str], Awaitable[Outgoing]]
Observer = Callable[[Outgoing, int], None]  # an event, and how many local subscribers got it


class Subscriber(Protocol):
    @property
    def watcher(self) -> bool:
        """True while it only watches (no heartbeat yet): the node's stats count it apart."""

    def deliver(self, event: Outgoing) -> None:
        """Take one event; must not block (queue it or drop the subscriber)."""


class Inbox(Protocol):
    """What the subscriptions hand on: messages, and channels subscribed again after a loss."""

    def on_message(self, channel: str, data: Any) -> None:
        """A message published on `channel` (its raw payload); must not block."""

    def on_resubscribed(self, channel: str) -> None:
        """`channel` is subscribed again after a reconnect or a slot move: events were lost."""


class Subscriptions(Protocol):
    """The channels subscribed for the fan-out, on connections kept alive (and healed).

    Callers never subscribe and unsubscribe one channel concurrently (Fanout locks per study).
    """

    @property
    def links(self) -> int:
        """Connections open (one per shard in use)."""

    @property
    def connected(self) -> bool:
        """False while any connection is being replaced."""

    @property
    def reconnects(self) -> int:
        """Connections replaced since start."""

    async def subscribe(self, channel: str) -> None:
        """Subscribe `channel`; returns once the server confirms it."""

    async def unsubscribe(self, channel: str) -> None:
        """Unsubscribe `channel` (a failure is the subscriptions' to handle)."""

    async def run(self) -> None:
        """Read the connections, replacing those that fail, until cancelled."""

    async def close(self) -> None:
        """Stop reading and close every connection (at shutdown)."""


# Subscriptions that hand what they read to the given inbox: Fanout passes itself, since the
# two refer to each other.
Connect = Callable[[Inbox], Subscriptions]
ChannelOf = Callable[[str], str]  # a study's channel name


@dataclass(eq=False, slots=True)
class _Channel:
    study_id: str
    subscribers: set[Subscriber] = field(default_factory=set)
    # Events read while its resync snapshot is being read: delivered after the snapshot, so
    # no socket sees an event newer than a snapshot that then overwrites it.
    held: list[Outgoing] | None = None
    # Resyncs under way (the channel can be resubscribed again while a snapshot is read), how
    # many have started, and the snapshot of the latest-started one that has returned one.
    resyncing: int = 0
    resyncs_started: int = 0
    snapshot: Outgoing | None = None
    snapshot_of: int = 0  # which resync (in start order) `snapshot` came from
    # While the study is delivered in ticks: the messages of the tick under way (None: each
    # message goes out as it comes), and the timer that ends the tick once one has come.
    pending: list[Outgoing] | None = None
    tick: Timer | None = None


class _KeyedLocks:
    """One lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]


class Fanout:
    def __init__(
        self,
        connect: Connect,
        channel_of: ChannelOf,
        resync: Resync,
        observe: Observer | None = None,
        *,
        clock: Clock | None = None,
        batch_threshold: int = 50,
        batch_window: float = 0.0,
    ) -> None:
        """`connect(self)` makes the subscriptions, which hand what they read to this fan-out;
        `channel_of` names a study's channel; `resync` reads a study's snapshot (a read that
        starts after it is called); `observe` hears of each event delivered. A study with more
        than `batch_threshold` subscribers gets one presence.batch per `batch_window` seconds
        of `clock` (0, the default: never)."""
        self._channel_of = channel_of
        self._resync = resync
        self._observe = observe
        self._clock: Clock = clock or SystemClock()
        self._batch_threshold = batch_threshold
        self._batch_window = batch_window
        self._channels: dict[str, _Channel] = {}
        self._locks = _KeyedLocks()
        self._tasks: set[asyncio.Future[None]] = set()
        self._pubsub = connect(self)
        self.dropped_messages = 0
        self.batches_sent = 0  # presence.batch frames built (one per study and tick)
        self.superseded_messages = 0  # left out of them: a later one of the tick had their key

    @property
    def studies(self) -> int:
        """Number of study channels this node is subscribed to."""
        return len(self._channels)

    def watching(self) -> dict[str, int]:
        """Local subscribers of each study subscribed to (for the node's stats)."""
        return {entry.study_id: len(entry.subscribers) for entry in self._channels.values()}

    def watchers(self) -> dict[str, int]:
        """Local subscribers that only watch (`watcher`), per study that has any (for the
        node's stats). One attribute read per local subscriber, once a stats interval: less
        than having each socket tell the fan-out of its first heartbeat on the hot path."""
        counts: dict[str, int] = {}
        for entry in self._channels.values():
            n = sum(s.watcher for s in entry.subscribers)
            if n:
                counts[entry.study_id] = n
        return counts

    @property
    def links(self) -> int:
        """Pub/sub connections open (one per shard in use)."""
        return self._pubsub.links

    @property
    def connected(self) -> bool:
        """False while any pub/sub link is being replaced."""
        return self._pubsub.connected

    @property
    def reconnects(self) -> int:
        """Pub/sub links replaced since start."""
        return self._pubsub.reconnects

    async def add(self, study_id: str, subscriber: Subscriber) -> None:
        """Start delivering the study's events to `subscriber`.

        Returns once the channel subscription is confirmed by Redis, so anything the caller reads
        afterwards (a snapshot) cannot miss an event published after it.
        """
        channel = self._channel_of(study_id)
        async with self._locks.hold(channel):
            entry = self._channels.get(channel)
            if entry is not None:  # confirmed: the lock was held until it was
                entry.subscribers.add(subscriber)
                self._pace(entry)
                return
            entry = self._channels[channel] = _Channel(study_id, {subscriber})
            self._pace(entry)
            try:
                await self._pubsub.subscribe(channel)
            except BaseException:
                del self._channels[channel]
                raise

    async def remove(self, study_id: str, subscriber: Subscriber) -> None:
        """Stop delivering to `subscriber`; unsubscribes the channel after its last subscriber."""
        channel = self._channel_of(study_id)
        async with self._locks.hold(channel):
            entry = self._channels.get(channel)
            if entry is None or subscriber not in entry.subscribers:
                return
            entry.subscribers.discard(subscriber)
            if entry.subscribers:
                self._pace(entry)
                return
            # Nobody is left to hand a pending tick to.
            if entry.tick is not None:
                entry.tick.cancel()
            entry.pending = entry.tick = None
            del self._channels[channel]
            await self._pubsub.unsubscribe(channel)

    @contextlib.asynccontextmanager
    async def subscription(self, study_id: str, subscriber: Subscriber) -> AsyncIterator[None]:
        """`add` on entry, `remove` on exit: the study's events reach `subscriber` inside."""
        await self.add(study_id, subscriber)
        try:
            yield
        finally:
            await self.remove(study_id, subscriber)

    async def run(self) -> None:
        """Read the pub/sub links, replacing those that fail, until cancelled."""
        await self._pubsub.run()

    def on_message(self, channel: str, data: Any) -> None:
        """A payload read on a study channel: decoded once, then delivered or held."""
        entry = self._channels.get(channel)
        if entry is None:
            return
        try:
            event = decode_envelope(data)
        except EnvelopeError as exc:
            self.dropped_messages += 1
            log.warning("dropped a message on %s: %s", channel, exc)
            return
        if entry.held is not None:
            entry.held.append(event)
            return
        if entry.pending is not None:
            self._collect(entry, event)
            return
        self._to_subscribers(entry, event)

    def on_resubscribed(self, channel: str) -> None:
        """The channel is back after a loss: its subscribers get a snapshot, then what follows."""
        entry = self._channels.get(channel)
        if entry is None:
            return
        if entry.held is None:
            # The pending tick was read before the loss: it goes out now, ahead of the snapshot
            # (as it would have without batching); what comes next is held.
            self._flush(entry)
            entry.held = []
        entry.resyncing += 1
        entry.resyncs_started += 1
        self._spawn(self._send_snapshot(entry, entry.resyncs_started))

    def _to_subscribers(
        self, entry: _Channel, event: Outgoing, carried: Sequence[Outgoing] | None = None
    ) -> None:
        subscribers = tuple(entry.subscribers)
        for subscriber in subscribers:
            subscriber.deliver(event)
        observe = self._observe
        if observe is not None and event.floor is None:
            if carried is None:
                observe(event, len(subscribers))
            else:  # a batch: the events it carries count, each with its own publication time
                for each in carried:
                    observe(each, len(subscribers))

    def _pace(self, entry: _Channel) -> None:
        """Deliver the study in ticks, or each message as it comes, as its subscribers say."""
        batched = self._batch_window > 0 and len(entry.subscribers) > self._batch_threshold
        if batched and entry.pending is None:
            entry.pending = []
        elif not batched and entry.pending is not None:
            self._flush(entry)  # what the tick has so far goes out before what follows
            entry.pending = None

    def _collect(self, entry: _Channel, event: Outgoing) -> None:
        assert entry.pending is not None
        entry.pending.append(event)
        if entry.tick is None:
            clock = self._clock
            end = clock.time() + self._batch_window
            entry.tick = clock.call_at(end, functools.partial(self._end_tick, entry))

    def _end_tick(self, entry: _Channel) -> None:
        entry.tick = None
        self._flush(entry)

    def _flush(self, entry: _Channel) -> None:
        """Deliver the tick under way as one presence.batch, and start the next one."""
        if entry.tick is not None:
            entry.tick.cancel()
            entry.tick = None
        messages = entry.pending
        if not messages:
            return
        entry.pending = []
        batch = build_batch(messages)
        self.batches_sent += 1
        self.superseded_messages += batch.superseded
        self._to_subscribers(entry, batch.message, batch.carried)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_snapshot(self, entry: _Channel, number: int) -> None:
        # Resyncs of one channel overlap when it is resubscribed again while a snapshot is
        # read, and may end in any order. Only the last to end delivers anything: the snapshot
        # of the latest-started resync that returned one (read after the latest loss, it also
        # covers what that loss lost; an older one would not), then every event held since the
        # first began; then holding stops. Were an earlier one to deliver and stop holding,
        # events would go straight out and a later snapshot, read before some of them, would
        # then overwrite them on the sockets. Held events the snapshot already covers are
        # harmless: sockets drop events at or below its floor.
        try:
            snapshot = await self._resync(entry.study_id)
        except Exception as exc:
            # The next reconnect tries again; until then seq gaps tell clients what they miss.
            log.error("resync of study %s failed: %s", entry.study_id, exc)
        else:
            if number > entry.snapshot_of:
                entry.snapshot, entry.snapshot_of = snapshot, number
        finally:
            entry.resyncing -= 1
            if not entry.resyncing:
                newest, entry.snapshot, entry.snapshot_of = entry.snapshot, None, 0
                held, entry.held = entry.held or [], None
                if newest is not None:
                    self._to_subscribers(entry, newest)
                # After the snapshot, held events take the usual way: in a big study they start
                # the next tick (nothing was pending: the resync began with a flush).
                for event in held:
                    if entry.pending is not None:
                        self._collect(entry, event)
                    else:
                        self._to_subscribers(entry, event)

    async def close(self) -> None:
        """Deliver the pending ticks, stop the resyncs under way and close the pub/sub links
        (at shutdown); from now on every message goes out as it comes."""
        self._batch_window = 0.0
        for entry in tuple(self._channels.values()):
            self._pace(entry)
        for task in tuple(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._pubsub.close()
