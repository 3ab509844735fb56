"""A study's presence as a client sees it: a snapshot, then events applied strictly by seq.

No I/O here: the socket code feeds messages in and acts on what comes out (changes to report,
or a gap that calls for a fresh snapshot). The rules are the server's (README, "Event
reference"): `seq` rises by exactly 1 per event, a snapshot carries the seq it reflects, and
a snapshot taken during a burst may already include a few events above its seq, so applying
an event is an idempotent upsert rather than an assertion about the previous state.

Big rooms (issue 13): a batch (`presence.batch`) is applied as one step whose seqs need not be
contiguous, and a snapshot may list only some of the users (`complete` false) while `counts`
covers everyone; the counts are then kept exact from the events' `previous_status`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from presence_svc.client import fields
from presence_svc.client.fields import MalformedMessage as MalformedMessage

PRESENCE_PREFIX = "presence."
SNAPSHOT = "presence.snapshot"
BATCH = "presence.batch"
USER_JOINED = "presence.user_joined"
USER_LEFT = "presence.user_left"
# Events other than these (say, a newer server's) still advance seq and update the user.
KNOWN_EVENTS = frozenset(
    {
        USER_JOINED,
        USER_LEFT,
        "presence.user_active",
        "presence.user_idle",
        "presence.user_away",
        "presence.cursor_moved",
    }
)

STATUS_EVENTS = frozenset({"presence.user_active", "presence.user_idle", "presence.user_away"})
STATUSES = ("active", "idle", "away")

ChangeKind = Literal["join", "leave", "status", "cursor"]


@dataclass(frozen=True, slots=True)
class User:
    """One present user: their status and cursor, as the last snapshot or event left them."""

    user_id: str
    status: str
    chapter_id: str | None = None
    move_path: str | None = None
    session_id: str | None = None
    joined_at: str | None = None  # ISO-8601, when the snapshot or join event said so
    updated_at: str | None = None  # ISO-8601: last heartbeat (snapshot) or the last event's time


@dataclass(frozen=True, slots=True)
class Change:
    """What an applied snapshot or event changed for one user."""

    kind: ChangeKind
    user: User  # after the change; for a leave, as last known
    # Before the change; None for a join, and for the first event of a user a partial list
    # did not show (a snapshot with `complete` false).
    previous: User | None = None


class Verdict(enum.Enum):
    APPLIED = "applied"  # in order; its changes (maybe none) are returned
    STALE = "stale"  # at or below the current seq: already reflected, dropped
    BUFFERED = "buffered"  # before the socket's snapshot: kept until it arrives
    GAP = "gap"  # events are missing: only a fresh snapshot can tell the state


@dataclass(frozen=True, slots=True)
class _Early:
    """Events that came before the socket's snapshot: one event, or one batch's."""

    first: int  # the seq it starts from (a batch's first_seq)
    last: int | None  # a batch's last_seq; None for a single event
    events: tuple[tuple[int, str, Mapping[str, Any]], ...]


# One event of a batch after it was applied: its changes, or None for a message that is not a
# presence event (a signal, another backend's event), which the caller delivers itself.
BatchStep = list[Change] | None


class StudyState:
    """The users of one study, the counts by status, and the seq of the last event applied."""

    def __init__(self, max_early: int = 10_000) -> None:
        self._users: dict[str, User] = {}
        self.seq: int | None = None  # None until a snapshot of the current socket arrives
        self.counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        # Whether the users listed are everyone: a big room's snapshot lists only some.
        self.complete = True
        self._early: list[_Early] = []
        self._max_early = max_early

    @property
    def total(self) -> int:
        """The number of sessions in the study, listed or not."""
        return sum(self.counts.values())

    @property
    def synced(self) -> bool:
        """True once the current socket's snapshot has been applied (and no gap since)."""
        return self.seq is not None

    def users(self) -> list[User]:
        """Everyone present, by user id."""
        return [self._users[user_id] for user_id in sorted(self._users)]

    def get(self, user_id: str) -> User | None:
        return self._users.get(user_id)

    def expect_snapshot(self) -> None:
        """A new socket (or a resync): wait for its snapshot, keeping the users meanwhile.

        The users stay visible until the snapshot replaces them, so a reconnect reports only
        what really changed while the client was away.
        """
        self.seq = None
        self._early.clear()

    def apply_snapshot(self, data: Mapping[str, Any]) -> tuple[list[Change], bool]:
        """Replace the state with a snapshot; the changes, and whether a gap followed it.

        Events buffered before it are applied after it (those at or below its seq dropped).
        """
        seq = fields.seq_of(data)
        entries = data.get("users")
        if not isinstance(entries, list):
            raise MalformedMessage("snapshot without a list of users")
        fresh = {user.user_id: user for user in map(_snapshot_user, entries)}
        complete = data.get("complete", True)
        if not isinstance(complete, bool):
            raise MalformedMessage("'complete' is not a boolean")
        counts = _snapshot_counts(data.get("counts"), fresh.values())
        # A user a partial list leaves out may well still be there: not a leave.
        changes = _diff(self._users, fresh, leaves=complete)
        self._users = fresh
        self.counts = counts
        self.complete = complete
        self.seq = seq
        early, self._early = sorted(self._early, key=lambda item: item.first), []
        for item in early:
            if item.last is None:
                event_seq, event_type, event = item.events[0]
                verdict, applied = self._apply(event_seq, event_type, event)
            else:
                verdict, applied = self._apply_batch(item.first, item.last, item.events)
            if verdict is Verdict.GAP:
                self.seq = None
                return changes, True
            changes.extend(applied)
        return changes, False

    def apply_event(self, event_type: str, data: Mapping[str, Any]) -> tuple[Verdict, list[Change]]:
        """Apply one `presence.*` event by its seq; what became of it, and its changes."""
        seq = fields.seq_of(data)
        if self.seq is None:
            return self._hold(_Early(seq, None, ((seq, event_type, data),))), []
        verdict, changes = self._apply(seq, event_type, data)
        if verdict is Verdict.GAP:
            self.seq = None  # nothing may be applied until a fresh snapshot
        return verdict, changes

    def apply_batch(self, data: Mapping[str, Any]) -> tuple[Verdict, list[BatchStep]]:
        """Apply a `presence.batch`; what became of it, and one step per message in it.

        The protocol's rule: a client that has applied up to first_seq - 1 (or further)
        applies the presence events in order, skipping those at or below what it has applied,
        and continues from last_seq; the seqs inside a batch are not contiguous (superseded
        cursor moves are left out). A first_seq further on is a gap. Messages without a seq
        (signals, other backends' events) get a None step: the caller delivers them whatever
        the verdict, since no presence state depends on them.
        """
        first, last = _bounds(data)
        messages = data.get("events")
        if not isinstance(messages, list):
            raise MalformedMessage("batch without a list of events")
        events: list[tuple[int, str, Mapping[str, Any]]] = []
        slots: list[int | None] = []  # each message's index among `events`, or None
        for message in messages:
            event = _batch_event(message)
            slots.append(len(events) if event is not None else None)
            if event is not None:
                events.append(event)
        if events and first is None:
            raise MalformedMessage("batch with presence events but no first_seq")
        if first is None or last is None:
            return Verdict.APPLIED, [None if slot is None else [] for slot in slots]
        if self.seq is None:
            verdict = self._hold(_Early(first, last, tuple(events)))
            return verdict, [None if slot is None else [] for slot in slots]
        verdict, per_event = self._apply_batch_events(first, last, events)
        if verdict is Verdict.GAP:
            self.seq = None
        return verdict, [None if slot is None else per_event[slot] for slot in slots]

    def _hold(self, item: _Early) -> Verdict:
        if len(self._early) >= self._max_early:
            return Verdict.GAP  # a snapshot that never comes: start over
        self._early.append(item)
        return Verdict.BUFFERED

    def _apply(
        self, seq: int, event_type: str, data: Mapping[str, Any]
    ) -> tuple[Verdict, list[Change]]:
        assert self.seq is not None
        if seq <= self.seq:
            return Verdict.STALE, []
        if seq > self.seq + 1:
            return Verdict.GAP, []
        return Verdict.APPLIED, self._apply_one(seq, event_type, data)

    def _apply_batch(
        self, first: int, last: int, events: Sequence[tuple[int, str, Mapping[str, Any]]]
    ) -> tuple[Verdict, list[Change]]:
        verdict, per_event = self._apply_batch_events(first, last, events)
        return verdict, [change for changes in per_event for change in changes]

    def _apply_batch_events(
        self, first: int, last: int, events: Sequence[tuple[int, str, Mapping[str, Any]]]
    ) -> tuple[Verdict, list[list[Change]]]:
        assert self.seq is not None
        if first > self.seq + 1:
            return Verdict.GAP, [[] for _ in events]
        if last <= self.seq:
            return Verdict.STALE, [[] for _ in events]
        per_event: list[list[Change]] = []
        for seq, event_type, data in events:
            per_event.append(self._apply_one(seq, event_type, data) if seq > self.seq else [])
        self.seq = max(self.seq, last)
        return Verdict.APPLIED, per_event

    def _apply_one(self, seq: int, event_type: str, data: Mapping[str, Any]) -> list[Change]:
        user_id = fields.text(data, "user_id")
        before = self._users.get(user_id)
        if event_type == USER_LEFT:
            status = fields.optional_text(data, "status")
            self.seq = seq
            self._count_leave(before, status)
            self._users.pop(user_id, None)
            return [Change("leave", before)] if before is not None else []
        after = _event_user(data, before, joined=event_type == USER_JOINED)
        previous_status = fields.optional_text(data, "previous_status")
        self.seq = seq
        self._count(event_type, before, after.status, previous_status)
        self._users[user_id] = after
        if before is None and event_type != USER_JOINED:
            # A user a partial list did not show: listed from now on, but no join.
            kind: ChangeKind = "status" if event_type in STATUS_EVENTS else "cursor"
            return [Change(kind, after)]
        return _changes(before, after)

    # The counts follow the protocol's rule (joined: active + 1; left: its status - 1; a
    # status change: previous_status - 1, status + 1), except where a listed user shows that
    # the snapshot already counted the event (it may reflect a few events above its seq).

    def _count_leave(self, before: User | None, status: str | None) -> None:
        if before is not None:
            self._add(before.status, -1)
        elif not self.complete and status is not None:
            self._add(status, -1)

    def _count(
        self, event_type: str, before: User | None, status: str, previous_status: str | None
    ) -> None:
        if before is not None:
            if before.status != status:
                self._add(before.status, -1)
                self._add(status, 1)
        elif event_type == USER_JOINED or self.complete:
            # Everyone was listed, so an unlisted user was not counted either.
            self._add(status, 1)
        elif event_type in STATUS_EVENTS and previous_status is not None:
            self._add(previous_status, -1)
            self._add(status, 1)

    def _add(self, status: str, delta: int) -> None:
        self.counts[status] = max(0, self.counts.get(status, 0) + delta)


