"""Every Redis key and channel name, built in one place.

All keys of one study carry the hash tag `{<study_id>}` so that a script touching them runs on one
Redis Cluster slot. The sweep schedule is split into shards with their own tags, so no single
key or slot takes every study's scheduling traffic.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

# Changing this moves studies between schedule shards: treat it as part of the storage format.
SCHEDULE_SHARDS = 16


@dataclass(frozen=True, slots=True)
class StudyKeys:
    """The keys and channel of one study."""

    index: str  # sorted set: user_id -> last heartbeat (ms)
    meta: str  # hash: seq, idle_wm, away_wm, expire_wm
    channel: str  # pub/sub channel of the study's events
    leaving: str  # sorted set: user_id -> when its unheld session leaves (ms)
    session_prefix: str  # + user_id = session hash
    conns_prefix: str  # + user_id = set of connection ids holding the session
    # + user_id = sorted set: connection ids released from the session -> the leave time their
    # release gave (ms); a heartbeat under one of them holds nothing (release.lua).
    released_prefix: str

    def session(self, user_id: str) -> str:
        return self.session_prefix + user_id

    def conns(self, user_id: str) -> str:
        return self.conns_prefix + user_id

    def released(self, user_id: str) -> str:
        return self.released_prefix + user_id

    def of_hold(self, user_id: str) -> list[str]:
        """The KEYS of the scripts that hold or release one session (acquire.lua, release.lua)."""
        return [
            self.session_prefix + user_id,
            self.conns_prefix + user_id,
            self.leaving,
            self.released_prefix + user_id,
        ]

    def of_session(self, user_id: str) -> list[str]:
        """The KEYS of the scripts that change one session (heartbeat.lua, leave.lua)."""
        return [
            self.session_prefix + user_id,
            self.index,
            self.meta,
            self.channel,
            self.conns_prefix + user_id,
            self.leaving,
        ]


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def study(self, study_id: str) -> StudyKeys:
        return _study_keys(self.prefix, study_id)

    def channel(self, study_id: str) -> str:
        return _study_keys(self.prefix, study_id).channel

    @property
    def live_nodes(self) -> str:
        """Sorted set: node_id -> last renewal (ms)."""
        return f"{self.prefix}:{{nodes}}:alive"

    @property
    def dead_nodes(self) -> str:
        """Sorted set: node_id -> when its cleanup was claimed (ms)."""
        return f"{self.prefix}:{{nodes}}:dead"

    def node_leases(self, node_id: str) -> str:
        """Set of the node's leases, each `<study_id> <user_id> <connection_id>`."""
        return f"{self.prefix}:{{node:{node_id}}}:leases"

    def node_stats(self, node_id: str) -> str:
        """Hash: what the node reports of itself (sockets, watchers, studies, leases, events),
        written by the node on a timer of its own and expiring when it stops writing."""
        return f"{self.prefix}:{{node:{node_id}}}:stats"

    def node_watching(self, node_id: str) -> str:
        """Hash: study_id -> sockets of this node watching the study (same timer and expiry)."""
        return f"{self.prefix}:{{node:{node_id}}}:watching"

    def node_watchers(self, node_id: str) -> str:
        """Hash: study_id -> those of its sockets that only watch, no heartbeat yet (same timer
        and expiry)."""
        return f"{self.prefix}:{{node:{node_id}}}:watchers"

    def schedule(self, study_id: str) -> str:
        """The schedule shard (sorted set: study_id -> next due ms) that holds this study."""
        return self.schedule_shard(zlib.crc32(study_id.encode()) % SCHEDULE_SHARDS)

    def schedule_shard(self, shard: int) -> str:
        return f"{self.prefix}:{{schedule:{shard}}}:due"

    def schedule_shards(self) -> list[str]:
        return [self.schedule_shard(n) for n in range(SCHEDULE_SHARDS)]


@functools.lru_cache(maxsize=16_384)
def _study_keys(prefix: str, study_id: str) -> StudyKeys:
    # Hot studies are looked up on every heartbeat; the names never change.
    base = f"{prefix}:{{{study_id}}}:"
    return StudyKeys(
        index=base + "index",
        meta=base + "meta",
        channel=base + "events",
        leaving=base + "leaving",
        session_prefix=base + "session:",
        conns_prefix=base + "conns:",
        released_prefix=base + "released:",
    )
