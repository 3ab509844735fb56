"""The Lua scripts in presence_svc/redis/lua: their layout, the publish command they accept, and
Redis errors that name the script and the line of its `.lua` file they come from.

The layout checks read the files; the others run the scripts on fakeredis and a real Redis
(and, through the store, on a Redis Cluster).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ReadOnlyError, ResponseError

from presence_svc.models import iso_from_ms
from presence_svc.redis.keys import Keys
from presence_svc.redis.scripts import PRELUDE, Scripts, locate, located, script_source
from presence_svc.redis.store import RedisStore
from presence_svc.redis.sweep import EMPTY_STUDY_TTL_MS
from tests.conftest import open_redis
from tests.support.store import AWAY_MS, EXPIRE_MS, IDLE_MS, NO_CURSOR, THRESHOLDS, both

LUA = resources.files("presence_svc.redis") / "lua"
NAMES = list(Scripts.__dataclass_fields__)
PUBLISHING = ["heartbeat", "leave", "sweep_apply"]
STUDY, USER = "study-1", "alice"


def lua(name: str) -> str:
    return (LUA / f"{name}.lua").read_text()


def line_of(name: str, fragment: str) -> int:
    """The line of `lua/<name>.lua` holding `fragment` (which must occur on exactly one)."""
    lines = [i for i, line in enumerate(lua(name).splitlines(), 1) if fragment in line]
    assert len(lines) == 1, f"{fragment!r} is on lines {lines} of {name}.lua"
    return lines[0]


def code(line: str) -> str:
    return line.split("--", 1)[0].strip()


def header_and_body(name: str) -> tuple[list[str], list[str]]:
    """The script's leading comment lines, and the code lines after them (blank lines kept)."""
    lines = lua(name).splitlines()
    end = next(i for i, line in enumerate(lines) if not line.startswith("--"))
    return lines[:end], [code(line) for line in lines[end:]]


def bindings_and_rest(name: str) -> tuple[list[str], list[str]]:
    """The first block of code (the bindings of KEYS and ARGV), and the code after it."""
    _, body = header_and_body(name)
    start = next(i for i, line in enumerate(body) if line)
    end = next((i for i in range(start, len(body)) if not body[i]), len(body))
    return body[start:end], body[end:]


# --- layout --------------------------------------------------------------------------------


def test_every_script_file_is_loaded() -> None:
    files = {
        entry.name.removesuffix(".lua") for entry in LUA.iterdir() if entry.name.endswith(".lua")
    }
    assert files - {PRELUDE} == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_keys_and_argv_are_bound_to_names_at_the_top(name: str) -> None:
    bindings, rest = bindings_and_rest(name)
    assert any("KEYS" in line for line in bindings), f"{name}.lua binds no KEYS at its top"
    late = [line for line in rest if re.search(r"\b(KEYS|ARGV)\b", line)]
    assert not late, f"{name}.lua reads KEYS or ARGV below its bindings: {late}"


def test_the_prelude_reads_no_keys_or_argv() -> None:
    used = [line for line in map(code, lua(PRELUDE).splitlines()) if re.search(r"KEYS|ARGV", line)]
    assert not used


@pytest.mark.parametrize("name", [*NAMES, PRELUDE])
def test_no_script_builds_a_key_name(name: str) -> None:
    # Every key comes from KEYS, bound to a name: a key argument is a plain (possibly indexed or
    # dotted) name, never a literal or a concatenation.
    text = "\n".join(code(line) for line in lua(name).splitlines())
    calls = re.findall(r"redis\.call\(\s*([^,()]+),\s*([^,()]+)", text)
    assert calls or name == "reschedule"
    for command, key in calls:
        assert re.fullmatch(r"[a-z_][a-z_0-9.]*(\[[a-z0-9_]+\])?", key.strip()), (command, key)


