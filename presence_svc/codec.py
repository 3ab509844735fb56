"""The event envelope: msgpack on Redis channels, JSON text on WebSockets.

On a study channel every message is a msgpack map `{"type": str, "data": map, "ts"?: int,
"from"?: str}` (see docs/redis-protocol.md; `from` names the connection a signal came from).
A node decodes each message once and encodes the JSON text that all of its sockets for the
study receive once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from presence_svc.jsontext import compact

PRESENCE_PREFIX = "presence."
SIGNAL_PREFIX = "signal."
CURSOR_MOVED = "presence.cursor_moved"


class EnvelopeError(ValueError):
    """A channel message that is not a valid envelope."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message ready to send: its study seq (None for non-presence events) and JSON text.

    A snapshot carries `floor`, the seq it reflects: queued events at or below it are stale.
    """

    seq: int | None
    text: str
    floor: int | None = None
    # The envelope's `ts`, when it has one: metadata for metrics, not part of the message.
    published_ms: int | None = field(default=None, compare=False)
    # Sockets (by connection id) that get another message instead of this one, or nothing
    # (None): a signal is not sent back to the socket that sent it.
    personal: Mapping[str, Outgoing | None] | None = field(default=None, compare=False)
    # Latest wins: a message not yet sent with the same key (a signal's or a cursor_moved's
    # type and user) is superseded by this one where that is allowed (batches; backlogs, for
    # messages without a seq).
    key: tuple[str, str] | None = field(default=None, compare=False)
    # The WebSocket frame of `text`, once a socket has built it (web/ws_connection.py): what
    # `text` determines, cached for the other sockets the message goes to.
    frame: bytes | None = field(default=None, init=False, compare=False, repr=False)


def encode_envelope(event_type: str, data: dict[str, Any], ts_ms: int | None = None) -> bytes:
    """msgpack bytes of an envelope, as nodes and backends publish it."""
    if ts_ms is None:
        ts_ms = int(time.time() * 1000)
    packed: bytes = msgpack.packb({"type": event_type, "data": data, "ts": ts_ms})
    return packed


def encode_signal(
    name: str,
    user_id: str,
    data: Mapping[str, Any],
    ts_ms: int | None = None,
    sender: str | None = None,
) -> bytes:
    """msgpack bytes of a `signal.<name>` envelope from `user_id`, who overrides any `user_id`
    in `data`; `sender` is the connection it came from (`from`), None for a backend's."""
    if ts_ms is None:
        ts_ms = int(time.time() * 1000)
    envelope: dict[str, Any] = {
        "type": SIGNAL_PREFIX + name,
        "data": {**data, "user_id": user_id},
        "ts": ts_ms,
    }
    if sender is not None:
        envelope["from"] = sender
    packed: bytes = msgpack.packb(envelope)
    return packed


def decode_envelope(raw: bytes) -> Outgoing:
    """Turn a channel message into the text sockets receive, or raise EnvelopeError."""
    # Paid once per event a node receives (docs/performance.md, "Receive path"): exact type
    # checks (msgpack gives exact dicts, strs and ints, and bool for booleans, never an int
    # subclass) and positional construction.
    try:
        envelope = _unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise EnvelopeError(f"not msgpack: {exc}") from None
    if type(envelope) is not dict:
        raise EnvelopeError("envelope is not a map")
    get = envelope.get
    event_type = get("type")
    data = get("data")
    if type(event_type) is not str or not event_type:
        raise EnvelopeError("envelope has no string 'type'")
    if type(data) is not dict:
        raise EnvelopeError("envelope has no map 'data'")
    try:
        text = compact({"type": event_type, "data": data})
    except (TypeError, ValueError, RecursionError) as exc:
        raise EnvelopeError(f"data cannot be sent as JSON: {exc}") from None
    # Only presence events share the study's seq; other backends' events are relayed as they are.
    seq = data.get("seq") if event_type.startswith(PRESENCE_PREFIX) else None
    ts = get("ts")
    personal: dict[str, Outgoing | None] | None = None
    key: tuple[str, str] | None = None
    signal = event_type.startswith(SIGNAL_PREFIX)
    if signal or event_type == CURSOR_MOVED:
        user_id = data.get("user_id")
        if type(user_id) is str:
            key = (event_type, user_id)
        sender = get("from")
        if signal and type(sender) is str:
            personal = {sender: None}
    return Outgoing(
        seq if type(seq) is int else None,
        text,
        None,
        ts if type(ts) is int else None,
        personal,
        key,
    )


_unpackb = msgpack.unpackb


def json_text(message: dict[str, Any]) -> str:
    """Compact JSON for one WebSocket message."""
    return compact(message)
