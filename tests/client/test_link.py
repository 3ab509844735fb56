"""One socket of the Python client against recorded frames of the big-rooms protocol: batches,
signals (as events and callbacks), crowd counts; no network."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from presence_svc.client.feed import EventStream, Feed, PresenceEvent
from presence_svc.client.intent import Intent
from presence_svc.client.link import Link, LinkEnd, Timing
from presence_svc.client.signals import encode_signal
from presence_svc.client.state import StudyState
from presence_svc.client.tokens import Tokens
from tests.support.tasks import stop
from tests.support.waiting import eventually_async


class FakeSocket:
    """The frames a node would send, queued by the test; what the client sends, recorded."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[str | None] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason = ""

    def push(self, kind: str, data: dict[str, Any]) -> None:
        self.incoming.put_nowait(json.dumps({"type": kind, "data": data}))

    def end(self, code: int = 1006) -> None:
        self.close_code = code
        self.incoming.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[str]:
        while (frame := await self.incoming.get()) is not None:
            yield frame

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.close_code, self.close_reason = code, reason
        self.incoming.put_nowait(None)


def user(user_id: str, status: str = "active") -> dict[str, Any]:
    return {
        "session_id": f"s-{user_id}",
        "user_id": user_id,
        "study_id": "st",
        "chapter_id": "ch1",
        "move_path": None,
        "status": status,
        "last_heartbeat": "2026-01-01T00:00:01.000Z",
        "joined_at": "2026-01-01T00:00:00.000Z",
    }


def event(
    kind: str, seq: int, user_id: str, status: str = "active", previous: str | None = None
) -> dict[str, Any]:
    data = {**user(user_id, status), "previous_status": previous, "seq": seq}
    del data["last_heartbeat"], data["joined_at"]
    return {"type": f"presence.{kind}", "data": {**data, "timestamp": "2026-01-01T00:01:00.000Z"}}


def signal(name: str, user_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": f"signal.{name}", "data": {**fields, "user_id": user_id}}


class Recorder(EventStream):
    """Every event the feed emits, kept as it is emitted."""

    def __init__(self, feed: Feed) -> None:
        super().__init__(feed, [])
        self.seen: list[PresenceEvent] = []

    def put(self, event: PresenceEvent) -> None:
        self.seen.append(event)


class Harness:
    def __init__(self) -> None:
        self.ws = FakeSocket()
        self.state = StudyState()
        self.feed = Feed(self.state.users, 256)
        self.events = Recorder(self.feed)
        self.link = Link(
            self.ws,  # type: ignore[arg-type]
            self.state,
            self.feed,
            Intent(),
            Tokens("t", None),
            Timing(60.0, 0.05),
            lambda connected: None,
        )
        self.task: asyncio.Task[LinkEnd] = asyncio.create_task(self.link.run())
        self.seen = self.events.seen

    async def settle(self) -> None:
        """Until the socket has read every queued frame (each is handled as it is read)."""
        await eventually_async(lambda: self.ws.incoming.empty() or self.task.done())

    def kinds(self) -> list[tuple[str, str | None]]:
        return [(e.kind, e.user.user_id if e.user else e.signal or e.state) for e in self.seen]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    made = Harness()
    yield made
    made.events.close()
    await stop(made.task)


async def test_a_batch_is_reported_like_the_messages_it_carries(harness: Harness) -> None:
    ws = harness.ws
    ws.push("connected", {"user_id": "me", "connection_id": "c"})
    counts = {"active": 150, "idle": 20, "away": 30}
    users = [user("alice"), user("bob")]
    ws.push(
        "presence.snapshot",
        {
            "study_id": "st",
            "users": users,
            "total": 200,
            "counts": counts,
            "seq": 119,
            "complete": False,
        },
    )
    ws.push(
        "presence.batch",
        {
            "first_seq": 120,
            "last_seq": 161,
            "events": [
                event("user_joined", 121, "carol"),
                signal("typing", "alice", chapter_id="ch1"),
                event("user_idle", 150, "zed", "idle", "active"),
                {"type": "study.renamed", "data": {"name": "x"}},
                event("user_left", 161, "bob"),
            ],
        },
    )
    ws.push("presence.user_away", event("user_away", 162, "alice", "away", "active")["data"])
    await harness.settle()
    assert harness.kinds() == [
        ("join", "alice"),
        ("join", "bob"),
        ("snapshot", None),
        ("join", "carol"),
        ("signal", "typing"),
        ("status", "zed"),
        ("message", None),
        ("leave", "bob"),
        ("status", "alice"),
    ]
    typing = harness.seen[4]
    assert typing.data == {"chapter_id": "ch1", "user_id": "alice"}
    assert typing.message == signal("typing", "alice", chapter_id="ch1")
    assert harness.state.seq == 162, "the event after the batch was not applied from last_seq"
    assert harness.state.counts == {"active": 148, "idle": 21, "away": 31}
    assert harness.state.total == 200 and not harness.state.complete
    assert not harness.task.done()


async def test_a_batch_after_a_gap_ends_the_socket_for_a_resync_but_delivers_its_signals(
    harness: Harness,
) -> None:
    ws = harness.ws
    ws.push("presence.snapshot", {"study_id": "st", "users": [], "seq": 10})
    ws.push(
        "presence.batch",
        {
            "first_seq": 12,
            "last_seq": 12,
            "events": [event("user_joined", 12, "carol"), signal("pointer", "dan", square="e4")],
        },
    )
    end = await asyncio.wait_for(harness.task, 5)
    assert end.resync and ws.close_code == 1000
    await harness.settle()
    assert harness.kinds()[-1] == ("signal", "pointer")
    assert harness.state.get("carol") is None


async def test_signal_callbacks_by_name_and_a_failing_one_breaks_nothing(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[tuple[str, dict[str, Any]]] = []
    everything: list[str] = []

    def fails(name: str, data: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    harness.feed.listen(fails, [])
    stop_typing = harness.feed.listen(lambda name, data: heard.append((name, data)), ["typing"])
    harness.feed.listen(lambda name, data: everything.append(name), [])
    ws = harness.ws
    ws.push("presence.snapshot", {"study_id": "st", "users": [], "seq": 1})
    ws.push(**_frame(signal("typing", "bob")))
    ws.push(**_frame(signal("pointer", "bob", square=None)))
    await harness.settle()
    assert heard == [("typing", {"user_id": "bob"})]
    assert everything == ["typing", "pointer"]
    assert "listener bug" in caplog.text
    stop_typing()
    ws.push(**_frame(signal("typing", "bob", active=False)))
    await harness.settle()
    assert heard == [("typing", {"user_id": "bob"})] and everything[-1] == "typing"
    assert not harness.task.done()


async def test_send_goes_out_on_the_socket(harness: Harness) -> None:
    assert await harness.link.send(encode_signal("typing", {"chapter_id": "ch1"}, 1024))
    assert harness.ws.sent == [{"type": "signal", "name": "typing", "data": {"chapter_id": "ch1"}}]


def _frame(message: dict[str, Any]) -> dict[str, Any]:
    return {"kind": message["type"], "data": message["data"]}
