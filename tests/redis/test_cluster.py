"""Redis Cluster specifics on a real local 3-master cluster: where channels are subscribed, and
what the node does when a slot moves or one primary's pub/sub connection dies.

The store's own behaviour on a cluster is covered by the store tests (their `any_redis` runs on a
cluster too) and the multi-node suite; these tests are about the shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from presence_svc.codec import Outgoing, json_text
from presence_svc.fanout import Fanout
from presence_svc.models import CursorUpdate
from presence_svc.publisher import AsyncStudyEventPublisher
from presence_svc.redis.client import RedisClients
from presence_svc.redis.cluster import ClusterLinks
from presence_svc.redis.hiredis_pubsub import why_not_raw
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.store import StoreUnavailable
from tests.conftest import open_redis
from tests.support.cluster import LocalCluster, crossslot_errors
from tests.support.recorder import Recorder
from tests.support.store import THRESHOLDS
from tests.support.tasks import stop
from tests.support.waiting import eventually_async

WAIT = 10.0
NOW = 1_800_000_000_000


class Node:
    """A node's store and fan-out on a cluster client, as app.build_node wires them."""

    def __init__(self, client: RedisCluster, keys: Keys) -> None:
        self.keys = keys
        self.store = RedisStore(client, keys, THRESHOLDS)
        self.clients = RedisClients.around(client)
        self.resyncs: list[str] = []
        self.fanout = Fanout(self.clients.subscriptions(), keys.channel, self.resync)
        self.task: asyncio.Task[None] | None = None

    async def resync(self, study: str) -> Outgoing:
        self.resyncs.append(study)
        return Outgoing(None, json_text({"type": "presence.snapshot", "data": {}}), floor=0)

    async def start(self) -> Node:
        self.task = asyncio.create_task(self.fanout.run())
        return self

    async def close(self) -> None:
        if self.task is not None:
            await stop(self.task)
        await self.fanout.close()
        await self.store.close()
        await self.clients.aclose()


@contextlib.asynccontextmanager
async def node_on(cluster: LocalCluster, keys: Keys) -> AsyncIterator[tuple[RedisCluster, Node]]:
    """A cluster client of its own and a node on it, for a test that breaks its cluster."""
    client = RedisCluster.from_url(cluster.url)
    await client.initialize()
    node = await Node(client, keys).start()
    try:
        yield client, node
    finally:
        await node.close()
        await client.aclose()


def owner(client: RedisCluster, key: str) -> str:
    return str(client.nodes_manager.get_node_from_slot(key_slot(key.encode())).name)


def studies_per_primary(client: RedisCluster, keys: Keys, each: int) -> dict[str, list[str]]:
    """`each` study ids whose keys live on each primary."""
    wanted = {str(node.name): [] for node in client.get_primaries()}
    out: dict[str, list[str]] = {name: [] for name in wanted}
    n = 0
    while any(len(found) < each for found in out.values()):
        study = f"st{n}"
        n += 1
        found = out[owner(client, keys.channel(study))]
        if len(found) < each:
            found.append(study)
    return out


async def shard_channels(client: RedisCluster, prefix: str) -> dict[str, set[str]]:
    """The sharded channels under `prefix` that each primary has subscribers for."""
    out: dict[str, set[str]] = {}
    for node in client.get_primaries():
        names = await client.execute_command(
            "PUBSUB SHARDCHANNELS", f"{prefix}:*", target_nodes=node
        )
        out[str(node.name)] = {n.decode() for n in names}
    return out


