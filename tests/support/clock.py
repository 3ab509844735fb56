"""Time that tests move: a settable wall clock, and a monotonic clock with a sleep that obeys it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass


class FakeClock:
    """A settable clock (seconds since the epoch) for store and service tests."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def ms(self) -> int:
        return int(self.now * 1000)


@dataclass(eq=False)
class _Sleeper:
    until: float
    task: asyncio.Task[object] | None
    woken: asyncio.Future[None]


class ManualTimer:
    """A monotonic clock that moves only when the test says so, and a `sleep` that waits on it.

    Hand `monotonic` and `sleep` to the code under test (LeaseKeeper takes both). `advance`
    wakes every sleeper that came due and returns only once each has gone back to sleep or
    ended, so after `await timer.advance(interval)` one tick of a periodic loop has run, all
    of it, and the test can look at its effects without polling.
    """

    def __init__(self, start: float = 0.0, settle_timeout: float = 5.0) -> None:
        self.now = start
        self.settle_timeout = settle_timeout  # real seconds a woken task may take to settle
        self._sleepers: list[_Sleeper] = []
        self._watched: set[asyncio.Task[object]] = set()  # tasks whose end wakes _settle
        self._changed = asyncio.Event()

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        task = asyncio.current_task()
        if task is not None and task not in self._watched:
            self._watched.add(task)
            task.add_done_callback(lambda _: self._changed.set())
        sleeper = _Sleeper(self.now + seconds, task, asyncio.get_running_loop().create_future())
        self._sleepers.append(sleeper)
        self._changed.set()
        try:
            await sleeper.woken
        finally:
            with contextlib.suppress(ValueError):  # a cancelled sleeper is still listed
                self._sleepers.remove(sleeper)

    @property
    def asleep(self) -> int:
        """How many tasks are sleeping now."""
        return sum(not s.woken.done() for s in self._sleepers)

    async def wait_asleep(self, count: int = 1) -> None:
        """Wait (in real time, at most `settle_timeout`) until `count` tasks are sleeping."""
        await self._settle(lambda: self.asleep >= count, f"{count} sleeping task(s)")

    async def advance(self, seconds: float) -> None:
        """Move time on by `seconds`, running every sleep that ends meanwhile, in time order
        (ties in the order the sleeps began)."""
        target = self.now + seconds
        while due := sorted(
            (s for s in self._sleepers if s.until <= target and not s.woken.done()),
            key=lambda s: s.until,
        ):
            self.now = max(self.now, due[0].until)
            woken = [s for s in due if s.until <= self.now]
            for sleeper in woken:
                sleeper.woken.set_result(None)
            tasks = {s.task for s in woken if s.task is not None}
            await self._settle(functools.partial(self._all_settled, tasks), "woken tasks")
        self.now = target

    def _all_settled(self, tasks: set[asyncio.Task[object]]) -> bool:
        """Each of `tasks` has ended or is sleeping again."""
        return all(
            task.done() or any(s.task is task and not s.woken.done() for s in self._sleepers)
            for task in tasks
        )

    async def _settle(self, done: Callable[[], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_timeout
        while not done():
            remaining = deadline - loop.time()
            assert remaining > 0, f"timed out waiting for {what}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
