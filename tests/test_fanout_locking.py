"""Fanout on in-memory links that can stall: per-study locking, races, held events, no Redis.

`StubLinks` stands in for SingleLinks/ClusterLinks and its pub/sub objects for redis-py's: a
command may be made to hang (as on a primary that stopped answering), to fail, or to be
answered late, and a connection may break. The studies "slow" and "fast" live on two shards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from presence_svc.codec import Outgoing, encode_envelope, json_text
from presence_svc.fanout import Fanout
from presence_svc.redis.keys import Keys
from presence_svc.redis.pubsub import LinkTuning, PubSubLinks
from tests.support.recorder import Recorder
from tests.support.tasks import stop
from tests.support.waiting import eventually_async

KEYS = Keys("stub")
SOON = 2.0  # bound on what must not wait for anything (in memory, it takes microseconds)
TUNING = LinkTuning(subscribe_timeout=5.0, backoff_first=0.01, backoff_cap=0.05)


def channel(study: str) -> str:
    return KEYS.channel(study)


@dataclass(eq=False)
class StubPubSub:
    """The part of a redis-py PubSub the links use; replies queue up for get_message."""

    links: StubLinks
    shard: str
    connection: object | None = None
    on_connect: Any = None
    subscribed: set[str] = field(default_factory=set)
    commands: list[tuple[str, str]] = field(default_factory=list)
    replies: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    withheld: set[str] = field(default_factory=set)  # channels whose confirmation never comes
    broken: bool = False

    async def subscribe(self, *channels: str) -> None:
        await self._command("subscribe", channels)

    async def unsubscribe(self, *channels: str) -> None:
        await self._command("unsubscribe", channels)

    async def _command(self, verb: str, channels: tuple[str, ...]) -> None:
        self.connection = self.connection or object()
        for name in channels:
            await self.links.gate(verb, name)
            self.commands.append((verb, name))
            if verb == "subscribe":
                self.subscribed.add(name)
            else:
                self.subscribed.discard(name)
            if name not in self.withheld:
                self.replies.put_nowait({"type": verb, "channel": name.encode(), "data": 1})

    # redis-py's signature, which the links call.
    async def get_message(self, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109
        try:
            reply = await asyncio.wait_for(self.replies.get(), timeout)
        except TimeoutError:
            return None
        if reply is None or self.broken:
            raise ConnectionError("stub connection broken")
        return reply

    async def ping(self) -> None:
        self.replies.put_nowait({"type": "pong", "channel": None, "data": b""})

    def break_(self) -> None:
        self.broken = True
        self.replies.put_nowait(None)

    async def aclose(self) -> None:
        self.connection = None


@dataclass(eq=False)
class StubLinks:
    """Links over StubPubSub: study "slow" on shard "one", everything else on "two"."""

    sharded = False
    opened: list[StubPubSub] = field(default_factory=list)
    hanging: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    entered: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    failing: set[tuple[str, str]] = field(default_factory=set)
    # Channels whose confirmation the first connection of a shard never sends.
    withheld_on_first: set[str] = field(default_factory=set)

    def shard_of(self, name: str) -> str:
        return "one" if name == channel("slow") else "two"

    def batches(self, channels: list[str]) -> list[list[str]]:
        return [channels]

    def open(self, shard: str) -> StubPubSub:
        pubsub = StubPubSub(self, shard)
        if not self.on(shard):
            pubsub.withheld = set(self.withheld_on_first)
        self.opened.append(pubsub)
        return pubsub

    async def refresh(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def hang(self, verb: str, name: str) -> asyncio.Event:
        """Make `verb name` wait, once sent, until the returned event is set."""
        self.entered[verb, name] = asyncio.Event()
        release = self.hanging[verb, name] = asyncio.Event()
        return release

    async def gate(self, verb: str, name: str) -> None:
        if (verb, name) in self.failing:
            raise ConnectionError(f"stub: {verb} {name} failed")
        release = self.hanging.get((verb, name))
        if release is not None:
            self.entered[verb, name].set()
            await release.wait()

    def on(self, shard: str) -> list[StubPubSub]:
        return [p for p in self.opened if p.shard == shard]

    def publish(self, study: str, seq: int) -> int:
        data = {"user_id": "u1", "study_id": study, "status": "active", "seq": seq}
        message = {
            "type": "message",
            "channel": channel(study).encode(),
            "data": encode_envelope("presence.user_joined", data),
        }
        receivers = [p for p in self.opened if channel(study) in p.subscribed and not p.broken]
        for pubsub in receivers:
            pubsub.replies.put_nowait(message)
        return len(receivers)


class Stub:
    def __init__(self) -> None:
        self.links = StubLinks()
        self.resyncs: list[str] = []
        self.resync_gates: dict[str, asyncio.Event] = {}  # a study's resync waits for its gate
        # A study listed here answers each resync with a future of its own, set by the test
        # (in any order); `answered` names each study whose resync has returned.
        self.answers: dict[str, list[asyncio.Future[Outgoing]]] = {}
        self.answered: list[str] = []
        self.fanout = Fanout(
            lambda inbox: PubSubLinks(self.links, inbox, TUNING), KEYS.channel, self.resync
        )

    async def resync(self, study: str) -> Outgoing:
        self.resyncs.append(study)
        if study in self.resync_gates:
            await self.resync_gates[study].wait()
        if study in self.answers:
            answer = asyncio.get_running_loop().create_future()
            self.answers[study].append(answer)
            snapshot: Outgoing = await answer
            # Fanout goes on from here without yielding: once the test sees this, whatever
            # this resync delivers has been delivered.
            self.answered.append(study)
            return snapshot
        return snapshot_at(0)


def snapshot_at(floor: int) -> Outgoing:
    return Outgoing(None, json_text({"type": "presence.snapshot", "data": {}}), floor=floor)


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    s = Stub()
    task = asyncio.create_task(s.fanout.run())
    try:
        yield s
    finally:
        await stop(task)
        await s.fanout.close()


async def test_a_subscribe_stuck_on_one_shard_does_not_delay_other_studies(stub: Stub) -> None:
    release = stub.links.hang("subscribe", channel("slow"))
    slow = asyncio.create_task(stub.fanout.add("slow", Recorder()))
    await stub.links.entered["subscribe", channel("slow")].wait()

    fast = Recorder()
    await asyncio.wait_for(stub.fanout.add("fast", fast), SOON)
    assert stub.links.publish("fast", 1) == 1
    await fast.wait_for(1)
    await asyncio.wait_for(stub.fanout.remove("fast", fast), SOON)
    assert not slow.done()

    release.set()
    await asyncio.wait_for(slow, SOON)
    assert stub.fanout.studies == 1
    assert stub.links.publish("slow", 1) == 1


async def test_an_unsubscribe_stuck_on_one_shard_does_not_delay_other_studies(
    stub: Stub,
) -> None:
    leaving = Recorder()
    await stub.fanout.add("slow", leaving)
    release = stub.links.hang("unsubscribe", channel("slow"))
    removing = asyncio.create_task(stub.fanout.remove("slow", leaving))
    await stub.links.entered["unsubscribe", channel("slow")].wait()

    fast = Recorder()
    await asyncio.wait_for(stub.fanout.add("fast", fast), SOON)
    await asyncio.wait_for(stub.fanout.remove("fast", fast), SOON)
    assert not removing.done()
    release.set()
    await asyncio.wait_for(removing, SOON)
    assert stub.fanout.studies == 0


async def test_a_study_waiting_for_its_confirmation_does_not_delay_one_on_the_same_link(
    stub: Stub,
) -> None:
    # Both studies share shard "two": one connection, and a's confirmation never comes on it.
    stub.links.withheld_on_first.add(channel("a"))
    waiting = asyncio.create_task(stub.fanout.add("a", Recorder()))
    await eventually_async(lambda: stub.links.on("two"), what="the link opened")
    [pubsub] = stub.links.on("two")
    await eventually_async(lambda: ("subscribe", channel("a")) in pubsub.commands)

    b = Recorder()
    await asyncio.wait_for(stub.fanout.add("b", b), SOON)
    await asyncio.wait_for(stub.fanout.remove("b", b), SOON)
    assert not waiting.done()
    await stop(waiting)
    assert stub.fanout.studies == 0


async def test_add_while_the_last_remove_of_the_study_is_stuck_ends_subscribed(
    stub: Stub,
) -> None:
    old, new = Recorder(), Recorder()
    await stub.fanout.add("s1", old)
    release = stub.links.hang("unsubscribe", channel("s1"))
    removing = asyncio.create_task(stub.fanout.remove("s1", old))
    await stub.links.entered["unsubscribe", channel("s1")].wait()
    adding = asyncio.create_task(stub.fanout.add("s1", new))
    release.set()
    await asyncio.wait_for(asyncio.gather(removing, adding), SOON)

    [pubsub] = stub.links.on("two")
    verbs = [verb for verb, name in pubsub.commands if name == channel("s1")]
    assert verbs == ["subscribe", "unsubscribe", "subscribe"]  # in that order on the wire
    assert stub.fanout.studies == 1
    assert stub.links.publish("s1", 1) == 1
    assert [e.seq for e in await new.wait_for(1)] == [1]
    assert old.events == []


async def test_reconnect_while_adding_confirms_on_the_new_connection(stub: Stub) -> None:
    rec = Recorder()
    stub.links.withheld_on_first.add(channel("s1"))
    adding = asyncio.create_task(stub.fanout.add("s1", rec))
    await eventually_async(lambda: stub.links.on("two"), what="the link opened")
    [first] = stub.links.on("two")
    await eventually_async(lambda: ("subscribe", channel("s1")) in first.commands)

    first.break_()  # before its confirmation: the new connection subscribes it again
    await asyncio.wait_for(adding, SOON)
    assert stub.fanout.reconnects == 1
    [_, second] = stub.links.on("two")
    assert second.commands == [("subscribe", channel("s1"))]
    # It counts as resubscribed: whatever the first connection carried is lost.
    [snapshot] = await rec.wait_for(1)
    assert snapshot.floor is not None and stub.resyncs == ["s1"]
    assert stub.links.publish("s1", 4) == 1
    assert [e.seq for e in await rec.wait_for(2)][1:] == [4]


async def test_events_read_during_a_resync_follow_its_snapshot(stub: Stub) -> None:
    rec, other = Recorder(), Recorder()
    await stub.fanout.add("s1", rec)
    await stub.fanout.add("other", other)
    gate = stub.resync_gates["s1"] = asyncio.Event()
    [first] = stub.links.on("two")
    first.break_()
    await other.wait_for(1)  # its snapshot: the channels are back
    assert stub.links.publish("s1", 8) == 1
    assert stub.links.publish("other", 9) == 1
    await other.wait_for(2)  # read after s1's event, on the same connection
    assert rec.events == []  # held until the snapshot is out
    gate.set()
    snapshot, event = await rec.wait_for(2)
    assert snapshot.floor is not None and event.seq == 8


@pytest.mark.parametrize("first_done", ["older", "newer"])
async def test_overlapping_resyncs_deliver_the_newest_snapshot_then_every_held_event(
    stub: Stub, first_done: str
) -> None:
    """s1 is resubscribed twice while its first snapshot is read: whichever resync finishes
    first, no event reaches the socket before a snapshot older than it (the socket would take
    that snapshot as its state and lose the event), and every held event follows the snapshot
    once."""
    rec, other = Recorder(), Recorder()  # `other` (resynced at once) marks what has been read
    await stub.fanout.add("s1", rec)
    await stub.fanout.add("other", other)
    answers = stub.answers["s1"] = []
    marks = 0

    async def publish(seq: int) -> None:
        nonlocal marks
        assert stub.links.publish("s1", seq) == 1
        assert stub.links.publish("other", 100 + seq) == 1
        marks += 1
        await other.wait_for(marks)  # read after s1's event, on the same connection

    async def lose_the_link(resyncs: int) -> None:
        nonlocal marks
        stub.links.on("two")[-1].break_()
        await eventually_async(lambda: len(answers) == resyncs, what=f"resync {resyncs} asked")
        marks += 1
        await other.wait_for(marks)  # its snapshot: both channels are back

    async def answer(index: int, floor: int) -> None:
        done = len(stub.answered) + 1
        answers[index].set_result(snapshot_at(floor))
        await eventually_async(lambda: len(stub.answered) == done, what=f"resync {index} done")

    await lose_the_link(1)
    await publish(5)
    await lose_the_link(2)
    await publish(7)
    # The first resync's snapshot was read before seq 5, the second's after seq 7 (the
    # Coalescer reads a resync's snapshot after it was asked for); 9 comes after both reads.
    older, newer = (0, 4), (1, 7)
    first, second = (older, newer) if first_done == "older" else (newer, older)
    await answer(*first)
    await publish(9)
    await answer(*second)

    events = rec.events
    for i, event in enumerate(events):
        for later in events[i + 1 :]:
            assert not (
                event.seq is not None and later.floor is not None and later.floor < event.seq
            ), f"event {event.seq} went out before a snapshot at {later.floor}"
    # The newest snapshot, whichever finished last (the older one misses what the second
    # loss lost), then every held event once, in the order read.
    assert [e.floor for e in rec.snapshots()] == [7]
    assert events[0].floor == 7 and [e.seq for e in events[1:]] == [5, 7, 9]
    # Nothing is held any more: the next event goes straight out.
    await publish(11)
    assert [e.seq for e in await rec.wait_for(5)][4:] == [11]


async def test_a_failed_subscribe_leaves_nothing_behind(stub: Stub) -> None:
    stub.links.failing.add(("subscribe", channel("s1")))
    with pytest.raises(ConnectionError):
        await stub.fanout.add("s1", Recorder())
    assert stub.fanout.studies == 0
    stub.links.failing.clear()
    rec = Recorder()
    await stub.fanout.add("s1", rec)
    assert stub.links.publish("s1", 1) == 1
    await rec.wait_for(1)


async def test_subscription_adds_for_the_block_and_removes_after(stub: Stub) -> None:
    rec = Recorder()
    async with stub.fanout.subscription("s1", rec):
        assert stub.fanout.studies == 1
        assert stub.links.publish("s1", 1) == 1
        await rec.wait_for(1)
    assert stub.fanout.studies == 0
    with pytest.raises(RuntimeError, match="inside"):
        async with stub.fanout.subscription("s1", rec):
            raise RuntimeError("inside")
    assert stub.fanout.studies == 0
    [pubsub] = stub.links.on("two")
    assert [verb for verb, _ in pubsub.commands] == ["subscribe", "unsubscribe"] * 2
    assert stub.links.publish("s1", 2) == 0
