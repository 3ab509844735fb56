"""Batched delivery for big studies (fanout.py, batching.py): one presence.batch per tick.

On in-memory subscriptions (the fan-out is handed its messages as the pub/sub links would),
real `Connection`s as the sockets (their `personal` and snapshot-floor rules apply) and a
MovableClock for the batch window: moving it ends a tick, nothing sleeps. The last test runs
the rule through a node's app; tests/multinode/test_batching.py on real nodes and Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from presence_svc.codec import Outgoing, encode_envelope, json_text
from presence_svc.fanout import Fanout, Inbox
from presence_svc.web.ws_connection import Connection
from tests.support.app import app_client, node_of
from tests.support.auth import auth, token
from tests.support.clock import MovableClock
from tests.support.waiting import eventually_async

STUDY = "big"
CHANNEL = f"channel:{STUDY}"
WINDOW = 0.05
THRESHOLD = 2


class Links:
    """The fan-out's Subscriptions, in memory: subscribing is confirmed at once."""

    links = 1
    connected = True
    reconnects = 0

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self.subscribed: set[str] = set()

    async def subscribe(self, channel: str) -> None:
        self.subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.subscribed.discard(channel)

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None


class Socket:
    """A real Connection whose ASGI send keeps each text frame (as the very object sent)."""

    def __init__(self, connection_id: str, floor: int = 0) -> None:
        self.frames: list[str] = []
        self.connection = Connection(self._send, 1024, None, connection_id)
        self.connection.start(floor)

    async def _send(self, message: Any) -> None:
        self.frames.append(message["text"])

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(frame) for frame in self.frames]


@dataclass(eq=False)
class Probe:
    """A subscriber that keeps the Outgoing objects themselves."""

    watcher: bool = True
    events: list[Outgoing] = field(default_factory=list)

    def deliver(self, event: Outgoing) -> None:
        self.events.append(event)


class Harness:
    def __init__(self, threshold: int = THRESHOLD, window: float = WINDOW) -> None:
        self.clock = MovableClock(start=1_000.0)
        self.observed: list[tuple[Outgoing, int]] = []
        self.resyncs: list[tuple[asyncio.Future[Outgoing], asyncio.Task[Any] | None]] = []
        self.fanout = Fanout(
            Links,
            lambda study: f"channel:{study}",
            self.resync,
            lambda event, sockets: self.observed.append((event, sockets)),
            clock=self.clock,
            batch_threshold=threshold,
            batch_window=window,
        )

    async def resync(self, study: str) -> Outgoing:
        answer = asyncio.get_running_loop().create_future()
        self.resyncs.append((answer, asyncio.current_task()))
        snapshot: Outgoing = await answer
        return snapshot

    async def answer_resync(self, floor: int) -> None:
        """Answer the oldest resync with a snapshot at `floor`; returns once it is delivered."""
        await self.answer_next(snapshot(floor))

    async def answer_next(self, answer: Outgoing) -> None:
        # The resync runs in a task of the fan-out's: it asks once that task has started.
        await eventually_async(lambda: self.resyncs, what="a resync asked for its snapshot")
        future, task = self.resyncs.pop(0)
        future.set_result(answer)
        assert task is not None
        await task

    async def sockets(self, count: int, first: int = 0) -> list[Socket]:
        made = [Socket(f"conn-{n}") for n in range(first, first + count)]
        for socket in made:
            await self.fanout.add(STUDY, socket.connection)
        return made

    def publish(self, payload: bytes) -> None:
        self.fanout.on_message(CHANNEL, payload)

    async def end_tick(self) -> None:
        """Move the clock to the end of the window; the tick's timer has run on return.

        MovableClock hands a due timer to this loop with call_soon_threadsafe: one pass of the
        loop (a bare yield, not a wait for time) runs it before this coroutine resumes.
        """
        self.clock.advance(WINDOW)
        await asyncio.sleep(0)


