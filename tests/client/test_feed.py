"""What callers of the client listen to: the watch of the users, and event streams."""

from __future__ import annotations

import asyncio

import pytest

from presence_svc.client.feed import (
    ChangeStream,
    EventsOverflow,
    EventStream,
    Feed,
    PresenceError,
    PresenceEvent,
)
from presence_svc.client.state import User


def make_feed(users: list[User], queue_size: int = 8) -> Feed:
    return Feed(lambda: list(users), queue_size)


async def test_changes_yield_the_users_now_then_the_latest_after_changes() -> None:
    users = [User("alice", "active")]
    feed = make_feed(users)
    changes = ChangeStream(feed)
    assert await anext(changes) == [User("alice", "active")]
    waiting = asyncio.create_task(anext(changes))
    await asyncio.sleep(0)
    assert not waiting.done(), "yielded without a change"
    users.append(User("bob", "idle"))
    feed.changed()
    users.append(User("carol", "active"))
    feed.changed()  # a slow consumer skips to the latest
    assert [u.user_id for u in await waiting] == ["alice", "bob", "carol"]
    later = asyncio.create_task(anext(changes))
    await asyncio.sleep(0)
    assert not later.done(), "the coalesced change was yielded twice"
    feed.finish(None)
    with pytest.raises(StopAsyncIteration):
        await later


async def test_changes_end_with_the_clients_error() -> None:
    feed = make_feed([])
    changes = ChangeStream(feed)
    await anext(changes)
    refused = PresenceError("forbidden", 4403)
    feed.finish(refused)
    with pytest.raises(PresenceError) as raised:
        await anext(changes)
    assert raised.value is refused


async def test_event_streams_get_their_kinds_in_order_from_their_creation() -> None:
    feed = make_feed([])
    feed.emit([PresenceEvent("join", user=User("early", "active"))])
    joins = EventStream(feed, ["join", "leave"])
    everything = EventStream(feed, [])
    feed.emit(
        [
            PresenceEvent("join", user=User("a", "active")),
            PresenceEvent("state", state="open"),
            PresenceEvent("leave", user=User("a", "active")),
        ]
    )
    assert [(await anext(joins)).kind for _ in range(2)] == ["join", "leave"]
    assert [(await anext(everything)).kind for _ in range(3)] == ["join", "state", "leave"]
    async with joins:
        pass
    feed.emit([PresenceEvent("join", user=User("b", "active"))])
    assert feed.finished is False
    feed.finish(None)
    with pytest.raises(StopAsyncIteration):
        await anext(joins)
    assert (await anext(everything)).kind == "join"
    with pytest.raises(StopAsyncIteration):
        await anext(everything)


async def test_a_stream_that_falls_behind_gets_an_error_not_unbounded_memory() -> None:
    feed = make_feed([], queue_size=2)
    stream = EventStream(feed, [])
    feed.emit([PresenceEvent("state", state=str(n)) for n in range(5)])
    assert [(await anext(stream)).state for _ in range(2)] == ["0", "1"]
    with pytest.raises(EventsOverflow):
        await anext(stream)


def test_unknown_kinds_and_queue_sizes_are_refused() -> None:
    feed = make_feed([])
    with pytest.raises(ValueError, match="unknown event kinds"):
        EventStream(feed, ["joined"])
    with pytest.raises(ValueError, match="events_queue_size"):
        make_feed([], queue_size=0)
