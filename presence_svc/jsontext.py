"""Compact JSON text through CPython's C encoder, built once instead of once per message.

`json.JSONEncoder.encode` builds a new C encoder (`json.encoder.c_make_encoder`, from the
`_json` accelerator) on every call, plus the Python frames of `encode` and `iterencode` around
it. Every event a node receives is encoded once (codec.decode_envelope), so building the C
encoder once and calling it directly took codec.json_text of a bench cursor event from 8.6,
8.2 and 5.6 us to 6.2, 5.3 and 3.8 us, and decode_envelope with its other changes from 17.0,
18.1 and 15.4 to 15.3, 14.0 and 11.1 us (three alternate hot-loop runs, process time, on the
shared bench machine at load 6; docs/performance.md, "Receive path").

`c_make_encoder` is undocumented, so this module, and only this one, uses it, checked against
CPython 3.11.7 (tests/test_jsontext.py fails if it changes): its positional arguments
(markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys,
allow_nan) and that calling it with `(obj, 0)` returns the text's chunks. Where it is missing
(no `_json`) or refuses those arguments, the standard `JSONEncoder.encode` is used.

Two differences from `json.dumps`. No circular-reference check (`markers` None), on purpose,
since a shared markers dict could keep stale entries after a failed call: nothing the node
encodes can contain itself (msgpack replies, pydantic dumps, literals); a cycle would raise
RecursionError instead of ValueError. And fewer Python frames on the stack: a message nested
close to the recursion limit that `json.dumps` refused (RecursionError) may now be encoded,
a few levels deeper (tests/test_properties.py parses such texts with stack to spare).
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from typing import Any

# The options every WebSocket message is written with: compact, UTF-8 as is, strict floats.
STANDARD = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _c_encoder() -> Callable[[Any, int], Any] | None:
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        encoder: Callable[[Any, int], Any] = make(
            None,  # markers: no circular-reference check
            STANDARD.default,  # unsupported types: the standard TypeError
            json.encoder.encode_basestring,  # ensure_ascii=False
            None,  # indent
            ":",
            ",",
            False,  # sort_keys
            False,  # skipkeys
            False,  # allow_nan
        )
        if "".join(encoder({"a": [1, "é"]}, 0)) != '{"a":[1,"é"]}':
            return None
    except TypeError:
        return None
    return encoder


_ENCODE = _c_encoder()


def fast() -> bool:
    """Whether the C encoder is in use (tests check that it is, on CPython)."""
    return _ENCODE is not None


def compact(message: Any) -> str:
    """`message` as compact JSON (`STANDARD`'s options); TypeError for what JSON cannot
    hold, ValueError for NaN and infinities."""
    if _ENCODE is None:
        return STANDARD.encode(message)
    return "".join(_ENCODE(message, 0))
