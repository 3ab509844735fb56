"""Domain values (sessions, snapshots) and the validated shapes clients send.

The shapes of REST responses, which only the OpenAPI document uses, are in `web/schemas.py`.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

USER_JOINED = "presence.user_joined"
USER_LEFT = "presence.user_left"
USER_ACTIVE = "presence.user_active"
USER_IDLE = "presence.user_idle"
USER_AWAY = "presence.user_away"
CURSOR_MOVED = "presence.cursor_moved"
EVENT_TYPES = (USER_JOINED, USER_LEFT, USER_ACTIVE, USER_IDLE, USER_AWAY, CURSOR_MOVED)

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
# The seed's form, e.g. main.12.var2.3: the main line and a ply number, then any number of
# variations, each a variation number and a ply within it (main.12.var2.3.var1.5 nests one).
MOVE_PATH_PATTERN = r"^main(\.[0-9]{1,4}(\.var[0-9]{1,4}\.[0-9]{1,4})*)?$"
MOVE_PATH_MAX_LENGTH = 512
# A signal's name: `signal.<name>` is the type its receivers get (typing, pointer, ...).
SIGNAL_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
MovePath = Annotated[
    str, StringConstraints(pattern=MOVE_PATH_PATTERN, max_length=MOVE_PATH_MAX_LENGTH)
]


class Status(StrEnum):
    ACTIVE = "active"
    IDLE = "idle"
    AWAY = "away"


@functools.lru_cache(maxsize=64)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")


# Each millisecond's ending, built once: formatting it cost half of a call (one per heartbeat).
_MILLIS_Z = tuple(f"{millis:03d}Z" for millis in range(1000))


def iso_from_ms(ms: int) -> str:
    """ISO-8601 UTC with millisecond precision, e.g. 2026-01-12T08:00:00.123Z."""
    # Formatting a date is slow and a busy node formats the same few seconds all the time.
    second, millis = divmod(ms, 1000)
    return _iso_second(second) + _MILLIS_Z[millis]


@dataclass(frozen=True, slots=True)
class Session:
    """One user's presence in one study."""

    session_id: str
    user_id: str
    study_id: str
    chapter_id: str | None
    move_path: str | None
    status: Status
    last_heartbeat_ms: int
    joined_at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "user_id": self.user_id,
            "study_id": self.study_id,
            "chapter_id": self.chapter_id,
            "move_path": self.move_path,
            "status": self.status.value,
            "last_heartbeat": iso_from_ms(self.last_heartbeat_ms),
            "joined_at": iso_from_ms(self.joined_at_ms),
        }


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """Sessions by status (by heartbeat age against the thresholds, as the sweep applies it)."""

    active: int = 0
    idle: int = 0
    away: int = 0

    @property
    def total(self) -> int:
        return self.active + self.idle + self.away

    def __add__(self, other: StatusCounts) -> StatusCounts:
        return StatusCounts(
            self.active + other.active, self.idle + other.idle, self.away + other.away
        )

    def by_status(self) -> dict[str, int]:
        """The counts as a snapshot's `counts` carries them (no total: that is its own field)."""
        return {"active": self.active, "idle": self.idle, "away": self.away}

    def to_json(self) -> dict[str, int]:
        return {**self.by_status(), "total": self.total}


@dataclass(frozen=True, slots=True)
class StudyPresence:
    """A study's presence as one atomic read: some or all of its sessions, the counts of all
    of them, and the seq of the last event this view includes.

    `counts` covers every session of the study, listed or not (total = counts.total);
    `complete` says whether `sessions` lists them all. The defaults describe an empty study.
    """

    study_id: str
    sessions: tuple[Session, ...]
    seq: int
    counts: StatusCounts = StatusCounts()
    complete: bool = True

    @property
    def total(self) -> int:
        return self.counts.total

    def to_json(self) -> dict[str, Any]:
        return {
            "study_id": self.study_id,
            "users": [s.to_json() for s in self.sessions],
            "total": self.total,
            "counts": self.counts.by_status(),
            "seq": self.seq,
            "complete": self.complete,
        }


