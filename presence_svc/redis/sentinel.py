"""Redis Sentinel: connections to the primary the sentinels name, following it through failovers.

redis-py's `redis.asyncio.sentinel` asks the sentinels for the primary whenever a connection
connects, and turns a READONLY reply read through `read_response` (a demoted primary) into a
ConnectionError that disconnects it. Three gaps remain for this node, closed here:

- its pool does not make callers wait for a free connection; `SentinelPool` is the bounded,
  blocking pool the single-Redis mode uses, managed by the sentinels;
- a connection that was disconnected while held (the batcher keeps one for as long as it
  works) reconnects on its next write to the address it had, not to the primary; and the
  batcher reads its replies raw (hiredis_replies.py), so a READONLY reply never reaches the
  code that would drop it. `PrimaryConnection` checks before every write that it is still on
  the primary the pool last heard of, and reconnects through the sentinels if not;
- nothing asks the sentinels while every connection stays up, such as one that a lagging
  sentinel sent to a replica. `PrimaryWatch` asks them every `interval` seconds, so such a
  connection is moved at its next write (meanwhile its calls fail as StoreUnavailable:
  calls.py maps READONLY).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio.connection import BlockingConnectionPool, SSLConnection, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds between two questions to the sentinels


class PrimaryConnection(SentinelManagedConnection):
    """A connection that never writes to anything but the primary its pool last heard of."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        primary = self.connection_pool.master_address
        if self.is_connected and primary is not None and (self.host, self.port) != primary:
            log.info("leaving %s:%s for the primary at %s:%s", self.host, self.port, *primary)
            await self.disconnect()
        if not self.is_connected:
            # redis-py's own reconnect on a write would dial the address it had; connect()
            # asks the sentinels.
            await self.connect()  # type: ignore[no-untyped-call]
        await super().send_packed_command(command, check_health)


class PrimarySSLConnection(PrimaryConnection, SSLConnection):
    """`PrimaryConnection` over TLS."""


class SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A bounded pool of connections to the primary; callers beyond it wait (`timeout`)."""

    async def rediscover(self) -> tuple[str, int]:
        """Ask the sentinels for the primary now; idle connections elsewhere are closed."""
        address: tuple[str, int] = await self.get_master_address()  # type: ignore[no-untyped-call]
        return address


def data_node_options(url: str | None) -> dict[str, Any]:
    """How to talk to the primary, from PRESENCE_REDIS_URL: credentials, db, TLS, options.

    The URL's host and port are not used: the sentinels say where the primary is.
    """
    if url is None:
        return {"connection_class": PrimaryConnection}
    options: dict[str, Any] = dict(parse_url(url))
    options.pop("host", None)
    options.pop("port", None)
    tls = options.pop("connection_class", None) is SSLConnection
    options["connection_class"] = PrimarySSLConnection if tls else PrimaryConnection
    return options


def pubsub_options(url: str | None) -> dict[str, Any]:
    """`data_node_options` for pub/sub: redis-py's own connections, which write nothing on
    their own to a new primary (a silent reconnect would lose the subscriptions)."""
    options = data_node_options(url)
    tls = options["connection_class"] is PrimarySSLConnection
    options["connection_class"] = _PubSubSSLConnection if tls else SentinelManagedConnection
    return options


class _PubSubSSLConnection(SentinelManagedConnection, SSLConnection):
    pass


class PrimaryWatch:
    """Asks the sentinels for the primary every `interval` seconds and tells `pool`."""

    def __init__(
        self, sentinel: Sentinel, pool: SentinelPool, interval: float = WATCH_INTERVAL
    ) -> None:
        self.sentinel = sentinel
        self._pool = pool
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sentinel-watch")

    async def _run(self) -> None:
        known: tuple[str, int] | None = self._pool.master_address
        failing = False
        while True:
            await asyncio.sleep(self._interval)
            try:
                address = await self._pool.rediscover()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if not failing:  # once per outage, not once a second
                    log.warning("no primary from the sentinels: %s", exc)
                failing = True
                continue
            failing = False
            if address != known:
                log.warning("the sentinels name a new primary: %s:%s", *address)
                known = address

    async def aclose(self) -> None:
        """Stop asking, and close the connections to the sentinels."""
        task = self._task
        # Repeated: on Python 3.11 a cancel that lands as a reply arrives can be lost (app._stop).
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        await self.sentinel.aclose()
