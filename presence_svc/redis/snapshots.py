"""The presence reads on Redis: a study's snapshot (everyone, or its most recent heartbeats up
to a cap) and its pages in user_id order, each read atomically with its seq and its counts.

RedisStore delegates its `presence` and `page` here (store.py has the contract; lua/snapshot.lua
and lua/page.lua each read).

A script may only read the keys it is given, and which sessions a read needs is only known in
Redis: the caller names the members a plain read of the same selection found, and the script
reads them only if they are still the selection, else it answers with the selection as it is
then, and the caller runs it again naming those (SNAPSHOT_ATTEMPTS runs at most).

What each read costs in Redis (n = sessions of the study, k = sessions listed):
- `presence` (the WebSocket snapshot, capped; GET /presence/{study_id}, everyone): a
  `ZRANGE -k -1` of the selection, then the script: the same `ZRANGE`, `ZCARD`, `HMGET` of the
  watermarks, two `ZCOUNT`s, `HGET` of the seq and k `HGETALL`s. O(log n + k).
- `page` (GET /presence/{study_id}?limit=...): a `ZRANGE 0 -1` of every member (names only),
  sorted by the node, then the script: `ZRANGE 0 -1` again and one pass over the members, the
  counts and seq as above and k `HGETALL`s. O(n + k) per page, in Redis and on the wire: the
  index is sorted by heartbeat, not by name. Measured on Redis 7.0 for 5,000 members (a shared
  2-core machine, server-side time): the script's `ZRANGE` and pass 1.5 to 2.3 ms, a page of
  100 about 3 ms and of 1,000 about 12 ms in all, a sort (only when the named page was wrong)
  6 to 8 ms more; walking the 5,000 costs about 60 ms of Redis time in pages of 1,000, 150 ms
  in pages of 100 (a capped snapshot of 100: about 0.7 ms). A second index by name
  (`ZRANGEBYLEX`) would make a page O(log n + k) at the price of one more write per join and
  leave; not worth it at these sizes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from presence_svc.models import Session, Status, StatusCounts, StudyPage, StudyPresence
from presence_svc.redis.batch import Batcher
from presence_svc.redis.calls import call, text
from presence_svc.redis.cluster import ClusterBatcher
from presence_svc.redis.keys import Keys, StudyKeys
from presence_svc.redis.scripts import Scripts

# Runs of a read's script before its last resort (a selection that kept changing under it).
SNAPSHOT_ATTEMPTS = 5

# Where the members (or hashes) start in each script's reply.
_SNAPSHOT_BODY = 5  # {ok, seq, total, idle, away, ...}
_PAGE_BODY = 6  # {ok, seq, total, idle, away, next, ...}

Hash = Sequence[bytes] | dict[bytes, bytes]


def session_from_hash(fields: Hash) -> Session:
    """A session from an HGETALL reply: a flat list (from Lua) or a dict (from redis-py)."""
    if isinstance(fields, dict):
        h = {text(k): text(v) for k, v in fields.items()}
    else:
        h = {text(fields[i]): text(fields[i + 1]) for i in range(0, len(fields), 2)}
    return Session(
        session_id=h["session_id"],
        user_id=h["user_id"],
        study_id=h["study_id"],
        chapter_id=h.get("chapter_id"),
        move_path=h.get("move_path"),
        status=Status(h["status"]),
        last_heartbeat_ms=int(h["last_heartbeat"]),
        joined_at_ms=int(h["joined_at"]),
    )


def _sessions(hashes: Sequence[Hash]) -> list[Session]:
    # An empty hash: a member whose session went between the reads (last resort only).
    return [session_from_hash(flat) for flat in hashes if flat]


def _seq_and_counts(reply: Sequence[Any]) -> tuple[int, StatusCounts]:
    seq, total, idle, away = (int(value) for value in reply[1:5])
    return seq, StatusCounts(max(0, total - idle - away), idle, away)


class RedisSnapshots:
    """The atomic presence reads (see the module for what each costs)."""

    def __init__(
        self, redis: Any, keys: Keys, scripts: Scripts, batch: Batcher | ClusterBatcher
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._scripts = scripts
        self._batch = batch

    async def presence(self, study_id: str, max_users: int | None) -> StudyPresence:
        if max_users is not None and max_users < 1:
            raise ValueError(f"max_users must be at least 1, got {max_users}")
        cap = max_users or 0  # the script's 0: every member
        sk = self._keys.study(study_id)
        # The script's selection: the last `cap` by score (ZRANGE -cap -1; not REV, which
        # redis-py sends as ZREVRANGE, a command the node's ACL does not grant).
        named = await self._redis.zrange(sk.index, -cap if cap else 0, -1)
        reply = await self._run(self._scripts.snapshot, sk, [cap], named, _SNAPSHOT_BODY)
        seq, counts = _seq_and_counts(reply)
        hashes = await self._hashes(sk, reply, _SNAPSHOT_BODY)
        sessions = _sessions(hashes)
        sessions.sort(key=lambda s: (s.joined_at_ms, s.user_id))
        return StudyPresence(study_id, tuple(sessions), seq, counts, len(hashes) >= counts.total)

    async def page(self, study_id: str, limit: int, after: str | None) -> StudyPage:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        sk = self._keys.study(study_id)
        # Byte order, as Lua compares strings under the C locale: if Redis ran under another
        # one, the script's answer would correct the names, and the page is in its order.
        members = sorted(await self._redis.zrange(sk.index, 0, -1))
        start = 0 if after is None else bisect.bisect_right(members, after.encode())
        named = members[start : start + limit]
        reply = await self._run(self._scripts.page, sk, [limit, after or ""], named, _PAGE_BODY)
        seq, counts = _seq_and_counts(reply)
        hashes = await self._hashes(sk, reply, _PAGE_BODY)
        return StudyPage(
            study_id,
            tuple(_sessions(hashes)),
            seq,
            counts,
            len(hashes) >= counts.total,
            text(reply[5]) or None,
        )

    async def _run(
        self, script: Any, sk: StudyKeys, args: list[Any], named: Sequence[bytes], body: int
    ) -> Any:
        """The script's reply once it read the members named (or its last answer, with the
        members it selected, after SNAPSHOT_ATTEMPTS runs)."""
        users = [text(m) for m in named]
        runs = 1
        while True:
            keys = [sk.index, sk.meta, *(sk.session(u) for u in users)]
            [reply] = await self._batch.run([call(script, keys, [*args, *users])])
            if reply[0] == 1 or runs >= SNAPSHOT_ATTEMPTS:
                return reply
            runs += 1
            users = [text(m) for m in reply[body:]]

    async def _hashes(self, sk: StudyKeys, reply: Any, body: int) -> Sequence[Hash]:
        """The sessions of the reply: its own, or (the last resort) those of the members it
        selected, read after it. Its seq and counts are still read together, but the sessions
        may then reflect a few events numbered above that seq (a client applying the events
        that follow in order converges from it), and one may have gone (not listed)."""
        if reply[0] == 1:
            hashes: Sequence[Hash] = reply[body:]
            return hashes
        async with self._redis.pipeline(transaction=False) as pipe:
            for member in reply[body:]:
                pipe.hgetall(sk.session(text(member)))
            read: list[Hash] = await pipe.execute()
        return read
