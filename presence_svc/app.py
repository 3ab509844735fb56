"""The ASGI application: routes, error handlers, and the node's start-up and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute

from presence_svc.auth import TokenVerifier
from presence_svc.clock import NodeClock
from presence_svc.coalesce import Coalescer
from presence_svc.codec import Outgoing
from presence_svc.fanout import Fanout
from presence_svc.leases import LeaseKeeper
from presence_svc.limits import KeyedBuckets
from presence_svc.metrics import Metrics
from presence_svc.models import SweepReport, Thresholds
from presence_svc.node import Node
from presence_svc.redis.client import RedisClients, connect
from presence_svc.redis.cluster import is_cluster
from presence_svc.redis.keys import Keys
from presence_svc.redis.pubsub import LinkTuning
from presence_svc.redis.stats import RedisStats
from presence_svc.redis.store import RedisStore
from presence_svc.requestid import RequestIdMiddleware
from presence_svc.service import PresenceService
from presence_svc.settings import Settings
from presence_svc.stats import OperatorStats, StatsWriter
from presence_svc.sweeper import Sweeper
from presence_svc.web import dashboard, stats
from presence_svc.web.client_files import ROUTES as CLIENT_ROUTES
from presence_svc.web.cors import Cors
from presence_svc.web.demo import ROUTES as DEMO_ROUTES
from presence_svc.web.errors import EXCEPTION_HANDLERS
from presence_svc.web.rest import ROUTES, HeartbeatShortcut
from presence_svc.web.ws import presence_socket, snapshot_message
from presence_svc.web.ws_entry import NodeApp

log = logging.getLogger(__name__)

RELEASE_TIMEOUT = 5.0


def build_node(settings: Settings, clients: RedisClients) -> Node:
    """Wire a node's parts around open Redis clients."""
    keys = Keys(settings.key_prefix)
    thresholds = Thresholds(settings.idle_after, settings.away_after, settings.expire_after)
    store = RedisStore(clients.commands, keys, thresholds, call_timeout=settings.redis_call_timeout)
    # One clock for every node: Redis's, through this node's offset to it (refreshed by each
    # lease renewal), for heartbeats, sweeps, releases and token expiry alike.
    clock = NodeClock(tolerance=settings.max_clock_skew)
    service = PresenceService(
        store,
        clock.time,
        leave_grace=settings.leave_grace,
        lease_ttl=settings.lease_ttl,
    )
    if settings.jwt_secret is None:
        log.warning("using the built-in DEV JWT secret: anyone can mint tokens for this node")
    node: Node

    async def snapshot(study_id: str) -> Outgoing:
        return await snapshot_message(node, study_id)

    # Sockets of one study (connecting, or resynced after a Redis outage) share one read and
    # one encoded snapshot.
    snapshots = Coalescer(snapshot)
    metrics = Metrics()
    stats_store = RedisStats(
        clients.commands, keys, thresholds, call_timeout=settings.redis_call_timeout
    )

    def swept(seconds: float, report: SweepReport) -> None:
        metrics.sweep_duration.observe(seconds)
        metrics.sweep_transitions.inc(report.events)

    node = Node(
        settings=settings,
        redis=clients.commands,
        store=store,
        service=service,
        snapshots=snapshots,
        # The domain's fan-out gets the Redis side as its Protocols: the pub/sub links, and
        # channel names from keys.py.
        fanout=Fanout(
            clients.subscriptions(link_tuning(settings)),
            keys.channel,
            snapshots,
            metrics.delivered,
            clock=clock,
            batch_threshold=settings.batch_threshold,
            batch_window=settings.batch_window,
        ),
        sweeper=Sweeper(service, settings.sweep_interval, swept),
        leases=LeaseKeeper(service, settings.lease_ttl, clock=clock),
        verifier=TokenVerifier.from_settings(settings, clock.time),
        rest_heartbeats=KeyedBuckets(settings.rest_heartbeat_rate, settings.rest_heartbeat_burst),
        metrics=metrics,
        # Read at the node's clock as it is then (tests may replace node.clock).
        stats=OperatorStats(stats_store, lambda: node.clock.time(), settings.lease_ttl),
        stats_writer=StatsWriter(
            stats_store, lambda: node.leases.node_id, lambda: node.report(), settings.stats_interval
        ),
        clock=clock,
    )
    _register_readings(node, store)
    return node


def link_tuning(settings: Settings) -> LinkTuning:
    """How the node's pub/sub links are watched and replaced (PRESENCE_PUBSUB_*)."""
    return LinkTuning(
        subscribe_timeout=settings.pubsub_subscribe_timeout,
        ping_after=settings.pubsub_ping_after,
        dead_after=settings.pubsub_dead_after,
        backoff_first=settings.pubsub_backoff_first,
        backoff_cap=settings.pubsub_backoff_cap,
        gather=settings.pubsub_gather,
    )


