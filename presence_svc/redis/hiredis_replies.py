"""Replies read raw: a hiredis reader fed straight from a redis-py connection's stream.

redis-py's `read_response` costs several microseconds of Python per reply, which was the
largest single item of a heartbeat's CPU: reading a batch's replies here, many per read of
the socket, took a heartbeat from 41.5 to 38.5 us of node CPU in-process (docs/performance.md,
"What changed, and what each change bought"; commit 1bf81bc, "Heartbeats 14k/s -> 26k/s per
node").

`RawReplies` reads a connection's stream when asked to; `RawLink` goes further, for the
batcher's common case: it writes to the connection's transport and is called back, from the
transport, as replies arrive, so a lone pipeline costs no task, lock or read call (batch.py).

redis-py has no public API for it, so this module, and only this one, uses its internals
(checked against redis-py 8.1.0 and hiredis 3.5.0; tests/redis/test_internals.py fails if they
change):

- `connection._reader`: the connection's `asyncio.StreamReader` once connected;
- `connection._parser.parse_error`: turns an error reply's text into the exception type
  redis-py raises for it (ResponseError, NoScriptError, ...);
- `connection._parser.handle_push_response`: where a RESP3 push message goes, as redis-py's
  own reader sends it, with hiredis's `PushNotification` (hiredis >= 3.2) to tell it apart;
- `connection.encoder`: `decode_responses`, `encoding`, `encoding_errors`;
- `connection._writer`: the connection's `asyncio.StreamWriter`, for its transport, which
  `RawLink` writes to and takes the reading of over (public asyncio API from there on:
  `write`, `get_protocol`, `set_protocol`, `is_closing`).

A connection that lacks any of them (fakeredis, or not connected) is read through the public
`read_response` instead; `unusable` says why (and `unlinkable` why a connection cannot be a
`RawLink`: also a connection class with a `send_packed_command` of its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse

READ_SIZE = 65536

_MORE = object()  # what the hiredis reader answers while no whole reply is buffered

_PUSH: type | None = getattr(hiredis, "PushNotification", None)  # hiredis >= 3.2


def _is_error(reply: Any) -> bool:
    """Whether `reply` is an error reply. As redis-py's read_response, a connection-level error
    (alone, or first in a list) ends the whole stream: it is raised."""
    if isinstance(reply, Exception):
        if isinstance(reply, RedisConnectionError):
            raise reply
        return True
    if type(reply) is list and reply and isinstance(reply[0], RedisConnectionError):
        raise reply[0]
    return False


def unusable(connection: Any) -> str | None:
    """Why `connection` cannot be read raw, or None if it can."""
    stream = getattr(connection, "_reader", None)
    if not isinstance(stream, asyncio.StreamReader):
        return f"connection._reader is {type(stream).__name__}, not an asyncio.StreamReader"
    parser = getattr(connection, "_parser", None)
    if parser is None or not callable(getattr(parser, "parse_error", None)):
        return f"connection._parser ({type(parser).__name__}) has no parse_error"
    if str(getattr(connection, "protocol", 2)) != "2":
        if _PUSH is None:
            return "hiredis has no PushNotification: RESP3 pushes look like replies"
        if not callable(getattr(parser, "handle_push_response", None)):
            return f"connection._parser ({type(parser).__name__}) has no handle_push_response"
    return None


def _hiredis_reader(connection: Any) -> hiredis.Reader:
    """A reader that gives what redis-py's `read_response` gives on `connection`."""
    encoder = connection.encoder
    if encoder.decode_responses:
        return hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=connection._parser.parse_error,
            notEnoughData=_MORE,
            encoding=encoder.encoding,
            errors=encoder.encoding_errors,
        )
    return hiredis.Reader(
        protocolError=InvalidResponse,
        replyError=connection._parser.parse_error,
        notEnoughData=_MORE,
    )


class RawReplies:
    """A hiredis reader fed from one redis-py connection's asyncio stream."""

    __slots__ = ("_parser", "_reader", "stream")

    def __init__(self, connection: Any, stream: asyncio.StreamReader) -> None:
        self.stream = stream
        self._parser = connection._parser
        self._reader = _hiredis_reader(connection)

    @classmethod
    def of(cls, connection: Any) -> RawReplies | None:
        """A raw reader for `connection`, or None where only `read_response` will do."""
        if unusable(connection) is not None:
            return None  # not a socket (fakeredis), or not connected
        return cls(connection, connection._reader)

    def reads(self, connection: Any) -> bool:
        """Whether this reader is still the one for `connection` (not since reconnected:
        a new stream starts with an empty reader)."""
        return self.stream is getattr(connection, "_reader", None)

    async def read(self, count: int) -> tuple[list[Any], bool]:
        """The next `count` replies, and whether any of them is an error reply."""
        replies: list[Any] = []
        failed = False
        gets = self._reader.gets
        while True:
            reply = gets()
            if reply is _MORE:
                try:
                    data = await self.stream.read(READ_SIZE)
                except OSError as exc:
                    raise RedisConnectionError(f"Error while reading from Redis: {exc}") from exc
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                self._reader.feed(data)
                continue
            # As redis-py's read_response: a connection-level error fails the whole stream, and
            # a RESP3 push message (no reply to anything) goes to the parser's handlers.
            if _PUSH is not None and type(reply) is _PUSH:
                await self._parser.handle_push_response(reply)
                continue
            if _is_error(reply):
                failed = True
            replies.append(reply)
            if len(replies) == count:
                return replies, failed