@pytest.mark.parametrize("name", NAMES)
def test_each_header_states_keys_argv_and_the_return_value(name: str) -> None:
    header, _ = header_and_body(name)
    text = "\n".join(header)
    bindings, _ = bindings_and_rest(name)
    bound = "\n".join(bindings)
    for table in ("KEYS", "ARGV"):
        fixed_in_code = set(re.findall(rf"{table}\[(\d+)\]", bound))
        fixed_in_header = set(re.findall(rf"{table}\[(\d+)\](?!\.)", text))
        assert fixed_in_code == fixed_in_header, (table, fixed_in_code, fixed_in_header)
        for start in re.findall(rf"for \w+ = (\d+), #{table}", bound):
            assert f"{table}[{start}..]" in text, f"{name}.lua: {table}[{start}..] undocumented"
    assert any(line.startswith("-- Returns") for line in header), f"{name}.lua: no Returns"


# --- the publish command -------------------------------------------------------------------


@pytest.fixture(params=["fake", "real"])
async def single_redis(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Any]:
    async with open_redis(request.param, request, key_prefix) as client:
        yield client


def publishing_call(
    name: str, keys: Keys, now_ms: int, publish: str
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of `name` that would publish an event for USER's session at `now_ms`."""
    sk = keys.study(STUDY)
    iso = iso_from_ms(now_ms)
    if name == "heartbeat":
        # A new chapter: cursor_moved, were it allowed to publish.
        args = [USER, STUDY, now_ms, iso, "f" * 32, "1", "ch2", "0", "", "", publish]
        return [*sk.of_session(USER), sk.released(USER)], args
    if name == "leave":
        return sk.of_session(USER), [USER, now_ms, iso, EMPTY_STUDY_TTL_MS, publish]
    # Past the expiry with nothing holding it: user_left, were it allowed to publish.
    return [sk.index, sk.meta, sk.channel, sk.leaving, sk.session(USER), sk.conns(USER)], [
        now_ms,
        iso,
        IDLE_MS,
        AWAY_MS,
        EXPIRE_MS,
        0,
        0,
        0,
        EMPTY_STUDY_TTL_MS,
        publish,
        USER,
    ]


@pytest.mark.parametrize("publish", ["EVAL", "publish", ""])
@pytest.mark.parametrize("name", PUBLISHING)
async def test_a_publish_command_other_than_publish_or_spublish_is_refused_before_any_write(
    single_redis: Any, keys: Keys, t0: int, name: str, publish: str
) -> None:
    store = RedisStore(single_redis, keys, THRESHOLDS)
    try:
        await store.heartbeat(USER, STUDY, both("ch1", None), t0)
    finally:
        await store.close()
    sk = keys.study(STUDY)
    before = {key: await single_redis.dump(key) for key in sk.of_session(USER)}
    script = getattr(Scripts.register(single_redis), name)
    script_keys, args = publishing_call(name, keys, t0 + EXPIRE_MS + 1, publish)
    with pytest.raises(ResponseError) as raised:
        await script(keys=script_keys, args=args)
    message = str(located(raised.value))
    assert "publish command must be PUBLISH or SPUBLISH" in message
    # The line of the script that passed it, and the line of _lib.lua that refused it.
    assert f"{name}.lua:{line_of(name, 'publisher(')}" in message
    assert f"{PRELUDE}.lua:{line_of(PRELUDE, 'error(' + chr(39) + 'publish command')}" in message
    assert {key: await single_redis.dump(key) for key in sk.of_session(USER)} == before


@pytest.mark.parametrize("name", PUBLISHING)
async def test_publish_and_spublish_are_both_accepted(
    single_redis: Any, keys: Keys, t0: int, name: str
) -> None:
    # SPUBLISH runs on a single Redis too (a shard of its own), so both can be checked here.
    for publish in ("PUBLISH", "SPUBLISH"):
        script = getattr(Scripts.register(single_redis), name)
        script_keys, args = publishing_call(name, keys, t0, publish)
        await script(keys=script_keys, args=args)


# --- errors name their script and line -----------------------------------------------------


async def test_a_script_error_raised_by_the_store_names_its_file_and_line(
    store: RedisStore, any_redis: Any, keys: Keys, t0: int
) -> None:
    # A heartbeat that is not a number: heartbeat.lua's comparison of it fails.
    await any_redis.hset(keys.study(STUDY).session(USER), "last_heartbeat", "not-a-number")
    with pytest.raises(ResponseError) as raised:
        await store.heartbeat(USER, STUDY, NO_CURSOR, t0)
    line = line_of("heartbeat", "tonumber(s.last_heartbeat) > now")
    assert f"heartbeat.lua:{line}: attempt to compare" in str(raised.value)
    assert not re.search(r"user_script:\d", str(raised.value))
    assert isinstance(raised.value.__cause__, ResponseError)  # Redis's own words, kept


async def test_a_failed_redis_call_names_its_line(
    store: RedisStore, any_redis: Any, keys: Keys, t0: int
) -> None:
    if isinstance(any_redis, fakeredis.FakeAsyncRedis):
        pytest.skip("fakeredis's error of a redis.call names neither script nor line")
    await any_redis.set(keys.study(STUDY).index, "not a sorted set")
    with pytest.raises(ResponseError, match="WRONGTYPE") as raised:
        await store.heartbeat(USER, STUDY, NO_CURSOR, t0)
    line = line_of("heartbeat", "redis.call('ZADD', index_key")
    assert f"on heartbeat.lua:{line}." in str(raised.value)


async def test_a_failed_sweep_step_is_logged_with_its_script_and_line(
    store: RedisStore,
    any_redis: Any,
    keys: Keys,
    t0: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if isinstance(any_redis, fakeredis.FakeAsyncRedis):
        pytest.skip("fakeredis's error of a redis.call names neither script nor line")
    await store.heartbeat(USER, STUDY, NO_CURSOR, t0)
    await any_redis.hset(keys.study(STUDY).meta, "expire_wm", "not-a-score")
    with caplog.at_level(logging.ERROR, logger="presence_svc.redis.store"):
        report = await store.sweep(t0 + IDLE_MS)
    assert report.events == 0
    line = line_of("sweep_scan", "local hits = redis.call('ZRANGEBYSCORE'")
    assert [
        r.getMessage() for r in caplog.records if f"on sweep_scan.lua:{line}." in r.getMessage()
    ]


def _first_loaded_line(name: str) -> int:
    """The line of the loaded text that is line 1 of `lua/<name>.lua`."""
    return script_source(name).splitlines().index(lua(name).splitlines()[0]) + 1


def _sha(name: str) -> str:
    import hashlib

    return hashlib.sha1(script_source(name).encode()).hexdigest()


def test_locate_maps_each_line_to_the_prelude_or_the_script() -> None:
    first = _first_loaded_line("release")
    message = (
        f"user_script:{first - 2}: boom script: {_sha('release')}, on @user_script:{first + 3}."
    )
    last_of_prelude = len(lua(PRELUDE).splitlines())
    assert first - 2 == last_of_prelude  # the prelude, then the newline joining them
    assert locate(message) == (
        f"{PRELUDE}.lua:{last_of_prelude}: boom script: {_sha('release')}, on release.lua:4."
    )


def test_locate_names_the_script_when_no_line_does() -> None:
    # fakeredis's form of a Lua error, which names the script by its SHA and no line of it.
    message = f"Error running script (call to f_{_sha('snapshot')}): @user_script:?: boom"
    assert locate(message) == f"snapshot.lua: {message}"


@pytest.mark.parametrize(
    "message",
    ["WRONGTYPE Operation against a key", f"user_script:3: boom script: {'0' * 40}, on x."],
)
def test_locate_leaves_other_errors_alone(message: str) -> None:
    assert locate(message) == message


def test_located_keeps_the_error_type() -> None:
    error = ReadOnlyError(f"user_script:{_first_loaded_line('leave')}: x script: {_sha('leave')}")
    moved = located(error)
    assert type(moved) is ReadOnlyError
    assert str(moved) == f"leave.lua:1: x script: {_sha('leave')}"
    plain = ResponseError("ERR unrelated")
    assert located(plain) is plain
