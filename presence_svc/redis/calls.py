"""What the Redis-backed store's parts share: script calls and their errors, lease members,
unreachable Redis."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

from redis.commands.core import AsyncScript
from redis.exceptions import ClusterDownError, ResponseError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from presence_svc.models import Holder, Lease
from presence_svc.redis.batch import Command
from presence_svc.redis.scripts import located
from presence_svc.store import StoreUnavailable

log = logging.getLogger(__name__)

# Redis cannot serve the call now: lost or timed out, or a cluster electing a new primary
# (CLUSTERDOWN, TRYAGAIN, a slot no primary covers).
UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)

P = ParamSpec("P")
R = TypeVar("R")


def reachable(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Report Redis being unavailable as StoreUnavailable (and count it on the method's owner,
    if it keeps `redis_errors`), and a script's error with its file and line (scripts.located).
    """

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except UNAVAILABLE as exc:
            owner = args[0]
            if hasattr(owner, "redis_errors"):
                owner.redis_errors += 1
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        except ResponseError as exc:
            explained = located(exc)
            if explained is exc:
                raise
            raise explained from exc

    return wrapper


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
