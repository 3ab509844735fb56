"""The PresenceStore contract on RedisStore, on fakeredis and on a real Redis (`any_redis`).

Every test listens to the study channels and checks exactly which events were published: an
EventTap (tests/support/events.py) pattern-subscribes to the test's key prefix and, to know it
has seen everything an operation published, publishes a marker of its own and reads up to it
(Redis delivers a connection's subscriptions in publish order), so "nothing was published"
needs no timeout. The fixtures keys, store, tap and t0 are in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from presence_svc.models import (
    CURSOR_MOVED,
    USER_ACTIVE,
    USER_AWAY,
    USER_IDLE,
    USER_JOINED,
    USER_LEFT,
    CursorUpdate,
    Holder,
    Lease,
    Session,
    Status,
    StudyPresence,
    SweepReport,
    Thresholds,
    iso_from_ms,
)
from presence_svc.redis.keys import SCHEDULE_SHARDS, Keys
from presence_svc.redis.store import RELEASED_KEEP_MS, RELEASED_MAX, RedisStore
from presence_svc.redis.sweep import EMPTY_STUDY_TTL_MS
from presence_svc.store import StoreUnavailable
from tests.support.events import Event, EventTap, kinds
from tests.support.processes import free_port
from tests.support.store import (
    AWAY_MS,
    EXPIRE_MS,
    IDLE_MS,
    NO_CURSOR,
    THRESHOLDS,
    both,
    schedule_score,
)


def chapter_only(chapter: str | None) -> CursorUpdate:
    return CursorUpdate(chapter_id=chapter, sets_chapter=True)


def move_only(move: str | None) -> CursorUpdate:
    return CursorUpdate(move_path=move, sets_move_path=True)


# --- fixtures and helpers ---------------------------------------------------------------------


async def whole_schedule(client: Any, keys: Keys) -> dict[str, int]:
    """study_id -> due ms, over every shard."""
    out: dict[str, int] = {}
    for shard in keys.schedule_shards():
        for member, score in await client.zrange(shard, 0, -1, withscores=True):
            study = member.decode()
            assert study not in out, f"{study} is in two shards"
            assert shard == keys.schedule(study)
            out[study] = int(score)
    return out


async def session_hash(client: Any, keys: Keys, study_id: str, user_id: str) -> dict[str, str]:
    flat = await client.hgetall(keys.study(study_id).session(user_id))
    return {k.decode(): v.decode() for k, v in flat.items()}


def hash_tag(key: str) -> str:
    """The part of `key` Redis Cluster hashes (its hash tag, or the whole key)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def hook_before(
    monkeypatch: pytest.MonkeyPatch,
    store: RedisStore,
    step: int,
    action: Callable[[], Awaitable[Any]],
) -> None:
    """Run `action` just before sweep step `step` (0 scan, 1 apply, 2 reschedule) of `store`.

    This reaches into RedisSweep._run_each (each sweep step is one call of it), the
    one way to put another node's work deterministically between the steps of a sweep.
    """
    sweep = store._sweep
    original = sweep._run_each
    calls = 0

    async def run_each(commands: Sequence[Any]) -> list[Any]:
        nonlocal calls
        if calls == step:
            await action()
        calls += 1
        return await original(commands)

    monkeypatch.setattr(sweep, "_run_each", run_each)


# --- models used by the store -----------------------------------------------------------------


def test_iso_from_ms() -> None:
    assert iso_from_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_from_ms(1_800_000_000_123) == "2027-01-15T08:00:00.123Z"
    assert iso_from_ms(1_800_000_000_007) == "2027-01-15T08:00:00.007Z"


@pytest.mark.parametrize(
    ("idle", "away", "expire"), [(0, 1, 2), (30, 30, 600), (30, 300, 300), (300, 30, 600)]
)
def test_thresholds_must_rise(idle: float, away: float, expire: float) -> None:
    with pytest.raises(ValueError, match="idle < away < expire"):
        Thresholds(idle, away, expire)


# --- heartbeat --------------------------------------------------------------------------------


