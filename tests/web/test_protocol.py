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
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvicorn
import websockets.server
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from presence_svc.codec import Outgoing
from presence_svc.web.protocol import (
    BAD_HANDSHAKE,
    INVALID_UTF8,
    OUTGOING_BUFFER,
    LimitedWebSocketProtocol,
    Limits,
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

    def __init__(
        self,
        app: App,
        protocol: type[LimitedWebSocketProtocol] | None = None,
        max_size: int = 16 * 1024 * 1024,  # uvicorn's default
    ) -> None:
        self.app = app
        self.transport = Transport()
        self.reasons: list[str] = []
        # log_config=None leaves the test's logging alone.
        config = uvicorn.Config(app, log_config=None, ws_max_size=max_size)
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
        "handle_events",
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
        "queue": asyncio.Queue,
        "read_paused": bool,
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
    # What data_received's own reading of text frames reads of it.
    conn_read = {
        "max_message_size": int,
        "parser_exc": type(None),
        "current_size": type(None),
        "parser": types.GeneratorType,
    }
    for name, kind in conn_read.items():
        assert isinstance(getattr(instance.conn, name, "missing"), kind), f"conn.{name}: {CHECKED}"
    assert vars(instance.conn).get("max_fragment_size", "missing") is None, CHECKED
    assert isinstance(instance.conn.reader, StreamReader), CHECKED
    assert isinstance(instance.conn.reader.buffer, bytearray), CHECKED


def innermost(generator: Any) -> Any:
    while generator.gi_yieldfrom is not None:
        generator = generator.gi_yieldfrom
    return generator


async def test_websockets_parser_waits_in_at_eof_only_between_frames(harness: Harness) -> None:
    """What `_reads_frames` tells a frame boundary by (checked against websockets 17.4)."""
    await open_socket(harness)
    conn = harness.protocol.conn
    at_eof = StreamReader.at_eof.__code__
    assert innermost(conn.parser).gi_code is at_eof, CHECKED
    whole = masked(0x1, b"x" * 10)
    for cut in range(1, len(whole)):  # every way of splitting one frame in two reads
        conn.receive_data(whole[:cut])
        assert innermost(conn.parser).gi_code is not at_eof, (cut, CHECKED)
        assert not conn.events_received()
        conn.receive_data(whole[cut:])
        assert innermost(conn.parser).gi_code is at_eof, (cut, CHECKED)
        assert not conn.reader.buffer
        [event] = conn.events_received()
        assert (event.opcode, event.data, event.fin) == (Opcode.TEXT, b"x" * 10, True), CHECKED


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


# --- data_received: whole text frames read without websockets' parser ----------------------


class LibraryProtocol(LimitedWebSocketProtocol):
    """The protocol as it was: every read through websockets' parser and uvicorn's events."""

    def _reads_frames(self) -> bool:
        return False


def masked(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """A client's frame of any length (`frame` above is for short ones)."""
    size = len(payload)
    if size < 126:
        head = bytes([size])
    elif size < 65536:
        head = bytes([126]) + size.to_bytes(2, "big")
    else:
        head = bytes([127]) + size.to_bytes(8, "big")
    first = bytes([(0x80 if fin else 0) | rsv | opcode])
    if not mask:
        return first + head + payload
    key = os.urandom(4)
    body = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
    return first + bytes([head[0] | 0x80]) + head[1:] + key + body


def text(payload: str) -> bytes:
    return masked(0x1, payload.encode())


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return masked(0x8, code.to_bytes(2, "big") + reason)


@pytest.mark.parametrize("size", [0, 1, 4, 125, 126, 65535, 65536])
def test_masked_is_what_websockets_parses(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    reader = StreamReader()
    reader.feed_data(masked(0x2, payload))
    with pytest.raises(StopIteration) as parsed:
        next(Frame.parse(reader.read_exact, mask=True))
    assert parsed.value.value == Frame(Opcode.BINARY, payload)
    assert not reader.buffer


Outcome = tuple[list[Message], bytes, list[str], bool]


async def outcome(
    chunks: list[bytes], protocol: type[LimitedWebSocketProtocol], max_size: int
) -> Outcome:
    """What the app received, what was written after the 101, the limits counted, and whether
    the transport was closed, once `chunks` were read one by one."""
    reasons: list[str] = []

    class Configured(protocol):  # type: ignore[misc,valid-type]
        limits = Limits(BOUND, reasons.append)

    harness = Harness(App(), Configured, max_size=max_size)
    try:
        await open_socket(harness)
        handshake = len(harness.transport.written)
        for chunk in chunks:
            if harness.transport.closed:
                break  # a closed transport reads nothing more
            harness.feed(chunk)
            for _ in range(3):
                await asyncio.sleep(0)  # the app reads what was queued
        for _ in range(3):
            await asyncio.sleep(0)
        return (
            harness.app.received[1:],
            bytes(harness.transport.written[handshake:]),
            reasons,
            harness.transport.closed,
        )
    finally:
        await harness.finish()


def splits(stream: bytes) -> list[list[bytes]]:
    """`stream` in one read, in reads of a few sizes from 1 byte, and cut in two anywhere."""
    ways = [[stream]]
    for size in (1, 2, 3, 5, 7, 13, 64):
        ways.append([stream[i : i + size] for i in range(0, len(stream), size)])
    ways += [[stream[:cut], stream[cut:]] for cut in range(1, len(stream))]
    return ways


HEARTBEAT = text('{"type":"heartbeat"}')
PING_MESSAGE = text('{"type":"ping"}')
SMALL = 1024  # the message size limit of the cases that name a limit

STREAMS = {
    "one heartbeat": HEARTBEAT,
    "a window of heartbeats and a ping message": HEARTBEAT * 16 + PING_MESSAGE,
    "a 2-byte length": text("é" * 100) + text("x" * 1000) + HEARTBEAT,
    "an empty text": text("") + HEARTBEAT,
    "an 8-byte length": text("z" * 70_000) + HEARTBEAT,
    "a ping and a pong between texts": HEARTBEAT
    + masked(0x9, b"p")
    + HEARTBEAT
    + masked(0xA, b"q")
    + HEARTBEAT,
    "a fragmented message, a ping within": HEARTBEAT
    + masked(0x1, b'{"type":', fin=False)
    + masked(0x9, b"")
    + masked(0x0, b'"heart', fin=False)
    + masked(0x0, b'beat"}')
    + HEARTBEAT,
    "a fragmented message split inside a character": masked(0x1, b"\xc3", fin=False)
    + masked(0x0, b"\xa9")
    + HEARTBEAT,
    "a binary frame": HEARTBEAT + masked(0x2, b"\x00\x01") + HEARTBEAT,
    "invalid UTF-8": HEARTBEAT + text("ok") + masked(0x1, b'{"x": "\xff"}') + HEARTBEAT,
    "invalid UTF-8 first": masked(0x1, b"\xc3") + HEARTBEAT,
    "a close": HEARTBEAT * 3 + close_frame(1000, b"bye") + HEARTBEAT,
    "an empty close": HEARTBEAT + masked(0x8, b""),
    "an invalid close code": HEARTBEAT + close_frame(999),
    "an unmasked frame": HEARTBEAT + masked(0x1, b"plain", mask=False) + HEARTBEAT,
    "a reserved bit": HEARTBEAT + masked(0x1, b"rsv", rsv=0x40) + HEARTBEAT,
    "a reserved opcode": HEARTBEAT + masked(0x3, b"op") + HEARTBEAT,
    "a continuation without a start": HEARTBEAT + masked(0x0, b"cont") + HEARTBEAT,
    "a text within a fragmented message": masked(0x1, b"a", fin=False) + HEARTBEAT,
    "a fragmented ping": HEARTBEAT + masked(0x9, b"p", fin=False),
    "a ping over 125 bytes": HEARTBEAT + masked(0x9, b"p" * 126),
    "a message over the limit": HEARTBEAT + text("y" * (SMALL + 1)) + HEARTBEAT,
    "a message at the limit": HEARTBEAT + text("y" * SMALL) + HEARTBEAT,
    "fragments over the limit": masked(0x1, b"f" * 600, fin=False) + masked(0x0, b"g" * 600),
}


@pytest.mark.parametrize("name", STREAMS)
async def test_reading_frames_gives_what_the_library_gives(name: str) -> None:
    stream = STREAMS[name]
    max_size = SMALL if "limit" in name else 16 * 1024 * 1024
    ways = splits(stream) if len(stream) < 600 else [[stream], [stream[:3], stream[3:]]]
    fast = protocol_class(BOUND, lambda reason: None)
    for chunks in ways:
        expected = await outcome(chunks, LibraryProtocol, max_size)
        assert await outcome(chunks, fast, max_size) == expected, [len(c) for c in chunks]
    assert expected[0] or expected[3]  # the case tested something


async def test_whole_text_frames_skip_websockets_parser(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await open_socket(harness)
    parsed: list[bytes] = []
    receive_data = harness.protocol.conn.receive_data

    def parse(data: bytes) -> None:
        parsed.append(data)
        receive_data(data)

    monkeypatch.setattr(harness.protocol.conn, "receive_data", parse)
    harness.feed(HEARTBEAT * 16 + PING_MESSAGE)
    harness.feed(text("é" * 1000))
    assert parsed == []
    pong = masked(0x9, b"p")
    harness.feed(HEARTBEAT + pong + HEARTBEAT)  # from the ping on: the library's
    assert parsed == [pong + HEARTBEAT]
    two = HEARTBEAT * 2
    cut = len(HEARTBEAT) + 4
    harness.feed(two[:cut])  # a frame split across reads: the library's until it is whole
    harness.feed(two[cut:])
    harness.feed(HEARTBEAT)  # then whole frames are read here again
    assert parsed == [pong + HEARTBEAT, two[len(HEARTBEAT) : cut], two[cut:]]
    expected = [
        '{"type":"heartbeat"}',
        *['{"type":"heartbeat"}'] * 15,
        '{"type":"ping"}',
        "é" * 1000,
        *['{"type":"heartbeat"}'] * 5,
    ]
    await harness.until(lambda: len(harness.app.received) == 1 + len(expected), "all")
    assert harness.app.received[1:] == [
        {"type": "websocket.receive", "text": message} for message in expected
    ]
    assert harness.transport.written.endswith(b"\x8a\x01p")  # the pong


class Reading(Transport):
    """A transport that records when reading is paused and resumed."""

    def __init__(self) -> None:
        super().__init__()
        self.reading: list[bool] = []

    def pause_reading(self) -> None:
        self.reading.append(False)

    def resume_reading(self) -> None:
        self.reading.append(True)


async def test_receive_nowait_takes_what_receive_would_take_at_once(harness: Harness) -> None:
    """The endpoint (ws.py) takes queued messages with receive_nowait, then awaits receive."""
    await open_socket(harness)
    protocol = harness.protocol
    reading = Reading()
    protocol.transport = reading  # type: ignore[assignment]
    # The app is waiting in receive(); a second reader of the queue takes turns with it here.
    assert protocol.receive_nowait() is None
    protocol.queue.put_nowait({"type": "websocket.receive", "text": "a"})
    protocol.queue.put_nowait({"type": "websocket.receive", "text": "b"})
    protocol.read_paused = True
    assert protocol.receive_nowait() == {"type": "websocket.receive", "text": "a"}
    assert reading.reading == [] and protocol.read_paused  # one still queued: still paused
    assert protocol.receive_nowait() == {"type": "websocket.receive", "text": "b"}
    assert reading.reading == [True] and not protocol.read_paused  # as receive() resumes
    assert protocol.receive_nowait() is None
    assert reading.reading == [True]
    harness.feed(HEARTBEAT * 3)
    assert reading.reading == [True, False]
    by_nowait = [protocol.receive_nowait() for _ in range(3)]
    assert by_nowait == [{"type": "websocket.receive", "text": '{"type":"heartbeat"}'}] * 3
    assert reading.reading == [True, False, True]
    harness.feed(HEARTBEAT * 2)
    by_receive = [await protocol.receive() for _ in range(2)]
    assert by_receive == by_nowait[:2]
    assert reading.reading == [True, False, True, False, True]
    assert protocol.receive_nowait() is None
