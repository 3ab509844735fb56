"""Pub/sub links losing their connection: detection, resubscription, resync, delivery after.

Through a Fanout, as the node uses them, plus the pieces of the link lifecycle on their own
(backoff bounds, redis-py's own reconnect kept from resubscribing). On a real Redis the
fan-out's own connection (and only it: other tests share the server) is
killed with CLIENT KILL ID, found in CLIENT LIST by a unique client name. On fakeredis the whole
fake server goes offline (`FakeServer.connected = False`) and comes back.
Detection and recovery times are printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from presence_svc.codec import Outgoing, encode_envelope, json_text
from presence_svc.fanout import Fanout
from presence_svc.redis.hiredis_pubsub import PubSubReplies
from presence_svc.redis.keys import Keys
from presence_svc.redis.links import SingleLinks
from presence_svc.redis.pubsub import LinkTuning, PubSubLinks
from tests.support.recorder import Recorder
from tests.support.tasks import stop
from tests.support.waiting import eventually_async

WAIT = 5.0
LOST = "pub/sub connection lost"
FAILED = "pub/sub reconnect failed"
LOGGER = "presence_svc.redis.pubsub"
DEFAULT = LinkTuning()
PING_AFTER, DEAD_AFTER = DEFAULT.ping_after, DEFAULT.dead_after


class Harness:
    """A running Fanout whose resync answers with a snapshot carrying a rising floor."""

    def __init__(
        self, fanout_client: Any, publisher: Any, keys: Keys, tuning: LinkTuning | None = None
    ) -> None:
        self.publisher = publisher
        self.keys = keys
        self.resyncs: list[str] = []
        self.floor = 100
        # Runs between reading a snapshot and handing it out (to race an event with it).
        self.after_read: Callable[[str], Awaitable[None]] | None = None
        self.links = KeptLinks(fanout_client)
        links = self.links
        self.fanout = Fanout(
            lambda inbox: PubSubLinks(links, inbox, tuning), keys.channel, self.resync
        )
        self.task: asyncio.Task[None] = asyncio.create_task(self.fanout.run())

    async def resync(self, study: str) -> Outgoing:
        self.resyncs.append(study)
        self.floor += 1
        text = json_text({"type": "presence.snapshot", "data": {"study_id": study}})
        snapshot = Outgoing(None, text, floor=self.floor)
        if self.after_read is not None:
            await self.after_read(study)
        return snapshot

    async def event(self, study: str, seq: int) -> int:
        data = {"user_id": "u1", "study_id": study, "status": "active", "seq": seq}
        payload = encode_envelope("presence.user_joined", data)
        receivers: int = await self.publisher.publish(self.keys.channel(study), payload)
        return receivers

    async def numsub(self, study: str) -> int:
        [(_, count)] = await self.publisher.pubsub_numsub(self.keys.channel(study))
        return int(count)

    async def close(self) -> None:
        await stop(self.task)
        await self.fanout.close()


def lost_at(caplog: pytest.LogCaptureFixture, after: float) -> float:
    """Wall-clock time the fan-out logged the loss of its connection (first one after `after`)."""
    times = [r.created for r in caplog.records if LOST in r.getMessage() and r.created >= after]
    assert times, "the fan-out never logged the lost connection"
    return min(times)


def reconnects_failed(caplog: pytest.LogCaptureFixture, after: float) -> int:
    """How many reconnect attempts the fan-out logged as failed since `after` (wall clock)."""
    return sum(r.created >= after and FAILED in r.getMessage() for r in caplog.records)


# --- real Redis: CLIENT KILL ------------------------------------------------------------------


@dataclass
class RealSetup:
    harness: Harness
    admin: Any
    name: str


def pubsub_client(url: str, name: str, protocol: int = 2) -> Any:
    """Built like redis/client.py's pub/sub client: no silent reconnects inside redis-py, and
    RESP2, whose links are read raw (hiredis_pubsub.py); RESP3 ones through get_message."""
    return aioredis.Redis.from_url(
        url,
        client_name=name,
        protocol=protocol,
        socket_connect_timeout=2,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
    )


# Each real-Redis test runs on both ways a link reads: raw (RESP2, as the node's links) and
# through redis-py's PubSub.get_message (the fallback, here on RESP3): the `protocol` fixture.


OpenReal = Callable[[LinkTuning | None], Awaitable[RealSetup]]


@pytest.fixture(params=[2, 3], ids=["raw", "get_message"])
def protocol(request: pytest.FixtureRequest) -> int:
    """The links' RESP version: 2 is read raw (hiredis_pubsub.py), 3 through get_message."""
    value: int = request.param
    return value


