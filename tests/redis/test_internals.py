"""The redis-py and hiredis internals hiredis_replies.py and hiredis_pubsub.py read through.

batch.py falls back to `read_response` wherever a connection cannot be read raw, and
pubsub.py to `PubSub.get_message`, so a redis-py release that renamed an internal would not
fail a single behaviour test: heartbeats and received events would silently cost what they did
before the raw readers (docs/performance.md). These tests fail instead, naming what changed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import hiredis
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError

from presence_svc.redis import hiredis_replies
from presence_svc.redis.hiredis_pubsub import PubSubReplies, why_not_raw
from presence_svc.redis.hiredis_replies import RawLink, RawReplies, unlinkable, unusable
from tests.support.waiting import eventually_async

VERSIONS = f"redis-py {redis.__version__}, hiredis {hiredis.__version__}"
RECHECK = "recheck presence_svc/redis/hiredis_replies.py against"


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
async def connection(request: pytest.FixtureRequest, cleanup_real_redis: str) -> AsyncIterator[Any]:
    """A connected redis-py connection to a real server, given back afterwards."""
    client: Any = aioredis.Redis.from_url(cleanup_real_redis, protocol=request.param)
    conn = await client.connection_pool.get_connection()
    try:
        yield conn
    finally:
        await client.connection_pool.release(conn)
        await client.aclose()


async def test_a_real_connection_is_read_raw(connection: Any) -> None:
    reason = unusable(connection)
    assert reason is None, f"{VERSIONS}: {reason}; batch.py reads it slowly now: {RECHECK} it"
    assert RawReplies.of(connection) is not None


async def test_error_replies_become_redis_py_exceptions(connection: Any, key_prefix: str) -> None:
    raw = RawReplies.of(connection)
    assert raw is not None, f"{VERSIONS}: {unusable(connection)}"
    commands: list[tuple[Any, ...]] = [
        ("EVALSHA", "0" * 40, 0),
        ("INCR", f"{key_prefix}:text"),
        ("SET", f"{key_prefix}:text", "x"),
        ("INCR", f"{key_prefix}:text"),
        ("PING",),
    ]
    await connection.send_packed_command(
        b"".join(hiredis.pack_command(c) for c in commands), check_health=False
    )
    replies, failed = await raw.read(len(commands))
    assert failed
    assert type(replies[0]) is NoScriptError, f"{VERSIONS}: parse_error gave {replies[0]!r}"
    assert replies[1:3] == [1, b"OK"]
    assert type(replies[3]) is ResponseError, f"{VERSIONS}: parse_error gave {replies[3]!r}"
    assert replies[4] == b"PONG"
    assert raw.reads(connection)


async def test_a_real_connection_is_linked_and_read_as_its_replies_arrive(
    connection: Any, key_prefix: str
) -> None:
    reason = unlinkable(connection)
    assert reason is None, (
        f"{VERSIONS}: {reason}; batch.py writes and reads slowly now: {RECHECK} it"
    )
    arrivals = asyncio.Event()
    lost: list[Exception] = []

    def received(link: RawLink) -> None:
        arrivals.set()

    link = RawLink.of(connection, received, lambda link, error: lost.append(error))
    assert link is not None
    commands: list[tuple[Any, ...]] = [
        ("EVALSHA", "0" * 40, 0),
        ("SET", f"{key_prefix}:text", "x"),
        ("INCR", f"{key_prefix}:text"),
        ("PING",),
    ]
    link.write(b"".join(hiredis.pack_command(c) for c in commands))
    replies: list[Any] = []
    failed = False
    while len(replies) < len(commands):
        arrivals.clear()
        failed |= link.take(replies, len(commands))
        if len(replies) < len(commands):
            await asyncio.wait_for(arrivals.wait(), 5)  # no read: data_received calls back
    assert failed and not link.stray()
    assert type(replies[0]) is NoScriptError, f"{VERSIONS}: parse_error gave {replies[0]!r}"
    assert replies[1] == b"OK" and replies[3] == b"PONG"
    assert type(replies[2]) is ResponseError
    # The stream's protocol still learns that the connection ended: redis-py's disconnect
    # waits for that (wait_closed), and would otherwise time out.
    await asyncio.wait_for(connection.disconnect(), 5)
    assert len(lost) == 1 and isinstance(lost[0], RedisConnectionError), lost


async def test_a_reconnected_connection_needs_a_new_reader(connection: Any) -> None:
    raw = RawReplies.of(connection)
    assert raw is not None and raw.reads(connection)
    await connection.disconnect()
    await connection.connect()
    assert not raw.reads(connection), f"{VERSIONS}: connection._reader outlived a reconnect"


async def test_a_resp3_push_goes_to_the_parser_handlers(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    client: Any = aioredis.Redis.from_url(cleanup_real_redis, protocol=3)
    other = aioredis.Redis.from_url(cleanup_real_redis)
    conn = await client.connection_pool.get_connection()
    pushed: list[Any] = []

    async def invalidated(message: Any) -> None:
        pushed.append(message)

    try:
        conn._parser.set_invalidation_push_handler(invalidated)
        raw = RawReplies.of(conn)
        assert raw is not None, f"{VERSIONS}: {unusable(conn)}"
        key = f"{key_prefix}:tracked"
        commands: list[tuple[Any, ...]] = [("CLIENT", "TRACKING", "ON"), ("GET", key)]
        await conn.send_packed_command(b"".join(hiredis.pack_command(c) for c in commands))
        assert await raw.read(2) == ([b"OK", None], False)
        await other.set(key, "changed")  # Redis pushes an invalidation to the tracking client
        await conn.send_packed_command(hiredis.pack_command(("PING",)))
        assert await raw.read(1) == ([b"PONG"], False), f"{VERSIONS}: a push read as a reply"
        assert len(pushed) == 1 and pushed[0][0] == b"invalidate", pushed
    finally:
        await client.connection_pool.release(conn)
        await client.aclose()
        await other.aclose()


def test_the_hiredis_reader_takes_what_hiredis_replies_gives_it() -> None:
    sentinel = object()
    reader = hiredis.Reader(
        protocolError=InvalidResponse,
        replyError=ResponseError,
        notEnoughData=sentinel,
        encoding="utf-8",
        errors="strict",
    )
    reader.feed(b"$5\r\nhel")
    assert reader.gets() is sentinel, f"hiredis {hiredis.__version__}: notEnoughData ignored"
    reader.feed(b"lo\r\n-ERR no\r\n")
    assert reader.gets() == "hello"
    assert type(reader.gets()) is ResponseError
    assert hiredis_replies._PUSH is not None, (
        f"hiredis {hiredis.__version__} has no PushNotification: RESP3 cannot be read raw"
    )


async def test_fakeredis_is_read_through_read_response() -> None:
    client: Any = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    conn = await client.connection_pool.get_connection()
    try:
        await conn.connect()
        assert unusable(conn) is not None
        assert RawReplies.of(conn) is None
        assert unlinkable(conn) is not None
        assert RawLink.of(conn, lambda link: None, lambda link, error: None) is None
    finally:
        await client.connection_pool.release(conn)
        await client.aclose()


async def test_a_stream_alone_is_not_enough() -> None:
    bare = type("Bare", (), {"_reader": asyncio.StreamReader()})()
    assert unusable(bare) == "connection._parser (NoneType) has no parse_error"


# --- hiredis_pubsub.py: the links' raw reads ---------------------------------------------------

RECHECK_PUBSUB = "recheck presence_svc/redis/hiredis_pubsub.py against"


def links_client(url: str, **options: Any) -> Any:
    """Built like redis/client.py's pub/sub client (RESP2, no retries)."""
    return aioredis.Redis.from_url(
        url, protocol=2, socket_keepalive=True, retry=Retry(NoBackoff(), 0), **options
    )


