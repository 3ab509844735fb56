"""A WebSocket's outgoing side: events sent at once, a bounded backlog, closing with a code
(also at its token's expiry).

The fan-out delivers to every local socket of a study in one loop turn, so sending must never
wait there: a send the socket can take right away runs to completion synchronously; one that
would wait becomes the socket's backlog, drained by a task of its own, and a backlog past the
queue size closes the socket with 1013 (a slow consumer).

It sends with the ASGI `send` callable itself (the endpoint is a raw ASGI app, ws.py), and
keeps the little state that Starlette's WebSocket would: once a close frame has gone out or a
send failed (the client is gone), nothing more is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.types import Send

from presence_svc.clock import Clock, Timer
from presence_svc.codec import Outgoing, json_text
from presence_svc.web import stepping
from presence_svc.web.protocol import behind, text_frame

CLOSE_UNAUTHORIZED = 4401  # here: the token expired without a refresh
CLOSE_SLOW_CONSUMER = 1013


class Disconnected(Exception):
    """The client is gone: a send to it failed."""


def error_message(code: str, message: str, errors: list[dict[str, Any]] | None = None) -> Outgoing:
    """An `error` message to the client (the socket stays open)."""
    data: dict[str, Any] = {"code": code, "message": message}
    if errors is not None:
        data["errors"] = errors
    return Outgoing(None, json_text({"type": "error", "data": data}))


class Connection:
    """One socket's outgoing side: messages in order, a bounded backlog, and a writer task
    only while there is a backlog.

    A message is sent at once by whoever delivers it when nothing waits before it: the ASGI
    send completes without waiting unless the socket's buffer is full, and waking a writer
    task for every message cost as much as the send itself. A send that has to wait, and
    everything delivered meanwhile, goes to a writer task, which ends once it has caught up.
    Idle sockets are the bulk of a node's memory, so an idle one holds neither a task (about
    1 KiB with its coroutine and waiter) nor a deque (about 0.75 KiB), nor a timer of its own
    for its token's expiry (_Expiries).
    """

    __slots__ = (
        "_broken",
        "_closer",
        "_closing",
        "_expires",
        "_expiries",
        "_floor",
        "_id",
        "_limit",
        "_on_overflow",
        "_pending",
        "_raw",
        "_send",
        "_shut",
        "_stalled",
        "_started",
        "_writer",
        "watcher",
    )

    def __init__(
        self,
        send: Send,
        queue_size: int,
        on_overflow: Callable[[], None] | None = None,
        connection_id: str = "",
    ) -> None:
        self._send = send
        # The protocol behind `send`, when it is ours (a real uvicorn server): the fan-out's
        # messages are then written as frames built once per message (protocol.py, 4).
        self._raw = behind(send)
        self._id = connection_id  # what a message's `personal` map is keyed by
        self._on_overflow = on_overflow
        self._pending: deque[Outgoing] | None = None  # the backlog, while there is one
        self._limit = queue_size
        self._floor = 0  # events with seq <= floor are already in the client's snapshot
        self._closing: tuple[int, str] | None = None
        self._started = False  # the snapshot is out: events may follow
        self._stalled: tuple[stepping.Step, Any] | None = None  # a send waiting for the socket
        self._broken = False  # a send failed: the socket is gone, nothing more is sent
        self._shut = False  # a close frame went out, or the client is gone: no frame follows
        self._writer: asyncio.Task[None] | None = None  # while there is a backlog
        self._closer: asyncio.Task[None] | None = None  # a close that had to wait
        self._expiries: _Expiries | None = None  # closes the socket when its token expires
        self._expires = 0.0  # when, on their clock
        # Until its first heartbeat a socket only watches: the stats count it apart (ws.py
        # clears it; the fan-out reads it for the node's report).
        self.watcher = True

    @property
    def overflowed(self) -> bool:
        """True once the client fell so far behind that the socket is being closed (1013)."""
        return self._closing is not None and self._closing[0] == CLOSE_SLOW_CONSUMER

    async def send_text(self, text: str) -> None:
        """Send `text` and wait until the socket took it (before `start`); raises
        Disconnected if the client is gone."""
        if self._shut:
            raise Disconnected("the socket is closed")
        try:
            await self._send({"type": "websocket.send", "text": text})
        except OSError as exc:
            self._failed(exc)
            raise Disconnected(str(exc)) from exc

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket with `code` now, unless a close went out already or the client
        is gone; nothing is delivered after it."""
        if self._closing is None:
            self._closing = (code, reason)
            if self._writer is not None:
                self._writer.cancel()
        if self._shut:
            return
        self._shut = True
        with contextlib.suppress(OSError):  # the client is gone already
            await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def client_gone(self) -> None:
        """The client disconnected: no close frame is owed to it."""
        self._shut = True

    def deliver(self, event: Outgoing) -> None:
        if self._closing is not None:
            return
        personal = event.personal
        if personal is not None and self._id in personal:
            replacement = personal[self._id]
            if replacement is None:
                return
            event = replacement
        if self._started and self._writer is None and not self._broken:
            if event.floor is not None:
                self._floor = event.floor
            elif event.seq is not None and event.seq <= self._floor:
                return
            self._send_now(event)
            return
        pending = self._pending
        if pending is None:
            pending = self._pending = deque()
        if len(pending) >= self._limit:
            if self._on_overflow is not None:
                self._on_overflow()
            self.close_with(CLOSE_SLOW_CONSUMER, "slow consumer")
            return
        if event.key is not None and event.seq is None:
            _drop_superseded(pending, event.key)
        pending.append(event)

    def _send_now(self, event: Outgoing) -> None:
        """Send `event` if the socket takes it at once; else leave the rest to the writer."""
        raw = self._raw
        if raw is not None and raw.write_text_frame(_frame(event)):
            return
        try:
            stalled = stepping.first_step(
                self._send({"type": "websocket.send", "text": event.text})
            )
        except Exception as exc:
            self._failed(exc)
            return
        if stalled is None:
            return
        self._stalled = stalled
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._pump())

    def _failed(self, exc: Exception) -> None:
        # As Starlette's WebSocket.send: a write error means the client is gone.
        if isinstance(exc, OSError):
            self._shut = True
        self._broken = True  # the reader side sees the disconnect

    def close_with(self, code: int, reason: str) -> None:
        """Stop sending and close the socket with `code` (the reader then sees it closed)."""
        if self._closing is None:
            self._closing = (code, reason)
            if self._writer is not None:
                self._writer.cancel()  # the backlog is dropped
            if self._started:
                self._close_now()

    def expire_at(self, when: float, clock: Clock) -> None:
        """Close with 4401 ("token expired") at `when` on `clock`, instead of when a previous
        call said (a refresh moves the token's expiry); `stop` cancels it."""
        self._no_expiry()
        expiries = _expiries(clock)
        expiries.add(self, when, clock)
        self._expiries, self._expires = expiries, when

    def _no_expiry(self) -> None:
        if self._expiries is not None:
            self._expiries.discard(self, self._expires)
            self._expiries = None

    def _close_now(self) -> None:
        assert self._closing is not None
        if self._shut:
            return
        self._shut = True
        code, reason = self._closing
        try:
            stalled = stepping.first_step(
                self._send({"type": "websocket.close", "code": code, "reason": reason})
            )
        except Exception:  # the socket is gone already
            return
        if stalled is not None:
            self._closer = asyncio.get_running_loop().create_task(self._finish_close(*stalled))

    async def _finish_close(self, step: stepping.Step, yielded: Any) -> None:
        with contextlib.suppress(Exception):
            await stepping.finish(step, yielded)

    def start(self, floor: int) -> None:
        """The snapshot is sent: deliver what came meanwhile (above `floor`) and what follows."""
        self._floor = floor
        self._started = True
        if self._closing is not None:
            self._close_now()
        elif self._pending:
            self._writer = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            while True:
                if self._stalled is not None:
                    await stepping.finish(*self._stalled)
                    self._stalled = None
                elif self._broken or not self._pending:
                    break
                else:
                    event = self._pending.popleft()
                    if event.floor is not None:
                        self._floor = event.floor
                    elif event.seq is not None and event.seq <= self._floor:
                        continue
                    self._send_now(event)
        except Exception as exc:  # the socket went away; the reader side sees the disconnect
            self._stalled = None
            self._failed(exc)
        else:
            self._pending = None  # caught up: an idle socket keeps no deque
        finally:
            self._writer = None

    @property
    def connection_id(self) -> str:
        return self._id

    async def stop(self) -> None:
        """The socket is done: no expiry any more, the backlog dropped, a close that had to
        wait sent."""
        self._no_expiry()
        writer = self._writer
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        if self._closer is not None:
            # Not cancelled: the close frame still goes out (a send waits at most until the
            # server's keepalive gives up on the client).
            await self._closer