@dataclass(frozen=True, slots=True)
class StudyPage(StudyPresence):
    """One page of a study's sessions in user_id order, read atomically with its seq and
    counts; `next` is the user_id after which the next page starts (None: the last page)."""

    next: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**StudyPresence.to_json(self), "next": self.next}


@dataclass(frozen=True, slots=True)
class CursorUpdate:
    """The cursor fields a heartbeat sets. A field not set keeps its value; None clears it."""

    chapter_id: str | None = None
    move_path: str | None = None
    sets_chapter: bool = False
    sets_move_path: bool = False


@dataclass(frozen=True, slots=True)
class Holder:
    """A WebSocket connection that keeps a session present while it is open."""

    node_id: str
    connection_id: str


@dataclass(frozen=True, slots=True)
class Lease:
    """A holder's hold on one (user, study) session."""

    study_id: str
    user_id: str
    holder: Holder


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Seconds without a heartbeat before each transition."""

    idle_after: float
    away_after: float
    expire_after: float

    def __post_init__(self) -> None:
        if not 0 < self.idle_after < self.away_after < self.expire_after:
            raise ValueError("thresholds must satisfy 0 < idle < away < expire")


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep tick did."""

    studies: int = 0
    events: int = 0
    more_due: bool = False


class _ClientShape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def cursor(self) -> CursorUpdate:
        fields = self.model_fields_set
        return CursorUpdate(
            chapter_id=getattr(self, "chapter_id", None),
            move_path=getattr(self, "move_path", None),
            sets_chapter="chapter_id" in fields,
            sets_move_path="move_path" in fields,
        )


class HeartbeatRequest(_ClientShape):
    """Body of `POST /presence/heartbeat`."""

    study_id: Identifier
    chapter_id: Identifier | None = None
    move_path: MovePath | None = None


class PingMessage(_ClientShape):
    type: Literal["ping"]


class HeartbeatMessage(_ClientShape):
    type: Literal["heartbeat"]
    chapter_id: Identifier | None = None
    move_path: MovePath | None = None


class RefreshMessage(_ClientShape):
    """A fresh token for an open socket, sent before the current one expires."""

    type: Literal["refresh"]
    token: Annotated[str, StringConstraints(min_length=1, max_length=8192)]


# Integers msgpack can carry (int64 and uint64): a signal's data travels as msgpack.
_INT_RANGE = (-(2**63), 2**64 - 1)


def _sendable(data: dict[str, Any]) -> dict[str, Any]:
    """`data` unchanged, if both JSON and msgpack can carry every value in it.

    The JSON parser lets NaN, Infinity and integers of any size through; a signal holding one
    could be neither published (msgpack) nor relayed (strict JSON), so it is refused here.
    """
    stack: list[Any] = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
        elif isinstance(value, int) and not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise ValueError("integers must fit in 64 bits")
    return data


class SignalMessage(_ClientShape):
    """An ephemeral signal to the study's other sockets (typing, pointer): never stored."""

    type: Literal["signal"]
    name: Annotated[str, StringConstraints(pattern=SIGNAL_NAME_PATTERN)]
    data: Annotated[dict[str, Any], AfterValidator(_sendable)] = Field(default_factory=dict)


ClientMessage = Annotated[
    PingMessage | HeartbeatMessage | RefreshMessage | SignalMessage, Field(discriminator="type")
]

NO_CURSOR = CursorUpdate()
PING_TEXT = '{"type":"ping"}'

# A heartbeat exactly as clients serialize it (JSON.stringify: compact, fields in this order).
# Its values cannot hold a quote or a backslash, so the raw text between the quotes is the
# decoded string, and matching ID_PATTERN / MOVE_PATH_PATTERN here is the models' own check.
_COMPACT_HEARTBEAT = re.compile(
    r'\{"type":"heartbeat"'
    r'(?:,"chapter_id":"(' + ID_PATTERN[1:-1] + r')")?'
    r'(?:,"move_path":"(' + MOVE_PATH_PATTERN[1:-1] + r')")?'
    r"\}"
)

