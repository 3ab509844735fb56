"""Load that is not a socket client: the fan-out publisher and the raw Redis heartbeat floor.

Both run inside a client worker process (presence_svc.bench.workers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from presence_svc.bench.wsclient import OP_TEXT, WsClient, frame, open_ws
from presence_svc.codec import json_text
from presence_svc.models import CursorUpdate, Thresholds, iso_from_ms
from presence_svc.redis.keys import Keys

EVENT_TYPE = "bench.cursor_moved"


def _ignore(client: Any, payload: bytes, now_ns: int) -> None:
    return None


# The fields of a real cursor_moved event, so the payload has a realistic size.
_CURSOR_FIELDS = {
    "session_id": "0" * 32,
    "user_id": "bench-mover",
    "chapter_id": "ch1",
    "move_path": "main.12.var2.3",
    "status": "active",
}

Send = Callable[[str, dict[str, Any]], Awaitable[None]]


async def publish(
    mode: str,
    studies: list[str],
    rate: float,
    duration: float,
    redis_url: str,
    prefix: str,
    targets: list[list[Any]],
    channel: str = "",
) -> dict[str, Any]:
    """Publish `rate` events/s round-robin over `studies` for `duration` s, paced by the clock.

    mode "node": through Redis with the service's publisher (nodes relay it unchanged);
    mode "baseline": the same JSON text over a socket to each bare broadcast server;
    mode "socketio": an emit of the same `data` to the study's room through a write-only
    AsyncRedisManager on `channel` (the python-socketio peer, peer.py).
    The study index `bs`, per-study counter `bn` and send time `bt` (ns) come first in `data`
    so that clients find them without parsing the whole message.
    """
    import redis.asyncio as aioredis

    redis_client = aioredis.Redis.from_url(redis_url) if mode == "node" else None
    pubs = [await open_ws(h, p, "/publish", _ignore, 10, skip=0) for h, p in targets]
    closers: list[Callable[[], Awaitable[None]]] = []
    if redis_client is not None:
        send = _via_redis(redis_client, prefix)
        closers.append(redis_client.aclose)
    elif mode == "socketio":
        send, close = _via_socketio(redis_url, channel)
        closers.append(close)
    else:
        send = _to_servers(pubs)
    total = max(1, round(rate * duration))
    counts = [0] * len(studies)
    started = time.perf_counter()
    try:
        worst_lag = await _paced(send, studies, counts, rate, total, started)
    finally:
        for pub in pubs:
            pub.close()
        for close in closers:
            await close()
    return {
        "published": total,
        "per_study": counts,
        "seconds": time.perf_counter() - started,
        "worst_lag_ms": worst_lag * 1000,
    }


async def _paced(
    send: Send, studies: list[str], counts: list[int], rate: float, total: int, started: float
) -> float:
    """Send event i at `started` + i / `rate`, at once when late; the worst lateness, in s.
    `counts` (per study) counts the events sent."""
    worst_lag = 0.0
    for i in range(total):
        lag = time.perf_counter() - (started + i / rate)
        if lag < 0:
            await asyncio.sleep(-lag)
        else:
            worst_lag = max(worst_lag, lag)
        s = i % len(studies)
        data = {"bs": s, "bn": counts[s], "bt": time.time_ns(), "study_id": studies[s]}
        data.update(_CURSOR_FIELDS, timestamp=iso_from_ms(int(time.time() * 1000)))
        counts[s] += 1
        await send(studies[s], data)
    return worst_lag


def _via_redis(client: Any, prefix: str) -> Send:
    from presence_svc.publisher import AsyncStudyEventPublisher

    publisher = AsyncStudyEventPublisher(client, prefix)

    async def send(study: str, data: dict[str, Any]) -> None:
        await publisher.publish(study, EVENT_TYPE, data)

    return send


def _via_socketio(redis_url: str, channel: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """How python-socketio's documentation has a process outside the servers emit: a
    write-only AsyncRedisManager on the servers' channel, `emit(event, data, room=...)`. The
    manager publishes one JSON message per emit; each server decodes it and sends the room
    `42["bench.cursor_moved",{data}]`, the same `data` the nodes send."""
    import socketio

    manager = socketio.AsyncRedisManager(redis_url, channel=channel, write_only=True)

    async def send(study: str, data: dict[str, Any]) -> None:
        await manager.emit(EVENT_TYPE, data, room=study)

    async def close() -> None:
        if manager.redis is not None:  # connected on its first emit
            await manager.redis.aclose()

    return send, close


def _to_servers(pubs: list[WsClient]) -> Send:
    """The bare servers' /publish path: the study id, a newline, the JSON text a node sends."""

    async def send(study: str, data: dict[str, Any]) -> None:
        text = f"{study}\n{json_text({'type': EVENT_TYPE, 'data': data})}"
        payload = frame(OP_TEXT, text.encode())
        for pub in pubs:
            pub.send_raw(payload)

    return send


