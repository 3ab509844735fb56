"""Stats on Redis (fake, real, cluster): node reports, the overview's bounded reads, one study's
counts; and the node's StatsWriter (changes only, rewritten whole now and then, a windowed rate).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from presence_svc.redis.keys import Keys
from presence_svc.redis.stats import RedisStats
from presence_svc.redis.store import RedisStore
from presence_svc.stats import (
    FULL_WRITE_EVERY,
    CountChanges,
    NodeReport,
    StatsWriter,
    StatusCounts,
)
from presence_svc.store import StoreUnavailable
from tests.support.app import unreachable_redis
from tests.support.clock import ManualTimer
from tests.support.store import AWAY_MS, IDLE_MS, NO_CURSOR, THRESHOLDS

TTL_MS = 5_000
A, B, C = "a" * 32, "b" * 32, "c" * 32


@pytest.fixture
async def stats(any_redis: Any, keys: Keys) -> AsyncIterator[RedisStats]:
    yield RedisStats(any_redis, keys, THRESHOLDS)


def report(
    sockets: int = 0, events: int = 0, watchers: dict[str, int] | None = None, **watching: int
) -> NodeReport:
    return NodeReport(sockets, len(watching), sockets, events, watching, watchers or {})


async def write(stats: RedisStats, node_id: str, rep: NodeReport, *, rate: float = 0.0) -> None:
    await stats.write_node(
        node_id,
        rep,
        rate,
        CountChanges(rep.watching),
        CountChanges(rep.watchers),
        whole=True,
        ttl_ms=60_000,
    )


async def watching(client: Any, keys: Keys, node_id: str) -> dict[str, int]:
    raw = await client.hgetall(keys.node_watching(node_id))
    return {k.decode(): int(v) for k, v in raw.items()}


async def watchers(client: Any, keys: Keys, node_id: str) -> dict[str, int]:
    raw = await client.hgetall(keys.node_watchers(node_id))
    return {k.decode(): int(v) for k, v in raw.items()}


async def test_the_overview_lists_live_nodes_with_their_reports_and_the_top_studies(
    store: RedisStore, stats: RedisStats, t0: int
) -> None:
    for study, users in {"big": 3, "mid": 2, "one": 1}.items():
        for n in range(users):
            await store.heartbeat(f"u{n}", study, NO_CURSOR, t0)
    await store.renew_node(A, t0)
    await store.renew_node(B, t0 - TTL_MS - 1)  # silent a whole TTL: not alive
    await store.renew_node(C, t0 - 100)  # alive, but has not reported yet
    await write(stats, A, report(sockets=4, events=9, watchers={"big": 2}, big=3), rate=2.5)
    await write(stats, B, report(sockets=7, watchers={"s": 7}))

    found = await stats.overview(t0 + 100, TTL_MS)

    assert {n.node_id: n.seen_ms_ago for n in found.nodes} == {A: 100, C: 200}
    by_id = {n.node_id: n for n in found.nodes}
    assert (by_id[A].sockets, by_id[A].studies, by_id[A].leases) == (4, 1, 4)
    assert by_id[A].watchers == 2
    assert by_id[A].events_per_second == 2.5
    assert by_id[C].sockets is None and by_id[C].events_per_second is None
    assert by_id[C].watchers is None
    assert [(s.study_id, s.users.total) for s in found.top] == [("big", 3), ("mid", 2), ("one", 1)]
    assert (found.studies, found.sampled) == (3, 3)
    assert found.sessions == StatusCounts(active=6)
    assert found.events_per_second == 2.5
    assert found.to_json()["sockets"] == 4 and found.to_json()["exact"] is True
    assert found.to_json()["watchers"] == 2  # B's are not: it is not alive


async def test_statuses_come_from_heartbeat_age_at_the_sweep_boundaries(
    store: RedisStore, stats: RedisStats, t0: int
) -> None:
    await store.heartbeat("fresh", "s", NO_CURSOR, t0)
    await store.heartbeat("idle", "s", NO_CURSOR, t0 - IDLE_MS)  # exactly idle_after old
    await store.heartbeat("nearly", "s", NO_CURSOR, t0 - IDLE_MS + 1)
    await store.heartbeat("away", "s", NO_CURSOR, t0 - AWAY_MS)  # exactly away_after old

    found = await stats.study("s", t0, TTL_MS)

    assert found.users == StatusCounts(active=2, idle=1, away=1)
    assert found.seq == 4  # four joins
    assert (await stats.overview(t0, TTL_MS)).sessions == found.users


async def test_the_overview_counts_a_bounded_sample_of_studies(
    any_redis: Any, store: RedisStore, keys: Keys, t0: int
) -> None:
    studies = [f"s{n}" for n in range(40)]
    for n, study in enumerate(studies):
        for user in range(1 + n % 3):
            await store.heartbeat(f"u{user}", study, NO_CURSOR, t0)
    bounded = RedisStats(any_redis, keys, THRESHOLDS, studies_per_shard=1, top=5)

    found = await bounded.overview(t0, TTL_MS)

    shards_used = len({keys.schedule(s) for s in studies})
    assert found.studies == 40
    assert found.sampled == shards_used < 40
    assert found.to_json()["exact"] is False
    assert len(found.top) == 5
    totals = [s.users.total for s in found.top]
    assert totals == sorted(totals, reverse=True)
    assert found.sessions.total <= sum(1 + n % 3 for n in range(40))


async def test_an_empty_study_leaves_the_top_list(
    store: RedisStore, stats: RedisStats, t0: int
) -> None:
    await store.heartbeat("u", "gone", NO_CURSOR, t0)
    await store.leave("u", "gone", t0)
    found = await stats.overview(t0, TTL_MS)
    assert found.top == ()
    assert found.sessions == StatusCounts()


async def test_a_study_sums_the_watchers_of_live_nodes_only(
    store: RedisStore, stats: RedisStats, t0: int
) -> None:
    await store.heartbeat("u", "s", NO_CURSOR, t0)
    await store.renew_node(A, t0)
    await store.renew_node(B, t0)
    await store.renew_node(C, t0 - TTL_MS - 1)
    await write(stats, A, report(watchers={"s": 1, "other": 4}, s=2, other=5))
    await write(stats, B, report(watchers={"s": 1}, s=1))
    # dead: its report may linger until it expires
    await write(stats, C, report(watchers={"s": 10}, s=10))

    found = await stats.study("s", t0, TTL_MS)
    assert (found.watching, found.watchers) == (3, 2)  # a watcher on each live node
    other = await stats.study("other", t0, TTL_MS)
    assert (other.watching, other.watchers) == (5, 4)
    assert (await stats.study("nobody", t0, TTL_MS)).to_json() == {
        "study_id": "nobody",
        "users": {"active": 0, "idle": 0, "away": 0, "total": 0},
        "watching": 0,
        "watchers": 0,
        "seq": 0,
    }


async def test_writes_change_what_changed_and_a_whole_write_drops_the_rest(
    any_redis: Any, stats: RedisStats, keys: Keys
) -> None:
    await write(stats, A, report(watchers={"s1": 1, "s3": 3}, s1=1, s2=2, s3=3))
    rep = report(watchers={"s1": 1}, s1=5, s2=2)
    changes = CountChanges({"s1": 5}, ["s3"]), CountChanges({}, ["s3"])
    await stats.write_node(A, rep, 0.0, *changes, whole=False, ttl_ms=60_000)
    assert await watching(any_redis, keys, A) == {"s1": 5, "s2": 2}
    assert await watchers(any_redis, keys, A) == {"s1": 1}
    assert await any_redis.hget(keys.node_stats(A), "watchers") == b"1"

    # Left by an earlier run: a whole write drops them from both hashes.
    await any_redis.hset(keys.node_watching(A), "stale", 1)
    await any_redis.hset(keys.node_watchers(A), "stale", 1)
    rep = report(watchers={"s2": 3}, s2=4)
    changes = CountChanges({"s2": 4}), CountChanges({"s2": 3})
    await stats.write_node(A, rep, 0.0, *changes, whole=True, ttl_ms=60_000)
    assert await watching(any_redis, keys, A) == {"s2": 4}
    assert await watchers(any_redis, keys, A) == {"s2": 3}
    for key in (keys.node_stats(A), keys.node_watching(A), keys.node_watchers(A)):
        assert 0 < await any_redis.pttl(key) <= 60_000

    await stats.forget_node(A)
    assert not await any_redis.exists(
        keys.node_stats(A), keys.node_watching(A), keys.node_watchers(A)
    )


async def test_a_reaped_node_loses_its_whole_report(
    any_redis: Any, store: RedisStore, stats: RedisStats, keys: Keys, t0: int
) -> None:
    await store.renew_node(A, t0 - TTL_MS - 1)
    await store.renew_node(B, t0)
    await write(stats, A, report(sockets=1, watchers={"s": 1}, s=1))
    await store.reap_dead_nodes(B, TTL_MS, 1_000, t0)
    assert not await any_redis.exists(
        keys.node_stats(A), keys.node_watching(A), keys.node_watchers(A)
    )


async def test_unreachable_redis_is_store_unavailable(keys: Keys) -> None:
    client = unreachable_redis()
    try:
        stats = RedisStats(client, keys, THRESHOLDS, call_timeout=1.0)
        with pytest.raises(StoreUnavailable):
            await stats.overview(0, TTL_MS)
        with pytest.raises(StoreUnavailable):
            await stats.study("s", 0, TTL_MS)
        with pytest.raises(StoreUnavailable):
            await write(stats, A, report())
    finally:
        await client.aclose()


async def test_a_read_redis_refuses_is_store_unavailable_and_logged(
    any_redis: Any,
    store: RedisStore,
    stats: RedisStats,
    keys: Keys,
    t0: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What a node ACL lacking a command does to these reads too (tests/redis/test_acl.py): an
    # error reply, which the endpoints must answer as their 503, not as a bare 500.
    await any_redis.set(keys.study("broken").index, "not a sorted set")
    await store.renew_node(A, t0)
    await any_redis.set(keys.node_stats(A), "not a hash")
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        await stats.study("broken", t0, TTL_MS)
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        await stats.overview(t0, TTL_MS)
    refused = [r.getMessage() for r in caplog.records if "refused by Redis" in r.getMessage()]
    assert len(refused) == 2 and all("WRONGTYPE" in m for m in refused)


# --- the writer -------------------------------------------------------------------------------


class Node:
    """What the writer reads: a report the test changes, and an id that may change."""

    def __init__(self) -> None:
        self.id = A
        self.report = report()


@pytest.fixture
def node() -> Node:
    return Node()


@pytest.fixture
def writer(stats: RedisStats, node: Node, timer: ManualTimer) -> StatsWriter:
    return StatsWriter(stats, lambda: node.id, lambda: node.report, 1.0, monotonic=timer.monotonic)


class Failing:
    """A store whose writes fail while `down`, and otherwise go to `inner`."""

    def __init__(self, inner: RedisStats) -> None:
        self.inner, self.down = inner, False
        self.calls: list[bool] = []  # `whole` of each write tried

    async def write_node(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(kwargs["whole"])
        if self.down:
            raise StoreUnavailable("down")
        await self.inner.write_node(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_the_writer_writes_changes_then_everything_now_and_then(
    any_redis: Any, stats: RedisStats, keys: Keys, node: Node, timer: ManualTimer
) -> None:
    failing = Failing(stats)
    writer = StatsWriter(failing, lambda: node.id, lambda: node.report, 1.0)
    node.report = report(s1=1, s2=1)
    await writer.write()
    node.report = report(s1=2, s2=0)  # s2's last socket left: dropped, not written as 0
    await writer.write()
    assert await watching(any_redis, keys, A) == {"s1": 2}
    node.report = report(watchers={"s1": 1}, s1=2)
    await writer.write()
    assert await watchers(any_redis, keys, A) == {"s1": 1}
    node.report = report(watchers={"s1": 0}, s1=2)  # it heartbeated: no longer a watcher
    await writer.write()
    assert await watchers(any_redis, keys, A) == {}
    for _ in range(FULL_WRITE_EVERY - 2):
        await writer.write()
    assert failing.calls == [True, False, *[False] * (FULL_WRITE_EVERY - 1), True]

    failing.down = True
    with pytest.raises(StoreUnavailable):
        await writer.write()
    failing.down = False
    await writer.write()  # after a failure, what Redis holds is unknown: whole
    node.id = B  # declared dead and back under a new id: whole, under the new id
    await writer.write()
    assert failing.calls[-3:] == [False, True, True]
    assert await watching(any_redis, keys, B) == {"s1": 2}
    assert writer.ttl_ms == 4000


async def test_the_writer_rates_events_over_a_window(
    any_redis: Any, writer: StatsWriter, keys: Keys, node: Node, timer: ManualTimer
) -> None:
    async def rate_after(seconds: float, events: int) -> float:
        await timer.advance(seconds)
        node.report = report(events=events)
        await writer.write()
        return float(await any_redis.hget(keys.node_stats(A), "events_per_second"))

    assert await rate_after(0, 100) == 0.0  # nothing to compare with yet
    assert await rate_after(1, 110) == 10.0
    assert await rate_after(1, 110) == 5.0  # 10 events over the 2 s so far
    for _ in range(4):
        last = await rate_after(1, 110)
    assert last == 0.0  # the burst left the 5 s window
    assert await rate_after(1, 160) == 10.0  # 50 events over the last 5 s


async def test_the_writer_forgets_the_node_at_close(
    any_redis: Any, writer: StatsWriter, keys: Keys, node: Node
) -> None:
    node.report = report(s=1)
    await writer.write()
    assert await any_redis.exists(keys.node_stats(A))
    await writer.close()
    assert not await any_redis.exists(
        keys.node_stats(A), keys.node_watching(A), keys.node_watchers(A)
    )


async def test_the_writer_loop_writes_every_interval_and_outlives_a_failure(
    stats: RedisStats, node: Node, timer: ManualTimer, caplog: pytest.LogCaptureFixture
) -> None:
    failing = Failing(stats)
    writer = StatsWriter(
        failing,
        lambda: node.id,
        lambda: node.report,
        2.0,
        monotonic=timer.monotonic,
        sleep=timer.sleep,
    )
    task = asyncio.create_task(writer.run())
    try:
        await timer.wait_asleep()
        assert len(failing.calls) == 1  # at once
        await timer.advance(1.9)
        assert len(failing.calls) == 1
        failing.down = True
        await timer.advance(0.1)
        assert len(failing.calls) == 2
        assert "stats write failed" in caplog.text
        failing.down = False
        await timer.advance(2.0)
        assert failing.calls == [True, False, True]  # the write after a failure is whole
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
