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
matched to their commands; the other pipelines still owed on it fail with ConnectionError).
An operation whose deadline passed before it could be sent fails without being sent. So a
frozen Redis costs a caller its deadline, never more. A connection lost while nothing was owed
on it fails the next pipeline (ConnectionError), as a write on it would have; the one after
that reconnects.

Most pipelines cost no task, no lock and no timer of their own: the loop callback that flushes
the queue packs them with hiredis (in C) and writes them straight to the connection's
transport (no drain to wait for: at most MAX_IN_FLIGHT pipelines are ever buffered), so
successive pipelines are written in the order they were queued; the transport's
data callback parses their replies as they arrive (hiredis_replies.RawLink, many per read) and
hands them to the pipelines awaiting them, in the order those were written; one timer, armed
for the earliest deadline among those pipelines, watches them all. The task, lock, futures and
timeout of every pipeline were most of a lone call's CPU: a lone `run` of one PING took
193-288 us of process CPU with them and 85-136 us without (uvloop, the 2-core test VM).

The slower way, a task per pipeline, for the rest: getting a connection (the first time, or
after a drop), sending again after NOSCRIPT, and connections that cannot be linked. Those are
read one batch after another, by a hiredis reader fed from their stream where they have one
(hiredis_replies.RawReplies: a connection class that writes through a send_packed_command of
its own, as sentinel.py's does) and through `read_response`, one reply at a time, otherwise
(fakeredis). hiredis_replies.py is the one module that touches redis-py's connection
internals; error replies become the same exception types redis-py raises.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from presence_svc.redis.hiredis_replies import RawLink, RawReplies

log = logging.getLogger(__name__)

Command = tuple[Any, ...]
# An operation's commands, the future of their replies, and its deadline (the loop's time).
_Operation = tuple[list[Command], "asyncio.Future[list[Any]]", float]

MAX_IN_FLIGHT = 4
MAX_BATCH = 1024  # operations per pipeline
TIMEOUT = 5.0  # seconds, by default, from queueing an operation to its last reply

_LOST = "the Redis connection was lost before these replies"


class _Owed:
    """A pipeline written on the batcher's link, its replies still (partly) to come."""

    __slots__ = ("batch", "count", "deadline", "failed", "replies", "waiter")

    def __init__(
        self,
        batch: list[_Operation] | None,
        waiter: asyncio.Future[tuple[list[Any], bool]] | None,
        count: int,
        deadline: float,
    ) -> None:
        self.batch = batch  # settled as its replies come in; or, for _execute, None and
        self.waiter = waiter  # the future of every reply and whether any is an error
        self.count = count
        self.deadline = deadline
        self.replies: list[Any] = []
        self.failed = False


class Batcher:
    def __init__(self, redis: Any, scripts: Sequence[str], *, timeout: float = TIMEOUT) -> None:
        self._redis = redis
        self._scripts = list(scripts)  # sources, loaded again after NOSCRIPT
        self._timeout = timeout
        self._queue: list[_Operation] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()  # sending, sending again, handing back
        self._connection: Any = None
        # For self._connection where it is linked: what is owed on it, in the order written,
        # and the timer for its earliest deadline (or earlier: it is re-armed when it fires).
        self._link: RawLink | None = None
        self._owed: deque[_Owed] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        # Slow-path writers still to write: the flush must not write ahead of them.
        self._behind = 0
        self._write_lock = asyncio.Lock()  # FIFO: slow-path writers in the order they came
        self._handing_back: set[asyncio.Task[None]] = set()
        self._unreported: Exception | None = None  # the loss of a connection nothing was owed on
        # For self._connection where it is not linked.
        self._raw: RawReplies | None = None  # where it can be read raw
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
            link = self._link
            if link is not None and link.closing():
                self._lose(link, RedisConnectionError("Connection closed by server."))
                link = None
            if link is not None and not self._behind:
                batch = self._unexpired(batch)
                if batch:
                    self._in_flight += 1
                    self._write(link, batch)
                continue
            if self._unreported is not None:
                error, self._unreported = self._unreported, None
                self._fail_operations(batch, error)
                continue
            self._in_flight += 1
            self._behind += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._landed()

    def _landed(self) -> None:
        """A pipeline is over (answered, failed, or sent again and answered)."""
        self._in_flight -= 1
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _write(self, link: RawLink, batch: list[_Operation]) -> None:
        pack = hiredis.pack_command
        if len(batch) == 1:
            commands, _, deadline = batch[0]
            payload = b"".join([pack(command) for command in commands])
            count = len(commands)
        else:
            payload = b"".join([pack(command) for commands, _, _ in batch for command in commands])
            count = sum([len(commands) for commands, _, _ in batch])
            deadline = min([deadline for _, _, deadline in batch])
        self._owe(link, _Owed(batch, None, count, deadline), payload)

    def _owe(self, link: RawLink, owed: _Owed, payload: bytes) -> None:
        self._owed.append(owed)  # before writing: the reply may come before the write returns
        try:
            link.write(payload)
        except Exception as exc:  # uvloop refuses writes on a handle already closed
            self._lose(link, RedisConnectionError(f"Error while writing to Redis: {exc}"))
            return
        if owed.deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = owed.deadline
            self._timer = asyncio.get_running_loop().call_at(owed.deadline, self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        if not self._owed or self._link is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = min([owed.deadline for owed in self._owed])
        if earliest > now:
            self._timer_at = earliest
            self._timer = loop.call_at(earliest, self._expire)
            return
        self._lose(self._link, RedisConnectionError(_LOST), now)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf

    def _received(self, link: RawLink) -> None:
        if link is not self._link:
            return  # dropped: what it still brings is nobody's
        owed = self._owed
        try:
            while owed:
                entry = owed[0]
                if link.take(entry.replies, entry.count):
                    entry.failed = True
                if len(entry.replies) < entry.count:
                    return
                owed.popleft()
                self._answered(entry)
            if link.stray():
                raise InvalidResponse("a reply from Redis that no command was owed")
        except Exception as exc:  # the stream no longer matches what was sent
            self._lose(link, exc)

    def _answered(self, entry: _Owed) -> None:
        waiter = entry.waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result((entry.replies, entry.failed))
            return
        batch = entry.batch
        assert batch is not None
        if not entry.failed:
            if len(batch) == 1:
                future = batch[0][1]
                if not future.done():
                    future.set_result(entry.replies)
            else:
                flat, position = entry.replies, 0
                for commands, future, _ in batch:
                    end = position + len(commands)
                    if not future.done():
                        future.set_result(flat[position:end])
                    position = end
            self._landed()
            return
        answered: list[_Operation] = []
        their_replies: list[list[Any]] = []
        missing: list[_Operation] = []
        for operation, reply in zip(
            batch, _split([commands for commands, _, _ in batch], entry.replies), strict=True
        ):
            if _noscript(reply):
                missing.append(operation)
            else:
                answered.append(operation)
                their_replies.append(reply)
        self._settle(answered, their_replies)
        if not missing:
            self._landed()
            return
        task = asyncio.create_task(self._send_again(missing, entry.deadline))
        self._tasks.add(task)
        task.add_done_callback(self._sent)

    def _lose(self, link: RawLink, error: Exception, now: float | None = None) -> None:
        """Drop the linked connection: what is owed on it fails (TimeoutError if past its
        deadline at `now`, else `error`), and the connection is closed and given back."""
        if link is not self._link:
            return
        connection = self._connection
        self._link = self._connection = None
        owed, self._owed = self._owed, deque()
        self._disarm()
        if not owed:
            self._unreported = error
        for entry in owed:
            expired = now is not None and entry.deadline <= now
            self._fail(entry, self._timed_out() if expired else error)
        task = asyncio.ensure_future(self._hand_back(connection))
        self._tasks.add(task)
        self._handing_back.add(task)
        task.add_done_callback(self._handed_back)

    def _fail(self, entry: _Owed, error: Exception) -> None:
        if entry.waiter is not None:
            if not entry.waiter.done():
                entry.waiter.set_exception(error)
            return
        assert entry.batch is not None
        self._fail_operations(entry.batch, error)
        self._landed()

    async def _hand_back(self, connection: Any) -> None:
        try:
            await connection.disconnect()
        finally:
            await self._redis.connection_pool.release(connection)

    def _handed_back(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._handing_back.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not close a dropped Redis connection: %r", task.exception())

    async def _send(self, batch: list[_Operation]) -> None:
        # _execute, reached from here without a pause, takes this place in line.
        self._behind -= 1
        batch = self._unexpired(batch)
        if not batch:
            return
        try:
            async with asyncio.timeout_at(min(deadline for _, _, deadline in batch)):
                replies = await self._replies(batch)
        except BaseException as exc:
            failure = self._timed_out() if isinstance(exc, TimeoutError) else exc
            self._fail_operations(batch, failure)
            if not isinstance(exc, Exception):
                raise
            return
        if replies is not None:
            self._settle(batch, replies)

    async def _send_again(self, batch: list[_Operation], deadline: float) -> None:
        """Load the scripts and send `batch` again, after what was queued meanwhile (a
        linked pipeline answered NOSCRIPT for it)."""
        operations = [commands for commands, _, _ in batch]
        try:
            async with asyncio.timeout_at(deadline):
                for source in self._scripts:
                    await self._redis.script_load(source)
                again, _ = await self._execute(operations)
        except BaseException as exc:
            failure = self._timed_out() if isinstance(exc, TimeoutError) else exc
            self._fail_operations(batch, failure)
            if not isinstance(exc, Exception):
                raise
            return
        self._settle(batch, _split(operations, again))

    @staticmethod
    def _settle(batch: list[_Operation], replies: list[list[Any]]) -> None:
        for (_, future, _), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            error = next((r for r in reply if isinstance(r, Exception)), None)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(reply)

    @staticmethod
    def _fail_operations(batch: list[_Operation], error: BaseException) -> None:
        for _, future, _ in batch:
            if not future.done():
                future.set_exception(error)

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
        # (bench/drivers.py records the store's commands by replacing this method: every
        # pipeline that finds no connection comes through here.)
        # Packed by hiredis in C and written on the batcher's own connection: redis-py's
        # pipeline spends more CPU encoding commands than everything else in a heartbeat.
        pack = hiredis.pack_command
        payload = b"".join([pack(command) for operation in operations for command in operation])
        count = sum([len(operation) for operation in operations])
        link = self._link
        if link is not None and not self._behind and not link.closing():
            return await self._await_owed(link, self._owe_waiter(link, payload, count))
        # Batches are written in the order they came (the lock is FIFO, and the flush writes
        # nothing while one waits for it), and their replies read in that order, so
        # operations run in Redis in the order they were queued, even with several batches in
        # flight.
        self._behind += 1
        behind = True
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            async with self._write_lock:
                try:
                    connection = await self._connected()
                finally:
                    # A linked connection is written to below without a pause, and the flush
                    # writes nothing on a connection that is not linked.
                    self._behind -= 1
                    behind = False
                link = self._link
                if link is not None:
                    owed = self._owe_waiter(link, payload, count)
                else:
                    try:
                        await connection.send_packed_command(payload, check_health=False)
                    except BaseException:
                        await self._drop(connection)
                        raise
                    previous, self._turn = self._turn, mine
            if link is not None:
                return await self._await_owed(link, owed)
            try:
                if previous is not None:
                    await previous
                if self._connection is not connection:
                    raise RedisConnectionError(_LOST)
                # One deadline for the whole batch (_send's): a timer per reply costs more
                # than a reply.
                return await self._read(connection, count)
            except BaseException:
                # Cut short (an error, the deadline) while our replies are still owed on it:
                # whoever reads it next would take them for theirs.
                await self._drop(connection)
                raise
        finally:
            if behind:  # cut short while waiting for its turn to write
                self._behind -= 1
            if not mine.done():
                mine.set_result(None)

    async def _connected(self) -> Any:
        """The batcher's connection, got (and linked where it can be) if it has none."""
        if self._connection is not None:
            return self._connection
        if self._handing_back:  # a bounded pool may have room only once it is back
            await asyncio.wait(set(self._handing_back))
        connection = await self._redis.connection_pool.get_connection()
        self._connection = connection
        self._raw = None
        self._unreported = None  # the pipeline it was for goes on this connection instead
        try:
            if not connection.is_connected:
                await connection.connect()
        except BaseException:
            await self._drop(connection)
            raise
        if self._connection is not connection:  # closed meanwhile
            raise RedisConnectionError(_LOST)
        self._link = RawLink.of(connection, self._received, self._lose)
        return connection

    def _owe_waiter(self, link: RawLink, payload: bytes, count: int) -> _Owed:
        owed = _Owed(None, asyncio.get_running_loop().create_future(), count, math.inf)
        self._owe(link, owed, payload)
        return owed

    async def _await_owed(self, link: RawLink, owed: _Owed) -> tuple[list[Any], bool]:
        assert owed.waiter is not None
        try:
            return await owed.waiter
        except BaseException:
            if self._link is link and owed in self._owed:
                # Cut short (its caller's deadline) with its replies owed: the link would
                # still match them, but a pipeline must be answered by its deadline or dropped.
                self._lose(link, RedisConnectionError(_LOST))
            raise

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
            self._link = None
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
        # first, which ends the reads in flight on it at once (and what a link owes fails),
        # and given back only when every send task has ended (a task that was waiting for the
        # write lock may have opened another meanwhile: that one goes the same way). Not
        # cancelled: a cluster batcher retires while its callers run on, and a cancel they
        # did not ask for would end them.
        while self._connection is not None or self._tasks:
            connection, self._connection = self._connection, None
            self._link = None
            self._raw = None
            self._unreported = None
            owed, self._owed = self._owed, deque()
            self._disarm()
            for entry in owed:
                self._fail(entry, RedisConnectionError("the Redis connection was closed"))
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
