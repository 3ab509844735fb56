"""`WS /ws/presence?study_id=...`: a study's snapshot, then its events, plus client messages.

Close codes. Right after the handshake, before any study data: 4400 bad request (study_id
missing or invalid), 4401 unauthorized (missing, invalid or expired token), 4403 forbidden
(an Origin not in PRESENCE_ALLOWED_ORIGINS, or no grant for the study), 4429 the user already
has PRESENCE_MAX_SOCKETS_PER_USER sockets on this node. Later: 4401 the token expired without
a refresh; 1008 messages faster than PRESENCE_WS_MESSAGE_RATE allows; 1009 a message over
PRESENCE_WS_MAX_MESSAGE_SIZE; 1011 the node could not subscribe to or read the study; 1012
the node is shutting down (reconnect, the load balancer picks another node); 1013 the client
read too slowly and its outgoing queue overflowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import types
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from presence_svc.auth import AuthError, Principal, bearer
from presence_svc.codec import Outgoing, json_text
from presence_svc.http import validation_problems
from presence_svc.limits import TokenBucket
from presence_svc.models import (
    ID_PATTERN,
    PING_TEXT,
    ClientMessage,
    CursorUpdate,
    HeartbeatMessage,
    RefreshMessage,
    compact_heartbeat,
    iso_from_ms,
)
from presence_svc.node import Node
from presence_svc.store import StoreUnavailable

log = logging.getLogger(__name__)

CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403  # an Origin not allowed, or no grant for the study
CLOSE_TOO_MANY_SOCKETS = 4429
CLOSE_POLICY = 1008  # the client sends messages faster than allowed
CLOSE_INTERNAL = 1011
CLOSE_SLOW_CONSUMER = 1013

HEARTBEATS_IN_FLIGHT = 16  # per socket; reading pauses beyond it
HEARTBEAT_DRAIN_TIMEOUT = 5.0

_STUDY_ID = re.compile(ID_PATTERN)
_MESSAGES: TypeAdapter[Any] = TypeAdapter(ClientMessage)


def _now_iso() -> str:
    return iso_from_ms(int(time.time() * 1000))


def _pong() -> Outgoing:
    # json_text's output, without its cost: a timestamp never needs escaping.
    return Outgoing(None, '{"type":"pong","data":{"timestamp":"' + _now_iso() + '"}}')


def _error(code: str, message: str, errors: list[dict[str, Any]] | None = None) -> Outgoing:
    data: dict[str, Any] = {"code": code, "message": message}
    if errors is not None:
        data["errors"] = errors
    return Outgoing(None, json_text({"type": "error", "data": data}))


_Sending = Coroutine[Any, Any, None]
_Step = Generator[Any, None, Any]  # an awaitable's __await__()


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


class _Connection:
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


class _Heartbeats:
    """A socket's heartbeats in flight, each a store call run without a Task of its own.

    A Task per heartbeat (its creation and registration, a loop turn to start it, another to
    report it done) cost more than parsing the message. A heartbeat's first step runs at once
    in the reader, which queues its Redis commands; every future it then waits on resumes it
    from that future's done callback, as a Task would. The store path uses nothing that needs
    a current Task (no asyncio.timeout; batch.py times out its own tasks).
    """

    __slots__ = (
        "_conn",
        "_connection_id",
        "_counted",
        "_idle",
        "_leases",
        "_ok",
        "_slot",
        "_study_id",
        "_user_id",
        "in_flight",
    )

    def __init__(
        self, node: Node, conn: _Connection, connection_id: str, user_id: str, study_id: str
    ) -> None:
        self._leases = node.leases
        self._counted = node.metrics.heartbeats
        self._ok: Any = None  # its counter, looked up once, at the first success
        self._conn = conn
        self._connection_id = connection_id
        self._user_id = user_id
        self._study_id = study_id
        self.in_flight = 0
        self._slot: asyncio.Future[None] | None = None  # the reader waits here when too many
        self._idle: asyncio.Future[None] | None = None  # the closing socket waits here

    def start(self, cursor: CursorUpdate) -> asyncio.Future[None] | None:
        """Send one heartbeat; a future to await first if too many are in flight."""
        self.in_flight += 1
        try:
            call = self._leases.heartbeat(
                self._connection_id, self._user_id, self._study_id, cursor
            ).__await__()
        except BaseException as exc:
            self._finished(exc)
        else:
            self._advance(call, None)
        if self.in_flight < HEARTBEATS_IN_FLIGHT:
            return None
        self._slot = asyncio.get_running_loop().create_future()
        return self._slot

    def idle(self) -> asyncio.Future[None] | None:
        """A future done when no heartbeat is in flight any more; None if none is."""
        if not self.in_flight:
            return None
        self._idle = asyncio.get_running_loop().create_future()
        return self._idle

    def _resume(self, call: _Step, _: object) -> None:
        self._advance(call, None)

    def _advance(self, call: _Step, error: BaseException | None) -> None:
        try:
            yielded = call.send(None) if error is None else call.throw(error)
        except BaseException as exc:  # StopIteration when it is done
            self._finished(exc)
            return
        # What Task.__step does with what a coroutine yields.
        if getattr(yielded, "_asyncio_future_blocking", None):
            yielded._asyncio_future_blocking = False
            yielded.add_done_callback(functools.partial(self._resume, call))
        elif yielded is None:
            asyncio.get_running_loop().call_soon(self._resume, call, None)
        else:
            self._advance(call, RuntimeError(f"heartbeat got bad yield: {yielded!r}"))

    def _finished(self, outcome: BaseException) -> None:
        try:
            if type(outcome) is StopIteration:
                if self._ok is None:
                    self._ok = self._counted.labels("websocket", "ok")
                self._ok.inc()
            elif isinstance(outcome, StoreUnavailable):
                self._counted.labels("websocket", "unavailable").inc()
                self._conn.deliver(_error("unavailable", "presence storage is unreachable"))
            elif isinstance(outcome, asyncio.CancelledError):
                pass
            elif isinstance(outcome, Exception):
                self._counted.labels("websocket", "internal").inc()
                log.error(
                    "heartbeat of %s in %s failed", self._user_id, self._study_id, exc_info=outcome
                )
                self._conn.deliver(_error("internal", "the heartbeat could not be recorded"))
            else:
                raise outcome  # KeyboardInterrupt, SystemExit: as a Task would
        finally:
            self.in_flight -= 1
            if self._slot is not None and not self._slot.done():
                self._slot.set_result(None)
            if not self.in_flight and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)


async def snapshot_message(node: Node, study_id: str) -> Outgoing:
    """The study's presence as a `presence.snapshot` message, and the seq it reflects."""
    presence = await node.service.presence(study_id)
    text = json_text({"type": "presence.snapshot", "data": presence.to_json()})
    return Outgoing(None, text, floor=presence.seq)


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    await websocket.accept()
    # A close frame carries at most 123 bytes of reason.
    await websocket.close(code, reason.encode()[:123].decode(errors="ignore"))