def _diff(old: Mapping[str, User], new: Mapping[str, User], leaves: bool) -> list[Change]:
    changes = []
    if leaves:
        changes = [Change("leave", user) for user_id, user in old.items() if user_id not in new]
    for user_id in sorted(new):
        changes.extend(_changes(old.get(user_id), new[user_id]))
    return changes


def _changes(before: User | None, after: User) -> list[Change]:
    if before is None:
        return [Change("join", after)]
    changes: list[Change] = []
    if before.status != after.status:
        changes.append(Change("status", after, before))
    if (before.chapter_id, before.move_path) != (after.chapter_id, after.move_path):
        changes.append(Change("cursor", after, before))
    return changes


def _snapshot_user(entry: object) -> User:
    if not isinstance(entry, Mapping):
        raise MalformedMessage("snapshot user is not an object")
    return User(
        user_id=fields.text(entry, "user_id"),
        status=fields.text(entry, "status"),
        chapter_id=fields.optional_text(entry, "chapter_id"),
        move_path=fields.optional_text(entry, "move_path"),
        session_id=fields.optional_text(entry, "session_id"),
        joined_at=fields.optional_text(entry, "joined_at"),
        updated_at=fields.optional_text(entry, "last_heartbeat"),
    )


def _event_user(data: Mapping[str, Any], before: User | None, joined: bool) -> User:
    timestamp = fields.optional_text(data, "timestamp")
    # An unlisted user's first event says nothing of when they joined.
    earlier = before.joined_at if before is not None else None
    joined_at = timestamp if joined else earlier
    return User(
        user_id=fields.text(data, "user_id"),
        status=fields.text(data, "status"),
        chapter_id=fields.optional_text(data, "chapter_id"),
        move_path=fields.optional_text(data, "move_path"),
        session_id=fields.optional_text(data, "session_id"),
        joined_at=joined_at,
        updated_at=timestamp,
    )


