"""Ephemeral signals (typing, pointer, ...): their size, and each socket's rate of them.

A signal is published on the study's channel and never stored, so nothing replays it: while a
socket sends signals faster than its rate, only the newest of each name is still worth
sending. The limiter holds that one (latest wins, for at most MAX_HELD_NAMES names) and sends
it when the socket's bucket has a token again, on a timer of the node's clock.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

from presence_svc.clock import Clock, Timer
from presence_svc.codec import json_text
from presence_svc.limits import TokenBucket

# Names one socket may have held at once; a signal of yet another name is dropped.
MAX_HELD_NAMES = 8
# A timer is set this much after the bucket's next token is due: a float's width too early,
# it would find the bucket still short and set itself again for the same instant, at once.
TIMER_SLACK = 0.001

Publish = Callable[[str, dict[str, Any]], None]


class Outcome(StrEnum):
    """What became of a signal a socket sent (the `outcome` label of presence_signals_total)."""

    SENT = "sent"  # published at once
    HELD = "held"  # over the rate: held, published when a token is due (unless superseded)
    SUPERSEDED = "superseded"  # replaced the held signal of its name, which is never sent
    DROPPED = "dropped"  # over the rate with MAX_HELD_NAMES other names held already
    TOO_LARGE = "too_large"  # data over PRESENCE_SIGNAL_MAX_BYTES
    INVALID = "invalid"  # not a valid signal message


def data_size(data: dict[str, Any]) -> int:
    """Bytes of `data` as compact JSON (UTF-8): what PRESENCE_SIGNAL_MAX_BYTES bounds."""
    return len(json_text(data).encode())


class SignalLimiter:
    """One socket's signals: `rate` a second with bursts of `burst`, the latest of each name
    held while over it.

    A signal goes out at once while the bucket has a token and nothing is held. Otherwise it
    is held: a newer signal of a name already held replaces it in its turn, and held names go
    out oldest first as tokens come due. `close` cancels the timer and forgets what is held.
    """

    __slots__ = ("_bucket", "_clock", "_held", "_max_held", "_now", "_publish", "_timer")

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Clock,
        publish: Publish,
        max_held: int = MAX_HELD_NAMES,
    ) -> None:
        self._clock = clock
        self._now = clock.time()
        self._bucket = TokenBucket(rate, burst, self._now)
        self._publish = publish
        self._max_held = max_held
        self._held: dict[str, dict[str, Any]] = {}  # in the order their names came to wait
        self._timer: Timer | None = None

    @property
    def held(self) -> int:
        """How many names have a signal waiting."""
        return len(self._held)

    def offer(self, name: str, data: dict[str, Any]) -> Outcome:
        """Take one signal: sent now, held, superseding the held one of its name, or dropped."""
        if self._held:
            # Tokens that came due since go to the signals already waiting, in their order.
            self._release()
        if name in self._held:
            self._held[name] = data
            return Outcome.SUPERSEDED
        if not self._held:
            wait = self._bucket.take(self._time())
            if not wait:
                self._publish(name, data)
                return Outcome.SENT
            self._arm(wait)
        elif len(self._held) >= self._max_held:
            return Outcome.DROPPED
        self._held[name] = data
        return Outcome.HELD

    def close(self) -> None:
        """The socket closed: nothing held is sent any more."""
        self._held.clear()
        self._disarm()

    def _time(self) -> float:
        # The node's clock steps back when its offset to Redis's is measured again; the
        # bucket, fed an earlier time, would take tokens back.
        self._now = max(self._now, self._clock.time())
        return self._now

    def _release(self) -> None:
        """Send held signals, oldest name first, while the bucket has tokens."""
        while self._held:
            wait = self._bucket.take(self._time())
            if wait:
                self._arm(wait)
                return
            name = next(iter(self._held))
            self._publish(name, self._held.pop(name))
        self._disarm()

    def _arm(self, wait: float) -> None:
        if self._timer is None:
            self._timer = self._clock.call_at(self._now + wait + TIMER_SLACK, self._due)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self) -> None:
        self._timer = None
        self._release()