async def presence_socket(websocket: WebSocket) -> None:
    node: Node = websocket.app.state.node
    origin = websocket.headers.get("origin")
    allowed = node.settings.allowed_origins
    if allowed and origin is not None and origin.rstrip("/") not in allowed:
        # Cross-site WebSocket hijacking: a page elsewhere riding on a user's token or cookie.
        await _refuse(websocket, CLOSE_FORBIDDEN, "origin not allowed")
        return
    token = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    try:
        principal = node.verifier.principal(token)
    except AuthError as exc:
        await _refuse(websocket, CLOSE_UNAUTHORIZED, str(exc))
        return
    study_id = websocket.query_params.get("study_id", "")
    if not _STUDY_ID.fullmatch(study_id):
        await _refuse(websocket, CLOSE_BAD_REQUEST, f"study_id must match {ID_PATTERN}")
        return
    if node.settings.study_grant_required and not principal.may_access(study_id):
        await _refuse(websocket, CLOSE_FORBIDDEN, "the token grants no access to this study")
        return

    user_id = principal.user_id
    if node.sockets_by_user[user_id] >= node.settings.max_sockets_per_user:
        await _refuse(websocket, CLOSE_TOO_MANY_SOCKETS, "too many sockets for this user")
        return
    await websocket.accept()
    node.open_sockets += 1
    node.sockets_by_user[user_id] += 1
    try:
        await _serve(websocket, node, principal, study_id)
    finally:
        node.open_sockets -= 1
        node.sockets_by_user[user_id] -= 1
        if not node.sockets_by_user[user_id]:
            del node.sockets_by_user[user_id]


