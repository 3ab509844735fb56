"""What operators see (GET /stats, GET /presence/{study_id}/stats, the dashboard), and the loop
by which every node reports itself for it.

No read here goes through every session of every study. Each node writes its own counts
(sockets, watchers, watched studies, leases, events published) to three small hashes of its
own, on a timer of its own (`StatsWriter`); the reads (`OperatorStats`, what the transport
calls) take the live nodes from the node registry, those hashes, and per study only counts of
its index by heartbeat age (redis/stats.py says what each costs).

A watcher is a WebSocket that has sent no heartbeat yet: it watches without being present.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Snapshots carry these counts too: a domain value, re-exported for the stats' importers.
from presence_svc.models import StatusCounts as StatusCounts
from presence_svc.store import StoreUnavailable

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

# Every this many writes (and after a failed one) a node rewrites its counts per study (sockets
# and watchers) whole instead of the changes only, so a hash lost with a Redis restart is soon
# whole again.
FULL_WRITE_EVERY = 30
# Seconds the event rate is averaged over (at least one interval): a single heartbeat's burst
# is not a spike that the next write forgets.
RATE_WINDOW = 5.0
# The longest wait between two tries while writes keep failing (or the interval, if longer):
# each failure in a row doubles the wait, so a refusal that lasts (an ACL, a bug) is not
# retried and logged every interval, and a report lost meanwhile is rewritten within this.
BACKOFF_CAP = 30.0


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What one node says of itself at one moment (the writer's input)."""

    sockets: int
    studies: int
    leases: int
    events_published: int  # since the node started, by its own scripts
    watching: Mapping[str, int] = field(default_factory=dict)  # study_id -> local sockets
    # study_id -> those of its sockets that only watch (no heartbeat yet)
    watchers: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CountChanges:
    """What one write changes of a node's counts per study: `changed` counts to set, and
    `dropped` studies to delete (a whole write deletes every study not in `changed`)."""

    changed: Mapping[str, int] = field(default_factory=dict)
    dropped: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class NodeStats:
    """A live node as the registry and its own last report show it (None: no report yet)."""

    node_id: str
    seen_ms_ago: int  # since its last liveness renewal
    sockets: int | None = None
    studies: int | None = None
    leases: int | None = None
    events_per_second: float | None = None
    watchers: int | None = None  # of its sockets, those that only watch

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "seen_ms_ago": self.seen_ms_ago,
            "sockets": self.sockets,
            "watchers": self.watchers,
            "studies": self.studies,
            "leases": self.leases,
            "events_per_second": self.events_per_second,
        }


@dataclass(frozen=True, slots=True)
class StudyCount:
    study_id: str
    users: StatusCounts

    def to_json(self) -> dict[str, Any]:
        return {"study_id": self.study_id, "users": self.users.to_json()}


@dataclass(frozen=True, slots=True)
class Overview:
    """Every node, and the studies with the most users among those sampled."""

    nodes: tuple[NodeStats, ...]
    studies: int  # studies with sessions (in the sweep schedule)
    sampled: int  # studies counted: all of them unless there are more than the bound
    top: tuple[StudyCount, ...]  # most users first
    sessions: StatusCounts  # over the sampled studies

    @property
    def events_per_second(self) -> float:
        return round(sum(n.events_per_second or 0.0 for n in self.nodes), 3)

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [n.to_json() for n in self.nodes],
            "sockets": sum(n.sockets or 0 for n in self.nodes),
            "watchers": sum(n.watchers or 0 for n in self.nodes),
            "events_per_second": self.events_per_second,
            "studies": self.studies,
            "sampled": self.sampled,
            "exact": self.sampled == self.studies,
            "sessions": self.sessions.to_json(),
            "top_studies": [s.to_json() for s in self.top],
        }


@dataclass(frozen=True, slots=True)
class StudyStats:
    study_id: str
    users: StatusCounts
    watching: int  # sockets of every live node subscribed to the study
    watchers: int  # those of them that only watch (no heartbeat yet)
    seq: int

    def to_json(self) -> dict[str, Any]:
        return {
            "study_id": self.study_id,
            "users": self.users.to_json(),
            "watching": self.watching,
            "watchers": self.watchers,
            "seq": self.seq,
        }


class StatsStore(Protocol):
    """Where nodes write their reports and operators' reads come from.

    A call that cannot reach the store raises StoreUnavailable."""

    async def write_node(
        self,
        node_id: str,
        report: NodeReport,
        events_per_second: float,
        watching: CountChanges,
        watchers: CountChanges,
        *,
        whole: bool,
        ttl_ms: int,
    ) -> None:
        """Store the node's report, expiring after `ttl_ms`, with the changes of its sockets
        (`watching`) and watchers per study; `whole`: each is exactly its `changed`."""
        ...

    async def forget_node(self, node_id: str) -> None:
        """Delete the node's report (it is stopping)."""
        ...

    async def overview(self, now_ms: int, lease_ttl_ms: int) -> Overview:
        """The live nodes (renewed within `lease_ttl_ms` of `now_ms`) and the top studies."""
        ...

    async def study(self, study_id: str, now_ms: int, lease_ttl_ms: int) -> StudyStats:
        """One study's users by status, and the sockets and watchers of live nodes watching it."""
        ...


