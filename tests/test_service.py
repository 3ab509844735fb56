"""PresenceService: the store contract driven by the service's clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from presence_svc.models import (
    CursorUpdate,
    Holder,
    Lease,
    Session,
    Status,
    StudyPresence,
    SweepReport,
    Thresholds,
)
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.service import PresenceService
from presence_svc.store import NodeRenewal
from tests.support.clock import FakeClock

THRESHOLDS = Thresholds(idle_after=30, away_after=300, expire_after=600)
STORE_NOW_MS = 1_700_000_000_000  # the recording store's own clock, far from the service's


@pytest.fixture
def store(fake_redis: Any, key_prefix: str) -> RedisStore:
    return RedisStore(fake_redis, Keys(key_prefix), THRESHOLDS)


@pytest.fixture
def service(store: RedisStore, clock: FakeClock) -> PresenceService:
    return PresenceService(store, clock=clock)


@dataclass
class RecordingStore:
    """A PresenceStore that records its calls."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def heartbeat(
        self,
        user_id: str,
        study_id: str,
        cursor: CursorUpdate,
        now_ms: int,
        holder: Holder | None = None,
        steady: bool = False,
    ) -> Session:
        self.calls.append(("heartbeat", user_id, study_id, cursor, now_ms))
        return Session("sid", user_id, study_id, None, None, Status.ACTIVE, now_ms, now_ms)

    async def leave(self, user_id: str, study_id: str, now_ms: int) -> bool:
        self.calls.append(("leave", user_id, study_id, now_ms))
        return True

    async def presence(self, study_id: str, max_users: int | None = None) -> StudyPresence:
        self.calls.append(("presence", study_id, max_users))
        return StudyPresence(study_id, (), 42)

    async def sweep(self, now_ms: int) -> SweepReport:
        self.calls.append(("sweep", now_ms))
        return SweepReport(studies=1, events=2, more_due=True)

    async def release(self, leases: Sequence[Lease], leave_at_ms: int, now_ms: int) -> int:
        self.calls.append(("release", tuple(leases), leave_at_ms, now_ms))
        return len(leases)

    async def renew_node(self, node_id: str, now_ms: int | None = None) -> NodeRenewal:
        self.calls.append(("renew_node", node_id, now_ms))
        return NodeRenewal(True, STORE_NOW_MS)

    async def reacquire(self, leases: Sequence[Lease]) -> list[bool]:
        return [True for _ in leases]

    async def drop_node(self, node_id: str) -> None:
        self.calls.append(("drop_node", node_id))

    async def reap_dead_nodes(
        self, caller: str, lease_ttl_ms: int, grace_ms: int, now_ms: int | None = None
    ) -> int:
        self.calls.append(("reap", caller, lease_ttl_ms, grace_ms, now_ms))
        return 0


async def test_service_passes_the_clock_in_whole_milliseconds() -> None:
    recording = RecordingStore()
    clock = FakeClock(1_800_000_000.1239)
    service = PresenceService(recording, clock=clock)
    cursor = CursorUpdate(chapter_id="c1", sets_chapter=True)

    await service.heartbeat("alice", "s1", cursor)
    await service.heartbeat("alice", "s1")
    clock.advance(2.5)
    assert await service.leave("alice", "s1") is True
    assert await service.presence("s1") == StudyPresence("s1", (), 42)
    assert await service.sweep() == SweepReport(studies=1, events=2, more_due=True)
    assert recording.calls == [
        ("heartbeat", "alice", "s1", cursor, 1_800_000_000_123),
        ("heartbeat", "alice", "s1", CursorUpdate(), 1_800_000_000_123),
        ("leave", "alice", "s1", 1_800_000_002_623),
        ("presence", "s1", None),
        ("sweep", 1_800_000_002_623),
    ]