class _Expiries:
    """The sockets of one loop that close when their tokens expire, on one clock: a timer per
    instant that some token expires at, rather than one per socket.

    A loop timer costs about 0.5 KiB on uvloop (its handle, the libuv timer, a copy of the
    context) for as long as the socket lives; an `exp` is a whole second, so the sockets whose
    tokens were issued within the same second, with the same lifetime, share one. Each still
    closes at its own token's expiry, on the clock it was given.
    """

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due: dict[float, tuple[Timer, set[Connection]]] = {}

    def add(self, conn: Connection, when: float, clock: Clock) -> None:
        due = self._due.get(when)
        if due is None:
            timer = clock.call_at(when, functools.partial(self._expired, when))
            due = self._due[when] = (timer, set())
        due[1].add(conn)

    def discard(self, conn: Connection, when: float) -> None:
        due = self._due.get(when)
        if due is None:  # that instant has come
            return
        timer, sockets = due
        sockets.discard(conn)
        if not sockets:
            del self._due[when]
            timer.cancel()

    def _expired(self, when: float) -> None:
        _, sockets = self._due.pop(when, (None, ()))
        for conn in sockets:
            conn.close_with(CLOSE_UNAUTHORIZED, "token expired")


# By loop (where the timers run), then by clock (the node's, or a test's): weak, so that either
# can go once no socket's expiry is pending on it.
_EXPIRIES: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Clock, _Expiries]
] = weakref.WeakKeyDictionary()


def _expiries(clock: Clock) -> _Expiries:
    loop = asyncio.get_running_loop()
    on_loop = _EXPIRIES.get(loop)
    if on_loop is None:
        on_loop = _EXPIRIES[loop] = weakref.WeakKeyDictionary()
    expiries = on_loop.get(clock)
    if expiries is None:
        expiries = on_loop[clock] = _Expiries()
    return expiries


def _frame(event: Outgoing) -> bytes:
    """The message's WebSocket frame, built by the first socket that writes it and kept on it
    for the others: one event of a study goes to every local socket of the study."""
    frame = event.frame
    if frame is None:
        frame = text_frame(event.text)
        # A cache of what `text` determines, so the message stays the same value.
        object.__setattr__(event, "frame", frame)
    return frame


def _drop_superseded(pending: deque[Outgoing], key: tuple[str, str]) -> None:
    # Latest wins for messages without a seq (signals): the older one still waiting is dropped.
    # A backlog is at most the queue size long, and only a slow socket has one.
    for i, waiting in enumerate(pending):
        if waiting.key == key and waiting.seq is None and waiting.floor is None:
            del pending[i]
            return
