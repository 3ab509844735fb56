"""presence_svc.web.protocol on a fake transport: its limits, and the uvicorn internals it uses.

If uvicorn renames or reshapes what the subclass relies on, these fail first (the fault tests
in tests/faults/test_protocol_abuse.py show the same behaviour against a real node).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvicorn
import websockets.server
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from presence_svc.web.protocol import (
    BAD_HANDSHAKE,
    INVALID_UTF8,
    OUTGOING_BUFFER,
    LimitedWebSocketProtocol,
    protocol_class,
)

CHECKED = f"checked against uvicorn 0.54.0 (installed: {uvicorn.__version__})"
BOUND = 256 * 1024
PING = b"q" * 125

Message = dict[str, Any]


class Transport:
    """A transport whose peer never reads: everything written stays buffered."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return len(self.written)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        addresses = {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}
        return addresses.get(name, default)


class App:
    """An ASGI app that accepts once allowed to, then records what it receives."""

    def __init__(self) -> None:
        self.may_accept = asyncio.Event()
        self.received: list[Message] = []

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        self.received.append(await receive())
        await self.may_accept.wait()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            self.received.append(message)
            if message["type"] == "websocket.disconnect":
                return


class Harness:
    """One socket; `protocol` is the class of the server it belongs to (a new one by default)."""

    def __init__(self, app: App, protocol: type[LimitedWebSocketProtocol] | None = None) -> None:
        self.app = app
        self.transport = Transport()
        self.reasons: list[str] = []
        config = uvicorn.Config(app, log_config=None)  # leaves the test's logging alone
        config.load()
        self.state = ServerState()
        cls = protocol or protocol_class(BOUND, self.reasons.append)
        self.protocol = cls(config=config, server_state=self.state, app_state={})
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]

    def feed(self, data: bytes) -> None:
        self.protocol.data_received(data)

    async def until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 5
        while not done():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.001)

    async def finish(self) -> None:
        if not self.protocol.disconnected:
            self.protocol.connection_lost(None)
        await asyncio.gather(*self.state.tasks)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    made = Harness(App())
    try:
        yield made
    finally:
        await made.finish()


def request(extra: str = "") -> bytes:
    return (
        "GET /ws/presence?study_id=s HTTP/1.1\r\nHost: node\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def close_code(data: bytes | bytearray) -> int:
    """The code of the close frame in `data` (the test payloads never contain 0x88)."""
    at = data.index(b"\x88")
    code: int = struct.unpack("!H", data[at + 2 : at + 4])[0]
    return code


async def open_socket(harness: Harness) -> None:
    harness.feed(request())
    harness.app.may_accept.set()
    await harness.until(lambda: b"\r\n\r\n" in harness.transport.written, "the 101")
    assert harness.transport.written.startswith(b"HTTP/1.1 101 ")


def test_the_uvicorn_internals_used_are_there() -> None:
    for method in (
        "data_received",
        "handle_ping",
        "send_receive_event_to_app",
        "handle_parser_exception",
    ):
        assert callable(getattr(WebSocketsSansIOProtocol, method, None)), f"{method}: {CHECKED}"
    config = uvicorn.Config(App(), log_config=None)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        instance = WebSocketsSansIOProtocol(config, ServerState(), {}, _loop=loop)
    finally:
        loop.close()
    attributes = {
        "conn": websockets.server.ServerProtocol,
        "frames": list,
        "curr_msg_data_type": str,
        "handshake_initiated": bool,
        "handshake_complete": bool,
        "close_sent": bool,
        "disconnected": bool,
        "close_timeout": float,
        "loop": asyncio.AbstractEventLoop,
    }
    for name, kind in attributes.items():
        assert isinstance(getattr(instance, name, None), kind), f"{name}: {CHECKED}"
    assert "transport" in vars(instance), CHECKED
    assert issubclass(LimitedWebSocketProtocol, WebSocketsSansIOProtocol)


async def test_a_ping_flood_past_the_bound_is_closed_with_1013(harness: Harness) -> None:
    await open_socket(harness)
    harness.protocol.close_timeout = 0.01
    pings = frame(0x9, PING) * 100
    while not harness.transport.closed:
        harness.feed(pings)
        assert harness.transport.get_write_buffer_size() < 2 * BOUND
    assert harness.reasons == [OUTGOING_BUFFER]
    assert close_code(harness.transport.written) == 1013
    await harness.until(lambda: harness.app.received[-1]["type"] == "websocket.disconnect", "app")
    assert harness.app.received[-1]["code"] == 1013
    # A peer that never reads never lets close() finish: the connection is aborted.
    await harness.until(lambda: harness.transport.aborted, "the abort")


async def test_pings_before_the_handshake_answer_get_no_pong(harness: Harness) -> None:
    harness.feed(request())
    harness.feed(frame(0x9, PING) * 3)
    await asyncio.sleep(0)  # the app task starts, and waits before accepting
    assert harness.transport.written == b""
    harness.app.may_accept.set()
    await harness.until(lambda: bool(harness.transport.written), "the 101")
    head, _, rest = bytes(harness.transport.written).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ") and rest == b""
    harness.feed(frame(0x9, PING))
    assert harness.transport.written.endswith(bytes([0x8A, len(PING)]) + PING)


@pytest.mark.parametrize(
    ("extra", "status"),
    [(f"Cookie: {'c' * 9000}\r\n", 431), ("Bad header line\r\n", 400)],
)
async def test_a_refused_handshake_is_answered_and_closed(
    harness: Harness, extra: str, status: int
) -> None:
    harness.feed(request(extra))
    assert harness.transport.written.startswith(f"HTTP/1.1 {status} ".encode())
    assert harness.transport.closed
    assert harness.reasons == [BAD_HANDSHAKE]
    assert not harness.state.tasks  # the app never saw it


async def send_invalid_utf8(harness: Harness) -> None:
    await open_socket(harness)
    harness.feed(frame(0x1, b'{"type": "ping", "x": "\xff"}'))
    assert close_code(harness.transport.written) == 1007
    assert harness.transport.closed
    await harness.until(lambda: len(harness.app.received) == 2, "the disconnect")
    assert harness.app.received[-1] == {
        "type": "websocket.disconnect",
        "code": 1007,
        "reason": "invalid UTF-8 in a text message",
    }


async def test_invalid_utf8_closes_with_1007_and_logs_at_info_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="presence_svc.web.protocol")
    first = Harness(App())
    harnesses = [first, Harness(App(), type(first.protocol))]  # two sockets of one server
    try:
        for harness in harnesses:
            await send_invalid_utf8(harness)
    finally:
        for harness in harnesses:
            await harness.finish()
    assert first.reasons == [INVALID_UTF8, INVALID_UTF8]
    levels = [r.levelno for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert levels == [logging.INFO, logging.DEBUG]


async def test_valid_text_still_reaches_the_app(harness: Harness) -> None:
    await open_socket(harness)
    harness.feed(frame(0x1, '{"type": "ping", "x": "é"}'.encode()))
    await harness.until(lambda: len(harness.app.received) == 2, "the message")
    assert harness.app.received[-1] == {
        "type": "websocket.receive",
        "text": '{"type": "ping", "x": "é"}',
    }
    assert harness.reasons == []
