"""StudyState without a network: snapshots, events strictly by seq, early events, gaps."""

from __future__ import annotations

from typing import Any

import pytest

from presence_svc.client.state import MalformedMessage, StudyState, Verdict


def session(user: str, status: str = "active", move: str | None = None) -> dict[str, Any]:
    return {
        "session_id": f"s-{user}",
        "user_id": user,
        "study_id": "st",
        "chapter_id": "ch1",
        "move_path": move,
        "status": status,
        "last_heartbeat": "2026-01-01T00:00:01.000Z",
        "joined_at": "2026-01-01T00:00:00.000Z",
    }


def snapshot(seq: int, *users: dict[str, Any]) -> dict[str, Any]:
    return {"study_id": "st", "users": list(users), "total": len(users), "seq": seq}


def event(seq: int, user: str, status: str = "active", move: str | None = None) -> dict[str, Any]:
    data = session(user, status, move)
    del data["last_heartbeat"], data["joined_at"]
    return {**data, "timestamp": f"2026-01-01T00:00:{seq:02d}.000Z", "seq": seq}


def synced(seq: int = 10, *users: dict[str, Any]) -> StudyState:
    state = StudyState()
    state.apply_snapshot(snapshot(seq, *users))
    return state


def test_a_snapshot_makes_the_users_and_reports_their_joins() -> None:
    state = StudyState()
    assert not state.synced
    changes, gap = state.apply_snapshot(snapshot(7, session("bob"), session("alice", "idle")))
    assert not gap and state.seq == 7
    assert [(c.kind, c.user.user_id) for c in changes] == [("join", "alice"), ("join", "bob")]
    assert [(u.user_id, u.status) for u in state.users()] == [("alice", "idle"), ("bob", "active")]
    alice = state.get("alice")
    assert alice is not None and alice.joined_at == "2026-01-01T00:00:00.000Z"
    assert alice.updated_at == "2026-01-01T00:00:01.000Z"


def test_events_in_order_change_the_users() -> None:
    state = synced(10, session("alice"))
    verdict, changes = state.apply_event("presence.user_joined", event(11, "bob"))
    assert verdict is Verdict.APPLIED and [c.kind for c in changes] == ["join"]
    verdict, changes = state.apply_event("presence.cursor_moved", event(12, "bob", move="main.3"))
    [moved] = changes
    assert (moved.kind, moved.user.move_path) == ("cursor", "main.3")
    assert moved.previous is not None and moved.previous.move_path is None
    _, [idle] = state.apply_event("presence.user_idle", event(13, "alice", "idle"))
    assert (idle.kind, idle.user.status, idle.previous and idle.previous.status) == (
        "status",
        "idle",
        "active",
    )
    # A later event keeps the join time it does not carry.
    assert state.get("alice").joined_at == "2026-01-01T00:00:00.000Z"  # type: ignore[union-attr]
    _, [left] = state.apply_event("presence.user_left", event(14, "bob", move="main.3"))
    assert (left.kind, left.user.user_id) == ("leave", "bob")
    assert [u.user_id for u in state.users()] == ["alice"] and state.seq == 14


def test_events_at_or_below_the_seq_are_dropped() -> None:
    state = synced(10, session("alice"))
    for seq in (9, 10):
        verdict, changes = state.apply_event("presence.user_left", event(seq, "alice"))
        assert (verdict, changes) == (Verdict.STALE, [])
    assert [u.user_id for u in state.users()] == ["alice"] and state.seq == 10


