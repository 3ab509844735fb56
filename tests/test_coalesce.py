"""Coalesced reads: shared only among callers that asked before the read started."""

from __future__ import annotations

import asyncio

import pytest

from presence_svc.coalesce import Coalescer


class SlowRead:
    def __init__(self) -> None:
        self.started: list[int] = []
        self.gate = asyncio.Event()
        self.fail = False

    async def __call__(self, key: str) -> tuple[str, int]:
        self.started.append(len(self.started) + 1)
        number = len(self.started)
        await self.gate.wait()
        if self.fail:
            raise RuntimeError(f"read {number} failed")
        return key, number


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_caller_gets_its_own_read() -> None:
    read = SlowRead()
    read.gate.set()
    coalesce = Coalescer(read)
    assert await coalesce("s1") == ("s1", 1)
    assert await coalesce("s1") == ("s1", 2)


async def test_callers_during_a_read_share_the_next_one() -> None:
    read = SlowRead()
    coalesce = Coalescer(read)
    first = asyncio.create_task(coalesce("s1"))
    await settle()
    later = [asyncio.create_task(coalesce("s1")) for _ in range(50)]
    await settle()
    assert read.started == [1]  # the later callers wait: read 1 began before they asked
    read.gate.set()
    assert await first == ("s1", 1)
    assert await asyncio.gather(*later) == [("s1", 2)] * 50
    assert read.started == [1, 2]


async def test_keys_do_not_share_reads() -> None:
    read = SlowRead()
    coalesce = Coalescer(read)
    tasks = [asyncio.create_task(coalesce(key)) for key in ("a", "b")]
    await settle()
    read.gate.set()
    results = await asyncio.gather(*tasks)
    assert [key for key, _ in results] == ["a", "b"]
    assert sorted(number for _, number in results) == [1, 2]


async def test_errors_reach_every_caller_of_that_read() -> None:
    read = SlowRead()
    read.fail = True
    coalesce = Coalescer(read)
    first = asyncio.create_task(coalesce("s1"))
    await settle()
    later = [asyncio.create_task(coalesce("s1")) for _ in range(3)]
    await settle()
    read.gate.set()
    with pytest.raises(RuntimeError, match="read 1 failed"):
        await first
    for task in later:
        with pytest.raises(RuntimeError, match="read 2 failed"):
            await task


async def test_a_cancelled_caller_does_not_cancel_the_shared_read() -> None:
    read = SlowRead()
    coalesce = Coalescer(read)
    first = asyncio.create_task(coalesce("s1"))
    await settle()
    quitter = asyncio.create_task(coalesce("s1"))
    stayer = asyncio.create_task(coalesce("s1"))
    await settle()
    quitter.cancel()
    first.cancel()
    read.gate.set()
    assert await stayer == ("s1", 2)
    assert quitter.cancelled() and first.cancelled()


async def test_failures_nobody_awaits_are_not_reported_as_unretrieved() -> None:
    read = SlowRead()
    read.fail = True
    coalesce = Coalescer(read)
    first = asyncio.create_task(coalesce("s1"))
    await settle()
    quitter = asyncio.create_task(coalesce("s1"))
    await settle()
    first.cancel()
    quitter.cancel()
    read.gate.set()
    await settle()
    # filterwarnings=error and asyncio debug would flag "exception was never retrieved".
    assert read.started == [1, 2]