def _snapshot_counts(counts: object, users: Iterable[User]) -> dict[str, int]:
    if counts is None:  # a server before big rooms: its list is everyone
        counted = dict.fromkeys(STATUSES, 0)
        for user in users:
            counted[user.status] = counted.get(user.status, 0) + 1
        return counted
    if not isinstance(counts, Mapping):
        raise MalformedMessage("'counts' is not an object")
    counted = dict.fromkeys(STATUSES, 0)
    for status, count in counts.items():
        if not isinstance(status, str) or not fields.is_count(count):
            raise MalformedMessage(f"'counts' has an invalid entry {status!r}: {count!r}")
        counted[status] = count
    return counted


def _bounds(data: Mapping[str, Any]) -> tuple[int | None, int | None]:
    first, last = data.get("first_seq"), data.get("last_seq")
    if first is None and last is None:
        return None, None
    if not fields.is_count(first) or not fields.is_count(last) or last < first:
        raise MalformedMessage(f"batch with invalid first_seq/last_seq: {first!r}, {last!r}")
    return first, last


def _batch_event(message: object) -> tuple[int, str, Mapping[str, Any]] | None:
    """A presence event of a batch as (seq, type, data); None for any other message."""
    if not isinstance(message, Mapping):
        raise MalformedMessage("batch message is not an object")
    event_type, data = message.get("type"), message.get("data")
    if not isinstance(event_type, str):
        raise MalformedMessage("batch message without a string type")
    if not event_type.startswith(PRESENCE_PREFIX):
        return None
    if event_type in (SNAPSHOT, BATCH) or not isinstance(data, Mapping):
        raise MalformedMessage(f"a {event_type} cannot be part of a batch")
    return fields.seq_of(data), event_type, data
