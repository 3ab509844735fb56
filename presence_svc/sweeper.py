"""The sweep loop every node runs: apply due idle/away/expiry transitions once per interval.

Nodes sweep independently; the store's scripts make a transition happen once however many
nodes sweep the same study at the same moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from presence_svc.models import SweepReport
from presence_svc.service import PresenceService

log = logging.getLogger(__name__)

_MAX_BACKOFF = 10.0


class Sweeper:
    def __init__(
        self,
        service: PresenceService,
        interval: float,
        observe: Callable[[float, SweepReport], None] | None = None,
    ) -> None:
        self._service = service
        self._interval = interval
        self._observe = observe
        self.last_success: float | None = None  # monotonic time of the last completed tick

    async def run(self) -> None:
        """Sweep until cancelled; a failing tick is logged and retried with backoff."""
        failures = 0
        while True:
            started = time.monotonic()
            try:
                report = await self._service.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = min(self._interval * 2**failures, _MAX_BACKOFF)
                log.error("sweep failed (%d in a row), next try in %.1fs: %s", failures, delay, exc)
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.last_success = time.monotonic()
            if self._observe is not None:
                self._observe(self.last_success - started, report)
            if report.events:
                log.debug("sweep: %d studies, %d events", report.studies, report.events)
            if report.more_due:
                await asyncio.sleep(0)  # more is already due: go on, but let sockets breathe
                continue
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))
