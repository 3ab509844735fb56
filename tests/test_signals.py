"""Signals in the domain: each socket's limiter (on a clock the test moves), the size check, the
envelope, and PresenceService.signal on a store."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from presence_svc.codec import decode_envelope, encode_signal
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.service import PresenceService
from presence_svc.signals import MAX_HELD_NAMES, TIMER_SLACK, Outcome, SignalLimiter, data_size
from tests.support.clock import FakeClock, MovableClock
from tests.support.store import THRESHOLDS

RATE, BURST = 10.0, 3
TICK = 1 / RATE + TIMER_SLACK  # long enough for one token, and the timer set for it


class Limited:
    """A limiter on a clock the test moves, recording what it publishes."""

    def __init__(self, rate: float = RATE, burst: int = BURST) -> None:
        self.clock = MovableClock(1_800_000_000.0)
        self.published: list[tuple[str, Any]] = []
        self.limiter = SignalLimiter(rate, burst, self.clock, self._publish)

    def _publish(self, name: str, data: dict[str, Any]) -> None:
        self.published.append((name, data.get("n")))

    def offer(self, name: str, n: int) -> Outcome:
        return self.limiter.offer(name, {"n": n})

    async def advance(self, seconds: float) -> None:
        """Move the clock; the timers that came due run before this returns."""
        self.clock.advance(seconds)
        # MovableClock hands due timers to the loop with call_soon_threadsafe, ahead of this
        # task's next step: one pass of the loop runs them all.
        await asyncio.sleep(0)


async def test_a_burst_goes_out_at_once_then_the_signal_waits_for_the_rate() -> None:
    limited = Limited()
    assert [limited.offer("pointer", n) for n in range(BURST)] == [Outcome.SENT] * BURST
    assert limited.offer("pointer", BURST) is Outcome.HELD
    assert limited.published == [("pointer", n) for n in range(BURST)]
    await limited.advance(TICK / 2)
    assert len(limited.published) == BURST  # no token yet
    await limited.advance(TICK / 2)
    assert limited.published[-1] == ("pointer", BURST)
    assert limited.limiter.held == 0
    assert limited.clock.pending == 0  # nothing held, no timer left


async def test_the_latest_signal_of_a_name_wins_and_keeps_its_turn() -> None:
    limited = Limited(burst=1)
    assert limited.offer("pointer", 0) is Outcome.SENT
    assert limited.offer("pointer", 1) is Outcome.HELD
    assert limited.offer("typing", 2) is Outcome.HELD
    assert limited.offer("pointer", 3) is Outcome.SUPERSEDED
    assert limited.offer("pointer", 4) is Outcome.SUPERSEDED
    await limited.advance(TICK)
    # pointer waited first: its newest signal goes first, the superseded ones never.
    assert limited.published == [("pointer", 0), ("pointer", 4)]
    await limited.advance(TICK)
    assert limited.published == [("pointer", 0), ("pointer", 4), ("typing", 2)]
    assert limited.clock.pending == 0


async def test_over_a_long_run_no_more_than_the_rate_goes_out() -> None:
    limited = Limited()
    for step in range(100):  # 10 s of a client sending 50 pointer moves a second
        limited.offer("pointer", step)
        await limited.advance(0.02)
    assert len(limited.published) <= BURST + RATE * 2.0 + 1
    # The last move is sent once a token is due, not lost.
    await limited.advance(TICK)
    assert limited.published[-1] == ("pointer", 99)


async def test_a_signal_while_others_wait_queues_behind_them() -> None:
    limited = Limited(burst=1)
    limited.offer("pointer", 0)
    assert limited.offer("pointer", 1) is Outcome.HELD
    # A token has come due, but its timer has not run yet: the waiting pointer takes it.
    limited.clock.now += TICK
    assert limited.offer("typing", 2) is Outcome.HELD
    assert limited.published == [("pointer", 0), ("pointer", 1)]


async def test_at_most_eight_names_are_held_and_a_ninth_is_dropped() -> None:
    limited = Limited(burst=1)
    limited.offer("first", 0)
    names = [f"name_{i}" for i in range(MAX_HELD_NAMES)]
    assert [limited.offer(name, i) for i, name in enumerate(names)] == [Outcome.HELD] * 8
    assert limited.offer("ninth", 99) is Outcome.DROPPED
    # A name already held is still replaced at the cap.
    assert limited.offer("name_0", 100) is Outcome.SUPERSEDED
    assert limited.limiter.held == MAX_HELD_NAMES
    for _ in range(MAX_HELD_NAMES):  # the bucket holds one token at most (burst 1)
        await limited.advance(TICK)
    assert [name for name, _ in limited.published] == ["first", *names]
    assert ("name_0", 100) in limited.published and ("ninth", 99) not in limited.published


async def test_closing_cancels_the_timer_and_forgets_what_is_held() -> None:
    limited = Limited(burst=1)
    limited.offer("pointer", 0)
    limited.offer("pointer", 1)
    limited.offer("typing", 2)
    assert limited.clock.pending == 1
    limited.limiter.close()
    assert limited.clock.pending == 0 and limited.limiter.held == 0
    await limited.advance(10)
    assert limited.published == [("pointer", 0)]


async def test_a_clock_stepping_back_takes_no_tokens_back() -> None:
    # The node's clock steps when its offset to Redis's is measured again.
    limited = Limited(burst=2)
    limited.offer("a", 0)
    limited.clock.now -= 30
    assert limited.offer("b", 1) is Outcome.SENT
    limited.clock.now += 30 + TICK
    assert limited.offer("c", 2) is Outcome.SENT


def test_the_size_is_the_utf8_bytes_of_the_compact_json() -> None:
    assert data_size({}) == 2
    assert data_size({"square": "e4", "n": 1}) == len('{"square":"e4","n":1}')
    assert data_size({"t": "é"}) == len('{"t":"é"}'.encode()) == 10


# --- the envelope ---------------------------------------------------------------------------


def test_a_signal_envelope_names_its_sender_and_socket() -> None:
    raw = encode_signal("typing", "alice", {"user_id": "mallory", "chapter_id": "c1"}, 1234, "c9")
    envelope = msgpack.unpackb(raw, raw=False)
    assert envelope == {
        "type": "signal.typing",
        "data": {"user_id": "alice", "chapter_id": "c1"},
        "ts": 1234,
        "from": "c9",
    }
    assert list(envelope) == ["type", "data", "ts", "from"]
    out = decode_envelope(raw)
    assert out.seq is None and out.published_ms == 1234
    assert out.text == '{"type":"signal.typing","data":{"user_id":"alice","chapter_id":"c1"}}'
    assert out.key == ("signal.typing", "alice")
    assert out.personal == {"c9": None}  # not sent back to the socket it came from


def test_a_backend_s_signal_has_no_sender_socket() -> None:
    raw = encode_signal("pointer", "bot", {"square": None}, 1)
    assert "from" not in msgpack.unpackb(raw, raw=False)
    assert decode_envelope(raw).personal is None


# --- the service ----------------------------------------------------------------------------


@pytest.fixture
async def store(fake_redis: Any, key_prefix: str) -> Any:
    opened = RedisStore(fake_redis, Keys(key_prefix), THRESHOLDS)
    try:
        yield opened
    finally:
        await opened.close()


async def test_the_service_publishes_a_signal_stamped_on_its_clock_and_stores_nothing(
    store: RedisStore, fake_redis: Any, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    service = PresenceService(store, FakeClock(1_800_000_000.25))
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(keys.channel("s1"))
    assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
    receivers = await service.signal("alice", "s1", "pointer", {"square": "e4"}, "conn-1")
    message = await pubsub.get_message(timeout=1)
    assert receivers == 1
    assert msgpack.unpackb(message["data"], raw=False) == {
        "type": "signal.pointer",
        "data": {"square": "e4", "user_id": "alice"},
        "ts": 1_800_000_000_250,
        "from": "conn-1",
    }
    assert await fake_redis.keys(f"{key_prefix}:*") == []  # no session, no seq
    await pubsub.aclose()
