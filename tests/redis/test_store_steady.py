"""Steady heartbeats (issue 14): a socket's heartbeat after one that held its session.

RedisStore.heartbeat(..., steady=True) runs heartbeat.lua alone, without the lease SADD and
schedule.lua. Each edge where what the node believes is no longer so: a reap or a release of
the holder, the session ended or left without its connection set, a sweep that turned it
idle or away and rescheduled the study later, a sweep in flight. On fakeredis, a real Redis
and a Redis Cluster (`any_redis`), except the command count, on a private redis-server.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from presence_svc.models import (
    CURSOR_MOVED,
    USER_ACTIVE,
    USER_AWAY,
    USER_IDLE,
    USER_JOINED,
    USER_LEFT,
    CursorUpdate,
    Holder,
    Status,
)
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from tests.support.events import ClusterEventTap, EventTap, kinds
from tests.support.leases import (
    GRACE_MS,
    holders,
    lease,
    pending_leaves,
    smembers,
    users_of,
)
from tests.support.processes import RedisServer
from tests.support.store import (
    AWAY_MS,
    IDLE_MS,
    NO_CURSOR,
    THRESHOLDS,
    both,
    schedule_score,
)

Tap = EventTap | ClusterEventTap
HOLDER = Holder("n1", "c1")


class Sent:
    """The operations the store hands its batcher: each a list of command names."""

    def __init__(self, store: RedisStore) -> None:
        self.operations: list[list[str]] = []
        batch: Any = store._batch
        run = batch.run

        def recording(commands: list[tuple[Any, ...]], *args: Any) -> Any:
            self.operations.append([str(c[0]) for c in commands])
            return run(commands, *args)

        batch.run = recording

    def take(self) -> list[list[str]]:
        taken, self.operations = self.operations, []
        return taken


FULL = ["SADD", "EVALSHA", "EVALSHA"]  # lease, heartbeat.lua, schedule.lua
STEADY = ["EVALSHA"]  # heartbeat.lua


async def held(store: RedisStore, now_ms: int, user: str = "alice", study: str = "s1") -> None:
    """The socket's first heartbeat: a full one, which holds the session."""
    session = await store.heartbeat(user, study, NO_CURSOR, now_ms, HOLDER)
    assert session.session_id


async def test_a_steady_heartbeat_is_one_script_and_changes_what_a_full_one_would(
    store: RedisStore, any_redis: Any, keys: Keys, tap: Tap, t0: int
) -> None:
    sent = Sent(store)
    first = await store.heartbeat("alice", "s1", both("ch1", "main.1"), t0, HOLDER)
    assert sent.take() == [FULL]
    session = await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 1000, HOLDER, steady=True)
    assert sent.take() == [STEADY]
    assert (session.session_id, session.chapter_id, session.move_path, session.status) == (
        first.session_id,
        "ch1",
        "main.1",
        Status.ACTIVE,
    )
    sk = keys.study("s1")
    stored = {
        k.decode(): v.decode() for k, v in (await any_redis.hgetall(sk.session("alice"))).items()
    }
    assert stored == {
        "session_id": first.session_id,
        "user_id": "alice",
        "study_id": "s1",
        "chapter_id": "ch1",
        "move_path": "main.1",
        "status": "active",
        "last_heartbeat": str(t0 + 1000),
        "joined_at": str(t0),
    }
    assert await any_redis.zscore(sk.index, "alice") == t0 + 1000
    assert await holders(any_redis, keys, "s1", "alice") == {"c1"}
    assert await smembers(any_redis, keys.node_leases("n1")) == {"s1 alice c1"}
    # The first heartbeat's due time stands: early, never late, for this one.
    assert await schedule_score(any_redis, keys, "s1") == t0 + IDLE_MS

    # A cursor moved and cleared by steady heartbeats: the events, and the fields it removes.
    moved = CursorUpdate(
        chapter_id=None, move_path="main.2", sets_chapter=True, sets_move_path=True
    )
    session = await store.heartbeat("alice", "s1", moved, t0 + 2000, HOLDER, steady=True)
    assert sent.take() == [STEADY]
    assert (session.chapter_id, session.move_path) == (None, "main.2")
    assert await any_redis.hget(sk.session("alice"), "chapter_id") is None
    assert (await any_redis.hget(sk.session("alice"), "move_path")) == b"main.2"
    events = await tap.drain()
    assert kinds(events) == [(USER_JOINED, "alice"), (CURSOR_MOVED, "alice")]
    assert [e.data["seq"] for e in events] == [1, 2]
    assert await any_redis.ttl(sk.meta) == -1


