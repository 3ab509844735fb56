"""The presence service: what a heartbeat, a leave, a read, a sweep and a signal mean.

Transports call this; it knows nothing of HTTP or WebSockets, and nothing of Redis beyond the
storage contracts (store.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from presence_svc.codec import encode_signal
from presence_svc.models import (
    NO_CURSOR,
    CursorUpdate,
    Holder,
    Lease,
    Session,
    StudyPage,
    StudyPresence,
    SweepReport,
)
from presence_svc.store import NodeRenewal, Store

# Seconds since the epoch on the clock all nodes share (NodeClock.time in a node).
Clock = Callable[[], float]


class PresenceService:
    def __init__(
        self,
        store: Store,
        clock: Clock = time.time,
        *,
        leave_grace: float = 10.0,
        lease_ttl: float = 5.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._grace_ms = round(leave_grace * 1000)
        self._lease_ttl_ms = round(lease_ttl * 1000)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def heartbeat(
        self,
        user_id: str,
        study_id: str,
        cursor: CursorUpdate | None = None,
        holder: Holder | None = None,
        steady: bool = False,
    ) -> Awaitable[Session]:
        """Mark the user present and active in the study, moving the cursor if given.

        Publishes user_joined for a new session, user_active if it was idle or away, and
        cursor_moved if the chapter or move path changed. With a `holder` (a WebSocket
        connection) the session stays present while that connection is open; `steady`: see
        PresenceStore.heartbeat.
        """
        # The store's awaitable itself, timed now: a coroutine of our own around it would be
        # one more frame to create and resume on the hottest path.
        return self._store.heartbeat(
            user_id,
            study_id,
            NO_CURSOR if cursor is None else cursor,
            self._now_ms(),
            holder,
            steady,
        )

    async def release(self, leases: Sequence[Lease]) -> int:
        """Connections closed: sessions no connection holds leave after the grace period."""
        now = self._now_ms()
        return await self._store.release(leases, now + self._grace_ms, now)

    async def renew_node(self, node_id: str) -> NodeRenewal:
        """Prove this node alive, at the store's time when the renewal is applied (a renewal
        that waited behind a paused store is not dated by when it was sent); `alive` is False
        if it had been declared dead meanwhile."""
        return await self._store.renew_node(node_id)

    async def reacquire(self, leases: Sequence[Lease]) -> list[bool]:
        """Hold sessions again after being declared dead by mistake."""
        return await self._store.reacquire(leases)

    async def drop_node(self, node_id: str) -> None:
        """Deregister this node at a clean shutdown."""
        await self._store.drop_node(node_id)

    async def leases_of(self, node_id: str) -> list[Lease]:
        """The leases the store lists for this node (to compare with its open sockets)."""
        return await self._store.leases_of(node_id)

    async def reap_dead_nodes(self, node_id: str) -> int:
        """Release the leases of nodes other than `node_id` (the caller) silent for the lease
        TTL by the store's clock; their users leave a whole grace after the reap."""
        return await self._store.reap_dead_nodes(node_id, self._lease_ttl_ms, self._grace_ms)

    async def leave(self, user_id: str, study_id: str) -> bool:
        """End the user's session in the study (publishing user_left); idempotent."""
        return await self._store.leave(user_id, study_id, self._now_ms())

    async def presence(self, study_id: str, max_users: int | None = None) -> StudyPresence:
        """The study's snapshot: its sessions by status and the seq of the last event the view
        includes, read atomically with its sessions: every one (None), or the `max_users` with
        the most recent heartbeats (a crowd's snapshot); `complete` says whether it lists all."""
        return await self._store.presence(study_id, max_users)

    async def page(self, study_id: str, limit: int, after: str | None = None) -> StudyPage:
        """At most `limit` of the study's sessions in user_id order, after the user id `after`
        (exclusive; None: from the first), read atomically with the study's counts and seq.
        `next` is what to pass as `after` for the next page (None: this is the last)."""
        return await self._store.page(study_id, limit, after)

    async def sweep(self) -> SweepReport:
        """Apply one batch of the idle/away/expiry transitions due now."""
        return await self._store.sweep(self._now_ms())

    async def signal(
        self,
        user_id: str,
        study_id: str,
        name: str,
        data: Mapping[str, Any],
        connection_id: str | None = None,
    ) -> int:
        """Send the study's other sockets `signal.<name>` from the user: ephemeral, not stored.

        Not a heartbeat: it changes no presence state and carries no seq. Its data names the
        sender (`user_id`, over any in `data`); `connection_id`, the socket it came from, does
        not get it back. The caller has checked the name and the size. Returns how many nodes
        received it.
        """
        payload = encode_signal(name, user_id, data, self._now_ms(), connection_id)
        return await self._store.publish_signal(study_id, payload)
