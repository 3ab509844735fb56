"""When to reconnect: the reaction to each way a socket ends, and capped backoff with jitter.

No I/O and no clock of its own: the caller passes the time and a random source, so the
schedule can be checked without waiting for it.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

# Close codes of the server (README, "WebSocket").
CLOSE_GOING_AWAY = 1012  # the node is shutting down: another node takes us at once
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403


class Reaction(enum.Enum):
    RECONNECT_NOW = "reconnect_now"  # after a small jitter only
    REFRESH_TOKEN = "refresh_token"  # a fresh token, then reconnect at once
    BACK_OFF = "back_off"  # capped exponential backoff with full jitter
    STOP = "stop"  # retrying cannot help: report the error and give up


def reaction(code: int | None, resync: bool = False) -> Reaction:
    """The reaction to a socket that ended with close `code` (None: it never opened).

    A resync (a seq gap seen by the client) reconnects at once: the fresh socket's snapshot is
    the fresh state. 1008, 1013, 1011, 4429, abnormal closes and failed handshakes all back
    off, so a node that sheds load is not hammered by the clients it shed.
    """
    if resync or code == CLOSE_GOING_AWAY:
        return Reaction.RECONNECT_NOW
    if code == CLOSE_UNAUTHORIZED:
        return Reaction.REFRESH_TOKEN
    if code in (CLOSE_BAD_REQUEST, CLOSE_FORBIDDEN):
        return Reaction.STOP
    return Reaction.BACK_OFF


@dataclass(frozen=True, slots=True)
class Backoff:
    """The reconnect schedule.

    Waits are drawn uniformly from 0 to min(cap, first * 2**n) ("full jitter"), n counting the
    failures since the connection last stayed up `stable_after` seconds. An immediate reconnect
    waits up to `quick_jitter`, but only `quick_limit` times in a row before it backs off too:
    a node that keeps closing with 1012, or a token source that keeps handing out refused
    tokens, must not turn into a reconnect loop.
    """

    first: float = 0.5
    cap: float = 20.0
    stable_after: float = 10.0
    quick_jitter: float = 0.25
    quick_limit: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError("backoff needs 0 < first <= cap")
        if self.stable_after < 0 or self.quick_jitter < 0 or self.quick_limit < 0:
            raise ValueError("backoff stable_after, quick_jitter and quick_limit must be >= 0")


class Retry:
    """The state of the schedule between attempts: failures so far, quick reconnects in a row."""

    def __init__(self, backoff: Backoff, rng: random.Random | None = None) -> None:
        self._backoff = backoff
        self._rng = rng or random.Random()
        self.failures = 0
        self._quick = 0
        self._up_since: float | None = None

    def opened(self, now: float) -> None:
        """The socket is open (its snapshot arrived)."""
        self._up_since = now

    def delay(self, reaction: Reaction, now: float) -> float:
        """Seconds to wait before the next attempt, after a socket ended with `reaction`."""
        backoff = self._backoff
        if self._up_since is not None and now - self._up_since >= backoff.stable_after:
            self.failures = 0
            self._quick = 0
        self._up_since = None
        if reaction is not Reaction.BACK_OFF and self._quick < backoff.quick_limit:
            self._quick += 1
            return self._rng.uniform(0, backoff.quick_jitter)
        bound = min(backoff.cap, backoff.first * 2 ** min(self.failures, 62))
        self.failures += 1
        return self._rng.uniform(0, bound)