async def replies_until(raw: PubSubReplies, count: int) -> list[Any]:
    replies: list[Any] = []
    while len(replies) < count:
        replies += await asyncio.wait_for(raw.read(), 5)
    return replies


async def test_a_links_pubsub_connection_is_read_raw(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    client = links_client(cleanup_real_redis)
    publisher: Any = aioredis.Redis.from_url(cleanup_real_redis)
    pubsub = client.pubsub()
    channel = f"{key_prefix}:ch"
    try:
        await pubsub.subscribe(channel)
        reason = why_not_raw(pubsub.connection)
        assert reason is None, f"{VERSIONS}: {reason}; links read slowly now: {RECHECK_PUBSUB} it"
        raw = PubSubReplies.of(pubsub.connection)
        assert raw is not None
        assert await replies_until(raw, 1) == [[b"subscribe", channel.encode(), 1]]

        pipe = publisher.pipeline(transaction=False)
        for n in range(50):
            pipe.publish(channel, b"\x00payload %d" % n)
        assert await pipe.execute() == [1] * 50
        messages = await replies_until(raw, 50)
        assert messages == [
            [b"message", channel.encode(), b"\x00payload %d" % n] for n in range(50)
        ]

        await pubsub.ping()
        assert await replies_until(raw, 1) == [[b"pong", b""]]
        await pubsub.execute_command("GET", "x")  # refused while subscribed on RESP2
        [refused] = await replies_until(raw, 1)
        assert type(refused) is ResponseError, f"{VERSIONS}: parse_error gave {refused!r}"
    finally:
        await pubsub.aclose()
        await client.aclose()
        await publisher.aclose()


async def test_a_pubsub_connection_redis_py_reconnects_ends_its_raw_reader(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    """The links notice redis-py's own reconnects (which resubscribe nothing) as a lost link:
    the stream they read ends."""
    client = links_client(cleanup_real_redis)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(f"{key_prefix}:ch")
        raw = PubSubReplies.of(pubsub.connection)
        assert raw is not None, f"{VERSIONS}: {why_not_raw(pubsub.connection)}"
        await replies_until(raw, 1)
        await pubsub.connection.disconnect()
        await pubsub.connection.connect()
        with pytest.raises(RedisConnectionError):
            await replies_until(raw, 1)
        assert raw.stream is not pubsub.connection._reader, f"{VERSIONS}: the stream outlived it"
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_other_pubsub_connections_are_read_through_get_message(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    resp3: Any = aioredis.Redis.from_url(cleanup_real_redis, protocol=3)
    decoding = links_client(cleanup_real_redis, decode_responses=True)
    fake: Any = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        reasons = []
        for client in (resp3, decoding, fake):
            pubsub = client.pubsub()
            await pubsub.subscribe(f"{key_prefix}:ch")
            reasons.append(why_not_raw(pubsub.connection))
            assert PubSubReplies.of(pubsub.connection) is None
            await pubsub.aclose()
        assert reasons[0] == "connection.protocol is 3, not 2"
        assert reasons[1] == "connection.encoder decodes replies"
        assert reasons[2] is not None
    finally:
        for client in (resp3, decoding, fake):
            await client.aclose()


async def test_a_reply_cut_across_reads_waits_for_its_rest() -> None:
    stream = asyncio.StreamReader()
    parser = type("Parser", (), {"parse_error": staticmethod(ResponseError)})()
    writer = type("Writer", (), {"transport": None})()
    raw = PubSubReplies(
        type("Connection", (), {"_reader": stream, "_parser": parser, "_writer": writer})()
    )
    stream.feed_data(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nab")
    assert await raw.read() == []
    stream.feed_data(b"c\r\n*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nd\r\n-ERR no\r\n")
    first, second, error = await raw.read()
    assert (first, second) == ([b"message", b"ch", b"abc"], [b"message", b"ch", b"d"])
    assert type(error) is ResponseError
    stream.feed_eof()
    with pytest.raises(RedisConnectionError, match="closed"):
        await raw.read()


async def test_gather_lets_the_socket_fill_then_reads_it_in_one_go(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    client = links_client(cleanup_real_redis)
    publisher: Any = aioredis.Redis.from_url(cleanup_real_redis)
    pubsub = client.pubsub()
    channel = f"{key_prefix}:ch"
    try:
        await pubsub.subscribe(channel)
        raw = PubSubReplies.of(pubsub.connection)
        assert raw is not None, f"{VERSIONS}: {why_not_raw(pubsub.connection)}"
        await replies_until(raw, 1)
        gathering = asyncio.create_task(raw.gather(60))
        await asyncio.sleep(0)  # it starts: reading paused
        assert not raw.transport.is_reading()
        for n in range(20):  # one PUBLISH at a time: twenty separate arrivals
            assert await publisher.publish(channel, b"m%d" % n) == 1
        transport_socket = raw.transport.get_extra_info("socket")
        # A duplicate of its descriptor, to peek at what the kernel holds unread.
        with socket.fromfd(transport_socket.fileno(), socket.AF_INET, socket.SOCK_STREAM) as peer:

            def all_buffered() -> bool:  # Redis may write a message after the PUBLISH reply
                peeked = peer.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                return b"m19\r\n" in peeked

            await eventually_async(all_buffered, what="the twenty messages, still unread")
        gathering.cancel()  # as the links' poll timer may: reading resumes all the same
        with pytest.raises(asyncio.CancelledError):
            await gathering
        assert raw.transport.is_reading()
        replies = await asyncio.wait_for(raw.read(), 5)
        assert replies == [[b"message", channel.encode(), b"m%d" % n] for n in range(20)]

        raw.transport.pause_reading()  # paused by someone else: not gathered, not resumed
        await asyncio.wait_for(raw.gather(60), 1)
        assert not raw.transport.is_reading()
        raw.transport.resume_reading()
    finally:
        await pubsub.aclose()
        await client.aclose()
        await publisher.aclose()
