"""Sizes of what travels, for the capacity model: the bytes of a typical event (as the service's
own codec encodes it) and of a heartbeat's Redis commands and replies on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from presence_svc.redis.keys import Keys

# A typical cursor_moved: ids of typical lengths (8-character study and chapter ids as a
# chess site makes them, a 12-character user name), a variation a few plies deep.
TYPICAL_STUDY = "kB7xQ2mP"
TYPICAL_USER = "player_12345"
TYPICAL_CHAPTER = "Zt4mW9qA"
TYPICAL_MOVE_PATH = "main.24.var2.7"
TYPICAL_ID = "9f86d081884c7d659a2feaa0c55ad015"  # session, connection and node ids: 32 hex
TYPICAL_MS = 1_795_942_626_123
TYPICAL_ISO = "2026-11-28T08:57:06.123Z"
TYPICAL_SEQ = 48_213


@dataclass(frozen=True, slots=True)
class Sizes:
    """Bytes of one event and of each kind of heartbeat on the wire (RESP, Redis Cluster)."""

    envelope: int  # msgpack envelope a script publishes (codec.encode_envelope)
    json_text: int  # the JSON text a node sends each socket (codec.json_text)
    ws_frame: int  # that text in a server WebSocket frame (unmasked)
    pubsub_message: int  # the envelope as Redis pushes it to a subscribed node (RESP)
    heartbeat_request: int  # a steady WebSocket heartbeat: one EVALSHA, cursor unchanged
    cursor_request: int  # the same with a new cursor
    heartbeat_reply: int  # its reply: heartbeat.lua's 8-element array
    full_request: int  # a full WebSocket heartbeat: lease SADD, heartbeat.lua, schedule.lua
    full_reply: int
    rest_request: int  # a REST heartbeat: heartbeat.lua (no connection), schedule.lua
    rest_reply: int
    schedule_request: int  # schedule.lua alone (after a steady heartbeat that reactivated)
    schedule_reply: int


def resp_command(*args: object) -> int:
    """Bytes of a command as a RESP array of bulk strings."""
    size = len(f"*{len(args)}\r\n")
    for arg in args:
        n = len(str(arg).encode())
        size += len(f"${n}\r\n") + n + 2
    return size


def pubsub_message_bytes(channel: str, payload: int, kind: str = "smessage") -> int:
    """A pushed pub/sub message: *3 kind channel payload (RESP2; `smessage` when sharded)."""
    head = resp_command(kind, channel) - len("*2\r\n")
    return len("*3\r\n") + head + len(f"${payload}\r\n") + payload + 2


def ws_frame_bytes(payload: int) -> int:
    """A server-to-client frame: 2-byte header, +2 bytes of length from 126, +8 from 64 KiB."""
    return payload + (2 if payload < 126 else 4 if payload < 65_536 else 10)


def typical_cursor_moved() -> tuple[str, dict[str, Any]]:
    # Field order as lua/_lib.lua's emit() writes it: the same msgpack bytes.
    return "presence.cursor_moved", {
        "session_id": TYPICAL_ID,
        "user_id": TYPICAL_USER,
        "study_id": TYPICAL_STUDY,
        "chapter_id": TYPICAL_CHAPTER,
        "move_path": TYPICAL_MOVE_PATH,
        "status": "active",
        "timestamp": TYPICAL_ISO,
        "seq": TYPICAL_SEQ,
    }


SHA = "0" * 40  # a script's SHA1 in EVALSHA: 40 hex digits
IDLE_MS = 30_000  # PRESENCE_IDLE_AFTER: schedule.lua's due time is this after the heartbeat
KIND_FULL, KIND_STEADY, KIND_REST = "full", "steady", "rest"


def heartbeat_script_bytes(kind: str, cursor: bool) -> int:
    """RESP bytes of heartbeat.lua's EVALSHA as RedisStore.heartbeat sends it: the session's
    six keys and its released set, then user, study, ms, ISO time, the id of a session it may
    start ('' for a steady heartbeat, which starts none), the cursor, the connection ('' over
    REST), the publish command (SPUBLISH on Redis Cluster) and, for a steady one, '1'."""
    study = Keys("presence").study(TYPICAL_STUDY)
    cursor_args = ["1", TYPICAL_CHAPTER, "1", TYPICAL_MOVE_PATH] if cursor else ["0", "", "0", ""]
    keys = [*study.of_session(TYPICAL_USER), study.released(TYPICAL_USER)]
    args = [
        TYPICAL_USER,
        TYPICAL_STUDY,
        TYPICAL_MS,
        TYPICAL_ISO,
        "" if kind == KIND_STEADY else TYPICAL_ID,
        *cursor_args,
        "" if kind == KIND_REST else TYPICAL_ID,
        "SPUBLISH",
        *(["1"] if kind == KIND_STEADY else []),
    ]
    return resp_command("EVALSHA", SHA, len(keys), *keys, *args)


def schedule_request_bytes() -> int:
    """schedule.lua's EVALSHA (redis/sweep.py, Sweeper.schedule): shard key, study, due, now."""
    shard = Keys("presence").schedule(TYPICAL_STUDY)
    return resp_command("EVALSHA", SHA, 1, shard, TYPICAL_STUDY, TYPICAL_MS + IDLE_MS, TYPICAL_MS)


