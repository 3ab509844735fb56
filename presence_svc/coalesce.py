"""Coalesced reads: concurrent readers of one key share a read that started after they asked.

A reader must not get a result read before it asked (a WebSocket reads its snapshot after its
subscription is confirmed, and an older read could miss an event). So a caller arriving while
a read is in flight waits for the next read, which every caller arriving meanwhile shares: a
thousand sockets of one study reconnecting at once cost two reads, not a thousand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    def __init__(self, read: Callable[[str], Awaitable[T]]) -> None:
        self._read = read
        self._running: dict[str, asyncio.Future[T]] = {}
        self._next: dict[str, asyncio.Future[T]] = {}

    async def __call__(self, key: str) -> T:
        running = self._running.get(key)
        if running is None:
            return await asyncio.shield(self._start(key))
        waiting = self._next.get(key)
        if waiting is None:
            waiting = self._next[key] = asyncio.get_running_loop().create_future()
            # Nobody may be left to look at it (all callers cancelled): mark it seen.
            waiting.add_done_callback(_consume)
        return await asyncio.shield(waiting)

    def _start(self, key: str) -> asyncio.Future[T]:
        task = asyncio.ensure_future(self._read(key))
        self._running[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))
        task.add_done_callback(_consume)
        return task

    def _finished(self, key: str, done: asyncio.Future[T]) -> None:
        del self._running[key]
        waiting = self._next.pop(key, None)
        if waiting is None:
            return
        task = self._start(key)
        task.add_done_callback(lambda result: _chain(result, waiting))


def _chain(source: asyncio.Future[T], target: asyncio.Future[T]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


def _consume(future: asyncio.Future[T]) -> None:
    if not future.cancelled():
        future.exception()
