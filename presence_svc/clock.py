"""Wall-clock time and timers at wall-clock instants, behind one object that tests replace.

A token's `exp` is a wall-clock instant, so the socket that must close at it needs both the
time and a timer for that instant; a test moves a fake clock past it instead of sleeping.
NodeClock turns the local clock into the one every node shares: Redis's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


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


# A reading whose round trip took longer than this says little about the offset (the reply may
# have waited behind a paused Redis): it is ignored.
MAX_READING_RTT = 0.5


class NodeClock:
    """The time all nodes share: Redis's, seen through this node's clock and its offset to it.

    Presence compares times written by different nodes (heartbeats, sweeps, leases, token
    expiry), so each node reads the local clock and adds the offset to Redis's clock measured
    at each lease renewal; a node whose clock is far off keeps working, and says so: `skewed`
    once the offset passes `tolerance` seconds, with a warning when it does.
    """

    def __init__(self, local: Clock | None = None, tolerance: float = 3.0) -> None:
        self.local = local or SystemClock()
        self.tolerance = tolerance
        self.offset = 0.0  # seconds to add to the local clock to get Redis's
        self.measured = False  # whether any reading has been taken yet

    def time(self) -> float:
        """Seconds since the epoch, on Redis's clock."""
        return self.local.time() + self.offset

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Run `callback` at `when` on Redis's clock."""
        return self.local.call_at(when - self.offset, callback)

    @property
    def skew(self) -> float:
        """Seconds the local clock is ahead of Redis's (negative: behind)."""
        return -self.offset

    @property
    def skewed(self) -> bool:
        return abs(self.offset) > self.tolerance

    def observe(self, server_time: float, sent: float, received: float) -> bool:
        """Learn the offset from Redis's time `server_time`, read by a call that left at local
        time `sent` and came back at `received`; False if the reading was too slow to use."""
        if not 0 <= received - sent <= MAX_READING_RTT:
            return False
        was_skewed = self.skewed
        # Redis read its clock somewhere within the round trip: the middle errs least.
        self.offset = server_time - (sent + received) / 2
        self.measured = True
        if self.skewed and not was_skewed:
            log.warning(
                "this node's clock is %+.3fs off Redis's (tolerance %.1fs): presence uses "
                "Redis's time, but fix the clock (NTP)",
                self.skew,
                self.tolerance,
            )
        elif was_skewed and not self.skewed:
            log.info("this node's clock is back within %.1fs of Redis's", self.tolerance)
        return True
