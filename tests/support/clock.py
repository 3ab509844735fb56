"""Time that tests move: settable wall clocks, and a monotonic clock with a sleep that obeys it.

    clock = FakeClock()             # store and service tests: clock() is "now"
    wall = MovableClock()           # the node's clock (presence_svc.clock.Clock)
    node_of(client).clock = wall    # before the sockets under test connect
    wall.advance(61)                # a 60 s token's expiry timer fires now
    timer = ManualTimer()           # LeaseKeeper's monotonic and sleep
    await timer.advance(interval)   # one whole tick of its loop has run

MovableClock is a FakeClock with timers; MovableClock and ManualTimer pick what came due
with one helper, `_due`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar


class _Scheduled(Protocol):
    @property
    def until(self) -> float: ...


_S = TypeVar("_S", bound=_Scheduled)


def _due(entries: Iterable[_S], by: float) -> list[_S]:
    """The entries due at or before `by`, earliest first (ties in the order they are listed)."""
    return sorted((e for e in entries if e.until <= by), key=lambda e: e.until)


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
class _Timer:
    until: float
    callback: Callable[[], object]
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def run(self) -> None:
        if not self.cancelled:
            self.callback()


class MovableClock(FakeClock):
    """A node clock (presence_svc.clock.Clock) that moves only when the test says so.

    Starts at the real time, since the tokens it is used with are checked against the real one
    when a socket connects. `advance` may be called from the test's thread while the app runs
    in TestClient's loop thread: due timers are handed to their loop with call_soon_threadsafe,
    in time order.
    """

    def __init__(self, start: float | None = None) -> None:
        super().__init__(time.time() if start is None else start)
        self._timers: list[_Timer] = []
        self._lock = threading.Lock()  # the test's thread and the app's loop both come here

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> _Timer:
        timer = _Timer(when, callback, asyncio.get_running_loop())
        with self._lock:
            self._timers.append(timer)
        self._fire()  # a timer for a past instant runs at once, as the real clock's would
        return timer

    @property
    def pending(self) -> int:
        """Timers not yet due and not cancelled."""
        with self._lock:
            return sum(not t.cancelled for t in self._timers)

    def advance(self, seconds: float) -> None:
        """Move time on by `seconds`; every timer that came due runs (in its loop, soon)."""
        with self._lock:
            super().advance(seconds)
        self._fire()

    def _fire(self) -> None:
        with self._lock:
            due = _due(self._timers, self.now)
            self._timers = [t for t in self._timers if t.until > self.now]
        for timer in due:
            timer.loop.call_soon_threadsafe(timer.run)


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
        while due := _due((s for s in self._sleepers if not s.woken.done()), target):
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
