"""The bigroom scenario's side in a client worker: the `bigroom` command of bench/workers.py.

Watchers only read: each follows every frame on its own Feed (bigroom_feed), a frame applied
once per worker to the shared chain while the socket's sequence is the chain's. Members are the
sockets of the one worker that moves them: each heartbeats `main.<n>` at a set rate and the
worker logs when it sent each n. Every 1/churn s one member leaves (it stops, then a ping whose
pong says the node has handled its heartbeats, DELETE /presence/{study}, close) and a new one
joins on the next node. State lives in this module: a worker process runs one scenario at a
time, and its commands run one at a time (sockets keep being served in between).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import heapq
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from presence_svc.auth import issue_token
from presence_svc.bench.scenarios.bigroom_feed import Chain, Feed, Frames, staleness
from presence_svc.bench.wsclient import OP_TEXT, MessageHandler, WsClient, frame, open_ws

_PONG = b'{"type":"pong"'
_ERROR = b'{"type":"error"'
_PING = frame(OP_TEXT, b'{"type":"ping"}')


@dataclass(eq=False)
class _Socket:
    client: WsClient
    feed: Feed
    # Frames, bytes and batches at the end of the measured window (mark).
    marked: tuple[int, int, int] = (0, 0, 0)
    retired: bool = False  # a member that left: closed by its own worker


@dataclass(eq=False)
class _Member:
    user: str
    host: str
    port: int
    feed: Feed
    client: WsClient | None = None
    socket: _Socket | None = None
    n: int = 0
    leaving: bool = False
    pong: asyncio.Future[None] | None = None

    def beat(self, sent: array.array[int]) -> None:
        """The next cursor: main.<n + 1> (the first one also sets the chapter: a join)."""
        assert self.client is not None
        self.n += 1
        chapter = ',"chapter_id":"ch1"' if self.n == 1 else ""
        payload = f'{{"type":"heartbeat"{chapter},"move_path":"main.{self.n}"}}'.encode()
        sent.append(time.time_ns())
        self.client.send_raw(frame(OP_TEXT, payload))


@dataclass
class _State:
    frames: Frames = field(default_factory=Frames)
    chain: Chain = field(default_factory=Chain)  # frames applied once for the worker's sockets
    groups: dict[str, list[_Socket]] = field(default_factory=dict)
    members: dict[str, _Member] = field(default_factory=dict)  # present (not left), by user
    sent: dict[str, array.array[int]] = field(default_factory=dict)  # when each n was sent
    left: list[str] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    lag_ns: int = 0  # how late the worst heartbeat went out
    errors: Counter[str] = field(default_factory=Counter)  # members' error replies, by code


_S = _State()


def _watcher(feed: Feed) -> MessageHandler:
    frames = _S.frames

    def handle(client: WsClient, payload: bytes, now_ns: int) -> None:
        feed.frames += 1
        feed.bytes += len(payload)
        feed.apply(frames.get(payload), now_ns)

    return handle


def _member_handler(member: _Member) -> MessageHandler:
    watch = _watcher(member.feed)

    def handle(client: WsClient, payload: bytes, now_ns: int) -> None:
        if payload.startswith(_PONG):
            if member.pong is not None and not member.pong.done():
                member.pong.set_result(None)
        elif payload.startswith(_ERROR):
            # A heartbeat the node could not apply (e.g. `unavailable`): counted by its code.
            try:
                code = str(json.loads(payload)["data"]["code"])
            except (ValueError, KeyError, TypeError):
                code = "?"
            _S.errors[code] += 1
        else:
            watch(client, payload, now_ns)

    return handle


async def _open(
    host: str,
    port: int,
    study: str,
    user: str,
    secret: str,
    feed: Feed,
    handler: MessageHandler,
    within: float,
) -> WsClient:
    token = issue_token(user, secret, 3600, studies="*")
    path = f"/ws/presence?study_id={study}&token={token}"
    # skip=1: the handler gets the snapshot (it starts the socket's state), not `connected`.
    client = await open_ws(host, port, path, handler, within, skip=1)
    client.closed.add_done_callback(lambda _: setattr(feed, "closed_ns", time.time_ns()))
    return client


async def _open_group(
    group: str,
    study: str,
    specs: list[list[Any]],
    secret: str,
    concurrency: int,
    connect_timeout: float,
    members: bool = False,
) -> dict[str, Any]:
    """specs: [host, port, user id, sampled] per socket; members are moved by this worker."""
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()

    async def one(spec: list[Any]) -> _Socket:
        host, port, user, sampled = spec
        feed = Feed(logged=bool(sampled), chain=_S.chain)
        handler = _watcher(feed)
        member: _Member | None = None
        if members:
            member = _Member(user, host, port, feed)
            handler = _member_handler(member)
        async with gate:
            client = await _open(host, port, study, user, secret, feed, handler, connect_timeout)
        socket = _Socket(client, feed)
        if member is not None:
            member.client, member.socket = client, socket
            _S.members[user] = member
        return socket

    results = await asyncio.gather(*(one(s) for s in specs), return_exceptions=True)
    opened = [r for r in results if isinstance(r, _Socket)]
    errors = [repr(r) for r in results if not isinstance(r, _Socket)]
    _S.groups.setdefault(group, []).extend(opened)
    return {
        "opened": len(opened),
        "failed": len(errors),
        "errors": errors[:3],
        "seconds": time.perf_counter() - started,
    }


async def _until(check: Callable[[], bool], wait: float) -> float:
    """Poll `check` (bounded by `wait` s); the seconds it took, or waited."""
    started = time.monotonic()
    # Polling: the state moves in protocol callbacks, and this runs a few times per run.
    while not check() and time.monotonic() - started < wait:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _snapshots(group: str, wait: float) -> dict[str, Any]:
    """Wait until every open socket of `group` has its snapshot."""
    sockets = _S.groups.get(group, [])

    def missing() -> list[_Socket]:
        return [s for s in sockets if s.feed.applied is None and not s.client.closed.done()]

    seconds = await _until(lambda: not missing(), wait)
    return {"sockets": len(sockets), "without_snapshot": len(missing()), "seconds": seconds}


async def _join() -> dict[str, Any]:
    """Every member of this worker sends its first heartbeat (main.1, a user_joined)."""
    for member in _S.members.values():
        member.beat(_S.sent.setdefault(member.user, array.array("q")))
    return {"joined": len(_S.members)}


def _holds(feed: Feed, expected: dict[str, int], left: list[str]) -> bool:
    cursors = feed.cursors
    return all(cursors.get(u) == n for u, n in expected.items()) and not any(
        u in cursors for u in left
    )


async def _held(group: str, expected: dict[str, int], left: list[str], wait: float) -> float:
    """Wait until every open socket of `group` holds exactly `expected` and none of `left`."""
    pending = [s for s in _S.groups.get(group, []) if not s.retired and not s.client.closed.done()]

    def done() -> bool:
        nonlocal pending
        pending = [
            s for s in pending if not s.client.closed.done() and not _holds(s.feed, expected, left)
        ]
        return not pending

    return await _until(done, wait)


async def _forget(group: str) -> dict[str, Any]:
    for s in _S.groups.get(group, []):
        s.feed.forget()
    return {"at_ns": time.time_ns()}


async def _mark(group: str) -> dict[str, Any]:
    for s in _S.groups.get(group, []):
        s.marked = (s.feed.frames, s.feed.bytes, s.feed.batches)
    return {"at_ns": time.time_ns()}


class _Movers:
    """Members' heartbeats at `rate` each (phases spread evenly), and the churn."""

    def __init__(
        self,
        study: str,
        rate: float,
        churn: float,
        nodes: list[list[Any]],
        secret: str,
        user_prefix: str,
        first_index: int,
        connect_timeout: float,
    ) -> None:
        self.study, self.secret, self.nodes = study, secret, nodes
        self.period = round(1e9 / rate)
        self.churn_every = round(1e9 / churn) if churn > 0 else 0
        self.user_prefix, self.next_index = user_prefix, first_index
        self.connect_timeout = connect_timeout
        self.heap: list[tuple[int, str]] = []
        self.joined = self.left = self.join_failures = 0
        self.statuses: Counter[int] = Counter()  # DELETE answers

    def schedule(self, user: str, due: int) -> None:
        heapq.heappush(self.heap, (due, user))

    async def run(self, duration: float) -> int:
        start = time.time_ns()
        end = start + round(duration * 1e9)
        for i, user in enumerate(_S.members):
            self.schedule(user, start + self.period * i // max(1, len(_S.members)))
        next_churn = start + self.churn_every if self.churn_every else end
        beats = 0
        while (now := time.time_ns()) < end:
            while self.heap and self.heap[0][0] <= now:
                due, user = heapq.heappop(self.heap)
                member = _S.members.get(user)
                if member is None or member.leaving or member.client is None:
                    continue
                if member.client.closed.done():
                    continue  # closed by the node: it cannot move any more
                _S.lag_ns = max(_S.lag_ns, now - due)
                member.beat(_S.sent[user])
                beats += 1
                # A late loop does not send a burst to catch up: a cursor only moves on.
                self.schedule(user, max(due + self.period, now))
            if now >= next_churn:
                self._churn()
                next_churn += self.churn_every
            wake = min(self.heap[0][0] if self.heap else end, next_churn, end)
            await asyncio.sleep(max(0.0, (wake - time.time_ns()) / 1e9))
        return beats

    def _churn(self) -> None:
        present = [m for m in _S.members.values() if not m.leaving]
        if present:
            self._spawn(self._leave(present[0]))  # the longest present leaves
        host, port = self.nodes[self.next_index % len(self.nodes)]
        self._spawn(self._join(f"{self.user_prefix}{self.next_index}", host, port))
        self.next_index += 1

    def _spawn(self, work: Awaitable[None]) -> None:
        async def wrapped() -> None:
            await work

        task = asyncio.ensure_future(wrapped())
        _S.tasks.add(task)
        task.add_done_callback(_S.tasks.discard)

    async def _leave(self, member: _Member) -> None:
        member.leaving = True
        await _acknowledged(member, self.connect_timeout)
        token = issue_token(member.user, self.secret, 3600, studies="*")
        status = await _delete(member.host, member.port, self.study, token, self.connect_timeout)
        self.statuses[status] += 1
        if member.socket is not None:
            member.socket.retired = True
        if member.client is not None:
            member.client.close()
        del _S.members[member.user]
        _S.left.append(member.user)
        self.left += 1

    async def _join(self, user: str, host: str, port: int) -> None:
        member = _Member(user, host, port, Feed(chain=_S.chain))
        try:
            member.client = await _open(
                host,
                port,
                self.study,
                user,
                self.secret,
                member.feed,
                _member_handler(member),
                self.connect_timeout,
            )
        except (OSError, TimeoutError, ConnectionError):
            self.join_failures += 1
            return
        _S.members[user] = member
        member.socket = _Socket(member.client, member.feed)
        _S.groups.setdefault("members", []).append(member.socket)
        member.beat(_S.sent.setdefault(user, array.array("q")))
        self.joined += 1
        self.schedule(user, time.time_ns() + self.period)


async def _acknowledged(member: _Member, within: float) -> bool:
    """Ping the member's socket; its pong comes after the node handled every earlier message."""
    client = member.client
    if client is None or client.closed.done():
        return False
    member.pong = asyncio.get_running_loop().create_future()
    client.send_raw(_PING)
    try:
        await asyncio.wait_for(asyncio.shield(member.pong), within)
    except TimeoutError:
        return False
    return True


async def _delete(host: str, port: int, study: str, token: str, within: float) -> int:
    """DELETE /presence/{study} on one short connection; the HTTP status (0: no answer)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    except (OSError, TimeoutError):
        return 0
    try:
        request = (
            f"DELETE /presence/{study} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode())
        status = await asyncio.wait_for(reader.readline(), within)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(), within)
        parts = status.split()
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    except (OSError, TimeoutError):
        return 0
    finally:
        writer.close()


_MOVERS: list[_Movers] = []


async def _move(
    study: str,
    duration: float,
    rate: float,
    churn: float,
    nodes: list[list[Any]],
    secret: str,
    user_prefix: str,
    first_index: int,
    connect_timeout: float,
) -> dict[str, Any]:
    """Move every member for `duration` s, with churn; returns at the window's end."""
    movers = _Movers(study, rate, churn, nodes, secret, user_prefix, first_index, connect_timeout)
    _MOVERS[:] = [movers]
    _S.lag_ns = 0
    started = time.time_ns()
    beats = await movers.run(duration)
    return {
        "started_ns": started,
        "seconds": (time.time_ns() - started) / 1e9,
        "heartbeats": beats,
    }


async def _finish(wait: float) -> dict[str, Any]:
    """After the window: let the churn in progress end, then ping every present member; the
    final state the watchers must reach (members the node closed cannot be known)."""
    movers = _MOVERS[0]
    if _S.tasks:
        await asyncio.wait(set(_S.tasks), timeout=wait)
    present = list(_S.members.values())
    acked = await asyncio.gather(*(_acknowledged(m, wait) for m in present))
    final = {m.user: m.n for m, ok in zip(present, acked, strict=True) if ok}
    closed = [
        [m.user, m.client.close_code if m.client else None]
        for m, ok in zip(present, acked, strict=True)
        if not ok
    ]
    return {
        "final": final,
        "left": list(_S.left),
        "unknown": closed,  # [user, close code]: closed by the node, or no pong in time
        "sent": {user: list(times) for user, times in _S.sent.items()},
        "joined": movers.joined,
        "left_count": movers.left,
        "join_failures": movers.join_failures,
        "delete_statuses": dict(movers.statuses),
        "heartbeat_errors": dict(_S.errors),
        "worst_lag_ms": _S.lag_ns / 1e6,
        "pending_churn": len(_S.tasks),
    }


async def _collect(
    group: str,
    expected: dict[str, int],
    left: list[str],
    sent: dict[str, list[int]],
    since_ns: int,
    wait: float,
) -> dict[str, Any]:
    """Wait (bounded) for every open socket to hold the final state, then what each saw."""
    every = _S.groups.get(group, [])
    settle = await _held(group, expected, left, wait)
    sockets = [s for s in every if not s.retired]
    open_ = [s for s in sockets if not s.client.closed.done()]
    values: array.array[int] = array.array("q")
    unheld = sampled = 0
    for s in sockets:
        if s.feed.log is not None:
            sampled += 1
            got, missed = staleness(s.feed.log, sent, since_ns, s.feed.closed_ns)
            values.extend(got)
            unheld += missed
    per_socket = [s.marked for s in sockets]
    return {
        "sockets": len(sockets),
        "open": len(open_),
        "close_codes": dict(Counter(s.client.close_code for s in sockets if s not in open_)),
        "settle_s": settle,
        "holding_all": sum(_holds(s.feed, expected, left) for s in open_),
        "pairs_reached": sum(
            s.feed.cursors.get(u) == n for s in open_ for u, n in expected.items()
        ),
        "left_still_held": sum(u in s.feed.cursors for s in open_ for u in left),
        "frames": sum(m[0] for m in per_socket),
        "bytes": sum(m[1] for m in per_socket),
        "batches": sum(m[2] for m in per_socket),
        "max_frames": max((m[0] for m in per_socket), default=0),
        # Gaps count on every socket, those of members that left included.
        "gaps": sum(s.feed.gaps for s in every),
        "sockets_with_gaps": sum(s.feed.gaps > 0 for s in every),
        "early": sum(s.feed.early for s in every),
        "disordered": sum(s.feed.disordered for s in every),
        "resyncs": sum(max(0, s.feed.snapshots - 1) for s in every),
        "sampled": sampled,
        "staleness_ns": values,
        "unheld": unheld,
        "parsed": _S.frames.parsed,
        "chain_shared": _S.chain.shared,
        "chain_applied": _S.chain.applied,
    }


async def _connect_cost(
    host: str, port: int, study: str, user: str, secret: str, within: float
) -> dict[str, Any]:
    """Open one socket and measure its first two messages (connected, presence.snapshot)."""
    first: list[bytes] = []
    both = asyncio.get_running_loop().create_future()

    def handler(client: WsClient, payload: bytes, now_ns: int) -> None:
        first.append(payload)
        if len(first) == 2 and not both.done():
            both.set_result(None)

    token = issue_token(user, secret, 3600, studies="*")
    started = time.perf_counter()
    client = await open_ws(
        host, port, f"/ws/presence?study_id={study}&token={token}", handler, within, skip=0
    )
    try:
        await asyncio.wait_for(both, within)
    finally:
        client.close()
    seconds = time.perf_counter() - started
    connected, snapshot = first[0], first[1]
    message = json.loads(snapshot)
    if message.get("type") != "presence.snapshot":
        raise RuntimeError(f"second message is not the snapshot: {snapshot[:80]!r}")
    data = message["data"]
    return {
        "connected_bytes": len(connected),
        "snapshot_bytes": len(snapshot),
        "users_listed": len(data.get("users", [])),
        "total": data.get("total"),
        "counts": data.get("counts"),
        "complete": data.get("complete"),
        "seconds": seconds,
    }


async def _close() -> dict[str, Any]:
    clients = [s.client for sockets in _S.groups.values() for s in sockets]
    for client in clients:
        client.close()
    if clients:
        await asyncio.wait([c.closed for c in clients], timeout=10)
    for task in list(_S.tasks):
        task.cancel()
    _reset()
    return {"closed": len(clients)}


def _reset() -> None:
    global _S
    _S = _State()
    _MOVERS.clear()


async def _held_reply(
    group: str, expected: dict[str, int], left: list[str], wait: float
) -> dict[str, Any]:
    seconds = await _held(group, expected, left, wait)
    sockets = [s for s in _S.groups.get(group, []) if not s.retired and not s.client.closed.done()]
    return {"seconds": seconds, "holding": sum(_holds(s.feed, expected, left) for s in sockets)}


_COMMANDS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "open": _open_group,
    "snapshots": _snapshots,
    "join": _join,
    "held": _held_reply,
    "forget": _forget,
    "mark": _mark,
    "move": _move,
    "finish": _finish,
    "collect": _collect,
    "connect_cost": _connect_cost,
    "close": _close,
}


async def command(op: str, **args: Any) -> dict[str, Any]:
    """One bigroom step in this worker (`op`, with its arguments)."""
    return await _COMMANDS[op](**args)
