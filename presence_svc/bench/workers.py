"""Client worker processes: each runs one event loop (uvloop if present) with many sockets.

The harness sends commands over a pipe (`open`, `fanout_reset`, `fanout_collect`,
`ws_heartbeats`, `rest_heartbeats`, `rest_paced`, `redis_floor`, `publish`, `close`, `quit`,
and `bigroom`, whose steps scenarios/bigroom_clients.py holds) and gets back
`("ok", result)` or `("error", traceback)`. Commands run one at a time; sockets keep being
served by the loop in between. A worker exits by itself after `lifetime` seconds or when the
harness goes away (the pipe closes).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import functools
import os
import re
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

from presence_svc.auth import issue_token
from presence_svc.bench import drivers, sioclient
from presence_svc.bench.scenarios import bigroom_clients
from presence_svc.bench.wsclient import (
    OP_TEXT,
    HttpLoop,
    HttpPaced,
    WsClient,
    frame,
    open_ws,
    post_request,
)
from presence_svc.codec import json_text

# The publisher puts these first in `data`; nodes keep the key order (msgpack map -> dict ->
# JSON), so a regex finds them without parsing the whole message.
_BENCH_FIELDS = re.compile(rb'"bs":(\d+),"bn":(\d+),"bt":(\d+)')


class _Viewer:
    __slots__ = ("counts", "last", "received", "study")

    def __init__(self, study: int) -> None:
        self.study = study
        self.counts = bytearray()  # times event n of the study arrived here
        self.received = 0
        self.last = -1


class _State:
    def __init__(self) -> None:
        self.groups: dict[str, list[WsClient]] = {}
        self.latencies = array.array("q")
        self.reordered = 0
        self.misrouted = 0
        self.other = 0
        self.acked = 0
        self.errors = 0
        self.hb_running = False
        self.hb_batch = b""
        self.hb_window = 0

    # -- fan-out recording ---------------------------------------------------------------
    def record(self, client: WsClient, payload: bytes, now_ns: int) -> None:
        found = _BENCH_FIELDS.search(payload)
        viewer = client.tag
        if found is None or not isinstance(viewer, _Viewer):
            self.other += 1
            return
        n = int(found[2])
        if int(found[1]) != viewer.study:
            self.misrouted += 1
        counts = viewer.counts
        if n >= len(counts):
            counts.extend(bytes(n - len(counts) + 1024))
        if counts[n] < 255:
            counts[n] += 1
        if n < viewer.last:
            self.reordered += 1
        viewer.last = n
        viewer.received += 1
        self.latencies.append(now_ns - int(found[3]))

    # -- heartbeats over the socket --------------------------------------------------------
    def heartbeat_reply(self, client: WsClient, payload: bytes, now_ns: int) -> None:
        if payload.startswith(b'{"type":"pong"'):
            self.acked += self.hb_window
            if self.hb_running:
                client.send_raw(self.hb_batch)
        elif payload.startswith(b'{"type":"error"'):
            self.errors += 1


def _ignore(client: WsClient, payload: bytes, now_ns: int) -> None:
    return None


async def _open(
    state: _State,
    group: str,
    kind: str,
    specs: list[list[Any]],
    secret: str,
    concurrency: int,
    connect_timeout: float,
) -> dict[str, Any]:
    """specs: [host, port, study_index, study_id, user_id] per socket; kind "node",
    "baseline" or "socketio" (the python-socketio peer, which the user id means nothing to)."""
    handler = state.record if group.startswith("fanout") else _ignore
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()

    async def one(spec: list[Any]) -> WsClient:
        host, port, study_index, study_id, user_id = spec
        if kind == "node":
            token = issue_token(user_id, secret, 3600, studies="*")
            path = f"/ws/presence?study_id={study_id}&token={token}"
        else:
            path = f"/viewer?study_id={study_id}"
        async with gate:
            if kind == "socketio":  # the peer: a Socket.IO session in the study's room
                client = await sioclient.open_viewer(host, port, study_id, handler, connect_timeout)
            else:
                client = await open_ws(host, port, path, handler, connect_timeout)
        client.tag = _Viewer(study_index)
        return client

    results = await asyncio.gather(*(one(s) for s in specs), return_exceptions=True)
    opened = [r for r in results if isinstance(r, WsClient)]
    errors = [repr(r) for r in results if not isinstance(r, WsClient)]
    state.groups.setdefault(group, []).extend(opened)
    return {
        "opened": len(opened),
        "failed": len(errors),
        "errors": errors[:3],
        "seconds": time.perf_counter() - started,
    }


async def _fanout_reset(state: _State) -> dict[str, Any]:
    for clients in state.groups.values():
        for client in clients:
            if isinstance(client.tag, _Viewer):
                client.tag = _Viewer(client.tag.study)
    state.latencies = array.array("q")
    state.reordered = state.misrouted = state.other = 0
    return {}


async def _fanout_collect(
    state: _State, group: str, expected: dict[int, int], wait: float
) -> dict[str, Any]:
    """Wait (bounded) until every viewer got its study's events, then count what arrived."""
    viewers = [(c, c.tag) for c in state.groups.get(group, []) if isinstance(c.tag, _Viewer)]
    want = sum(expected.get(v.study, 0) for _, v in viewers)
    deadline = time.monotonic() + wait
    # Polling: the counters move in protocol callbacks, and this runs once per measurement.
    while sum(v.received for _, v in viewers) < want and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    lost = duplicated = 0
    for _, viewer in viewers:
        total = expected.get(viewer.study, 0)
        seen = viewer.counts[:total]
        seen.extend(bytes(total - len(seen)))
        unique = total - seen.count(0)
        lost += total - unique
        duplicated += viewer.received - unique
    closed = [c.close_code for c, _ in viewers if c.closed.done()]
    return {
        "sockets": len(viewers),
        "expected": want,
        "received": sum(v.received for _, v in viewers),
        "lost": lost,
        "duplicated": duplicated,
        "reordered": state.reordered,
        "misrouted": state.misrouted,
        "closed_sockets": len(closed),
        "close_codes": sorted({c for c in closed if c is not None}),
        "latencies_ns": state.latencies,
    }


