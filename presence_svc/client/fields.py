"""Reading the fields of server messages, strictly: a field that is not what the protocol
promises is a MalformedMessage, never a guess."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard


class MalformedMessage(ValueError):
    """A server message without the fields its type promises."""


def is_count(value: object) -> TypeGuard[int]:
    """Whether `value` is a count or a seq: an int (not a bool) of at least 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def seq_of(data: Mapping[str, Any]) -> int:
    """The message's `seq`."""
    seq = data.get("seq")
    if not is_count(seq):
        raise MalformedMessage("message without a valid seq")
    return seq


def text(data: Mapping[str, Any], name: str) -> str:
    """The field `name`, a non-empty string."""
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f"message without a string {name!r}")
    return value


def optional_text(data: Mapping[str, Any], name: str) -> str | None:
    """The field `name`, a string or None (absent counts as None)."""
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise MalformedMessage(f"{name!r} is not a string")
    return value
