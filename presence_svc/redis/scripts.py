"""Loads the Lua scripts in `lua/`, each prefixed with the shared prelude `_lib.lua`.

Redis numbers the lines of the text it was sent, prelude included, so `located` maps the
locations in a script's error back to `<script>.lua` or `_lib.lua` and their own lines.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

PRELUDE = "_lib"

# Where Redis's errors name a line of a script: `user_script:12` / `@user_script:12` (Redis 7),
# `[string "<python>"]:12` (the chunk name of fakeredis's Lua).
_LINE = re.compile(r'@?user_script:(\d+)|\[string "[^"]*"\]:(\d+)')
_SHA = re.compile(r"(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")


@functools.cache
def _read(name: str) -> str:
    return (resources.files("presence_svc.redis") / "lua" / f"{name}.lua").read_text()


def script_source(name: str) -> str:
    """The full text sent to Redis for `lua/<name>.lua`: the prelude, a newline, the script."""
    return _read(PRELUDE) + "\n" + _read(name)


def _prelude_lines() -> int:
    """How many lines of the loaded text come before the script's first line."""
    return (_read(PRELUDE) + "\n").count("\n")


@dataclass(frozen=True, slots=True)
class Scripts:
    heartbeat: AsyncScript
    leave: AsyncScript
    snapshot: AsyncScript
    page: AsyncScript
    sweep_scan: AsyncScript
    sweep_apply: AsyncScript
    schedule: AsyncScript
    reschedule: AsyncScript
    release: AsyncScript
    acquire: AsyncScript
    renew_node: AsyncScript
    claim_dead_nodes: AsyncScript

    def sources(self) -> list[str]:
        """Every script's text, as loaded into Redis."""
        return [getattr(self, name).script for name in self.__dataclass_fields__]

    @classmethod
    def register(cls, redis: Any) -> Scripts:
        """Every script, for calls by SHA (the same text on every kind of Redis)."""
        names = cls.__dataclass_fields__
        return cls(**{name: redis.register_script(script_source(name)) for name in names})


@functools.cache
def _names_by_sha() -> dict[str, str]:
    return {
        hashlib.sha1(script_source(name).encode()).hexdigest(): name
        for name in Scripts.__dataclass_fields__
    }


def locate(message: str) -> str:
    """`message` with each line it names given as `<file>.lua:<line>` of `lua/`.

    Only for an error of one of the scripts here (Redis and fakeredis put the script's SHA in
    the message; without it, as in fakeredis's errors of a `redis.call`, nothing changes). The
    result starts with the script's file name unless a location already names it.
    """
    name = next((_names_by_sha()[s] for s in _SHA.findall(message) if s in _names_by_sha()), None)
    if name is None:
        return message
    offset = _prelude_lines()

    def one(match: re.Match[str]) -> str:
        line = int(match.group(1) or match.group(2))
        if line > offset:
            return f"{name}.lua:{line - offset}"
        return f"{PRELUDE}.lua:{line}"

    located = _LINE.sub(one, message)
    if f"{name}.lua:" in located:
        return located
    return f"{name}.lua: {located}"


def located(error: ResponseError) -> ResponseError:
    """`error` as `locate` words it: a new error of the same type, or `error` if unchanged."""
    message = str(error)
    better = locate(message)
    return error if better == message else type(error)(better)
