"""The bigroom scenario's client side, pure: a frame parsed once, applied once per worker.

Sockets of one node receive the same bytes for the same event or tick, in the same order (a
node encodes each once per study), so a client worker parses a payload once (`Frames`, keyed by
its bytes) and applies it once (`Chain`): the state (the study's seq, applied by the protocol's
rule, and each member's latest cursor) reached by applying a frame to the state it followed is
shared by every socket that was at that state and got that frame. A socket (`Feed`) keeps its
applied seq, its gap count and a reference to the shared state it has reached; a socket whose
sequence leaves the chain (it joined later, resynced, missed a frame: its own snapshot, or a
frame the chain applied to another state) applies frames to its own copy, and rejoins the chain
as soon as its own state after a frame equals the chain's after that frame.

A member's cursor is the counter n of its move path `main.<n>`, raised by one at each of its
heartbeats; the mover logs when it sent each n. A sampled socket logs when it first held each n
(`Feed.log`), so `staleness` gives, per heartbeat, the time from its sending to the socket
holding that cursor or a later one (a cursor left out of a batch for a later one counts until
that later one arrives).
"""

from __future__ import annotations

import array
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SNAPSHOT, EVENTS, OTHER = 0, 1, 2
LEFT = -1  # the n of a user_left: the user is no longer held
_MOVE = re.compile(r"main\.([0-9]+)")

# (seq, user id, n): n is the cursor counter, 0 for a move path that is not a mover's, LEFT
Event = tuple[int, str, int]


@dataclass(frozen=True, slots=True)
class Frame:
    """One message as a socket applies it.

    EVENTS: `first`/`last` are the lowest and highest seq (a batch's first_seq/last_seq; both
    None when it has no presence event), `events` the presence events in order. `cursors` is
    each user's last n in the frame when no event of it removes a user (a socket that has
    applied none of the frame's events applies it with one dict update), else None. `ordered`:
    the events' seqs rise and lie within first..last, as the protocol says they do.
    SNAPSHOT: `first` is its seq, `cursors` every user it lists.
    """

    kind: int
    first: int | None = None
    last: int | None = None
    events: tuple[Event, ...] = ()
    cursors: dict[str, int] | None = None
    batch: bool = False
    ordered: bool = True


_OTHER = Frame(OTHER)


def move_number(move_path: object) -> int:
    """n of `main.<n>`; 0 for any other move path (or none)."""
    if isinstance(move_path, str):
        found = _MOVE.fullmatch(move_path)
        if found is not None:
            return int(found[1])
    return 0


def _event(message: object) -> Event | None:
    if not isinstance(message, dict):
        return None
    kind, data = message.get("type"), message.get("data")
    if not isinstance(kind, str) or not kind.startswith("presence.") or not isinstance(data, dict):
        return None
    seq, user = data.get("seq"), data.get("user_id")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(user, str):
        return None
    return seq, user, LEFT if kind == "presence.user_left" else move_number(data.get("move_path"))


def _events_frame(
    first: int | None, last: int | None, events: tuple[Event, ...], batch: bool
) -> Frame:
    left = any(n == LEFT for _, _, n in events)
    cursors = None if left else {user: n for _, user, n in events}
    seqs = [seq for seq, _, _ in events]
    ordered = all(a < b for a, b in itertools.pairwise(seqs))
    if seqs:
        inside = first is not None and last is not None and first <= seqs[0] <= seqs[-1] <= last
        ordered = ordered and inside
    return Frame(EVENTS, first, last, events, cursors, batch, ordered)