async def test_the_study_still_goes_idle_on_time_after_steady_heartbeats(
    store: RedisStore, any_redis: Any, keys: Keys, tap: Tap, t0: int
) -> None:
    await held(store, t0)
    last = t0 + IDLE_MS - 1
    await store.heartbeat("alice", "s1", NO_CURSOR, last, HOLDER, steady=True)
    # Due by the first heartbeat: the sweep then finds nothing due and reschedules by the last.
    assert (await store.sweep(t0 + IDLE_MS)).events == 0
    assert await schedule_score(any_redis, keys, "s1") == last + IDLE_MS
    assert (await store.sweep(last + IDLE_MS - 1)).events == 0
    assert (await store.sweep(last + IDLE_MS)).events == 1
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice"), (USER_IDLE, "alice")]


async def test_a_steady_heartbeat_while_a_sweep_is_in_flight_keeps_its_due_time(
    store: RedisStore, any_redis: Any, keys: Keys, tap: Tap, t0: int
) -> None:
    # The sweep read the study (alice due for idle), then the heartbeat, then the sweep applies
    # and reschedules: what it applies and where it puts the study both follow the heartbeat.
    await held(store, t0)
    sweep: Any = store._sweep
    now = t0 + IDLE_MS
    [due], _ = await sweep._due_studies(now)
    [scan] = await sweep._run_each([sweep._scan(due, now)])
    assert b"alice" in scan[3:]
    await store.heartbeat("alice", "s1", NO_CURSOR, now, HOLDER, steady=True)
    [applied] = await sweep._run_each([sweep._apply(due, scan, now)])
    await sweep._run_each([sweep._reschedule(due, applied)])
    assert int(applied[0]) == 0
    assert await schedule_score(any_redis, keys, "s1") == now + IDLE_MS
    assert (await store.sweep(now + IDLE_MS)).events == 1
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice"), (USER_IDLE, "alice")]


@pytest.mark.parametrize("away", [False, True])
async def test_a_steady_heartbeat_of_an_idle_or_away_session_schedules_its_own_due_time(
    store: RedisStore, any_redis: Any, keys: Keys, tap: Tap, t0: int, away: bool
) -> None:
    # The sweep that turned alice idle (or away) moved the study to her next threshold, far
    # later than this heartbeat's due time: the store brings it back after the write.
    await held(store, t0)
    swept = t0 + (AWAY_MS if away else IDLE_MS)
    await store.sweep(t0 + IDLE_MS)
    if away:
        await store.sweep(swept)
    assert (await schedule_score(any_redis, keys, "s1") or 0) > swept + IDLE_MS
    sent = Sent(store)
    session = await store.heartbeat("alice", "s1", NO_CURSOR, swept, HOLDER, steady=True)
    assert sent.take() == [STEADY, ["EVALSHA"]]
    assert session.status == Status.ACTIVE
    assert await schedule_score(any_redis, keys, "s1") == swept + IDLE_MS
    assert (await store.sweep(swept + IDLE_MS - 1)).events == 0
    assert (await store.sweep(swept + IDLE_MS)).events == 1
    events = await tap.drain()
    before = [(USER_IDLE, "alice")] + ([(USER_AWAY, "alice")] if away else [])
    assert kinds(events) == [
        (USER_JOINED, "alice"),
        *before,
        (USER_ACTIVE, "alice"),
        (USER_IDLE, "alice"),
    ]
    assert events[-2].data["previous_status"] == ("away" if away else "idle")


