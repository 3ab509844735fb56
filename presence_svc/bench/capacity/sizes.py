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
    """Bytes of one event and one heartbeat on the wire."""

    envelope: int  # msgpack envelope a script publishes (codec.encode_envelope)
    json_text: int  # the JSON text a node sends each socket (codec.json_text)
    ws_frame: int  # that text in a server WebSocket frame (unmasked)
    pubsub_message: int  # the envelope as Redis pushes it to a subscribed node (RESP)
    heartbeat_request: int  # a WebSocket heartbeat's three commands (RESP), cursor unchanged
    cursor_request: int  # the same with a new cursor
    heartbeat_reply: int


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


def heartbeat_request_bytes(cursor: bool) -> int:
    """RESP bytes of RedisStore.heartbeat's commands for one WebSocket heartbeat."""
    keys = Keys("presence")
    sha = "0" * 40
    study = keys.study(TYPICAL_STUDY)
    lease = resp_command(
        "SADD", keys.node_leases(TYPICAL_ID), f"{TYPICAL_STUDY} {TYPICAL_USER} {TYPICAL_ID}"
    )
    cursor_args = ["1", TYPICAL_CHAPTER, "1", TYPICAL_MOVE_PATH] if cursor else ["0", "", "0", ""]
    beat = resp_command(
        "EVALSHA",
        sha,
        6,
        *study.of_session(TYPICAL_USER),
        TYPICAL_USER,
        TYPICAL_STUDY,
        TYPICAL_MS,
        TYPICAL_ISO,
        TYPICAL_ID,
        *cursor_args,
        TYPICAL_ID,
    )
    schedule = resp_command(
        "EVALSHA", sha, 1, keys.schedule(TYPICAL_STUDY), TYPICAL_STUDY, TYPICAL_MS, TYPICAL_MS
    )
    return lease + beat + schedule


def heartbeat_reply_bytes() -> int:
    """SADD's and schedule.lua's integers, heartbeat.lua's 7-element array."""
    fields = [TYPICAL_ID, TYPICAL_CHAPTER, TYPICAL_MOVE_PATH, "active"]
    array = len("*7\r\n") + sum(len(f"${len(f)}\r\n") + len(f) + 2 for f in fields)
    array += len(f":{TYPICAL_MS}\r\n") * 2 + len(":1\r\n")
    return array + 2 * len(":1\r\n")


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
        heartbeat_request=heartbeat_request_bytes(cursor=False),
        cursor_request=heartbeat_request_bytes(cursor=True),
        heartbeat_reply=heartbeat_reply_bytes(),
    )
