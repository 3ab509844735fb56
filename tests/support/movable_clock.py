"""A node clock (presence_svc.clock.Clock) that moves only when the test says so.

    clock = MovableClock()
    client.app.state.node.clock = clock  # before the sockets under test connect
    clock.advance(61)  # a 60 s token's expiry timer fires now

Starts at the real time, since the tokens it is used with are checked against the real one
when a socket connects. `advance` may be called from the test's thread while the app runs in
TestClient's loop thread: due timers are handed to their loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class _Timer:
    when: float
    callback: Callable[[], object]
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def run(self) -> None:
        if not self.cancelled:
            self.callback()


class MovableClock:
    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._timers: list[_Timer] = []
        self._lock = threading.Lock()  # the test's thread and the app's loop both come here

    def time(self) -> float:
        return self._now

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
            self._now += seconds
        self._fire()

    def _fire(self) -> None:
        with self._lock:
            due = sorted((t for t in self._timers if t.when <= self._now), key=lambda t: t.when)
            self._timers = [t for t in self._timers if t.when > self._now]
        for timer in due:
            timer.loop.call_soon_threadsafe(timer.run)
