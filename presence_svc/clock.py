"""Wall-clock time and timers at wall-clock instants, behind one object that tests replace.

A token's `exp` is a wall-clock instant, so the socket that must close at it needs both the
time and a timer for that instant; a test moves a fake clock past it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch."""

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Run `callback` in the running loop at wall-clock `when` (at once if it is past)."""


class SystemClock:
    """The real clock: `time.time()`, and the running loop's timers."""

    def time(self) -> float:
        return time.time()

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        # The loop's own clock is monotonic: the instant becomes a delay from now.
        delay = max(0.0, when - time.time())
        return asyncio.get_running_loop().call_later(delay, callback)
