"""Replies read raw: a hiredis reader fed straight from a redis-py connection's stream.

redis-py's `read_response` costs several microseconds of Python per reply, which was the
largest single item of a heartbeat's CPU: reading a batch's replies here, many per read of
the socket, took a heartbeat from 41.5 to 38.5 us of node CPU in-process (docs/performance.md,
"What changed, and what each change bought"; commit 1bf81bc, "Heartbeats 14k/s -> 26k/s per
node").

redis-py has no public API for it, so this module, and only this one, uses its internals
(checked against redis-py 8.1.0 and hiredis 3.5.0; tests/redis/test_internals.py fails if they
change):

- `connection._reader`: the connection's `asyncio.StreamReader` once connected;
- `connection._parser.parse_error`: turns an error reply's text into the exception type
  redis-py raises for it (ResponseError, NoScriptError, ...);
- `connection._parser.handle_push_response`: where a RESP3 push message goes, as redis-py's
  own reader sends it, with hiredis's `PushNotification` (hiredis >= 3.2) to tell it apart;
- `connection.encoder`: `decode_responses`, `encoding`, `encoding_errors`.

A connection that lacks any of them (fakeredis, or not connected) is read through the public
`read_response` instead; `unusable` says why.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse

READ_SIZE = 65536

_MORE = object()  # what the hiredis reader answers while no whole reply is buffered

_PUSH: type | None = getattr(hiredis, "PushNotification", None)  # hiredis >= 3.2


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


class RawReplies:
    """A hiredis reader fed from one redis-py connection's asyncio stream."""

    __slots__ = ("_parser", "_reader", "stream")

    def __init__(self, connection: Any, stream: asyncio.StreamReader) -> None:
        self.stream = stream
        self._parser = connection._parser
        encoder = connection.encoder
        if encoder.decode_responses:
            self._reader = hiredis.Reader(
                protocolError=InvalidResponse,
                replyError=connection._parser.parse_error,
                notEnoughData=_MORE,
                encoding=encoder.encoding,
                errors=encoder.encoding_errors,
            )
        else:
            self._reader = hiredis.Reader(
                protocolError=InvalidResponse,
                replyError=connection._parser.parse_error,
                notEnoughData=_MORE,
            )

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
            if isinstance(reply, Exception):
                if isinstance(reply, RedisConnectionError):
                    raise reply
                failed = True
            elif type(reply) is list and reply and isinstance(reply[0], RedisConnectionError):
                raise reply[0]
            replies.append(reply)
            if len(replies) == count:
                return replies, failed
