"""The event envelope: msgpack on Redis channels, compact JSON text for WebSockets."""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack
import pytest

from presence_svc.codec import (
    EnvelopeError,
    Outgoing,
    decode_envelope,
    encode_envelope,
    json_text,
)

DATA = {
    "session_id": "0123456789abcdef0123456789abcdef",
    "user_id": "alice",
    "study_id": "s1",
    "chapter_id": None,
    "move_path": "main.1",
    "status": "active",
    "timestamp": "2027-01-15T08:00:00.000Z",
    "seq": 7,
}


def test_encode_envelope_layout() -> None:
    raw = encode_envelope("presence.user_joined", DATA, ts_ms=1_800_000_000_000)
    envelope = msgpack.unpackb(raw, raw=False)
    assert envelope == {"type": "presence.user_joined", "data": DATA, "ts": 1_800_000_000_000}
    assert list(envelope) == ["type", "data", "ts"]


def test_encode_envelope_defaults_ts_to_now() -> None:
    before = int(time.time() * 1000)
    envelope = msgpack.unpackb(encode_envelope("study.x", {}), raw=False)
    after = int(time.time() * 1000)
    assert before <= envelope["ts"] <= after


def test_presence_event_roundtrip() -> None:
    out = decode_envelope(encode_envelope("presence.user_idle", DATA, ts_ms=1))
    assert out.seq == 7
    # Clients get type and data only, as compact JSON.
    assert json.loads(out.text) == {"type": "presence.user_idle", "data": DATA}
    assert list(json.loads(out.text)) == ["type", "data"]
    assert ", " not in out.text
    assert ": " not in out.text


def test_envelope_without_ts_is_accepted() -> None:
    raw = msgpack.packb({"type": "presence.user_left", "data": DATA})
    assert decode_envelope(raw).seq == 7


def test_non_presence_events_have_no_seq() -> None:
    out = decode_envelope(encode_envelope("study.chapter_renamed", {"seq": 5, "name": "x"}))
    assert out == Outgoing(
        seq=None, text='{"type":"study.chapter_renamed","data":{"seq":5,"name":"x"}}'
    )


@pytest.mark.parametrize("seq", ["7", 7.0, None, [7]])
def test_presence_event_with_non_integer_seq_has_no_seq(seq: Any) -> None:
    out = decode_envelope(encode_envelope("presence.user_idle", {**DATA, "seq": seq}))
    assert out.seq is None


def test_presence_event_without_seq_has_no_seq() -> None:
    data = {k: v for k, v in DATA.items() if k != "seq"}
    assert decode_envelope(encode_envelope("presence.user_idle", data)).seq is None


def test_unicode_is_kept_as_is() -> None:
    out = decode_envelope(encode_envelope("study.note", {"text": "♞ Najdorf é 🙂"}))
    assert "♞ Najdorf é 🙂" in out.text
    assert "\\u" not in out.text


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xc1", "not msgpack"),  # never-used msgpack byte
        (b"", "not msgpack"),
        (msgpack.packb({"type": "x", "data": {}}) + b"\x00", "not msgpack"),  # trailing bytes
        (msgpack.packb({1: "x"}), "not msgpack"),  # non-string map key
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb("presence.user_joined"), "not a map"),
        (msgpack.packb({"data": {}}), "no string 'type'"),
        (msgpack.packb({"type": "", "data": {}}), "no string 'type'"),
        (msgpack.packb({"type": 3, "data": {}}), "no string 'type'"),
        (msgpack.packb({"type": "study.x"}), "no map 'data'"),
        (msgpack.packb({"type": "study.x", "data": [1]}), "no map 'data'"),
        (msgpack.packb({"type": "study.x", "data": {"b": b"\x00\x01"}}), "cannot be sent as JSON"),
        (msgpack.packb({"type": "study.x", "data": {"f": float("nan")}}), "cannot be sent as JSON"),
        (msgpack.packb({"type": "study.x", "data": {"f": float("inf")}}), "cannot be sent as JSON"),
    ],
)
def test_invalid_envelopes_are_rejected(raw: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        decode_envelope(raw)


def test_envelope_error_is_a_value_error() -> None:
    assert issubclass(EnvelopeError, ValueError)


def test_json_text_is_compact_and_strict() -> None:
    assert json_text({"a": [1, None, "é"], "b": {"c": True}}) == '{"a":[1,null,"é"],"b":{"c":true}}'
    with pytest.raises(ValueError):
        json_text({"x": float("nan")})
