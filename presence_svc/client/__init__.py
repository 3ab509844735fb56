"""An asyncio client of a study's presence, for backends, bots and tests (README, "Python
client"): `async with PresenceClient(url, study_id, token=...) as client: ...`."""

from __future__ import annotations

from presence_svc.client.client import UNSET, PresenceClient
from presence_svc.client.feed import (
    ChangeStream,
    EventsOverflow,
    EventStream,
    PresenceError,
    PresenceEvent,
)
from presence_svc.client.policy import Backoff
from presence_svc.client.state import User

__all__ = [
    "UNSET",
    "Backoff",
    "ChangeStream",
    "EventStream",
    "EventsOverflow",
    "PresenceClient",
    "PresenceError",
    "PresenceEvent",
    "User",
]
