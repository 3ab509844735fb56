"""Fanout, the registry of local subscribers: subscribe on first, unsubscribe on last, delivery.

On fakeredis and a real Redis (subscriptions, delivery, bad messages); what needs Redis to
stall (per-study locking, races with a reconnect, events held during a resync) is on in-memory
links in tests/test_fanout_locking.py. The links' own lifecycle is tests/redis/test_pubsub.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from presence_svc.codec import Outgoing, encode_envelope, json_text
from presence_svc.fanout import Fanout
from presence_svc.redis.keys import Keys
from presence_svc.redis.links import SingleLinks
from presence_svc.redis.pubsub import LinkTuning, PubSubLinks
from tests.conftest import open_redis
from tests.support.recorder import Recorder
from tests.support.tasks import stop
from tests.support.waiting import eventually_async


@pytest.fixture(params=["fake", "real"])
async def any_redis(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Any]:
    """Single-Redis clients only: this module tests what a cluster has per shard."""
    async with open_redis(request.param, request, key_prefix) as client:
        yield client


class Harness:
    def __init__(self, redis: Any, keys: Keys, tuning: LinkTuning | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.resyncs: list[str] = []
        links = SingleLinks(redis)
        self.fanout = Fanout(
            lambda inbox: PubSubLinks(links, inbox, tuning), keys.channel, self.resync
        )
        self.task: asyncio.Task[None] | None = None

    async def resync(self, study: str) -> Outgoing:
        self.resyncs.append(study)
        return Outgoing(None, json_text({"type": "presence.snapshot", "data": {}}), floor=0)

    def run(self) -> None:
        self.task = asyncio.create_task(self.fanout.run())

    async def publish(self, study: str, payload: bytes) -> int:
        receivers: int = await self.redis.publish(self.keys.channel(study), payload)
        return receivers

    async def event(self, study: str, seq: int, user: str = "u1") -> int:
        data = {"user_id": user, "study_id": study, "status": "active", "seq": seq}
        return await self.publish(study, encode_envelope("presence.user_joined", data))

    async def numsub(self, study: str) -> int:
        [(_, count)] = await self.redis.pubsub_numsub(self.keys.channel(study))
        return int(count)

    async def wait_numsub(self, study: str, expected: int) -> None:
        # The (un)subscribe is sent on another connection: give Redis a moment to apply it.
        async def reached() -> bool:
            return await self.numsub(study) == expected

        await eventually_async(reached, what=f"NUMSUB of {study} becomes {expected}")

    async def close(self) -> None:
        if self.task is not None:
            await stop(self.task)
        await self.fanout.close()


@pytest.fixture
async def harness(any_redis: Any, key_prefix: str) -> AsyncIterator[Harness]:
    h = Harness(any_redis, Keys(key_prefix))
    h.run()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def idle_harness(any_redis: Any, key_prefix: str) -> AsyncIterator[Harness]:
    """A fan-out whose reader (run) is not started yet."""
    h = Harness(any_redis, Keys(key_prefix))
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def impatient_idle_harness(any_redis: Any, key_prefix: str) -> AsyncIterator[Harness]:
    """An idle harness whose subscriptions time out after 0.3 s."""
    h = Harness(any_redis, Keys(key_prefix), LinkTuning(subscribe_timeout=0.3))
    try:
        yield h
    finally:
        await h.close()


async def test_publish_right_after_add_is_received(harness: Harness) -> None:
    for n, study in enumerate(["s1", "s2", "s3"], start=1):
        sub = Recorder()
        await harness.fanout.add(study, sub)
        # Redis already counts the subscription when add() returns.
        assert await harness.event(study, 1) == 1
        [event] = await sub.wait_for(1)
        assert event.seq == 1
        assert harness.fanout.studies == n


async def test_add_does_not_return_before_the_subscription_is_confirmed(
    impatient_idle_harness: Harness,
) -> None:
    idle_harness = impatient_idle_harness
    sub = Recorder()
    # Nobody reads the pub/sub connection, so no confirmation can arrive.
    with pytest.raises(TimeoutError):
        await idle_harness.fanout.add("s1", sub)
    assert idle_harness.fanout.studies == 0  # a failed add leaves nothing behind

    # Once the reader runs, the stale confirmation of the failed attempt must not make the
    # next add() return early.
    idle_harness.run()
    await idle_harness.fanout.add("s1", sub)
    assert await idle_harness.event("s1", 7) == 1
    [event] = await sub.wait_for(1)
    assert event.seq == 7


async def test_add_is_cancelled_cleanly(idle_harness: Harness) -> None:
    sub = Recorder()
    adding = asyncio.create_task(idle_harness.fanout.add("s1", sub))
    # Redis has the SUBSCRIBE: add() now waits for the confirmation nobody reads.
    await idle_harness.wait_numsub("s1", 1)
    assert not adding.done()
    await stop(adding)
    assert idle_harness.fanout.studies == 0


async def test_both_subscribers_get_the_same_encoded_event(harness: Harness) -> None:
    first, second = Recorder(), Recorder()
    await harness.fanout.add("s1", first)
    await harness.fanout.add("s1", second)
    assert harness.fanout.studies == 1
    assert await harness.event("s1", 1) == 1  # one subscription for both
    await harness.event("s1", 2)
    a = await first.wait_for(2)
    b = await second.wait_for(2)
    assert [e.seq for e in a] == [1, 2]
    for mine, theirs in zip(a, b, strict=True):
        assert mine is theirs  # decoded and encoded once
        assert mine.text is theirs.text


async def test_events_arrive_in_order(harness: Harness) -> None:
    sub = Recorder()
    await harness.fanout.add("s1", sub)
    for seq in range(1, 101):
        await harness.event("s1", seq)
    events = await sub.wait_for(100)
    assert [e.seq for e in events] == list(range(1, 101))


async def test_only_the_studys_subscribers_get_its_events(harness: Harness) -> None:
    one, two = Recorder(), Recorder()
    await harness.fanout.add("s1", one)
    await harness.fanout.add("s2", two)
    assert harness.fanout.studies == 2
    await harness.event("s1", 1, user="for-s1")
    await harness.event("s2", 1, user="for-s2")
    await harness.event("s3", 1, user="nobody")  # not subscribed
    [e1] = await one.wait_for(1)
    [e2] = await two.wait_for(1)
    assert '"for-s1"' in e1.text
    assert '"for-s2"' in e2.text
    # A later s1 event proves nothing else was queued for `one`.
    await harness.event("s1", 2)
    assert [e.seq for e in await one.wait_for(2)] == [1, 2]
    assert len(two.events) == 1


async def test_remove_of_the_last_subscriber_unsubscribes(harness: Harness) -> None:
    first, second = Recorder(), Recorder()
    await harness.fanout.add("s1", first)
    await harness.fanout.add("s1", second)
    await harness.fanout.add("s2", Recorder())

    await harness.fanout.remove("s1", first)
    assert harness.fanout.studies == 2
    assert await harness.numsub("s1") == 1
    await harness.event("s1", 1)
    await second.wait_for(1)
    assert first.events == []

    await harness.fanout.remove("s1", second)
    assert harness.fanout.studies == 1
    await harness.wait_numsub("s1", 0)
    assert await harness.event("s1", 2) == 0
    assert await harness.numsub("s2") == 1  # the other study is untouched


async def test_remove_of_an_unknown_subscriber_does_nothing(harness: Harness) -> None:
    sub = Recorder()
    await harness.fanout.remove("s1", sub)  # no such study
    await harness.fanout.add("s1", sub)
    await harness.fanout.remove("s1", Recorder())  # not a subscriber of s1
    await harness.fanout.remove("s2", sub)  # subscribed elsewhere
    assert harness.fanout.studies == 1
    await harness.event("s1", 1)
    await sub.wait_for(1)
    await harness.fanout.remove("s1", sub)
    await harness.fanout.remove("s1", sub)  # twice
    assert harness.fanout.studies == 0


BAD_PAYLOADS = [
    b"\xc1",  # a byte msgpack never uses
    b"",
    b"\x92\x01",  # an array cut short
    msgpack.packb([1, 2, 3]),
    msgpack.packb("presence.user_joined"),
    msgpack.packb({"data": {"seq": 1}}),
    msgpack.packb({"type": "", "data": {}}),
    msgpack.packb({"type": 5, "data": {}}),
    msgpack.packb({"type": "presence.user_joined", "data": [1]}),
    msgpack.packb({"type": "presence.user_joined"}),
    msgpack.packb({"type": "x.y", "data": {"blob": b"\x00\x01"}}),  # bytes are not JSON
    msgpack.packb({"type": "x.y", "data": {1: "int key"}}),
    msgpack.packb({"type": "x.y", "data": {"f": float("nan")}}),
    b'{"type": "presence.user_joined", "data": {}}',  # JSON, not msgpack
]


async def test_bad_messages_are_dropped_and_counted(harness: Harness) -> None:
    sub = Recorder()
    await harness.fanout.add("s1", sub)
    await harness.event("s1", 1)
    for payload in BAD_PAYLOADS:
        await harness.publish("s1", payload)
    await harness.event("s1", 2)
    events = await sub.wait_for(2)
    assert [e.seq for e in events] == [1, 2]
    assert harness.fanout.dropped_messages == len(BAD_PAYLOADS)
    # Later deliveries are unaffected.
    await harness.event("s1", 3)
    assert [e.seq for e in await sub.wait_for(3)] == [1, 2, 3]
    assert harness.fanout.dropped_messages == len(BAD_PAYLOADS)


async def test_external_events_are_relayed_unchanged_without_seq(harness: Harness) -> None:
    sub = Recorder()
    await harness.fanout.add("s1", sub)
    data = {"chapter_id": "c1", "name": "Najdorf ♞", "seq": 41, "n": None, "list": [1, "a"]}
    await harness.publish("s1", encode_envelope("study.chapter_renamed", data, ts_ms=123))
    [event] = await sub.wait_for(1)
    assert event.seq is None  # only presence.* events carry the study's seq
    assert event.text == json_text({"type": "study.chapter_renamed", "data": data})
    assert "123" not in event.text  # the envelope's ts stays on the channel


async def test_presence_event_text_and_seq(harness: Harness) -> None:
    sub = Recorder()
    await harness.fanout.add("s1", sub)
    data = {"session_id": "abc", "user_id": "u1", "chapter_id": None, "seq": 9}
    await harness.publish("s1", encode_envelope("presence.cursor_moved", data))
    await harness.publish("s1", encode_envelope("presence.cursor_moved", {"seq": "9"}))
    first, second = await sub.wait_for(2)
    assert first == Outgoing(9, json_text({"type": "presence.cursor_moved", "data": data}))
    assert second.seq is None  # a seq that is not an integer is not trusted


async def test_rapid_add_remove_add_ends_subscribed(harness: Harness) -> None:
    fanout = harness.fanout
    first, second = Recorder(), Recorder()
    for _ in range(5):
        await fanout.add("s1", first)
        await fanout.remove("s1", first)
        await fanout.add("s1", second)
        await fanout.remove("s1", second)
    await fanout.add("s1", first)
    await fanout.remove("s1", first)
    await fanout.add("s1", first)

    assert fanout.studies == 1
    assert await harness.event("s1", 1) == 1
    [event] = await first.wait_for(1)
    assert event.seq == 1
    assert second.events == []
    await harness.wait_numsub("s1", 1)


async def test_concurrent_remove_and_add_ends_subscribed(harness: Harness) -> None:
    fanout = harness.fanout
    old, new = Recorder(), Recorder()
    await fanout.add("s1", old)
    # UNSUBSCRIBE then SUBSCRIBE go out back to back; add() must wait for the new confirmation.
    await asyncio.gather(fanout.remove("s1", old), fanout.add("s1", new))
    assert fanout.studies == 1
    assert await harness.event("s1", 1) == 1
    [event] = await new.wait_for(1)
    assert event.seq == 1
    assert old.events == []
    await harness.wait_numsub("s1", 1)


async def test_concurrent_adds_share_one_subscription(harness: Harness) -> None:
    subs = [Recorder() for _ in range(5)]
    await asyncio.gather(*(harness.fanout.add("s1", s) for s in subs))
    assert harness.fanout.studies == 1
    assert await harness.numsub("s1") == 1
    await harness.event("s1", 1)
    delivered = [(await s.wait_for(1))[0] for s in subs]
    assert all(e is delivered[0] for e in delivered)


async def test_subscriber_removing_itself_during_delivery(harness: Harness) -> None:
    """A subscriber that removes itself while being delivered to does not break the loop."""
    fanout = harness.fanout
    others = Recorder()

    class Leaver:
        def __init__(self) -> None:
            self.count = 0
            self.tasks: list[asyncio.Task[None]] = []

        def deliver(self, event: Outgoing) -> None:
            self.count += 1
            self.tasks.append(asyncio.get_running_loop().create_task(fanout.remove("s1", self)))

    leaver = Leaver()
    await fanout.add("s1", leaver)
    await fanout.add("s1", others)
    await harness.event("s1", 1)
    await others.wait_for(1)
    await harness.event("s1", 2)
    await others.wait_for(2)
    assert leaver.count == 1
    await asyncio.gather(*leaver.tasks)


async def test_idle_run_is_cancellable(any_redis: Any, key_prefix: str) -> None:
    # run() with no subscription yet just waits; cancelling it is immediate.
    h = Harness(any_redis, Keys(key_prefix))
    h.run()
    # That run() does not end on its own cannot be awaited: a short bounded look (any Redis
    # round trip it made at start would be over by then).
    await asyncio.sleep(0.05)
    assert h.task is not None
    assert not h.task.done()
    await h.close()
    assert h.task.cancelled()