async def test_first_heartbeat_publishes_user_joined(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    session = await store.heartbeat("alice", "s1", both("ch1", "main.12.var2.3"), t0)

    assert len(session.session_id) == 32
    int(session.session_id, 16)  # hex
    assert session == Session(
        session_id=session.session_id,
        user_id="alice",
        study_id="s1",
        chapter_id="ch1",
        move_path="main.12.var2.3",
        status=Status.ACTIVE,
        last_heartbeat_ms=t0,
        joined_at_ms=t0,
    )
    events = await tap.drain()
    assert len(events) == 1
    [joined] = events
    assert joined.type == USER_JOINED
    assert joined.channel == keys.channel("s1") == keys.study("s1").channel
    assert joined.ts == t0
    assert joined.data == {
        "session_id": session.session_id,
        "user_id": "alice",
        "study_id": "s1",
        "chapter_id": "ch1",
        "move_path": "main.12.var2.3",
        "status": "active",
        "previous_status": None,
        "timestamp": iso_from_ms(t0),
        "seq": 1,
    }
    # The stored layout docs/redis-protocol.md describes.
    sk = keys.study("s1")
    assert await session_hash(any_redis, keys, "s1", "alice") == {
        "session_id": session.session_id,
        "user_id": "alice",
        "study_id": "s1",
        "chapter_id": "ch1",
        "move_path": "main.12.var2.3",
        "status": "active",
        "last_heartbeat": str(t0),
        "joined_at": str(t0),
    }
    assert await any_redis.zrange(sk.index, 0, -1, withscores=True) == [(b"alice", float(t0))]
    assert await any_redis.hget(sk.meta, "seq") == b"1"
    assert await any_redis.pttl(sk.meta) == -1
    assert await schedule_score(any_redis, keys, "s1") == t0 + IDLE_MS


async def test_first_heartbeat_without_cursor(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    session = await store.heartbeat("bob", "s1", NO_CURSOR, t0)
    assert session.chapter_id is None
    assert session.move_path is None
    [joined] = await tap.drain()
    assert joined.type == USER_JOINED
    assert joined.data["chapter_id"] is None
    assert joined.data["move_path"] is None
    stored = await session_hash(any_redis, keys, "s1", "bob")
    assert "chapter_id" not in stored
    assert "move_path" not in stored


async def test_each_session_gets_its_own_id(store: RedisStore, tap: EventTap, t0: int) -> None:
    a = await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    b = await store.heartbeat("bob", "s1", NO_CURSOR, t0)
    c = await store.heartbeat("alice", "s2", NO_CURSOR, t0)
    assert len({a.session_id, b.session_id, c.session_id}) == 3
    events = await tap.drain()
    assert [(e.type, e.study, e.seq) for e in events] == [
        (USER_JOINED, "s1", 1),
        (USER_JOINED, "s1", 2),
        (USER_JOINED, "s2", 1),
    ]


async def test_repeated_heartbeat_with_same_cursor_publishes_nothing(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    first = await store.heartbeat("alice", "s1", both("ch1", "m1"), t0)
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]

    again = await store.heartbeat("alice", "s1", both("ch1", "m1"), t0 + 5_000)
    assert await tap.drain() == []
    bare = await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 10_000)
    assert await tap.drain() == []

    for later, beat in ((again, t0 + 5_000), (bare, t0 + 10_000)):
        assert later.session_id == first.session_id
        assert later.joined_at_ms == t0
        assert later.last_heartbeat_ms == beat
        assert (later.chapter_id, later.move_path) == ("ch1", "m1")
        assert later.status is Status.ACTIVE
    sk = keys.study("s1")
    assert await any_redis.zscore(sk.index, "alice") == t0 + 10_000
    assert (await store.presence("s1")).seq == 1
    # The schedule is never pushed later by a heartbeat: early is harmless, late is not.
    assert await schedule_score(any_redis, keys, "s1") == t0 + IDLE_MS


async def test_cursor_change_publishes_cursor_moved(
    store: RedisStore, tap: EventTap, t0: int
) -> None:
    first = await store.heartbeat("alice", "s1", both("ch1", "m1"), t0)
    await tap.drain()

    moved = await store.heartbeat("alice", "s1", both("ch1", "m2"), t0 + 1_000)
    [event] = await tap.drain()
    assert event.type == CURSOR_MOVED
    assert event.data == {
        "session_id": first.session_id,
        "user_id": "alice",
        "study_id": "s1",
        "chapter_id": "ch1",
        "move_path": "m2",
        "status": "active",
        "previous_status": None,
        "timestamp": iso_from_ms(t0 + 1_000),
        "seq": 2,
    }
    assert (moved.chapter_id, moved.move_path) == ("ch1", "m2")

    await store.heartbeat("alice", "s1", both("ch2", "m2"), t0 + 2_000)
    [event] = await tap.drain()
    assert (event.type, event.data["chapter_id"], event.data["move_path"], event.seq) == (
        CURSOR_MOVED,
        "ch2",
        "m2",
        3,
    )
    # Both fields changing at once is one event.
    await store.heartbeat("alice", "s1", both("ch3", "m3"), t0 + 3_000)
    assert [(e.type, e.seq) for e in await tap.drain()] == [(CURSOR_MOVED, 4)]


async def test_omitted_field_keeps_its_value_and_none_clears_it(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.heartbeat("alice", "s1", both("ch1", "m1"), t0)
    await tap.drain()

    # Only move_path given: chapter kept.
    session = await store.heartbeat("alice", "s1", move_only("m2"), t0 + 1)
    assert (session.chapter_id, session.move_path) == ("ch1", "m2")
    [event] = await tap.drain()
    assert (event.type, event.data["chapter_id"], event.data["move_path"]) == (
        CURSOR_MOVED,
        "ch1",
        "m2",
    )

    # Explicit None clears chapter only.
    session = await store.heartbeat("alice", "s1", chapter_only(None), t0 + 2)
    assert (session.chapter_id, session.move_path) == (None, "m2")
    [event] = await tap.drain()
    assert (event.type, event.data["chapter_id"], event.data["move_path"]) == (
        CURSOR_MOVED,
        None,
        "m2",
    )
    stored = await session_hash(any_redis, keys, "s1", "alice")
    assert "chapter_id" not in stored
    assert stored["move_path"] == "m2"

    # Clearing what is already clear changes nothing.
    await store.heartbeat("alice", "s1", chapter_only(None), t0 + 3)
    assert await tap.drain() == []

    # Values without their `sets_` flag are not set.
    session = await store.heartbeat(
        "alice", "s1", CursorUpdate(chapter_id="nope", move_path="nope"), t0 + 4
    )
    assert (session.chapter_id, session.move_path) == (None, "m2")
    assert await tap.drain() == []

    # Setting one field and clearing the other: one event.
    session = await store.heartbeat("alice", "s1", both("ch3", None), t0 + 5)
    assert (session.chapter_id, session.move_path) == ("ch3", None)
    [event] = await tap.drain()
    assert (event.type, event.data["chapter_id"], event.data["move_path"]) == (
        CURSOR_MOVED,
        "ch3",
        None,
    )
    [present] = (await store.presence("s1")).sessions
    assert (present.chapter_id, present.move_path) == ("ch3", None)


async def test_heartbeat_while_idle_publishes_user_active(
    store: RedisStore, tap: EventTap, t0: int
) -> None:
    first = await store.heartbeat("alice", "s1", both("ch1", "m1"), t0)
    await store.sweep(t0 + IDLE_MS)
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice"), (USER_IDLE, "alice")]
    assert (await store.presence("s1")).sessions[0].status is Status.IDLE

    back = await store.heartbeat("alice", "s1", both("ch1", "m1"), t0 + IDLE_MS + 1_000)
    assert back.status is Status.ACTIVE
    [event] = await tap.drain()
    assert event.type == USER_ACTIVE
    assert event.data == {
        "session_id": first.session_id,
        "user_id": "alice",
        "study_id": "s1",
        "chapter_id": "ch1",
        "move_path": "m1",
        "status": "active",
        "previous_status": "idle",
        "timestamp": iso_from_ms(t0 + IDLE_MS + 1_000),
        "seq": 3,
    }
    [present] = (await store.presence("s1")).sessions
    assert present.status is Status.ACTIVE
    assert present.last_heartbeat_ms == t0 + IDLE_MS + 1_000


async def test_heartbeat_while_away_with_new_cursor_publishes_active_then_cursor_moved(
    store: RedisStore, tap: EventTap, t0: int
) -> None:
    await store.heartbeat("alice", "s1", both("ch1", "m1"), t0)
    await store.sweep(t0 + IDLE_MS)
    await store.sweep(t0 + AWAY_MS)
    assert [e.type for e in await tap.drain()] == [USER_JOINED, USER_IDLE, USER_AWAY]

    now = t0 + AWAY_MS + 5
    back = await store.heartbeat("alice", "s1", both("ch2", "m9"), now)
    assert (back.status, back.chapter_id, back.move_path) == (Status.ACTIVE, "ch2", "m9")
    events = await tap.drain()
    assert [(e.type, e.seq) for e in events] == [(USER_ACTIVE, 4), (CURSOR_MOVED, 5)]
    for event in events:
        assert (event.status, event.data["chapter_id"], event.data["move_path"]) == (
            "active",
            "ch2",
            "m9",
        )
        assert event.ts == now
    assert (await store.presence("s1")).seq == 5


async def test_heartbeat_from_a_lagging_clock_does_not_move_back(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 10_000)
    await tap.drain()
    session = await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    assert session.last_heartbeat_ms == t0 + 10_000
    assert await any_redis.zscore(keys.study("s1").index, "alice") == t0 + 10_000
    assert await tap.drain() == []
    # So it goes idle at the later heartbeat's threshold, not the earlier one's.
    await store.sweep(t0 + IDLE_MS + 9_999)
    assert await tap.drain() == []
    await store.sweep(t0 + IDLE_MS + 10_000)
    assert kinds(await tap.drain()) == [(USER_IDLE, "alice")]


# --- sweep ------------------------------------------------------------------------------------


async def test_sweep_transitions_exactly_at_thresholds_and_once(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    joined = await store.heartbeat("alice", "s1", both("ch1", "m1"), t0)
    await tap.drain()
    sk = keys.study("s1")

    stages = [(IDLE_MS, USER_IDLE, "idle", "active"), (AWAY_MS, USER_AWAY, "away", "idle")]
    for seq, (threshold, event_type, status, previous) in enumerate(stages, start=2):
        assert await store.sweep(t0 + threshold - 1) == SweepReport()
        assert await tap.drain() == []
        assert await store.sweep(t0 + threshold) == SweepReport(studies=1, events=1)
        [event] = await tap.drain()
        assert event.type == event_type
        assert event.data == {
            "session_id": joined.session_id,
            "user_id": "alice",
            "study_id": "s1",
            "chapter_id": "ch1",
            "move_path": "m1",
            "status": status,
            "previous_status": previous,
            "timestamp": iso_from_ms(t0 + threshold),
            "seq": seq,
        }
        assert event.ts == t0 + threshold
        assert (await session_hash(any_redis, keys, "s1", "alice"))["status"] == status
        # Repeated sweeps at the same moment publish nothing more.
        for _ in range(3):
            assert (await store.sweep(t0 + threshold)).events == 0
        assert await tap.drain() == []
        presence = await store.presence("s1")
        assert presence.seq == seq
        assert presence.sessions[0].status == Status(status)

    assert await schedule_score(any_redis, keys, "s1") == t0 + EXPIRE_MS
    assert await store.sweep(t0 + EXPIRE_MS - 1) == SweepReport()
    assert await store.sweep(t0 + EXPIRE_MS) == SweepReport(studies=1, events=1)
    [left] = await tap.drain()
    assert left.type == USER_LEFT
    # user_left carries the status the session had when it ended.
    assert (left.status, left.seq, left.ts) == ("away", 4, t0 + EXPIRE_MS)
    assert left.data["session_id"] == joined.session_id

    assert await store.presence("s1") == StudyPresence("s1", (), 4)
    assert not await any_redis.exists(sk.session("alice"), sk.index)
    assert await schedule_score(any_redis, keys, "s1") is None  # an empty study is unscheduled
    assert await store.sweep(t0 + EXPIRE_MS + 60_000) == SweepReport()
    assert await tap.drain() == []


async def test_schedule_follows_the_next_due_transition(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    await store.heartbeat("bob", "s1", NO_CURSOR, t0 + 10_000)
    await tap.drain()
    assert await schedule_score(any_redis, keys, "s1") == t0 + IDLE_MS

    expected = [
        (t0 + IDLE_MS, [(USER_IDLE, "alice")], t0 + 10_000 + IDLE_MS),
        (t0 + 10_000 + IDLE_MS, [(USER_IDLE, "bob")], t0 + AWAY_MS),
        (t0 + AWAY_MS, [(USER_AWAY, "alice")], t0 + 10_000 + AWAY_MS),
        (t0 + 10_000 + AWAY_MS, [(USER_AWAY, "bob")], t0 + EXPIRE_MS),
        (t0 + EXPIRE_MS, [(USER_LEFT, "alice")], t0 + 10_000 + EXPIRE_MS),
        (t0 + 10_000 + EXPIRE_MS, [(USER_LEFT, "bob")], None),
    ]
    for now, published, next_due in expected:
        assert (await store.sweep(now - 1)).events == 0
        assert (await store.sweep(now)).events == 1
        assert kinds(await tap.drain()) == published
        assert await schedule_score(any_redis, keys, "s1") == next_due


async def test_transitions_over_time_on_a_sweep_grid(
    store: RedisStore, tap: EventTap, t0: int
) -> None:
    """Sweeping every 2 s for 12 minutes: each transition on the first sweep at or after it."""
    step = 2_000
    beats = [(0, "u0"), (1_500, "u1"), (2_000, "u4"), (7_000, "u2"), (7_000, "u3")]
    beats.append((100_000, "u4"))  # u4 comes back while idle
    pending = sorted(beats)
    seen: dict[str, list[tuple[int, str]]] = {}
    for now in range(0, 712_000, step):
        while pending and pending[0][0] <= now:
            at, user = pending.pop(0)
            await store.heartbeat(user, "s1", NO_CURSOR, t0 + at)
        events = await tap.drain()
        report = await store.sweep(t0 + now)
        swept = await tap.drain()
        assert report.events == len(swept)
        for event in events + swept:
            seen.setdefault(event.user, []).append((event.ts - t0, event.type))

    assert seen == {
        "u0": [(0, USER_JOINED), (30_000, USER_IDLE), (300_000, USER_AWAY), (600_000, USER_LEFT)],
        "u1": [
            (1_500, USER_JOINED),
            (32_000, USER_IDLE),
            (302_000, USER_AWAY),
            (602_000, USER_LEFT),
        ],
        "u2": [
            (7_000, USER_JOINED),
            (38_000, USER_IDLE),
            (308_000, USER_AWAY),
            (608_000, USER_LEFT),
        ],
        "u3": [
            (7_000, USER_JOINED),
            (38_000, USER_IDLE),
            (308_000, USER_AWAY),
            (608_000, USER_LEFT),
        ],
        "u4": [
            (2_000, USER_JOINED),
            (32_000, USER_IDLE),
            (100_000, USER_ACTIVE),
            (130_000, USER_IDLE),
            (400_000, USER_AWAY),
            (700_000, USER_LEFT),
        ],
    }
    assert tap.seq_of("s1") == sum(len(v) for v in seen.values())


async def test_a_late_sweep_publishes_only_the_status_now_due(
    store: RedisStore, tap: EventTap, t0: int
) -> None:
    """A sweep that first runs past several thresholds publishes the latest status only."""
    await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    await store.heartbeat("bob", "s1", NO_CURSOR, t0)
    await tap.drain()
    await store.sweep(t0 + AWAY_MS)
    assert sorted(kinds(await tap.drain())) == [(USER_AWAY, "alice"), (USER_AWAY, "bob")]
    await store.leave("bob", "s1", t0 + AWAY_MS)
    await tap.drain()

    await store.heartbeat("carol", "s1", NO_CURSOR, t0 + AWAY_MS)
    await tap.drain()
    await store.sweep(t0 + AWAY_MS + EXPIRE_MS)
    events = await tap.drain()
    assert sorted(kinds(events)) == [(USER_LEFT, "alice"), (USER_LEFT, "carol")]
    assert {e.user: e.status for e in events} == {"alice": "away", "carol": "active"}


async def test_sweep_with_nothing_scheduled(store: RedisStore, tap: EventTap, t0: int) -> None:
    assert await store.sweep(t0) == SweepReport()
    assert await tap.drain() == []


async def test_sweep_only_touches_due_studies(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.heartbeat("alice", "early", NO_CURSOR, t0)
    await store.heartbeat("bob", "late", NO_CURSOR, t0 + 20_000)
    await store.heartbeat("carol", "other", NO_CURSOR, t0 + 25_000)
    await tap.drain()
    assert await whole_schedule(any_redis, keys) == {
        "early": t0 + IDLE_MS,
        "late": t0 + 20_000 + IDLE_MS,
        "other": t0 + 25_000 + IDLE_MS,
    }

    assert await store.sweep(t0 + IDLE_MS) == SweepReport(studies=1, events=1)
    assert kinds(await tap.drain()) == [(USER_IDLE, "alice")]
    assert await whole_schedule(any_redis, keys) == {
        "early": t0 + AWAY_MS,
        "late": t0 + 20_000 + IDLE_MS,
        "other": t0 + 25_000 + IDLE_MS,
    }
    # The studies not due were not read or written: no watermarks were stored for them.
    for study in ("late", "other"):
        assert await any_redis.hkeys(keys.study(study).meta) == [b"seq"]
    assert await any_redis.hget(keys.study("early").meta, "idle_wm") is not None

    # Nothing due any more: no study is picked.
    assert await store.sweep(t0 + IDLE_MS) == SweepReport()

    # A heartbeat never moves a schedule entry later; the early sweep finds nothing and the
    # study is rescheduled to the real due time.
    await store.heartbeat("bob", "late", NO_CURSOR, t0 + 21_000)
    assert await schedule_score(any_redis, keys, "late") == t0 + 20_000 + IDLE_MS
    assert await store.sweep(t0 + 20_000 + IDLE_MS) == SweepReport(studies=1, events=0)
    assert await schedule_score(any_redis, keys, "late") == t0 + 21_000 + IDLE_MS
    assert await store.sweep(t0 + 21_000 + IDLE_MS - 1) == SweepReport()
    assert await store.sweep(t0 + 21_000 + IDLE_MS) == SweepReport(studies=1, events=1)
    assert kinds(await tap.drain()) == [(USER_IDLE, "bob")]


async def test_several_nodes_sweeping_at_once_publish_each_transition_once(
    any_redis: Any, keys: Keys, tap: EventTap, t0: int
) -> None:
    nodes = [RedisStore(any_redis, keys, THRESHOLDS) for _ in range(3)]
    studies = [f"s{i}" for i in range(5)]
    users = [f"u{j}" for j in range(6)]
    for i, study in enumerate(studies):
        for j, user in enumerate(users):
            await nodes[(i + j) % 3].heartbeat(user, study, NO_CURSOR, t0 + 100 * j)
    await tap.drain()

    for now, event_type in [
        (t0 + IDLE_MS + 1_000, USER_IDLE),
        (t0 + AWAY_MS + 1_000, USER_AWAY),
        (t0 + EXPIRE_MS + 1_000, USER_LEFT),
    ]:
        reports = await asyncio.gather(*(node.sweep(now) for node in nodes))
        events = await tap.drain()
        assert sum(r.events for r in reports) == len(events) == 30
        assert {e.type for e in events} == {event_type}
        assert Counter((e.study, e.user) for e in events) == Counter(
            (s, u) for s in studies for u in users
        )
        again = await asyncio.gather(*(node.sweep(now) for node in nodes))
        assert sum(r.events for r in again) == 0
        assert await tap.drain() == []
    for study in studies:
        assert await nodes[0].presence(study) == StudyPresence(study, (), 24)
    assert await whole_schedule(any_redis, keys) == {}


async def test_a_sweep_overtaken_between_scan_and_apply_publishes_nothing_twice(
    any_redis: Any, keys: Keys, tap: EventTap, t0: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node A scans; node B sweeps the whole study; A's apply re-checks and does nothing."""
    node_a = RedisStore(any_redis, keys, THRESHOLDS)
    node_b = RedisStore(any_redis, keys, THRESHOLDS)
    for user in ("alice", "bob"):
        await node_a.heartbeat(user, "s1", NO_CURSOR, t0)
    await node_a.heartbeat("carol", "s1", NO_CURSOR, t0 - (EXPIRE_MS - IDLE_MS))
    await tap.drain()
    now = t0 + IDLE_MS
    b_reports: list[SweepReport] = []

    async def b_sweeps() -> None:
        b_reports.append(await node_b.sweep(now))

    hook_before(monkeypatch, node_a, 1, b_sweeps)
    report_a = await node_a.sweep(now)
    assert b_reports == [SweepReport(studies=1, events=3)]
    assert report_a.events == 0
    assert sorted(kinds(await tap.drain())) == [
        (USER_IDLE, "alice"),
        (USER_IDLE, "bob"),
        (USER_LEFT, "carol"),
    ]


async def test_sweeps_and_heartbeats_interleaved_concurrently(
    any_redis: Any, keys: Keys, tap: EventTap, t0: int
) -> None:
    """Sweeps on two nodes racing heartbeats: whatever the interleaving, the outcome is sound."""
    nodes = [RedisStore(any_redis, keys, THRESHOLDS) for _ in range(2)]
    users = [f"u{j}" for j in range(10)]
    for user in users:
        await nodes[0].heartbeat(user, "s1", NO_CURSOR, t0)
    await tap.drain()
    now = t0 + IDLE_MS
    returning = users[::2]
    await asyncio.gather(
        nodes[0].sweep(now),
        *(nodes[1].heartbeat(u, "s1", NO_CURSOR, now) for u in returning),
        nodes[1].sweep(now),
    )
    events = await tap.drain()
    by_user: dict[str, list[str]] = {}
    for event in events:
        by_user.setdefault(event.user, []).append(event.type)
    for user in users:
        if user in returning:
            # Either the heartbeat came first (nothing to publish) or the sweep did.
            assert by_user.get(user, []) in ([], [USER_IDLE, USER_ACTIVE])
        else:
            assert by_user[user] == [USER_IDLE]
    statuses = {s.user_id: s.status for s in (await nodes[0].presence("s1")).sessions}
    assert statuses == {u: Status.ACTIVE if u in returning else Status.IDLE for u in users}

    # The returning users go idle one threshold after their heartbeat, never later.
    await nodes[1].sweep(now + IDLE_MS - 1)
    assert await tap.drain() == []
    await nodes[1].sweep(now + IDLE_MS)
    assert sorted(kinds(await tap.drain())) == [(USER_IDLE, u) for u in sorted(returning)]


@pytest.mark.parametrize(
    ("step", "raced_events"),
    [
        (0, []),  # after the study was picked, before the scan
        (1, []),  # after the scan, before the apply
        (2, [USER_IDLE, USER_ACTIVE]),  # after the apply, before the reschedule
    ],
)
async def test_heartbeat_racing_a_due_sweep(
    any_redis: Any,
    keys: Keys,
    tap: EventTap,
    t0: int,
    monkeypatch: pytest.MonkeyPatch,
    step: int,
    raced_events: list[str],
) -> None:
    sweeper = RedisStore(any_redis, keys, THRESHOLDS)
    other_node = RedisStore(any_redis, keys, THRESHOLDS)
    await other_node.heartbeat("alice", "s1", NO_CURSOR, t0)
    await other_node.heartbeat("bob", "s1", NO_CURSOR, t0 + 1)
    await tap.drain()
    now = t0 + IDLE_MS + 1

    async def heartbeat() -> None:
        await other_node.heartbeat("alice", "s1", NO_CURSOR, now)

    hook_before(monkeypatch, sweeper, step, heartbeat)
    await sweeper.sweep(now)
    events = await tap.drain()
    assert [e.type for e in events if e.user == "alice"] == raced_events
    assert [e.type for e in events if e.user == "bob"] == [USER_IDLE]
    statuses = {s.user_id: s.status for s in (await sweeper.presence("s1")).sessions}
    assert statuses == {"alice": Status.ACTIVE, "bob": Status.IDLE}
    # The study stays scheduled no later than alice's next idle time.
    due = await schedule_score(any_redis, keys, "s1")
    assert due is not None
    assert due <= now + IDLE_MS

    monkeypatch.undo()
    for at in range(now, now + IDLE_MS, 5_000):
        await sweeper.sweep(at)
    await sweeper.sweep(now + IDLE_MS - 1)
    assert await tap.drain() == []
    await sweeper.sweep(now + IDLE_MS)
    assert kinds(await tap.drain()) == [(USER_IDLE, "alice")]


async def test_join_racing_the_sweep_that_empties_the_study(
    any_redis: Any, keys: Keys, tap: EventTap, t0: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep finds the study empty, but someone joins before it unschedules the study."""
    sweeper = RedisStore(any_redis, keys, THRESHOLDS)
    other_node = RedisStore(any_redis, keys, THRESHOLDS)
    await other_node.heartbeat("alice", "s1", NO_CURSOR, t0)
    await tap.drain()
    now = t0 + EXPIRE_MS

    async def join() -> None:
        await other_node.heartbeat("bob", "s1", NO_CURSOR, now)

    hook_before(monkeypatch, sweeper, 2, join)
    assert await sweeper.sweep(now) == SweepReport(studies=1, events=1)
    assert kinds(await tap.drain()) == [(USER_LEFT, "alice"), (USER_JOINED, "bob")]
    due = await schedule_score(any_redis, keys, "s1")
    assert due is not None
    assert due <= now + IDLE_MS
    assert await any_redis.pttl(keys.study("s1").meta) == -1

    monkeypatch.undo()
    await sweeper.sweep(now + IDLE_MS - 1)
    assert await tap.drain() == []
    await sweeper.sweep(now + IDLE_MS)
    assert kinds(await tap.drain()) == [(USER_IDLE, "bob")]


# --- leave ------------------------------------------------------------------------------------


async def test_leave_publishes_user_left_once(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    alice = await store.heartbeat("alice", "s1", both("ch1", "m1"), t0)
    await store.heartbeat("bob", "s1", NO_CURSOR, t0 + 1)
    await tap.drain()
    sk = keys.study("s1")

    assert await store.leave("alice", "s1", t0 + 5_000) is True
    [left] = await tap.drain()
    assert left.type == USER_LEFT
    assert left.data == {
        "session_id": alice.session_id,
        "user_id": "alice",
        "study_id": "s1",
        "chapter_id": "ch1",
        "move_path": "m1",
        "status": "active",
        "previous_status": None,
        "timestamp": iso_from_ms(t0 + 5_000),
        "seq": 3,
    }
    assert left.ts == t0 + 5_000
    assert not await any_redis.exists(sk.session("alice"))
    assert await any_redis.zscore(sk.index, "alice") is None
    assert [s.user_id for s in (await store.presence("s1")).sessions] == ["bob"]

    assert await store.leave("alice", "s1", t0 + 6_000) is False
    assert await store.leave("nobody", "s1", t0 + 6_000) is False
    assert await tap.drain() == []
    assert await any_redis.hget(sk.meta, "seq") == b"3"
    assert await any_redis.pttl(sk.meta) == -1  # bob is still there


async def test_leave_while_idle_reports_idle(store: RedisStore, tap: EventTap, t0: int) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    await store.sweep(t0 + IDLE_MS)
    await tap.drain()
    assert await store.leave("alice", "s1", t0 + IDLE_MS + 1) is True
    [left] = await tap.drain()
    assert (left.type, left.status, left.seq) == (USER_LEFT, "idle", 3)


async def test_leave_of_unknown_study_creates_nothing(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    assert await store.leave("alice", "nowhere", t0) is False
    assert await tap.drain() == []
    assert [k async for k in any_redis.scan_iter(match=f"{keys.prefix}:*")] == []


async def test_leave_then_sweep_unschedules_the_empty_study(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    await store.leave("alice", "s1", t0 + 1)
    await tap.drain()
    assert await schedule_score(any_redis, keys, "s1") == t0 + IDLE_MS
    assert await store.sweep(t0 + IDLE_MS) == SweepReport(studies=1, events=0)
    assert await tap.drain() == []
    assert await schedule_score(any_redis, keys, "s1") is None
    assert await store.presence("s1") == StudyPresence("s1", (), 2)


async def test_rejoin_after_leave_is_a_new_session_and_seq_goes_on(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    first = await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    await store.leave("alice", "s1", t0 + 1_000)
    again = await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 2_000)
    assert again.session_id != first.session_id
    assert again.joined_at_ms == t0 + 2_000
    events = await tap.drain()
    assert [(e.type, e.seq, e.data["session_id"]) for e in events] == [
        (USER_JOINED, 1, first.session_id),
        (USER_LEFT, 2, first.session_id),
        (USER_JOINED, 3, again.session_id),
    ]
    assert await any_redis.pttl(keys.study("s1").meta) == -1


async def test_empty_study_meta_expires_and_a_present_one_does_not(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    meta = keys.study("s1").meta
    await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    await store.heartbeat("bob", "s1", NO_CURSOR, t0 + 10)
    assert await any_redis.pttl(meta) == -1
    await store.leave("alice", "s1", t0 + 20)
    assert await any_redis.pttl(meta) == -1
    await store.leave("bob", "s1", t0 + 30)
    assert 0 < await any_redis.pttl(meta) <= EMPTY_STUDY_TTL_MS
    assert await any_redis.hget(meta, "seq") == b"4"

    await store.heartbeat("carol", "s1", NO_CURSOR, t0 + 40)
    assert await any_redis.pttl(meta) == -1
    await store.sweep(t0 + 40 + EXPIRE_MS)  # carol expires: empty again
    assert 0 < await any_redis.pttl(meta) <= EMPTY_STUDY_TTL_MS
    assert (await store.presence("s1")).seq == 6
    assert [e.type for e in await tap.drain()] == [
        USER_JOINED,
        USER_JOINED,
        USER_LEFT,
        USER_LEFT,
        USER_JOINED,
        USER_LEFT,
    ]


# --- presence ---------------------------------------------------------------------------------


async def test_presence_of_unknown_study_is_empty_with_seq_zero(store: RedisStore) -> None:
    presence = await store.presence("nobody-here")
    assert presence == StudyPresence("nobody-here", (), 0)
    assert presence.to_json() == {
        "study_id": "nobody-here",
        "users": [],
        "total": 0,
        "counts": {"active": 0, "idle": 0, "away": 0},
        "seq": 0,
        "complete": True,
    }


async def test_presence_is_sorted_by_joined_at_with_the_last_seq(
    store: RedisStore, tap: EventTap, t0: int
) -> None:
    returned: dict[str, Session] = {}
    for offset, user in [(0, "carol"), (1_000, "alice"), (2_000, "dave"), (2_000, "bob")]:
        returned[user] = await store.heartbeat(user, "s1", NO_CURSOR, t0 + offset)
    # Later heartbeats change last_heartbeat, not the order.
    returned["carol"] = await store.heartbeat("carol", "s1", both("ch1", "m1"), t0 + 5_000)
    returned["alice"] = await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 6_000)
    events = await tap.drain()

    presence = await store.presence("s1")
    assert [s.user_id for s in presence.sessions] == ["carol", "alice", "bob", "dave"]
    assert presence.seq == events[-1].seq == 5
    for session in presence.sessions:
        assert session == returned[session.user_id]
    as_json = presence.to_json()
    assert as_json["total"] == 4
    assert [u["user_id"] for u in as_json["users"]] == ["carol", "alice", "bob", "dave"]
    assert as_json["users"][0]["last_heartbeat"] == iso_from_ms(t0 + 5_000)
    assert as_json["users"][0]["joined_at"] == iso_from_ms(t0)

    await store.sweep(t0 + IDLE_MS + 2_000)  # bob, dave idle; carol, alice not yet
    events = await tap.drain()
    presence = await store.presence("s1")
    assert presence.seq == events[-1].seq == 7
    assert {s.user_id: s.status for s in presence.sessions} == {
        "carol": Status.ACTIVE,
        "alice": Status.ACTIVE,
        "bob": Status.IDLE,
        "dave": Status.IDLE,
    }


async def test_presence_retries_when_membership_changes_under_it(
    store: RedisStore, tap: EventTap, any_redis: Any, t0: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A join between the plain ZRANGE and the snapshot script is seen, with its seq."""
    await store.heartbeat("alice", "s1", NO_CURSOR, t0)
    original = any_redis.zrange
    calls = 0

    async def zrange_then_join(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        members = await original(*args, **kwargs)
        await store.heartbeat("bob", "s1", NO_CURSOR, t0 + 1)
        return members

    monkeypatch.setattr(any_redis, "zrange", zrange_then_join)
    presence = await store.presence("s1")
    monkeypatch.undo()
    assert calls == 1
    assert [s.user_id for s in presence.sessions] == ["alice", "bob"]
    assert presence.seq == 2
    assert [e.seq for e in await tap.drain()] == [1, 2]


@dataclass
class ModelSession:
    session_id: str
    chapter: str | None
    move: str | None
    status: str
    last: int
    joined: int = field(compare=False)


async def test_random_operations_match_a_reference_model(
    store: RedisStore, tap: EventTap, t0: int
) -> None:
    """Random heartbeats, leaves and sweeps: the events and presence a simple model predicts."""
    rng = random.Random(20240611)
    studies = ["r1", "r2"]
    users = [f"u{i}" for i in range(5)]
    model: dict[str, dict[str, ModelSession]] = {s: {} for s in studies}
    now = t0
    for _ in range(160):
        now += rng.choice([0, 1, 700, 5_000, 25_000, 60_000, 150_000])
        study, user = rng.choice(studies), rng.choice(users)
        roll = rng.random()
        expected: list[tuple[str, str, str]] = []  # (type, study, user)
        if roll < 0.6:
            update = rng.choice(
                [
                    NO_CURSOR,
                    chapter_only(rng.choice([None, "c1", "c2"])),
                    move_only(rng.choice([None, "m1", "m2"])),
                    both(rng.choice([None, "c1"]), rng.choice([None, "m1"])),
                ]
            )
            old = model[study].get(user)
            session = await store.heartbeat(user, study, update, now)
            if old is None:
                expected.append((USER_JOINED, study, user))
                old = ModelSession(session.session_id, None, None, "active", now, now)
                model[study][user] = old
            chapter = update.chapter_id if update.sets_chapter else old.chapter
            move = update.move_path if update.sets_move_path else old.move
            if old.status != "active":
                expected.append((USER_ACTIVE, study, user))
            if (chapter, move) != (old.chapter, old.move) and expected[-1:] != [
                (USER_JOINED, study, user)
            ]:
                expected.append((CURSOR_MOVED, study, user))
            old.chapter, old.move, old.status = chapter, move, "active"
            old.last = max(old.last, now)
            assert (session.session_id, session.chapter_id, session.move_path) == (
                old.session_id,
                chapter,
                move,
            )
        elif roll < 0.72:
            ended = await store.leave(user, study, now)
            assert ended == (user in model[study])
            if model[study].pop(user, None) is not None:
                expected.append((USER_LEFT, study, user))
        else:
            report = await store.sweep(now)
            for s in studies:
                for u, m in sorted(model[s].items()):
                    age = now - m.last
                    if age >= EXPIRE_MS:
                        expected.append((USER_LEFT, s, u))
                        del model[s][u]
                    elif age >= AWAY_MS and m.status != "away":
                        expected.append((USER_AWAY, s, u))
                        m.status = "away"
                    elif age >= IDLE_MS and m.status == "active":
                        expected.append((USER_IDLE, s, u))
                        m.status = "idle"
            assert report.events == len(expected)
            assert not report.more_due

        events = await tap.drain()
        assert sorted((e.type, e.study, e.user) for e in events) == sorted(expected)
        for study_id in studies:
            presence = await store.presence(study_id)
            assert presence.seq == tap.seq_of(study_id)
            assert {
                s.user_id: ModelSession(
                    s.session_id, s.chapter_id, s.move_path, s.status.value, s.last_heartbeat_ms, 0
                )
                for s in presence.sessions
            } == model[study_id]
    assert sum(tap.seq_of(s) for s in studies) > 100


# --- scale and batching -----------------------------------------------------------------------


async def test_many_studies_and_sessions(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    studies = [f"study-{i:02d}" for i in range(30)]
    users = [f"user-{j}" for j in range(10)]
    pairs = [(s, u, t0 + 1_000 * j + i) for i, s in enumerate(studies) for j, u in enumerate(users)]
    for start in range(0, len(pairs), 50):
        await asyncio.gather(
            *(store.heartbeat(u, s, NO_CURSOR, at) for s, u, at in pairs[start : start + 50])
        )
    joined = await tap.drain()
    assert len(joined) == 300
    assert set(await whole_schedule(any_redis, keys)) == set(studies)

    # Half-way through the idle threshold of the users: only the first five of each study.
    report = await store.sweep(t0 + IDLE_MS + 4_500)
    assert report == SweepReport(studies=30, events=150)
    events = await tap.drain()
    assert {e.type for e in events} == {USER_IDLE}
    assert Counter(e.user for e in events) == Counter({f"user-{j}": 30 for j in range(5)})

    expected_seq = 10
    for now, event_type, count in [
        (t0 + IDLE_MS + 10_000, USER_IDLE, 150),
        (t0 + AWAY_MS + 10_000, USER_AWAY, 300),
        (t0 + EXPIRE_MS + 10_000, USER_LEFT, 300),
    ]:
        expected_seq += count // 30
        report = await store.sweep(now)
        assert report == SweepReport(studies=30, events=count)
        events = await tap.drain()
        assert len(events) == count
        assert {e.type for e in events} == {event_type}
        assert len({(e.study, e.user) for e in events}) == count
        assert (await store.sweep(now)).events == 0
        assert await tap.drain() == []

    for study in studies:
        assert tap.seq_of(study) == 40
        assert await store.presence(study) == StudyPresence(study, (), 40)
    assert await whole_schedule(any_redis, keys) == {}


def studies_in_one_shard(keys: Keys, count: int) -> list[str]:
    found: dict[str, list[str]] = {}
    for n in range(10_000):
        study = f"b{n}"
        group = found.setdefault(keys.schedule(study), [])
        group.append(study)
        if len(group) == count:
            return group
    raise AssertionError("no shard with enough studies")


async def sweep_until_done(
    store: RedisStore, tap: EventTap, now: int, max_sweeps: int = 50
) -> tuple[list[SweepReport], list[list[Event]]]:
    reports: list[SweepReport] = []
    batches: list[list[Event]] = []
    for _ in range(max_sweeps):
        report = await store.sweep(now)
        batch = await tap.drain()
        assert report.events == len(batch)
        if report.studies == 0:
            return reports, batches
        reports.append(report)
        batches.append(batch)
    pytest.fail(f"still due after {max_sweeps} sweeps: {reports[-3:]}")


@pytest.mark.parametrize("same_ms", [False, True], ids=["distinct-ms", "same-ms"])
async def test_batch_limits_cut_sweeps_but_every_transition_happens(
    any_redis: Any, keys: Keys, tap: EventTap, t0: int, same_ms: bool
) -> None:
    store = RedisStore(any_redis, keys, THRESHOLDS, studies_per_sweep=2, sessions_per_window=3)
    studies = studies_in_one_shard(keys, 5)
    users = [f"u{j}" for j in range(7)]
    for study in studies:
        for j, user in enumerate(users):
            await store.heartbeat(user, study, NO_CURSOR, t0 if same_ms else t0 + 10 * j)
    await tap.drain()
    everyone = Counter((s, u) for s in studies for u in users)

    for now, event_type in [
        (t0 + IDLE_MS + 1_000, USER_IDLE),
        (t0 + AWAY_MS + 1_000, USER_AWAY),
        (t0 + EXPIRE_MS + 1_000, USER_LEFT),
    ]:
        reports, batches = await sweep_until_done(store, tap, now)
        events = [e for batch in batches for e in batch]
        assert {e.type for e in events} == {event_type}
        assert Counter((e.study, e.user) for e in events) == everyone
        assert len(reports) > 1
        # Cut: every sweep but the last tells the sweeper to go on at once.
        assert all(r.more_due for r in reports[:-1])
        for report, batch in zip(reports, batches, strict=True):
            assert report.studies <= 2  # studies_per_sweep, all in one shard
            per_study = Counter(e.study for e in batch)
            # Each window reads at most 3 sessions, plus any sharing the cut's last score.
            assert max(per_study.values(), default=0) <= (7 if same_ms else 3)
    for study in studies:
        assert await store.presence(study) == StudyPresence(study, (), 28)
    assert await whole_schedule(any_redis, keys) == {}


async def test_sessions_window_cut_reports_more_due(
    any_redis: Any, keys: Keys, tap: EventTap, t0: int
) -> None:
    store = RedisStore(any_redis, keys, THRESHOLDS, sessions_per_window=3)
    for j in range(8):
        await store.heartbeat(f"u{j}", "big", NO_CURSOR, t0 + j)
    await tap.drain()
    now = t0 + IDLE_MS + 100
    reports, batches = await sweep_until_done(store, tap, now)
    assert [len(b) for b in batches] == [3, 3, 2]
    assert [r.more_due for r in reports] == [True, True, False]
    assert sorted(e.user for b in batches for e in b) == [f"u{j}" for j in range(8)]


# --- keys -------------------------------------------------------------------------------------


async def test_keys_of_a_study_share_its_hash_tag(
    store: RedisStore, any_redis: Any, keys: Keys, t0: int
) -> None:
    for study in ("s1", "study:2@x"):
        for user in ("alice", "bob:1"):
            await store.heartbeat(user, study, NO_CURSOR, t0)
    await store.sweep(t0 + IDLE_MS)

    stored = sorted([k.decode() async for k in any_redis.scan_iter(match=f"{keys.prefix}:*")])
    expected: list[str] = []
    for study in ("s1", "study:2@x"):
        sk = keys.study(study)
        study_keys = [sk.index, sk.meta, sk.session("alice"), sk.session("bob:1")]
        expected += study_keys
        for key in [*study_keys, sk.channel]:
            assert hash_tag(key) == study
            assert key_slot(key.encode()) == key_slot(study.encode())
        assert sk.channel == keys.channel(study)
    schedule_keys = sorted({keys.schedule("s1"), keys.schedule("study:2@x")})
    assert stored == sorted(expected + schedule_keys)
    for key in schedule_keys:
        assert hash_tag(key).startswith("schedule:")
        assert key in keys.schedule_shards()
    assert len(keys.schedule_shards()) == SCHEDULE_SHARDS


# --- a hold by a released connection ----------------------------------------------------------
# A heartbeat sent before its connection's release can reach Redis after it (a stall); the
# scripts then refuse it the hold (release.lua keeps the released ids).

GRACE_MS = 10_000


def on(conn: str) -> Holder:
    return Holder("n1", conn)


async def conns_of(client: Any, keys: Keys, study: str, user: str) -> set[str]:
    return {m.decode() for m in await client.smembers(keys.study(study).conns(user))}


async def leaving(client: Any, keys: Keys, study: str) -> dict[str, int]:
    rows = await client.zrange(keys.study(study).leaving, 0, -1, withscores=True)
    return {m.decode(): int(score) for m, score in rows}


async def released_ids(client: Any, keys: Keys, study: str, user: str) -> list[str]:
    return [m.decode() for m in await client.zrange(keys.study(study).released(user), 0, -1)]


async def test_a_heartbeat_applied_after_its_connection_s_release_holds_nothing(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    first = await store.heartbeat("alice", "s1", both("ch1", "m1"), t0, on("c1"))
    await tap.drain()
    leave_at = t0 + 2_000 + GRACE_MS
    assert await store.release([Lease("s1", "alice", on("c1"))], leave_at, t0 + 2_000) == 1

    # Sent at t0 + 1 s, before the release, with a cursor move: it still counts as a heartbeat
    # of alice, but the grace her release started runs on.
    late = await store.heartbeat("alice", "s1", both("ch1", "m2"), t0 + 1_000, on("c1"))
    assert late.session_id == first.session_id
    assert (late.move_path, late.last_heartbeat_ms) == ("m2", t0 + 1_000)
    assert kinds(await tap.drain()) == [(CURSOR_MOVED, "alice")]
    assert await conns_of(any_redis, keys, "s1", "alice") == set()
    assert await leaving(any_redis, keys, "s1") == {"alice": leave_at}

    assert (await store.sweep(leave_at - 1)).events == 0
    assert (await store.sweep(leave_at)).events == 1
    assert kinds(await tap.drain()) == [(USER_LEFT, "alice")]


async def test_a_release_that_overtook_the_first_heartbeat_leaves_it_no_session(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    leave_at = t0 + GRACE_MS
    assert await store.release([Lease("s1", "alice", on("c1"))], leave_at, t0) == 0
    assert await released_ids(any_redis, keys, "s1", "alice") == ["c1"]

    # Its socket is closed by now: like any late heartbeat under a released id that would
    # start a session, it starts none (a join of a gone socket, then its leave, is a flap).
    late = await store.heartbeat("alice", "s1", NO_CURSOR, t0 - 500, on("c1"))
    assert late.session_id == ""
    await assert_nothing_stored(store, tap, any_redis, keys, "s1", "alice")


async def test_a_late_heartbeat_of_one_tab_leaves_the_other_tab_s_hold_and_new_ids_hold(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, t0, on("c1"))
    await store.heartbeat("alice", "s1", NO_CURSOR, t0, on("c2"))
    assert await store.release([Lease("s1", "alice", on("c1"))], t0 + GRACE_MS, t0) == 0
    await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 1, on("c1"))
    assert await conns_of(any_redis, keys, "s1", "alice") == {"c2"}
    assert await leaving(any_redis, keys, "s1") == {}

    # The last tab closes; a new connection (a reconnect) within the grace holds again.
    assert await store.release([Lease("s1", "alice", on("c2"))], t0 + 2 + GRACE_MS, t0 + 2) == 1
    await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 3, on("c3"))
    assert await conns_of(any_redis, keys, "s1", "alice") == {"c3"}
    assert await leaving(any_redis, keys, "s1") == {}
    await store.sweep(t0 + 2 + GRACE_MS)
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]
    assert await released_ids(any_redis, keys, "s1", "alice") == ["c1", "c2"]


async def assert_nothing_stored(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, study: str, user: str
) -> None:
    """No session of `user` in `study`, and nothing published."""
    sk = keys.study(study)
    assert await any_redis.exists(sk.session(user)) == 0
    assert await any_redis.zscore(sk.index, user) is None
    assert await conns_of(any_redis, keys, study, user) == set()
    assert await leaving(any_redis, keys, study) == {}
    assert (await store.presence(study)).sessions == ()
    assert kinds(await tap.drain()) == []


@pytest.mark.parametrize("ended_by", ["sweep", "leave"])
async def test_the_released_ids_outlive_the_session(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int, ended_by: str
) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, t0, on("c1"))
    leave_at = t0 + GRACE_MS
    await store.release([Lease("s1", "alice", on("c1"))], leave_at, t0)
    if ended_by == "sweep":
        await store.sweep(leave_at)
    else:
        assert await store.leave("alice", "s1", t0 + 1)
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice"), (USER_LEFT, "alice")]
    meta = keys.study("s1").meta
    seq = await any_redis.hget(meta, "seq")
    assert await any_redis.pttl(meta) > 0  # the study is empty

    # Past the session's end the late heartbeat of the long closed socket brings nothing back
    # (no user_joined, no ghost listed until the next sweep), and writes nothing.
    late = await store.heartbeat("alice", "s1", both("ch1", "m1"), leave_at + 5, on("c1"))
    assert late.session_id == ""  # the heartbeat's session was not stored
    await assert_nothing_stored(store, tap, any_redis, keys, "s1", "alice")
    assert await any_redis.hget(meta, "seq") == seq
    assert await any_redis.pttl(meta) > 0
    assert await released_ids(any_redis, keys, "s1", "alice") == ["c1"]

    # A new connection (or a REST heartbeat) starts her next session as usual.
    again = await store.heartbeat("alice", "s1", NO_CURSOR, leave_at + 6, on("c2"))
    assert again.session_id not in ("", late.session_id)
    assert await conns_of(any_redis, keys, "s1", "alice") == {"c2"}
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]


async def test_acquire_refuses_a_released_id_and_holds_under_a_fresh_one(
    store: RedisStore, tap: EventTap, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, t0, on("c1"))
    leave_at = t0 + GRACE_MS
    await store.release([Lease("s1", "alice", on("c1"))], leave_at, t0)

    assert await store.reacquire([Lease("s1", "alice", on("c1"))]) == [False]
    assert await conns_of(any_redis, keys, "s1", "alice") == set()
    assert await leaving(any_redis, keys, "s1") == {"alice": leave_at}
    assert await store.reacquire([Lease("s1", "alice", Holder("n2", "c9"))]) == [True]
    assert await conns_of(any_redis, keys, "s1", "alice") == {"c9"}
    assert await leaving(any_redis, keys, "s1") == {}
    await store.sweep(leave_at)
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]


async def test_a_second_release_of_a_connection_keeps_the_first_leave_time(
    store: RedisStore, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, t0, on("c1"))
    key = keys.study("s1").released("alice")
    leave_at = t0 + GRACE_MS
    assert await store.release([Lease("s1", "alice", on("c1"))], leave_at, t0) == 1
    # The lease-set pass releasing the lease again, later and with a longer grace.
    later = t0 + 5_000
    assert await store.release([Lease("s1", "alice", on("c1"))], later + 10 * GRACE_MS, later) == 0

    assert await any_redis.zscore(key, "c1") == leave_at
    assert RELEASED_KEEP_MS < await any_redis.pttl(key) <= GRACE_MS + RELEASED_KEEP_MS
    # A REST heartbeat calls the leave off; then a late one under c1 leaves at the first
    # release's leave time, not the second's.
    await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 6_000)
    assert await leaving(any_redis, keys, "s1") == {}
    await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 1_000, on("c1"))
    assert await leaving(any_redis, keys, "s1") == {"alice": leave_at}


async def test_released_ids_are_bounded_in_number_and_age(
    store: RedisStore, any_redis: Any, keys: Keys, t0: int
) -> None:
    await store.heartbeat("alice", "s1", NO_CURSOR, t0, on("kept"))
    key = keys.study("s1").released("alice")
    extra = 5
    for i in range(RELEASED_MAX + extra):
        now = t0 + i
        await store.release([Lease("s1", "alice", on(f"c{i}"))], now + GRACE_MS, now)
    ids = await released_ids(any_redis, keys, "s1", "alice")
    assert ids == [f"c{i}" for i in range(extra, RELEASED_MAX + extra)]  # the newest only
    # The set expires with its newest id: kept_ms past the last release's leave time.
    assert RELEASED_KEEP_MS < await any_redis.pttl(key) <= GRACE_MS + RELEASED_KEEP_MS
    assert await conns_of(any_redis, keys, "s1", "alice") == {"kept"}

    last_leave = t0 + RELEASED_MAX + extra - 1 + GRACE_MS
    later = last_leave + RELEASED_KEEP_MS + 1
    await store.release([Lease("s1", "alice", on("last"))], later + GRACE_MS, later)
    assert await released_ids(any_redis, keys, "s1", "alice") == ["last"]


# --- Redis unreachable ------------------------------------------------------------------------


async def test_unreachable_redis_is_store_unavailable(t0: int) -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        store = RedisStore(client, Keys("p"), THRESHOLDS)
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.heartbeat("alice", "s1", NO_CURSOR, t0),
            lambda: store.leave("alice", "s1", t0),
            lambda: store.presence("s1"),
            lambda: store.sweep(t0),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable):
                await call()
    finally:
        await client.aclose()
