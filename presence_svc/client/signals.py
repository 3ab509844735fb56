"""Signals (README, "Signals"): the message a client sends, checked as the server checks it,
and what a received `signal.<name>` message becomes for the client's listeners.

A signal is ephemeral: no seq, never stored, never queued across reconnects. Checking it here
too turns a mistake into a ValueError at the call instead of an error message from the
server later, unrelated to anything the caller is still looking at.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from presence_svc.client.feed import PresenceEvent

SIGNAL_PREFIX = "signal."
# The protocol's grammar of a name (issue 13), as the node checks it.
SIGNAL_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
DEFAULT_MAX_BYTES = 1024  # the server's PRESENCE_SIGNAL_MAX_BYTES by default

_NAME = re.compile(SIGNAL_NAME_PATTERN)
_INT64, _UINT64 = -(2**63), 2**64 - 1


def encode_signal(name: str, data: Mapping[str, Any] | None, max_bytes: int) -> str:
    """The text of the signal message; ValueError for a name, data or size the server refuses.

    The size is what the server measures: the data's compact JSON, in UTF-8 bytes.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"signal name must match {SIGNAL_NAME_PATTERN}: {name!r}")
    if not isinstance(data, Mapping | None):
        raise ValueError(f"signal data must be a mapping: {data!r}")
    payload = dict(data) if data is not None else {}
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"signal data must be JSON (finite numbers): {exc}") from None
    _check_integers(payload)
    size = len(text.encode())
    if size > max_bytes:
        raise ValueError(f"signal data is {size} bytes of JSON; at most {max_bytes} are allowed")
    return json.dumps(
        {"type": "signal", "name": name, "data": payload},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def received(kind: str, data: dict[str, Any], message: dict[str, Any]) -> PresenceEvent | None:
    """The event of a received `signal.<name>` message; None if `kind` is not a signal's."""
    if not kind.startswith(SIGNAL_PREFIX) or len(kind) == len(SIGNAL_PREFIX):
        return None
    return PresenceEvent("signal", signal=kind[len(SIGNAL_PREFIX) :], data=data, message=message)


def _check_integers(value: object) -> None:
    # The server relays data through msgpack, which carries 64-bit integers at most.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and not _INT64 <= item <= _UINT64:
            raise ValueError(f"signal data integers must fit in 64 bits: {item}")
