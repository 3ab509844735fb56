"""The test toolkit's own promises: ManualTimer runs whole ticks, MovableClock fires due timers,
eventually() says what failed."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest

from tests.support.auth import SECRET, auth, token
from tests.support.clock import ManualTimer, MovableClock
from tests.support.tasks import stop
from tests.support.waiting import eventually, eventually_async


async def test_advance_runs_each_due_sleep_to_its_next_one_in_time_order(
    timer: ManualTimer,
) -> None:
    log: list[tuple[str, float]] = []

    async def ticking(name: str, every: float) -> None:
        while True:
            await timer.sleep(every)
            await asyncio.sleep(0)  # work between two sleeps that yields to the loop
            log.append((name, timer.monotonic()))

    tasks = [asyncio.create_task(ticking("a", 1.0)), asyncio.create_task(ticking("b", 1.5))]
    try:
        await timer.wait_asleep(2)
        await timer.advance(0.9)
        assert log == []
        await timer.advance(2.1)
        # b began its sleep to 3.0 before a did: ties wake in the order the sleeps began.
        assert log == [("a", 1.0), ("b", 1.5), ("a", 2.0), ("b", 3.0), ("a", 3.0)]
        assert timer.monotonic() == 3.0
        assert timer.asleep == 2
    finally:
        for task in tasks:
            await stop(task)
    assert timer.asleep == 0


async def test_advance_returns_when_a_woken_task_ends(timer: ManualTimer) -> None:
    async def once() -> str:
        await timer.sleep(5)
        return "done"

    task = asyncio.create_task(once())
    await timer.wait_asleep()
    await timer.advance(5)
    assert task.done() and task.result() == "done"


async def test_advance_fails_on_a_woken_task_that_never_settles() -> None:
    timer = ManualTimer(settle_timeout=0.05)
    blocked = asyncio.Event()

    async def stuck() -> None:
        await timer.sleep(1)
        await blocked.wait()

    task = asyncio.create_task(stuck())
    try:
        await timer.wait_asleep()
        with pytest.raises(AssertionError, match="woken tasks"):
            await timer.advance(1)
    finally:
        await stop(task)


async def test_movable_clock_runs_due_timers_in_time_order_in_their_loop() -> None:
    wall = MovableClock(start=100.0)
    ran: list[str] = []
    wall.call_at(103, lambda: ran.append("c"))
    wall.call_at(101, lambda: ran.append("a"))
    wall.call_at(102, lambda: ran.append("cancelled")).cancel()
    wall.call_at(110, lambda: ran.append("later"))
    assert wall.pending == 3
    await asyncio.to_thread(wall.advance, 5)  # from another thread, as a TestClient test does
    done = asyncio.Event()
    wall.call_at(104, done.set)  # already past: runs at once, after the timers due before it
    await asyncio.wait_for(done.wait(), 5)
    assert ran == ["a", "c"]
    assert (wall.time(), wall(), wall.pending) == (105.0, 105.0, 1)


def test_movable_clock_starts_at_the_real_time() -> None:
    before = time.time()
    wall = MovableClock()
    assert before <= wall.time() <= time.time()


def test_eventually_returns_once_true_and_fails_naming_what() -> None:
    calls = iter([False, False, True])
    assert eventually(lambda: next(calls), within=1.0) >= 0
    with pytest.raises(AssertionError, match=r"not within 0\.05s: the moon"):
        eventually(lambda: False, within=0.05, what="the moon")


async def test_eventually_async_takes_plain_and_async_conditions() -> None:
    seen: list[int] = []

    async def third_look() -> bool:
        seen.append(1)
        return len(seen) >= 3

    await eventually_async(third_look, within=1.0)
    assert len(seen) == 3
    await eventually_async(lambda: True)
    with pytest.raises(AssertionError, match="never"):
        await eventually_async(lambda: False, within=0.05, what="never")


def test_auth_header_carries_a_token_with_its_grants() -> None:
    [scheme, signed] = auth("bob", studies=["s2", "s1"])["Authorization"].split(" ")
    claims = jwt.decode(signed, SECRET, algorithms=["HS256"])
    assert (scheme, claims["sub"], claims["studies"]) == ("Bearer", "bob", ["s1", "s2"])
    assert "studies" not in jwt.decode(token(), SECRET, algorithms=["HS256"])
