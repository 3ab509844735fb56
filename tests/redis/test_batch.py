"""Automatic pipelining: concurrent operations share pipelines, keep their order, fail alone."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MasterDownError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

import presence_svc.redis.batch as batch_module
from presence_svc.models import Holder, Lease
from presence_svc.redis.batch import Batcher, Command
from presence_svc.redis.calls import reachable, reachable_per_step
from presence_svc.redis.hiredis_replies import RawLink
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.store import StoreUnavailable
from tests.conftest import open_redis
from tests.support.store import NO_CURSOR, THRESHOLDS


@pytest.fixture(params=["fake", "real"])
async def any_redis(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Any]:
    """Single-Redis clients only: this module tests what a cluster has per shard."""
    async with open_redis(request.param, request, key_prefix) as client:
        yield client


SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture(autouse=True)
def link_writes_are_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """A linked connection's pipelines are written straight to its transport (RawLink.write),
    not through send_packed_command: they are reported to the connection's `wrote`, where a
    test's client (CountingPipelines) set one."""
    write = RawLink.write

    def seen(link: RawLink, payload: bytes) -> None:
        write(link, payload)
        wrote = getattr(link.connection, "wrote", None)
        if wrote is not None:
            wrote()

    monkeypatch.setattr(RawLink, "write", seen)