def unlinkable(connection: Any) -> str | None:
    """Why `connection` cannot be a `RawLink`, or None if it can."""
    reason = unusable(connection)
    if reason is not None:
        return reason
    writer = getattr(connection, "_writer", None)
    if not isinstance(writer, asyncio.StreamWriter):
        return f"connection._writer is {type(writer).__name__}, not an asyncio.StreamWriter"
    transport = writer.transport
    if transport.is_closing():
        return "connection._writer's transport is closing"
    if not isinstance(transport.get_protocol(), asyncio.StreamReaderProtocol):
        protocol = type(transport.get_protocol()).__name__
        return f"connection._writer's transport reads for a {protocol}, not its stream"
    if type(connection).send_packed_command is not AbstractConnection.send_packed_command:
        # sentinel.py's PrimaryConnection checks there, before every write, that it is still
        # on the primary: writing to the transport would skip that.
        return f"{type(connection).__name__} writes through a send_packed_command of its own"
    return None


class RawLink(asyncio.Protocol):
    """One redis-py connection written straight to its transport, its replies parsed as they
    arrive: no task and no read call between a reply and whoever awaits it.

    It takes the transport's protocol over (`set_protocol`): the connection's stream then sees
    no data, so nothing else may read the connection until redis-py reconnects it (a new
    transport). What the stream's protocol still has to know is handed on to it: the end of
    the connection (redis-py's `disconnect` waits for it) and write flow control.

    `received(link)` is called whenever data has arrived (`take` the replies then); `lost(link,
    error)` when the connection ends or a RESP3 push handler fails.
    """

    __slots__ = (
        "_lost",
        "_parser",
        "_pushing",
        "_reader",
        "_received",
        "_streams",
        "connection",
        "transport",
    )

    def __init__(
        self,
        connection: Any,
        received: Callable[[RawLink], None],
        lost: Callable[[RawLink, Exception], None],
    ) -> None:
        self.connection = connection
        transport = connection._writer.transport
        # asyncio's or uvloop's (which does not subclass asyncio.Transport): its methods.
        self.transport: Any = transport
        self._streams: asyncio.StreamReaderProtocol = transport.get_protocol()
        self._parser = connection._parser
        self._reader = _hiredis_reader(connection)
        self._received = received
        self._lost = lost
        # A push being handled (redis-py's handlers are coroutines): the replies after it wait.
        self._pushing: asyncio.Future[None] | None = None
        transport.set_protocol(self)

    @classmethod
    def of(
        cls,
        connection: Any,
        received: Callable[[RawLink], None],
        lost: Callable[[RawLink, Exception], None],
    ) -> RawLink | None:
        """A link over `connection`, or None where it cannot be one (`unlinkable`)."""
        if unlinkable(connection) is not None:
            return None
        return cls(connection, received, lost)

    def write(self, payload: bytes) -> None:
        self.transport.write(payload)

    def closing(self) -> bool:
        return bool(self.transport.is_closing())

    def take(self, replies: list[Any], count: int) -> bool:
        """Append the whole replies buffered to `replies` until it holds `count` (fewer when
        the rest has not arrived); whether any appended is an error reply.

        As redis-py's read_response: a connection-level error fails the whole stream (it is
        raised), and a RESP3 push message (no reply to anything) goes to the parser's handlers,
        with the replies after it taken once that is done (`received` is called again).
        """
        if self._pushing is not None:
            return False
        gets = self._reader.gets
        failed = False
        while len(replies) < count:
            reply = gets()
            if reply is _MORE:
                break
            if _PUSH is not None and type(reply) is _PUSH:
                self._pushing = asyncio.ensure_future(self._push(reply))
                break
            if _is_error(reply):
                failed = True
            replies.append(reply)
        return failed

    def stray(self) -> bool:
        """Whether a reply has arrived that no command asked for (call when none is owed)."""
        replies: list[Any] = []
        self.take(replies, 1)
        return bool(replies)

    async def _push(self, push: Any) -> None:
        try:
            await self._parser.handle_push_response(push)
        except Exception as exc:
            self._pushing = None
            self._lost(self, exc)
            return
        self._pushing = None
        self._received(self)

    # asyncio.Protocol: called by the transport.

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._received(self)

    def eof_received(self) -> bool | None:
        self._lost(self, RedisConnectionError("Connection closed by server."))
        return self._streams.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._lost(self, RedisConnectionError("Connection closed."))
        else:
            self._lost(self, RedisConnectionError(f"Error while reading from Redis: {exc}"))
        self._streams.connection_lost(exc)

    def pause_writing(self) -> None:
        self._streams.pause_writing()

    def resume_writing(self) -> None:
        self._streams.resume_writing()
