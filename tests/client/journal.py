"""Everything a PresenceClient reports, kept in order for the client tests to look at."""

from __future__ import annotations

import asyncio
import contextlib

from presence_svc.client import PresenceClient, PresenceError, PresenceEvent
from tests.support.tasks import stop
from tests.support.waiting import eventually_async


class Journal:
    """A reader of every event of one client, from the moment it is made."""

    def __init__(self, client: PresenceClient) -> None:
        self.events: list[PresenceEvent] = []
        self.ended: PresenceError | None = None
        self._stream = client.events()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self._stream:
                self.events.append(event)
        except PresenceError as exc:
            self.ended = exc

    def of(self, kind: str, user: str | None = None) -> list[PresenceEvent]:
        """Events of `kind` (about `user`, when given)."""
        return [
            e
            for e in self.events
            if e.kind == kind and (user is None or (e.user is not None and e.user.user_id == user))
        ]

    def states(self) -> list[str | None]:
        return [e.state for e in self.of("state")]

    async def wait(
        self, kind: str, user: str | None = None, count: int = 1, within: float = 10
    ) -> None:
        """Until there are `count` events of `kind` (about `user`)."""
        try:
            await eventually_async(lambda: len(self.of(kind, user)) >= count, within=within)
        except AssertionError as exc:
            seen = [(e.kind, e.user.user_id if e.user else e.state) for e in self.events]
            raise AssertionError(f"{exc}: {count} {kind} of {user}; got {seen}") from None

    async def close(self) -> None:
        self._stream.close()
        with contextlib.suppress(Exception):
            await stop(self._reader)
