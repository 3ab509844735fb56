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


# -- big rooms (issue 13): batches, counts, partial lists ------------------------------------


def counted(seq: int, complete: bool, counts: dict[str, int], *users: dict[str, Any]) -> StudyState:
    state = StudyState()
    data = {**snapshot(seq, *users), "counts": counts, "complete": complete}
    data["total"] = sum(counts.values())
    state.apply_snapshot(data)
    return state


def status_event(seq: int, user: str, status: str, previous: str) -> dict[str, Any]:
    return {**event(seq, user, status), "previous_status": previous}


def batch(
    first: int | None, last: int | None, *events: tuple[str, dict[str, Any]]
) -> dict[str, Any]:
    return {
        "first_seq": first,
        "last_seq": last,
        "events": [{"type": kind, "data": data} for kind, data in events],
    }


def test_a_batch_applies_its_events_in_order_and_continues_from_last_seq() -> None:
    state = synced(119, session("alice"))
    signal = ("signal.typing", {"user_id": "bob"})
    data = batch(
        120,
        161,
        ("presence.user_joined", event(125, "bob")),
        signal,
        ("presence.cursor_moved", event(140, "bob", move="main.4")),
        ("presence.user_idle", status_event(161, "alice", "idle", "active")),
    )
    verdict, steps = state.apply_batch(data)
    assert verdict is Verdict.APPLIED and state.seq == 161
    assert [None if s is None else [c.kind for c in s] for s in steps] == [
        ["join"],
        None,
        ["cursor"],
        ["status"],
    ]
    # The next event follows last_seq: no gap although seqs inside the batch jumped.
    verdict, _ = state.apply_event(
        "presence.user_active", status_event(162, "alice", "active", "idle")
    )
    assert verdict is Verdict.APPLIED and state.seq == 162


def test_a_batch_skips_what_was_applied_and_a_later_first_seq_is_a_gap() -> None:
    state = synced(130, session("alice"), session("bob"))
    data = batch(
        120,
        135,
        ("presence.cursor_moved", event(125, "bob", move="main.1")),  # already applied
        ("presence.cursor_moved", event(135, "alice", move="main.9")),
    )
    verdict, steps = state.apply_batch(data)
    assert verdict is Verdict.APPLIED and state.seq == 135
    assert [[c.user.user_id for c in s or []] for s in steps] == [[], ["alice"]]
    assert state.get("bob").move_path is None  # type: ignore[union-attr]
    # Entirely applied already: stale, and the signals in it are still the caller's.
    verdict, steps = state.apply_batch(batch(131, 135, ("signal.pointer", {"user_id": "bob"})))
    assert (verdict, steps, state.seq) == (Verdict.STALE, [None], 135)
    verdict, steps = state.apply_batch(
        batch(137, 140, ("presence.user_joined", event(140, "carol")), ("x.backend", {}))
    )
    assert verdict is Verdict.GAP and steps == [[], None] and not state.synced
    assert state.get("carol") is None


def test_a_batch_of_signals_only_has_no_seqs() -> None:
    state = synced(10)
    verdict, steps = state.apply_batch(batch(None, None, ("signal.typing", {"user_id": "a"})))
    assert (verdict, steps, state.seq) == (Verdict.APPLIED, [None], 10)


def test_a_batch_before_the_snapshot_waits_for_it() -> None:
    state = StudyState()
    early = batch(
        5,
        9,
        ("presence.user_joined", event(6, "bob")),
        ("signal.typing", {"user_id": "bob"}),
        ("presence.cursor_moved", event(9, "bob", move="main.2")),
    )
    verdict, steps = state.apply_batch(early)
    assert verdict is Verdict.BUFFERED and steps == [[], None, []]
    assert state.apply_event("presence.user_joined", event(10, "carol"))[0] is Verdict.BUFFERED
    changes, gap = state.apply_snapshot(snapshot(4, session("alice")))
    assert not gap and state.seq == 10
    assert [(c.kind, c.user.user_id) for c in changes] == [
        ("join", "alice"),
        ("join", "bob"),
        ("cursor", "bob"),
        ("join", "carol"),
    ]


