"""The bigroom clients' frame rule (presence_svc/bench/scenarios/bigroom_feed.py): what a socket
holds and which gaps it counts, for single events, batches and snapshots; and staleness."""

from __future__ import annotations

import array
import json
from typing import Any

from presence_svc.bench.scenarios.bigroom_feed import (
    EVENTS,
    OTHER,
    SNAPSHOT,
    Chain,
    Feed,
    Frames,
    move_number,
    parse,
    staleness,
)


def _event(kind: str, user: str, seq: int, n: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"user_id": user, "chapter_id": "ch1", "seq": seq, "status": "active"}
    data["move_path"] = f"main.{n}" if n is not None else None
    return {"type": f"presence.{kind}", "data": data}


def _bytes(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _batch(first: int | None, last: int | None, *events: dict[str, Any]) -> bytes:
    data = {"first_seq": first, "last_seq": last, "events": list(events)}
    return _bytes({"type": "presence.batch", "data": data})


def _snapshot(seq: int, **users: int) -> bytes:
    listed = [
        {"user_id": u, "move_path": f"main.{n}", "status": "active"} for u, n in users.items()
    ]
    data = {"study_id": "s", "users": listed, "total": len(listed), "seq": seq}
    return _bytes({"type": "presence.snapshot", "data": data})


def _fed(*payloads: bytes, logged: bool = False) -> Feed:
    feed = Feed(logged)
    for i, payload in enumerate(payloads):
        feed.apply(parse(payload), 1000 * (i + 1))
    return feed


def test_single_events_in_order_build_the_cursors() -> None:
    feed = _fed(
        _snapshot(3, a=1),
        _bytes(_event("user_joined", "b", 4, 1)),
        _bytes(_event("cursor_moved", "a", 5, 2)),
        _bytes(_event("user_left", "b", 6)),
    )
    assert feed.cursors == {"a": 2}
    assert feed.applied == 6 and feed.gaps == 0 and feed.early == 0


def test_a_skipped_seq_is_a_gap_and_an_old_one_is_ignored() -> None:
    feed = _fed(
        _snapshot(3, a=1),
        _bytes(_event("cursor_moved", "a", 3, 9)),  # at the snapshot's seq: already in it
        _bytes(_event("cursor_moved", "a", 5, 2)),  # 4 never came
    )
    assert feed.gaps == 1
    assert feed.cursors == {"a": 2} and feed.applied == 5


def test_a_batch_with_superseded_moves_left_out_is_no_gap() -> None:
    # seqs 6 and 8 were cursor moves superseded within the tick: 5..9 is covered.
    feed = _fed(
        _snapshot(4),
        _batch(
            5,
            9,
            _event("user_joined", "a", 5, 1),
            _event("cursor_moved", "b", 7, 3),
            _event("cursor_moved", "a", 9, 4),
        ),
        _bytes(_event("cursor_moved", "b", 10, 5)),
    )
    assert feed.gaps == 0 and feed.disordered == 0
    assert feed.cursors == {"a": 4, "b": 5} and feed.applied == 10
    assert feed.batches == 1


def test_a_batch_overlapping_what_was_applied_skips_those_events() -> None:
    feed = _fed(
        _snapshot(7, x=1, y=1),
        _batch(
            5,
            9,
            _event("cursor_moved", "x", 6, 50),  # applied already: the snapshot holds x at 1
            _event("user_left", "y", 8),
            _event("cursor_moved", "z", 9, 2),
        ),
    )
    assert feed.gaps == 0
    assert feed.cursors == {"x": 1, "z": 2} and feed.applied == 9


def test_a_batch_starting_past_the_next_seq_is_a_gap() -> None:
    feed = _fed(_snapshot(4), _batch(6, 7, _event("cursor_moved", "a", 7, 1)))
    assert feed.gaps == 1 and feed.applied == 7


def test_a_batch_without_presence_events_changes_nothing() -> None:
    signal = {"type": "signal.typing", "data": {"user_id": "a"}}
    feed = _fed(_snapshot(4, a=1), _batch(None, None, signal))
    assert feed.applied == 4 and feed.gaps == 0 and feed.cursors == {"a": 1}


def test_events_out_of_order_in_a_batch_are_counted() -> None:
    feed = _fed(
        _snapshot(4),
        _batch(5, 6, _event("cursor_moved", "a", 6, 2), _event("cursor_moved", "b", 5, 1)),
        _batch(7, 8, _event("cursor_moved", "a", 9, 3)),  # outside its own range
    )
    assert feed.disordered == 2


def test_a_later_snapshot_replaces_the_state() -> None:
    feed = _fed(
        _snapshot(2, a=1, b=1),
        _bytes(_event("cursor_moved", "a", 3, 2)),
        _snapshot(10, b=7),
        _bytes(_event("cursor_moved", "b", 11, 8)),
    )
    assert feed.cursors == {"b": 8} and feed.applied == 11 and feed.gaps == 0
    assert feed.snapshots == 2


def test_events_before_any_snapshot_are_counted_not_applied() -> None:
    feed = _fed(_bytes(_event("cursor_moved", "a", 3, 2)))
    assert feed.early == 1 and feed.cursors == {} and feed.applied is None


def test_parse_kinds_and_move_numbers() -> None:
    assert parse(b'{"type":"connected","data":{"connection_id":"c"}}').kind == OTHER
    assert parse(b"not json").kind == OTHER
    assert parse(b'{"type":"bench.x","data":{"seq":3}}').kind == OTHER  # no presence event
    assert parse(_snapshot(1, a=3)).kind == SNAPSHOT
    moved = parse(_bytes(_event("cursor_moved", "a", 3, 12)))
    assert moved.kind == EVENTS and moved.first == moved.last == 3 and moved.cursors == {"a": 12}
    left = parse(_bytes(_event("user_left", "a", 4)))
    assert left.cursors is None  # no shortcut when a user goes
    assert move_number("main.42") == 42
    assert move_number("main.4.var1.2") == 0 and move_number(None) == 0


def test_frames_parse_each_payload_once() -> None:
    frames = Frames(size=2)
    one, two, three = (_bytes(_event("cursor_moved", "a", s, s)) for s in (1, 2, 3))
    assert frames.get(one) is frames.get(bytes(one))
    frames.get(two)
    assert frames.parsed == 2
    frames.get(three)  # evicts the oldest
    frames.get(one)
    assert frames.parsed == 4


def test_staleness_counts_each_heartbeat_until_it_or_a_later_one_is_held() -> None:
    # The mover sent n = 1..4 at 100, 200, 300, 400; the socket held 1 at 150 and, n = 2 and 3
    # having been superseded, 4 at 460; then nothing.
    feed = Feed(logged=True)
    feed.apply(parse(_snapshot(0)), 50)
    feed.apply(parse(_bytes(_event("user_joined", "a", 1, 1))), 150)
    feed.apply(parse(_batch(2, 4, _event("cursor_moved", "a", 4, 4))), 460)
    assert feed.log is not None
    sent = {"a": [100, 200, 300, 400, 500]}
    values, unheld = staleness(feed.log, sent, since_ns=0)
    assert list(values) == [50, 260, 160, 60]
    assert unheld == 1  # n = 5 never arrived
    # Only heartbeats sent within [since, until) count.
    values, unheld = staleness(feed.log, sent, since_ns=150, until_ns=450)
    assert list(values) == [260, 160, 60] and unheld == 0


def test_staleness_of_a_user_never_held() -> None:
    values, unheld = staleness({}, {"a": [10, 20]}, since_ns=0)
    assert values == array.array("q") and unheld == 2


def test_forget_restarts_the_counters_and_the_log_not_the_state() -> None:
    feed = _fed(_snapshot(1, a=1), _bytes(_event("cursor_moved", "a", 2, 2)), logged=True)
    assert feed.frames == 0  # the handler counts frames, not apply
    feed.frames = 5
    feed.forget()
    assert feed.frames == 0 and feed.log == {}
    assert feed.cursors == {"a": 2} and feed.applied == 2


def _results(feed: Feed) -> tuple[Any, ...]:
    return (
        feed.applied,
        dict(feed.cursors),
        feed.gaps,
        feed.early,
        feed.disordered,
        feed.batches,
        feed.snapshots,
    )


def test_the_shared_chain_gives_each_socket_what_its_own_application_gives() -> None:
    # One node's stream: every socket gets its frames in this order, from its own snapshot on.
    stream = [
        _bytes(_event("user_joined", "a", 3, 1)),
        _batch(4, 6, _event("user_joined", "b", 4, 1), _event("cursor_moved", "a", 6, 2)),
        _bytes(_event("cursor_moved", "b", 7, 2)),
        _batch(8, 10, _event("user_left", "a", 8), _event("cursor_moved", "b", 10, 3)),
        _batch(9, 12, _event("cursor_moved", "b", 10, 3), _event("user_joined", "c", 12, 1)),
        _bytes(_event("cursor_moved", "c", 13, 2)),
        _batch(14, 15, _event("cursor_moved", "b", 15, 4)),
        _bytes(_event("cursor_moved", "c", 17, 3)),  # 16 never came: a gap on every socket
    ]
    first = _snapshot(2)
    # Per socket: the payloads it receives. Most follow the stream from the same snapshot; one
    # joins later (its own snapshot, which holds a at 2 and b at 1); one misses a frame (a gap:
    # its state leaves the chain's until a frame makes them equal again); one resyncs (a later
    # snapshot of its own, holding a cursor the chain's sockets never see); one gets events
    # before any snapshot (seq 3 came before its snapshot at 2: a gap for it).
    plain = [first, *stream]
    late = [_snapshot(6, a=2, b=1), *stream[2:]]
    missing = [first, *stream[:2], *stream[3:]]
    resynced = [first, *stream[:4], _snapshot(11, b=3, z=9), *stream[4:]]
    early = [stream[0], first, *stream[1:]]
    received = [plain, plain, late, plain, missing, resynced, plain, early, plain]

    frames, chain = Frames(), Chain()
    shared = [Feed(chain=chain) for _ in received]
    alone = [Feed() for _ in received]
    # Interleaved as a worker gets them: one frame per socket in turn.
    for step in range(max(len(r) for r in received)):
        for socket, payloads in enumerate(received):
            if step < len(payloads):
                frame = frames.get(payloads[step])
                shared[socket].apply(frame, step)
                alone[socket].apply(frame, step)

    for socket, (mine, own) in enumerate(zip(shared, alone, strict=True)):
        assert _results(mine) == _results(own), socket
    # The cases are what they say: each socket's own result, checked above.
    assert [f.gaps for f in alone] == [1, 1, 1, 1, 2, 1, 1, 2, 1]
    assert alone[0].cursors == {"b": 4, "c": 3} and alone[0].applied == 17
    assert alone[5].cursors == {"b": 4, "c": 3, "z": 9} and alone[5].snapshots == 2
    assert alone[7].early == 1
    # 68 event frames after a snapshot; applied by a socket: each socket's first one after its
    # snapshot (9: every snapshot is a socket's own state), the chain's other 7, the socket that
    # missed a frame once (its state after the batch 8..10 equals the chain's: it rejoins), and
    # the resynced socket's 4 after its snapshot (it holds z, the chain does not). The rest: 47
    # taken from the chain without an application of their own.
    assert chain.shared + chain.applied == 68
    assert chain.applied == 9 + 7 + 1 + 4 and chain.shared == 47
    # A socket on the chain holds the chain's state itself, not a copy of its own.
    assert shared[0].cursors is shared[1].cursors is shared[8].cursors
    assert shared[5].cursors is not shared[0].cursors


def test_a_socket_on_the_chain_never_changes_the_shared_state() -> None:
    frames, chain = Frames(), Chain()
    one, two = Feed(chain=chain), Feed(chain=chain)
    for payload in (_snapshot(1), _bytes(_event("user_joined", "a", 2, 1))):
        one.apply(frames.get(payload), 0)
        two.apply(frames.get(payload), 0)
    assert one.cursors is two.cursors
    # two alone gets a frame (its seq leaves the chain): one's state stays as it was.
    two.apply(frames.get(_bytes(_event("cursor_moved", "a", 3, 2))), 0)
    two.apply(frames.get(_bytes(_event("user_left", "a", 4))), 0)
    assert one.cursors == {"a": 1} and one.applied == 2
    assert two.cursors == {} and two.applied == 4


def test_a_logged_socket_applies_every_frame_itself() -> None:
    chain = Chain()
    feed = Feed(logged=True, chain=chain)
    feed.apply(parse(_snapshot(0)), 10)
    feed.apply(parse(_bytes(_event("user_joined", "a", 1, 1))), 20)
    assert feed.chain is None and chain.applied == chain.shared == 0
    assert feed.log is not None and list(feed.log["a"]) == [1, 20]