async def _ws_heartbeats(state: _State, group: str, duration: float, window: int) -> dict[str, Any]:
    """Each socket: `window` heartbeats then a ping, again at each pong (a closed loop)."""
    clients = [c for c in state.groups.get(group, []) if not c.closed.done()]
    state.hb_window, state.acked, state.errors, state.hb_running = window, 0, 0, True
    state.hb_batch = frame(OP_TEXT, b'{"type":"heartbeat"}') * window + frame(
        OP_TEXT, b'{"type":"ping"}'
    )
    for client in clients:
        client.handler = state.heartbeat_reply
        client.send_raw(state.hb_batch)
    started = time.perf_counter()
    await asyncio.sleep(duration)
    # An error reply (e.g. `unavailable`) answers a heartbeat that did not happen.
    acked, errors = state.acked, state.errors
    elapsed = time.perf_counter() - started
    state.hb_running = False
    await asyncio.sleep(0.5)  # let the batches in flight finish before the next command
    for client in clients:
        client.handler = _ignore
    return {
        "heartbeats": acked - errors,
        "seconds": elapsed,
        "errors": errors,
        "sockets": len(clients),
    }


async def _rest_heartbeats(
    state: _State, host: str, port: int, secret: str, users: list[list[str]], duration: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    loops: list[HttpLoop] = []
    for user_id, study_id in users:
        body = json_text({"study_id": study_id}).encode()
        request = post_request(
            host, port, "/presence/heartbeat", issue_token(user_id, secret, 3600, studies="*"), body
        )
        _, proto = await loop.create_connection(functools.partial(HttpLoop, request), host, port)
        loops.append(proto)
    started = time.perf_counter()
    await asyncio.sleep(duration)
    statuses: dict[int, int] = {}
    for proto in loops:
        for status, n in proto.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
        proto.running = False
    elapsed = time.perf_counter() - started
    await asyncio.wait([p.done for p in loops], timeout=5)
    for proto in loops:
        proto.close()
    return {
        "statuses": statuses,
        "heartbeats": statuses.get(200, 0),
        "seconds": elapsed,
        "connections": len(loops),
    }


async def _rest_paced(
    host: str, port: int, secret: str, users: list[list[str]], rate: float, duration: float
) -> dict[str, Any]:
    """The REST heartbeat request at `rate` requests/s for `duration` s, paced by the clock,
    each on the next idle one of the keep-alive connections (one per user, one request in
    flight each). The same bytes whatever the server is (a node, or the bare baseline)."""
    loop = asyncio.get_running_loop()
    idle: collections.deque[HttpPaced] = collections.deque()
    freed: list[asyncio.Future[None]] = []

    def on_idle(conn: HttpPaced) -> None:
        idle.append(conn)
        if freed and not freed[0].done():
            freed[0].set_result(None)

    conns: list[HttpPaced] = []
    for user_id, study_id in users:
        body = json_text({"study_id": study_id}).encode()
        token = issue_token(user_id, secret, 3600, studies="*")
        request = post_request(host, port, "/presence/heartbeat", token, body)
        _, proto = await loop.create_connection(
            functools.partial(HttpPaced, request, on_idle), host, port
        )
        conns.append(proto)
    total, waited = max(1, round(rate * duration)), 0
    started = time.perf_counter()
    for i in range(total):
        lag = time.perf_counter() - (started + i / rate)
        if lag < 0:
            await asyncio.sleep(-lag)
        if not idle:  # every connection awaits an answer: the server is behind the rate
            waited += 1
            while not idle:
                freed[:] = [loop.create_future()]
                await asyncio.wait_for(freed[0], 10)
        idle.popleft().send()
    with contextlib.suppress(TimeoutError):  # the last answers; one that never comes is lost
        async with asyncio.timeout(10):
            while len(idle) < len(conns):
                freed[:] = [loop.create_future()]
                await freed[0]
    elapsed = time.perf_counter() - started
    statuses: dict[int, int] = {}
    for proto in conns:
        for status, n in proto.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
        proto.close()
    return {
        "sent": total,
        "statuses": statuses,
        "answered": sum(statuses.values()),
        "seconds": elapsed,
        "waited": waited,
        "latencies_ns": [n for proto in conns for n in proto.latencies_ns],
    }


async def _close(state: _State, group: str) -> dict[str, Any]:
    clients = state.groups.pop(group, [])
    for client in clients:
        client.close()
    if clients:
        await asyncio.wait([c.closed for c in clients], timeout=10)
    return {"closed": len(clients)}


async def _serve(conn: Connection, lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    # Bounded in time whatever happens to the harness.
    loop.call_later(lifetime, os._exit, 3)
    inbox: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()

    def read_commands() -> None:
        # A thread with blocking reads: the loop's add_reader would make the pipe non-blocking,
        # and Connection.recv cannot resume a large message cut by EAGAIN.
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                loop.call_soon_threadsafe(inbox.put_nowait, None)
                return
            loop.call_soon_threadsafe(inbox.put_nowait, message)

    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    state = _State()
    handlers: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
        "open": lambda **a: _open(state, **a),
        "fanout_reset": lambda **a: _fanout_reset(state),
        "fanout_collect": lambda **a: _fanout_collect(state, **a),
        "ws_heartbeats": lambda **a: _ws_heartbeats(state, **a),
        "rest_heartbeats": lambda **a: _rest_heartbeats(state, **a),
        "rest_paced": lambda **a: _rest_paced(**a),
        "redis_floor": lambda **a: drivers.redis_floor(**a),
        "publish": lambda **a: drivers.publish(**a),
        "close": lambda **a: _close(state, **a),
        "bigroom": lambda **a: bigroom_clients.command(**a),
    }
    while True:
        message = await inbox.get()
        if message is None or message[0] == "quit":
            break
        command, args = message
        try:
            conn.send(("ok", await handlers[command](**args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    for group in list(state.groups):
        await _close(state, group)


def worker_main(conn: Connection, index: int, lifetime: float) -> None:
    try:
        import uvloop
    except ImportError:  # the clients still work, only slower per message
        asyncio.run(_serve(conn, lifetime))
    else:
        uvloop.run(_serve(conn, lifetime))
