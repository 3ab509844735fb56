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
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from presence_svc.auth import AuthError, Principal, bearer
from presence_svc.codec import Outgoing, json_text
from presence_svc.http import validation_problems
from presence_svc.limits import TokenBucket
from presence_svc.models import (
    ID_PATTERN,
    ClientMessage,
    CursorUpdate,
    HeartbeatMessage,
    RefreshMessage,
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


def _error(code: str, message: str, errors: list[dict[str, Any]] | None = None) -> Outgoing:
    data: dict[str, Any] = {"code": code, "message": message}
    if errors is not None:
        data["errors"] = errors
    return Outgoing(None, json_text({"type": "error", "data": data}))


class _Connection:
    """One socket's outgoing side: a bounded queue drained by a single writer task.

    A deque and one waiter rather than an asyncio.Queue: idle sockets are the bulk of a node's
    memory, and a Queue carries three more deques and an Event per socket.
    """

    __slots__ = (
        "_closing",
        "_floor",
        "_limit",
        "_on_overflow",
        "_pending",
        "_slot",
        "_waiter",
        "_writer",
        "_ws",
        "heartbeats",
    )

    def __init__(
        self,
        websocket: WebSocket,
        queue_size: int,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._ws = websocket
        self._on_overflow = on_overflow
        self._pending: deque[Outgoing] = deque()
        self._limit = queue_size
        self._waiter: asyncio.Future[None] | None = None
        self._floor = 0  # events with seq <= floor are already in the client's snapshot
        self._closing: tuple[int, str] | None = None
        self.heartbeats: set[asyncio.Task[None]] = set()  # sent to the store, not yet done
        self._slot: asyncio.Future[None] | None = None  # the reader waits here when too many
        self._writer: asyncio.Task[None] | None = None

    @property
    def overflowed(self) -> bool:
        """True once the client fell so far behind that the socket is being closed (1013)."""
        return self._closing is not None and self._closing[0] == CLOSE_SLOW_CONSUMER

    def deliver(self, event: Outgoing) -> None:
        if self._closing is not None:
            return
        if len(self._pending) >= self._limit:
            if self._on_overflow is not None:
                self._on_overflow()
            self.close_with(CLOSE_SLOW_CONSUMER, "slow consumer")
            return
        self._pending.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close_with(self, code: int, reason: str) -> None:
        """Stop sending and close the socket with `code` (the reader then sees it closed)."""
        if self._closing is None:
            self._closing = (code, reason)
            if self._writer is not None:
                self._writer.cancel()

    def track(self, heartbeat: asyncio.Task[None]) -> asyncio.Future[None] | None:
        """Count a heartbeat in flight; a future to await first if the socket has too many."""
        self.heartbeats.add(heartbeat)
        heartbeat.add_done_callback(self._heartbeat_done)
        if len(self.heartbeats) < HEARTBEATS_IN_FLIGHT:
            return None
        self._slot = asyncio.get_running_loop().create_future()
        return self._slot

    def _heartbeat_done(self, heartbeat: asyncio.Task[None]) -> None:
        self.heartbeats.discard(heartbeat)
        if self._slot is not None and not self._slot.done():
            self._slot.set_result(None)

    def start(self, floor: int) -> None:
        self._floor = floor
        self._writer = asyncio.create_task(self._pump())
        if self._closing is not None:
            self._writer.cancel()

    async def _pump(self) -> None:
        try:
            while True:
                while not self._pending:
                    self._waiter = asyncio.get_running_loop().create_future()
                    await self._waiter
                self._waiter = None
                event = self._pending.popleft()
                if event.floor is not None:
                    self._floor = event.floor
                elif event.seq is not None and event.seq <= self._floor:
                    continue
                await self._ws.send_text(event.text)
        except asyncio.CancelledError:
            if self._closing is not None:
                with contextlib.suppress(Exception):
                    await self._ws.close(*self._closing)
            raise
        except Exception:  # the socket went away; the reader side sees the disconnect
            return

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer


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
        if conn.heartbeats:
            # A heartbeat landing after the release would hold the session for a closed socket.
            await asyncio.wait(conn.heartbeats, timeout=HEARTBEAT_DRAIN_TIMEOUT)
        await conn.stop()
        await node.fanout.remove(study_id, conn)
        await node.leases.release(connection_id)
        if websocket.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close()


async def _heartbeat(
    node: Node,
    conn: _Connection,
    connection_id: str,
    user_id: str,
    study_id: str,
    cursor: CursorUpdate,
) -> None:
    counted = node.metrics.heartbeats
    try:
        await node.leases.heartbeat(connection_id, user_id, study_id, cursor)
    except StoreUnavailable:
        counted.labels("websocket", "unavailable").inc()
        conn.deliver(_error("unavailable", "presence storage is unreachable"))
    except Exception:
        counted.labels("websocket", "internal").inc()
        log.exception("heartbeat of %s in %s failed", user_id, study_id)
        conn.deliver(_error("internal", "the heartbeat could not be recorded"))
    else:
        counted.labels("websocket", "ok").inc()


async def _read(
    websocket: WebSocket,
    node: Node,
    conn: _Connection,
    expiry: _Expiry,
    principal: Principal,
    connection_id: str,
    study_id: str,
) -> None:
    user_id = principal.user_id
    budget = TokenBucket(node.settings.ws_message_rate, node.settings.ws_message_burst)
    while True:
        frame = await websocket.receive()
        if frame["type"] == "websocket.disconnect":
            return
        if budget.take():
            conn.close_with(CLOSE_POLICY, "message rate exceeded")
            return
        text = frame.get("text")
        if text is None:
            conn.deliver(_error("invalid_message", "binary frames are not supported"))
            continue
        try:
            message = _MESSAGES.validate_json(text)
        except ValidationError as exc:
            problems = validation_problems(exc)
            conn.deliver(_error("invalid_message", "message not understood", problems))
            continue
        if isinstance(message, HeartbeatMessage):
            # Not awaited, so the next frame is read meanwhile: the store applies a socket's
            # heartbeats in the order they were sent (batch.py), and a few may be in flight.
            task = asyncio.ensure_future(
                _heartbeat(node, conn, connection_id, user_id, study_id, message.cursor())
            )
            full = conn.track(task)
            if full is not None:
                await full
        elif isinstance(message, RefreshMessage):
            conn.deliver(_refresh(node, expiry, principal, message.token, study_id))
        else:
            pong = {"type": "pong", "data": {"timestamp": _now_iso()}}
            conn.deliver(Outgoing(None, json_text(pong)))


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
