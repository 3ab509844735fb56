"""Signals over `WS /ws/presence`: the in-process app on fakeredis, its clock moved by the test.

Proving that a socket did not get a signal: a backend's marker event is published after it on
the same channel, and every node delivers a channel's messages in order, so a socket whose
next message is the marker never got the signal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from presence_svc.publisher import study_event
from presence_svc.redis.keys import Keys
from presence_svc.signals import MAX_HELD_NAMES, TIMER_SLACK
from presence_svc.store import StoreUnavailable
from tests.support.app import app_client, fake_redis
from tests.support.clock import MovableClock
from tests.web.test_ws import THRESHOLDS, App, join, ping, receive

MAX_BYTES = 64


@contextmanager
def signal_app(key_prefix: str, **overrides: Any) -> Iterator[App]:
    redis = fake_redis()
    settings = {**THRESHOLDS, "signal_max_bytes": MAX_BYTES, **overrides}
    with app_client(key_prefix=key_prefix, redis=redis, **settings) as client:
        yield App(client, redis, Keys(key_prefix))


@pytest.fixture
def app(key_prefix: str) -> Iterator[App]:
    with signal_app(key_prefix) as opened:
        yield opened


def signal(ws: WebSocketTestSession, name: str, data: dict[str, Any] | None = None) -> None:
    message: dict[str, Any] = {"type": "signal", "name": name}
    if data is not None:
        message["data"] = data
    ws.send_json(message)


def marker(app: App, study: str, n: int = 0) -> dict[str, Any]:
    """Publish a backend event on the study's channel; the message its sockets get (so it goes
    left of `==`, to be published before `receive` waits)."""
    app.publish(study, study_event(study, "test.marker", {"n": n}))
    return {"type": "test.marker", "data": {"n": n}}


def outcomes(app: App) -> dict[str, float | None]:
    registry = app.node.metrics.registry
    names = ("sent", "held", "superseded", "dropped", "too_large", "invalid")
    return {
        name: registry.get_sample_value("presence_signals_total", {"outcome": name})
        for name in names
    }


def error_code(ws: WebSocketTestSession) -> str:
    message = receive(ws)
    assert message["type"] == "error", message
    code: str = message["data"]["code"]
    return code


def test_a_signal_reaches_every_other_socket_of_the_study_and_not_its_sender(app: App) -> None:
    with (
        app.open("s1", "alice") as sender,
        app.open("s1", "alice") as same_user,
        app.open("s1", "bob") as bob,
        app.open("s2", "carol") as elsewhere,
    ):
        for ws in (sender, same_user, bob, elsewhere):
            join(ws)
        signal(sender, "pointer", {"chapter_id": "c1", "square": "e4", "user_id": "mallory"})
        # The sender's user from its token, whatever the data says; no seq.
        expected = {
            "type": "signal.pointer",
            "data": {"chapter_id": "c1", "square": "e4", "user_id": "alice"},
        }
        assert receive(same_user) == expected
        assert receive(bob) == expected
        assert marker(app, "s1") == receive(sender)
        assert marker(app, "s2") == receive(elsewhere)
    assert outcomes(app)["sent"] == 1


def test_data_is_optional_and_defaults_to_an_empty_object(app: App) -> None:
    with app.open("s1", "alice") as alice, app.open("s1", "bob") as bob:
        join(alice)
        join(bob)
        signal(alice, "typing")
        assert receive(bob) == {"type": "signal.typing", "data": {"user_id": "alice"}}


def test_a_signal_is_not_presence(app: App) -> None:
    with app.open("s1", "alice") as alice, app.open("s1", "bob") as bob:
        join(alice)
        join(bob)
        signal(alice, "typing", {"chapter_id": "c1"})
        signal(alice, "pointer", {"chapter_id": "c1", "square": None})
        assert receive(bob)["type"] == "signal.typing"
        assert receive(bob)["type"] == "signal.pointer"
        # No presence event went out: the marker published after the signals comes next.
        assert marker(app, "s1") == receive(bob)
    # No session, no seq: nothing of the study is stored at all.
    listing = app.presence("s1")
    assert (listing["users"], listing["total"], listing["seq"]) == ([], 0, 0)
    stored = app.client.portal.call(app.redis.keys, "*{s1}*")  # type: ignore[union-attr]
    assert stored == []


def test_any_name_of_the_grammar_is_relayed(app: App) -> None:
    with app.open("s1", "alice") as alice, app.open("s1", "bob") as bob:
        join(alice)
        join(bob)
        longest = "r" + "0_" * 15 + "z"
        signal(alice, longest, {"emoji": "+1"})
        message = receive(bob)
        assert message == {"type": f"signal.{longest}", "data": {"emoji": "+1", "user_id": "alice"}}


INVALID = {
    "no name": {"type": "signal"},
    "empty name": {"type": "signal", "name": ""},
    "upper case": {"type": "signal", "name": "Typing"},
    "digit first": {"type": "signal", "name": "1typing"},
    "hyphen": {"type": "signal", "name": "ty-ping"},
    "dot": {"type": "signal", "name": "typing.x"},
    "33 characters": {"type": "signal", "name": "a" * 33},
    "not a string": {"type": "signal", "name": 7},
    "data a list": {"type": "signal", "name": "typing", "data": [1]},
    "data a string": {"type": "signal", "name": "typing", "data": "x"},
    "data null": {"type": "signal", "name": "typing", "data": None},
    "data a number": {"type": "signal", "name": "typing", "data": 3},
    "an extra field": {"type": "signal", "name": "typing", "data": {}, "user_id": "bob"},
    "a huge integer": {"type": "signal", "name": "typing", "data": {"n": 2**64}},
}
# What the JSON parser lets through and neither msgpack nor strict JSON could carry.
INVALID_TEXT = {
    "NaN": '{"type":"signal","name":"typing","data":{"x":NaN}}',
    "Infinity": '{"type":"signal","name":"typing","data":{"x":[1e999]}}',
}


def test_every_invalid_signal_gets_invalid_message_and_nothing_is_sent(app: App) -> None:
    cases = {name: json.dumps(message) for name, message in INVALID.items()} | INVALID_TEXT
    with app.open("s1", "alice") as alice, app.open("s1", "bob") as bob:
        join(alice)
        join(bob)
        for case, text in cases.items():
            alice.send_text(text)
            error = receive(alice)
            assert error["type"] == "error", case
            assert error["data"]["code"] == "invalid_message", case
            problems = error["data"]["errors"]
            assert problems and all(p["loc"][0] == "signal" for p in problems), (case, problems)
        ping(alice)  # still open
        assert marker(app, "s1") == receive(bob)
    assert outcomes(app)["invalid"] == len(cases)
    assert outcomes(app)["sent"] == 0


def test_data_over_the_size_limit_is_signal_too_large(app: App) -> None:
    with app.open("s1", "alice") as alice, app.open("s1", "bob") as bob:
        join(alice)
        join(bob)
        fits = {"t": "x" * (MAX_BYTES - len('{"t":""}'))}  # exactly MAX_BYTES as compact JSON
        signal(alice, "typing", fits)
        assert receive(bob)["data"]["t"] == fits["t"]
        signal(alice, "typing", {"t": fits["t"] + "x"})
        assert error_code(alice) == "signal_too_large"
        # Bytes of UTF-8, not characters: é is two.
        signal(alice, "typing", {"t": fits["t"][1:] + "é"})
        assert error_code(alice) == "signal_too_large"
        ping(alice)
        assert marker(app, "s1") == receive(bob)
    assert (outcomes(app)["sent"], outcomes(app)["too_large"]) == (1, 2)


def test_a_flood_of_signals_is_closed_by_the_message_rate(key_prefix: str) -> None:
    with (
        signal_app(key_prefix, ws_message_rate=0.001, ws_message_burst=5) as app,
        app.open("s1", "alice") as alice,
    ):
        join(alice)
        for n in range(6):
            signal(alice, "pointer", {"n": n})
        with pytest.raises(WebSocketDisconnect) as closed:
            receive(alice)
        assert closed.value.code == 1008


def test_over_the_signal_rate_the_latest_of_each_name_is_sent_when_the_rate_allows(
    key_prefix: str,
) -> None:
    with signal_app(key_prefix, signal_rate=1, signal_burst=2) as app:
        clock = app.node.clock = MovableClock()
        with app.open("s1", "alice") as alice, app.open("s1", "bob") as bob:
            join(alice)
            join(bob)
            for n in range(2):
                signal(alice, "pointer", {"n": n})
            assert [receive(bob)["data"]["n"] for _ in range(2)] == [0, 1]
            for n in range(2, 6):
                signal(alice, "pointer", {"n": n})
            signal(alice, "typing", {"n": 6})
            signal(alice, "pointer", {"n": 7})
            ping(alice)  # every signal above has been read: the newest of each name waits
            assert marker(app, "s1", 1) == receive(bob)
            clock.advance(1 + TIMER_SLACK)
            assert receive(bob) == {"type": "signal.pointer", "data": {"n": 7, "user_id": "alice"}}
            clock.advance(1 + TIMER_SLACK)
            assert receive(bob) == {"type": "signal.typing", "data": {"n": 6, "user_id": "alice"}}
            assert marker(app, "s1", 2) == receive(bob)
    assert outcomes(app) == {
        "sent": 2,
        "held": 2,
        "superseded": 4,
        "dropped": 0,
        "too_large": 0,
        "invalid": 0,
    }


def test_a_signal_of_a_ninth_held_name_is_dropped_with_signal_rate_exceeded(
    key_prefix: str,
) -> None:
    with signal_app(key_prefix, signal_rate=1, signal_burst=1) as app:
        app.node.clock = MovableClock()
        with app.open("s1", "alice") as alice:
            join(alice)
            signal(alice, "first")
            for i in range(MAX_HELD_NAMES):
                signal(alice, f"name_{i}")
            signal(alice, "ninth")
            message = receive(alice)
            assert message["data"]["code"] == "signal_rate_exceeded", message
            assert "ninth" in message["data"]["message"]
            ping(alice)
    assert (outcomes(app)["held"], outcomes(app)["dropped"]) == (MAX_HELD_NAMES, 1)


def test_held_signals_of_a_closed_socket_are_never_sent(key_prefix: str) -> None:
    with signal_app(key_prefix, signal_rate=1, signal_burst=1) as app:
        clock = app.node.clock = MovableClock()
        with app.open("s1", "bob") as bob:
            join(bob)
            with app.open("s1", "alice") as alice:
                join(alice)
                signal(alice, "typing", {"n": 0})
                signal(alice, "typing", {"n": 1})
                ping(alice)
                assert receive(bob)["data"]["n"] == 0
            clock.advance(5)
            assert marker(app, "s1") == receive(bob)


def test_a_publish_redis_refuses_is_an_unavailable_error_and_the_socket_stays_open(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(*args: object, **kwargs: object) -> Any:
        raise StoreUnavailable("connection refused")

    with app.open("s1", "alice") as alice, app.open("s1", "bob") as bob:
        join(alice)
        join(bob)
        monkeypatch.setattr(app.node.service, "signal", unavailable)
        signal(alice, "typing")
        assert receive(alice) == {
            "type": "error",
            "data": {
                "code": "unavailable",
                "message": "signal 'typing' was not sent: presence storage is unreachable",
            },
        }
        ping(alice)
        monkeypatch.undo()
        signal(alice, "typing")
        assert receive(bob)["type"] == "signal.typing"


def test_a_publish_that_fails_unexpectedly_is_an_internal_error(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("a bug")

    with app.open("s1", "alice") as alice:
        join(alice)
        monkeypatch.setattr(app.node.service, "signal", broken)
        signal(alice, "typing")
        assert error_code(alice) == "internal"
        ping(alice)
