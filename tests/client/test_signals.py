"""Signals the Python client sends: checked as the server checks them, before they go out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from presence_svc.client import PresenceClient
from presence_svc.client.signals import encode_signal, received


def test_a_signal_is_the_protocols_message() -> None:
    text = encode_signal("pointer", {"chapter_id": "ch1", "square": "e4"}, 1024)
    assert json.loads(text) == {
        "type": "signal",
        "name": "pointer",
        "data": {"chapter_id": "ch1", "square": "e4"},
    }
    assert json.loads(encode_signal("typing", None, 1024))["data"] == {}


@pytest.mark.parametrize("name", ["", "Typing", "9lives", "a-b", "x" * 33, "é"])
def test_names_outside_the_grammar_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="signal name"):
        encode_signal(name, {}, 1024)


def test_the_size_is_the_compact_json_in_utf8_bytes() -> None:
    # {"t":"..."} is 8 bytes around the text; "é" is 2 bytes in UTF-8.
    assert encode_signal("t", {"t": "é" * 4}, 16)
    with pytest.raises(ValueError, match="17 bytes"):
        encode_signal("t", {"t": "é" * 4 + "x"}, 16)


@pytest.mark.parametrize(
    "data", [["not", "a", "mapping"], {"n": float("nan")}, {"n": 2**64}, {"o": object()}]
)
def test_data_the_server_could_not_relay_is_refused(data: Any) -> None:
    with pytest.raises(ValueError, match="signal data"):
        encode_signal("t", data, 1024)


def test_a_received_signal_names_itself() -> None:
    data = {"user_id": "bob"}
    message = {"type": "signal.typing", "data": data}
    event = received("signal.typing", data, message)
    assert event is not None and (event.kind, event.signal, event.data) == (
        "signal",
        "typing",
        {"user_id": "bob"},
    )
    assert received("signal.", {}, {}) is None and received("study.x", {}, {}) is None


async def test_send_signal_is_false_when_not_connected_and_checks_first() -> None:
    client = PresenceClient("http://127.0.0.1:9", "st", token="t")
    assert await client.send_signal("typing") is False
    with pytest.raises(ValueError):
        await client.send_signal("Bad")
    assert (client.counts(), client.total, client.complete) == (
        {"active": 0, "idle": 0, "away": 0},
        0,
        True,
    )
