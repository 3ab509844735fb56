"""Sweeper: ticks at its interval, goes on at once when more is due, survives failures."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from presence_svc.models import Status, SweepReport, Thresholds
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.service import PresenceService
from presence_svc.store import StoreUnavailable
from presence_svc.sweeper import Sweeper
from tests.support.clock import FakeClock

REAL_SLEEP = asyncio.sleep


class ScriptedService:
    """Stands in for PresenceService: each sweep() takes the next step of a script.

    A step is a SweepReport to return or an exception to raise. The sweep after the last step
    sets `done` and never returns, so when `done` is set the sweeper has handled every step
    (and slept after each) and is parked until cancelled.
    """

    def __init__(self, *steps: SweepReport | Exception) -> None:
        self._steps = list(steps)
        self.calls = 0
        self.called = asyncio.Event()
        self.done = asyncio.Event()

    async def sweep(self) -> SweepReport:
        self.calls += 1
        self.called.set()
        if not self._steps:
            self.done.set()
            await asyncio.Event().wait()
        step = self._steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def make_sweeper(service: ScriptedService, interval: float) -> Sweeper:
    return Sweeper(service, interval)  # type: ignore[arg-type]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Record the sweeper's sleeps (they return at once)."""
    recorded: list[float] = []

    async def fake_sleep(delay: float, result: Any = None) -> Any:
        recorded.append(delay)
        await REAL_SLEEP(0)
        return result

    monkeypatch.setattr("presence_svc.sweeper.asyncio.sleep", fake_sleep)
    yield recorded


@pytest.fixture
async def running() -> AsyncIterator[Callable[[Sweeper], asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []

    def start(sweeper: Sweeper) -> asyncio.Task[None]:
        task = asyncio.create_task(sweeper.run())
        tasks.append(task)
        return task

    yield start
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_ticks_once_per_interval(
    sleeps: list[float], running: Callable[[Sweeper], asyncio.Task[None]]
) -> None:
    service = ScriptedService(SweepReport(), SweepReport(studies=2, events=3), SweepReport())
    sweeper = make_sweeper(service, interval=5.0)
    assert sweeper.last_success is None
    before = time.monotonic()
    running(sweeper)
    await asyncio.wait_for(service.done.wait(), 5)
    assert service.calls == 4
    # Between ticks it sleeps what is left of the interval (the ticks here take ~no time).
    assert len(sleeps) == 3
    for delay in sleeps:
        assert 4.9 < delay <= 5.0
    assert sweeper.last_success is not None
    assert before <= sweeper.last_success <= time.monotonic()


async def test_goes_on_at_once_while_more_is_due(
    sleeps: list[float], running: Callable[[Sweeper], asyncio.Task[None]]
) -> None:
    service = ScriptedService(
        SweepReport(studies=500, events=900, more_due=True),
        SweepReport(studies=500, events=10, more_due=True),
        SweepReport(studies=3, events=1),
    )
    running(make_sweeper(service, interval=5.0))
    await asyncio.wait_for(service.done.wait(), 5)
    assert sleeps == [0, 0, pytest.approx(5.0, abs=0.1)]


async def test_survives_failures_with_capped_backoff(
    sleeps: list[float],
    running: Callable[[Sweeper], asyncio.Task[None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = ScriptedService(
        StoreUnavailable("redis is down"),
        RuntimeError("boom"),
        ValueError("bad"),
        SweepReport(),  # recovers: the failure count starts over
        RuntimeError("again"),
        *(RuntimeError(f"long outage {n}") for n in range(6)),
        SweepReport(events=1),
        SweepReport(),
    )
    sweeper = make_sweeper(service, interval=1.0)
    with caplog.at_level(logging.ERROR, logger="presence_svc.sweeper"):
        running(sweeper)
        await asyncio.wait_for(service.done.wait(), 5)
    assert service.calls == 14
    assert sleeps == [
        2.0,
        4.0,
        8.0,
        pytest.approx(1.0, abs=0.1),  # the normal interval after a success
        2.0,  # backoff starts over
        4.0,
        8.0,
        10.0,  # capped
        10.0,
        10.0,
        10.0,
        pytest.approx(1.0, abs=0.1),
        pytest.approx(1.0, abs=0.1),
    ]
    assert sweeper.last_success is not None
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 10
    assert "redis is down" in failures[0].getMessage()
    assert "1 in a row" in failures[0].getMessage()
    assert "3 in a row" in failures[2].getMessage()
    assert "1 in a row" in failures[3].getMessage()


async def test_last_success_is_only_set_by_a_successful_tick(
    sleeps: list[float], running: Callable[[Sweeper], asyncio.Task[None]]
) -> None:
    failing = ScriptedService(RuntimeError("down"), RuntimeError("down"))
    sweeper = make_sweeper(failing, interval=1.0)
    running(sweeper)
    await asyncio.wait_for(failing.done.wait(), 5)
    assert sweeper.last_success is None

    recovering = ScriptedService(RuntimeError("down"), SweepReport())
    sweeper = make_sweeper(recovering, interval=1.0)
    before = time.monotonic()
    running(sweeper)
    await asyncio.wait_for(recovering.done.wait(), 5)
    assert sweeper.last_success is not None
    assert sweeper.last_success >= before


async def test_cancel_while_waiting_for_the_next_tick() -> None:
    """With the real sleep: cancelling during the interval stops the loop at once."""
    service = ScriptedService(SweepReport(), SweepReport())
    task = asyncio.create_task(make_sweeper(service, interval=30.0).run())
    await asyncio.wait_for(service.called.wait(), 5)
    await REAL_SLEEP(0.01)
    started = time.monotonic()
    await stop(task)
    assert time.monotonic() - started < 1
    assert service.calls == 1


async def test_cancel_during_backoff() -> None:
    service = ScriptedService(RuntimeError("down"), SweepReport())
    task = asyncio.create_task(make_sweeper(service, interval=5.0).run())
    await asyncio.wait_for(service.called.wait(), 5)
    await REAL_SLEEP(0.01)
    await stop(task)
    assert service.calls == 1


async def test_cancel_during_a_sweep_is_not_swallowed() -> None:
    service = ScriptedService()  # the first sweep never returns
    sweeper = make_sweeper(service, interval=0.01)
    task = asyncio.create_task(sweeper.run())
    await asyncio.wait_for(service.done.wait(), 5)
    await stop(task)
    assert service.calls == 1
    assert sweeper.last_success is None


async def test_sweeps_a_real_service(fake_redis: Any, key_prefix: str) -> None:
    """End to end with a RedisStore: the loop applies transitions as they fall due."""
    clock = FakeClock()
    store = RedisStore(fake_redis, Keys(key_prefix), Thresholds(30, 300, 600))
    service = PresenceService(store, clock=clock)
    await service.heartbeat("alice", "s1")
    sweeper = Sweeper(service, interval=0.01)
    task = asyncio.create_task(sweeper.run())
    try:
        clock.advance(30)
        for _ in range(200):
            presence = await service.presence("s1")
            if presence.sessions[0].status is Status.IDLE:
                break
            await REAL_SLEEP(0.01)
        assert presence.sessions[0].status is Status.IDLE
        assert presence.seq == 2
    finally:
        await stop(task)
