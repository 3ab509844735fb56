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
from websockets.frames import Frame, Opcode

from presence_svc.codec import Outgoing
from presence_svc.web.protocol import (
    BAD_HANDSHAKE,
    INVALID_UTF8,
    OUTGOING_BUFFER,
    LimitedWebSocketProtocol,
    protocol_class,
    text_frame,
)
from presence_svc.web.ws_connection import Connection

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
        self.send: Any = None  # the server's ASGI send, once the app runs

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        self.send = send
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
        "writable": asyncio.Event,
    }
    for name, kind in attributes.items():
        assert isinstance(getattr(instance, name, None), kind), f"{name}: {CHECKED}"
    assert "transport" in vars(instance), CHECKED
    assert vars(instance).get("initial_response", "missing") is None, CHECKED
    # What write_text_frame reads of websockets' protocol (websockets.protocol.Protocol).
    conn = {"extensions": list, "expect_continuation_frame": bool, "debug": bool}
    for name, kind in conn.items():
        assert isinstance(getattr(instance.conn, name, None), kind), f"conn.{name}: {CHECKED}"
    assert isinstance(type(instance.conn).state, property), CHECKED
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


# --- write_text_frame: the fan-out's frames, built once ------------------------------------

TEXTS = ["", "x", "é" * 62, "a" * 125, "a" * 126, "b" * 65535, "c" * 65536, "ü" * 40_000]


@pytest.mark.parametrize("text", TEXTS, ids=lambda t: f"{len(t.encode())}B")
def test_text_frame_is_the_frame_websockets_serializes(text: str) -> None:
    expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])
    assert text_frame(text) == expected


async def written_by(harness: Harness, write: Callable[[], object]) -> bytes:
    before = len(harness.transport.written)
    result = write()
    if asyncio.iscoroutine(result):
        await result
    return bytes(harness.transport.written[before:])


async def test_a_frame_written_raw_is_what_send_would_write(harness: Harness) -> None:
    await open_socket(harness)
    for text in ('{"type":"presence.cursor_moved","data":{"seq":3}}', "é" * 200, "z" * 70_000):
        by_send = await written_by(
            harness, lambda t=text: harness.app.send({"type": "websocket.send", "text": t})
        )
        frame = text_frame(text)
        raw: list[bool] = []
        by_raw = await written_by(
            harness, lambda f=frame, r=raw: r.append(harness.protocol.write_text_frame(f))
        )
        assert raw == [True]
        assert by_raw == by_send


def declines(harness: Harness) -> bool:
    before = len(harness.transport.written)
    written = harness.protocol.write_text_frame(text_frame("x"))
    assert len(harness.transport.written) == before or written
    return not written


async def test_write_text_frame_declines_where_send_would_do_more(harness: Harness) -> None:
    harness.feed(request())
    assert declines(harness)  # no handshake answered yet
    harness.app.may_accept.set()
    await harness.until(lambda: b"\r\n\r\n" in harness.transport.written, "the 101")
    assert not declines(harness)
    harness.protocol.pause_writing()  # send would wait for the transport
    assert declines(harness)
    harness.protocol.resume_writing()
    assert not declines(harness)
    await harness.app.send({"type": "websocket.close", "code": 1000})
    assert declines(harness)  # a close went out: send refuses


async def test_write_text_frame_declines_with_an_extension_negotiated() -> None:
    harness = Harness(App())
    try:
        harness.feed(request("Sec-WebSocket-Extensions: permessage-deflate\r\n"))
        harness.app.may_accept.set()
        await harness.until(lambda: b"\r\n\r\n" in harness.transport.written, "the 101")
        assert b"permessage-deflate" in harness.transport.written
        assert declines(harness)  # the frame must be compressed: send does it
    finally:
        await harness.finish()


async def test_write_text_frame_declines_once_the_client_is_gone(harness: Harness) -> None:
    await open_socket(harness)
    harness.protocol.connection_lost(None)
    assert declines(harness)


async def test_a_connection_writes_each_message_once_built_in_order(harness: Harness) -> None:
    await open_socket(harness)
    conn = Connection(harness.app.send, queue_size=8)
    other = Connection(harness.app.send, queue_size=8)  # a second socket of the same study
    conn.start(0)
    other.start(0)
    event = Outgoing(1, '{"type":"presence.user_joined","data":{"seq":1}}')
    written = await written_by(harness, lambda: (conn.deliver(event), other.deliver(event)))
    assert written == text_frame(event.text) * 2
    assert event.frame is not None
    frame = event.frame
    conn.deliver(event)
    assert event.frame is frame  # built by the first socket, reused by the others
    # A transport that cannot take more: the send waits, and what follows waits behind it.
    harness.protocol.pause_writing()
    before = len(harness.transport.written)
    for seq in (2, 3):
        conn.deliver(Outgoing(seq, f'{{"seq":{seq}}}'))
    await asyncio.sleep(0)
    assert len(harness.transport.written) == before
    harness.protocol.resume_writing()
    await harness.until(lambda: len(harness.transport.written) > before + 10, "the backlog")
    assert bytes(harness.transport.written[before:]) == text_frame('{"seq":2}') + text_frame(
        '{"seq":3}'
    )
    await conn.stop()
    await other.stop()
