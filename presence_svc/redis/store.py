"""PresenceStore and NodeRegistry on Redis: session hashes, a sorted set per study, Lua scripts.

See docs/redis-protocol.md for the keys and fields; `lua/` for each operation.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from presence_svc.models import (
    CursorUpdate,
    Holder,
    Lease,
    Session,
    Status,
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
    unavailable,
)
from presence_svc.redis.cluster import ClusterBatcher, is_cluster
from presence_svc.redis.keys import Keys
from presence_svc.redis.nodes import RedisNodes
from presence_svc.redis.scripts import Scripts, located
from presence_svc.store import NodeRenewal

if TYPE_CHECKING:
    from presence_svc.store import NodeRegistry, PresenceStore

log = logging.getLogger(__name__)

# How long an empty study keeps its seq (so watchers never see it go backwards meanwhile).
EMPTY_STUDY_TTL_MS = 24 * 3600 * 1000
SNAPSHOT_ATTEMPTS = 5
# How long a released connection id stays known to its session (past the leave time its release
# gave), and at most how many per session: a heartbeat sent before its connection's release and
# delayed past it (a stall) must find it there, and holds nothing then (lua/release.lua). A
# delay that long outlasts TCP's own retries; 100 ids per session fit a listpack.
RELEASED_KEEP_MS = 3600 * 1000
RELEASED_MAX = 100


@dataclass(frozen=True, slots=True)
class _DueStudy:
    schedule_key: str
    study_id: str
    score: bytes


def _session_from_hash(fields: Sequence[bytes] | dict[bytes, bytes]) -> Session:
    """A session from an HGETALL reply: a flat list (from Lua) or a dict (from redis-py)."""
    if isinstance(fields, dict):
        h = {text(k): text(v) for k, v in fields.items()}
    else:
        h = {text(fields[i]): text(fields[i + 1]) for i in range(0, len(fields), 2)}
    return Session(
        session_id=h["session_id"],
        user_id=h["user_id"],
        study_id=h["study_id"],
        chapter_id=h.get("chapter_id"),
        move_path=h.get("move_path"),
        status=Status(h["status"]),
        last_heartbeat_ms=int(h["last_heartbeat"]),
        joined_at_ms=int(h["joined_at"]),
    )


def _presence(
    study_id: str, seq: int, hashes: Sequence[Sequence[bytes] | dict[bytes, bytes]]
) -> StudyPresence:
    sessions = [_session_from_hash(flat) for flat in hashes if flat]
    sessions.sort(key=lambda s: (s.joined_at_ms, s.user_id))
    return StudyPresence(study_id, tuple(sessions), seq)


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
        self._away_ms = round(thresholds.away_after * 1000)
        self._expire_ms = round(thresholds.expire_after * 1000)
        self._studies_per_sweep = studies_per_sweep
        self._sessions_per_window = sessions_per_window

    async def close(self) -> None:
        """Give back the connections of the store's pipelining (at shutdown)."""
        await self._batch.close()

    @reachable_per_step  # one batched operation: the batcher keeps its deadline
    async def heartbeat(
        self,
        user_id: str,
        study_id: str,
        cursor: CursorUpdate,
        now_ms: int,
        holder: Holder | None = None,
    ) -> Session:
        """Record a heartbeat (held by `holder`, if given) and schedule the study's next sweep.

        A holder already released holds nothing: its heartbeat was sent before the release and
        delayed past it, and is applied as if it had come first (lua/heartbeat.lua).
        """
        sk = self._keys.study(study_id)
        commands: list[Command] = []
        if holder is not None:
            # Listed before it holds anything, so a node dying in between leaves no ghost.
            commands.append(
                (
                    "SADD",
                    self._keys.node_leases(holder.node_id),
                    lease_member(study_id, user_id, holder),
                )
            )
        commands.append(
            call(
                self._scripts.heartbeat,
                [*sk.of_session(user_id), sk.released(user_id)],
                [
                    user_id,
                    study_id,
                    now_ms,
                    iso_from_ms(now_ms),
                    os.urandom(16).hex(),  # the session id, should this be a new session
                    "1" if cursor.sets_chapter else "0",
                    cursor.chapter_id or "",
                    "1" if cursor.sets_move_path else "0",
                    cursor.move_path or "",
                    holder.connection_id if holder is not None else "",
                    self._publish,
                ],
            )
        )
        # Scheduling must follow the state change: lua/schedule.lua has the race it closes.
        commands.append(self._schedule(study_id, now_ms + self._idle_ms, now_ms))
        replies = await self._batch.run(commands)
        session_id, chapter, move, status, beat, joined, events = replies[-2]
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
        # One operation per lease: its commands run in this order, and in a cluster the
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
                    self._schedule(lease.study_id, leave_at_ms, now_ms),
                    (
                        "SREM",
                        self._keys.node_leases(lease.holder.node_id),
                        lease_member(lease.study_id, lease.user_id, lease.holder),
                    ),
                ]
            )
        replies = await asyncio.gather(*(self._batch.run(op) for op in operations))
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
    async def presence(self, study_id: str) -> StudyPresence:
        """Sessions of the study and the seq they reflect.

        Read atomically by a script that must be told every member's key; members who join
        between the plain read of the index and the script make it retry. When joins keep
        racing it (a reconnect storm), the last resort reads the seq first and the sessions
        after: the view may then already contain some events numbered above its seq, which a
        client applying the following events in order converges from.
        """
        sk = self._keys.study(study_id)
        users = {text(m) for m in await self._redis.zrange(sk.index, 0, -1)}
        for _ in range(SNAPSHOT_ATTEMPTS):
            named = sorted(users)
            keys = [sk.index, sk.meta, *(sk.session(u) for u in named)]
            [reply] = await self._batch.run([call(self._scripts.snapshot, keys, named)])
            if reply[0] == 1:
                return _presence(study_id, int(reply[1]), reply[2:])
            users.update(text(m) for m in reply[1])
        seq = int(await self._redis.hget(sk.meta, "seq") or 0)
        members = await self._redis.zrange(sk.index, 0, -1)
        async with self._redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hgetall(sk.session(text(member)))
            hashes = await pipe.execute()
        return _presence(study_id, seq, hashes)

    @reachable
    async def sweep(self, now_ms: int) -> SweepReport:
        """One bounded sweep tick: due studies from the schedule, then scan, apply, reschedule."""
        due, more = await self._due_studies(now_ms)
        if not due:
            return SweepReport()
        scans = await self._run_each([self._scan(d, now_ms) for d in due])
        scanned = [(d, scan) for d, scan in zip(due, scans, strict=True) if scan is not None]
        applies = await self._run_each([self._apply(d, scan, now_ms) for d, scan in scanned])
        done = [(d, a) for (d, _), a in zip(scanned, applies, strict=True) if a is not None]
        await self._run_each([self._reschedule(d, reply) for d, reply in done])
        events = sum(int(reply[0]) for _, reply in done)
        self.events_published += events
        # A study whose scan was cut by sessions_per_window is already due again.
        more = more or any(reply[1] and int(text(reply[1])) <= now_ms for _, reply in done)
        return SweepReport(studies=len(due), events=events, more_due=more)

    async def _due_studies(self, now_ms: int) -> tuple[list[_DueStudy], bool]:
        shards = self._keys.schedule_shards()
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrangebyscore(
                    shard,
                    "-inf",
                    now_ms,
                    start=0,
                    num=self._studies_per_sweep,
                    withscores=True,
                    score_cast_func=lambda raw: raw,
                )
            replies = await pipe.execute()
        due: list[_DueStudy] = []
        more = False
        for shard, hits in zip(shards, replies, strict=True):
            more = more or len(hits) >= self._studies_per_sweep
            due.extend(_DueStudy(shard, text(study), score) for study, score in hits)
        return due, more

    def _scan(self, due: _DueStudy, now_ms: int) -> Command:
        sk = self._keys.study(due.study_id)
        return call(
            self._scripts.sweep_scan,
            [sk.index, sk.meta, sk.leaving],
            [now_ms, self._idle_ms, self._away_ms, self._expire_ms, self._sessions_per_window],
        )

    def _apply(self, due: _DueStudy, scan: list[bytes], now_ms: int) -> Command:
        sk = self._keys.study(due.study_id)
        idle_wm, away_wm, expire_wm, *raw_users = scan
        users = [text(u) for u in raw_users]
        per_user = [key for u in users for key in (sk.session(u), sk.conns(u))]
        return call(
            self._scripts.sweep_apply,
            [sk.index, sk.meta, sk.channel, sk.leaving, *per_user],
            [
                now_ms,
                iso_from_ms(now_ms),
                self._idle_ms,
                self._away_ms,
                self._expire_ms,
                idle_wm,
                away_wm,
                expire_wm,
                EMPTY_STUDY_TTL_MS,
                self._publish,
                *users,
            ],
        )

    def _schedule(self, study_id: str, due_ms: int, now_ms: int) -> Command:
        return call(
            self._scripts.schedule, [self._keys.schedule(study_id)], [study_id, due_ms, now_ms]
        )

    def _reschedule(self, due: _DueStudy, applied: list[Any]) -> Command:
        return call(
            self._scripts.reschedule, [due.schedule_key], [due.study_id, due.score, applied[1]]
        )

    async def _run_each(self, commands: Sequence[Command]) -> list[Any]:
        """Run each command as its own operation; a failing one is logged and yields None."""
        replies = await asyncio.gather(
            *(self._batch.run([command]) for command in commands), return_exceptions=True
        )
        out: list[Any] = []
        for reply in replies:
            if isinstance(reply, BaseException) and unavailable(reply):
                raise reply
            if isinstance(reply, BaseException):
                # Logged here, not raised: worded with its script and line as `reachable` would.
                error = located(reply) if isinstance(reply, ResponseError) else reply
                log.error("sweep step failed: %s", error)
                out.append(None)
            else:
                out.append(reply[0])
        return out


if TYPE_CHECKING:
    # Static proof that RedisStore keeps both contracts of store.py (mypy checks the
    # signatures of every method against the Protocols).
    _presence_store: type[PresenceStore] = RedisStore
    _node_registry: type[NodeRegistry] = RedisStore
