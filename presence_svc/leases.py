"""This node's WebSocket leases: which sessions its open connections hold.

A connection holds its (user, study) session from its first heartbeat until it closes. The
node proves itself alive every third of the lease TTL, which renews every lease it holds in one
Redis call; nodes silent for a whole TTL (by Redis's clock) are declared dead by their peers,
whose sessions then leave after the grace period unless their users reconnect elsewhere.
Releases that fail while Redis is unreachable are retried, so no session stays held by a
closed connection; and a periodic pass over the node's lease set releases what a heartbeat that
reached Redis after its socket's release left held (see `LeaseKeeper._audit`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from presence_svc.clock import NodeClock
from presence_svc.models import CursorUpdate, Holder, Lease, Session
from presence_svc.service import PresenceService
from presence_svc.store import StoreUnavailable

log = logging.getLogger(__name__)


Sleep = Callable[[float], Awaitable[None]]

# Renewals between two passes over the node's lease set when no store call failed meanwhile
# (a failure brings the next pass forward to the next renewal).
AUDIT_EVERY = 10


class LeaseKeeper:
    """Holds this node's leases and renews them every third of `lease_ttl` seconds.

    `monotonic` and `sleep` are the keeper's sense of time (the process's by default): tests
    hand in a clock they move, so a renewal interval takes no real time to pass. `clock` is
    the node's shared clock, whose offset to Redis's each renewal refreshes. `audit_every` is
    how many renewals apart the passes over the node's lease set are (`_audit`).
    """

    def __init__(
        self,
        service: PresenceService,
        lease_ttl: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        clock: NodeClock | None = None,
        audit_every: int = AUDIT_EVERY,
    ) -> None:
        self.node_id = uuid.uuid4().hex
        self.clock = clock or NodeClock()
        self._service = service
        self._monotonic = monotonic
        self._sleep = sleep
        self._ttl = lease_ttl
        self._interval = lease_ttl / 3
        self._renewed_at: float | None = None  # monotonic time of the last renewal
        self._up_since: float | None = None  # start of the current run of unbroken renewals
        self._held: dict[str, Lease] = {}  # the socket's connection id -> its lease
        self._unreleased: list[Lease] = []  # releases to retry at the next tick
        self._releasing: set[Lease] = set()  # releases of closing sockets, not yet confirmed
        self.released_dead = 0  # leases of dead nodes this node released
        self._audit_every = audit_every
        self._renewals_since_audit = 0
        self._store_failed = False  # a store call failed since the last pass began
        self.released_stale = 0  # leases of this node no open socket held, released by a pass
        # Sockets whose next heartbeat may be steady (`steady`), and the count of the times
        # that knowledge was dropped for every socket at once (`confirm` compares it).
        self._steady: set[str] = set()
        self.generation = 0

    @property
    def held(self) -> int:
        return len(self._held)

    def heartbeat(
        self,
        connection_id: str,
        user_id: str,
        study_id: str,
        cursor: CursorUpdate,
        steady: bool = False,
    ) -> Awaitable[Session]:
        """A heartbeat over a WebSocket: the connection now holds the session. `steady` only
        where `steady(connection_id)` said so (PresenceStore.heartbeat)."""
        lease = self._held.get(connection_id)
        if lease is None:
            lease = Lease(study_id, user_id, Holder(self.node_id, connection_id))
            self._held[connection_id] = lease
        # The service's awaitable itself: no coroutine frame of our own on the hottest path.
        return self._service.heartbeat(user_id, study_id, cursor, lease.holder, steady)

    def steady(self, connection_id: str) -> bool:
        """Whether the connection's next heartbeat may be steady: a full heartbeat of its
        current lease came back stored (so the session was held, the lease listed and the
        study scheduled, lua/heartbeat.lua), and since then no store call of this node failed,
        the node was not found dead and the lease-set pass did not miss the lease.

        The store still checks in Redis that the hold stands; this is what only the node
        knows: that nothing may have lost what that heartbeat wrote elsewhere (a failover
        dropping acknowledged writes shows as failed calls first).
        """
        return connection_id in self._steady

    def confirm(self, connection_id: str, generation: int) -> None:
        """A full heartbeat of the connection, sent when `generation` was current, came back
        stored: its next heartbeats may be steady, unless that knowledge was dropped since."""
        if generation == self.generation and connection_id in self._held:
            self._steady.add(connection_id)

    def heartbeat_failed(self) -> None:
        """A heartbeat failed: what it (or a call around it) wrote may be lost or only partly
        applied, for any socket, so every socket's next heartbeat is a full one."""
        self._forget_steady()

    def _forget_steady(self) -> None:
        self._steady.clear()
        self.generation += 1

    async def release(self, connection_id: str) -> None:
        """The connection closed; its session leaves after the grace unless held elsewhere.

        Never raises for a release that failed (nor loses it): until Redis confirms it, the
        lease is retried at every tick, and shutdown releases it too.
        """
        lease = self._held.pop(connection_id, None)
        self._steady.discard(connection_id)
        if lease is None:
            return
        self._releasing.add(lease)
        try:
            await self._service.release([lease])
        except BaseException as exc:
            # Whatever cut it short (Redis gone, a deadline, the socket's task cancelled), it
            # may not have been applied; and calls left on a dropped connection may yet be.
            self._unreleased.append(lease)
            self._store_failed = True
            self._forget_steady()
            if not isinstance(exc, Exception):
                raise
            log.warning("release of %s deferred: %s", connection_id, exc)
        finally:
            self._releasing.discard(lease)

    async def start(self) -> None:
        """Register the node before it serves anyone (or, if Redis is down, at the next tick);
        the registration also gives the node's clock its first offset to Redis's."""
        try:
            await self._renew()
            self._renewed_at = self._up_since = self._monotonic()
        except StoreUnavailable as exc:
            log.warning("node registration deferred: %s", exc)

    async def _renew(self) -> bool:
        """Renew this node's liveness; False if it had been declared dead. The Redis time in
        the reply refreshes the clock's offset (one reading per tick)."""
        sent = self.clock.local.time()
        renewal = await self._service.renew_node(self.node_id)
        self.clock.observe(renewal.at_ms / 1000, sent, self.clock.local.time())
        return renewal.alive

    async def run(self) -> None:
        """Renew, retry deferred releases, check the lease set (`_audit`) and reap dead nodes,
        until cancelled."""
        while True:
            await self._sleep(self._interval)
            try:
                await self._tick()
            except Exception as exc:
                self._store_failed = self._store_failed or isinstance(exc, StoreUnavailable)
                self._forget_steady()
                log.warning("lease renewal failed: %s", exc)

    async def _tick(self) -> None:
        alive = await self._renew()
        # Timed when the renewal came back, not when it left: one that waited a TTL behind a
        # paused Redis ends the run of unbroken renewals, like a failed one.
        renewed = self._monotonic()
        if self._renewed_at is None or renewed - self._renewed_at >= self._ttl:
            self._up_since = renewed
        self._renewed_at = renewed
        if not alive:
            await self._come_back()
        if self._unreleased:
            pending, self._unreleased = self._unreleased, []
            try:
                await self._service.release(pending)
            except BaseException:
                # Whatever cut it short (Redis gone, any other error, the loop cancelled at
                # shutdown), they are retried: shutdown() and the next tick see only
                # `_unreleased`, and a lease dropped from memory would wait for a reaper.
                self._unreleased = pending + self._unreleased
                raise
        self._renewals_since_audit += 1
        if self._store_failed or self._renewals_since_audit >= self._audit_every:
            await self._audit()
        # After an outage every peer looks dead until it renews too: reap only after a whole
        # TTL of unbroken renewals of our own, which gives live peers time to show up.
        if self._up_since is not None and renewed - self._up_since >= self._ttl:
            self.released_dead += await self._service.reap_dead_nodes(self.node_id)

    async def _audit(self) -> None:
        """Anti-entropy: release the leases the node's lease set lists that neither an open
        socket nor a release on its way accounts for.

        A heartbeat left on a connection the batcher dropped during a Redis stall can still be
        applied when Redis resumes, after its socket's release was: it lists the lease again.
        release.lua's record of released connection ids keeps such a heartbeat from holding
        the session (heartbeat.lua refuses the hold); this pass is the second line, for a
        record that has run out or a lease listed by an older version: a lease no open socket
        accounts for is released as a closed socket's is (its user leaves a grace later unless
        it heartbeats again). Kept: every lease of `_held` (a socket's lease
        is there before its first heartbeat is sent, so one the read finds is there or on its
        way out), of releases in flight and of releases to retry (those end it themselves). A
        lease released twice is a no-op, and connection ids are never reused, so a lease
        released by its own socket while the pass ran is safe to release again.

        Cost: one read of the lease set (SSCAN, about `redis.nodes.LEASE_PAGE` a round trip)
        every `audit_every` renewals, or at the renewal after a failed store call; plus a
        release per stale lease, normally none.
        """
        self._store_failed = False
        self._renewals_since_audit = 0
        node_id = self.node_id
        listed = await self._service.leases_of(node_id)
        if node_id != self.node_id:
            return  # re-held under a new id meanwhile: the old set is for the reapers
        # A steady socket's lease must be listed (its first heartbeat listed it): one that is
        # not was lost on the way (a failover); its next heartbeat is a full one, listing it.
        found = set(listed)
        self._steady.difference_update(
            [socket for socket in self._steady if self._held.get(socket) not in found]
        )
        accounted = {
            lease.holder.connection_id
            for lease in (*self._held.values(), *self._releasing, *self._unreleased)
        }
        stale = [lease for lease in listed if lease.holder.connection_id not in accounted]
        if not stale:
            return
        log.warning("releasing %d leases that no open socket holds", len(stale))
        try:
            await self._service.release(stale)
        except BaseException:
            self._unreleased.extend(stale)
            raise
        self.released_stale += len(stale)

    async def _come_back(self) -> None:
        """Peers took this node for dead (a long pause, a partition) and are releasing its
        leases while its sockets are still open: hold those sessions again.

        Under a new node id and new holder ids, so a reap still working through the old ones
        cannot undo the new holds, and the old lease set can be reaped to the end.
        """
        self.node_id = uuid.uuid4().hex
        self._forget_steady()  # the new holders have held nothing yet
        self._held = {
            socket: Lease(lease.study_id, lease.user_id, Holder(self.node_id, uuid.uuid4().hex))
            for socket, lease in self._held.items()
        }
        await self._renew()
        held = await self._service.reacquire(list(self._held.values()))
        log.warning("node was declared dead; re-held %d of %d sessions", sum(held), len(held))

    async def shutdown(self) -> None:
        """Release every lease (sessions leave after the grace) and deregister the node.

        Those whose release is still on its way too (a second release is a no-op). If they
        cannot all be released, the node is not deregistered: its lease set and liveness entry
        stay, and a peer reaps the leases once the entry has run out.
        """
        leases = [*self._held.values(), *self._unreleased, *self._releasing]
        self._held.clear()
        self._unreleased.clear()
        try:
            await self._service.release(leases)
        except BaseException:
            self._unreleased.extend(leases)
            raise
        await self._service.drop_node(self.node_id)
