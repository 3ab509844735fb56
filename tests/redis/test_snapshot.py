"""The atomic presence reads: capped snapshots, pages by user_id, their counts and seq, their
retries under churn and the last resort (fakeredis, a real Redis and a Redis Cluster)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

import presence_svc.redis.snapshots as snapshots
from presence_svc.models import CursorUpdate, Holder, StatusCounts, StudyPage, StudyPresence
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from tests.support.clock import FakeClock
from tests.support.store import AWAY_MS, EXPIRE_MS, IDLE_MS, NO_CURSOR, THRESHOLDS

STUDY = "s1"


@pytest.fixture
async def store(any_redis: Any, keys: Keys) -> AsyncIterator[RedisStore]:
    # Small sweep windows, so the watermarks also move in steps (cut windows) below.
    opened = RedisStore(any_redis, keys, THRESHOLDS, sessions_per_window=2)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def other(any_redis: Any, keys: Keys) -> AsyncIterator[RedisStore]:
    """A second store (its own pipelining connection): another node's writes."""
    opened = RedisStore(any_redis, keys, THRESHOLDS)
    try:
        yield opened
    finally:
        await opened.close()


async def fill(store: RedisStore, clock: FakeClock, users: int, prefix: str = "u") -> None:
    for n in range(users):
        cursor = CursorUpdate(chapter_id=f"ch{n}", sets_chapter=True)
        await store.heartbeat(f"{prefix}{n}", STUDY, cursor, clock.ms)
        clock.advance(0.001)


def ids(presence: StudyPresence) -> list[str]:
    return [s.user_id for s in presence.sessions]


def by_status(presence: StudyPresence) -> StatusCounts:
    """The counts a full read's own sessions give."""
    found = Counter(s.status.value for s in presence.sessions)
    return StatusCounts(found["active"], found["idle"], found["away"])


async def walk(store: RedisStore, limit: int, between: Any = None) -> list[StudyPage]:
    """Every page of the study, following `next`; `between(page)` runs after each."""
    pages: list[StudyPage] = []
    after: str | None = None
    while True:
        page = await store.page(STUDY, limit, after)
        pages.append(page)
        if between is not None:
            await between(page)
        if page.next is None:
            return pages
        after = page.next


# --- the capped snapshot -----------------------------------------------------------------------


async def test_a_capped_snapshot_lists_the_most_recent_heartbeats_in_join_order(
    store: RedisStore, clock: FakeClock
) -> None:
    await fill(store, clock, 7)  # u0 .. u6 join in that order
    await store.heartbeat("u1", STUDY, NO_CURSOR, clock.ms)  # u1 is now the most recent
    capped = await store.presence(STUDY, 3)
    # The three most recent heartbeats (u1, u6, u5), listed by (joined_at, user_id).
    assert ids(capped) == ["u1", "u5", "u6"]
    assert capped.total == 7 and capped.counts == StatusCounts(active=7)
    assert capped.complete is False
    assert capped.seq == 7
    assert capped.to_json()["users"] == [s.to_json() for s in capped.sessions]
    assert {k: capped.to_json()[k] for k in ("total", "counts", "seq", "complete")} == {
        "total": 7,
        "counts": {"active": 7, "idle": 0, "away": 0},
        "seq": 7,
        "complete": False,
    }


async def test_a_snapshot_within_its_cap_or_uncapped_is_complete(
    store: RedisStore, clock: FakeClock
) -> None:
    await fill(store, clock, 4)
    everyone = await store.presence(STUDY)
    assert ids(everyone) == ["u0", "u1", "u2", "u3"]
    assert everyone.complete is True and everyone.total == 4
    assert await store.presence(STUDY, 4) == everyone
    assert await store.presence(STUDY, 100) == everyone
    assert (await store.presence(STUDY, 3)).complete is False