def _register_readings(node: Node, store: RedisStore) -> None:
    gauges: list[tuple[str, str, Callable[[], float]]] = [
        ("presence_websocket_connections", "Open WebSockets.", lambda: node.open_sockets),
        (
            "presence_websocket_watchers",
            "Open WebSockets that only watch (no heartbeat yet).",
            lambda: sum(node.fanout.watchers().values()),
        ),
        ("presence_subscribed_studies", "Study channels subscribed.", lambda: node.fanout.studies),
        ("presence_leases_held", "Sessions this node's sockets hold.", lambda: node.leases.held),
        ("presence_pubsub_connected", "1 while pub/sub is up.", lambda: node.fanout.connected),
        ("presence_pubsub_links", "Pub/sub connections open.", lambda: node.fanout.links),
        ("presence_clock_skew_seconds", "Clock minus Redis's.", lambda: node.leases.clock.skew),
    ]
    counters: list[tuple[str, str, Callable[[], float]]] = [
        ("presence_events_published", "Events published.", lambda: store.events_published),
        ("presence_redis_errors", "Redis unreachable on a call.", lambda: store.redis_errors),
        ("presence_pubsub_reconnects", "Pub/sub reconnects.", lambda: node.fanout.reconnects),
        ("presence_slow_consumers_dropped", "Sockets closed 1013.", lambda: node.slow_consumers),
        ("presence_envelopes_dropped", "Invalid envelopes.", lambda: node.fanout.dropped_messages),
        ("presence_batches_sent", "presence.batch frames built.", lambda: node.fanout.batches_sent),
        (
            "presence_batch_superseded",
            "Messages left out of batches: a later one of the tick superseded them.",
            lambda: node.fanout.superseded_messages,
        ),
        ("presence_dead_node_leases_released", "Reaped leases.", lambda: node.leases.released_dead),
        (
            "presence_stale_leases_released",
            "Own leases no open socket held, released by the periodic pass.",
            lambda: node.leases.released_stale,
        ),
    ]
    for name, documentation, read in gauges:
        node.metrics.gauge(name, documentation, read)
    for name, documentation, read in counters:
        node.metrics.counter(name, documentation, read)


def cors(settings: Settings) -> Middleware:
    """CORS for REST calls from pages of other origins: those of PRESENCE_ALLOWED_ORIGINS, or
    any when it is empty (as for WebSockets). Credentials stay off: tokens travel in the
    Authorization header, never in cookies."""
    return Middleware(
        Cors,
        allow_origins=settings.allowed_origins or ["*"],
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        allow_credentials=False,
        expose_headers=["Retry-After", "X-Request-ID", "WWW-Authenticate"],
        max_age=600,
    )


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the node's background tasks and wait for them to end.

    A cancel can be lost: on Python 3.11, `asyncio.wait_for` (which redis-py uses for every
    socket write) swallows it when the inner call finishes in the same loop step, and the task
    then runs on. So the cancel is repeated until every task has ended.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    await asyncio.gather(*tasks, return_exceptions=True)


def create_app(settings: Settings, redis: Any = None) -> Starlette:
    """The node's ASGI app. Without `redis`, it connects as `settings` say at start-up."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if redis is not None:
            if is_cluster(redis):
                await redis.initialize()  # the slot map, before anything is routed by it
            clients = RedisClients.around(redis)
        else:
            clients = await connect(settings)
        node = build_node(settings, clients)
        app.state.node = node
        await node.leases.start()
        keeper = asyncio.create_task(node.leases.run(), name="leases")
        tasks = [
            asyncio.create_task(node.fanout.run(), name="fanout"),
            asyncio.create_task(node.sweeper.run(), name="sweeper"),
            keeper,
            asyncio.create_task(node.stats_writer.run(), name="stats"),
        ]
        log.info("node %s ready (key prefix %r)", node.leases.node_id, settings.key_prefix)
        try:
            yield
        finally:
            node.draining = True
            # By now the server has closed every socket (1012) and their leases are released.
            # The keeper's loop ends first: a tick retrying releases holds them out of sight of
            # shutdown() until it ends (cancelled, it hands them back), and a renewal running
            # alongside could register the node again after shutdown() dropped it. The other
            # tasks touch no lease: they stop after, as before.
            await _stop([keeper])
            try:
                await asyncio.wait_for(node.leases.shutdown(), RELEASE_TIMEOUT)
            except Exception as exc:
                log.error("releasing leases at shutdown failed (peers will reap them): %s", exc)
            await _stop(tasks)
            # Its report would expire anyway: a Redis that does not answer gets a second only.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(node.stats_writer.close(), 1.0)
            await node.fanout.close()
            await node.store.close()
            await clients.aclose()

    # Starlette, with presence sockets handed straight to their endpoint (ws_entry.py).
    return NodeApp(
        routes=[
            *ROUTES,
            *stats.ROUTES,
            *dashboard.ROUTES,
            *CLIENT_ROUTES,
            *DEMO_ROUTES,
            WebSocketRoute("/ws/presence", presence_socket),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        # Request/connection ids for the logs and X-Request-ID (pure ASGI: nothing per message),
        # then CORS for REST from other origins (WebSockets pass through it untouched), then
        # REST heartbeats straight to their endpoint (the hottest REST call; rest.py says how).
        middleware=[Middleware(RequestIdMiddleware), cors(settings), Middleware(HeartbeatShortcut)],
        lifespan=lifespan,
    )
