"""What the caller wants the server to know: whether it has joined, is active, and its cursor.

It outlives sockets: every socket of the client heartbeats from it, so a reconnect carries
the last cursor without the caller repeating it.
"""

from __future__ import annotations

import asyncio
import json
import re

from presence_svc.models import ID_PATTERN, MOVE_PATH_MAX_LENGTH, MOVE_PATH_PATTERN

_ID = re.compile(ID_PATTERN)
_MOVE_PATH = re.compile(MOVE_PATH_PATTERN)
# The order the server's fast path expects (models.compact_heartbeat).
_FIELDS = ("chapter_id", "move_path")


def check_cursor(chapter_id: str | None, move_path: str | None) -> None:
    """ValueError unless the fields are None or match the server's grammar."""
    if chapter_id is not None and (
        not isinstance(chapter_id, str) or not _ID.fullmatch(chapter_id)
    ):
        raise ValueError(f"chapter_id must be None or match {ID_PATTERN}: {chapter_id!r}")
    if move_path is not None and (
        not isinstance(move_path, str)
        or len(move_path) > MOVE_PATH_MAX_LENGTH
        or not _MOVE_PATH.fullmatch(move_path)
    ):
        raise ValueError(
            f"move_path must be None or match {MOVE_PATH_PATTERN} "
            f"(at most {MOVE_PATH_MAX_LENGTH} characters): {move_path!r}"
        )


class Intent:
    """Joined or not, active or not, and the cursor fields the caller has set."""

    def __init__(self) -> None:
        self.joined = False
        self.active = True
        self._cursor: dict[str, str | None] = {}  # only the fields the caller set
        self._unsent: dict[str, str | None] = {}
        self.wake = asyncio.Event()  # set when a heartbeat should go out now

    def set_cursor(self, fields: dict[str, str | None]) -> None:
        """Join (if not yet) with these cursor fields; moving the cursor is activity."""
        self._cursor.update(fields)
        self._unsent.update(fields)
        self.joined = True
        self.active = True
        self.wake.set()

    def set_active(self, active: bool) -> None:
        changed = active != self.active
        self.active = active
        if changed and active and self.joined:
            self.wake.set()

    def leave(self) -> None:
        """No more heartbeats; a later join starts a new session, with no cursor."""
        self.joined = False
        self._cursor.clear()
        self._unsent.clear()

    def heartbeat(self, full: bool) -> str:
        """The heartbeat to send: every cursor field set (`full`, on a new socket), or only
        the ones changed since the last heartbeat. Fields never set are left out, so they keep
        the value another client of the same user gave them."""
        fields = self._cursor if full else self._unsent
        message: dict[str, str | None] = {"type": "heartbeat"}
        for name in _FIELDS:
            if name in fields:
                message[name] = fields[name]
        self._unsent = {}
        return json.dumps(message, separators=(",", ":"))
