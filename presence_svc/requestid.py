"""Request and connection ids: one per HTTP request or WebSocket, held in a contextvar.

The JSON log formatter (`presence_svc.logs`) reads the contextvar, so every line logged while a
request or socket is handled, including by tasks it creates (they copy the context), names it.

A pure ASGI middleware on purpose: `BaseHTTPMiddleware` runs the endpoint in another task and
breaks streaming. This one costs, per HTTP request, one header scan and one wrapped `send` (two
calls: start and body); per WebSocket, one id and one contextvar set; per WebSocket message,
nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_LENGTH = 128
# Bounded and free of spaces, quotes and control characters: an id a client sends ends up in
# log lines and a response header, so it must not be able to forge either.
_VALID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,%d}" % MAX_LENGTH)

REQUEST_ID = "request_id"
CONNECTION_ID = "connection_id"

# (REQUEST_ID or CONNECTION_ID, the id) while a request or socket is handled, else None. One
# variable rather than two: the formatter then pays a single lookup per line.
_current: ContextVar[tuple[str, str] | None] = ContextVar("presence_request", default=None)


def current() -> tuple[str, str] | None:
    """(field name, id) of the request or WebSocket being handled, or None outside one."""
    return _current.get()


def request_id() -> str | None:
    ids = _current.get()
    return ids[1] if ids is not None and ids[0] == REQUEST_ID else None


def connection_id() -> str | None:
    ids = _current.get()
    return ids[1] if ids is not None and ids[0] == CONNECTION_ID else None


# Ids drawn from the OS a batch at a time: one getrandom call per 256 requests, not one each.
_BATCH = 256
_unused: list[str] = []
# A forked child must not hand out the ids its parent has left.
os.register_at_fork(after_in_child=_unused.clear)


def new_id() -> str:
    # 128 random bits: unique across a fleet without coordination; cheaper than uuid4().hex.
    if not _unused:
        drawn = os.urandom(16 * _BATCH).hex()
        _unused.extend([drawn[i : i + 32] for i in range(0, len(drawn), 32)])
    return _unused.pop()


def incoming_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The client's X-Request-ID if it is acceptable, else None (the first one counts)."""
    for name, value in headers:
        if name == HEADER:  # ASGI servers lower-case header names
            return value.decode("ascii") if _VALID.fullmatch(value) else None
    return None


def enter_websocket() -> None:
    """Give the WebSocket being handled its connection id, for an entry that calls its
    endpoint without this middleware (web/ws_entry.py). Not reset afterwards: the server runs
    each connection in its own task, whose context ends with it."""
    _current.set((CONNECTION_ID, new_id()))


class RequestIdMiddleware:
    """Sets the request id (HTTP, echoed as X-Request-ID) or connection id (WebSocket)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            rid = incoming_request_id(scope["headers"]) or new_id()
            header = (HEADER, rid.encode("ascii"))

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), header]}
                await send(message)

            token = _current.set((REQUEST_ID, rid))
            await self.app(scope, receive, send_with_id)
        elif kind == "websocket":
            # The socket's messages go straight to the server's `send`: nothing per message.
            token = _current.set((CONNECTION_ID, new_id()))
            await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, send)
            return
        # Not in a `finally`: when the app raises, the server logs the traceback after this
        # frame is gone, and that line should still carry the id. Servers run each request in
        # its own task, so the value cannot outlive it.
        _current.reset(token)
