"""The WebSocket protocol the node serves: uvicorn's `websockets-sansio` one, with limits.

1. A socket whose outgoing buffer passes PRESENCE_WS_MAX_OUTGOING_BUFFER bytes after the node
   read what the client sent is closed with 1013. Pongs are written by the protocol, not the
   app, so neither the app's send queue nor uvicorn's write flow control bounds them: a client
   that sends pings and never reads would grow the buffer until its TCP connection closes.
   Since such a client may never read the close frame either, the connection is aborted once
   uvicorn's close timeout has passed.
2. Pings that arrive before the handshake is answered get no pong (RFC 6455 4.1: a client
   sends no frames before the 101; the pong would be written ahead of the HTTP response).
3. A handshake websockets refuses (a header line or request line over 8 KiB, too many
   headers, or no valid HTTP request) is answered, 431 / 414 / 400, and closed. uvicorn 0.54
   leaves that answer unsent and the connection open.

And an invalid UTF-8 text message still closes with 1007, but is counted and logged at info
once per process (debug afterwards) rather than as an ERROR traceback every time.

4. `write_text_frame` writes a text frame built once (`text_frame`) straight to the transport,
   where the ASGI `send` would write the same bytes at once: the fan-out hands one event to
   every local socket of its study, and per socket `send` built a coroutine and a message dict,
   encoded the text to UTF-8, built and serialized a websockets Frame and joined its output,
   all for the same bytes each time. Where `send` would do anything else (wait for the
   transport, refuse, apply an extension such as permessage-deflate, log at debug) it returns
   False and the caller uses `send`. Measured (docs/performance.md, "Frames built once per
   message"): fan-out node CPU per delivery 23.1 -> 16.3 us at 10,000 deliveries/s, 1.03x ->
   0.78x the bare Starlette baseline, in `presence-svc bench --full` runs on one machine.

5. `data_received` reads whole text frames itself: the common read, one or more whole,
   masked, unfragmented text frames of at most the message size limit, valid UTF-8 (a
   heartbeat), is unmasked (websockets' own `apply_mask`) and decoded here and its messages
   queued for the app as uvicorn queues them, where websockets' generator-based parser built a
   Frame per frame and uvicorn dispatched it and decoded the text twice (our 1007 check, then
   its own). From the first frame that is anything else (a control frame, a fragment, a
   binary frame, reserved bits, a frame over the limit or not whole in the read, invalid
   UTF-8) the rest of the read goes to websockets and uvicorn as before, which give every
   limit, close code and error as they did; and while websockets' parser is not at a frame
   boundary with nothing buffered (a frame split across reads), every read does. The frames
   read here would have changed nothing in websockets' state. A read whose remainder the
   parser fails on delivers none of its messages, as uvicorn drops a read's events then.
6. `receive_nowait` gives the endpoint (ws.py) the message the ASGI `receive` would return at
   once, taken as `receive` takes it (reading resumed once the queue is empty), without the
   two coroutines (uvicorn's `receive`, the queue's `get`) that each message cost; where
   `receive` would wait it returns None and the endpoint awaits `receive`.

Each case is counted by `on_close(reason)` with one of `REASONS`.

uvicorn internals relied on (checked against uvicorn 0.54.0 with websockets 17.4;
tests/web/test_protocol.py fails if they change): `WebSocketsSansIOProtocol.data_received`,
`handle_events`, `handle_ping`, `send_receive_event_to_app` and `handle_parser_exception`, and
its attributes `conn`, `transport`, `loop`, `queue`, `read_paused`, `frames`,
`curr_msg_data_type`, `handshake_initiated`, `handshake_complete`, `close_sent`,
`disconnected`, `close_timeout`, `writable` and `initial_response`; and of websockets'
`Protocol` (the `conn`): `state`, `extensions`, `expect_continuation_frame`, `debug`,
`current_size`, `max_message_size`, `max_fragment_size`, `parser_exc`, `reader.buffer` and
`parser` (a generator that, at a frame boundary, waits in `StreamReader.at_eof`), and that
its `send_text` writes nothing but the frame `text_frame` builds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import GeneratorType
from typing import Any, ClassVar, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State
from websockets.streams import StreamReader

try:  # what websockets.frames itself uses: its C version where built
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

log = logging.getLogger(__name__)

CLOSE_NOT_READING = 1013  # the client does not read what the node sends it
CLOSE_INVALID_DATA = 1007

OUTGOING_BUFFER = "outgoing_buffer"
INVALID_UTF8 = "invalid_utf8"
BAD_HANDSHAKE = "bad_handshake"
REASONS = (OUTGOING_BUFFER, INVALID_UTF8, BAD_HANDSHAKE)

_EXPLAINED = {
    OUTGOING_BUFFER: "a WebSocket client that does not read was closed with 1013",
    INVALID_UTF8: "a WebSocket text message was not valid UTF-8; the socket was closed with 1007",
    BAD_HANDSHAKE: "a WebSocket handshake too large or malformed was refused",
}


@dataclass
class Limits:
    """What every socket of one server shares: the bound, the counter, what was logged."""

    max_outgoing_buffer: int
    on_close: Callable[[str], None]
    logged: set[str] = field(default_factory=set)


def behind(asgi_callable: object) -> LimitedWebSocketProtocol | None:
    """The node's own protocol behind an ASGI `send` or `receive` (a method of it under a real
    uvicorn server), or None (a test client, a wrapper)."""
    owner = getattr(asgi_callable, "__self__", None)
    return owner if isinstance(owner, LimitedWebSocketProtocol) else None


def text_frame(text: str) -> bytes:
    """`text` as one whole, unmasked WebSocket text frame (RFC 6455 5.2), as a server sends it."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