def snapshot(floor: int) -> Outgoing:
    text = json_text({"type": "presence.snapshot", "data": {"seq": floor}})
    return Outgoing(None, text, floor=floor)


def presence(kind: str, user: str, seq: int, move_path: str | None = None) -> bytes:
    data = {"user_id": user, "study_id": STUDY, "move_path": move_path, "seq": seq}
    return encode_envelope(f"presence.{kind}", data, ts_ms=1_000)


def cursor(user: str, seq: int, move_path: str = "main.1") -> bytes:
    return presence("cursor_moved", user, seq, move_path)


def signal(name: str, user: str, sender: str | None, **data: Any) -> bytes:
    envelope: dict[str, Any] = {
        "type": f"signal.{name}",
        "data": {**data, "user_id": user},
        "ts": 1_000,
    }
    if sender is not None:
        envelope["from"] = sender
    packed: bytes = msgpack.packb(envelope)
    return packed


def batch_data(frame: str) -> dict[str, Any]:
    message = json.loads(frame)
    assert message["type"] == "presence.batch", message
    data: dict[str, Any] = message["data"]
    return data


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str, int | None]]:
    return [(e["type"], e["data"]["user_id"], e["data"].get("seq")) for e in events]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        await h.fanout.close()


async def test_at_or_below_the_threshold_each_message_goes_out_at_once(harness: Harness) -> None:
    first, second = await harness.sockets(2)
    harness.publish(cursor("u1", 1))
    harness.publish(cursor("u1", 2, "main.2"))
    for socket in (first, second):
        assert [m["type"] for m in socket.messages()] == ["presence.cursor_moved"] * 2
    assert harness.clock.pending == 0  # no tick was started
    assert harness.fanout.batches_sent == 0


async def test_above_the_threshold_every_socket_gets_one_frame_per_tick(harness: Harness) -> None:
    sockets = await harness.sockets(3)
    harness.publish(presence("user_joined", "u1", 7))
    harness.publish(presence("user_joined", "u2", 8))
    harness.publish(encode_envelope("chess.move", {"san": "e4"}))  # another backend's event
    assert all(socket.frames == [] for socket in sockets)
    assert harness.clock.pending == 1  # one timer for the tick, not one per message

    await harness.end_tick()
    frames = [socket.frames for socket in sockets]
    assert all(len(f) == 1 for f in frames)
    # Built once: every socket is handed the very same text object.
    assert frames[0][0] is frames[1][0] is frames[2][0]
    data = batch_data(frames[0][0])
    assert (data["first_seq"], data["last_seq"]) == (7, 8)
    assert [e["type"] for e in data["events"]] == [
        "presence.user_joined",
        "presence.user_joined",
        "chess.move",
    ]
    assert harness.fanout.batches_sent == 1

    await harness.end_tick()  # a tick without messages sends nothing
    assert all(len(socket.frames) == 1 for socket in sockets)
    harness.publish(cursor("u1", 9))
    await harness.end_tick()
    assert all(len(socket.frames) == 2 for socket in sockets)
    assert batch_data(sockets[0].frames[1])["first_seq"] == 9


async def test_crossing_the_threshold_up_and_down(harness: Harness) -> None:
    a, b = await harness.sockets(2)
    harness.publish(cursor("u1", 1))
    [c] = await harness.sockets(1, first=2)
    harness.publish(cursor("u1", 2, "main.2"))
    harness.publish(presence("user_idle", "u2", 3))
    assert len(a.frames) == 1 and c.frames == []  # seq 2 and 3 wait for the tick

    # Back at the threshold: what the tick had goes out at once, as one batch, before anything
    # that follows (which goes out as it comes again).
    await harness.fanout.remove(STUDY, c.connection)
    assert harness.clock.pending == 0  # the tick's timer is cancelled
    harness.publish(cursor("u1", 4, "main.4"))
    for socket in (a, b):
        [one, batch, four] = socket.messages()
        assert one["data"]["seq"] == 1 and four["data"]["seq"] == 4
        assert kinds(batch["data"]["events"]) == [
            ("presence.cursor_moved", "u1", 2),
            ("presence.user_idle", "u2", 3),
        ]
    assert c.frames == []
    await harness.end_tick()
    assert len(a.frames) == 3


