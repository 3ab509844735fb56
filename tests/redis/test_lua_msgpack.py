"""The pure-Lua msgpack encoder in lua/_lib.lua, on fakeredis's Lua and on real Redis.

Each test runs `_lib.lua` followed by a small body (as scripts.script_source builds the
operation scripts) and checks the bytes it returns with msgpack-python.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import msgpack
import pytest
from redis.exceptions import ResponseError

from tests.conftest import open_redis


@pytest.fixture(params=["fake", "real"])
async def any_redis(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Any]:
    """Single-Redis clients only: this module tests what a cluster has per shard."""
    async with open_redis(request.param, request, key_prefix) as client:
        yield client


LIB = (resources.files("presence_svc.redis") / "lua" / "_lib.lua").read_text()

# ARGV[1] = kind, ARGV[2] = value. Integers arrive as decimal text and go through tonumber(),
# as the operation scripts do with their ARGV.
VALUE_BODY = """
local kind, raw = ARGV[1], ARGV[2]
if kind == 'int' then return mp_value(tonumber(raw)) end
if kind == 'str' then return mp_value(raw) end
if kind == 'nil' then return mp_value(nil) end
if kind == 'mpnil' then return mp_value(MP_NIL) end
if kind == 'bool' then return mp_value(true) end
if kind == 'table' then return mp_value({1, 2}) end
error('unknown kind ' .. tostring(kind))
"""

# ARGV = k1, v1, k2, v2, ...: a map of string keys and string values, in that order.
MAP_BODY = """
local pairs_list = {}
for i = 1, #ARGV do pairs_list[i] = ARGV[i] end
return mp_map(pairs_list).mp_raw
"""


def script(body: str) -> str:
    """Prelude plus body, joined exactly as presence_svc.redis.scripts.script_source joins them."""
    return LIB + "\n" + body


async def run(client: Any, body: str, *args: str | int) -> bytes:
    raw = await client.eval(script(body), 0, *args)
    assert isinstance(raw, bytes), f"expected a bulk string reply, got {raw!r}"
    return raw


def unpack(raw: bytes) -> Any:
    # unpackb rejects trailing bytes (ExtraData), so this also checks the length is exact.
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


async def encode_int(client: Any, value: int) -> bytes:
    return await run(client, VALUE_BODY, "int", str(value))


async def encode_str(client: Any, value: str) -> bytes:
    return await run(client, VALUE_BODY, "str", value)


NON_NEGATIVE = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**40 + 7, 2**53]


@pytest.mark.parametrize("value", NON_NEGATIVE)
async def test_non_negative_integers_match_msgpack_python(any_redis: Any, value: int) -> None:
    raw = await encode_int(any_redis, value)
    assert unpack(raw) == value
    # Same smallest encoding msgpack-python picks (so envelopes are byte-identical to Python's).
    assert raw == msgpack.packb(value)


@pytest.mark.parametrize(
    ("value", "first_byte", "size"),
    [
        (127, 0x7F, 1),  # positive fixint
        (128, 0xCC, 2),  # uint8
        (255, 0xCC, 2),
        (256, 0xCD, 3),  # uint16
        (65535, 0xCD, 3),
        (65536, 0xCE, 5),  # uint32
        (2**32 - 1, 0xCE, 5),
        (2**32, 0xCF, 9),  # uint64
        (2**53, 0xCF, 9),
    ],
)
async def test_integer_format_boundaries(
    any_redis: Any, value: int, first_byte: int, size: int
) -> None:
    raw = await encode_int(any_redis, value)
    assert raw[0] == first_byte
    assert len(raw) == size


@pytest.mark.parametrize("value", [-1, -2, -31, -32, -33, -128, -129, -32768, -65536, -(2**31)])
async def test_negative_integers_decode(any_redis: Any, value: int) -> None:
    raw = await encode_int(any_redis, value)
    assert unpack(raw) == value
    if value >= -32:
        assert len(raw) == 1  # negative fixint
        assert raw[0] == (256 + value)
    else:
        assert raw[0] == 0xD2  # int32 (valid msgpack, if not the smallest form)
        assert len(raw) == 5


async def test_timestamp_sized_integers(any_redis: Any) -> None:
    # Event timestamps and heartbeat scores are ~13-digit millisecond values.
    for value in (1_800_000_000_000, 1_800_000_000_123, 4_102_444_800_000):
        raw = await encode_int(any_redis, value)
        assert unpack(raw) == value
        assert raw == msgpack.packb(value)


@pytest.mark.parametrize("value", [2**31 * -1 - 1, -(2**40)])
async def test_integer_below_int32_range_is_an_error(any_redis: Any, value: int) -> None:
    with pytest.raises(ResponseError, match="integer out of range"):
        await encode_int(any_redis, value)


async def test_fraction_is_an_error(any_redis: Any) -> None:
    with pytest.raises(ResponseError, match="only integers are encoded"):
        await run(any_redis, VALUE_BODY, "int", "1.5")


@pytest.mark.parametrize("kind", ["bool", "table"])
async def test_unsupported_types_are_errors(any_redis: Any, kind: str) -> None:
    with pytest.raises(ResponseError, match="cannot encode"):
        await run(any_redis, VALUE_BODY, kind, "")


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\xa0"),
        (1, b"\xa1"),
        (31, b"\xbf"),
        (32, b"\xd9\x20"),
        (255, b"\xd9\xff"),
        (256, b"\xda\x01\x00"),
        (65535, b"\xda\xff\xff"),
        (65536, b"\xdb\x00\x01\x00\x00"),
    ],
)
async def test_string_lengths(any_redis: Any, length: int, header: bytes) -> None:
    value = "".join(chr(ord("a") + i % 26) for i in range(length))
    raw = await encode_str(any_redis, value)
    assert raw[: len(header)] == header
    assert len(raw) == len(header) + length
    assert unpack(raw) == value
    assert raw == msgpack.packb(value)


@pytest.mark.parametrize(
    "value",
    [
        "é",
        "♞ Najdorf",
        "🙂",
        "日本語のチャプター",
        "é" * 15 + "x",  # 16 characters, 31 bytes: still a fixstr
        "é" * 16,  # 16 characters, 32 bytes: str8, length counted in bytes
        "♞" * 100,  # 300 bytes: str16
    ],
)
async def test_unicode_strings_count_bytes(any_redis: Any, value: str) -> None:
    raw = await encode_str(any_redis, value)
    assert unpack(raw) == value
    assert raw == msgpack.packb(value)


async def test_string_with_nul_and_binary_safe_bytes(any_redis: Any) -> None:
    value = "a\x00b\x7fc"
    raw = await encode_str(any_redis, value)
    assert unpack(raw) == value


@pytest.mark.parametrize("kind", ["nil", "mpnil"])
async def test_nil(any_redis: Any, kind: str) -> None:
    raw = await run(any_redis, VALUE_BODY, kind, "")
    assert raw == b"\xc0"
    assert unpack(raw) is None


async def test_nested_maps_keep_order_and_types(any_redis: Any) -> None:
    body = """
    local inner = mp_map({'c', MP_NIL, 'd', 'x', 'n', -5, 'big', 1800000000123})
    local empty = mp_map({})
    local deep = mp_map({'deep', mp_map({'k', 'v'})})
    return mp_map({'a', 1, 'b', inner, 'e', empty, 'z', deep}).mp_raw
    """
    raw = await run(any_redis, body)
    decoded = unpack(raw)
    assert decoded == {
        "a": 1,
        "b": {"c": None, "d": "x", "n": -5, "big": 1800000000123},
        "e": {},
        "z": {"deep": {"k": "v"}},
    }
    assert list(decoded) == ["a", "b", "e", "z"]
    assert list(decoded["b"]) == ["c", "d", "n", "big"]
    assert raw == msgpack.packb(decoded)


async def test_mp_value_of_an_encoded_map_is_that_map(any_redis: Any) -> None:
    raw = await run(any_redis, "return mp_value(mp_map({'k', 'v'}))")
    assert unpack(raw) == {"k": "v"}


@pytest.mark.parametrize(("entries", "header"), [(0, 0x80), (15, 0x8F), (16, 0xDE), (17, 0xDE)])
async def test_map_sizes(any_redis: Any, entries: int, header: int) -> None:
    expected = {f"key{i:02d}": f"value{i}" for i in range(entries)}
    args = [part for item in expected.items() for part in item]
    raw = await run(any_redis, MAP_BODY, *args)
    assert raw[0] == header
    if header == 0xDE:
        assert int.from_bytes(raw[1:3], "big") == entries
    decoded = unpack(raw)
    assert decoded == expected
    assert list(decoded) == list(expected)
    assert raw == msgpack.packb(expected)


async def test_large_map(any_redis: Any) -> None:
    expected = {f"k{i}": str(i) for i in range(300)}
    args = [part for item in expected.items() for part in item]
    raw = await run(any_redis, MAP_BODY, *args)
    assert unpack(raw) == expected
    assert raw == msgpack.packb(expected)


async def test_map_with_nil_values_counts_them(any_redis: Any) -> None:
    # MP_NIL keeps the pairs list free of holes, so the entry count stays right.
    body = "return mp_map({'a', MP_NIL, 'b', MP_NIL, 'c', 3}).mp_raw"
    raw = await run(any_redis, body)
    assert raw[0] == 0x83
    assert unpack(raw) == {"a": None, "b": None, "c": 3}


async def test_event_shaped_envelope_matches_python(any_redis: Any) -> None:
    """An envelope built like emit() builds it is byte-identical to msgpack-python's."""
    body = """
    local data = mp_map({
      'session_id', ARGV[1], 'user_id', ARGV[2], 'study_id', ARGV[3],
      'chapter_id', MP_NIL, 'move_path', ARGV[4], 'status', 'active',
      'timestamp', ARGV[5], 'seq', tonumber(ARGV[6]),
    })
    return mp_map({'type', 'presence.user_joined', 'data', data, 'ts', tonumber(ARGV[7])}).mp_raw
    """
    data = {
        "session_id": "0123456789abcdef0123456789abcdef",
        "user_id": "alice@example.org",
        "study_id": "study:1",
        "chapter_id": None,
        "move_path": "main.12.var2.3",
        "status": "active",
        "timestamp": "2027-01-15T08:00:00.123Z",
        "seq": 70000,
    }
    ts = 1_800_000_000_123
    raw = await run(
        any_redis,
        body,
        str(data["session_id"]),
        str(data["user_id"]),
        str(data["study_id"]),
        str(data["move_path"]),
        str(data["timestamp"]),
        str(data["seq"]),
        str(ts),
    )
    expected = {"type": "presence.user_joined", "data": data, "ts": ts}
    assert unpack(raw) == expected
    assert raw == msgpack.packb(expected)
