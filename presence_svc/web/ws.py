"""`WS /ws/presence?study_id=...`: a study's snapshot, then its events, plus client messages.

Close codes. Right after the handshake, before any study data: 4400 bad request (study_id
missing or invalid), 4401 unauthorized (missing, invalid or expired token), 4403 forbidden
(an Origin not in PRESENCE_ALLOWED_ORIGINS, or no grant for the study), 4429 the user already
has PRESENCE_MAX_SOCKETS_PER_USER sockets on this node. Later: 4401 the token expired without
a refresh; 1008 messages faster than PRESENCE_WS_MESSAGE_RATE allows; 1009 a message over
PRESENCE_WS_MAX_MESSAGE_SIZE; 1011 the node could not subscribe to or read the study; 1012
the node is shutting down (reconnect, the load balancer picks another node); 1013 the client
read too slowly and its outgoing queue overflowed. Below the app (web/protocol.py): 1013 more
than PRESENCE_WS_MAX_OUTGOING_BUFFER bytes waited unsent (pongs to a client that never reads);
1007 a text frame that is not valid UTF-8.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from presence_svc import requestid
from presence_svc.auth import AuthError, Principal, bearer
from presence_svc.clock import Clock
from presence_svc.codec import Outgoing, json_text
from presence_svc.limits import TokenBucket
from presence_svc.models import (
    ID_PATTERN,
    PING_TEXT,
    ClientMessage,
    HeartbeatMessage,
    RefreshMessage,
    SignalMessage,
    compact_heartbeat,
    iso_from_ms,
)
from presence_svc.node import Node
from presence_svc.store import StoreUnavailable
from presence_svc.web import protocol
from presence_svc.web.errors import validation_problems
from presence_svc.web.ws_connection import (
    CLOSE_UNAUTHORIZED,
    Connection,
    Disconnected,
    error_message,
)
from presence_svc.web.ws_heartbeats import Heartbeats
from presence_svc.web.ws_signals import Signals, count_invalid

log = logging.getLogger(__name__)

CLOSE_BAD_REQUEST = 4400
CLOSE_FORBIDDEN = 4403  # an Origin not allowed, or no grant for the study
CLOSE_TOO_MANY_SOCKETS = 4429
CLOSE_POLICY = 1008  # the client sends messages faster than allowed
CLOSE_INTERNAL = 1011

HEARTBEAT_DRAIN_TIMEOUT = 5.0

_STUDY_ID = re.compile(ID_PATTERN)
_MESSAGES: TypeAdapter[Any] = TypeAdapter(ClientMessage)


def _now_iso(clock: Clock) -> str:
    return iso_from_ms(int(clock.time() * 1000))


def _pong(clock: Clock) -> Outgoing:
    # json_text's output, without its cost: a timestamp never needs escaping.
    return Outgoing(None, '{"type":"pong","data":{"timestamp":"' + _now_iso(clock) + '"}}')


async def snapshot_message(node: Node, study_id: str) -> Outgoing:
    """The study's presence as a `presence.snapshot` message, and the seq it reflects: its
    total and counts, and at most PRESENCE_SNAPSHOT_MAX_USERS sessions (the most recent
    heartbeats), one read per study and node however many sockets get it (node.snapshots)."""
    presence = await node.service.presence(study_id, node.settings.snapshot_max_users)
    text = json_text({"type": "presence.snapshot", "data": presence.to_json()})
    return Outgoing(None, text, floor=presence.seq)


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    await websocket.accept()
    # A close frame carries at most 123 bytes of reason.
    await websocket.close(code, reason.encode()[:123].decode(errors="ignore"))


class PresenceSocket:
    """The endpoint, as a raw ASGI app: Starlette routes an endpoint that is not a function as
    ASGI, as is, so frames are read with the ASGI `receive` and sent with the ASGI `send`
    themselves, with no coroutine of Starlette's around every message. Starlette's WebSocket
    does the handshake only (headers, query parameters, accept, refusals); the state it would
    keep afterwards is kept by the Connection (ws_connection.py).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one socket from its handshake to its close.

        An idle socket spends its life suspended in this one coroutine frame, reading: what
        only its start or its end needs runs in coroutines that have returned by then
        (`_admit`, `_subscribe`, `_greet`, `_settle`, `_release`), and nothing the greeting
        made stays referenced (docs/performance.md, "Idle socket memory").
        """
        node: Node = scope["app"].state.node
        admitted = await _admit(scope, receive, send, node)
        if admitted is None:
            return
        principal, study_id = admitted
        del admitted
        node.open_sockets += 1
        node.sockets_by_user[principal.user_id] += 1
        # The id the logs carry for this socket (requestid.py), so a client's report and the
        # node's log lines meet; made here when the app runs without that middleware (tests).
        connection_id = requestid.connection_id() or uuid.uuid4().hex
        conn = Connection(
            send, node.settings.socket_queue_size, node.count_slow_consumer, connection_id
        )
        beats: Heartbeats | None = None  # made at the first heartbeat: idle sockets hold none
        signals: Signals | None = None  # made at the first signal
        # Made at the first message, full: as full as one made at the handshake would be by
        # then, since a bucket starts full and never holds more than its burst.
        budget: TokenBucket | None = None
        try:
            if not await _subscribe(node, conn, study_id):
                return
            try:
                if not await _greet(node, conn, principal, study_id):
                    return
                conn.expire_at(principal.expires_at, node.clock)
                # The protocol behind `receive`, when it is ours (a real uvicorn server): what a
                # read queued is taken without two coroutines (uvicorn's and the queue's) each.
                raw = protocol.behind(receive)
                while True:
                    frame: Message | None = raw.receive_nowait() if raw is not None else None
                    if frame is None:
                        frame = await receive()
                    kind = frame["type"]
                    if kind != "websocket.receive":
                        if kind == "websocket.disconnect":
                            conn.client_gone()
                            return
                        raise RuntimeError(
                            'Expected ASGI message "websocket.receive" or '
                            f'"websocket.disconnect", but got {kind!r}'
                        )
                    if budget is None:
                        settings = node.settings
                        budget = TokenBucket(settings.ws_message_rate, settings.ws_message_burst)
                    if budget.take():
                        conn.close_with(CLOSE_POLICY, "message rate exceeded")
                        return
                    text = frame.get("text")
                    if text is None:
                        conn.deliver(
                            error_message("invalid_message", "binary frames are not supported")
                        )
                        continue
                    cursor = compact_heartbeat(text)
                    if cursor is None:
                        if text == PING_TEXT:
                            conn.deliver(_pong(node.clock))
                            continue
                        try:
                            message = _MESSAGES.validate_json(text)
                        except ValidationError as exc:
                            problems = validation_problems(exc)
                            count_invalid(node.metrics, problems)
                            conn.deliver(
                                error_message("invalid_message", "message not understood", problems)
                            )
                            continue
                        if isinstance(message, RefreshMessage):
                            conn.deliver(_refresh(node, conn, principal, message.token, study_id))
                            continue
                        if isinstance(message, SignalMessage):
                            if signals is None:
                                signals = Signals(
                                    node, conn, connection_id, principal.user_id, study_id
                                )
                            signals.offer(message.name, message.data)
                            continue
                        if not isinstance(message, HeartbeatMessage):
                            conn.deliver(_pong(node.clock))
                            continue
                        cursor = message.cursor()
                    if beats is None:
                        beats = Heartbeats(node, conn, connection_id, principal.user_id, study_id)
                        conn.watcher = False
                    # Not awaited, so the next frame is read meanwhile: the store applies a
                    # socket's heartbeats in the order they were sent (batch.py), and a few may
                    # be in flight.
                    full = beats.start(cursor)
                    if full is not None:
                        await full
            except Disconnected:
                pass
            finally:
                try:
                    await _settle(beats, signals)
                finally:
                    await _release(node, conn, study_id)
        finally:
            node.open_sockets -= 1
            node.sockets_by_user[principal.user_id] -= 1
            if not node.sockets_by_user[principal.user_id]:
                del node.sockets_by_user[principal.user_id]


presence_socket = PresenceSocket()


async def _admit(
    scope: Scope, receive: Receive, send: Send, node: Node
) -> tuple[Principal, str] | None:
    """The socket's user and study once it is accepted; None once it has been refused (and
    closed). The handshake's WebSocket, with its cached headers and query parameters, ends
    with this coroutine rather than staying alive as long as the socket."""
    websocket = WebSocket(scope, receive, send)
    origin = websocket.headers.get("origin")
    allowed = node.settings.allowed_origins
    if allowed and origin is not None and origin.rstrip("/") not in allowed:
        # Cross-site WebSocket hijacking: a page elsewhere riding on a user's token or cookie.
        await _refuse(websocket, CLOSE_FORBIDDEN, "origin not allowed")
        return None
    token = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    try:
        principal = node.verifier.principal(token)
    except AuthError as exc:
        await _refuse(websocket, CLOSE_UNAUTHORIZED, str(exc))
        return None
    study_id = websocket.query_params.get("study_id", "")
    if not _STUDY_ID.fullmatch(study_id):
        await _refuse(websocket, CLOSE_BAD_REQUEST, f"study_id must match {ID_PATTERN}")
        return None
    if node.settings.study_grant_required and not principal.may_access(study_id):
        await _refuse(websocket, CLOSE_FORBIDDEN, "the token grants no access to this study")
        return None
    if node.sockets_by_user[principal.user_id] >= node.settings.max_sockets_per_user:
        await _refuse(websocket, CLOSE_TOO_MANY_SOCKETS, "too many sockets for this user")
        return None
    await websocket.accept()
    return principal, study_id


async def _subscribe(node: Node, conn: Connection, study_id: str) -> bool:
    """Subscribe the socket to its study's events; False once it is closed with 1011."""
    try:
        await node.fanout.add(study_id, conn)
    except Exception as exc:
        log.error("cannot subscribe to study %s: %s", study_id, exc)
        await conn.close(CLOSE_INTERNAL, "cannot subscribe to the study")
        return False
    return True