# The code websockets' parser waits in between frames, once all it was given is read.
_AT_EOF = StreamReader.at_eof.__code__


class LimitedWebSocketProtocol(WebSocketsSansIOProtocol):
    """Configured through `protocol_class`, which sets `limits` on a subclass."""

    limits: ClassVar[Limits]

    def write_text_frame(self, frame: bytes) -> bool:
        """Write `frame` (from `text_frame`) to the client now, if `send` of its text would do
        exactly that without waiting; False, writing nothing, where `send` must be used."""
        conn = self.conn
        if (
            self.close_sent
            or self.disconnected
            or not self.handshake_complete
            or self.initial_response is not None
            or not self.writable.is_set()
            or conn.state is not State.OPEN
            or conn.extensions
            or conn.expect_continuation_frame
            or conn.debug
        ):
            return False
        self.transport.write(frame)
        return True

    def data_received(self, data: bytes) -> None:
        if self._reads_frames():
            texts, rest = self._whole_text_frames(data)
            if not rest:
                self._queue_texts(texts)
            elif texts:
                # uvicorn's data_received, with this read's first messages ahead of the
                # library's events, or dropped with them.
                self.conn.receive_data(rest)
                if self.conn.parser_exc is not None:
                    self.handle_parser_exception()
                else:
                    self._queue_texts(texts)
                    self.handle_events()
            else:
                super().data_received(rest)
        else:
            super().data_received(data)
        if not self.handshake_initiated:
            if self.conn.handshake_exc is not None:
                self._refuse_handshake()
            return
        # Checked once per read rather than per frame: one read adds at most about its own
        # size in pongs, so the bound is overshot by little.
        if (
            self.handshake_complete
            and not self.transport.is_closing()
            and self.transport.get_write_buffer_size() > self.limits.max_outgoing_buffer
        ):
            self._close_not_reading()

    def receive_nowait(self) -> MutableMapping[str, Any] | None:
        """The message the ASGI `receive` would return now without waiting, taken as it would
        take it; None where it would wait (nothing is queued)."""
        queue = self.queue
        if queue.empty():
            return None
        message = queue.get_nowait()
        if self.read_paused and queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return cast("MutableMapping[str, Any]", message)  # an ASGI event, as `receive` returns

    def _reads_frames(self) -> bool:
        """Whether the next bytes begin a frame that websockets' parser has not started and
        that, if it is a whole text frame, websockets and uvicorn would only queue."""
        conn = self.conn
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or conn.state is not State.OPEN
            or conn.current_size is not None  # within a fragmented message
            or conn.extensions
            or conn.debug
            or conn.reader.buffer
        ):
            return False
        step: object = conn.parser
        while isinstance(step, GeneratorType):
            if step.gi_yieldfrom is None:
                return step.gi_code is _AT_EOF
            step = step.gi_yieldfrom
        return False

    def _whole_text_frames(self, data: bytes) -> tuple[list[str], bytes]:
        """The texts of the whole text frames `data` starts with that websockets would accept
        and uvicorn decode, and the rest of `data`, from the first frame that is not one."""
        conn = self.conn
        limit = conn.max_message_size
        if conn.max_fragment_size is not None:
            limit = conn.max_fragment_size if limit is None else min(limit, conn.max_fragment_size)
        texts: list[str] = []
        size = len(data)
        at = 0
        while size - at >= 6:  # the smallest masked frame: 2 bytes of header, 4 of mask
            if data[at] != 0x81:  # FIN, no reserved bit, text
                break
            length = data[at + 1] ^ 0x80  # 128 or more: not masked
            if length < 126:
                start = at + 6
            elif length == 126 and size - at >= 8:
                length = int.from_bytes(data[at + 2 : at + 4])
                start = at + 8
            else:  # a 64-bit length (over 64 KiB), no mask, or a header split
                break
            end = start + length
            if end > size or (limit is not None and length > limit):
                break
            try:
                text = apply_mask(data[start:end], data[start - 4 : start]).decode()
            except UnicodeDecodeError:
                break
            texts.append(text)
            at = end
        return texts, data[at:] if at else data

    def _queue_texts(self, texts: list[str]) -> None:
        """What uvicorn's handle_text and send_receive_event_to_app do for each of `texts`,
        arrived as whole text frames."""
        if not texts:
            return
        self.curr_msg_data_type = "text"
        self.frames = []
        put = self.queue.put_nowait
        for text in texts:
            put({"type": "websocket.receive", "text": text})
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def handle_ping(self) -> None:
        if self.handshake_complete:
            super().handle_ping()
        else:
            self.conn.data_to_send()  # drops the pong websockets queued

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                self.frames = []
                self._close_invalid_utf8()
                return
        super().send_receive_event_to_app()

    def _refuse_handshake(self) -> None:
        self._report(BAD_HANDSHAKE, str(self.conn.handshake_exc))
        # websockets queued a 431 or 414 response, or only an end of stream for a request it
        # could not parse at all.
        output = b"".join(self.conn.data_to_send())
        if not output:
            refusal = self.conn.reject(HTTPStatus.BAD_REQUEST, "Invalid WebSocket handshake.\n")
            output = refusal.serialize()
        self.handshake_complete = True
        self.close_sent = True
        self.transport.write(output)
        self.transport.close()

    def _close_not_reading(self) -> None:
        size = self.transport.get_write_buffer_size()
        self._report(OUTGOING_BUFFER, f"{size} bytes buffered for it")
        self._fail(CLOSE_NOT_READING, "the client does not read")
        # close() waits for the buffer to drain, which a client that does not read never lets
        # happen: the memory would stay held until the TCP connection dies. (Aborting a
        # transport that has closed meanwhile does nothing.)
        self.loop.call_later(self.close_timeout, self.transport.abort)

    def _close_invalid_utf8(self) -> None:
        self._report(INVALID_UTF8, "")
        self._fail(CLOSE_INVALID_DATA, "invalid UTF-8 in a text message")

    def _fail(self, code: int, reason: str) -> None:
        """Send a close frame (unless one was sent), tell the app, stop reading, close."""
        if not self.close_sent and self.conn.state is State.OPEN:
            self.conn.send_close(code, reason)
            self.handle_parser_exception()  # uvicorn's path for 1009: app told, frame written
        else:
            self.transport.close()
        # The app may still be setting up the socket: its sends must now fail as they do on a
        # lost connection (ClientDisconnected, which uvicorn drops silently), not with the
        # RuntimeError uvicorn raises for a send after a close it sent itself.
        self.disconnected = True

    def _report(self, reason: str, detail: str) -> None:
        self.limits.on_close(reason)
        # Any client can cause these at will: one line at info, the rest at debug.
        level = logging.DEBUG if reason in self.limits.logged else logging.INFO
        self.limits.logged.add(reason)
        log.log(
            level,
            '%s:%s: %s%s; counted in presence_ws_protocol_closes_total{reason="%s"}',
            *(self.client or ("unknown client", "")),
            _EXPLAINED[reason],
            f" ({detail})" if detail else "",
            reason,
        )


def protocol_class(
    max_outgoing_buffer: int, on_close: Callable[[str], None]
) -> type[LimitedWebSocketProtocol]:
    """The protocol class to pass as `ws=` to uvicorn.Config (uvicorn builds one per socket)."""

    class Configured(LimitedWebSocketProtocol):
        limits = Limits(max_outgoing_buffer, on_close)

    return Configured