class OperatorStats:
    """The operators' reads, as of now on the node's clock: what the transport calls for
    GET /stats and GET /presence/{study_id}/stats.

    `time` is the node's clock (Redis's, seconds): the one node renewals and heartbeats are
    stamped with, so "live" and "idle" mean here what they mean to the reaper and the sweep.
    A node counts as live for `lease_ttl` seconds after its last renewal.
    """

    def __init__(self, store: StatsStore, time: Callable[[], float], lease_ttl: float) -> None:
        self._store = store
        self._time = time
        self._lease_ttl_ms = round(lease_ttl * 1000)

    async def overview(self) -> Overview:
        """Every live node with its last report, and the studies with the most users.

        Raises StoreUnavailable if the store cannot serve the read now."""
        return await self._store.overview(self._now_ms(), self._lease_ttl_ms)

    async def study(self, study_id: str) -> StudyStats:
        """One study's users by status, its seq, and the sockets of live nodes watching it
        (and how many of them only watch).

        Raises StoreUnavailable if the store cannot serve the read now."""
        return await self._store.study(study_id, self._now_ms(), self._lease_ttl_ms)

    def _now_ms(self) -> int:
        return math.floor(self._time() * 1000)


class StatsWriter:
    """Writes this node's report every `interval` seconds (only what changed of the counts
    per study). `node_id` is read at each write: a node declared dead comes back under a new id."""

    def __init__(
        self,
        store: StatsStore,
        node_id: Callable[[], str],
        report: Callable[[], NodeReport],
        interval: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._store = store
        self._node_id = node_id
        self._report = report
        self._interval = interval
        self._monotonic = monotonic
        self._sleep = sleep
        # The counts per study as last written: sockets, and watchers
        self._written: dict[str, int] = {}
        self._written_watchers: dict[str, int] = {}
        self._written_for: str | None = None  # the node id they were written for
        self._writes_since_whole = 0
        # (monotonic time, events published) of the writes within the rate window, oldest first
        self._samples: deque[tuple[float, int]] = deque()

    @property
    def ttl_ms(self) -> int:
        """A report outlives three missed writes (and a second of slack), not more."""
        return round(self._interval * 3000) + 1000

    async def run(self) -> None:
        """Write at once, then every interval, until cancelled.

        A failed write is logged and the loop goes on, whatever the error (Redis down, a
        refusal, a bug): a task that ended would leave the node out of GET /stats for good,
        without a word. Failures in a row back off, doubling the wait up to BACKOFF_CAP."""
        failures = 0
        while True:
            try:
                await self.write()
            except StoreUnavailable as exc:
                failures += 1
                log.warning("stats write failed: %s", exc)
            except Exception as exc:
                failures += 1
                # Not an outage that passes by itself: an ACL refusal, WRONGTYPE, a bug.
                log.error("stats write failed (%d in a row): %s: %s", failures, _kind(exc), exc)
            else:
                failures = 0
            await self._sleep(self._delay(failures))

    def _delay(self, failures: int) -> float:
        """Seconds until the next write, after `failures` failed writes in a row."""
        if not failures:
            return self._interval
        return min(self._interval * 2.0 ** (failures - 1), max(self._interval, BACKOFF_CAP))

    async def write(self) -> None:
        """Write the node's report now."""
        report = self._report()
        node_id = self._node_id()
        now = self._monotonic()
        whole = node_id != self._written_for or self._writes_since_whole >= FULL_WRITE_EVERY
        current, watchers = _positive(report.watching), _positive(report.watchers)
        try:
            await self._store.write_node(
                node_id,
                report,
                self._rate(now, report.events_published),
                _changes(current, self._written, whole),
                _changes(watchers, self._written_watchers, whole),
                whole=whole,
                ttl_ms=self.ttl_ms,
            )
        except BaseException:
            self._written_for = None  # what Redis holds is unknown now: rewrite it whole
            raise
        self._written, self._written_watchers = current, watchers
        self._written_for = node_id
        self._writes_since_whole = 0 if whole else self._writes_since_whole + 1

    def _rate(self, now: float, events: int) -> float:
        """Events per second over the last RATE_WINDOW seconds (or the interval, if longer)."""
        window = max(RATE_WINDOW, self._interval)
        while len(self._samples) > 1 and now - self._samples[1][0] >= window:
            self._samples.popleft()
        self._samples.append((now, events))
        since, before = self._samples[0]
        if now <= since:
            return 0.0
        return round(max(0, events - before) / (now - since), 3)

    async def close(self) -> None:
        """Delete this node's report (at shutdown); a failure only leaves it to expire."""
        try:
            await self._store.forget_node(self._node_id())
        except StoreUnavailable as exc:
            log.info("node stats left to expire: %s", exc)
        except Exception as exc:
            # Never raised into the shutdown, which still has the fan-out and store to close.
            log.warning("node stats left to expire: %s: %s", _kind(exc), exc)


def _positive(counts: Mapping[str, int]) -> dict[str, int]:
    # A study whose count fell to 0 is dropped from the hash, not written as 0.
    return {study: n for study, n in counts.items() if n > 0}


def _changes(current: dict[str, int], written: dict[str, int], whole: bool) -> CountChanges:
    if whole:
        return CountChanges(current)
    changed = {s: n for s, n in current.items() if written.get(s) != n}
    return CountChanges(changed, [s for s in written if s not in current])


def _kind(exc: BaseException) -> str:
    return type(exc).__name__