async def test_a_cursor_moved_superseded_in_the_tick_is_left_out_but_counts_in_the_seqs(
    harness: Harness,
) -> None:
    [socket, *_] = await harness.sockets(3)
    harness.publish(cursor("u1", 10, "main.1"))  # superseded, and the lowest seq
    harness.publish(cursor("u2", 11, "main.5"))
    harness.publish(presence("user_idle", "u1", 12))  # not keyed: never left out
    harness.publish(cursor("u1", 13, "main.2"))
    harness.publish(cursor("u2", 14, "main.6"))  # supersedes 11
    harness.publish(cursor("u3", 15, "main.9"))
    await harness.end_tick()
    data = batch_data(socket.frames[0])
    assert (data["first_seq"], data["last_seq"]) == (10, 15)
    assert kinds(data["events"]) == [
        ("presence.user_idle", "u1", 12),
        ("presence.cursor_moved", "u1", 13),
        ("presence.cursor_moved", "u2", 14),
        ("presence.cursor_moved", "u3", 15),
    ]
    assert harness.fanout.superseded_messages == 2
    # Metrics hear of each event carried, with the sockets it went to, not of the frame.
    assert [(json.loads(e.text)["data"]["seq"], n) for e, n in harness.observed] == [
        (12, 3),
        (13, 3),
        (14, 3),
        (15, 3),
    ]


async def test_a_batch_of_signals_and_backend_events_has_no_seqs(harness: Harness) -> None:
    await harness.sockets(3)
    probe = Probe()
    await harness.fanout.add(STUDY, probe)
    harness.publish(signal("typing", "u1", None, on=True))
    harness.publish(encode_envelope("chess.move", {"san": "e4"}))
    harness.publish(signal("typing", "u1", None, on=False))  # latest wins
    await harness.end_tick()
    [batch] = probe.events
    assert batch.seq is None and batch.floor is None and batch.key is None
    data = batch_data(batch.text)
    assert data["first_seq"] is None and data["last_seq"] is None
    assert [(e["type"], e["data"].get("on")) for e in data["events"]] == [
        ("chess.move", None),
        ("signal.typing", False),
    ]


async def test_a_sender_gets_the_batch_without_its_own_signals(harness: Harness) -> None:
    alice_tab1, alice_tab2, bob, carol = await harness.sockets(4)
    probe = Probe()
    await harness.fanout.add(STUDY, probe)
    harness.publish(signal("pointer", "alice", "conn-0", x=1))
    harness.publish(cursor("dave", 5))
    harness.publish(signal("pointer", "bob", "conn-2", x=2))
    await harness.end_tick()

    def seen(socket: Socket) -> list[tuple[str, str, int | None]]:
        [frame] = socket.frames
        return kinds(batch_data(frame)["events"])

    everything = [
        ("signal.pointer", "alice", None),
        ("presence.cursor_moved", "dave", 5),
        ("signal.pointer", "bob", None),
    ]
    assert seen(carol) == everything
    assert seen(alice_tab2) == everything  # the sender's other tab gets its signal
    assert seen(alice_tab1) == [everything[1], everything[2]]
    assert seen(bob) == [everything[0], everything[1]]
    # Each variant is built once, in the frame every socket is handed, and keeps the seqs.
    [batch] = probe.events
    assert batch.personal is not None and set(batch.personal) == {"conn-0", "conn-2"}
    variant = batch.personal["conn-0"]
    assert variant is not None and alice_tab1.frames[0] is variant.text
    assert (variant.seq, batch.seq) == (5, 5)
    assert batch_data(variant.text)["first_seq"] == 5


