"""Redis Cluster: routing the node's batched calls and pub/sub links to the owning shards.

In cluster mode the node keeps redis-py's `RedisCluster` for plain commands (it routes each by
key slot) and adds what redis-py cannot do for us:

- `ClusterBatcher`: the automatic pipelining of batch.py, one `Batcher` (one connection) per
  primary. An operation's commands may live on different shards (a heartbeat touches the
  study's slot, its schedule shard and the node's lease set): consecutive commands bound for the
  same primary travel together, and each such run waits for the one before, so the order the
  store relies on ("listed before it holds", "scheduled after the change") still holds.
  A MOVED or ASK reply (a slot changed hands) refreshes the slot map and sends the command again.
- `ClusterLinks`: where pubsub.py subscribes each study channel: one sharded pub/sub
  connection (`SSUBSCRIBE`) per primary, carrying every channel whose slot that primary owns.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, ClusterError, MovedError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from presence_svc.redis.batch import TIMEOUT, Batcher, Command

log = logging.getLogger(__name__)

# A command is sent again at most this often after MOVED/ASK/TRYAGAIN/CLUSTERDOWN.
MAX_REDIRECTS = 5
REDIRECT_PAUSE = 0.05  # seconds, times the attempt number, before sending again
_REDIRECTED = (MovedError, AskError, TryAgainError, ClusterDownError)
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_SCRIPT_CALLS = frozenset({"EVALSHA", "EVAL", b"EVALSHA", b"EVAL"})


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def command_key(command: Command) -> Any:
    """The key that decides where `command` runs (scripts: their first KEYS entry)."""
    if command[0] in _SCRIPT_CALLS:
        if int(command[2]) == 0:
            raise ValueError(f"a script call without keys cannot be routed: {command[:3]}")
        return command[3]
    return command[1]


def node_client(node: ClusterNode, *, reconnect: bool = True) -> Redis:
    """A plain client of one cluster node, with the cluster client's credentials and TLS.

    `reconnect=False` gives the no-retry client pubsub.py wants for its links.
    """
    kwargs = dict(node.connection_kwargs)
    if not reconnect:
        kwargs["retry"] = Retry(NoBackoff(), 0)
        # RESP2, as for the single-Redis pub/sub client (redis_client.py): RESP3 pushes cost
        # a str() of every message inside redis-py.
        kwargs["protocol"] = 2
        # Maintenance notifications are RESP3 pushes: redis-py refuses them on RESP2.
        kwargs.pop("maint_notifications_config", None)
        kwargs.pop("oss_cluster_maint_notifications_handler", None)
        # The links ping by themselves; redis-py's health check would read a reply on the
        # connection that pubsub.py reads raw (hiredis_pubsub.py), racing its reader.
        kwargs["health_check_interval"] = 0
    pool = ConnectionPool(connection_class=node.connection_class, **kwargs)
    return Redis.from_pool(pool)


class _NodeConnections:
    """What a Batcher needs of a client, served by one node of the cluster client.

    The batcher's connection then belongs to the cluster client, which closes it with the rest.
    """

    def __init__(self, cluster: RedisCluster, node: ClusterNode) -> None:
        self._cluster = cluster
        self.node = node
        self.connection_pool = self  # Batcher asks its client's pool for a connection
        self.retired = False  # the slot map replaced this node object

    async def get_connection(self) -> Any:
        return self.node.acquire_connection()

    async def release(self, connection: Any) -> None:
        if self.retired:
            # Nobody will use or close the old node object's connections again.
            await connection.disconnect()
        else:
            self.node.release(connection)

    async def script_load(self, source: str) -> Any:
        return await self._cluster.execute_command("SCRIPT LOAD", source, target_nodes=self.node)


class ClusterBatcher:
    """Batcher's interface over every primary of a cluster."""

    def __init__(
        self, cluster: RedisCluster, scripts: Sequence[str], *, timeout: float = TIMEOUT
    ) -> None:
        self._cluster = cluster
        self._scripts = list(scripts)
        self._timeout = timeout
        self._batchers: dict[str, tuple[_NodeConnections, Batcher]] = {}
        self._retiring: set[asyncio.Future[None]] = set()
        self._refreshing: asyncio.Task[None] | None = None

    async def run(self, commands: list[Command], deadline: float | None = None) -> list[Any]:
        """Send one operation's commands, in order, to the primaries that own their keys.

        Every step on every primary (redirects included) is due by one `deadline`, as in
        Batcher.run: by default `timeout` seconds from now.
        """
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._timeout
        if not self._cluster.nodes_manager.slots_cache:
            await self._cluster.initialize()  # a client nobody has used yet
        replies: list[Any] = []
        owners = [self._node_of(command).name for command in commands]
        for _, run in itertools.groupby(zip(owners, commands, strict=True), key=lambda x: x[0]):
            replies += await self._run_on_node([command for _, command in run], deadline)
        return replies

    async def _run_on_node(self, commands: list[Command], deadline: float) -> list[Any]:
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        for attempt in range(MAX_REDIRECTS + 1):
            # One operation per command, so a redirected command is sent again on its own.
            # They are queued in order, so they still reach each primary in order.
            by_node = [(i, self._batcher_for(commands[i])) for i in todo]
            results = await asyncio.gather(
                *(batcher.run([commands[i]], deadline) for i, batcher in by_node),
                return_exceptions=True,
            )
            again: list[int] = []
            for (i, _), result in zip(by_node, results, strict=True):
                if isinstance(result, _REDIRECTED) and attempt < MAX_REDIRECTS:
                    again.append(i)
                elif isinstance(result, _REDIRECTED):
                    # Slots still moving after every attempt: the cluster cannot serve the
                    # call now (StoreUnavailable), as with redis-py's own "TTL exhausted".
                    raise ClusterError(f"still redirected after {attempt} attempts") from result
                elif isinstance(result, _UNREACHABLE):
                    # The primary may be gone for good (a replica took over): the next call
                    # must not be routed by the same map. This one fails (StoreUnavailable).
                    await self._refresh_quietly()
                    raise result
                elif isinstance(result, BaseException):
                    raise result
                else:
                    replies[i] = result[0]
            if not again:
                return replies
            await self._refresh_quietly()
            # TRYAGAIN and CLUSTERDOWN last while a slot migrates or a replica is promoted.
            await asyncio.sleep(REDIRECT_PAUSE * attempt)
            todo = again
        raise AssertionError("unreachable")

    def _node_of(self, command: Command) -> ClusterNode:
        key = command_key(command)
        slot = key_slot(key if isinstance(key, bytes) else str(key).encode())
        return self._cluster.nodes_manager.get_node_from_slot(slot)

    def _batcher_for(self, command: Command) -> Batcher:
        node = self._node_of(command)
        entry = self._batchers.get(node.name)
        if entry is None or entry[0].node is not node:
            # New, or the slot map was learnt again and the node object replaced: the old
            # batcher's connection is closed (nothing else would, and its socket would leak).
            if entry is not None:
                entry[0].retired = True
                retiring = asyncio.ensure_future(entry[1].close())
                self._retiring.add(retiring)
                retiring.add_done_callback(self._retiring.discard)
            client = _NodeConnections(self._cluster, node)
            batcher = Batcher(client, self._scripts, timeout=self._timeout)
            entry = self._batchers[node.name] = (client, batcher)
        return entry[1]

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # the cluster may still be electing: the next failure retries
            log.warning("could not refresh the cluster slot map: %s", exc)

    async def refresh(self) -> None:
        """Learn the slot map again (once, however many callers ask at the same time)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._cluster.nodes_manager.initialize())
        await asyncio.shield(self._refreshing)

    async def close(self) -> None:
        """Give every primary's connection back (at shutdown)."""
        batchers, self._batchers = self._batchers, {}
        for _, batcher in batchers.values():
            await batcher.close()
        await asyncio.gather(*self._retiring, return_exceptions=True)


class ClusterLinks:
    """Sharded pub/sub over a cluster: one link (connection) per primary."""

    sharded = True

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._clients: dict[str, Redis] = {}

    def shard_of(self, channel: str) -> str:
        """The name (host:port) of the primary that owns the channel's slot."""
        return str(self._cluster.nodes_manager.get_node_from_slot(key_slot(channel.encode())).name)

    def batches(self, channels: list[str]) -> list[list[str]]:
        """One group per slot: an SSUBSCRIBE naming channels of two slots fails (CROSSSLOT)."""
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        return list(by_slot.values())

    def open(self, shard: str) -> Any:
        """A new pub/sub connection to `shard` that never reconnects on its own."""
        client = self._clients.get(shard)
        if client is None:
            node = self._cluster.get_node(node_name=shard)
            if node is None:
                raise ConnectionError(f"cluster node {shard} is gone from the slot map")
            client = self._clients[shard] = node_client(node, reconnect=False)
        return client.pubsub()

    async def refresh(self) -> None:
        """Learn the slot map again, after a channel's slot moved to another primary."""
        await self._cluster.nodes_manager.initialize()

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()