async def test_a_steady_heartbeat_after_a_reap_holds_nothing_and_the_session_leaves(
    store: RedisStore, any_redis: Any, keys: Keys, tap: Tap, t0: int
) -> None:
    # A peer reaped the node (it was paused); its socket heartbeats on before it learns so.
    await held(store, t0)
    leave_at = t0 + 1000 + GRACE_MS
    assert await store.release([lease("s1", "alice", "c1")], leave_at, t0 + 1000) == 1
    sent = Sent(store)
    session = await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 2000, HOLDER, steady=True)
    # Refused without a write, then sent whole: applied as a released holder's heartbeat.
    assert sent.take() == [STEADY, FULL]
    assert session.session_id and session.last_heartbeat_ms == t0 + 2000
    assert await holders(any_redis, keys, "s1", "alice") == set()
    assert await pending_leaves(any_redis, keys, "s1") == {"alice": leave_at}
    assert (await store.sweep(leave_at - 1)).events == 0
    assert (await store.sweep(leave_at)).events == 1
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice"), (USER_LEFT, "alice")]
    # Later steady heartbeats of that holder start nothing: no ghost.
    late = await store.heartbeat("alice", "s1", NO_CURSOR, leave_at + 1, HOLDER, steady=True)
    assert late.session_id == ""
    assert await users_of(store, "s1") == {}
    assert await tap.drain() == []


async def test_a_reacquired_session_is_held_again_by_the_new_holder_then_steady(
    store: RedisStore, any_redis: Any, keys: Keys, tap: Tap, t0: int
) -> None:
    # Declared dead, the node holds its sessions again under new ids (leases._come_back).
    await held(store, t0)
    await store.release([lease("s1", "alice", "c1")], t0 + GRACE_MS, t0)
    again = Holder("n2", "c2")
    assert await store.reacquire([lease("s1", "alice", "c2", node="n2")]) == [True]
    sent = Sent(store)
    await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 1000, again, steady=True)
    assert sent.take() == [STEADY]
    assert await holders(any_redis, keys, "s1", "alice") == {"c2"}
    assert await pending_leaves(any_redis, keys, "s1") == {}
    assert (await store.sweep(t0 + GRACE_MS)).events == 0
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]


async def test_a_steady_heartbeat_after_the_session_ended_starts_one_it_holds(
    store: RedisStore, any_redis: Any, keys: Keys, tap: Tap, t0: int
) -> None:
    # The user left over REST while the socket stayed open (or a sweep ended the session).
    await held(store, t0)
    await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 500, HOLDER, steady=True)
    assert await store.leave("alice", "s1", t0 + 1000)
    await any_redis.srem(keys.node_leases("n1"), "s1 alice c1")  # a failover lost the listing
    sent = Sent(store)
    session = await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 2000, HOLDER, steady=True)
    assert sent.take() == [STEADY, FULL]
    assert session.joined_at_ms == t0 + 2000
    assert await holders(any_redis, keys, "s1", "alice") == {"c1"}
    assert await smembers(any_redis, keys.node_leases("n1")) == {"s1 alice c1"}
    due = await schedule_score(any_redis, keys, "s1")
    assert due is not None and due <= t0 + 2000 + IDLE_MS
    assert await any_redis.ttl(keys.study("s1").meta) == -1
    assert kinds(await tap.drain()) == [
        (USER_JOINED, "alice"),
        (USER_LEFT, "alice"),
        (USER_JOINED, "alice"),
    ]


async def test_a_connection_set_without_its_session_is_put_right_by_the_full_heartbeat(
    store: RedisStore, any_redis: Any, keys: Keys, tap: Tap, t0: int
) -> None:
    await any_redis.sadd(keys.study("s1").conns("alice"), "c1")
    sent = Sent(store)
    session = await store.heartbeat("alice", "s1", NO_CURSOR, t0, HOLDER, steady=True)
    assert sent.take() == [STEADY, FULL]
    assert session.session_id
    assert await smembers(any_redis, keys.node_leases("n1")) == {"s1 alice c1"}
    assert kinds(await tap.drain()) == [(USER_JOINED, "alice")]


