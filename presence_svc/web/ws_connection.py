"""A WebSocket's outgoing side: events sent at once, a bounded backlog, closing with a code.

The fan-out delivers to every local socket of a study in one loop turn, so sending must never
wait there: a send the socket can take right away runs to completion synchronously; one that
would wait becomes the socket's backlog, drained by a task of its own, and a backlog past the
queue size closes the socket with 1013 (a slow consumer).
"""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from presence_svc.codec import Outgoing, json_text

CLOSE_SLOW_CONSUMER = 1013


def error_message(code: str, message: str, errors: list[dict[str, Any]] | None = None) -> Outgoing:
    """An `error` message to the client (the socket stays open)."""
    data: dict[str, Any] = {"code": code, "message": message}
    if errors is not None:
        data["errors"] = errors
    return Outgoing(None, json_text({"type": "error", "data": data}))


_Sending = Coroutine[Any, Any, None]


@types.coroutine
def _finish(step: _Sending, yielded: Any) -> Generator[Any, Any, None]:
    """Await the rest of `step`, whose first step already ran (elsewhere) and yielded
    `yielded`: what `await step` would have done from there on, in the awaiting task."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            step.close()
            raise
        except BaseException as exc:  # the awaiting task was cancelled: so is the step
            try:
                yielded = step.throw(exc)
            except StopIteration:
                return
        else:
            try:
                yielded = step.send(sent)
            except StopIteration:
                return


class Connection:
    """One socket's outgoing side: messages in order, a bounded backlog, and a writer task
    only while there is a backlog.

    A message is sent at once by whoever delivers it when nothing waits before it: the ASGI
    send completes without waiting unless the socket's buffer is full, and waking a writer
    task for every message cost as much as the send itself. A send that has to wait, and
    everything delivered meanwhile, goes to a writer task, which ends once it has caught up.
    Idle sockets are the bulk of a node's memory, so an idle one holds neither a task (about
    1 KiB with its coroutine and waiter) nor a deque (about 0.75 KiB).
    """

    __slots__ = (
        "_broken",
        "_closer",
        "_closing",
        "_floor",
        "_limit",
        "_on_overflow",
        "_pending",
        "_send",
        "_stalled",
        "_started",
        "_writer",
        "_ws",
    )

    def __init__(
        self,
        websocket: WebSocket,
        queue_size: int,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._ws = websocket
        # The ASGI send itself: Starlette's send_text and send add two coroutines and their
        # checks to every message; _sending keeps the one that matters (connected state).
        self._send = websocket._send if isinstance(websocket, WebSocket) else None
        self._on_overflow = on_overflow
        self._pending: deque[Outgoing] | None = None  # the backlog, while there is one
        self._limit = queue_size
        self._floor = 0  # events with seq <= floor are already in the client's snapshot
        self._closing: tuple[int, str] | None = None
        self._started = False  # the snapshot is out: events may follow
        self._stalled: tuple[_Sending, Any] | None = None  # a send waiting for the socket
        self._broken = False  # a send failed: the socket is gone, nothing more is sent
        self._writer: asyncio.Task[None] | None = None  # while there is a backlog
        self._closer: asyncio.Task[None] | None = None  # a close that had to wait

    @property
    def overflowed(self) -> bool:
        """True once the client fell so far behind that the socket is being closed (1013)."""
        return self._closing is not None and self._closing[0] == CLOSE_SLOW_CONSUMER

    def deliver(self, event: Outgoing) -> None:
        if self._closing is not None:
            return
        if self._started and self._writer is None and not self._broken:
            if event.floor is not None:
                self._floor = event.floor
            elif event.seq is not None and event.seq <= self._floor:
                return
            self._send_now(event.text)
            return
        pending = self._pending
        if pending is None:
            pending = self._pending = deque()
        if len(pending) >= self._limit:
            if self._on_overflow is not None:
                self._on_overflow()
            self.close_with(CLOSE_SLOW_CONSUMER, "slow consumer")
            return
        pending.append(event)

    def _sending(self, text: str) -> _Sending:
        ws = self._ws
        if self._send is not None and ws.application_state is WebSocketState.CONNECTED:
            return self._send({"type": "websocket.send", "text": text})  # type: ignore[return-value]
        return ws.send_text(text)  # raises in the other states, as it should

    def _send_now(self, text: str) -> None:
        """Send `text` if the socket takes it at once; else leave the rest to the writer."""
        step = self._sending(text)
        try:
            yielded = step.send(None)
        except StopIteration:
            return
        except Exception as exc:
            self._failed(exc)
            return
        self._stalled = (step, yielded)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._pump())

    def _failed(self, exc: Exception) -> None:
        # As Starlette's WebSocket.send: a write error means the client is gone.
        if isinstance(exc, OSError) and isinstance(self._ws, WebSocket):
            self._ws.application_state = WebSocketState.DISCONNECTED
        self._broken = True  # the reader side sees the disconnect

    def close_with(self, code: int, reason: str) -> None:
        """Stop sending and close the socket with `code` (the reader then sees it closed)."""
        if self._closing is None:
            self._closing = (code, reason)
            if self._writer is not None:
                self._writer.cancel()  # the backlog is dropped
            if self._started:
                self._close_now()

    def _close_now(self) -> None:
        assert self._closing is not None
        step = self._ws.close(*self._closing)
        try:
            yielded = step.send(None)
        except StopIteration:
            return
        except Exception:  # the socket is gone already
            return
        self._closer = asyncio.get_running_loop().create_task(self._finish_close(step, yielded))

    async def _finish_close(self, step: _Sending, yielded: Any) -> None:
        with contextlib.suppress(Exception):
            await _finish(step, yielded)

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
                    await _finish(*self._stalled)
                    self._stalled = None
                elif self._broken or not self._pending:
                    break
                else:
                    event = self._pending.popleft()
                    if event.floor is not None:
                        self._floor = event.floor
                    elif event.seq is not None and event.seq <= self._floor:
                        continue
                    self._send_now(event.text)
        except Exception as exc:  # the socket went away; the reader side sees the disconnect
            self._stalled = None
            self._failed(exc)
        else:
            self._pending = None  # caught up: an idle socket keeps no deque
        finally:
            self._writer = None

    async def stop(self) -> None:
        writer = self._writer
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        if self._closer is not None:
            # Not cancelled: the close frame still goes out (a send waits at most until the
            # server's keepalive gives up on the client).
            await self._closer