_PLAIN_HEARTBEAT = '{"type":"heartbeat"}'


def compact_heartbeat(text: str) -> CursorUpdate | None:
    """The cursor of a heartbeat in its compact form, or None for any other text.

    The common message parsed without pydantic (several microseconds a message); for every
    text it accepts, `TypeAdapter(ClientMessage).validate_json(text).cursor()` gives the same
    cursor, and anything else (other shapes, invalid values) goes to the full validation,
    which produces the errors.
    """
    if text == _PLAIN_HEARTBEAT:  # the periodic heartbeat, most of them: no need to match
        return NO_CURSOR
    matched = _COMPACT_HEARTBEAT.fullmatch(text)
    if matched is None:
        return None
    chapter_id, move_path = matched.group(1, 2)
    if chapter_id is None and move_path is None:
        return NO_CURSOR
    if move_path is not None and len(move_path) > MOVE_PATH_MAX_LENGTH:
        return None
    return CursorUpdate(
        chapter_id=chapter_id,
        move_path=move_path,
        sets_chapter=chapter_id is not None,
        sets_move_path=move_path is not None,
    )


# A REST heartbeat body as most clients send it: an object with `study_id`, then optionally
# `chapter_id`, then `move_path`, each at most once, in that order, strings or null, with any
# JSON whitespace around the tokens (json.dumps and JSON.stringify alike). The strings admit no
# quote or backslash, so their raw bytes are the decoded values.
_JSON_SPACE = rb"[ \t\n\r]*"  # JSON's four (Python's \s would admit \f and \v too)


def _member(name: bytes, value: bytes) -> bytes:
    return rb'"%s"%s:%s%s' % (name, _JSON_SPACE, _JSON_SPACE, value)


def _then(member: bytes) -> bytes:
    return rb"(?:%s,%s%s)?" % (_JSON_SPACE, _JSON_SPACE, member)


_REST_ID = ID_PATTERN[1:-1].encode()
_REST_MOVE_PATH = MOVE_PATH_PATTERN[1:-1].encode()
_REST_HEARTBEAT = re.compile(
    rb"%(s)s\{%(s)s%(study)s%(chapter)s%(move)s%(s)s\}%(s)s"
    % {
        b"s": _JSON_SPACE,
        b"study": _member(b"study_id", rb'"(?P<study>%s)"' % _REST_ID),
        b"chapter": _then(
            _member(b"chapter_id", rb'(?:"(?P<chapter>%s)"|(?P<no_chapter>null))' % _REST_ID)
        ),
        b"move": _then(
            _member(b"move_path", rb'(?:"(?P<move>%s)"|(?P<no_move>null))' % _REST_MOVE_PATH)
        ),
    }
)


def rest_heartbeat_fields(body: bytes) -> tuple[str, CursorUpdate] | None:
    """The study and cursor of a REST heartbeat body of the common shape, or None for any
    other body.

    The common body parsed without pydantic; for every body it accepts,
    `HeartbeatRequest.model_validate_json(body)` gives the same study_id and cursor(), and
    anything else (other orders, escapes, other fields, invalid values) goes to the full
    validation, which produces the errors.
    """
    matched = _REST_HEARTBEAT.fullmatch(body)
    if matched is None:
        return None
    study, chapter, no_chapter, move, no_move = matched.group(
        "study", "chapter", "no_chapter", "move", "no_move"
    )
    sets_chapter = chapter is not None or no_chapter is not None
    sets_move_path = move is not None or no_move is not None
    if not (sets_chapter or sets_move_path):
        return study.decode(), NO_CURSOR
    if move is not None and len(move) > MOVE_PATH_MAX_LENGTH:
        return None
    return study.decode(), CursorUpdate(
        chapter_id=None if chapter is None else chapter.decode(),
        move_path=None if move is None else move.decode(),
        sets_chapter=sets_chapter,
        sets_move_path=sets_move_path,
    )
