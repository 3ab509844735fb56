"""What the RedisStore tests share: thresholds, cursors and a look at the sweep schedule."""

from __future__ import annotations

from typing import Any

from presence_svc.models import CursorUpdate, Thresholds
from presence_svc.redis.keys import Keys

IDLE_MS, AWAY_MS, EXPIRE_MS = 30_000, 300_000, 600_000
THRESHOLDS = Thresholds(idle_after=30, away_after=300, expire_after=600)

NO_CURSOR = CursorUpdate()


def both(chapter: str | None, move: str | None) -> CursorUpdate:
    """A heartbeat cursor that sets both fields."""
    return CursorUpdate(chapter_id=chapter, move_path=move, sets_chapter=True, sets_move_path=True)


async def schedule_score(client: Any, keys: Keys, study_id: str) -> int | None:
    """When `study_id` is next due for a sweep (ms), or None if it is not scheduled."""
    score = await client.zscore(keys.schedule(study_id), study_id)
    return None if score is None else int(score)
