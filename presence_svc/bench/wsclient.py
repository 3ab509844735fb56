"""Minimal, cheap WebSocket and HTTP/1.1 clients for load generation.

The clients run on the same 2 cores as the servers they measure, so every microsecond they
spend is taken from the servers: these are bare asyncio protocols (no per-message coroutine, no
frame objects), driven by callbacks. They speak just enough of RFC 6455 and HTTP/1.1 for the
service: text frames, ping/pong, close, Content-Length bodies.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable
from typing import cast

# Client frames must be masked (RFC 6455 5.3); an all-zero key makes masking a no-op, which
# servers accept and which spares the client an XOR pass over every payload.
_ZERO_MASK = b"\x00\x00\x00\x00"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

MessageHandler = Callable[["WsClient", bytes, int], None]


def frame(opcode: int, payload: bytes) -> bytes:
    """One masked (zero-key) client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + _ZERO_MASK + payload


class WsClient(asyncio.Protocol):
    """One WebSocket connection. `opened` resolves after the first `skip` text messages
    (the service's `connected` and snapshot); later text messages go to `handler`."""

    def __init__(self, host: str, port: int, path: str, handler: MessageHandler, skip: int = 2):
        self.host, self.port, self.path = host, port, path
        self.handler = handler
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tag: object = None  # owner's data (study, counters, ...)
        self._skip = skip
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._upgraded = False
        self._fragments: list[bytes] = []
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self._transport = transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        transport.write(request.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._not_opened(f"closed before open ({self.close_code})")
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._upgraded:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self._buf[: self._buf.find(b"\r\n")])
            if b" 101 " not in status:
                self._fail(f"handshake refused: {status.decode(errors='replace')}")
                return
            self._upgraded = True
            del self._buf[: end + 4]
            if self._skip == 0 and not self.opened.done():
                self.opened.set_result(None)
        self._parse(time.time_ns())

    def _parse(self, now_ns: int) -> None:
        buf = self._buf
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > size:
                break
            self._frame(b0 & 0x0F, bool(b0 & 0x80), bytes(buf[pos + head : end]), now_ns)
            pos = end
            if self._transport is None:
                return
        del buf[:pos]

    def _frame(self, opcode: int, fin: bool, payload: bytes, now_ns: int) -> None:
        if opcode == OP_PING:
            self._write(frame(OP_PONG, payload))
            return
        if opcode == OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._write(frame(OP_CLOSE, payload[:2]))
            if self._transport is not None:
                self._transport.close()
            return
        if opcode == OP_PONG:
            return
        if opcode == OP_CONT or not fin:
            self._fragments.append(payload)
            if not fin:
                return
            payload = b"".join(self._fragments)
            self._fragments.clear()
        if self._skip > 0:
            self._skip -= 1
            if self._skip == 0 and not self.opened.done():
                self.opened.set_result(None)
            return
        self.handler(self, payload, now_ns)

    def _fail(self, why: str) -> None:
        self._not_opened(why)
        if self._transport is not None:
            self._transport.close()

    def _not_opened(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
            # Whoever opened it may have given up already (timeout): do not log it as unseen.
            self.opened.exception()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def send_text(self, text: bytes) -> None:
        self._write(frame(OP_TEXT, text))

    def send_raw(self, data: bytes) -> None:
        """Already-framed bytes (e.g. several frames built once and reused)."""
        self._write(data)

    def close(self) -> None:
        self._write(frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        if self._transport is not None:
            self._transport.close()


async def open_ws(
    host: str, port: int, path: str, handler: MessageHandler, within: float, skip: int = 2
) -> WsClient:
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: WsClient(host, port, path, handler, skip), host, port),
        within,
    )
    try:
        await asyncio.wait_for(asyncio.shield(client.opened), within)
    except BaseException:
        client.close()
        raise
    return client


class HttpLoop(asyncio.Protocol):
    """One keep-alive connection sending the same request again as soon as each answer is in
    (a closed loop, one request in flight), until `running` is cleared."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self.running = True
        self.statuses: dict[int, int] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).lower()
            at, length = head.find(b"content-length:"), 0
            if at >= 0:
                eol = head.find(b"\r\n", at)
                length = int(head[at + 15 : eol if eol >= 0 else len(head)])
            if len(self._buf) < end + 4 + length:
                return
            status = int(head[9:12])
            self.statuses[status] = self.statuses.get(status, 0) + 1
            del self._buf[: end + 4 + length]
            self._answered()

    def _answered(self) -> None:
        if self.running and self._transport is not None:
            self._transport.write(self._request)
        elif not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class HttpPaced(HttpLoop):
    """One keep-alive connection that sends its request only when told to (`send`), one in
    flight; `on_idle` is called with it each time an answer is in. For a load offered at a set
    rate rather than as fast as the server answers."""

    def __init__(self, request: bytes, on_idle: Callable[[HttpPaced], None]) -> None:
        super().__init__(request)
        self._on_idle = on_idle
        self.sent_ns = 0
        self.latencies_ns: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._on_idle(self)

    def send(self) -> None:
        assert self._transport is not None
        self.sent_ns = time.perf_counter_ns()
        self._transport.write(self._request)

    def _answered(self) -> None:
        self.latencies_ns.append(time.perf_counter_ns() - self.sent_ns)
        self._on_idle(self)


def post_request(host: str, port: int, path: str, token: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