async def test_a_sender_with_nothing_else_in_the_tick_gets_no_frame(harness: Harness) -> None:
    alice, bob, carol = await harness.sockets(3)
    harness.publish(signal("typing", "alice", "conn-0", on=True))
    harness.publish(signal("typing", "alice", "conn-0", on=False))
    await harness.end_tick()
    assert alice.frames == []
    for socket in (bob, carol):
        [frame] = socket.frames
        assert [e["data"]["on"] for e in batch_data(frame)["events"]] == [False]


async def test_a_signal_superseded_by_the_senders_other_tab_comes_back_to_that_tab(
    harness: Harness,
) -> None:
    # Tab 1 then tab 2 of alice send the same signal: others get tab 2's (latest wins); tab 2
    # gets tab 1's, which it would have got had its own never been sent back to it.
    tab1, tab2, bob = await harness.sockets(3)
    harness.publish(signal("pointer", "alice", "conn-0", x=1))
    harness.publish(cursor("dave", 3))
    harness.publish(signal("pointer", "alice", "conn-1", x=2))
    await harness.end_tick()

    def pointers(socket: Socket) -> list[Any]:
        [frame] = socket.frames
        return [e["data"].get("x") for e in batch_data(frame)["events"]]

    assert pointers(bob) == [None, 2]
    assert pointers(tab1) == [None, 2]
    assert pointers(tab2) == [1, None]


async def test_a_resync_during_a_pending_tick_flushes_it_before_the_snapshot(
    harness: Harness,
) -> None:
    sockets = await harness.sockets(3)
    harness.publish(cursor("u1", 1))
    harness.publish(cursor("u1", 2, "main.2"))
    harness.fanout.on_resubscribed(CHANNEL)
    # Read before the loss: out at once, ahead of the snapshot.
    assert [len(s.frames) for s in sockets] == [1, 1, 1]
    assert batch_data(sockets[0].frames[0])["last_seq"] == 2
    assert harness.clock.pending == 0
    harness.publish(cursor("u1", 5, "main.5"))  # read while the snapshot is: held
    harness.publish(cursor("u2", 7, "main.7"))
    await harness.end_tick()
    assert [len(s.frames) for s in sockets] == [1, 1, 1]

    await harness.answer_resync(floor=6)
    for socket in sockets:
        assert [m["type"] for m in socket.messages()] == ["presence.batch", "presence.snapshot"]
    harness.publish(cursor("u2", 8, "main.8"))
    await harness.end_tick()
    for socket in sockets:
        third = batch_data(socket.frames[2])
        # The held events start the next tick, after the snapshot; seq 5 is still carried (the
        # client skips it: it is below the snapshot's seq), and 7 is superseded by 8.
        assert (third["first_seq"], third["last_seq"]) == (5, 8)
        assert kinds(third["events"]) == [
            ("presence.cursor_moved", "u1", 5),
            ("presence.cursor_moved", "u2", 8),
        ]


async def test_a_batch_the_snapshot_covers_is_dropped_whole(harness: Harness) -> None:
    sockets = await harness.sockets(3)
    harness.fanout.on_resubscribed(CHANNEL)
    harness.publish(cursor("u1", 3))
    harness.publish(cursor("u2", 4))
    await harness.answer_resync(floor=4)  # the snapshot already has both
    await harness.end_tick()
    for socket in sockets:
        assert [m["type"] for m in socket.messages()] == ["presence.snapshot"]
    assert harness.fanout.batches_sent == 1  # sent, and dropped by every socket (seq 4 <= 4)


