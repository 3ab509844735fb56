"""Redis pub/sub links: the connections study channels are subscribed on, kept alive.

A link is one pub/sub connection: one per node on a single Redis; in cluster mode one per
primary, carrying with `SSUBSCRIBE` the channels whose slot it owns (cluster.py), so a message
never crosses the cluster bus. Each link is watched: a read error, or silence past `dead_after`
while pings go unanswered, replaces it with a new one (capped exponential backoff with full
jitter). Its channels are then subscribed again (on whichever primary owns them now) and, once
Redis confirms, the inbox hears `on_resubscribed` for each, since events published meanwhile
are lost. A slot that moves to another primary (`sunsubscribe` from the server) is followed the
same way.

Locking is per link and held only while a command is written or the link is replaced: a
channel waiting for its confirmation holds nothing, so it never delays another channel. Callers
must not subscribe and unsubscribe the same channel concurrently (fanout.py locks per study).

`PubSubLinks` is the fan-out's `Subscriptions` and hands what it reads to the fan-out's `Inbox`
(both Protocols of fanout.py, which knows nothing of Redis): app.build_node makes one through
`client.RedisClients.subscriptions`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import types
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from presence_svc.fanout import Inbox
from presence_svc.redis.hiredis_pubsub import PubSubReplies
from presence_svc.redis.links import Links

if TYPE_CHECKING:
    from presence_svc.fanout import Subscriptions

log = logging.getLogger(__name__)

_CONFIRMS = frozenset({"subscribe", "ssubscribe"})
_MESSAGES = frozenset({"message", "smessage"})
_RAW_MESSAGES = frozenset({b"message", b"smessage"})


@dataclass(frozen=True, slots=True)
class LinkTuning:
    """How links are watched and replaced (seconds); the PRESENCE_PUBSUB_* settings."""

    subscribe_timeout: float = 5.0  # for Redis to confirm a subscription
    ping_after: float = 1.0  # silence before a link is pinged
    dead_after: float = 3.0  # silence (pings unanswered) before it is replaced
    backoff_first: float = 0.1  # the first reconnect waits up to this long...
    backoff_cap: float = 5.0  # ...doubling after each failed attempt, up to this
    # A busy link (read again within half this, until a pause collects one event or none)
    # lets its socket fill this long before the next read instead of waking the node for
    # every message: at 2,000 events/s, one wake-up per ten events instead of one each, for
    # at most this much more latency (docs/performance.md, "Receive path"). 0: read whenever
    # anything arrives. Raw reads only (hiredis_pubsub.py).
    gather: float = 0.005

    @property
    def poll(self) -> float:
        """How long one read waits: short enough to ping and give up on time."""
        return min(0.5, self.ping_after / 2)

    def backoffs(self) -> Iterator[float]:
        """Bounds of the random waits before successive reconnect attempts: doubling, capped."""
        bound = self.backoff_first
        while True:
            yield bound
            bound = min(bound * 2, self.backoff_cap)


@dataclass(eq=False, slots=True)
class _Link:
    shard: str
    pubsub: Any
    channels: set[str] = field(default_factory=set)
    # Subscribe confirmations still owed per channel; a channel is ready when none are.
    unconfirmed: dict[str, int] = field(default_factory=dict)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # Held while a command is written or the connection replaced, never across a wait for a
    # reply: commands on one connection go out one at a time (redis-py would open a second
    # connection for two first commands sent at once).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    connected: bool = True
    task: asyncio.Task[None] | None = None


@dataclass(eq=False, slots=True)
class _Route:
    """A subscribed channel: the link carrying it, and whether it has been confirmed there."""

    link: _Link
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    resync_due: bool = False


class PubSubLinks:
    """The node's pub/sub links: subscribe and unsubscribe channels, read and heal the links."""

    def __init__(self, links: Links, inbox: Inbox, tuning: LinkTuning | None = None) -> None:
        self._links = links
        self._inbox = inbox
        self._tuning = tuning or LinkTuning()
        self._by_shard: dict[str, _Link] = {}
        self._routes: dict[str, _Route] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._new_link = asyncio.Event()
        self.reconnects = 0

    @property
    def links(self) -> int:
        """Pub/sub connections open (one per shard in use)."""
        return len(self._by_shard)

    @property
    def connected(self) -> bool:
        """False while any link is being replaced."""
        return all(link.connected for link in self._by_shard.values())

    async def subscribe(self, channel: str) -> None:
        """Subscribe `channel`; returns once Redis confirms it (TimeoutError if it does not)."""
        route = await self._send_subscribe(channel)
        try:
            await asyncio.wait_for(route.ready.wait(), self._tuning.subscribe_timeout)
        except BaseException:
            await self.unsubscribe(channel)
            raise

    async def _send_subscribe(self, channel: str) -> _Route:
        while True:
            link = self._link(self._links.shard_of(channel))
            async with link.lock:
                if self._by_shard.get(link.shard) is not link:
                    continue  # retired while we waited: take the one that replaced it
                route = self._routes[channel] = _Route(link)
                self._attach(link, [channel])
                try:
                    await self._send(link, "subscribe", [channel])
                except BaseException:
                    if route.link is link:  # (unless a slot move took it elsewhere meanwhile)
                        link.unconfirmed[channel] -= 1  # no confirmation will come
                    self._forget(channel, route)
                    raise
                link.wakeup.set()
                return route

    async def unsubscribe(self, channel: str) -> None:
        """Unsubscribe `channel`; a failure is logged (a broken link is replaced without it)."""
        route = self._routes.get(channel)
        if route is None:
            return
        self._forget(channel, route)
        link = route.link
        async with link.lock:
            if self._by_shard.get(link.shard) is not link:
                return  # retired: its connection is closed, and the channel gone with it
            try:
                await self._send(link, "unsubscribe", [channel])
            except Exception as exc:
                log.warning("unsubscribe %s failed: %s", channel, exc)

    def _forget(self, channel: str, route: _Route) -> None:
        if self._routes.get(channel) is route:
            del self._routes[channel]
        route.link.channels.discard(channel)

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
        # CROSSSLOT error on a cluster). The links replace a failed connection themselves, so
        # a reconnect inside redis-py must not resubscribe anything.
        pubsub.on_connect = types.MethodType(_resubscribe_nothing, pubsub)
        return pubsub

    def _attach(self, link: _Link, channels: list[str]) -> None:
        for channel in channels:
            link.channels.add(channel)
            link.unconfirmed[channel] = link.unconfirmed.get(channel, 0) + 1

    async def _send(self, link: _Link, verb: str, channels: list[str]) -> None:
        """Under `link.lock`."""
        send = getattr(link.pubsub, "s" + verb if self._links.sharded else verb)
        for batch in self._links.batches(channels):
            await send(*batch)

    async def _serve(self, link: _Link) -> None:
        while True:
            try:
                await self._read(link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                link.connected = False
                log.error("pub/sub connection lost%s: %s", _on(link), exc or type(exc).__name__)
            for bound in self._tuning.backoffs():
                # Full jitter keeps a fleet of nodes from reconnecting in lockstep.
                await asyncio.sleep(random.uniform(0, bound))
                try:
                    if not await self._reconnect(link):
                        return
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("pub/sub reconnect failed: %s", exc or type(exc).__name__)

    async def _read(self, link: _Link) -> None:
        tuning = self._tuning
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
            raw = PubSubReplies.of(pubsub.connection)
            if raw is not None:
                await self._read_raw(link, raw)  # returns only by raising
            message = await pubsub.get_message(timeout=tuning.poll)
            now = time.monotonic()
            if message is not None:
                last_heard, pinged = now, False
                link.connected = True
                self._handle(link, message)
            elif now - last_heard > tuning.dead_after:
                raise ConnectionError(f"no answer on pub/sub for {tuning.dead_after:g}s")
            elif now - last_heard > tuning.ping_after and not pinged:
                await pubsub.ping()
                pinged = True

    async def _read_raw(self, link: _Link, raw: PubSubReplies) -> None:
        """`_read` on a real connection: every reply buffered per wake-up, messages handed on
        without redis-py's per-message machinery (hiredis_pubsub.py); on a busy link, a
        pause of `tuning.gather` between reads."""
        tuning = self._tuning
        pubsub = link.pubsub
        routes = self._routes
        on_message = self._inbox.on_message
        clock = time.monotonic
        gather = tuning.gather
        # A link starts gathering when events come closer than half the pause apart (so a
        # pause should collect two or more), and goes on while each pause does: at a lower
        # rate a pause would collect one event late, and cost the wake-up it was to save.
        start_within = gather / 2
        gathering = False
        last_heard = clock()
        pinged = False
        while True:
            # One timer per poll period rather than one per read: when it fires the silence
            # is judged as in `_read`, then reading goes on.
            try:
                async with asyncio.timeout(tuning.poll) as window:
                    while True:
                        replies = await raw.read()
                        now = clock()
                        if gathering:
                            gathering = len(replies) > 1
                        else:
                            gathering = now - last_heard < start_within
                        last_heard, pinged = now, False
                        link.connected = True
                        for reply in replies:
                            if type(reply) is list and reply[0] in _RAW_MESSAGES:
                                channel = reply[1].decode()
                                route = routes.get(channel)
                                if route is not None and route.link is link:
                                    on_message(channel, reply[2])
                            elif isinstance(reply, Exception):
                                raise reply  # as get_message raises an error reply
                            else:
                                # Confirmations, unsubscribes, pongs: through redis-py, which
                                # also forgets what was unsubscribed.
                                message = await pubsub.handle_message(reply)
                                if message is not None:
                                    self._handle(link, message)
                        if gathering:
                            await raw.gather(gather)
            except TimeoutError:
                if not window.expired():
                    raise
            now = clock()
            if now - last_heard > tuning.dead_after:
                raise ConnectionError(f"no answer on pub/sub for {tuning.dead_after:g}s")
            if now - last_heard > tuning.ping_after and not pinged:
                await pubsub.ping()
                pinged = True

    async def _reconnect(self, link: _Link) -> bool:
        """Replace a failed link; False if none of its channels belong on its shard any more."""
        # In a cluster the link's primary may have failed over: channels go where they are
        # owned now.
        await self._links.refresh()
        async with link.lock:
            old = link.pubsub
            if any(self._links.shard_of(c) == link.shard for c in link.channels):
                link.pubsub = self._open(link.shard)
            elif self._by_shard.get(link.shard) is link:
                del self._by_shard[link.shard]  # retired: a later subscribe opens a new one
            channels, link.channels = list(link.channels), set()
            link.unconfirmed.clear()
            try:
                await old.aclose()
            except Exception as exc:
                log.debug("closing the old pub/sub connection: %s", exc)
        await self._resubscribe(channels)
        self.reconnects += 1
        link.connected = True
        log.warning("pub/sub reconnected%s; resubscribed %d studies", _on(link), len(channels))
        return self._by_shard.get(link.shard) is link

    async def _relocate(self, channel: str) -> None:
        """Follow a channel whose slot moved to another primary."""
        try:
            await self._links.refresh()
            route = self._routes.get(channel)
            if route is None:
                return
            route.link.channels.discard(channel)
            await self._resubscribe([channel])
            log.warning("study channel %s moved to shard %s", channel, route.link.shard)
        except Exception as exc:
            log.error("could not follow channel %s to its new shard: %s", channel, exc)

    async def _resubscribe(self, channels: list[str]) -> None:
        """Subscribe channels again where they are owned now; each is resynced once confirmed.

        A channel stays listed on its new link if this fails, so the next reconnect of that
        link subscribes it again. Every group is tried; the first failure is raised after.
        """
        groups: dict[_Link, list[str]] = {}
        for channel in channels:
            route = self._routes.get(channel)
            if route is None:
                continue  # unsubscribed meanwhile
            route.resync_due = True
            route.link = self._link(self._links.shard_of(channel))
            groups.setdefault(route.link, []).append(channel)
        failure: Exception | None = None
        for target, group in groups.items():
            async with target.lock:
                current = self._by_shard.get(target.shard) is target
                # Only what is still routed here: an unsubscribe may have come first.
                group = [c for c in group if self._routed_to(c, target)]
                if current and group:
                    self._attach(target, group)
                    try:
                        await self._send(target, "subscribe", group)
                        target.wakeup.set()
                    except Exception as exc:
                        failure = failure or exc
            if not current:
                await self._resubscribe(group)  # retired while we waited for it
        if failure is not None:
            raise failure

    def _routed_to(self, channel: str, link: _Link) -> bool:
        route = self._routes.get(channel)
        return route is not None and route.link is link

    def _handle(self, link: _Link, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind in _CONFIRMS:
            self._confirmed(link, channel)
        elif kind == "sunsubscribe" and channel in link.channels:
            # Not asked for: the slot moved (or the primary became a replica).
            self._spawn(self._relocate(channel))
        elif kind in _MESSAGES and self._routed_to(channel, link):
            self._inbox.on_message(channel, message["data"])

    def _confirmed(self, link: _Link, channel: str) -> None:
        owed = link.unconfirmed.get(channel, 0) - 1
        if owed > 0:
            link.unconfirmed[channel] = owed
            return
        link.unconfirmed.pop(channel, None)
        route = self._routes.get(channel)
        if route is None or route.link is not link:
            return
        route.ready.set()
        if route.resync_due:
            route.resync_due = False
            self._inbox.on_resubscribed(channel)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_links(self) -> None:
        tasks = [link.task for link in self._by_shard.values() if link.task is not None]
        for link in self._by_shard.values():
            link.task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop reading and close every link (at shutdown)."""
        for task in tuple(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop_links()
        links, self._by_shard = list(self._by_shard.values()), {}
        for link in links:
            await link.pubsub.aclose()


async def _resubscribe_nothing(pubsub: Any, connection: Any) -> None:
    return None


def _on(link: _Link) -> str:
    return f" (shard {link.shard})" if link.shard else ""


if TYPE_CHECKING:
    # Static proof that PubSubLinks keeps the fan-out's contract (mypy checks every member).
    _subscriptions: type[Subscriptions] = PubSubLinks
