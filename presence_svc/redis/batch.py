"""Automatic pipelining: Redis calls issued by concurrent tasks travel in shared pipelines.

A heartbeat is two or three commands; sending each heartbeat as its own round trip costs
Python CPU per call on the node and per request on Redis. The batcher queues each operation
(an ordered list of commands) and sends everything queued since the last flush as one
pipeline, with a few pipelines in flight at most: the busier the node, the larger the batches.

The commands of one operation stay together and in order, and operations reach Redis in the
order they were queued: a client's heartbeats need not wait for each other. Scripts are
called by SHA; when Redis answers NOSCRIPT (it restarted or its scripts were flushed) they
are loaded again and the operations that hit it are sent once more (after those queued
meanwhile), which is why an operation must be safe to
repeat after a partial run (ours are: their plain commands are idempotent, and no script
runs when it is missing).

Every operation has a deadline (`timeout` seconds after it was queued, unless its caller gives
one): a pipeline must be answered by the earliest deadline among its operations, or it fails
with TimeoutError and its connection is dropped (replies still owed on it could no longer be
matched to their commands). An operation whose deadline passed before it could be sent fails
without being sent. So a frozen Redis costs a caller its deadline, never more.

Replies are parsed by a hiredis reader fed straight from the connection's stream, many per
read (hiredis_replies.py, the one module that touches redis-py's connection internals); error
replies become the same exception types redis-py raises. Connections without a plain asyncio
stream (fakeredis) are read through `read_response`, one reply at a time.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from presence_svc.redis.hiredis_replies import RawReplies

Command = tuple[Any, ...]
# An operation's commands, the future of their replies, and its deadline (the loop's time).
_Operation = tuple[list[Command], "asyncio.Future[list[Any]]", float]

MAX_IN_FLIGHT = 4
MAX_BATCH = 1024  # operations per pipeline
TIMEOUT = 5.0  # seconds, by default, from queueing an operation to its last reply


class Batcher:
    def __init__(self, redis: Any, scripts: Sequence[str], *, timeout: float = TIMEOUT) -> None:
        self._redis = redis
        self._scripts = list(scripts)  # sources, loaded again after NOSCRIPT
        self._timeout = timeout
        self._queue: list[_Operation] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._write_lock = asyncio.Lock()
        self._connection: Any = None
        self._raw: RawReplies | None = None  # for self._connection, when it can be read raw
        self._turn: asyncio.Future[None] | None = (
            None  # done when the last batch's replies are read
        )

    def run(
        self, commands: list[Command], deadline: float | None = None
    ) -> asyncio.Future[list[Any]]:
        """Send one operation's commands (in order, in a shared pipeline); await their replies.

        A command's error reply is raised (the first, if several failed); no reply by
        `deadline` (the loop's time; by default `timeout` seconds from now) raises
        redis-py's TimeoutError. The operation is queued by this call, not when the future is
        awaited; a future rather than a coroutine spares every operation a coroutine frame to
        create and resume.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if deadline is None:
            deadline = loop.time() + self._timeout
        self._queue.append((commands, future, deadline))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Let every task that is ready in this loop iteration add its operation first.
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue and self._in_flight < MAX_IN_FLIGHT:
            if len(self._queue) <= MAX_BATCH:
                batch, self._queue = self._queue, []
            else:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._in_flight += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, batch: list[_Operation]) -> None:
        batch = self._unexpired(batch)
        if not batch:
            return
        try:
            async with asyncio.timeout_at(min(deadline for _, _, deadline in batch)):
                replies = await self._replies(batch)
        except BaseException as exc:
            failure = self._timed_out() if isinstance(exc, TimeoutError) else exc
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        if replies is None:
            return
        for (_, future, _), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            error = next((r for r in reply if isinstance(r, Exception)), None)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(reply)

    def _unexpired(self, batch: list[_Operation]) -> list[_Operation]:
        """`batch` less the operations already past their deadline, which fail unsent."""
        now = asyncio.get_running_loop().time()
        if all(deadline > now for _, _, deadline in batch):
            return batch
        kept: list[_Operation] = []
        for operation in batch:
            if operation[2] > now:
                kept.append(operation)
            elif not operation[1].done():
                operation[1].set_exception(self._timed_out())
        return kept

    def _timed_out(self) -> RedisTimeoutError:
        return RedisTimeoutError(f"no reply from Redis within {self._timeout:g}s")

    async def _replies(self, batch: list[_Operation]) -> list[list[Any]] | None:
        """Each operation's replies; None if there was no error reply (the results are set)."""
        flat, failed = await self._execute([commands for commands, _, _ in batch])
        if not failed:
            position = 0
            for commands, future, _ in batch:
                end = position + len(commands)
                if not future.done():
                    future.set_result(flat[position:end])
                position = end
            return None
        replies = _split([commands for commands, _, _ in batch], flat)
        missing = [i for i, reply in enumerate(replies) if _noscript(reply)]
        if missing:
            for source in self._scripts:
                await self._redis.script_load(source)
            operations = [batch[i][0] for i in missing]
            again, _ = await self._execute(operations)
            for i, reply in zip(missing, _split(operations, again), strict=True):
                replies[i] = reply
        return replies

    async def _execute(self, operations: list[list[Command]]) -> tuple[list[Any], bool]:
        """Every reply of `operations`, in order, and whether any is an error reply."""
        # Packed by hiredis in C and written on the batcher's own connection: redis-py's
        # pipeline spends more CPU encoding commands than everything else in a heartbeat.
        # Batches are written in the order they were queued (the lock is FIFO) and their
        # replies read in that order, so operations run in Redis in the order they were
        # queued, even with several batches in flight.
        pack = hiredis.pack_command
        payload = b"".join([pack(command) for operation in operations for command in operation])
        count = sum([len(operation) for operation in operations])
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            async with self._write_lock:
                if self._connection is None:
                    self._connection = await self._redis.connection_pool.get_connection()
                connection = self._connection
                try:
                    await connection.send_packed_command(payload, check_health=False)
                except BaseException:
                    await self._drop(connection)
                    raise
                previous, self._turn = self._turn, mine
            try:
                if previous is not None:
                    await previous
                if self._connection is not connection:
                    raise RedisConnectionError("the Redis connection was lost before these replies")
                # One deadline for the whole batch (_send's): a timer per reply costs more
                # than a reply.
                return await self._read(connection, count)
            except BaseException:
                # Cut short (an error, the deadline) while our replies are still owed on it:
                # whoever reads it next would take them for theirs.
                await self._drop(connection)
                raise
        finally:
            if not mine.done():
                mine.set_result(None)

    async def _read(self, connection: Any, count: int) -> tuple[list[Any], bool]:
        raw = self._raw
        if raw is None or not raw.reads(connection):
            raw = self._raw = RawReplies.of(connection)
        if raw is not None:
            return await raw.read(count)
        flat: list[Any] = []
        failed = False
        for _ in range(count):
            try:
                flat.append(await connection.read_response(timeout=math.inf))
            except ResponseError as error:  # an error reply: the stream is intact
                flat.append(error)
                failed = True
        return flat, failed

    async def _drop(self, connection: Any) -> None:
        # Replies still owed on it can no longer be matched to their commands.
        if self._connection is connection:
            self._connection = None
            self._raw = None
            await connection.disconnect()
            await self._redis.connection_pool.release(connection)

    async def close(self) -> None:
        """Close the batcher's connection and give it back (at shutdown, or when a cluster
        node's batcher retires), once none of the batcher's batches can read it any more.

        Batches still in flight fail (ConnectionError, so StoreUnavailable to their callers).
        """
        # The pool may be someone else's (create_app(redis=...)): a connection handed back
        # with replies still owed on it would give them to its next user. So it is closed
        # first, which ends the reads in flight on it at once, and given back only when every
        # send task has ended (a task that was waiting for the write lock may have opened
        # another meanwhile: that one goes the same way). Not cancelled: a cluster batcher
        # retires while its callers run on, and a cancel they did not ask for would end them.
        while self._connection is not None or self._tasks:
            connection, self._connection = self._connection, None
            self._raw = None
            if connection is not None:
                await connection.disconnect()
            if self._tasks:
                await asyncio.wait(list(self._tasks))
            if connection is not None:
                await self._redis.connection_pool.release(connection)


def _split(operations: list[list[Command]], flat: list[Any]) -> list[list[Any]]:
    out: list[list[Any]] = []
    position = 0
    for commands in operations:
        out.append(flat[position : position + len(commands)])
        position += len(commands)
    return out


def _noscript(replies: list[Any]) -> bool:
    return any(isinstance(reply, NoScriptError) for reply in replies)
