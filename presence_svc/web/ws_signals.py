"""A socket's signals: the size check, its rate limit (signals.SignalLimiter) and its publishes.

Errors go back to the socket, which stays open: `signal_too_large` (data over
PRESENCE_SIGNAL_MAX_BYTES), `signal_rate_exceeded` (over the rate with MAX_HELD_NAMES other
names already held), `unavailable` (Redis could not take the publish: that signal is lost, a
newer one may be sent) and `internal`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from presence_svc.metrics import Metrics
from presence_svc.node import Node
from presence_svc.signals import MAX_HELD_NAMES, Outcome, SignalLimiter, data_size
from presence_svc.store import StoreUnavailable
from presence_svc.web.ws_connection import Connection, error_message

log = logging.getLogger(__name__)

# Seconds a closing socket waits for its publishes in flight (each ends by the Redis call
# timeout anyway) before it cancels them: a signal is worth nothing that late.
DRAIN_TIMEOUT = 1.0


def count_invalid(metrics: Metrics, problems: list[dict[str, Any]]) -> None:
    """Count a message that failed validation if it was a signal (its problems say so)."""
    if any(problem["loc"][:1] == ["signal"] for problem in problems):
        metrics.signals.labels(Outcome.INVALID.value).inc()


class Signals:
    """The signals of one socket, made at its first signal (idle sockets hold none).

    Publishing is a store call the reader does not wait for, so reading goes on while Redis
    answers. Each runs as a Task made in the order the signals leave the limiter, and its
    first step queues the PUBLISH in the store's pipeline: a socket's signals reach the
    channel in the order it sent them.
    """

    __slots__ = (
        "_conn",
        "_connection_id",
        "_counted",
        "_in_flight",
        "_limiter",
        "_max_bytes",
        "_service",
        "_study_id",
        "_user_id",
    )

    def __init__(
        self, node: Node, conn: Connection, connection_id: str, user_id: str, study_id: str
    ) -> None:
        settings = node.settings
        self._service = node.service
        self._counted = node.metrics.signals
        self._conn = conn
        self._connection_id = connection_id
        self._user_id = user_id
        self._study_id = study_id
        self._max_bytes = settings.signal_max_bytes
        self._in_flight: set[asyncio.Task[int]] = set()
        self._limiter = SignalLimiter(
            settings.signal_rate, settings.signal_burst, node.clock, self._publish
        )

    def offer(self, name: str, data: dict[str, Any]) -> None:
        """Take one valid signal message from the socket."""
        if data_size(data) > self._max_bytes:
            self._counted.labels(Outcome.TOO_LARGE.value).inc()
            self._conn.deliver(
                error_message(
                    "signal_too_large",
                    f"signal {name!r}: data is over {self._max_bytes} bytes as compact JSON",
                )
            )
            return
        outcome = self._limiter.offer(name, data)
        self._counted.labels(outcome.value).inc()
        if outcome is Outcome.DROPPED:
            self._conn.deliver(
                error_message(
                    "signal_rate_exceeded",
                    f"signal {name!r} dropped: signals of {MAX_HELD_NAMES} other names are "
                    "already waiting for the signal rate",
                )
            )

    def _publish(self, name: str, data: dict[str, Any]) -> None:
        call = self._service.signal(self._user_id, self._study_id, name, data, self._connection_id)
        task = asyncio.get_running_loop().create_task(call)
        self._in_flight.add(task)
        task.add_done_callback(functools.partial(self._published, name))

    def _published(self, name: str, task: asyncio.Task[int]) -> None:
        self._in_flight.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, StoreUnavailable):
            message = f"signal {name!r} was not sent: presence storage is unreachable"
            self._conn.deliver(error_message("unavailable", message))
            return
        log.error("signal %s of %s in %s failed", name, self._user_id, self._study_id, exc_info=exc)
        self._conn.deliver(error_message("internal", f"signal {name!r} could not be sent"))

    async def close(self) -> None:
        """The socket is closing: drop what is held, let the publishes in flight end."""
        self._limiter.close()
        if not self._in_flight:
            return
        _, late = await asyncio.wait(set(self._in_flight), timeout=DRAIN_TIMEOUT)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