class CountingPipelines:
    """A client that counts the pipelines (writes) the batcher sends."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.pipelines = 0
        self.connection_pool = self

    def wrote(self) -> None:
        self.pipelines += 1

    async def get_connection(self) -> Any:
        connection = await self.redis.connection_pool.get_connection()
        send = connection.send_packed_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            result = await send(*args, **kwargs)
            self.wrote()
            return result

        connection.send_packed_command = counted
        connection.wrote = self.wrote  # linked: link_writes_are_seen
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
        # A real socket: read raw, not through read_response.
        assert batcher._link is not None
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


# --- deadlines, and every way Redis fails reported as StoreUnavailable -------------------------


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A loopback server that accepts connections and reads them, and never answers (a Redis
    frozen by SIGSTOP looks like this to its clients)."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_an_unanswered_batch_fails_at_its_deadline_and_so_do_those_behind_it() -> None:
    async with silent_server() as url:
        # No socket timeout of its own: the deadline must come from the batcher.
        client = aioredis.Redis.from_url(url, socket_timeout=None, socket_connect_timeout=1)
        try:
            batcher = Batcher(client, [], timeout=0.3)
            started = time.monotonic()
            first = batcher.run([("PING",)])
            await asyncio.sleep(0.1)  # queued later: its deadline is later too
            second = batcher.run([("PING",)])
            results = await asyncio.gather(first, second, return_exceptions=True)
            took = time.monotonic() - started
            assert all(isinstance(r, RedisTimeoutError) for r in results), results
            assert 0.3 <= took < 1.5, took
            await batcher.close()
        finally:
            await client.aclose()


async def test_an_operation_past_its_deadline_is_never_sent(
    any_redis: Any, key_prefix: str
) -> None:
    counting = CountingPipelines(any_redis)
    batcher = Batcher(counting, [], timeout=5)
    key = f"{key_prefix}:late"
    late = batcher.run([("INCR", key)], deadline=asyncio.get_running_loop().time() - 1)
    with pytest.raises(RedisTimeoutError):
        await late
    assert counting.pipelines == 0
    assert await any_redis.get(key) is None
    await batcher.close()


async def test_a_batch_cut_by_its_deadline_leaves_no_reply_to_the_next(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    # The first batch blocks in Redis for a second; the second, behind it on the same
    # connection, runs out of time while it waits its turn. Its replies are still owed on that
    # connection: whatever comes next must not read them as its own.
    client = aioredis.Redis.from_url(cleanup_real_redis)
    try:
        batcher = Batcher(client, [], timeout=5)
        loop = asyncio.get_running_loop()
        blocked = batcher.run([("BLPOP", f"{key_prefix}:never", 1)])
        await asyncio.sleep(0.05)  # its own pipeline, on the wire first
        cut = batcher.run([("ECHO", "cut")], deadline=loop.time() + 0.2)
        with pytest.raises(RedisTimeoutError):
            await cut
        with contextlib.suppress(RedisConnectionError):
            await blocked  # may fail with the connection it shared
        assert await batcher.run([("ECHO", "mine")]) == [b"mine"]
        await batcher.close()
    finally:
        await client.aclose()


class Failing:
    """A store-like owner whose calls fail with `error` (reachable counts on redis_errors)."""

    call_timeout = 5.0

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.redis_errors = 0

    @reachable
    async def call(self) -> None:
        raise self.error

    @reachable_per_step
    async def stepwise(self) -> None:
        raise self.error


def _from(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


UNAVAILABLE_ERRORS = [
    RedisConnectionError("Connection closed by server."),
    RedisTimeoutError("Timeout reading from socket"),
    ConnectionError("the Redis connection was lost before these replies"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError(),  # asyncio.timeout's
    OSError(113, "No route to host"),
    ClusterDownError("CLUSTERDOWN The cluster is down"),
    MasterDownError("MASTERDOWN Link with MASTER is down"),
    TryAgainError("TRYAGAIN"),
    SlotNotCoveredError('Slot "12" is not covered by the cluster.'),
    ClusterError("TTL exhausted."),
    _from(
        RedisClusterException("Redis Cluster cannot be connected. Please provide ..."),
        RedisConnectionError("Error 111 connecting to 127.0.0.1:7000. Connection refused."),
    ),
    RedisClusterException("All slots are not covered after query all startup_nodes. 1 of ..."),
]


@pytest.mark.parametrize("error", UNAVAILABLE_ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("method", ["call", "stepwise"])
async def test_every_way_redis_fails_is_store_unavailable(
    error: BaseException, method: str
) -> None:
    owner = Failing(error)
    with pytest.raises(StoreUnavailable) as caught:
        await getattr(owner, method)()
    assert caught.value.__cause__ is error
    assert str(caught.value)  # says something, even for an exception without a message
    assert owner.redis_errors == 1


@pytest.mark.parametrize(
    "error",
    [
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        ValueError("a script call without keys cannot be routed"),
        RedisClusterException("ZADD - all keys must map to the same key slot"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_other_errors_are_not_store_unavailable(error: BaseException) -> None:
    owner = Failing(error)
    with pytest.raises(type(error)):
        await owner.call()
    assert owner.redis_errors == 0


async def test_a_store_call_has_a_deadline_as_a_whole() -> None:
    class Slow:
        call_timeout = 0.2
        redis_errors = 0

        @reachable
        async def call(self) -> None:
            await asyncio.sleep(0.15)  # each step within the deadline, both not
            await asyncio.sleep(0.15)

    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await Slow().call()
    assert 0.2 <= time.monotonic() - started < 0.29


# --- closing, and releases after NOSCRIPT --------------------------------------------------------


class SignalledSends(CountingPipelines):
    """CountingPipelines that also says when a pipeline has been written."""

    def __init__(self, redis: Any) -> None:
        super().__init__(redis)
        self.sent = asyncio.Event()

    def wrote(self) -> None:
        super().wrote()
        self.sent.set()


async def test_close_hands_back_a_closed_connection_once_its_batches_have_ended(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    # A pool of one connection that the batcher does not own (as with create_app(redis=...)):
    # whoever takes it after close must not read the replies owed to the batcher's batch.
    client = aioredis.Redis.from_url(cleanup_real_redis, max_connections=1)
    try:
        sends = SignalledSends(client)
        batcher = Batcher(sends, [], timeout=5)
        blocked = batcher.run([("BLPOP", f"{key_prefix}:never", 1)])
        await sends.sent.wait()  # on the wire; its reply comes in a second
        await batcher.close()
        assert blocked.done()  # ended before its connection went back
        with pytest.raises(RedisConnectionError):
            await blocked
        assert await asyncio.wait_for(client.echo("mine"), 5) == b"mine"
    finally:
        await client.aclose()


class Restarted:
    """A client of a Redis that restarted, its scripts gone (here: the store's script texts
    are ones it has never seen), and went away again before they could be loaded."""

    def __init__(self, redis: Any, tag: str) -> None:
        self._redis = redis
        self._tag = tag
        self.connection_pool = redis.connection_pool

    def register_script(self, source: str) -> Any:
        return self._redis.register_script(f"-- {self._tag}\n{source}")

    async def script_load(self, source: str) -> Any:
        raise RedisConnectionError("Redis went away again")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)


async def test_a_release_whose_scripts_are_missing_leaves_its_lease_listed(
    any_redis: Any, key_prefix: str, t0: int
) -> None:
    keys = Keys(key_prefix)
    store = RedisStore(any_redis, keys, THRESHOLDS)
    lease = Lease("s1", "alice", Holder("n1", "ws1"))
    await store.heartbeat("alice", "s1", NO_CURSOR, t0, lease.holder)
    restarted = RedisStore(Restarted(any_redis, key_prefix), keys, THRESHOLDS)
    with pytest.raises(StoreUnavailable):
        await restarted.release([lease], t0 + 10_000, t0)
    # Nothing was released, so the lease must still be listed: were the node to die now, a
    # reaper would still find it and end the session.
    sk = keys.study("s1")
    assert await any_redis.smembers(keys.node_leases("n1")) == {b"s1 alice ws1"}
    assert await any_redis.smembers(sk.conns("alice")) == {b"ws1"}
    assert await store.release([lease], t0 + 10_000, t0) == 1
    assert await any_redis.exists(keys.node_leases("n1")) == 0
    assert await any_redis.zscore(sk.leaving, "alice") == t0 + 10_000


# --- the linked path: pipelines written by the flush itself, replies read as they arrive -------


async def linked(batcher: Batcher) -> RawLink:
    """The batcher's link, once one operation has connected it."""
    assert await batcher.run([("PING",)]) in ([b"PONG"], [b"OK"])
    assert batcher._link is not None, "a real socket should be linked"
    return batcher._link


