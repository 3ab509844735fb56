"""The storage interfaces the service is written against, and their contracts.

Two contracts, because the code splits there: `PresenceStore` keeps sessions and publishes their
events; `NodeRegistry` keeps which nodes are alive and the sessions their connections hold.
`Store` is both, as the service needs them. `redis/store.py` checks statically that RedisStore
satisfies each.

What holds for both:
- Whatever the number of nodes sharing the store, each call behaves as described.
- Times are integer milliseconds since the epoch on one clock shared by every node (the
  store's: nodes read it through presence_svc.clock.NodeClock), supplied by the caller. Node
  liveness is the exception: renewals and reaps take the store's own time when they are
  applied, so a call delayed on its way (a paused store, a paused node) is not dated by when
  it was sent. They accept an explicit time for tests only.
- A call that cannot reach the backing store raises StoreUnavailable (it may be retried).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from presence_svc.models import (
    CursorUpdate,
    Holder,
    Lease,
    Session,
    StudyPage,
    StudyPresence,
    SweepReport,
)


class StoreUnavailable(Exception):
    """The backing store cannot be reached right now; the call may be retried."""


class NodeRenewal(NamedTuple):
    """What a node's renewal found: whether it was still alive, and the store time it was
    renewed at (ms; also how a node measures its clock's offset to the store's)."""

    alive: bool
    at_ms: int


class PresenceStore(Protocol):
    """Sessions of users in studies, and the events their changes publish.

    Contract:
    - `heartbeat` creates or refreshes the (user, study) session and, atomically with the change,
      raises the study's seq and publishes one event per change: `user_joined` for a new
      session; `user_active` when it was idle or away; `cursor_moved` when chapter or move path
      changed.
    - `leave` deletes the session and publishes `user_left`; without a session it does nothing.
    - A heartbeat with a `holder` (a WebSocket connection) makes it hold the session: a held
      session still turns idle and away by heartbeat age but does not expire. `release` ends
      holds; a session no connection holds any more leaves at the given time (a pending leave)
      unless a heartbeat comes first. Every heartbeat calls off a pending leave, except one whose
      holder was already released (sent before the release, it reached the store after it):
      it counts as a heartbeat but holds nothing, and the release's leave time still stands.
    - `sweep` applies every transition due at `now_ms` (idle, away, expiry or pending leave with
      `user_left`) to the studies due for a sweep, each transition published exactly once even
      when several nodes sweep at the same moment. Its cost follows the number of due studies
      and sessions.
    - `presence` returns the sessions of a study (every one, or the `max_users` with the most
      recent heartbeats) together with the seq of the last event they reflect and the study's
      sessions by status, read atomically: events with a higher seq happened after the
      snapshot. `page` returns one page of them in user_id order (the first `limit` after a
      user id), read atomically with its seq and counts the same way; walking the pages by
      their `next` lists every session present throughout the walk exactly once, whoever
      joins or leaves meanwhile. Counts: a session whose last heartbeat is at or below the
      sweep's away watermark is away, else at or below its idle watermark idle, else active
      (which is what the sweep has stored: it applies every transition up to its watermarks).
    - seq rises by exactly one per published presence event of a study.
    - `publish_signal` publishes an envelope on the study's channel as it is given: nothing is
      stored and no seq is raised, so it reaches only those subscribed at that moment.
    """

    async def heartbeat(
        self,
        user_id: str,
        study_id: str,
        cursor: CursorUpdate,
        now_ms: int,
        holder: Holder | None = None,
        steady: bool = False,
    ) -> Session:
        """Record a heartbeat (held by `holder`, if given); returns the session after it.

        A heartbeat by a holder that was already released, for a session that no longer
        exists (a late heartbeat of a closed socket), stores and publishes nothing: the Session
        returned then has an empty `session_id`.

        `steady` says the caller knows an earlier heartbeat of `holder` already held the
        session and scheduled its study, so the store may skip what that did; it must check
        that the hold still stands and otherwise record the heartbeat as without `steady`.
        """
        ...

    async def release(self, leases: Sequence[Lease], leave_at_ms: int, now_ms: int) -> int:
        """End these holds; returns how many sessions got a pending leave at `leave_at_ms`."""
        ...

    async def leave(self, user_id: str, study_id: str, now_ms: int) -> bool:
        """End the session now; True if there was one."""
        ...

    async def presence(self, study_id: str, max_users: int | None = None) -> StudyPresence:
        """The study's sessions (all of them, or at most `max_users`: those with the most
        recent heartbeats), its counts by status and the seq this view reflects."""
        ...

    async def page(self, study_id: str, limit: int, after: str | None = None) -> StudyPage:
        """At most `limit` sessions in user_id order after `after` (exclusive; None: from the
        first), the study's counts and the seq, and the user id the next page starts after."""
        ...

    async def sweep(self, now_ms: int) -> SweepReport:
        """Apply the status transitions and expiries due at `now_ms` (one bounded batch)."""
        ...

    async def publish_signal(self, study_id: str, payload: bytes) -> int:
        """Publish `payload` (a signal's envelope) on the study's channel, never storing it;
        returns how many subscriptions (nodes) received it."""
        ...


class NodeRegistry(Protocol):
    """Which nodes are alive, and the holds (leases) their connections have on sessions.

    Contract:
    - Nodes prove they are alive with `renew_node` (one call renews every lease the node's
      connections hold), stamped with the store's time at the moment it is applied.
    - `reap_dead_nodes` releases the leases of nodes silent for the lease TTL by the store's
      clock, as `PresenceStore.release` would: their sessions leave a whole grace after the
      reap, however late it runs, unless a heartbeat comes first. It never reaps the calling
      node. Each dead node's leases are released by one node, and a cleanup cut short by the
      death of the node doing it is taken over later.
    - `reacquire` lets a node declared dead by mistake hold its sessions again (with fresh
      holders: a reap still running on the old ones could otherwise undo the new holds).
    - `drop_node` forgets a node that stopped cleanly, after it released its leases.
    - `leases_of` lists the leases the store records for a node (what a reap of it would
      release), read in bounded pages: a lease added or removed while it reads may or may not
      be in it. A node compares it with its open sockets to release the leases a call that
      arrived out of order (after its socket's release) left behind.
    """

    async def renew_node(self, node_id: str, now_ms: int | None = None) -> NodeRenewal:
        """Renew the node's liveness and leases at the store's time (`now_ms`: tests only);
        `alive` is False if it had been declared dead."""
        ...

    async def reacquire(self, leases: Sequence[Lease]) -> list[bool]:
        """Hold these sessions again; False for each that has ended."""
        ...

    async def drop_node(self, node_id: str) -> None:
        """Forget a node that stopped cleanly."""
        ...

    async def leases_of(self, node_id: str) -> list[Lease]:
        """The leases the store lists for the node, each once."""
        ...

    async def reap_dead_nodes(
        self, caller: str, lease_ttl_ms: int, grace_ms: int, now_ms: int | None = None
    ) -> int:
        """Release the leases of dead nodes other than `caller` (at the store's time;
        `now_ms`: tests only); returns how many."""
        ...


class Store(PresenceStore, NodeRegistry, Protocol):
    """Both contracts, as one backing store provides them."""