def _seq(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse(payload: bytes) -> Frame:
    """One text message of the node (anything it cannot use is OTHER)."""
    try:
        message = json.loads(payload)
    except ValueError:
        return _OTHER
    if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
        return _OTHER
    kind, data = message["type"], message["data"]
    if kind == "presence.snapshot":
        users = data.get("users")
        listed = {
            u["user_id"]: move_number(u.get("move_path"))
            for u in (users if isinstance(users, list) else [])
            if isinstance(u, dict) and isinstance(u.get("user_id"), str)
        }
        return Frame(SNAPSHOT, first=_seq(data.get("seq")) or 0, cursors=listed)
    if kind == "presence.batch":
        raw = data.get("events")
        found = (_event(m) for m in (raw if isinstance(raw, list) else []))
        events = tuple(e for e in found if e is not None)
        first, last = _seq(data.get("first_seq")), _seq(data.get("last_seq"))
        return _events_frame(first, last, events, batch=True)
    single = _event(message)
    if single is None:
        return _OTHER
    return _events_frame(single[0], single[0], (single,), batch=False)


class Frames:
    """Parsed frames by payload, the oldest forgotten past `size` (sockets of a node get the
    same bytes within moments of each other)."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._cache: dict[bytes, Frame] = {}
        self.parsed = 0

    def get(self, payload: bytes) -> Frame:
        frame = self._cache.get(payload)
        if frame is None:
            frame = parse(payload)
            self.parsed += 1
            if len(self._cache) >= self._size:
                del self._cache[next(iter(self._cache))]
            self._cache[payload] = frame
        return frame


@dataclass(eq=False, slots=True)
class State:
    """A state of the chain: the seq applied and each user's cursor n (never changed)."""

    applied: int
    cursors: dict[str, int]


class Chain:
    """Per worker: for each recent frame, the states it was applied to, the state each gave and
    whether that was a gap (a few per frame); the oldest frames forgotten past `size`."""

    LINKS = 4  # states a frame is applied to at most on the chain (others stay on their own)

    def __init__(self, size: int = 512) -> None:
        self._size = size
        # id(frame) -> (frame, [(state before, state after, gap)]); the frame is kept so its
        # id is not reused while it is here. A before of None: reached by a socket's own state.
        self._links: dict[int, tuple[Frame, list[tuple[State | None, State, bool]]]] = {}
        self.shared = 0  # frames a socket took from the chain (no application of its own)
        self.applied = 0  # frames applied by a socket, to the chain's state or its own
        self.rejoined = 0  # sockets back on the chain after applying frames on their own

    def links(self, frame: Frame) -> list[tuple[State | None, State, bool]]:
        found = self._links.get(id(frame))
        if found is None:
            if len(self._links) >= self._size:
                del self._links[next(iter(self._links))]
            found = self._links[id(frame)] = (frame, [])
        return found[1]


class Feed:
    """One socket's state: the seq it has applied, each user's latest cursor n, what it saw.

    With a `chain` (and no log), `cursors` is the shared state's (`state`, never changed by
    this socket) while the socket follows the chain, else its own dict.
    """

    __slots__ = (
        "applied",
        "batches",
        "bytes",
        "chain",
        "closed_ns",
        "cursors",
        "disordered",
        "early",
        "frames",
        "gaps",
        "log",
        "snapshots",
        "state",
    )

    def __init__(self, logged: bool = False, chain: Chain | None = None) -> None:
        self.applied: int | None = None  # None until the first snapshot
        self.cursors: dict[str, int] = {}
        # Sampled sockets apply every frame themselves: they log when they held each n.
        self.chain = None if logged else chain
        self.state: State | None = None  # the chain's state this socket is at, if any
        # Sampled sockets: per user, [n, received ns, n, received ns, ...] as n rises.
        self.log: dict[str, array.array[int]] | None = {} if logged else None
        self.frames = self.bytes = self.batches = 0
        self.gaps = 0  # frames whose first seq was above applied + 1
        self.early = 0  # event frames before any snapshot (the protocol sends none)
        self.disordered = 0  # batches whose events were not in seq order within their range
        self.snapshots = 0
        self.closed_ns: int | None = None

    def apply(self, frame: Frame, now_ns: int) -> None:
        if frame.kind == SNAPSHOT:
            # A later snapshot replaces the state; the events that follow continue from it.
            self.snapshots += 1
            self.state = None
            self.cursors = dict(frame.cursors or {})
            self.applied = frame.first or 0
            if self.log is not None:
                for user, n in self.cursors.items():
                    self._held(user, n, now_ns)
            return
        if frame.kind != EVENTS or frame.first is None or frame.last is None:
            return
        self.batches += frame.batch
        self.disordered += not frame.ordered
        applied = self.applied
        if applied is None:
            self.early += 1
            return
        chain = self.chain
        if chain is None:
            self._own(frame, applied, now_ns)
            return
        links = chain.links(frame)
        state = self.state
        if state is not None:
            for before, after, gap in links:
                if before is state:
                    # The chain applied this frame to the state this socket is at: same result.
                    chain.shared += 1
                    self.gaps += gap
                    self.state, self.cursors, self.applied = after, after.cursors, after.applied
                    return
            self.cursors = dict(state.cursors)  # the shared state is never changed
        chain.applied += 1
        gaps = self.gaps
        self._own(frame, applied, now_ns)
        cursors, reached = self.cursors, self.applied
        assert reached is not None  # set by _own from applied
        for _, after, _ in links:
            if after.applied == reached and after.cursors == cursors:
                # The same state as the chain's after this frame: back on it.
                chain.rejoined += 1
                if state is not None and len(links) < chain.LINKS:
                    links.append((state, after, self.gaps > gaps))  # the next ones follow it
                self.state, self.cursors = after, after.cursors
                return
        if len(links) < chain.LINKS:
            # A new state of the chain: this socket's (its dict, shared from now on).
            self.state = State(reached, cursors)
            links.append((state, self.state, self.gaps > gaps))
        else:
            self.state = None

    def _own(self, frame: Frame, applied: int, now_ns: int) -> None:
        """Apply the frame's events to this socket's own cursors (frame.first/last are set)."""
        assert frame.first is not None and frame.last is not None
        if frame.first > applied + 1:
            self.gaps += 1
        if frame.first > applied and frame.cursors is not None:
            self.cursors.update(frame.cursors)
            if self.log is not None:
                for user, n in frame.cursors.items():
                    self._held(user, n, now_ns)
        else:
            for seq, user, n in frame.events:
                if seq <= applied:
                    continue
                if n == LEFT:
                    self.cursors.pop(user, None)
                else:
                    self.cursors[user] = n
                    if self.log is not None:
                        self._held(user, n, now_ns)
        if frame.last > applied:
            self.applied = frame.last

    def _held(self, user: str, n: int, now_ns: int) -> None:
        assert self.log is not None
        entries = self.log.get(user)
        if entries is None:
            self.log[user] = array.array("q", (n, now_ns))
        elif n > entries[-2]:
            entries.extend((n, now_ns))

    def forget(self) -> None:
        """Start counting afresh (a measured window begins); the state itself is kept."""
        self.frames = self.bytes = self.batches = 0
        if self.log is not None:
            self.log = {}


def staleness(
    log: Mapping[str, array.array[int]],
    sent: Mapping[str, Sequence[int]],
    since_ns: int,
    until_ns: int | None = None,
) -> tuple[array.array[int], int]:
    """Per heartbeat sent in [since_ns, until_ns): ns from its sending to the first time this
    socket held its n or a later one; and how many heartbeats it never held.

    `sent[user][i]` is when the mover sent n = i + 1 (ns); `log` is a Feed's.
    """
    values: array.array[int] = array.array("q")
    unheld = 0
    for user, times in sent.items():
        entries = log.get(user, array.array("q"))
        j, size = 0, len(entries)
        for i, t in enumerate(times):
            if t < since_ns or (until_ns is not None and t >= until_ns):
                continue
            n = i + 1
            while j < size and entries[j] < n:
                j += 2
            if j >= size:
                unheld += 1
            else:
                values.append(entries[j + 1] - t)
    return values, unheld