async def test_linked_pipelines_written_back_to_back_run_in_the_order_queued(
    cleanup_real_redis: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_module, "MAX_BATCH", 3)
    client = aioredis.Redis.from_url(cleanup_real_redis)
    try:
        counting = CountingPipelines(client)
        batcher = Batcher(counting, [])
        await linked(batcher)
        key = f"{key_prefix}:order"
        operations = [batcher.run([("RPUSH", key, n), ("LLEN", key)]) for n in range(12)]
        await asyncio.sleep(0)  # the flush: four pipelines written, none answered yet
        assert counting.pipelines == 1 + batch_module.MAX_IN_FLIGHT
        assert not any(operation.done() for operation in operations)
        replies = await asyncio.gather(*operations)
        assert [int(length) for _, length in replies] == list(range(1, 13))
        assert [int(n) for n in await client.lrange(key, 0, -1)] == list(range(12))
        assert counting.pipelines == 1 + 4
        await batcher.close()
    finally:
        await client.aclose()


class Answering:
    """A loopback server that answers +OK to every command until told to go silent (a Redis
    frozen by SIGSTOP after the batcher had connected looks like that)."""

    def __init__(self) -> None:
        self.silent = False
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        commands = hiredis.Reader()
        while data := await reader.read(65536):
            commands.feed(data)
            while commands.gets() is not False:
                if not self.silent:
                    writer.write(b"+OK\r\n")


