"""The benchmark scenarios, one module each; the harness runs those it is handed.

`NAMES` is importable without loading any scenario (the command line's choices).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from presence_svc.bench.harness import Scenario

NAMES = ("fanout", "heartbeats", "idle", "sweep", "bigroom")


def catalogue() -> dict[str, Scenario]:
    """Every scenario by name, in the order `presence-svc bench` runs them."""
    from presence_svc.bench.scenarios import bigroom, fanout, heartbeats, idle, sweep

    return {
        "fanout": fanout.run,
        "heartbeats": heartbeats.run,
        "idle": idle.run,
        "sweep": sweep.run,
        "bigroom": bigroom.run,
    }