async def test_steady_heartbeats_of_another_connection_do_not_hold_for_it(
    store: RedisStore, any_redis: Any, keys: Keys, tap: Tap, t0: int
) -> None:
    # c1 holds; c2's first heartbeat wrongly called steady must still list and hold c2.
    await held(store, t0)
    other = Holder("n1", "c2")
    sent = Sent(store)
    await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 1, other, steady=True)
    assert sent.take() == [STEADY, FULL]
    assert await holders(any_redis, keys, "s1", "alice") == {"c1", "c2"}
    assert await smembers(any_redis, keys.node_leases("n1")) == {"s1 alice c1", "s1 alice c2"}
    # c1 closes: c2 still holds, nothing leaves.
    assert await store.release([lease("s1", "alice", "c1")], t0 + GRACE_MS, t0 + 2) == 0
    assert (await store.sweep(t0 + GRACE_MS)).events == 0


async def test_steady_without_a_holder_is_a_plain_rest_heartbeat(
    store: RedisStore, any_redis: Any, keys: Keys, t0: int
) -> None:
    sent = Sent(store)
    await store.heartbeat("alice", "s1", NO_CURSOR, t0, None, steady=True)
    assert sent.take() == [["EVALSHA", "EVALSHA"]]
    assert await holders(any_redis, keys, "s1", "alice") == set()


# --- what Redis runs: a private server, whose command counts are only ours -------------------


@pytest.fixture(scope="module")
def private_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("the command counts need redis-server on PATH")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def private_store(
    private_server: RedisServer, key_prefix: str
) -> AsyncIterator[tuple[RedisStore, Any]]:
    client = aioredis.Redis.from_url(private_server.url)
    store = RedisStore(client, Keys(key_prefix), THRESHOLDS)
    try:
        yield store, client
    finally:
        await store.close()
        await client.aclose()


async def commands_of(client: Any) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def counted(client: Any, heartbeat: Any) -> dict[str, int]:
    """The commands Redis ran for `heartbeat()` (INFO itself left out)."""
    before = await commands_of(client)
    await heartbeat()
    after = await commands_of(client)
    delta = {k: n - before.get(k, 0) for k, n in after.items()}
    return {k: n for k, n in delta.items() if n and k != "info"}


async def test_redis_runs_one_evalsha_and_four_commands_for_a_steady_heartbeat(
    private_store: tuple[RedisStore, Any], t0: int
) -> None:
    store, client = private_store
    await store.heartbeat("alice", "s1", NO_CURSOR, t0, HOLDER)  # loads the scripts too

    async def steady() -> None:
        await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 1000, HOLDER, steady=True)

    async def full() -> None:
        await store.heartbeat("alice", "s1", NO_CURSOR, t0 + 2000, HOLDER)

    async def rest() -> None:
        await store.heartbeat("bob", "s1", NO_CURSOR, t0 + 3000)

    await rest()  # bob's session exists from here on
    assert await counted(client, steady) == {
        "evalsha": 1,
        "sismember": 1,
        "hgetall": 1,
        "hset": 1,
        "zadd": 1,
    }
    # A full heartbeat and a REST one of an existing session: no PERSIST, no HDEL of absent
    # cursor fields any more.
    assert await counted(client, full) == {
        "sadd": 2,
        "evalsha": 2,
        "hgetall": 1,
        "hset": 1,
        "zadd": 1,
        "zrem": 1,
        "zscore": 1,
    }
    assert await counted(client, rest) == {
        "evalsha": 2,
        "hgetall": 1,
        "hset": 1,
        "zadd": 1,
        "zrem": 1,
        "zscore": 1,
    }
