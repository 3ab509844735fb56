"""Loads the Lua scripts in `lua/`, each prefixed with the shared prelude `_lib.lua`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript


def script_source(name: str) -> str:
    """The full text sent to Redis for `lua/<name>.lua`."""
    folder = resources.files("presence_svc") / "lua"
    return (folder / "_lib.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


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
    def register(cls, redis: Any) -> Scripts:
        names = cls.__dataclass_fields__
        return cls(**{name: redis.register_script(script_source(name)) for name in names})
