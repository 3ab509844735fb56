"""Pub/sub replies read raw: every reply buffered on a link's connection, once per wake-up.

redis-py's `PubSub.get_message` runs, per message, a timeout context, its retry and
observability wrappers, `read_response` and `handle_message` (a dict per message), and
receiving events is what a planned node spends most of its CPU on (docs/capacity.md). Reading
the socket here instead, once per wake-up, with every whole reply in it parsed by one hiredis
reader, took a node from 243.9, 175.2 and 175.2 to 140.6, 134.6 and 138.3 us of CPU per
received event (the bench's receive-cost point at 2,000 events/s offered, alternate runs on the
shared machine; with `gather` and this round's other changes 92-95 us: docs/performance.md,
"Receive path", has the profile and the runs).

redis-py has no public API for it, so this module, and only this one besides
hiredis_replies.py (whose `unusable` check it shares), uses its internals, checked against
redis-py 8.1.0 and hiredis 3.5.0 (tests/redis/test_internals.py fails if they change):

- `connection._reader`: the connection's `asyncio.StreamReader` once connected, which redis-py
  replaces on a reconnect (the old one then ends: EOF, a lost link);
- `connection._parser.parse_error`: error replies as the exceptions redis-py raises;
- `connection.protocol` and `connection.encoder.decode_responses`: only RESP2 without decoding
  is read raw (what pubsub.py's clients use: redis/client.py, cluster.node_client), so every
  reply is a plain hiredis list, bytes or error, and no RESP3 push needs redis-py's handlers;
- `connection.health_check_interval`: 0, or redis-py would read a health check's reply
  itself on some sends, racing this reader (pubsub.py pings by itself);
- `connection._writer`: the connection's `asyncio.StreamWriter`, whose transport `gather`
  pauses (public asyncio API from there on: `pause_reading`, `resume_reading`, `is_reading`).

What the raw path leaves out of redis-py's per-message work: the per-message
`record_pubsub_message` observability hook (the node never enables redis-py's observability).
A connection that cannot be read raw (fakeredis, RESP3, decoded replies, not connected) is
read through `PubSub.get_message` instead; `PubSubReplies.of` says None.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse

from presence_svc.redis.hiredis_replies import READ_SIZE, unusable


def why_not_raw(connection: Any) -> str | None:
    """Why a pub/sub `connection` cannot be read raw, or None if it can."""
    reason = unusable(connection)
    if reason is not None:
        return reason
    if str(getattr(connection, "protocol", None)) != "2":
        return f"connection.protocol is {getattr(connection, 'protocol', None)!r}, not 2"
    encoder = getattr(connection, "encoder", None)
    if encoder is None or getattr(encoder, "decode_responses", True):
        return "connection.encoder decodes replies"
    writer = getattr(connection, "_writer", None)
    if not isinstance(writer, asyncio.StreamWriter):
        return f"connection._writer is {type(writer).__name__}, not an asyncio.StreamWriter"
    if getattr(connection, "health_check_interval", None) != 0:
        # redis-py's health check reads a PING's reply itself, which would race this reader.
        return "connection.health_check_interval is set"
    return None


class PubSubReplies:
    """A hiredis reader fed from one pub/sub connection's asyncio stream."""

    __slots__ = ("_reader", "stream", "transport")

    def __init__(self, connection: Any) -> None:
        self.stream: asyncio.StreamReader = connection._reader
        # asyncio's or uvloop's (which does not subclass asyncio.ReadTransport): its methods.
        self.transport: Any = connection._writer.transport
        self._reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=connection._parser.parse_error
        )

    @classmethod
    def of(cls, connection: Any) -> PubSubReplies | None:
        """A raw reader for `connection`, or None where only `get_message` will do."""
        return cls(connection) if why_not_raw(connection) is None else None

    async def read(self) -> list[Any]:
        """Every whole reply buffered after the next read of the socket (maybe none, when a
        reply is cut across reads): `[kind, channel, payload]` lists, bytes (a PONG outside
        subscribed mode), or exception instances for error replies, in the server's order."""
        try:
            data = await self.stream.read(READ_SIZE)
        except OSError as exc:
            raise RedisConnectionError(f"Error while reading from Redis: {exc}") from exc
        if not data:
            raise RedisConnectionError("Connection closed by server.")
        reader = self._reader
        reader.feed(data)
        replies: list[Any] = []
        # RESP2 has no boolean replies: False is only hiredis's "no whole reply buffered".
        while (reply := reader.gets()) is not False:
            replies.append(reply)
        return replies

    async def gather(self, seconds: float) -> None:
        """Let the socket fill for `seconds` without waking the loop for it: the transport
        stops reading (the kernel buffers what comes), then reads again, and the next `read`
        takes everything at once. Nothing to wait for where reading is paused already (the
        stream's own flow control, or closing): the next read must drain it first."""
        transport = self.transport
        if not transport.is_reading():
            return
        transport.pause_reading()
        try:
            await asyncio.sleep(seconds)
        finally:
            if not transport.is_closing():
                transport.resume_reading()