async def test_a_study_nobody_is_in(store: RedisStore) -> None:
    assert await store.presence("nobody", 10) == StudyPresence("nobody", (), 0)
    assert await store.page("nobody", 10) == StudyPage("nobody", (), 0)
    with pytest.raises(ValueError):
        await store.presence(STUDY, 0)
    with pytest.raises(ValueError):
        await store.page(STUDY, 0)


async def test_counts_are_the_stored_statuses_across_idle_and_away_transitions(
    store: RedisStore, clock: FakeClock
) -> None:
    # Joined 10 s apart, one of them held by a socket (it is away past the expiry, not gone).
    for n in range(6):
        holder = Holder("n1", "conn-0") if n == 0 else None
        await store.heartbeat(f"u{n}", STUDY, NO_CURSOR, clock.ms, holder)
        clock.advance(10)
    start = clock.ms - 60_000
    seen: set[StatusCounts] = set()
    steps = [0, IDLE_MS, IDLE_MS + 25_000, AWAY_MS, AWAY_MS + 30_000, EXPIRE_MS + 52_000]
    for at in (start + step for step in steps):
        # Several sweeps per step: with windows of 2 sessions each one hands on only part.
        for _ in range(4):
            await store.sweep(at)
            everyone = await store.presence(STUDY)
            assert everyone.counts == by_status(everyone), at - start
            assert everyone.total == len(everyone.sessions)
            capped = await store.presence(STUDY, 2)
            assert (capped.counts, capped.seq) == (everyone.counts, everyone.seq)
            page = await store.page(STUDY, 4)
            assert (page.counts, page.seq) == (everyone.counts, everyone.seq)
            seen.add(everyone.counts)
        if at - start == IDLE_MS + 25_000:
            await store.heartbeat("u1", STUDY, NO_CURSOR, at)  # back to active, above both
    # The walk went through mixes of every status, not only all active or all away.
    assert any(c.active and c.idle for c in seen)
    assert any(c.idle and c.away for c in seen)
    # Past the expiry of u2 .. u5 (heartbeats at 20 .. 50 s): u0, held, stays away, and so
    # does u1, back at 55 s.
    assert everyone.counts == StatusCounts(away=2) and ids(everyone) == ["u0", "u1"]


# --- atomicity with seq ------------------------------------------------------------------------


