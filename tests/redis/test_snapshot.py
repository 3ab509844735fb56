"""Snapshots under churn: the atomic read retries; its last resort stays usable."""

from __future__ import annotations

from typing import Any

import pytest

import presence_svc.redis.store as redis_store
from presence_svc.models import CursorUpdate, Thresholds
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from tests.support.clock import FakeClock

THRESHOLDS = Thresholds(idle_after=30, away_after=300, expire_after=600)


async def fill(store: RedisStore, clock: FakeClock, users: int) -> None:
    for n in range(users):
        cursor = CursorUpdate(chapter_id=f"ch{n}", sets_chapter=True)
        await store.heartbeat(f"u{n}", "s1", cursor, clock.ms)
        clock.advance(0.001)


async def test_a_join_between_index_read_and_script_is_retried(
    any_redis: Any, key_prefix: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(any_redis, Keys(key_prefix), THRESHOLDS)
    await fill(store, clock, 3)
    real_zrange = any_redis.zrange
    joined = False

    async def zrange_then_join(*args: Any, **kwargs: Any) -> Any:
        nonlocal joined
        members = await real_zrange(*args, **kwargs)
        if not joined:
            joined = True
            await store.heartbeat("late", "s1", CursorUpdate(), clock.ms)
        return members

    monkeypatch.setattr(any_redis, "zrange", zrange_then_join)
    presence = await store.presence("s1")
    assert [s.user_id for s in presence.sessions] == ["u0", "u1", "u2", "late"]
    assert presence.seq == 4


async def test_the_last_resort_reads_the_same_view_when_nothing_changes(
    any_redis: Any, key_prefix: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(any_redis, Keys(key_prefix), THRESHOLDS)
    await fill(store, clock, 5)
    await store.leave("u3", "s1", clock.ms)
    atomic = await store.presence("s1")
    monkeypatch.setattr(redis_store, "SNAPSHOT_ATTEMPTS", 0)
    fallback = await store.presence("s1")
    assert fallback == atomic
    assert fallback.seq == 6 and len(fallback.sessions) == 4
