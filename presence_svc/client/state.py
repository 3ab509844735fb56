"""A study's presence as a client sees it: a snapshot, then events applied strictly by seq.

No I/O here: the socket code feeds messages in and acts on what comes out (changes to report,
or a gap that calls for a fresh snapshot). The rules are the server's (README, "Event
reference"): `seq` rises by exactly 1 per event, a snapshot carries the seq it reflects, and
a snapshot taken during a burst may already include a few events above its seq, so applying
an event is an idempotent upsert rather than an assertion about the previous state.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

PRESENCE_PREFIX = "presence."
SNAPSHOT = "presence.snapshot"
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

ChangeKind = Literal["join", "leave", "status", "cursor"]


class MalformedMessage(ValueError):
    """A server message without the fields its type promises."""


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
    previous: User | None = None


class Verdict(enum.Enum):
    APPLIED = "applied"  # in order; its changes (maybe none) are returned
    STALE = "stale"  # at or below the current seq: already reflected, dropped
    BUFFERED = "buffered"  # before the socket's snapshot: kept until it arrives
    GAP = "gap"  # events are missing: only a fresh snapshot can tell the state


class StudyState:
    """The users of one study and the seq of the last event applied."""

    def __init__(self, max_early: int = 10_000) -> None:
        self._users: dict[str, User] = {}
        self.seq: int | None = None  # None until a snapshot of the current socket arrives
        self._early: list[tuple[int, str, Mapping[str, Any]]] = []
        self._max_early = max_early

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
        seq = _seq(data)
        entries = data.get("users")
        if not isinstance(entries, list):
            raise MalformedMessage("snapshot without a list of users")
        fresh = {user.user_id: user for user in map(_snapshot_user, entries)}
        changes = _diff(self._users, fresh)
        self._users = fresh
        self.seq = seq
        early, self._early = sorted(self._early, key=lambda item: item[0]), []
        for event_seq, event_type, event in early:
            verdict, applied = self._apply(event_seq, event_type, event)
            if verdict is Verdict.GAP:
                self.seq = None
                return changes, True
            changes.extend(applied)
        return changes, False

    def apply_event(self, event_type: str, data: Mapping[str, Any]) -> tuple[Verdict, list[Change]]:
        """Apply one `presence.*` event by its seq; what became of it, and its changes."""
        seq = _seq(data)
        if self.seq is None:
            if len(self._early) >= self._max_early:
                return Verdict.GAP, []  # a snapshot that never comes: start over
            self._early.append((seq, event_type, data))
            return Verdict.BUFFERED, []
        verdict, changes = self._apply(seq, event_type, data)
        if verdict is Verdict.GAP:
            self.seq = None  # nothing may be applied until a fresh snapshot
        return verdict, changes

    def _apply(
        self, seq: int, event_type: str, data: Mapping[str, Any]
    ) -> tuple[Verdict, list[Change]]:
        assert self.seq is not None
        if seq <= self.seq:
            return Verdict.STALE, []
        if seq > self.seq + 1:
            return Verdict.GAP, []
        self.seq = seq
        user_id = _text(data, "user_id")
        before = self._users.get(user_id)
        if event_type == USER_LEFT:
            self._users.pop(user_id, None)
            return Verdict.APPLIED, [Change("leave", before)] if before is not None else []
        after = _event_user(data, before, joined=event_type == USER_JOINED)
        self._users[user_id] = after
        return Verdict.APPLIED, _changes(before, after)


def _diff(old: Mapping[str, User], new: Mapping[str, User]) -> list[Change]:
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
        user_id=_text(entry, "user_id"),
        status=_text(entry, "status"),
        chapter_id=_optional_text(entry, "chapter_id"),
        move_path=_optional_text(entry, "move_path"),
        session_id=_optional_text(entry, "session_id"),
        joined_at=_optional_text(entry, "joined_at"),
        updated_at=_optional_text(entry, "last_heartbeat"),
    )


def _event_user(data: Mapping[str, Any], before: User | None, joined: bool) -> User:
    timestamp = _optional_text(data, "timestamp")
    return User(
        user_id=_text(data, "user_id"),
        status=_text(data, "status"),
        chapter_id=_optional_text(data, "chapter_id"),
        move_path=_optional_text(data, "move_path"),
        session_id=_optional_text(data, "session_id"),
        joined_at=timestamp if joined or before is None else before.joined_at,
        updated_at=timestamp,
    )


def _seq(data: Mapping[str, Any]) -> int:
    seq = data.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise MalformedMessage("message without a valid seq")
    return seq


def _text(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f"message without a string {name!r}")
    return value


def _optional_text(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise MalformedMessage(f"{name!r} is not a string")
    return value