def test_a_buffered_batch_that_does_not_follow_the_snapshot_is_a_gap() -> None:
    state = StudyState()
    state.apply_batch(batch(8, 9, ("presence.user_joined", event(9, "bob"))))
    _, gap = state.apply_snapshot(snapshot(6))
    assert gap and not state.synced


def test_counts_come_from_the_snapshot_and_follow_previous_status() -> None:
    # Two of 13 sessions listed: every other user's events still move the counts.
    state = counted(20, False, {"active": 10, "idle": 2, "away": 1}, session("alice"))
    assert (state.total, state.complete) == (13, False)
    state.apply_event("presence.user_joined", event(21, "bob"))
    state.apply_event("presence.user_idle", status_event(22, "zed", "idle", "active"))
    state.apply_event("presence.user_away", status_event(23, "yan", "away", "idle"))
    state.apply_event("presence.user_left", event(24, "xia", "away"))
    state.apply_event("presence.user_idle", status_event(25, "alice", "idle", "active"))
    assert state.counts == {"active": 9, "idle": 3, "away": 1} and state.total == 13
    state.apply_event("presence.user_left", event(26, "bob"))
    assert state.counts == {"active": 8, "idle": 3, "away": 1}


def test_an_unlisted_users_event_lists_them_without_a_join() -> None:
    state = counted(20, False, {"active": 3, "idle": 1, "away": 0}, session("alice"))
    _, changes = state.apply_event("presence.cursor_moved", event(21, "zed", move="main.5"))
    assert [(c.kind, c.user.user_id, c.previous) for c in changes] == [("cursor", "zed", None)]
    _, changes = state.apply_event("presence.user_idle", status_event(22, "yan", "idle", "active"))
    assert [(c.kind, c.user.user_id, c.previous) for c in changes] == [("status", "yan", None)]
    assert [u.user_id for u in state.users()] == ["alice", "yan", "zed"]
    assert state.get("zed").joined_at is None  # type: ignore[union-attr]
    assert state.counts == {"active": 2, "idle": 2, "away": 0}
    # previous_status is the event's, not a field of the user.
    assert not hasattr(state.get("yan"), "previous_status")


def test_counts_do_not_count_twice_what_the_snapshot_already_reflects() -> None:
    state = counted(
        10, True, {"active": 1, "idle": 1, "away": 0}, session("a"), session("b", "idle")
    )
    state.apply_event("presence.user_joined", event(11, "a"))  # already in the snapshot
    state.apply_event("presence.user_idle", status_event(12, "b", "idle", "active"))
    state.apply_event("presence.user_left", event(13, "gone"))  # a complete list: not here
    assert state.counts == {"active": 1, "idle": 1, "away": 0}


def test_a_snapshot_without_counts_counts_its_users() -> None:
    state = synced(3, session("a"), session("b", "away"), session("c", "away"))
    assert (state.counts, state.total, state.complete) == (
        {"active": 1, "idle": 0, "away": 2},
        3,
        True,
    )


def test_a_partial_snapshot_after_a_resync_reports_no_leave_for_the_unlisted() -> None:
    state = counted(10, False, {"active": 5, "idle": 0, "away": 0}, session("a"), session("b"))
    state.expect_snapshot()
    data = {**snapshot(12, session("a")), "counts": {"active": 5}, "complete": False}
    changes, _ = state.apply_snapshot(data)
    assert changes == [] and [u.user_id for u in state.users()] == ["a"]
    assert state.counts == {"active": 5, "idle": 0, "away": 0}


@pytest.mark.parametrize(
    "data",
    [
        {"first_seq": 3, "last_seq": 2, "events": []},
        {"first_seq": 3, "last_seq": None, "events": []},
        {"first_seq": None, "last_seq": None, "events": "x"},
        {
            "first_seq": None,
            "last_seq": None,
            "events": [{"type": "presence.user_joined", "data": {}}],
        },
        {
            "first_seq": 1,
            "last_seq": 2,
            "events": [{"type": "presence.snapshot", "data": {"seq": 1}}],
        },
        {"first_seq": 1, "last_seq": 2, "events": [7]},
    ],
)
def test_a_malformed_batch_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage):
        synced(1).apply_batch(data)
