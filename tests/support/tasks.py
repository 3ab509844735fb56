"""Stopping asyncio tasks in tests."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it to end, whatever it ends with.

    The cancel is repeated: one can be lost inside redis-py on Python 3.11 (see app._stop).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.1)
    with contextlib.suppress(asyncio.CancelledError):
        await task