def test_a_gap_stops_applying_until_a_fresh_snapshot() -> None:
    state = synced(10, session("alice"))
    verdict, changes = state.apply_event("presence.user_joined", event(12, "bob"))
    assert (verdict, changes) == (Verdict.GAP, []) and not state.synced
    assert [u.user_id for u in state.users()] == ["alice"], "guessed past the gap"
    # Until the fresh snapshot, events wait; those it already reflects are then dropped.
    assert state.apply_event("presence.user_joined", event(12, "bob"))[0] is Verdict.BUFFERED
    assert state.apply_event("presence.user_joined", event(13, "carol"))[0] is Verdict.BUFFERED
    changes, gap = state.apply_snapshot(snapshot(12, session("alice"), session("bob")))
    assert not gap and state.seq == 13
    assert [(c.kind, c.user.user_id) for c in changes] == [("join", "bob"), ("join", "carol")]


def test_events_before_the_snapshot_are_buffered_then_applied_in_seq_order() -> None:
    state = StudyState()
    assert state.apply_event("presence.user_idle", event(6, "bob", "idle"))[0] is Verdict.BUFFERED
    assert state.apply_event("presence.user_joined", event(5, "bob"))[0] is Verdict.BUFFERED
    assert state.apply_event("presence.user_joined", event(3, "old"))[0] is Verdict.BUFFERED
    changes, gap = state.apply_snapshot(snapshot(4, session("alice")))
    assert not gap and state.seq == 6
    assert [(c.kind, c.user.user_id) for c in changes] == [
        ("join", "alice"),
        ("join", "bob"),
        ("status", "bob"),
    ]
    assert state.get("old") is None


def test_a_gap_among_the_buffered_events_is_reported_by_the_snapshot() -> None:
    state = StudyState()
    state.apply_event("presence.user_joined", event(9, "bob"))
    _, gap = state.apply_snapshot(snapshot(7))
    assert gap and not state.synced


def test_a_snapshot_during_a_burst_may_already_hold_the_next_events() -> None:
    # README: a snapshot can include a few events numbered above its seq; applying them again
    # must converge, not duplicate or fail.
    state = synced(10, session("alice"), session("bob", move="main.2"))
    verdict, changes = state.apply_event("presence.user_joined", event(11, "bob", move="main.2"))
    assert verdict is Verdict.APPLIED and changes == []
    verdict, changes = state.apply_event("presence.user_left", event(12, "carol"))
    assert verdict is Verdict.APPLIED and changes == []
    assert [u.user_id for u in state.users()] == ["alice", "bob"]


def test_a_later_snapshot_reports_only_what_changed() -> None:
    state = synced(10, session("alice"), session("bob"), session("carol", move="main.1"))
    state.expect_snapshot()
    assert not state.synced and len(state.users()) == 3, "users vanished while reconnecting"
    changes, _ = state.apply_snapshot(
        snapshot(15, session("alice"), session("carol", "away", "main.2"), session("dave"))
    )
    assert [(c.kind, c.user.user_id) for c in changes] == [
        ("leave", "bob"),
        ("status", "carol"),
        ("cursor", "carol"),
        ("join", "dave"),
    ]


def test_the_early_buffer_is_bounded() -> None:
    state = StudyState(max_early=2)
    for seq in (1, 2):
        assert state.apply_event("presence.user_joined", event(seq, "u"))[0] is Verdict.BUFFERED
    assert state.apply_event("presence.user_joined", event(3, "u"))[0] is Verdict.GAP


@pytest.mark.parametrize(
    "data",
    [
        {"users": [], "seq": "7"},
        {"users": [], "seq": True},
        {"users": [], "seq": -1},
        {"users": "nobody", "seq": 1},
        {"users": [{"user_id": "a"}], "seq": 1},
        {"users": [{"user_id": "a", "status": "active", "move_path": 3}], "seq": 1},
        {"users": [7], "seq": 1},
    ],
)
def test_a_malformed_snapshot_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage):
        StudyState().apply_snapshot(data)


def test_a_malformed_event_is_refused() -> None:
    state = synced(1)
    with pytest.raises(MalformedMessage):
        state.apply_event("presence.user_joined", {"seq": 2, "status": "active"})
    with pytest.raises(MalformedMessage):
        state.apply_event("presence.user_joined", {"user_id": "u", "status": "active"})
