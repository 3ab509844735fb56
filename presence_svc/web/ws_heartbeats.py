"""A socket's heartbeats in flight: up to HEARTBEATS_IN_FLIGHT store calls, answered in order."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from presence_svc.models import CursorUpdate
from presence_svc.node import Node
from presence_svc.store import StoreUnavailable
from presence_svc.web import stepping
from presence_svc.web.ws_connection import Connection, error_message

log = logging.getLogger(__name__)

HEARTBEATS_IN_FLIGHT = 16  # per socket; reading pauses beyond it


class Heartbeats:
    """A socket's heartbeats in flight, each a store call run without a Task of its own.

    A Task per heartbeat (its creation and registration, a loop turn to start it, another to
    report it done) cost more than parsing the message. A heartbeat's first step runs at once
    in the reader, which queues its Redis commands; every future it then waits on resumes it
    from that future's done callback, as a Task would (stepping.py: what that relies on).

    Once a full heartbeat of the socket has come back stored, the rest are steady (one script,
    no lease SADD, no scheduling; leases.LeaseKeeper.steady says when that knowledge is
    dropped): each full one carries the keeper's generation to its answer, to confirm it.
    """

    __slots__ = (
        "_conn",
        "_connection_id",
        "_counted",
        "_idle",
        "_leases",
        "_ok",
        "_slot",
        "_study_id",
        "_user_id",
        "in_flight",
    )

    def __init__(
        self, node: Node, conn: Connection, connection_id: str, user_id: str, study_id: str
    ) -> None:
        self._leases = node.leases
        self._counted = node.metrics.heartbeats
        self._ok: Any = None  # its counter, looked up once, at the first success
        self._conn = conn
        self._connection_id = connection_id
        self._user_id = user_id
        self._study_id = study_id
        self.in_flight = 0
        self._slot: asyncio.Future[None] | None = None  # the reader waits here when too many
        self._idle: asyncio.Future[None] | None = None  # the closing socket waits here

    def start(self, cursor: CursorUpdate) -> asyncio.Future[None] | None:
        """Send one heartbeat; a future to await first if too many are in flight."""
        self.in_flight += 1
        leases = self._leases
        steady = leases.steady(self._connection_id)
        done = (
            self._finished if steady else functools.partial(self._finished_full, leases.generation)
        )
        try:
            call = leases.heartbeat(
                self._connection_id, self._user_id, self._study_id, cursor, steady
            )
        except BaseException as exc:
            done(exc)
        else:
            stepping.drive(call, done)
        if self.in_flight < HEARTBEATS_IN_FLIGHT:
            return None
        self._slot = asyncio.get_running_loop().create_future()
        return self._slot

    def idle(self) -> asyncio.Future[None] | None:
        """A future done when no heartbeat is in flight any more; None if none is."""
        if not self.in_flight:
            return None
        self._idle = asyncio.get_running_loop().create_future()
        return self._idle

    def _finished_full(self, generation: int, outcome: BaseException) -> None:
        # A stored session: the heartbeat held it (or its connection was released, which the
        # store's check of a steady heartbeat finds and answers with a full one).
        if type(outcome) is StopIteration and outcome.value.session_id:
            self._leases.confirm(self._connection_id, generation)
        self._finished(outcome)

    def _finished(self, outcome: BaseException) -> None:
        try:
            if type(outcome) is StopIteration:
                if self._ok is None:
                    self._ok = self._counted.labels("websocket", "ok")
                self._ok.inc()
            elif isinstance(outcome, StoreUnavailable):
                self._leases.heartbeat_failed()
                self._counted.labels("websocket", "unavailable").inc()
                self._conn.deliver(error_message("unavailable", "presence storage is unreachable"))
            elif isinstance(outcome, asyncio.CancelledError):
                pass
            elif isinstance(outcome, Exception):
                self._leases.heartbeat_failed()
                self._counted.labels("websocket", "internal").inc()
                log.error(
                    "heartbeat of %s in %s failed", self._user_id, self._study_id, exc_info=outcome
                )
                self._conn.deliver(error_message("internal", "the heartbeat could not be recorded"))
            else:
                raise outcome  # KeyboardInterrupt, SystemExit: as a Task would
        finally:
            self.in_flight -= 1
            if self._slot is not None and not self._slot.done():
                self._slot.set_result(None)
            if not self.in_flight and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)