def lease_request_bytes() -> int:
    """The lease SADD a full WebSocket heartbeat sends first: `<study> <user> <connection>`."""
    keys = Keys("presence")
    member = f"{TYPICAL_STUDY} {TYPICAL_USER} {TYPICAL_ID}"
    return resp_command("SADD", keys.node_leases(TYPICAL_ID), member)


def heartbeat_request_bytes(kind: str = KIND_STEADY, cursor: bool = False) -> int:
    """RESP bytes of all the requests of one heartbeat of `kind` (the one round trip)."""
    beat = heartbeat_script_bytes(kind, cursor)
    if kind == KIND_STEADY:
        return beat
    lease = lease_request_bytes() if kind == KIND_FULL else 0
    return lease + beat + schedule_request_bytes()


INTEGER_ONE = len(":1\r\n")  # SADD's and schedule.lua's replies


def heartbeat_script_reply_bytes() -> int:
    """heartbeat.lua's reply: session id, chapter, move path and status as bulk strings, the
    last heartbeat and joined-at ms, events published and `covered` as integers."""
    fields = [TYPICAL_ID, TYPICAL_CHAPTER, TYPICAL_MOVE_PATH, "active"]
    array = len("*8\r\n") + sum(len(f"${len(f)}\r\n") + len(f) + 2 for f in fields)
    return array + len(f":{TYPICAL_MS}\r\n") * 2 + 2 * INTEGER_ONE


def heartbeat_reply_bytes(kind: str = KIND_STEADY) -> int:
    """The replies of one heartbeat of `kind`: heartbeat.lua's array, and SADD's and
    schedule.lua's integers where it sent them."""
    extra = {KIND_FULL: 2, KIND_REST: 1}.get(kind, 0)
    return heartbeat_script_reply_bytes() + extra * INTEGER_ONE


def measure_sizes() -> Sizes:
    """Encode a typical cursor_moved with the service's own codec."""
    from presence_svc.codec import encode_envelope, json_text  # msgpack: only when used

    event_type, data = typical_cursor_moved()
    envelope = len(encode_envelope(event_type, data, TYPICAL_MS))
    text = len(json_text({"type": event_type, "data": data}).encode())
    channel = Keys("presence").channel(TYPICAL_STUDY)
    return Sizes(
        envelope=envelope,
        json_text=text,
        ws_frame=ws_frame_bytes(text),
        pubsub_message=pubsub_message_bytes(channel, envelope),
        heartbeat_request=heartbeat_request_bytes(KIND_STEADY),
        cursor_request=heartbeat_request_bytes(KIND_STEADY, cursor=True),
        heartbeat_reply=heartbeat_reply_bytes(KIND_STEADY),
        full_request=heartbeat_request_bytes(KIND_FULL),
        full_reply=heartbeat_reply_bytes(KIND_FULL),
        rest_request=heartbeat_request_bytes(KIND_REST),
        rest_reply=heartbeat_reply_bytes(KIND_REST),
        schedule_request=schedule_request_bytes(),
        schedule_reply=INTEGER_ONE,
    )
