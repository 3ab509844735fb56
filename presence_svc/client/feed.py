"""What a client reports to its callers: changes of the users, and events by kind.

Two ways to listen. `ChangeStream` is a watch: it yields the current users, then the users
again after every change, skipping to the latest when the consumer is slower than the
changes (so it never buffers). `EventStream` yields every event of the kinds it asked for, in
order, with a bounded queue: a consumer that falls further behind gets an error rather than
making the client hold events without limit. Signals (typing, pointer, ...) come as events of
kind "signal", and to plain callbacks registered with `Feed.listen`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, get_args

from presence_svc.client.state import Change, User

log = logging.getLogger(__name__)

EventKind = Literal[
    "join",
    "leave",
    "status",
    "cursor",
    "snapshot",
    "state",
    "error",
    "refreshed",
    "message",
    "signal",
]
EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))

SignalListener = Callable[[str, dict[str, Any]], None]


class PresenceError(Exception):
    """An error of the presence client: a refusal by the server (with its close code), a
    socket that cannot be opened in time, or a consumer that fell behind."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EventsOverflow(PresenceError):
    """An EventStream's consumer fell more than its queue size behind."""


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """One thing that happened, for EventStream consumers.

    join / leave / status / cursor: `user` (after the change) and `previous` (before it, for
    status and cursor). snapshot: a snapshot replaced the users (`seq`). state: the connection
    state changed (`state`). error: `error` (fatal when the client has stopped, otherwise
    informational: a refused heartbeat or refresh, a failed attempt). refreshed: the server
    accepted a fresh token. message: an event another backend published for the study
    (`message` holds its `type` and `data`, unchanged). signal: another socket's signal
    (`signal` its name, `data` its data with the sender's `user_id`, `message` as received).
    """

    kind: EventKind
    user: User | None = None
    previous: User | None = None
    seq: int | None = None
    state: str | None = None
    error: PresenceError | None = None
    message: dict[str, Any] | None = None
    signal: str | None = None
    data: dict[str, Any] | None = None

    @classmethod
    def of(cls, change: Change) -> PresenceEvent:
        return cls(change.kind, user=change.user, previous=change.previous)


class Feed:
    """The client's listeners, and the end of the client (with its error, if any)."""

    def __init__(self, users: Callable[[], list[User]], queue_size: int) -> None:
        if queue_size < 1:
            raise ValueError("events_queue_size must be at least 1")
        self._users = users
        self._queue_size = queue_size
        self.version = 0
        self._tick = asyncio.Event()
        self._streams: set[EventStream] = set()
        self.finished = False
        self.error: PresenceError | None = None
        self._signal_listeners: list[tuple[SignalListener, frozenset[str]]] = []

    def changed(self) -> None:
        """The users changed: wake every ChangeStream."""
        self.version += 1
        self._wake()

    def emit(self, events: Iterable[PresenceEvent]) -> None:
        for event in events:
            for stream in list(self._streams):
                stream.put(event)
            if event.kind == "signal" and event.signal is not None:
                self._call(event.signal, event.data or {})

    def listen(self, listener: SignalListener, names: Iterable[str]) -> Callable[[], None]:
        """Call `listener(name, data)` on each signal of these names (all if none); returns
        the function that stops it."""
        entry = (listener, frozenset(names))
        self._signal_listeners.append(entry)

        def stop() -> None:
            if entry in self._signal_listeners:
                self._signal_listeners.remove(entry)

        return stop

    def _call(self, name: str, data: dict[str, Any]) -> None:
        for listener, names in list(self._signal_listeners):
            if names and name not in names:
                continue
            try:
                listener(name, data)
            except Exception:
                # One failing callback must neither stop the others nor break the socket.
                log.exception("signal listener %r failed on %s", listener, name)

    def finish(self, error: PresenceError | None) -> None:
        """No more changes or events: streams end (raising `error` if there is one)."""
        if self.finished:
            return
        self.finished = True
        self.error = error
        self._wake()
        for stream in list(self._streams):
            stream.wake()

    def _wake(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    async def next_change(self, seen: int) -> int:
        """Wait until the version moves past `seen` (or the feed finishes)."""
        while self.version == seen and not self.finished:
            await self._tick.wait()
        return self.version

    def users(self) -> list[User]:
        return self._users()

    def queue_size(self) -> int:
        return self._queue_size

    def register(self, stream: EventStream) -> None:
        self._streams.add(stream)

    def unregister(self, stream: EventStream) -> None:
        self._streams.discard(stream)


class ChangeStream:
    """`async for users in client.changes()`: the users now, then after every change."""

    def __init__(self, feed: Feed) -> None:
        self._feed = feed
        self._seen: int | None = None

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> list[User]:
        feed = self._feed
        if self._seen is None:
            self._seen = feed.version
            if not feed.finished:
                return feed.users()
        self._seen = await feed.next_change(self._seen)
        if feed.finished:
            if feed.error is not None:
                raise feed.error
            raise StopAsyncIteration
        return feed.users()


class EventStream:
    """`async for event in client.events("join", "leave")`: events of those kinds, in order.

    It listens from the moment it is made; use it as an async context manager (or call
    `close()`) to stop listening.
    """

    def __init__(self, feed: Feed, kinds: Iterable[str], signals: Iterable[str] = ()) -> None:
        wanted = frozenset(kinds)
        unknown = wanted - EVENT_KINDS
        if unknown:
            raise ValueError(f"unknown event kinds {sorted(unknown)}; known: {sorted(EVENT_KINDS)}")
        self._feed = feed
        self._kinds = wanted or EVENT_KINDS
        self._signals = frozenset(signals)  # signal names to keep; all if empty
        self._queue: collections.deque[PresenceEvent] = collections.deque()
        self._overflowed = False
        self._ready = asyncio.Event()
        feed.register(self)

    def put(self, event: PresenceEvent) -> None:
        if event.kind not in self._kinds or self._overflowed:
            return
        if self._signals and event.kind == "signal" and event.signal not in self._signals:
            return
        if len(self._queue) >= self._feed.queue_size():
            self._overflowed = True
        else:
            self._queue.append(event)
        self._ready.set()

    def wake(self) -> None:
        self._ready.set()

    def close(self) -> None:
        self._feed.unregister(self)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> PresenceEvent:
        while not self._queue:
            if self._overflowed:
                self.close()
                raise EventsOverflow(
                    f"events consumer fell more than {self._feed.queue_size()} events behind"
                )
            if self._feed.finished:
                self.close()
                if self._feed.error is not None:
                    raise self._feed.error
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