async def _greet(node: Node, conn: Connection, principal: Principal, study_id: str) -> bool:
    """Send `connected` and the snapshot, then let events follow; False once the socket is
    closed with 1011 (storage unreachable); Disconnected if the client is gone."""
    try:
        snapshot = await node.snapshots(study_id)
    except StoreUnavailable:
        await conn.close(CLOSE_INTERNAL, "presence storage is unreachable")
        return False
    connected = {
        "connection_id": conn.connection_id,
        "user_id": principal.user_id,
        "study_id": study_id,
        "timestamp": _now_iso(node.clock),
    }
    await conn.send_text(json_text({"type": "connected", "data": connected}))
    await conn.send_text(snapshot.text)
    conn.start(snapshot.floor or 0)
    return True


async def _settle(beats: Heartbeats | None, signals: Signals | None) -> None:
    """The reading is over: the socket's signals dropped or sent, its heartbeats answered."""
    if signals is not None:
        await signals.close()
    # A heartbeat landing after the release would hold the session for a closed socket.
    idle = beats.idle() if beats is not None else None
    if idle is not None:
        await asyncio.wait([idle], timeout=HEARTBEAT_DRAIN_TIMEOUT)


async def _release(node: Node, conn: Connection, study_id: str) -> None:
    """What a subscribed socket held: its sends, its subscription, its lease."""
    await conn.stop()
    await node.fanout.remove(study_id, conn)
    await node.leases.release(conn.connection_id)
    with contextlib.suppress(Exception):
        await conn.close()


def _refresh(
    node: Node, conn: Connection, principal: Principal, token: str, study_id: str
) -> Outgoing:
    """Accept a fresh token for the same user (and, if required, the same study): the socket
    then closes at its expiry instead."""
    try:
        fresh = node.verifier.principal(token)
    except AuthError as exc:
        return error_message("invalid_token", str(exc))
    if fresh.user_id != principal.user_id:
        return error_message("invalid_token", "the token is for another user")
    if node.settings.study_grant_required and not fresh.may_access(study_id):
        return error_message("invalid_token", "the token grants no access to this study")
    conn.expire_at(fresh.expires_at, node.clock)
    expires = iso_from_ms(int(fresh.expires_at * 1000))
    return Outgoing(None, json_text({"type": "refreshed", "data": {"expires_at": expires}}))
