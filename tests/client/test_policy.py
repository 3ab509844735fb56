"""The client's pure decisions: close-code reactions, backoff, token refresh times, URLs,
heartbeat messages."""

from __future__ import annotations

import json
import random
import time

import pytest

from presence_svc.client.endpoints import Endpoints
from presence_svc.client.intent import Intent, check_cursor
from presence_svc.client.policy import Backoff, Reaction, Retry, reaction
from presence_svc.client.tokens import Tokens, refresh_delay, token_expiry
from tests.support.auth import token


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (1012, Reaction.RECONNECT_NOW),
        (4401, Reaction.REFRESH_TOKEN),
        (4400, Reaction.STOP),
        (4403, Reaction.STOP),
        (1008, Reaction.BACK_OFF),
        (1013, Reaction.BACK_OFF),
        (1011, Reaction.BACK_OFF),
        (1006, Reaction.BACK_OFF),
        (4429, Reaction.BACK_OFF),
        (None, Reaction.BACK_OFF),  # never opened: refused connection, failed handshake
    ],
)
def test_each_close_code_has_its_reaction(code: int | None, expected: Reaction) -> None:
    assert reaction(code) is expected


def test_a_resync_reconnects_at_once_whatever_the_code() -> None:
    assert reaction(1000, resync=True) is Reaction.RECONNECT_NOW


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    backoff = Backoff(first=0.5, cap=4.0, stable_after=10.0)
    top = Retry(backoff, _Extreme(high=True))
    assert [top.delay(Reaction.BACK_OFF, now=0.0) for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    bottom = Retry(backoff, _Extreme(high=False))
    assert {bottom.delay(Reaction.BACK_OFF, now=0.0) for _ in range(6)} == {0.0}
    draws = Retry(backoff, random.Random(7))
    delays = [draws.delay(Reaction.BACK_OFF, now=0.0) for _ in range(200)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) == len(delays), "not jittered"
    assert min(delays[4:]) < 1.0 < max(delays[4:]), "jitter does not span the range"


def test_backoff_resets_only_after_staying_up_a_while() -> None:
    retry = Retry(Backoff(first=1.0, cap=64.0, stable_after=10.0), _Extreme(high=True))
    assert [retry.delay(Reaction.BACK_OFF, now=0.0) for _ in range(3)] == [1, 2, 4]
    retry.opened(now=100.0)
    assert retry.delay(Reaction.BACK_OFF, now=105.0) == 8, "reset after 5 s up"
    retry.opened(now=200.0)
    assert retry.delay(Reaction.BACK_OFF, now=210.0) == 1


def test_quick_reconnects_back_off_when_they_repeat() -> None:
    retry = Retry(Backoff(first=1.0, quick_jitter=0.25, quick_limit=2), _Extreme(high=True))
    assert retry.delay(Reaction.RECONNECT_NOW, now=0.0) == 0.25
    assert retry.delay(Reaction.REFRESH_TOKEN, now=0.0) == 0.25
    assert retry.delay(Reaction.RECONNECT_NOW, now=0.0) == 1.0, "a third one in a row"
    retry.opened(now=0.0)
    assert retry.delay(Reaction.RECONNECT_NOW, now=60.0) == 0.25


@pytest.mark.parametrize(
    "options", [{"first": 0}, {"first": 2, "cap": 1}, {"stable_after": -1}, {"quick_limit": -1}]
)
def test_a_backoff_that_makes_no_sense_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**options)  # type: ignore[arg-type]


def test_tokens_are_refreshed_well_before_they_expire() -> None:
    assert refresh_delay(expires_at=3600, now=0) == 3540  # 60 s ahead at most
    assert refresh_delay(expires_at=90, now=0) == 60  # a third of the way before
    assert refresh_delay(expires_at=3, now=0) == 2  # at least a second before
    assert refresh_delay(expires_at=1, now=0) == 0.25  # never a refresh loop
    assert refresh_delay(expires_at=0, now=10) == 0.25


def test_the_expiry_is_read_from_the_token_unverified() -> None:
    signed = token("alice", ttl=120)
    expires = token_expiry(signed)
    assert expires is not None and 100 < expires - time.time() <= 120
    assert token_expiry("not-a-token") is None


async def test_a_token_is_needed_and_a_source_must_give_one() -> None:
    with pytest.raises(ValueError, match="token"):
        Tokens(None, None)
    with pytest.raises(ValueError, match="empty"):
        Tokens("", None)

    async def nothing() -> str:
        return ""

    tokens = Tokens(None, nothing)
    with pytest.raises(ValueError, match="no token"):
        await tokens.usable()


def test_urls_become_socket_and_rest_urls_and_rotate() -> None:
    endpoints = Endpoints(["https://a.example/base/", "ws://b:8000"])
    assert endpoints.socket_url("s:1") == "wss://a.example/base/ws/presence?study_id=s%3A1"
    assert endpoints.rest_urls("/presence/s1") == [
        "https://a.example/base/presence/s1",
        "http://b:8000/presence/s1",
    ]
    endpoints.rotate()
    assert endpoints.socket_url("s1") == "ws://b:8000/ws/presence?study_id=s1"
    endpoints.rotate()
    assert endpoints.socket_url("s1").startswith("wss://a.example/")
    assert Endpoints("http://one").socket_url("s") == "ws://one/ws/presence?study_id=s"


@pytest.mark.parametrize("bad", [[], ["ftp://a"], ["a.example"], ["http://a/?x=1"], ["http://"]])
def test_bad_urls_are_refused(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="URL"):
        Endpoints(bad)


async def test_heartbeats_carry_only_the_fields_set_and_all_of_them_on_a_new_socket() -> None:
    intent = Intent()
    assert not intent.joined
    intent.set_cursor({"move_path": "main.3"})
    assert intent.joined and intent.wake.is_set()
    assert json.loads(intent.heartbeat(full=False)) == {"type": "heartbeat", "move_path": "main.3"}
    assert intent.heartbeat(full=False) == '{"type":"heartbeat"}'
    intent.set_cursor({"chapter_id": "ch1", "move_path": None})
    # The order and spacing of the server's fast path (models.compact_heartbeat).
    assert intent.heartbeat(full=True) == '{"type":"heartbeat","chapter_id":"ch1","move_path":null}'
    intent.leave()
    assert not intent.joined and intent.heartbeat(full=True) == '{"type":"heartbeat"}'


async def test_inactivity_is_not_hidden() -> None:
    intent = Intent()
    intent.set_cursor({})
    intent.wake.clear()
    intent.set_active(False)
    assert not intent.active and not intent.wake.is_set()
    intent.set_active(True)
    assert intent.wake.is_set(), "coming back should heartbeat at once"
    intent.set_active(False)
    intent.set_cursor({"chapter_id": "ch2"})
    assert intent.active, "moving the cursor is activity"


@pytest.mark.parametrize(
    ("chapter", "move"),
    [("", None), ("bad id", None), (None, "main.x"), (None, "main." + "1" * 600)],
)
def test_cursor_fields_are_checked_before_sending(chapter: str | None, move: str | None) -> None:
    with pytest.raises(ValueError, match="must be None or match"):
        check_cursor(chapter, move)


class _Extreme(random.Random):
    """Draws the top (or the bottom) of every range: the schedule's bounds, exactly."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self._high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self._high else a
