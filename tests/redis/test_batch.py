"""Automatic pipelining: concurrent operations share pipelines, keep their order, fail alone."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

import presence_svc.redis.batch as batch_module
from presence_svc.redis.batch import Batcher, Command
from tests.conftest import open_redis


@pytest.fixture(params=["fake", "real"])
async def any_redis(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Any]:
    """Single-Redis clients only: this module tests what a cluster has per shard."""
    async with open_redis(request.param, request, key_prefix) as client:
        yield client


SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


class CountingPipelines:
    """A client that counts the pipelines (writes) the batcher sends."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.pipelines = 0
        self.connection_pool = self

    async def get_connection(self) -> Any:
        connection = await self.redis.connection_pool.get_connection()
        send = connection.send_packed_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.pipelines += 1
            return await send(*args, **kwargs)

        connection.send_packed_command = counted
        return connection

    async def release(self, connection: Any) -> None:
        await self.redis.connection_pool.release(connection)

    async def script_load(self, source: str) -> Any:
        return await self.redis.script_load(source)


async def test_concurrent_operations_share_one_pipeline(any_redis: Any, key_prefix: str) -> None:
    counting = CountingPipelines(any_redis)
    batcher = Batcher(counting, [])
    key = f"{key_prefix}:n"
    replies = await asyncio.gather(
        *(batcher.run([("INCRBY", key, 1), ("GET", key)]) for _ in range(100))
    )
    assert counting.pipelines == 1
    # Each operation's commands ran back to back: GET sees its own INCRBY.
    assert sorted(int(incr) for incr, _ in replies) == list(range(1, 101))
    assert all(int(got) == int(incr) for incr, got in replies)


async def test_pipelines_in_flight_are_bounded(
    any_redis: Any, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_module, "MAX_BATCH", 10)
    counting = CountingPipelines(any_redis)
    batcher = Batcher(counting, [])
    replies = await asyncio.gather(
        *(batcher.run([("INCRBY", f"{key_prefix}:m", 1)]) for _ in range(95))
    )
    assert sorted(int(r) for [r] in replies) == list(range(1, 96))
    assert counting.pipelines == 10


async def test_operations_reach_redis_in_the_order_they_were_queued(
    any_redis: Any, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small batches, several in flight: a client's writes must still land in order.
    monkeypatch.setattr(batch_module, "MAX_BATCH", 3)
    batcher = Batcher(any_redis, [])
    key = f"{key_prefix}:last"
    # Queued by the call itself (run returns a future), in this order.
    operations = [batcher.run([("SET", key, n)]) for n in range(200)]
    await asyncio.gather(*operations)
    assert int(await any_redis.get(key)) == 199
    await batcher.close()


async def test_an_error_reply_fails_only_its_operation(any_redis: Any, key_prefix: str) -> None:
    batcher = Batcher(any_redis, [])
    await any_redis.set(f"{key_prefix}:text", "not a number")
    good, bad = await asyncio.gather(
        batcher.run([("INCRBY", f"{key_prefix}:ok", 5)]),
        batcher.run([("INCRBY", f"{key_prefix}:text", 1)]),
        return_exceptions=True,
    )
    assert good == [5]
    assert isinstance(bad, ResponseError)


async def test_missing_scripts_are_loaded_and_the_operation_retried(
    any_redis: Any, key_prefix: str
) -> None:
    # A script this server has never seen (never SCRIPT FLUSH a Redis others may share).
    source = f"-- {key_prefix}\n{SCRIPT}"
    sha = hashlib.sha1(source.encode()).hexdigest()
    assert await any_redis.script_exists(sha) == [False]
    batcher = Batcher(any_redis, [source])
    key = f"{key_prefix}:s"
    [value] = await batcher.run([("EVALSHA", sha, 1, key, 7)])
    assert value == 7 and int(await any_redis.get(key)) == 7  # ran once, not twice


async def test_a_lost_connection_fails_every_waiting_operation() -> None:
    class Broken:
        connection_pool = property(lambda self: self)

        async def get_connection(self) -> Any:
            raise ConnectionError("gone")

    batcher = Batcher(Broken(), [])
    results = await asyncio.gather(
        *(batcher.run([("PING",)]) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionError) for r in results)


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("decode", [False, True])
async def test_raw_replies_are_those_redis_py_reads(
    cleanup_real_redis: str, key_prefix: str, protocol: int, decode: bool
) -> None:
    # Replies are parsed straight off the socket (batch.py); they must be exactly what
    # redis-py's read_response gives for the same commands, in RESP2 and RESP3, bytes or text.
    client = aioredis.Redis.from_url(cleanup_real_redis, protocol=protocol, decode_responses=decode)
    try:
        await client.hset(f"{key_prefix}:h", mapping={"a": "1", "b": "é"})
        await client.sadd(f"{key_prefix}:s", "x")
        await client.zadd(f"{key_prefix}:z", {"m": 1.5})
        commands: list[Command] = [
            ("HGETALL", f"{key_prefix}:h"),
            ("SMEMBERS", f"{key_prefix}:s"),
            ("ZRANGE", f"{key_prefix}:z", 0, -1, "WITHSCORES"),
            ("GET", f"{key_prefix}:missing"),
            ("EVAL", "return {1, 'two', {3}}", 0),
            ("PING",),
        ]
        batcher = Batcher(client, [])
        got = await batcher.run(commands)
        assert batcher._raw is not None  # a real socket: read raw, not through read_response
        connection = await client.connection_pool.get_connection()
        try:
            expected = []
            for command in commands:
                await connection.send_command(*command)
                expected.append(await connection.read_response())
        finally:
            await client.connection_pool.release(connection)
        assert got == expected
        await batcher.close()
    finally:
        await client.aclose()


async def test_a_connection_closed_by_the_server_fails_its_batch_then_reconnects(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    client = aioredis.Redis.from_url(cleanup_real_redis)
    killer = aioredis.Redis.from_url(cleanup_real_redis)
    try:
        batcher = Batcher(client, [])
        key = f"{key_prefix}:n"
        [connection_id] = await batcher.run([("CLIENT", "ID")])
        await killer.client_kill_filter(_id=connection_id)
        with pytest.raises(RedisConnectionError):
            await batcher.run([("INCR", key)])
        # A fresh connection (and a fresh reader for its stream) for what follows.
        assert await batcher.run([("INCR", key)]) == [1]
        [other_id] = await batcher.run([("CLIENT", "ID")])
        assert other_id != connection_id
        await batcher.close()
    finally:
        await killer.aclose()
        await client.aclose()
