"""What the Redis-backed store's parts share: script calls and their errors, lease members,
unreachable Redis."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from presence_svc.models import Holder, Lease
from presence_svc.redis.batch import Command
from presence_svc.redis.scripts import located
from presence_svc.store import StoreUnavailable

log = logging.getLogger(__name__)

# Redis cannot serve the call now: lost or timed out (redis-py's errors; the built-in ones of
# sockets, of batch.py and of asyncio.timeout), or a cluster electing a new primary
# (CLUSTERDOWN, MASTERDOWN, TRYAGAIN, redirects that never settle, a slot no primary covers),
# or a primary demoted to a replica (READONLY) until the node is on the new one (sentinel.py).
UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,  # ConnectionError, TimeoutError (asyncio's too) and every socket error
    ClusterError,
    TryAgainError,
    SlotNotCoveredError,
    ReadOnlyError,
)
# What redis-py's cluster client raises when it cannot learn a slot map: no node answers, or
# some slots have no primary. Its other RedisClusterExceptions are mistakes of the caller.
_NO_SLOT_MAP = ("Redis Cluster cannot be connected", "All slots are not covered")

P = ParamSpec("P")
R = TypeVar("R")


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says Redis cannot serve the call now (so it may be retried later)."""
    if isinstance(exc, UNAVAILABLE):
        return True
    return isinstance(exc, RedisClusterException) and str(exc).startswith(_NO_SLOT_MAP)


def reachable(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Give the call a deadline as a whole (its owner's `call_timeout` seconds) and report Redis
    being unavailable as StoreUnavailable, as `reachable_per_step` does."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        owner: Any = args[0]
        try:
            async with asyncio.timeout(owner.call_timeout):
                return await method(*args, **kwargs)
        except Exception as exc:
            reported = _reported(owner, exc)
            if reported is exc:
                raise
            raise reported from exc

    return wrapper


def reachable_per_step(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Report Redis being unavailable as StoreUnavailable (and count it on the method's owner,
    if it keeps `redis_errors`), and a script's error with its file and line (scripts.located).

    No deadline of its own: for calls whose every step already has one (a batched operation:
    the batcher's; a plain command: its socket timeout) and that must not be cut as a whole. A
    heartbeat is one batched operation, too frequent for a timer each (asyncio.timeout costs
    more than the rest of the call's Python); a reap is long and picks up where it stopped.
    """

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            reported = _reported(args[0], exc)
            if reported is exc:
                raise
            raise reported from exc

    return wrapper


def _reported(owner: Any, exc: Exception) -> Exception:
    """What a store call raises for `exc`: StoreUnavailable, a located script error, or `exc`."""
    if unavailable(exc):
        if hasattr(owner, "redis_errors"):
            owner.redis_errors += 1
        return StoreUnavailable(str(exc) or _describe(exc))
    if isinstance(exc, ResponseError):
        return located(exc)
    return exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no reply from Redis in time"
    return type(exc).__name__


def call(script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Command:
    """The command that runs `script` by SHA (batch.py loads it after NOSCRIPT)."""
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def lease_member(study_id: str, user_id: str, holder: Holder) -> str:
    """A lease as a member of its node's lease set."""
    # Ids never contain spaces (models.ID_PATTERN), so a space separates them unambiguously.
    return f"{study_id} {user_id} {holder.connection_id}"


def parse_lease(node_id: str, raw: bytes) -> Lease | None:
    parts = text(raw).split(" ")
    if len(parts) != 3:
        log.error("ignoring malformed lease %r of node %s", raw, node_id)
        return None
    study_id, user_id, connection_id = parts
    return Lease(study_id, user_id, Holder(node_id, connection_id))


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