@pytest.fixture
async def open_real(
    cleanup_real_redis: str, key_prefix: str, protocol: int
) -> AsyncIterator[OpenReal]:
    """Opens running fan-outs on the real Redis (closed after the test), each tuned as asked."""
    async with contextlib.AsyncExitStack() as stack:

        async def open_one(tuning: LinkTuning | None) -> RealSetup:
            name = f"fanout-{uuid.uuid4().hex[:12]}"
            fanout_client = pubsub_client(cleanup_real_redis, name, protocol)
            stack.push_async_callback(fanout_client.aclose)
            admin = aioredis.Redis.from_url(cleanup_real_redis)
            stack.push_async_callback(admin.aclose)
            harness = Harness(fanout_client, admin, Keys(key_prefix), tuning)
            stack.push_async_callback(harness.close)
            return RealSetup(harness, admin, name)

        yield open_one


@pytest.fixture
async def real(open_real: OpenReal) -> RealSetup:
    return await open_real(None)


async def connections_named(admin: Any, name: str) -> list[dict[str, Any]]:
    return [c for c in await admin.client_list() if c.get("name") == name]


async def kill_fanout_connection(setup: RealSetup, channels: int) -> float:
    """CLIENT KILL the fan-out's pub/sub connection; returns the wall-clock time of the kill."""
    [conn] = await connections_named(setup.admin, setup.name)
    assert int(conn["sub"]) == channels, conn  # it is the fan-out's pub/sub connection
    killed_at = time.time()
    assert await setup.admin.client_kill_filter(_id=conn["id"]) == 1
    return killed_at


