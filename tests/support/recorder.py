"""A fan-out subscriber for tests: keeps every event it is handed, and when it got each.

The other listeners of the suite sit elsewhere: EventTap (tests/support/events.py) reads the
study channels in Redis, Watcher (tests/support/clients.py) is a real WebSocket client.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from presence_svc.codec import Outgoing

WAIT = 5.0


@dataclass(eq=False)
class Recorder:
    """What Fanout delivered to one subscriber, in order, with monotonic arrival times."""

    events: list[Outgoing] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, event: Outgoing) -> None:
        self.events.append(event)
        self.times.append(time.monotonic())
        self.changed.set()

    async def wait_for(self, count: int, within: float = WAIT) -> list[Outgoing]:
        """Every event so far, once there are at least `count`; AssertionError after `within`."""
        deadline = time.monotonic() + within
        while len(self.events) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"got {self.types()}, wanted {count} events"
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return self.events

    def types(self) -> list[str]:
        """The `type` of each event, as its JSON text names it."""
        return [e.text.split('"type":"', 1)[1].split('"', 1)[0] for e in self.events]

    def snapshots(self) -> list[Outgoing]:
        """The resync snapshots (they carry a floor)."""
        return [e for e in self.events if e.floor is not None]

    def seqs(self) -> list[int | None]:
        """The seq of each event that is not a snapshot."""
        return [e.seq for e in self.events if e.floor is None]
