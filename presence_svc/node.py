"""What one running node holds: its settings, Redis client, service and fan-out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from presence_svc.auth import TokenVerifier
from presence_svc.fanout import Fanout
from presence_svc.service import PresenceService
from presence_svc.settings import Settings
from presence_svc.sweeper import Sweeper


@dataclass(eq=False)
class Node:
    settings: Settings
    redis: Any
    service: PresenceService
    fanout: Fanout
    sweeper: Sweeper
    verifier: TokenVerifier

    async def redis_ready(self) -> bool:
        """True if Redis answers a PING within a second."""
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), 1.0))
        except Exception:
            return False
