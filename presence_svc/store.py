"""The storage interface the service is written against, and its contract.

Contract (every implementation, whatever the number of nodes sharing it):
- `heartbeat` creates or refreshes the (user, study) session and, atomically with the change,
  raises the study's seq and publishes one event per change: `user_joined` for a new session;
  `user_active` when it was idle or away; `cursor_moved` when chapter or move path changed.
- `leave` deletes the session and publishes `user_left`; without a session it does nothing.
- `sweep` applies every transition due at `now_ms` (idle, away, expiry with `user_left`) to the
  studies due for a sweep, each transition published exactly once even when several nodes
  sweep at the same moment. Its cost follows the number of due studies and sessions.
- `presence` returns the sessions of a study together with the seq of the last event they
  reflect, read atomically: events with a higher seq happened after the snapshot.
- seq rises by exactly one per published presence event of a study.
- Times are integer milliseconds since the epoch, supplied by the caller.
"""

from __future__ import annotations

from typing import Protocol

from presence_svc.models import CursorUpdate, Session, StudyPresence, SweepReport


class StoreUnavailable(Exception):
    """The backing store cannot be reached right now; the call may be retried."""


class PresenceStore(Protocol):
    async def heartbeat(
        self, user_id: str, study_id: str, cursor: CursorUpdate, now_ms: int
    ) -> Session:
        """Record a heartbeat; returns the session as stored after it."""
        ...

    async def leave(self, user_id: str, study_id: str, now_ms: int) -> bool:
        """End the session now; True if there was one."""
        ...

    async def presence(self, study_id: str) -> StudyPresence:
        """Everyone present in the study, with the seq this view reflects."""
        ...

    async def sweep(self, now_ms: int) -> SweepReport:
        """Apply the status transitions and expiries due at `now_ms` (one bounded batch)."""
        ...