@pytest.fixture
async def client(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[RedisCluster]:
    async with open_redis("cluster", request, key_prefix) as opened:
        await opened.initialize()
        yield opened


async def test_each_channel_is_subscribed_on_the_primary_that_owns_it(
    client: RedisCluster, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    node = await Node(client, keys).start()
    try:
        layout = studies_per_primary(client, keys, each=2)
        recorders = {study: Recorder() for studies in layout.values() for study in studies}
        for study, recorder in recorders.items():
            await node.fanout.add(study, recorder)
        # One link per primary, each carrying exactly the channels of its slots.
        assert node.fanout.links == len(layout) == 3
        assert await shard_channels(client, key_prefix) == {
            name: {keys.channel(s) for s in studies} for name, studies in layout.items()
        }
        for study in recorders:
            await node.store.heartbeat(f"user-{study}", study, CursorUpdate(), NOW)
        publisher = AsyncStudyEventPublisher(client, key_prefix)
        for study in recorders:
            assert await publisher.publish(study, "study.renamed", {"name": study}) == 1
        for study, recorder in recorders.items():
            await recorder.wait_for(2)
            assert recorder.types() == ["presence.user_joined", "study.renamed"]
            assert f'"study_id":"{study}"' in recorder.events[0].text
            assert f'"name":"{study}"' in recorder.events[1].text
        assert node.resyncs == []
    finally:
        await node.close()


async def test_one_primary_losing_its_link_resyncs_only_that_primarys_studies(
    client: RedisCluster, cluster_url: str, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    node = await Node(client, keys).start()
    try:
        layout = studies_per_primary(client, keys, each=2)
        recorders = {study: Recorder() for studies in layout.values() for study in studies}
        for study, recorder in recorders.items():
            await node.fanout.add(study, recorder)
        crossslot_before = crossslot_errors(cluster_url)
        victim = sorted(layout)[0]
        host, port = victim.rsplit(":", 1)
        with redis.Redis(host=host, port=int(port)) as admin:
            assert admin.client_kill_filter(_type="pubsub") >= 1
        await eventually_async(
            lambda: sorted(node.resyncs) == sorted(layout[victim]),
            within=WAIT,
            what=f"resyncs of {layout[victim]} only",
        )
        assert node.fanout.reconnects == 1
        assert node.fanout.connected
        # Resubscribed slot by slot, and nothing resubscribed behind the fan-out's back.
        assert crossslot_errors(cluster_url) == crossslot_before
        for study in recorders:
            await node.store.heartbeat("after", study, CursorUpdate(), NOW)
        for study, recorder in recorders.items():
            resynced = study in layout[victim]
            await recorder.wait_for(2 if resynced else 1, within=WAIT)
            expected = ["presence.snapshot"] if resynced else []
            assert recorder.types() == [*expected, "presence.user_joined"]
    finally:
        await node.close()


# --- a slot moving to another primary (own cluster: the test reshards it) --------------------


@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def move_slot(cluster: LocalCluster, slot: int, source: int, target: int) -> None:
    """Reshard one slot with its keys from port `source` to port `target` (redis-cli's steps)."""
    with cluster.client(source) as src, cluster.client(target) as dst:
        src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while names := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *names)
        for port in cluster.ports:
            with cluster.client(port) as each:
                each.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)


async def test_store_and_fan_out_follow_a_slot_to_its_new_primary(
    own_cluster: LocalCluster, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    async with node_on(own_cluster, keys) as (client, node):
        study = "moving"
        recorder = Recorder()
        await node.fanout.add(study, recorder)
        await node.store.heartbeat("alice", study, CursorUpdate(), NOW)
        await recorder.wait_for(1, within=WAIT)
        slot = key_slot(keys.channel(study).encode())
        source = int(owner(client, keys.channel(study)).rsplit(":", 1)[1])
        target = next(port for port in own_cluster.ports if port != source)

        move_slot(own_cluster, slot, source, target)

        # The server drops the channel's subscription on the old primary: the fan-out follows
        # it and resyncs; the store's stale slot map meets MOVED and is refreshed.
        await eventually_async(
            lambda: node.resyncs == [study], within=WAIT, what="the moved channel followed"
        )
        await node.store.heartbeat("bob", study, CursorUpdate(), NOW + 1)
        await recorder.wait_for(3, within=WAIT)
        assert recorder.types() == [
            "presence.user_joined",
            "presence.snapshot",
            "presence.user_joined",
        ]
        assert '"user_id":"bob"' in recorder.events[2].text
        assert owner(client, keys.channel(study)) == f"127.0.0.1:{target}"
        channels = await shard_channels(client, key_prefix)
        assert channels[f"127.0.0.1:{target}"] == {keys.channel(study)}
        assert channels[f"127.0.0.1:{source}"] == set()
        presence = await node.store.presence(study)
        assert [s.user_id for s in presence.sessions] == ["alice", "bob"]


# --- a primary failing over to its replica (own cluster with replicas) -----------------------


@pytest.fixture
def replicated_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster(replicas=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def heartbeat_until_served(node: Node, user: str, study: str, deadline: float) -> int:
    """Heartbeat until the store reaches the study's primary again; the failures on the way.

    Calls fail as StoreUnavailable (503 / an error message to the socket) until a replica is
    promoted and the node has learnt it: no restart needed.
    """
    failures = 0
    while True:
        try:
            await node.store.heartbeat(user, study, CursorUpdate(), NOW + failures)
            return failures
        except StoreUnavailable:
            failures += 1
            assert time.monotonic() < deadline, "the store never reached the new primary"
            await asyncio.sleep(0.2)


async def test_the_store_alone_follows_a_failover_to_the_replica(
    replicated_cluster: LocalCluster, key_prefix: str
) -> None:
    # No socket watches anything, so nothing but the store's own calls can notice the failover.
    keys = Keys(key_prefix)
    async with node_on(replicated_cluster, keys) as (client, node):
        study = "failing"
        await node.store.heartbeat("alice", study, CursorUpdate(), NOW)
        victim = owner(client, keys.channel(study))
        replicated_cluster.kill(int(victim.rsplit(":", 1)[1]))
        assert await heartbeat_until_served(node, "bob", study, time.monotonic() + 30) > 0
        assert owner(client, keys.channel(study)) != victim
        assert "bob" in {s.user_id for s in (await node.store.presence(study)).sessions}


async def test_store_and_fan_out_follow_a_failover_to_the_replica(
    replicated_cluster: LocalCluster, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    async with node_on(replicated_cluster, keys) as (client, node):
        study = "failing"
        recorder = Recorder()
        await node.fanout.add(study, recorder)
        await node.store.heartbeat("alice", study, CursorUpdate(), NOW)
        await recorder.wait_for(1, within=WAIT)
        victim = owner(client, keys.channel(study))
        replicated_cluster.kill(int(victim.rsplit(":", 1)[1]))
        deadline = time.monotonic() + 30
        assert await heartbeat_until_served(node, "bob", study, deadline) > 0
        assert owner(client, keys.channel(study)) != victim
        # The link to the dead primary is replaced on the new one and the study resynced.
        await eventually_async(
            lambda: node.resyncs == [study],
            within=deadline - time.monotonic(),
            what="the fan-out resubscribing the study",
        )
        seen = len(recorder.events)
        await node.store.heartbeat("carol", study, CursorUpdate(), NOW + 100)
        await recorder.wait_for(seen + 1, within=WAIT)
        assert '"user_id":"carol"' in recorder.events[-1].text
        assert "presence.snapshot" in recorder.types()


async def test_the_links_are_read_raw_whatever_the_cluster_client_checks(
    cluster_url: str, key_prefix: str
) -> None:
    """The node's cluster client has health checks (redis/client.py); its pub/sub links must
    not, or they would be read through redis-py's get_message (hiredis_pubsub.py)."""
    client = RedisCluster.from_url(cluster_url, health_check_interval=15)
    links = ClusterLinks(client)
    try:
        await client.initialize()
        channel = Keys(key_prefix).channel("s1")
        pubsub = links.open(links.shard_of(channel))
        await pubsub.ssubscribe(channel)
        assert why_not_raw(pubsub.connection) is None
        await pubsub.aclose()
    finally:
        await links.aclose()
        await client.aclose()


def test_a_cluster_that_fails_to_form_leaves_no_server_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess

    import tests.support.cluster as cluster_support

    def refuse(*args: object, **kwargs: object) -> None:
        raise subprocess.CalledProcessError(1, "redis-cli --cluster create")

    monkeypatch.setattr(cluster_support.subprocess, "run", refuse)
    cluster = LocalCluster()
    with pytest.raises(subprocess.CalledProcessError):
        cluster.start()
    assert cluster._procs and all(proc.poll() is not None for proc in cluster._procs)
