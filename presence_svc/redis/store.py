"""PresenceStore and NodeRegistry on Redis: session hashes, a sorted set per study, Lua scripts.

See docs/redis-protocol.md for the keys and fields; `lua/` for each operation.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from presence_svc.models import (
    CursorUpdate,
    Holder,
    Lease,
    Session,
    Status,
    StudyPage,
    StudyPresence,
    SweepReport,
    Thresholds,
    iso_from_ms,
)
from presence_svc.redis.batch import TIMEOUT, Batcher, Command
from presence_svc.redis.calls import (
    call,
    lease_member,
    reachable,
    reachable_per_step,
    text,
)
from presence_svc.redis.cluster import ClusterBatcher, is_cluster
from presence_svc.redis.keys import Keys
from presence_svc.redis.nodes import RedisNodes
from presence_svc.redis.scripts import Scripts
from presence_svc.redis.snapshots import RedisSnapshots
from presence_svc.redis.sweep import EMPTY_STUDY_TTL_MS, RedisSweep
from presence_svc.store import NodeRenewal

if TYPE_CHECKING:
    from presence_svc.store import NodeRegistry, PresenceStore

# How long a released connection id stays known to its session (past the leave time its release
# gave), and at most how many per session: a heartbeat sent before its connection's release and
# delayed past it (a stall) must find it there, and holds nothing then (lua/release.lua). A
# delay that long outlasts TCP's own retries; 100 ids per session fit a listpack.
RELEASED_KEEP_MS = 3600 * 1000
RELEASED_MAX = 100


class RedisStore:
    """The Redis implementation of PresenceStore and NodeRegistry (works on fakeredis too).

    `studies_per_sweep` bounds the studies taken from each schedule shard per tick and
    `sessions_per_window` the sessions read per threshold window of a study; a tick cut by
    either reports `more_due` so the sweeper goes on at once.

    Every call has a deadline, `call_timeout` seconds (its own, or each of its Redis steps'
    where noted), past which it fails with StoreUnavailable like any other way Redis can fail.
    """

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        thresholds: Thresholds,
        *,
        studies_per_sweep: int = 500,
        sessions_per_window: int = 1000,
        call_timeout: float = TIMEOUT,
    ) -> None:
        self._redis = redis
        self.call_timeout = call_timeout  # seconds (calls.reachable)
        self._keys = keys
        cluster = is_cluster(redis)
        self._scripts = Scripts.register(redis)
        # Sharded pub/sub on Redis Cluster: a channel stays on its slot's shard instead of being
        # broadcast over the cluster bus. The publishing scripts accept these two values only.
        self._publish = "SPUBLISH" if cluster else "PUBLISH"
        self._batch: Batcher | ClusterBatcher = (
            ClusterBatcher(redis, self._scripts.sources(), timeout=call_timeout)
            if cluster
            else Batcher(redis, self._scripts.sources(), timeout=call_timeout)
        )
        # Looked up at each call, so whatever `release` the store has then is what reaping uses.
        self._nodes = RedisNodes(
            redis, keys, self._scripts, self._batch, lambda *lease: self.release(*lease)
        )
        self.events_published = 0  # by this store's scripts (for the node's metrics)
        self.redis_errors = 0  # calls that failed because Redis was unreachable
        self._idle_ms = round(thresholds.idle_after * 1000)
        self._snapshots = RedisSnapshots(redis, keys, self._scripts, self._batch)
        self._sweep = RedisSweep(
            redis,
            keys,
            self._scripts,
            self._batch,
            self._publish,
            idle_ms=self._idle_ms,
            away_ms=round(thresholds.away_after * 1000),
            expire_ms=round(thresholds.expire_after * 1000),
            studies_per_sweep=studies_per_sweep,
            sessions_per_window=sessions_per_window,
        )

    async def close(self) -> None:
        """Give back the connections of the store's pipelining (at shutdown)."""
        await self._batch.close()

    @reachable_per_step  # one batched operation (two at most): the batcher keeps the deadlines
    async def heartbeat(
        self,
        user_id: str,
        study_id: str,
        cursor: CursorUpdate,
        now_ms: int,
        holder: Holder | None = None,
        steady: bool = False,
    ) -> Session:
        """Record a heartbeat (held by `holder`, if given) and schedule the study's next sweep.

        A holder already released holds nothing: its heartbeat was sent before the release and
        delayed past it, and is applied as if it had come first (lua/heartbeat.lua). Without a
        session (it has ended) such a heartbeat stores nothing and publishes nothing, and the
        Session returned is the one it would have started, marked as not stored by an empty
        `session_id` (no stored session has one). Only a closed socket's late heartbeat gets
        that answer, which nobody reads; REST heartbeats have no holder.

        `steady` (with a holder): the caller knows an earlier heartbeat of `holder` held the
        session, listed its lease and scheduled the study (leases.LeaseKeeper.steady). Then
        only heartbeat.lua runs, without the lease SADD and schedule.lua: one EVALSHA and,
        for a session that stays active, 4 commands inside. Where the holder no longer holds
        the session (a reap, a release, the session ended) the script writes nothing and the
        full heartbeat is sent instead; where the session was idle or away, schedule.lua
        follows in a second round trip.
        """
        sk = self._keys.study(study_id)
        keys = [*sk.of_session(user_id), sk.released(user_id)]
        args: list[Any] = [
            user_id,
            study_id,
            now_ms,
            iso_from_ms(now_ms),
            "",  # the session id, should this be a new session (a steady heartbeat starts none)
            "1" if cursor.sets_chapter else "0",
            cursor.chapter_id or "",
            "1" if cursor.sets_move_path else "0",
            cursor.move_path or "",
            holder.connection_id if holder is not None else "",
            self._publish,
        ]
        stored: Any = 0
        if steady and holder is not None:
            # One operation, in queue order with the socket's other heartbeats. A refusal (0)
            # wrote nothing and holds for every steady heartbeat queued behind it until the
            # full one below holds again (only a heartbeat of this connection can), so they
            # all fall back and stay in order.
            [stored] = await self._batch.run([call(self._scripts.heartbeat, keys, [*args, "1"])])
            if stored and not isinstance(stored, int) and not stored[7]:
                # It turned an idle or away session active: the schedule follows that older
                # status and must be brought to this heartbeat's due time (after the write).
                await self._batch.run(
                    [self._sweep.schedule(study_id, now_ms + self._idle_ms, now_ms)]
                )
        if isinstance(stored, int):
            args[4] = os.urandom(16).hex()
            commands: list[Command] = []
            if holder is not None:
                # Listed before it holds anything, so a node dying in between leaves no ghost. A
                # plain command ahead of the script is safe in this order (not in release's):
                # after NOSCRIPT or a failed script the lease is listed and holds nothing, which
                # a reaper or the lease-set pass releases (ending nothing), and the retry's SADD
                # is a no-op.
                commands.append(
                    (
                        "SADD",
                        self._keys.node_leases(holder.node_id),
                        lease_member(study_id, user_id, holder),
                    )
                )
            commands.append(call(self._scripts.heartbeat, keys, args))
            # Scheduling must follow the state change: lua/schedule.lua has the race it closes.
            commands.append(self._sweep.schedule(study_id, now_ms + self._idle_ms, now_ms))
            replies = await self._batch.run(commands)
            stored = replies[-2]
        if not stored:
            # No error and no exception: the ws path would log or answer one, to a closed socket.
            return Session(
                session_id="",
                user_id=user_id,
                study_id=study_id,
                chapter_id=(cursor.chapter_id or None) if cursor.sets_chapter else None,
                move_path=(cursor.move_path or None) if cursor.sets_move_path else None,
                status=Status.ACTIVE,
                last_heartbeat_ms=now_ms,
                joined_at_ms=now_ms,
            )
        session_id, chapter, move, status, beat, joined, events, _ = stored
        self.events_published += int(events)
        return Session(
            session_id=text(session_id),
            user_id=user_id,
            study_id=study_id,
            chapter_id=text(chapter) or None,
            move_path=text(move) or None,
            status=Status(text(status)),
            last_heartbeat_ms=int(beat),
            joined_at_ms=int(joined),
        )

    @reachable
    async def leave(self, user_id: str, study_id: str, now_ms: int) -> bool:
        """End the session and publish user_left; False if there was no session."""
        keys = self._keys.study(study_id).of_session(user_id)
        args = [user_id, now_ms, iso_from_ms(now_ms), EMPTY_STUDY_TTL_MS, self._publish]
        [ended] = await self._batch.run([call(self._scripts.leave, keys, args)])
        self.events_published += int(ended)  # user_left, when there was a session
        return bool(ended)

    @reachable
    async def release(self, leases: Sequence[Lease], leave_at_ms: int, now_ms: int) -> int:
        """Connections stop holding sessions; unheld sessions leave at `leave_at_ms`.

        Returns how many sessions now have a pending leave.
        """
        if not leases:
            return 0
        # One operation per lease: its scripts run in this order, and in a cluster the
        # leases' operations go to their shards side by side.
        operations: list[list[Command]] = []
        for lease in leases:
            sk = self._keys.study(lease.study_id)
            operations.append(
                [
                    call(
                        self._scripts.release,
                        sk.of_hold(lease.user_id),
                        [
                            lease.user_id,
                            lease.holder.connection_id,
                            leave_at_ms,
                            now_ms,
                            RELEASED_KEEP_MS,
                            RELEASED_MAX,
                        ],
                    ),
                    self._sweep.schedule(lease.study_id, leave_at_ms, now_ms),
                ]
            )
        replies = await asyncio.gather(*(self._batch.run(op) for op in operations))
        # Unlisted from the node's lease set only once the release is applied, in a round trip
        # of its own: in the same operation the SREM, a plain command, would run even where
        # the scripts answer NOSCRIPT (Redis restarted) or fail, and a node dying before the
        # retry would leave a held session no reaper or lease-set pass ever finds. Releases
        # are rare enough for the second round trip.
        await asyncio.gather(
            *(
                self._batch.run(
                    [
                        (
                            "SREM",
                            self._keys.node_leases(lease.holder.node_id),
                            lease_member(lease.study_id, lease.user_id, lease.holder),
                        )
                    ]
                )
                for lease in leases
            )
        )
        return sum(int(reply[0]) for reply in replies)

    @reachable
    async def renew_node(self, node_id: str, now_ms: int | None = None) -> NodeRenewal:
        """Prove the node alive (renewing all its leases) at Redis's time (or `now_ms`).

        Says whether it had been declared dead, and the Redis time it was renewed at.
        """
        return await self._nodes.renew(node_id, now_ms)

    @reachable
    async def reacquire(self, leases: Sequence[Lease]) -> list[bool]:
        """Hold sessions again after the node was declared dead; False where one has ended."""
        return await self._nodes.reacquire(leases)

    @reachable
    async def drop_node(self, node_id: str) -> None:
        """Forget a node that stopped cleanly (after releasing its leases).

        A node whose lease set still lists leases is kept as it is: its liveness entry runs
        out, and a peer reaps those leases (a release must never be lost).
        """
        await self._nodes.drop(node_id)

    @reachable_per_step  # one page per step, each with its deadline: bounded, not cut as a whole
    async def leases_of(self, node_id: str) -> list[Lease]:
        """The leases the node's lease set lists, each once (malformed members are logged
        and skipped).

        Cost: one `SSCAN` round trip per page of about `nodes.LEASE_PAGE` members, so
        ceil(leases / LEASE_PAGE) reads; nothing is written.
        """
        return await self._nodes.leases_of(node_id)

    @reachable_per_step  # long, and resumable: each step has the deadline, not the whole
    async def reap_dead_nodes(
        self, caller: str, lease_ttl_ms: int, grace_ms: int, now_ms: int | None = None
    ) -> int:
        """Release the leases of nodes other than `caller` silent for `lease_ttl_ms` (on Redis's
        clock, or at `now_ms`); returns leases released.

        Their sessions leave `grace_ms` after the reap unless their users reconnect. A cleanup
        interrupted by the death of its own node is taken over after a while.
        """
        return await self._nodes.reap(caller, lease_ttl_ms, grace_ms, now_ms)

    @reachable
    async def presence(self, study_id: str, max_users: int | None = None) -> StudyPresence:
        """The study's seq, its sessions by status, and its sessions: every one, or the
        `max_users` with the most recent heartbeats (`complete` says which), listed by
        (joined_at, user_id).

        Read atomically by lua/snapshot.lua, which must be told the key of each session it
        lists: a selection that changed between the plain read naming it and the script (a
        join; in a capped read, also a heartbeat moving someone into the top) makes it run
        again, up to redis/snapshots.SNAPSHOT_ATTEMPTS times. When that keeps racing (a
        reconnect storm, a busy room's heartbeats), the last resort reads the sessions that
        last run selected right after it: seq and counts are still read together, but the
        sessions may already reflect some events numbered above the seq, which a client
        applying the following events in order converges from.
        """
        return await self._snapshots.presence(study_id, max_users)

    @reachable
    async def page(self, study_id: str, limit: int, after: str | None = None) -> StudyPage:
        """The first `limit` sessions of the study after user id `after` (exclusive; None:
        from the first) in user_id order, with the seq and the counts of the whole study, read
        atomically by lua/page.lua with the same retries and last resort as `presence`.
        `next` is the page's last user id when more follow, else None.

        Costs O(n) in Redis for a study of n sessions (redis/snapshots.py has the figures).
        """
        return await self._snapshots.page(study_id, limit, after)

    @reachable
    async def sweep(self, now_ms: int) -> SweepReport:
        """One bounded sweep tick: due studies from the schedule, then scan, apply, reschedule."""
        report = await self._sweep.sweep(now_ms)
        self.events_published += report.events
        return report

    @reachable
    async def publish_signal(self, study_id: str, payload: bytes) -> int:
        """PUBLISH (SPUBLISH on a cluster) a signal's envelope on the study's channel; writes
        no key and raises no seq. Returns how many subscriptions received it."""
        channel = self._keys.channel(study_id)
        [receivers] = await self._batch.run([(self._publish, channel, payload)])
        return int(receivers)


if TYPE_CHECKING:
    # Static proof that RedisStore keeps both contracts of store.py (mypy checks the
    # signatures of every method against the Protocols).
    _presence_store: type[PresenceStore] = RedisStore
    _node_registry: type[NodeRegistry] = RedisStore