async def test_removing_sockets_with_a_pending_tick(harness: Harness) -> None:
    a, b, c, d = await harness.sockets(4)
    harness.publish(cursor("u1", 1))
    await harness.fanout.remove(STUDY, d.connection)  # still above the threshold
    assert harness.clock.pending == 1
    await harness.end_tick()
    assert [len(s.frames) for s in (a, b, c, d)] == [1, 1, 1, 0]

    harness.publish(cursor("u1", 2))
    for socket in (a, b, c):
        await harness.fanout.remove(STUDY, socket.connection)
    # The last one went with the tick pending: nobody is left to get it, no timer stays.
    assert harness.fanout.studies == 0 and harness.clock.pending == 0
    await harness.end_tick()
    assert [len(s.frames) for s in (a, b, c)] == [1, 2, 2]  # b and c got it when a left


async def test_close_delivers_the_pending_tick() -> None:
    h = Harness()
    sockets = await h.sockets(3)
    h.publish(cursor("u1", 1))
    await h.fanout.close()
    assert [len(s.frames) for s in sockets] == [1, 1, 1]
    assert h.clock.pending == 0
    h.publish(cursor("u1", 2))  # after close, nothing waits for a tick any more
    assert [len(s.frames) for s in sockets] == [2, 2, 2]


async def test_a_window_of_zero_turns_batching_off() -> None:
    h = Harness(window=0.0)
    sockets = await h.sockets(5)
    h.publish(cursor("u1", 1))
    assert [len(s.frames) for s in sockets] == [1] * 5
    assert h.clock.pending == 0
    await h.fanout.close()


# The property: whatever the traffic, ticks, threshold crossings, losses and resyncs, a client
# that applies what it gets by the rule never sees a gap and ends where everyone is.


@dataclass
class Client:
    """What a client does: a snapshot replaces its state, events apply by seq, batches by the
    rule (no gap before first_seq, skip what it has, then continue from last_seq)."""

    connection_id: str
    applied: int
    cursors: dict[str, str | None]
    own_signals: int = 0

    def take(self, frame: str) -> None:
        message = json.loads(frame)
        if message["type"] == "presence.snapshot":
            self.applied = message["data"]["seq"]
            self.cursors = dict(message["data"]["cursors"])
        elif message["type"] == "presence.batch":
            data = message["data"]
            if data["first_seq"] is not None:
                assert data["first_seq"] <= self.applied + 1, (self.applied, data)
            for event in data["events"]:
                self.apply(event, batched=True)
            if data["last_seq"] is not None:
                self.applied = max(self.applied, data["last_seq"])
        else:
            self.apply(message, batched=False)

    def apply(self, event: dict[str, Any], batched: bool) -> None:
        if event["type"].startswith("signal."):
            self.own_signals += event["data"].get("from") == self.connection_id
            return
        seq = event["data"]["seq"]
        if seq <= self.applied:
            return
        assert batched or seq == self.applied + 1, f"gap: {self.applied} then {seq}"
        self.cursors[event["data"]["user_id"]] = event["data"]["move_path"]
        if not batched:
            self.applied = seq


USERS = ["u1", "u2", "u3"]
step = st.one_of(
    st.tuples(st.just("cursor"), st.sampled_from(USERS), st.integers(0, 9)),
    st.tuples(st.just("signal"), st.sampled_from(USERS), st.integers(0, 5)),
    st.tuples(st.just("tick"), st.none(), st.none()),
    st.tuples(st.just("join"), st.none(), st.none()),
    st.tuples(st.just("leave"), st.none(), st.none()),
    st.tuples(st.just("lose"), st.sampled_from(USERS), st.integers(0, 9)),
    st.tuples(st.just("snapshot"), st.none(), st.none()),
)


@dataclass
class World:
    """The study as Redis has it: its seq and every user's cursor."""

    seq: int = 0
    cursors: dict[str, str | None] = field(default_factory=dict)

    def move(self, user: str, spot: int) -> bytes:
        self.seq += 1
        self.cursors[user] = f"main.{spot}"
        return cursor(user, self.seq, f"main.{spot}")

    def snapshot(self) -> Outgoing:
        data = {"seq": self.seq, "cursors": dict(self.cursors)}
        return Outgoing(None, json_text({"type": "presence.snapshot", "data": data}), self.seq)