async def test_killed_pubsub_connection_is_replaced_and_resynced(
    real: RealSetup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    h = real.harness
    a, b, c = Recorder(), Recorder(), Recorder()
    await h.fanout.add("s1", a)
    await h.fanout.add("s1", b)
    await h.fanout.add("s2", c)
    assert await h.event("s1", 1) == 1
    assert await h.event("s2", 1) == 1
    await a.wait_for(1)
    await b.wait_for(1)
    await c.wait_for(1)
    [before] = await connections_named(real.admin, real.name)

    for round_ in (1, 2):
        counts = (len(a.events), len(b.events), len(c.events))
        killed_at = await kill_fanout_connection(real, 2)
        killed_mono = time.monotonic()
        await a.wait_for(counts[0] + 1)
        await b.wait_for(counts[1] + 1)
        await c.wait_for(counts[2] + 1)
        detected = lost_at(caplog, killed_at) - killed_at
        recovered = max(r.times[-1] for r in (a, b, c)) - killed_mono
        print(
            f"\n[real redis, kill {round_}] detected after {detected * 1000:.1f} ms, "
            f"resync delivered after {recovered * 1000:.1f} ms"
        )
        assert detected < 5.0
        assert recovered < 5.0

        # Each study was resynced once per reconnect, and every subscriber got its snapshot.
        assert sorted(h.resyncs) == sorted(["s1", "s2"] * round_)
        for rec in (a, b, c):
            assert rec.events[-1].floor is not None
            assert len(rec.snapshots()) == round_
        assert a.events[-1] is b.events[-1]  # one snapshot per study, shared by its subscribers
        assert a.events[-1].floor != c.events[-1].floor
        assert h.fanout.reconnects == round_
        assert h.fanout.connected

        # One fresh connection, subscribed once to each channel; events flow again.
        [after] = await connections_named(real.admin, real.name)
        assert after["id"] != before["id"]
        assert int(after["sub"]) == 2
        before = after
        assert await h.numsub("s1") == 1
        assert await h.numsub("s2") == 1
        assert await h.event("s1", 1 + round_) == 1
        assert await h.event("s2", 1 + round_) == 1
        await a.wait_for(counts[0] + 2)
        await b.wait_for(counts[1] + 2)
        await c.wait_for(counts[2] + 2)

    assert a.seqs() == b.seqs() == c.seqs() == [1, 2, 3]
    assert h.fanout.dropped_messages == 0


async def test_an_event_published_during_a_resync_reaches_sockets_after_its_snapshot(
    real: RealSetup,
) -> None:
    h = real.harness
    rec, marker = Recorder(), Recorder()
    await h.fanout.add("s1", rec)
    await h.fanout.add("s2", marker)

    async def publish_an_event(study: str) -> None:
        # s1's snapshot is read, then an event is published and reaches the node before the
        # snapshot's reply is handled: its subscribers must still see the snapshot first.
        if study != "s1":
            return
        assert await h.event("s1", 7) == 1
        # Published after it, s2's event comes after it on the node's one connection: once
        # s2's subscriber has it (after s2's own snapshot), s1's event has been read.
        assert await h.event("s2", 8) == 1
        await marker.wait_for(2)

    h.after_read = publish_an_event
    await kill_fanout_connection(real, 2)
    await rec.wait_for(2)
    snapshot, event = rec.events
    assert snapshot.floor is not None and event.seq == 7
    assert marker.seqs() == [8]


async def test_kill_with_no_study_subscribed_then_subscribe_again(
    real: RealSetup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    h = real.harness
    a = Recorder()
    await h.fanout.add("s1", a)
    await h.fanout.remove("s1", a)
    assert h.fanout.studies == 0
    killed_at = await kill_fanout_connection(real, 0)
    await eventually_async(lambda: h.fanout.reconnects == 1, what="the connection is replaced")
    assert lost_at(caplog, killed_at) - killed_at < 5.0
    assert h.resyncs == []

    b = Recorder()
    await h.fanout.add("s1", b)
    assert await h.event("s1", 5) == 1
    [event] = await b.wait_for(1)
    assert (event.seq, event.floor) == (5, None)
    assert a.events == []


async def test_a_quiet_healthy_connection_is_kept(
    open_real: OpenReal, caplog: pytest.LogCaptureFixture
) -> None:
    """No events for several dead_after periods: answered pings keep the connection."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    real = await open_real(LinkTuning(ping_after=0.1, dead_after=0.4))
    h = real.harness
    a = Recorder()
    await h.fanout.add("s1", a)
    [before] = await connections_named(real.admin, real.name)
    # What must hold is that nothing happens while time passes, so there is nothing to await:
    # a bounded wait of several dead_after periods (the links' clock is the real one).
    await asyncio.sleep(1.5)
    assert h.fanout.reconnects == 0
    assert not [r for r in caplog.records if LOST in r.getMessage()]
    [after] = await connections_named(real.admin, real.name)
    assert after["id"] == before["id"]
    assert after["cmd"] == "ping", after  # it was quiet but pinged, and kept
    assert await h.event("s1", 1) == 1
    await a.wait_for(1)
    assert h.resyncs == []


# --- real Redis through a proxy: the connection goes silent ------------------------------------


class FreezingProxy:
    """A loopback TCP proxy to Redis whose open connections can be frozen: bytes stop flowing
    both ways while the sockets stay open (a silent partition: no error, no EOF). Connections
    opened after a freeze work normally."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._frozen: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> int:
        """Freeze every connection open now; returns how many."""
        for flag in self._frozen:
            flag.set()
        count = len(self._frozen)
        self._frozen = []
        return count

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]
        frozen = asyncio.Event()
        self._frozen.append(frozen)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, frozen))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, frozen: asyncio.Event
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # swallow everything from now on, silently
                dst.write(data)
                await dst.drain()
        if not frozen.is_set():
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in tuple(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()


async def test_silent_pubsub_connection_is_replaced_after_unanswered_pings(
    cleanup_real_redis: str, key_prefix: str, protocol: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    admin = aioredis.Redis.from_url(cleanup_real_redis)
    host, port = (
        admin.connection_pool.connection_kwargs["host"],
        admin.connection_pool.connection_kwargs["port"],
    )
    proxy = FreezingProxy(host, int(port))
    await proxy.start()
    fanout_client = aioredis.Redis(
        host="127.0.0.1",
        port=proxy.port,
        protocol=protocol,
        socket_connect_timeout=2,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
    )
    h = Harness(fanout_client, admin, Keys(key_prefix))
    try:
        a = Recorder()
        await h.fanout.add("s1", a)
        assert await h.event("s1", 1) == 1
        await a.wait_for(1)

        frozen_at = time.time()
        frozen_mono = time.monotonic()
        assert proxy.freeze() == 1
        await a.wait_for(2, within=DEAD_AFTER + WAIT)
        detected = lost_at(caplog, frozen_at) - frozen_at
        recovered = a.times[-1] - frozen_mono
        print(
            f"\n[silent connection] detected after {detected * 1000:.1f} ms, "
            f"resync delivered after {recovered * 1000:.1f} ms"
        )
        assert DEAD_AFTER <= detected < 5.0
        assert recovered < 5.0
        assert a.events[-1].floor is not None
        assert h.resyncs == ["s1"]
        assert h.fanout.reconnects == 1
        # The frozen connection is still open on the server, so NUMSUB may count it: what
        # matters is that events reach the subscriber exactly once through the new one. A
        # duplicate of 2 would come on that connection before 3, published after it.
        assert await h.event("s1", 2) >= 1
        assert await h.event("s1", 3) >= 1
        await a.wait_for(4)
        assert a.seqs() == [1, 2, 3]
    finally:
        await h.close()
        await fanout_client.aclose()
        await proxy.close()
        await admin.aclose()


# --- fakeredis: the whole server goes offline and comes back ----------------------------------


async def test_fakeredis_outage_is_detected_and_resynced(
    key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    h = Harness(client, client, Keys(key_prefix))
    try:
        a, c = Recorder(), Recorder()
        await h.fanout.add("s1", a)
        await h.fanout.add("s2", c)
        assert await h.event("s1", 1) == 1
        await a.wait_for(1)

        down_at = time.time()
        server.connected = False
        # No read error here: the fan-out notices through its unanswered ping.
        await eventually_async(
            lambda: not h.fanout.connected, PING_AFTER + WAIT, "the outage is noticed"
        )
        detected = lost_at(caplog, down_at) - down_at
        assert detected < DEAD_AFTER + 1.0
        await eventually_async(
            lambda: reconnects_failed(caplog, down_at) >= 2, WAIT, "two reconnect attempts fail"
        )
        assert h.fanout.reconnects == 0
        assert not h.fanout.connected

        up_at = time.monotonic()
        server.connected = True
        await a.wait_for(2)
        await c.wait_for(1)
        recovered = max(a.times[-1], c.times[-1]) - up_at
        print(
            f"\n[fakeredis outage] detected after {detected * 1000:.1f} ms, "
            f"resync delivered {recovered * 1000:.1f} ms after the server came back"
        )
        assert recovered < WAIT
        assert sorted(h.resyncs) == ["s1", "s2"]
        assert a.events[-1].floor is not None
        assert c.events[-1].floor is not None
        assert h.fanout.reconnects == 1
        assert h.fanout.connected

        # (fakeredis keeps a closed pub/sub's subscriptions, so PUBLISH may count the old one)
        # A duplicate of 2 (the old subscription still delivering) would come before 3.
        for seq in (2, 3):
            assert await h.event("s1", seq) >= 1
            assert await h.event("s2", seq) >= 1
        await a.wait_for(4)
        await c.wait_for(3)
        assert a.seqs() == [1, 2, 3]
        assert c.seqs() == [2, 3]
    finally:
        server.connected = True
        await h.close()
        await client.aclose()


# --- the link lifecycle's pieces on their own --------------------------------------------------


def test_reconnect_backoff_doubles_up_to_its_cap() -> None:
    tuning = LinkTuning(backoff_first=0.1, backoff_cap=1.0)
    assert list(itertools.islice(tuning.backoffs(), 6)) == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert list(itertools.islice(DEFAULT.backoffs(), 8))[-2:] == [5.0, 5.0]


def test_a_read_waits_short_enough_to_ping_on_time() -> None:
    assert DEFAULT.poll == 0.5
    assert LinkTuning(ping_after=0.1, dead_after=0.4).poll == 0.05


@dataclass(eq=False)
class Inbox:
    messages: list[tuple[str, Any]]
    resubscribed: list[str]

    def on_message(self, channel: str, data: Any) -> None:
        self.messages.append((channel, data))

    def on_resubscribed(self, channel: str) -> None:
        self.resubscribed.append(channel)


class KeptLinks(SingleLinks):
    """SingleLinks that keep every PubSub they open, for the test to reach into."""

    def __init__(self, redis: Any) -> None:
        super().__init__(redis)
        self.opened: list[Any] = []

    def open(self, shard: str) -> Any:
        pubsub = super().open(shard)
        self.opened.append(pubsub)
        return pubsub


async def test_redis_py_reconnecting_a_link_resubscribes_nothing(
    cleanup_real_redis: str, key_prefix: str, protocol: int
) -> None:
    """redis-py reconnects a failed pub/sub connection itself; its channels stay unsubscribed
    (the links replace the connection and resubscribe, knowing that events were lost)."""
    name = f"pubsub-{uuid.uuid4().hex[:12]}"
    client = pubsub_client(cleanup_real_redis, name, protocol)
    admin = aioredis.Redis.from_url(cleanup_real_redis)
    links = KeptLinks(client)
    inbox = Inbox([], [])
    pubsub_links = PubSubLinks(links, inbox)
    reading = asyncio.create_task(pubsub_links.run())
    try:
        channel = Keys(key_prefix).channel("s1")
        await pubsub_links.subscribe(channel)
        await stop(reading)  # nobody reads: the reconnect below is redis-py's alone
        [pubsub] = links.opened
        [before] = await connections_named(admin, name)
        assert int(before["sub"]) == 1
        await pubsub.connection.disconnect()
        await pubsub.connection.connect()  # runs the connection's on-connect callbacks
        [after] = await connections_named(admin, name)
        assert after["id"] != before["id"]
        assert int(after["sub"]) == 0
        assert await admin.publish(channel, b"x") == 0
    finally:
        await stop(reading)
        await pubsub_links.close()
        await client.aclose()
        await admin.aclose()


# --- many replies per read ---------------------------------------------------------------------


async def test_a_burst_read_at_once_reaches_each_subscriber_once_in_order(
    real: RealSetup, protocol: int
) -> None:
    """Hundreds of events on one connection arrive in few reads (raw: every reply of a read
    at once): each subscriber gets each of its study's events once, in order."""
    h = real.harness
    recorders = {study: Recorder() for study in ("s1", "s2", "s3")}
    for study, rec in recorders.items():
        await h.fanout.add(study, rec)
    [pubsub] = h.links.opened
    assert (PubSubReplies.of(pubsub.connection) is not None) == (protocol == 2)
    pipe = real.admin.pipeline(transaction=False)
    for seq in range(1, 201):
        for study in recorders:
            data = {"user_id": "u1", "study_id": study, "status": "active", "seq": seq}
            pipe.publish(h.keys.channel(study), encode_envelope("presence.cursor_moved", data))
    assert await pipe.execute() == [1] * 600
    for rec in recorders.values():
        await rec.wait_for(200)
    for rec in recorders.values():
        assert rec.seqs() == list(range(1, 201))
    assert h.fanout.dropped_messages == 0
    assert h.fanout.reconnects == 0


async def test_unsubscribed_channels_leave_nothing_in_redis_py(
    cleanup_real_redis: str, key_prefix: str, protocol: int
) -> None:
    """The raw reads hand confirmations to redis-py's handle_message, which forgets what was
    unsubscribed: a link that has carried many studies keeps none of them."""
    client = pubsub_client(cleanup_real_redis, f"pubsub-{uuid.uuid4().hex[:12]}", protocol)
    admin = aioredis.Redis.from_url(cleanup_real_redis)
    links = KeptLinks(client)
    inbox = Inbox([], [])
    pubsub_links = PubSubLinks(links, inbox)
    reading = asyncio.create_task(pubsub_links.run())
    keys = Keys(key_prefix)
    try:
        for round_ in range(3):
            channels = [keys.channel(f"s{round_}-{i}") for i in range(20)]
            for channel in channels:
                await pubsub_links.subscribe(channel)
            last = channels[-1]
            assert await admin.publish(last, b"x") == 1
            await eventually_async(
                lambda last=last: (last, b"x") in inbox.messages,
                WAIT,
                "the event arrives",
            )
            for channel in channels:
                await pubsub_links.unsubscribe(channel)
        [pubsub] = links.opened

        def forgotten() -> bool:
            return not pubsub.channels and not pubsub.pending_unsubscribe_channels

        await eventually_async(forgotten, WAIT, "redis-py forgets the unsubscribed channels")
        assert pubsub_links.reconnects == 0
        assert len(inbox.messages) == 3
    finally:
        await stop(reading)
        await pubsub_links.close()
        await client.aclose()
        await admin.aclose()


async def test_an_error_reply_on_a_raw_link_replaces_it(
    open_real: OpenReal, protocol: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An error reply fails the link as it fails get_message: replaced, resubscribed, resynced."""
    if protocol != 2:
        pytest.skip("RESP3 allows any command while subscribed: no error reply to provoke")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    real = await open_real(None)
    h = real.harness
    a = Recorder()
    await h.fanout.add("s1", a)
    [pubsub] = h.links.opened
    started = time.time()
    await pubsub.execute_command("GET", "x")  # refused in subscribed mode on RESP2
    [snapshot] = await a.wait_for(1)
    assert snapshot.floor is not None
    assert lost_at(caplog, started) >= started
    assert h.fanout.reconnects == 1
    assert await h.event("s1", 1) == 1
    await a.wait_for(2)
    assert a.seqs() == [1]


async def test_a_link_gathers_only_while_its_pauses_collect_several_events(
    cleanup_real_redis: str, key_prefix: str, protocol: int
) -> None:
    """A burst is gathered; events then coming more than half the pause apart (but less than
    a pause) are read as they come once a pause has collected only one, not a pause late each."""
    if protocol != 2:
        pytest.skip("only raw reads gather")
    gather, spacing = 0.1, 0.08
    client = pubsub_client(cleanup_real_redis, f"pubsub-{uuid.uuid4().hex[:12]}", protocol)
    admin = aioredis.Redis.from_url(cleanup_real_redis)
    heard: list[tuple[bytes, float]] = []

    class Timed(Inbox):
        def on_message(self, channel: str, data: Any) -> None:
            heard.append((data, time.monotonic()))

    pubsub_links = PubSubLinks(SingleLinks(client), Timed([], []), LinkTuning(gather=gather))
    running = asyncio.create_task(pubsub_links.run())
    channel = Keys(key_prefix).channel("s1")
    try:
        await pubsub_links.subscribe(channel)
        for n in range(20):  # a burst, one PUBLISH per round trip: gathered
            await admin.publish(channel, b"burst %d" % n)
        sent: dict[bytes, float] = {}
        for n in range(11):
            await asyncio.sleep(spacing)
            sent[b"slow %d" % n] = time.monotonic()
            await admin.publish(channel, b"slow %d" % n)
        await eventually_async(lambda: len(heard) == 31, WAIT, "every event arrives")
        assert [data for data, _ in heard[20:]] == list(sent)
        late = sorted(at - sent[data] for data, at in heard[21:])
        # Each would otherwise wait out most of a pause, 20 ms here: the middle one says which.
        assert late[len(late) // 2] < 0.01, late
    finally:
        await stop(running)
        await pubsub_links.close()
        await client.aclose()
        await admin.aclose()


async def test_a_busy_link_is_read_in_fewer_reads_than_messages(
    cleanup_real_redis: str, key_prefix: str, protocol: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events arriving one by one on a busy link wait for each other (LinkTuning.gather): far
    fewer reads than events, every event once and in order."""
    if protocol != 2:
        pytest.skip("only raw reads gather")
    reads = 0
    read = PubSubReplies.read

    async def counted(self: PubSubReplies) -> list[Any]:
        nonlocal reads
        reads += 1
        return await read(self)

    monkeypatch.setattr(PubSubReplies, "read", counted)
    client = pubsub_client(cleanup_real_redis, f"pubsub-{uuid.uuid4().hex[:12]}", protocol)
    admin = aioredis.Redis.from_url(cleanup_real_redis)
    inbox = Inbox([], [])
    pubsub_links = PubSubLinks(SingleLinks(client), inbox, LinkTuning(gather=0.2))
    running = asyncio.create_task(pubsub_links.run())
    channel = Keys(key_prefix).channel("s1")
    try:
        await pubsub_links.subscribe(channel)
        before = reads
        for n in range(50):  # one PUBLISH per round trip: fifty separate arrivals
            assert await admin.publish(channel, b"%d" % n) == 1
        await eventually_async(lambda: len(inbox.messages) == 50, WAIT, "every event arrives")
        assert inbox.messages == [(channel, b"%d" % n) for n in range(50)]
        assert reads - before <= 10, f"{reads - before} reads for 50 events"
    finally:
        await stop(running)
        await pubsub_links.close()
        await client.aclose()
        await admin.aclose()
