"""jsontext.py: CPython's C JSON encoder, built once, gives what json.JSONEncoder gives.

If a CPython release changed `json.encoder.c_make_encoder`, jsontext would quietly fall back
to the standard encoder and every received event would cost what it did before
(docs/performance.md, "Receive path"): the first test fails instead, naming the version.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presence_svc import jsontext

STANDARD = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(), inner, max_size=5),
        st.tuples(inner, inner),
    ),
    max_leaves=30,
)


def test_the_c_encoder_is_used() -> None:
    if platform.python_implementation() != "CPython":
        pytest.skip("the C encoder is CPython's")
    assert jsontext.fast(), (
        f"CPython {sys.version.split()[0]}: json.encoder.c_make_encoder changed; every message "
        "is encoded the slow way now: recheck presence_svc/jsontext.py"
    )


@pytest.fixture(params=["c", "standard"])
def encode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """jsontext.compact as it runs, and with the fallback it takes where the C encoder is
    missing."""
    if request.param == "standard":
        monkeypatch.setattr(jsontext, "_ENCODE", None)
    return jsontext.compact


@settings(max_examples=300, deadline=None)
@given(value=VALUES)
def test_the_same_text_as_the_standard_encoder(value: Any) -> None:
    assert jsontext.compact(value) == STANDARD.encode(value)


@pytest.mark.parametrize(
    "value",
    [
        {"type": "presence.cursor_moved", "data": {"seq": 7, "move_path": "main.12.var2.3"}},
        {"text": '♞ "quoted" \\ \n\t\x00 \u2028 🙂'},
        {"floats": [1e16, 1e-7, -0.0, 0.1, 1.5, 123456789.125]},
        {"ints": [2**70, -(2**64), 0, True, False, None]},
        {1: "int key", 2.5: "float key", None: "null key", False: "bool key"},
        {"nested": {"a": [[], {}, ()], "b": [{"c": [1, [2, [3]]]}]}},
        "a top-level string",
        [1, 2, 3],
    ],
)
def test_known_texts(encode: Any, value: Any) -> None:
    assert encode(value) == STANDARD.encode(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_floats_are_refused_the_same_way(encode: Any, value: float) -> None:
    with pytest.raises(ValueError) as standard:
        STANDARD.encode({"f": value})
    with pytest.raises(ValueError) as ours:
        encode({"f": value})
    assert str(ours.value) == str(standard.value)


def test_what_json_cannot_hold_is_refused_the_same_way(encode: Any) -> None:
    with pytest.raises(TypeError) as standard:
        STANDARD.encode({"b": b"\x00"})
    with pytest.raises(TypeError) as ours:
        encode({"b": b"\x00"})
    assert str(ours.value) == str(standard.value)


def test_too_deep_nesting_is_a_recursion_error(encode: Any) -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        encode(deep)
