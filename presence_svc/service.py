"""The presence service: what a heartbeat, a leave, a read and a sweep mean.

Transports call this; it knows nothing of HTTP or WebSockets, and nothing of Redis beyond the
PresenceStore contract.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from presence_svc.models import CursorUpdate, Session, StudyPresence, SweepReport
from presence_svc.store import PresenceStore

Clock = Callable[[], float]


class PresenceService:
    def __init__(self, store: PresenceStore, clock: Clock = time.time) -> None:
        self._store = store
        self._clock = clock

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def heartbeat(
        self, user_id: str, study_id: str, cursor: CursorUpdate | None = None
    ) -> Session:
        """Mark the user present and active in the study, moving the cursor if given.

        Publishes user_joined for a new session, user_active if it was idle or away, and
        cursor_moved if the chapter or move path changed.
        """
        return await self._store.heartbeat(
            user_id, study_id, cursor or CursorUpdate(), self._now_ms()
        )

    async def leave(self, user_id: str, study_id: str) -> bool:
        """End the user's session in the study (publishing user_left); idempotent."""
        return await self._store.leave(user_id, study_id, self._now_ms())

    async def presence(self, study_id: str) -> StudyPresence:
        """Everyone present in the study, with the seq of the last event the view includes."""
        return await self._store.presence(study_id)

    async def sweep(self) -> SweepReport:
        """Apply one batch of the idle/away/expiry transitions due now."""
        return await self._store.sweep(self._now_ms())
