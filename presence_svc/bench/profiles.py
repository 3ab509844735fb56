"""Sizes and durations of each scenario: `quick` (< 2 min), `full` (< 15 min), `smoke` (tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FanoutProfile:
    studies: int
    viewers: int  # per study, spread over the nodes
    loads: tuple[int, ...]  # offered deliveries/s (events/s x viewers)
    seconds: float  # per load, per target (nodes, then the bare baseline, then the peer)
    nodes: int = 2
    # The receive-cost point (fanout_receive.py): `receive_studies` studies with one socket per
    # node each, events/s offered in turn, seconds per rate and target; first the servers'
    # idle CPU over `receive_idle_seconds`. No rates: no such point.
    receive_studies: int = 0
    receive_events: tuple[int, ...] = ()
    receive_seconds: float = 0.0
    receive_idle_seconds: float = 0.0
    # The python-socketio peer (fanout_peer.py) as a third column at every load, on as many
    # processes as nodes; measured only where the package is installed.
    peer: bool = True


@dataclass(frozen=True, slots=True)
class HeartbeatProfile:
    # A node handles one message per socket at a time, so sockets (and REST connections) are
    # the node's Redis operations in flight. 96 saturates one node; it also stays below 100, the
    # size of redis-py's default asyncio pool, which fails the excess at once (the node then
    # answers `unavailable`) on nodes that do not bound their pool themselves.
    ws_sockets: int
    ws_window: int  # heartbeats each socket sends before a ping (closed loop)
    rest_connections: int
    studies: int
    seconds: float
    floor_seconds: float
    floor_batch: int = 200
    # REST at a moderate fixed rate (heartbeats_rest.py): the node against the bare baseline's
    # JSON endpoint, the same client and requests, `moderate_rounds` times each, alternating.
    moderate_rate: float = 400.0  # requests/s offered, over all client processes
    moderate_connections: int = 8
    moderate_seconds: float = 8.0
    moderate_rounds: int = 2


@dataclass(frozen=True, slots=True)
class IdleProfile:
    sockets: tuple[int, ...]  # cumulative sockets on one node, measured in turn
    viewers_per_study: int
    settle: float
    baseline: bool = True


@dataclass(frozen=True, slots=True)
class SweepProfile:
    sessions: tuple[int, ...]
    due: tuple[int, ...]  # sessions made due at once, each batch measured separately
    sessions_per_study: int
    empty_ticks: int


@dataclass(frozen=True, slots=True)
class BigroomProfile:
    # Batching starts above 50 sockets of a study on a node: (watchers + members) / nodes must
    # exceed it for the batched run to batch.
    watchers: int  # sockets that never heartbeat, spread over the nodes
    members: int  # sockets that move their cursor `rate` times a second each
    rate: float
    churn: float  # members leaving, and as many new ones joining, per second
    seconds: float  # the moving window of each run (batching on, then off)
    sampled: int  # watchers whose cursors' staleness is logged
    connect_members: tuple[int, ...]  # study sizes whose first frames are measured
    settle: float  # bound on each wait for the sockets to catch up (snapshots, final cursors)
    nodes: int = 2


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    fanout: FanoutProfile
    heartbeats: HeartbeatProfile
    idle: IdleProfile
    sweep: SweepProfile
    bigroom: BigroomProfile
    client_workers: int = 2
    # Hard bound on every worker process, whatever happens to the harness.
    lifetime: float = 900.0


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        fanout=FanoutProfile(
            studies=10,
            viewers=50,
            loads=(5_000, 10_000),
            seconds=5,
            receive_studies=10,
            receive_events=(200, 2_000),
            receive_seconds=4,
            receive_idle_seconds=1,
        ),
        heartbeats=HeartbeatProfile(
            ws_sockets=96,
            ws_window=8,
            rest_connections=64,
            studies=16,
            seconds=5,
            floor_seconds=4,
            moderate_seconds=4,
            moderate_rounds=1,
        ),
        idle=IdleProfile(sockets=(1_000, 5_000), viewers_per_study=10, settle=1.0),
        sweep=SweepProfile(
            sessions=(100_000,), due=(1_000, 10_000), sessions_per_study=10, empty_ticks=200
        ),
        bigroom=BigroomProfile(
            watchers=400,
            members=40,
            rate=5,
            churn=2,
            seconds=6,
            sampled=40,
            connect_members=(50, 5_000),
            settle=10,
        ),
        lifetime=600.0,
    ),
    "full": Profile(
        name="full",
        fanout=FanoutProfile(
            studies=20,
            viewers=50,
            loads=(2_500, 5_000, 10_000, 20_000, 40_000),
            seconds=12,
            receive_studies=20,
            receive_events=(200, 2_000),
            receive_seconds=6,
            receive_idle_seconds=1,
        ),
        heartbeats=HeartbeatProfile(
            ws_sockets=96,
            ws_window=16,
            rest_connections=96,
            studies=16,
            seconds=12,
            floor_seconds=10,
        ),
        idle=IdleProfile(sockets=(1_000, 5_000, 10_000), viewers_per_study=10, settle=2.0),
        sweep=SweepProfile(
            sessions=(100_000, 1_000_000),
            due=(1_000, 10_000),
            sessions_per_study=10,
            empty_ticks=500,
        ),
        bigroom=BigroomProfile(
            watchers=2_000,
            members=100,
            rate=5,
            churn=3,
            seconds=20,
            sampled=100,
            connect_members=(50, 5_000),
            settle=20,
        ),
        lifetime=1800.0,
    ),
    # Plumbing only (tests): tiny sizes, seconds not minutes; the figures mean nothing.
    "smoke": Profile(
        name="smoke",
        fanout=FanoutProfile(
            studies=2,
            viewers=4,
            loads=(200,),
            seconds=1,
            receive_studies=2,
            receive_events=(50,),
            receive_seconds=0.5,
            receive_idle_seconds=0.2,
            # tests/bench/test_bench_smoke.py turns it on in a fan-out run of its own.
            peer=False,
        ),
        heartbeats=HeartbeatProfile(
            ws_sockets=8,
            ws_window=4,
            rest_connections=4,
            studies=2,
            seconds=1,
            floor_seconds=0.5,
            floor_batch=20,
            moderate_rate=100.0,
            moderate_connections=2,
            moderate_seconds=0.5,
            moderate_rounds=1,
        ),
        idle=IdleProfile(sockets=(20, 40), viewers_per_study=5, settle=0.2),
        sweep=SweepProfile(
            sessions=(2_000,), due=(100, 200), sessions_per_study=10, empty_ticks=20
        ),
        # 65 sockets per node: above the batching threshold.
        bigroom=BigroomProfile(
            watchers=120,
            members=10,
            rate=5,
            churn=1,
            seconds=2,
            sampled=20,
            connect_members=(10, 200),
            settle=5,
        ),
        lifetime=120.0,
    ),
}