async def test_node_liveness_runs_on_the_store_s_clock_not_the_service_s() -> None:
    # A renewal dated by the node can arrive late (Redis or the node paused) and then look
    # older than it is; renewals and reaps therefore take the store's time when applied.
    recording = RecordingStore()
    service = PresenceService(recording, clock=FakeClock(), leave_grace=2.5, lease_ttl=1.5)
    assert await service.renew_node("n1") == NodeRenewal(True, STORE_NOW_MS)
    assert await service.reap_dead_nodes("n1") == 0
    assert recording.calls == [("renew_node", "n1", None), ("reap", "n1", 1_500, 2_500, None)]


async def test_heartbeat_uses_the_clock(service: PresenceService, clock: FakeClock) -> None:
    session = await service.heartbeat("alice", "s1")
    assert session.last_heartbeat_ms == session.joined_at_ms == clock.ms
    assert session.status is Status.ACTIVE
    assert (session.chapter_id, session.move_path) == (None, None)

    clock.advance(10)
    again = await service.heartbeat(
        "alice", "s1", CursorUpdate(move_path="m1", sets_move_path=True)
    )
    assert again.session_id == session.session_id
    assert again.last_heartbeat_ms == clock.ms
    assert again.joined_at_ms == session.joined_at_ms
    assert again.move_path == "m1"

    # No cursor given: the cursor is kept.
    kept = await service.heartbeat("alice", "s1")
    assert kept.move_path == "m1"


async def test_sweep_follows_the_clock(service: PresenceService, clock: FakeClock) -> None:
    await service.heartbeat("alice", "s1")
    await service.heartbeat("bob", "s1")

    clock.advance(29.999)
    assert await service.sweep() == SweepReport()
    clock.advance(0.001)
    assert await service.sweep() == SweepReport(studies=1, events=2)
    statuses = {s.user_id: s.status for s in (await service.presence("s1")).sessions}
    assert statuses == {"alice": Status.IDLE, "bob": Status.IDLE}

    back = await service.heartbeat("bob", "s1")  # bob is back at 30 s
    assert back.status is Status.ACTIVE
    clock.advance(270)  # 300 s: alice away; bob idle again
    assert await service.sweep() == SweepReport(studies=1, events=2)
    statuses = {s.user_id: s.status for s in (await service.presence("s1")).sessions}
    assert statuses == {"alice": Status.AWAY, "bob": Status.IDLE}

    clock.advance(300)  # 600 s: alice expires; bob is away
    assert await service.sweep() == SweepReport(studies=1, events=2)
    presence = await service.presence("s1")
    assert [(s.user_id, s.status) for s in presence.sessions] == [("bob", Status.AWAY)]
    # joined x2, idle x2, active, away + idle, left + away
    assert presence.seq == 9


async def test_leave_and_presence(service: PresenceService, clock: FakeClock) -> None:
    await service.heartbeat("alice", "s1")
    clock.advance(1)
    await service.heartbeat("bob", "s1")
    presence = await service.presence("s1")
    assert [s.user_id for s in presence.sessions] == ["alice", "bob"]
    assert presence.seq == 2

    assert await service.leave("alice", "s1") is True
    assert await service.leave("alice", "s1") is False
    presence = await service.presence("s1")
    assert [s.user_id for s in presence.sessions] == ["bob"]
    assert presence.seq == 3
    assert await service.presence("elsewhere") == StudyPresence("elsewhere", (), 0)


async def test_a_capped_presence_and_a_page(service: PresenceService, clock: FakeClock) -> None:
    for user in ("carol", "alice", "bob"):
        await service.heartbeat(user, "s1")
        clock.advance(1)
    capped = await service.presence("s1", 2)
    assert [s.user_id for s in capped.sessions] == ["alice", "bob"]  # the two most recent
    assert (capped.total, capped.complete, capped.seq) == (3, False, 3)
    first = await service.page("s1", 2)
    assert [s.user_id for s in first.sessions] == ["alice", "bob"] and first.next == "bob"
    last = await service.page("s1", 2, first.next)
    assert [s.user_id for s in last.sessions] == ["carol"] and last.next is None
