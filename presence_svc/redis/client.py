"""Opening the node's Redis clients: a real server, the primary of a Sentinel deployment or a
cluster (with retry), or the embedded one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from presence_svc.redis.cluster import ClusterLinks, is_cluster
from presence_svc.redis.links import Links, SingleLinks
from presence_svc.redis.pubsub import LinkTuning, PubSubLinks
from presence_svc.redis.sentinel import (
    PrimaryWatch,
    SentinelPool,
    data_node_options,
    pubsub_options,
)
from presence_svc.settings import Settings

if TYPE_CHECKING:
    from presence_svc.fanout import Inbox

log = logging.getLogger(__name__)


def embedded_redis() -> Any:
    """An in-process Redis (fakeredis with Lua) for the single-node dev mode."""
    try:
        import fakeredis
    except ImportError:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "PRESENCE_REDIS_URL is unset and the embedded Redis is not installed: "
            "pip install 'presence-svc[embedded]' or set PRESENCE_REDIS_URL"
        ) from None
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


@dataclass(frozen=True, slots=True)
class RedisClients:
    """The node's client for commands, and the pub/sub links fan-out subscribes on.

    Pub/sub connections never reconnect on their own: redis-py would resubscribe silently and
    the node would not know that events were lost meanwhile (pubsub.py reconnects, fanout.py
    resyncs).
    """

    commands: Any
    links: Links
    owns_commands: bool = True  # closed by aclose (a client handed to create_app is not)
    watch: PrimaryWatch | None = None  # on Sentinel: what follows the primary

    @classmethod
    def around(cls, commands: Any) -> RedisClients:
        """Links for a client opened elsewhere (tests, the embedded Redis)."""
        links: Links = ClusterLinks(commands) if is_cluster(commands) else SingleLinks(commands)
        return cls(commands, links, owns_commands=False)

    def subscriptions(self, tuning: LinkTuning | None = None) -> Callable[[Inbox], PubSubLinks]:
        """What fanout.Fanout subscribes on: the pub/sub links over `links`, for its inbox.

        A factory, since the links hand what they read to the fan-out that holds them.
        """
        return lambda inbox: PubSubLinks(self.links, inbox, tuning)

    async def aclose(self) -> None:
        if self.watch is not None:
            await self.watch.aclose()
        await self.links.aclose()
        if self.owns_commands:
            await self.commands.aclose()


async def connect(settings: Settings) -> RedisClients:
    """Connected clients for `settings`, retrying a real server with capped backoff."""
    if settings.redis_url is None:
        log.warning(
            "SINGLE-NODE DEV MODE: embedded in-process Redis (PRESENCE_REDIS_URL is unset); "
            "state is lost on exit and no other node can share it"
        )
        embedded = embedded_redis()
        return RedisClients(embedded, SingleLinks(embedded))
    if settings.redis_sentinels:
        return await _connect_sentinel(settings)
    if settings.redis_cluster:
        return await _connect_cluster(settings.redis_url, settings)
    # A bounded pool that makes callers wait for a free connection: a burst of thousands of
    # requests must queue, not open thousands of connections or fail. One quick retry, so a
    # request fails over to 503 in well under a second when Redis is down.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_call_timeout,  # a call waiting for a connection: its deadline
        socket_connect_timeout=settings.redis_connect_timeout,
        socket_timeout=_socket_timeout(settings),
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
    )
    client = Redis.from_pool(pool)  # owns the pool: closing the client closes its connections
    await _until_reachable(client, "Redis", client.ping, settings)
    pubsub = Redis.from_url(
        settings.redis_url,
        # RESP2: redis-py 8 handles every RESP3 push (each pub/sub message) through a logger
        # lookup and a str() of the whole message, even with debug logs off.
        protocol=2,
        socket_connect_timeout=settings.redis_connect_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
    )
    return RedisClients(client, SingleLinks(pubsub, owned=True))


async def _connect_cluster(seed_url: str, settings: Settings) -> RedisClients:
    # The cluster client routes plain commands by slot and follows MOVED/ASK itself; the
    # batched calls and the pub/sub links use its slot map (cluster.py).
    client = RedisCluster.from_url(
        seed_url,
        max_connections=settings.redis_max_connections,
        socket_connect_timeout=settings.redis_connect_timeout,
        socket_timeout=_socket_timeout(settings),
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
    )

    async def ready() -> None:
        await client.initialize()
        await client.ping()

    await _until_reachable(client, "Redis Cluster", ready, settings)
    return RedisClients(client, ClusterLinks(client))


async def _connect_sentinel(settings: Settings) -> RedisClients:
    # Both clients find the primary through the sentinels whenever they connect; the command
    # pool is bounded and blocking as on a single Redis, and the watch moves its connections
    # after a failover (sentinel.py).
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.redis_sentinels,
        sentinel_kwargs=sentinel_options(settings),
        socket_connect_timeout=settings.redis_connect_timeout,
        socket_keepalive=True,
    )
    master = settings.redis_sentinel_master
    assert master is not None  # Settings require it with PRESENCE_REDIS_SENTINELS
    client = sentinel.master_for(
        master,
        connection_pool_class=SentinelPool,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_call_timeout,
        socket_timeout=_socket_timeout(settings),
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        **data_node_options(settings.redis_url),
    )
    watch = PrimaryWatch(sentinel, client.connection_pool)
    try:
        await _until_reachable(client, "the Redis primary (Sentinel)", client.ping, settings)
    except BaseException:
        await sentinel.aclose()
        raise
    pubsub = sentinel.master_for(
        master, protocol=2, retry=Retry(NoBackoff(), 0), **pubsub_options(settings.redis_url)
    )
    watch.start()
    return RedisClients(client, SingleLinks(pubsub, owned=True), watch=watch)


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """How to talk to the sentinels themselves: their own credentials and TLS."""
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_connect_timeout,
        # A stalled sentinel must not hold up every new connection: the next one is asked.
        "socket_timeout": min(settings.redis_connect_timeout, _socket_timeout(settings)),
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),  # discovery tries the next sentinel instead
    }
    if settings.redis_sentinel_username is not None:
        options["username"] = settings.redis_sentinel_username
    if settings.redis_sentinel_password is not None:
        options["password"] = settings.redis_sentinel_password
    if settings.redis_sentinel_tls:
        options["ssl"] = True
        if settings.redis_sentinel_tls_ca_certs is not None:
            options["ssl_ca_certs"] = settings.redis_sentinel_tls_ca_certs
    return options


def _socket_timeout(settings: Settings) -> float:
    """A plain command's wait for its reply: never past the deadline of the call it is in."""
    return min(settings.redis_socket_timeout, settings.redis_call_timeout)


async def _until_reachable(
    client: Any,
    what: str,
    probe: Callable[[], Awaitable[Any]],
    settings: Settings,
) -> None:
    """Run `probe` until it succeeds, with capped backoff; close `client` if it never does."""
    attempts, cap = settings.redis_connect_attempts, settings.redis_connect_backoff_cap
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            await probe()
            return
        except (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError) as exc:
            if attempt == attempts:
                await client.aclose()
                raise RuntimeError(f"cannot reach {what} after {attempt} attempts: {exc}") from exc
            log.warning("%s not reachable (attempt %d): %s; retrying", what, attempt, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)
