"""Waiting for a condition: poll it until it holds, or fail saying what never happened.

For state the test can only look at (a counter, a Redis reply, a process's /healthz). Where
the code under test takes a clock, move the clock instead (tests/support/clock.py); where
there is something to await (Watcher.wait_until, Recorder.wait_for), await it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

POLL = 0.01  # seconds between two looks: short next to any timeout, long next to a look


def eventually(
    condition: Callable[[], object], within: float = 5.0, what: str = "", poll: float = POLL
) -> float:
    """Block until `condition()` is true; the seconds it took. AssertionError after `within`."""
    started = time.monotonic()
    while not condition():
        waited = time.monotonic() - started
        assert waited < within, f"not within {within}s: {what or _name(condition)}"
        time.sleep(poll)
    return time.monotonic() - started


async def eventually_async(
    condition: Callable[[], object | Awaitable[object]],
    within: float = 5.0,
    what: str = "",
    poll: float = POLL,
) -> float:
    """`eventually` for the event loop: `condition` may be a plain or an async callable."""
    started = time.monotonic()
    while not await _holds(condition):
        waited = time.monotonic() - started
        assert waited < within, f"not within {within}s: {what or _name(condition)}"
        await asyncio.sleep(poll)
    return time.monotonic() - started


async def _holds(condition: Callable[[], object | Awaitable[object]]) -> bool:
    result = condition()
    if inspect.isawaitable(result):
        result = await result
    return bool(result)


def _name(condition: Callable[..., object]) -> str:
    return getattr(condition, "__qualname__", repr(condition))