class _Captured(Exception):
    """Raised instead of executing a captured pipeline."""


class _Recorder:
    """A RedisStore whose batched commands are recorded instead of sent.

    The floor replays exactly what the store sends for a heartbeat (scripts, keys, argument
    shapes), whatever the store's current version sends, minus the client-side work.
    """

    def __init__(self, url: str, prefix: str) -> None:
        import hashlib

        import redis.asyncio as aioredis

        from presence_svc.redis.store import RedisStore

        self.client: Any = aioredis.Redis.from_url(url)
        # The service's defaults; only the idle threshold shows (in the schedule's due time).
        self.store = RedisStore(self.client, Keys(prefix), Thresholds(30.0, 300.0, 600.0))
        batcher: Any = self.store._batch
        self.scripts: dict[str, Any] = {
            hashlib.sha1(source.encode()).hexdigest(): source for source in batcher._scripts
        }
        self._commands: list[tuple[Any, ...]] = []

        async def execute(operations: list[list[tuple[Any, ...]]]) -> tuple[list[Any], bool]:
            self._commands.extend(command for operation in operations for command in operation)
            raise _Captured

        batcher._execute = execute

    async def heartbeat(self, user_id: str, study_id: str, now_ms: int) -> list[tuple[Any, ...]]:
        self._commands = []
        try:
            await self.store.heartbeat(user_id, study_id, CursorUpdate(), now_ms)
        except _Captured:
            return self._commands
        raise RuntimeError("RedisStore.heartbeat sent nothing; the floor cannot mirror it")


async def redis_floor(
    url: str, prefix: str, users: list[list[str]], duration: float, batch: int
) -> dict[str, Any]:
    """The store's heartbeat commands (no cursor change, as REST sends them) replayed from a
    pipelined client for `duration` s; what Redis does per heartbeat, without the node."""
    import redis.asyncio as aioredis

    recorder = _Recorder(url, prefix)
    client: Any = aioredis.Redis.from_url(url)
    try:
        commands: list[list[tuple[Any, ...]]] = []
        loaded: set[str] = set()
        second = -1
        count, started = 0, time.perf_counter()
        deadline = started + duration
        while time.perf_counter() < deadline:
            now = int(time.time() * 1000)
            if now // 1000 != second:  # fresh timestamps (and session ids) once a second
                second = now // 1000
                commands = [await recorder.heartbeat(u, s, now) for u, s in users]
                for sha, source in recorder.scripts.items():
                    if sha not in loaded:
                        await client.script_load(source)
                        loaded.add(sha)
            pipe = client.pipeline(transaction=False)
            for i in range(batch):
                for command in commands[(count + i) % len(commands)]:
                    pipe.execute_command(*command)
            await pipe.execute()
            count += batch
        return {"heartbeats": count, "seconds": time.perf_counter() - started}
    finally:
        await client.aclose()
        await recorder.client.aclose()