async def test_each_read_is_atomic_with_its_seq_while_users_join(
    store: RedisStore,
    other: RedisStore,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Attempts enough that no read falls back to the last resort here, which is not atomic.
    monkeypatch.setattr(snapshots, "SNAPSHOT_ATTEMPTS", 1000)
    await fill(store, clock, 3, prefix="base")
    joiners = [f"j{n:02d}" for n in range(40)]
    joined_at: dict[str, int] = {}

    async def join() -> None:
        for user in joiners:
            joined_at[user] = clock.ms
            await other.heartbeat(user, STUDY, NO_CURSOR, clock.ms)  # one event, seq + 1
            clock.advance(0.001)
            await asyncio.sleep(0)

    reads: list[StudyPresence] = []

    async def read() -> None:
        while len(joined_at) < len(joiners):
            reads.extend(
                await asyncio.gather(
                    store.presence(STUDY), store.presence(STUDY, 5), store.page(STUDY, 7, "j")
                )
            )

    await asyncio.gather(join(), read())
    assert len(reads) >= 3
    for presence in reads:
        # At seq s, the 3 base users and the first s - 3 joiners are in, nobody else.
        present = ["base0", "base1", "base2", *joiners[: presence.seq - 3]]
        assert presence.total == len(present) and presence.counts.active == len(present)
        if isinstance(presence, StudyPage):
            assert ids(presence) == [u for u in present if u > "j"][:7]
        elif presence.complete:
            assert sorted(ids(presence)) == present
        else:
            assert sorted(ids(presence)) == present[-5:]  # the 5 most recent heartbeats


# --- pages -------------------------------------------------------------------------------------


async def test_pages_go_by_user_id_in_byte_order(store: RedisStore, clock: FakeClock) -> None:
    users = ["b", "B", "a", "_x", "0", "a.b", "a-b", "Z9", "z", "a@c", "a:b"]
    for user in users:
        await store.heartbeat(user, STUDY, NO_CURSOR, clock.ms)
        clock.advance(0.001)
    pages = await walk(store, 3)
    assert [ids(p) for p in pages] == [
        ["0", "B", "Z9"],
        ["_x", "a", "a-b"],
        ["a.b", "a:b", "a@c"],
        ["b", "z"],
    ]
    assert [p.next for p in pages] == ["Z9", "a-b", "a@c", None]
    assert all(p.total == 11 and p.counts == StatusCounts(active=11) for p in pages)
    assert not any(p.complete for p in pages)
    assert pages[-1].to_json()["next"] is None
    assert pages[0].to_json() == {
        "study_id": STUDY,
        "users": [s.to_json() for s in pages[0].sessions],
        "total": 11,
        "counts": {"active": 11, "idle": 0, "away": 0},
        "seq": 11,
        "complete": False,
        "next": "Z9",
    }


async def test_a_page_holding_everyone_is_complete_and_last(
    store: RedisStore, clock: FakeClock
) -> None:
    await fill(store, clock, 3)
    [page] = await walk(store, 3)
    assert ids(page) == ["u0", "u1", "u2"] and page.next is None and page.complete
    assert (await store.page(STUDY, 2, "u0")).next is None  # u1, u2: nothing follows
    beyond = await store.page(STUDY, 5, "zzz")
    assert beyond.sessions == () and beyond.next is None and beyond.total == 3
    assert not beyond.complete
    between = await store.page(STUDY, 1, "u0a")  # `after` need not be a member
    assert ids(between) == ["u1"] and between.next == "u1"


async def test_a_walk_visits_every_member_exactly_once_while_others_join_and_leave(
    store: RedisStore, other: RedisStore, clock: FakeClock
) -> None:
    stable = [f"m{n:02d}" for n in range(23)]
    for user in stable:
        await store.heartbeat(user, STUDY, NO_CURSOR, clock.ms)
    churn = [f"c{n:02d}" for n in range(6)] + [f"x{n:02d}" for n in range(6)]
    for user in churn:
        await store.heartbeat(user, STUDY, NO_CURSOR, clock.ms)
    joined = 0

    async def meanwhile(page: StudyPage) -> None:
        # Between pages: one churner leaves, users join before and after the walk's place,
        # and a stable member's heartbeat moves it in the index (by score, not by name).
        nonlocal joined
        if churn:
            await other.leave(churn.pop(), STUDY, clock.ms)
        for prefix in ("a", "n", "zz"):
            await other.heartbeat(f"{prefix}{joined:02d}", STUDY, NO_CURSOR, clock.ms)
        joined += 1
        await other.heartbeat(stable[joined % len(stable)], STUDY, NO_CURSOR, clock.ms)

    pages = await walk(store, 4, meanwhile)
    visited = [user for page in pages for user in ids(page)]
    assert len(visited) == len(set(visited))  # nobody twice
    assert set(stable) <= set(visited)  # everyone present throughout, once
    assert visited == sorted(visited)
    assert all(len(p.sessions) == 4 for p in pages[:-1])
    assert any(u.startswith("zz") for u in visited)  # joined ahead of the walk: found


# --- retries and the last resort ---------------------------------------------------------------


async def test_a_join_between_index_read_and_script_is_retried(
    any_redis: Any, store: RedisStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(store, clock, 3)
    real_zrange = any_redis.zrange
    joined = False

    async def zrange_then_join(*args: Any, **kwargs: Any) -> Any:
        nonlocal joined
        members = await real_zrange(*args, **kwargs)
        if not joined:
            joined = True
            await store.heartbeat("late", STUDY, CursorUpdate(), clock.ms)
        return members

    monkeypatch.setattr(any_redis, "zrange", zrange_then_join)
    presence = await store.presence(STUDY)
    assert ids(presence) == ["u0", "u1", "u2", "late"]
    assert presence.seq == 4 and presence.total == 4 and presence.complete


@pytest.mark.parametrize("read", ["capped", "page"])
async def test_a_move_into_the_selection_between_index_read_and_script_is_retried(
    any_redis: Any,
    store: RedisStore,
    other: RedisStore,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    read: str,
) -> None:
    await fill(store, clock, 6)
    real_zrange = any_redis.zrange
    runs = 0
    real_run = store._batch.run

    async def counted(commands: Any) -> Any:
        nonlocal runs
        runs += 1
        return await real_run(commands)

    async def zrange_then_change(*args: Any, **kwargs: Any) -> Any:
        members = await real_zrange(*args, **kwargs)
        # The capped read's top 2 were u4, u5: u0 heartbeats into it. The page after u2 was
        # u3, u4: u30 joins into it.
        user = "u0" if read == "capped" else "u30"
        await other.heartbeat(user, STUDY, NO_CURSOR, clock.ms + 1000)
        return members

    monkeypatch.setattr(any_redis, "zrange", zrange_then_change)
    monkeypatch.setattr(store._batch, "run", counted)
    if read == "capped":
        presence: StudyPresence = await store.presence(STUDY, 2)
        assert ids(presence) == ["u0", "u5"]
    else:
        presence = await store.page(STUDY, 2, "u2")
        assert ids(presence) == ["u3", "u30"]
    assert runs == 2  # the script's first answer was the selection: it ran again
    joins = read == "page"  # u0 heartbeating again publishes nothing, u30 joining does
    assert presence.seq == 6 + joins and presence.total == 6 + joins


@pytest.mark.parametrize("read", ["everyone", "capped", "page"])
async def test_the_last_resort_reads_the_sessions_its_last_run_selected(
    any_redis: Any,
    store: RedisStore,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    read: str,
) -> None:
    await fill(store, clock, 5)
    await store.leave("u3", STUDY, clock.ms)

    async def reads() -> StudyPresence:
        if read == "everyone":
            return await store.presence(STUDY)
        if read == "capped":
            return await store.presence(STUDY, 2)
        return await store.page(STUDY, 2, "u0")

    atomic = await reads()
    real_zrange = any_redis.zrange

    async def names_nobody(*args: Any, **kwargs: Any) -> Any:
        await real_zrange(*args, **kwargs)
        return []

    # One run, which names nobody: its answer is the selection, and the last resort follows.
    monkeypatch.setattr(snapshots, "SNAPSHOT_ATTEMPTS", 1)
    monkeypatch.setattr(any_redis, "zrange", names_nobody)
    fallback = await reads()
    assert fallback == atomic
    assert fallback.seq == 6 and fallback.total == 4 and fallback.sessions
    if isinstance(fallback, StudyPage):
        assert ids(fallback) == ["u1", "u2"] and fallback.next == "u2"


async def test_the_last_resort_keeps_the_seq_and_counts_of_its_selection(
    any_redis: Any, store: RedisStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(store, clock, 3)
    real_zrange = any_redis.zrange
    real_hashes = store._snapshots._hashes

    async def names_nobody(*args: Any, **kwargs: Any) -> Any:
        await real_zrange(*args, **kwargs)
        return []

    async def leave_then_read(*args: Any) -> Any:
        # u1 leaves after the script selected it, before its session is read.
        await store.leave("u1", STUDY, clock.ms)
        return await real_hashes(*args)

    monkeypatch.setattr(snapshots, "SNAPSHOT_ATTEMPTS", 1)
    monkeypatch.setattr(any_redis, "zrange", names_nobody)
    monkeypatch.setattr(store._snapshots, "_hashes", leave_then_read)
    presence = await store.presence(STUDY)
    # Seq and counts as the script saw them (before the leave, seq 4); u1's session was gone
    # when read, so it is not listed: user_left (seq 4) follows, and a client converges.
    assert presence.seq == 3 and presence.counts == StatusCounts(active=3)
    assert ids(presence) == ["u0", "u2"]
    assert (await store.presence(STUDY)).seq == 4