class _Expiry:
    """Closes the socket with 4401 when its token expires, unless a refresh pushed it back."""

    def __init__(self, conn: _Connection, expires_at: float) -> None:
        self._conn = conn
        self._timer: asyncio.TimerHandle | None = None
        self.move(expires_at)

    def move(self, expires_at: float) -> None:
        self.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, expires_at - time.time())
        self._timer = loop.call_later(
            delay, self._conn.close_with, CLOSE_UNAUTHORIZED, "token expired"
        )

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def _serve(websocket: WebSocket, node: Node, principal: Principal, study_id: str) -> None:
    user_id = principal.user_id
    conn = _Connection(websocket, node.settings.socket_queue_size, node.count_slow_consumer)
    try:
        await node.fanout.add(study_id, conn)
    except Exception as exc:
        log.error("cannot subscribe to study %s: %s", study_id, exc)
        await websocket.close(CLOSE_INTERNAL, "cannot subscribe to the study")
        return
    connection_id = uuid.uuid4().hex
    try:
        try:
            snapshot = await node.snapshots(study_id)
        except StoreUnavailable:
            await websocket.close(CLOSE_INTERNAL, "presence storage is unreachable")
            return
        connected = {
            "connection_id": connection_id,
            "user_id": user_id,
            "study_id": study_id,
            "timestamp": _now_iso(),
        }
        await websocket.send_text(json_text({"type": "connected", "data": connected}))
        await websocket.send_text(snapshot.text)
        conn.start(snapshot.floor or 0)
        expiry = _Expiry(conn, principal.expires_at)
        try:
            await _read(websocket, node, conn, expiry, principal, connection_id, study_id)
        finally:
            expiry.cancel()
    except WebSocketDisconnect:
        pass
    finally:
        await conn.stop()
        await node.fanout.remove(study_id, conn)
        await node.leases.release(connection_id)
        if websocket.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close()


async def _read(
    websocket: WebSocket,
    node: Node,
    conn: _Connection,
    expiry: _Expiry,
    principal: Principal,
    connection_id: str,
    study_id: str,
) -> None:
    beats: _Heartbeats | None = None  # made at the first heartbeat: idle sockets hold none
    budget = TokenBucket(node.settings.ws_message_rate, node.settings.ws_message_burst)
    # The ASGI receive itself, once accepted: Starlette's WebSocket.receive adds a coroutine
    # and checks to every message; the state it keeps is kept here.
    receive = websocket._receive
    try:
        while True:
            frame = await receive()
            kind = frame["type"]
            if kind != "websocket.receive":
                if kind == "websocket.disconnect":
                    websocket.client_state = WebSocketState.DISCONNECTED
                    return
                raise RuntimeError(
                    'Expected ASGI message "websocket.receive" or "websocket.disconnect", '
                    f"but got {kind!r}"
                )
            if budget.take():
                conn.close_with(CLOSE_POLICY, "message rate exceeded")
                return
            text = frame.get("text")
            if text is None:
                conn.deliver(_error("invalid_message", "binary frames are not supported"))
                continue
            cursor = compact_heartbeat(text)
            if cursor is None:
                if text == PING_TEXT:
                    conn.deliver(_pong())
                    continue
                try:
                    message = _MESSAGES.validate_json(text)
                except ValidationError as exc:
                    problems = validation_problems(exc)
                    conn.deliver(_error("invalid_message", "message not understood", problems))
                    continue
                if isinstance(message, RefreshMessage):
                    conn.deliver(_refresh(node, expiry, principal, message.token, study_id))
                    continue
                if not isinstance(message, HeartbeatMessage):
                    conn.deliver(_pong())
                    continue
                cursor = message.cursor()
            if beats is None:
                beats = _Heartbeats(node, conn, connection_id, principal.user_id, study_id)
            # Not awaited, so the next frame is read meanwhile: the store applies a socket's
            # heartbeats in the order they were sent (batch.py), and a few may be in flight.
            full = beats.start(cursor)
            if full is not None:
                await full
    finally:
        # A heartbeat landing after the release would hold the session for a closed socket.
        idle = beats.idle() if beats is not None else None
        if idle is not None:
            await asyncio.wait([idle], timeout=HEARTBEAT_DRAIN_TIMEOUT)


def _refresh(
    node: Node, expiry: _Expiry, principal: Principal, token: str, study_id: str
) -> Outgoing:
    """Accept a fresh token for the same user (and, if required, the same study)."""
    try:
        fresh = node.verifier.principal(token)
    except AuthError as exc:
        return _error("invalid_token", str(exc))
    if fresh.user_id != principal.user_id:
        return _error("invalid_token", "the token is for another user")
    if node.settings.study_grant_required and not fresh.may_access(study_id):
        return _error("invalid_token", "the token grants no access to this study")
    expiry.move(fresh.expires_at)
    expires = iso_from_ms(int(fresh.expires_at * 1000))
    return Outgoing(None, json_text({"type": "refreshed", "data": {"expires_at": expires}}))
