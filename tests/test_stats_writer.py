"""The node's StatsWriter loop against a stub store: it outlives every kind of failed write
(not only Redis being down), backs off while they last, and never raises out of its close;
and OperatorStats, the reads the transport calls, at the node's clock.

The writes themselves (what lands in Redis) are tested in tests/redis/test_stats.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest
from redis.exceptions import NoPermissionError, ResponseError

from presence_svc.stats import (
    BACKOFF_CAP,
    CountChanges,
    NodeReport,
    OperatorStats,
    Overview,
    StatsWriter,
    StatusCounts,
    StudyStats,
)
from presence_svc.store import StoreUnavailable
from tests.support.clock import ManualTimer
from tests.support.tasks import stop

NODE = "a" * 32
REPORT = NodeReport(sockets=1, studies=1, leases=1, events_published=0, watching={"s1": 1})
OVERVIEW = Overview((), 0, 0, (), StatusCounts())
WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


class StubStore:
    """A StatsStore whose writes raise the errors queued in `errors` (None: succeed), one per
    write, then succeed; it records when each write was tried and whether it was whole, and
    what each write changed of the watchers."""

    def __init__(self, timer: ManualTimer, *errors: Exception | None) -> None:
        self._timer = timer
        self.errors = list(errors)
        self.writes: list[tuple[float, bool]] = []  # (monotonic time, whole)
        self.watchers: list[CountChanges] = []
        self.reads: list[tuple[str, int, int]] = []  # (what, now_ms, lease_ttl_ms)
        self.forget_error: Exception | None = None

    async def write_node(
        self,
        node_id: str,
        report: NodeReport,
        events_per_second: float,
        watching: CountChanges,
        watchers: CountChanges,
        *,
        whole: bool,
        ttl_ms: int,
    ) -> None:
        self.writes.append((self._timer.monotonic(), whole))
        self.watchers.append(watchers)
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error

    async def forget_node(self, node_id: str) -> None:
        if self.forget_error is not None:
            raise self.forget_error

    async def overview(self, now_ms: int, lease_ttl_ms: int) -> Overview:
        self.reads.append(("overview", now_ms, lease_ttl_ms))
        return OVERVIEW

    async def study(self, study_id: str, now_ms: int, lease_ttl_ms: int) -> StudyStats:
        self.reads.append((study_id, now_ms, lease_ttl_ms))
        return StudyStats(study_id, StatusCounts(), 0, 0, 0)


def writer_of(store: StubStore, timer: ManualTimer, interval: float = 1.0) -> StatsWriter:
    return StatsWriter(
        store, lambda: NODE, lambda: REPORT, interval, monotonic=timer.monotonic, sleep=timer.sleep
    )


@pytest.mark.parametrize(
    "error",
    [
        NoPermissionError("this user has no permissions to run the 'hset' command"),
        ResponseError(WRONGTYPE),
        AttributeError("'NoneType' object has no attribute 'sockets'"),  # a bug
    ],
    ids=["acl-refusal", "wrongtype", "bug"],
)
async def test_the_loop_outlives_an_error_that_is_not_redis_being_down(
    error: Exception, timer: ManualTimer, caplog: pytest.LogCaptureFixture
) -> None:
    # Found in review: only StoreUnavailable was caught, so any other error ended the task
    # after one write and the node silently dropped out of GET /stats.
    store = StubStore(timer, error)
    task = asyncio.create_task(writer_of(store, timer).run())
    try:
        await timer.wait_asleep()
        assert not task.done(), "the stats writer stopped"
        await timer.advance(1.0)
        await timer.advance(1.0)
        assert not task.done(), "the stats writer stopped"
    finally:
        await stop(task)
    # The failed write, then two more; the first after the failure rewrites everything.
    assert store.writes == [(0.0, True), (1.0, True), (2.0, False)]
    logged = [r for r in caplog.records if "stats write failed" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert type(error).__name__ in logged[0].getMessage()
    assert str(error) in logged[0].getMessage()


async def test_failures_in_a_row_back_off_and_a_write_that_works_resets_the_wait(
    timer: ManualTimer,
) -> None:
    down = StoreUnavailable("down")
    refused = ResponseError(WRONGTYPE)
    store = StubStore(timer, refused, down, refused, None, refused, *[refused] * 8)
    task = asyncio.create_task(writer_of(store, timer).run())
    try:
        await timer.wait_asleep()
        await timer.advance(100.0)
        assert not task.done()
    finally:
        await stop(task)
    tried = [t for t, _ in store.writes]
    # Waits of 1, 2, 4 s after one, two, three failures; 1 s after the write that worked;
    # then doubling again, up to BACKOFF_CAP.
    assert tried[:6] == [0.0, 1.0, 3.0, 7.0, 8.0, 9.0]
    waits = [b - a for a, b in itertools.pairwise(tried[5:])]
    assert waits[:5] == [2.0, 4.0, 8.0, 16.0, BACKOFF_CAP]
    assert max(waits) == BACKOFF_CAP


async def test_a_cap_shorter_than_the_interval_never_writes_more_often_than_it(
    timer: ManualTimer,
) -> None:
    interval = BACKOFF_CAP * 2
    store = StubStore(timer, *[ResponseError(WRONGTYPE)] * 3)
    task = asyncio.create_task(writer_of(store, timer, interval).run())
    try:
        await timer.wait_asleep()
        await timer.advance(interval * 3)
    finally:
        await stop(task)
    assert [t for t, _ in store.writes] == [0.0, interval, interval * 2, interval * 3]


async def test_watchers_are_written_as_they_change_and_whole_after_a_failure(
    timer: ManualTimer,
) -> None:
    store = StubStore(timer)
    reports = [
        NodeReport(2, 2, 0, 0, watching={"s1": 1, "s2": 1}, watchers={"s1": 1, "s2": 1}),
        NodeReport(2, 2, 1, 0, watching={"s1": 1, "s2": 1}, watchers={"s2": 1}),  # s1 beat
        NodeReport(2, 2, 1, 0, watching={"s1": 1, "s2": 1}, watchers={"s2": 1}),
        NodeReport(1, 1, 1, 0, watching={"s1": 1}, watchers={"s2": 0}),  # s2's socket closed
    ]
    current = iter(reports)
    writer = StatsWriter(store, lambda: NODE, lambda: next(current), 1.0, sleep=timer.sleep)
    for _ in range(3):
        await writer.write()
    store.errors = [StoreUnavailable("down")]
    with pytest.raises(StoreUnavailable):
        await writer.write()
    current = iter(reports[3:])
    await writer.write()
    assert store.watchers == [
        CountChanges({"s1": 1, "s2": 1}),
        CountChanges({}, ["s1"]),  # the socket that heartbeated is no longer a watcher
        CountChanges({}, []),  # nothing changed
        CountChanges({}, ["s2"]),  # the failed write
        CountChanges({}),  # after it, whole: exactly the watchers there are (none)
    ]
    assert [whole for _, whole in store.writes] == [True, False, False, False, True]


async def test_close_never_raises_into_the_shutdown(
    timer: ManualTimer, caplog: pytest.LogCaptureFixture
) -> None:
    store = StubStore(timer)
    store.forget_error = NoPermissionError("this user has no permissions to run the 'del' command")
    await writer_of(store, timer).close()
    assert "node stats left to expire" in caplog.text
    assert "'del'" in caplog.text


async def test_operator_stats_read_at_the_nodes_clock_with_the_lease_ttl(
    timer: ManualTimer,
) -> None:
    store = StubStore(timer)
    now = [1_800_000_000.1239]
    reads = OperatorStats(store, lambda: now[0], lease_ttl=2.5)
    assert await reads.overview() is OVERVIEW
    now[0] += 1.0
    found = await reads.study("s1")
    assert found.study_id == "s1"
    assert store.reads == [
        ("overview", 1_800_000_000_123, 2500),
        ("s1", 1_800_000_001_123, 2500),
    ]
