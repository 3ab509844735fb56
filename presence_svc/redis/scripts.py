"""Loads the Lua scripts in `lua/`, each prefixed with the shared prelude `_lib.lua`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

_PUBLISH_LINE = "local PUBLISH = 'PUBLISH'\n"


def script_source(name: str, sharded: bool = False) -> str:
    """The full text sent to Redis for `lua/<name>.lua` (publishing with SPUBLISH if sharded)."""
    folder = resources.files("presence_svc.redis") / "lua"
    prelude = (folder / "_lib.lua").read_text()
    if _PUBLISH_LINE not in prelude:
        raise RuntimeError("lua/_lib.lua no longer declares PUBLISH as scripts.py expects")
    if sharded:
        prelude = prelude.replace(_PUBLISH_LINE, "local PUBLISH = 'SPUBLISH'\n")
    return prelude + "\n" + (folder / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Scripts:
    heartbeat: AsyncScript
    leave: AsyncScript
    snapshot: AsyncScript
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
    def register(cls, redis: Any, sharded: bool = False) -> Scripts:
        """Every script, for calls by SHA; `sharded` for Redis Cluster's sharded pub/sub."""
        names = cls.__dataclass_fields__
        return cls(**{name: redis.register_script(script_source(name, sharded)) for name in names})