async def run_traffic(steps: list[tuple[str, Any, Any]]) -> None:
    h = Harness(threshold=2)
    world = World()
    sockets: list[tuple[Socket, Client]] = []
    read: dict[int, int] = {}  # frames each socket's client has taken
    resyncs = 0  # begun and not answered yet

    def catch_up() -> None:
        for socket, client in sockets:
            for frame in socket.frames[read[id(socket)] :]:
                client.take(frame)
            read[id(socket)] = len(socket.frames)

    async def join() -> None:
        socket = Socket(f"conn-{len(read)}", floor=world.seq)
        await h.fanout.add(STUDY, socket.connection)
        client = Client(socket.connection.connection_id, world.seq, dict(world.cursors))
        sockets.append((socket, client))
        read[id(socket)] = 0

    for _ in range(2):
        await join()
    for kind, user, value in steps:
        if kind == "cursor":
            h.publish(world.move(user, value))
        elif kind == "signal":
            socket, _ = sockets[value % len(sockets)]
            sender = socket.connection.connection_id
            h.publish(signal("pointer", user, sender, x=value, **{"from": sender}))
        elif kind == "tick":
            await h.end_tick()
        elif kind == "join" and len(sockets) < 5:
            await join()
        elif kind == "leave" and len(sockets) > 1:
            socket, _ = sockets.pop(0)
            await h.fanout.remove(STUDY, socket.connection)
        elif kind == "lose":
            world.move(user, value)  # published while the link was down: never read
            h.fanout.on_resubscribed(CHANNEL)
            resyncs += 1
        elif kind == "snapshot" and resyncs:
            await h.answer_next(world.snapshot())
            resyncs -= 1
        catch_up()
    for _ in range(resyncs):
        await h.answer_next(world.snapshot())
    await h.end_tick()
    catch_up()
    for _, client in sockets:
        assert client.applied == world.seq
        assert client.cursors == world.cursors
        assert client.own_signals == 0
    await h.fanout.close()


@settings(
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(step, max_size=40))
def test_a_client_applying_batches_by_the_rule_sees_no_gap_and_ends_on_every_cursor(
    steps: list[tuple[str, Any, Any]],
) -> None:
    asyncio.run(run_traffic(steps))


# Through a node: the settings reach the fan-out, the frames reach real sockets, the metrics
# count them.


@pytest.fixture
def batching_client() -> Iterator[TestClient]:
    with app_client(batch_threshold=1, batch_window=0.02) as client:
        yield client


def metric(client: TestClient, name: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} is not served")


def test_a_node_batches_a_study_above_its_threshold(batching_client: TestClient) -> None:
    client = batching_client
    url = "/ws/presence?study_id={study}&token=" + token("viewer")
    with (
        client.websocket_connect(url.format(study="s1")) as first,
        client.websocket_connect(url.format(study="s1")) as second,
        client.websocket_connect(url.format(study="s2")) as alone,
    ):
        for ws in (first, second, alone):
            ws.receive_json()
            ws.receive_json()
        for path in ("main.1", "main.2"):
            body = {"study_id": "s1", "chapter_id": "ch1", "move_path": path}
            client.post("/presence/heartbeat", json=body, headers=auth("alice"))
        client.post("/presence/heartbeat", json={"study_id": "s2"}, headers=auth("bob"))
        assert alone.receive_json()["type"] == "presence.user_joined"  # one socket: at once
        for ws in (first, second):
            seen: list[dict[str, Any]] = []
            while not seen or seen[-1]["data"]["move_path"] != "main.2":
                message = ws.receive_json()
                assert message["type"] == "presence.batch", message
                seen.extend(message["data"]["events"])
    fanout = node_of(client).fanout
    assert fanout.batches_sent >= 1
    assert metric(client, "presence_batches_sent_total") == fanout.batches_sent
    assert metric(client, "presence_batch_superseded_total") == fanout.superseded_messages