@contextlib.asynccontextmanager
async def answering_client(call_timeout: float) -> AsyncIterator[tuple[Answering, Batcher]]:
    answering = Answering()
    server = await asyncio.start_server(answering.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # RESP2, no socket timeout of its own: the deadline must come from the batcher.
    client = aioredis.Redis(port=port, protocol=2, socket_timeout=None, socket_connect_timeout=1)
    batcher = Batcher(client, [], timeout=call_timeout)
    try:
        yield answering, batcher
    finally:
        await batcher.close()
        await client.aclose()
        for writer in answering.writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_linked_pipeline_unanswered_fails_at_its_deadline_and_is_dropped() -> None:
    async with answering_client(call_timeout=0.3) as (answering, batcher):
        await linked(batcher)
        answering.silent = True
        started = time.monotonic()
        first = batcher.run([("PING",)])
        await asyncio.sleep(0.1)
        second = batcher.run([("PING",)])  # its deadline is later, but its connection goes
        results = await asyncio.gather(first, second, return_exceptions=True)
        took = time.monotonic() - started
        assert isinstance(results[0], RedisTimeoutError), results
        assert isinstance(results[1], RedisConnectionError), results
        assert 0.3 <= took < 0.4 + 0.5, took
        assert batcher._link is None
        answering.silent = False
        assert await batcher.run([("PING",)]) == [b"OK"]  # on a connection of its own
        assert answering.connections == 2


async def test_the_deadline_timer_follows_the_earliest_deadline_owed() -> None:
    async with answering_client(call_timeout=0.6) as (answering, batcher):
        loop = asyncio.get_running_loop()
        await linked(batcher)  # its deadline armed the timer, for 0.6 s from now
        answering.silent = True
        started = time.monotonic()
        early = batcher.run([("PING",)], deadline=loop.time() + 0.1)  # earlier: re-armed
        with pytest.raises(RedisTimeoutError):
            await early
        assert 0.1 <= time.monotonic() - started < 0.5
        answering.silent = False
        await linked(batcher)
        await asyncio.sleep(0.3)
        answering.silent = True
        started = time.monotonic()
        # Due 0.6 s from now, after the timer armed by the answered PING fires (0.3 s from
        # now): that must not fail it, but arm itself again for this one.
        late = batcher.run([("PING",)])
        await asyncio.sleep(0.45)
        assert not late.done()
        with pytest.raises(RedisTimeoutError):
            await late
        assert 0.6 <= time.monotonic() - started < 1.2


async def test_missing_scripts_are_loaded_and_a_linked_operation_sent_again(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    client = aioredis.Redis.from_url(cleanup_real_redis)
    try:
        source = f"-- {key_prefix}\n{SCRIPT}"
        sha = hashlib.sha1(source.encode()).hexdigest()
        assert await client.script_exists(sha) == [False]
        batcher = Batcher(client, [source])
        await linked(batcher)
        key = f"{key_prefix}:s"
        scripted, plain, failing = await asyncio.gather(
            batcher.run([("INCR", f"{key_prefix}:before"), ("EVALSHA", sha, 1, key, 7)]),
            batcher.run([("INCRBY", f"{key_prefix}:plain", 2)]),
            batcher.run([("EVALSHA", "0" * 40, 0)]),  # loaded by nobody: NOSCRIPT again
            return_exceptions=True,
        )
        assert scripted == [2, 7] and plain == [2]  # the whole operation ran again
        assert isinstance(failing, NoScriptError)
        assert int(await client.get(key)) == 7  # the script ran once
        assert batcher._in_flight == 0
        assert await batcher.run([("EVALSHA", sha, 1, key, 1)]) == [8]
        await batcher.close()
    finally:
        await client.aclose()


async def test_a_linked_connection_lost_fails_what_is_owed_and_the_next_reconnects(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    client = aioredis.Redis.from_url(cleanup_real_redis)
    killer = aioredis.Redis.from_url(cleanup_real_redis)
    try:
        batcher = Batcher(client, [])
        await linked(batcher)
        [connection_id] = await batcher.run([("CLIENT", "ID")])
        blocked = batcher.run([("BLPOP", f"{key_prefix}:never", 2)])
        behind = batcher.run([("INCR", f"{key_prefix}:n")])
        await asyncio.sleep(0.05)  # both on the wire
        await killer.client_kill_filter(_id=connection_id)
        results = await asyncio.gather(blocked, behind, return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results), results
        assert batcher._in_flight == 0
        [other_id] = await batcher.run([("CLIENT", "ID")])
        assert other_id != connection_id
        await batcher.close()
    finally:
        await killer.aclose()
        await client.aclose()


async def test_close_fails_linked_pipelines_in_flight_and_then_hands_back(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    client = aioredis.Redis.from_url(cleanup_real_redis, max_connections=1)
    try:
        batcher = Batcher(client, [], timeout=5)
        await linked(batcher)
        waiting = [batcher.run([("BLPOP", f"{key_prefix}:never", 1)]) for _ in range(3)]

        async def caller() -> Any:
            return await asyncio.gather(*waiting, return_exceptions=True)

        callers = asyncio.create_task(caller())
        await asyncio.sleep(0.05)  # on the wire, their replies due in a second
        await batcher.close()
        results = await callers  # not cancelled: failed
        assert all(isinstance(r, RedisConnectionError) for r in results), results
        assert await asyncio.wait_for(client.echo("mine"), 5) == b"mine"
    finally:
        await client.aclose()


async def test_resp3_pushes_on_a_link_go_to_their_handlers_not_to_a_pipeline(
    cleanup_real_redis: str, key_prefix: str
) -> None:
    client = aioredis.Redis.from_url(cleanup_real_redis, protocol=3)
    other = aioredis.Redis.from_url(cleanup_real_redis)
    try:
        batcher = Batcher(client, [])
        link = await linked(batcher)
        pushed: list[Any] = []

        async def invalidated(message: Any) -> None:
            await asyncio.sleep(0.01)  # the replies after it wait for it
            pushed.append(message)

        link.connection._parser.set_invalidation_push_handler(invalidated)
        key = f"{key_prefix}:tracked"
        assert await batcher.run([("CLIENT", "TRACKING", "ON"), ("GET", key)]) == [b"OK", None]
        await other.set(key, "changed")
        assert await batcher.run([("ECHO", "after")]) == [b"after"]
        assert len(pushed) == 1 and pushed[0][0] == b"invalidate", pushed
        assert batcher._link is link
        await batcher.close()
    finally:
        await client.aclose()
        await other.aclose()


async def test_a_connection_with_a_write_of_its_own_is_written_through_it(
    cleanup_real_redis: str,
) -> None:
    # sentinel.py's PrimaryConnection checks its primary in send_packed_command: not linked.
    writes: list[Any] = []

    class Checked(aioredis.Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            writes.append(command)
            await super().send_packed_command(command, check_health)

    client = aioredis.Redis.from_url(cleanup_real_redis, connection_class=Checked)
    try:
        batcher = Batcher(client, [])
        assert await batcher.run([("ECHO", "a")]) == [b"a"]
        assert await batcher.run([("ECHO", "b"), ("ECHO", "c")]) == [b"b", b"c"]
        assert batcher._link is None and batcher._raw is not None
        # (The connection's own handshake wrote first.)
        assert [bytes(write).count(b"ECHO") for write in writes[-2:]] == [1, 2]
        await batcher.close()
    finally:
        await client.aclose()


class SlowToConnect(CountingPipelines):
    async def get_connection(self) -> Any:
        await asyncio.sleep(0.2)
        return await super().get_connection()


async def test_a_pipeline_cut_short_waiting_to_be_written_leaves_the_fast_path_open(
    cleanup_real_redis: str,
) -> None:
    client = aioredis.Redis.from_url(cleanup_real_redis)
    try:
        loop = asyncio.get_running_loop()
        counting = SlowToConnect(client)
        batcher = Batcher(counting, [])
        first = batcher.run([("PING",)])
        await asyncio.sleep(0)  # flushed: its task is connecting
        second = batcher.run([("PING",)], deadline=loop.time() + 0.05)  # waits its turn
        with pytest.raises(RedisTimeoutError):
            await second
        assert await first == [b"PONG"]
        third = batcher.run([("PING",)])
        await asyncio.sleep(0)
        assert counting.pipelines == 2 and not batcher._tasks  # written by the flush itself
        assert await third == [b"PONG"]
        await batcher.close()
    finally:
        await client.aclose()
