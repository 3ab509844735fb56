"""Redis stalls (SIGSTOP): releases cut short by a stall and a crash are not lost, a heartbeat
that Redis applies after its socket's release leaves no ghost, and calls that hit a stalled
Redis answer `unavailable` by their deadline instead of hanging or 500.

Each test has its own redis-server (append-only, so a killed one comes back with its data).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import httpx
import redis
import redis.asyncio as aioredis
import websockets
from websockets.exceptions import ConnectionClosed

from presence_svc.leases import AUDIT_EVERY
from presence_svc.models import CursorUpdate, Holder, Thresholds
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from tests.faults.conftest import (
    AWAY,
    EXPIRE,
    GRACE,
    IDLE,
    LEASE_TTL,
    NodeFactory,
    record,
    study,
    token,
)
from tests.support.auth import bearer
from tests.support.clients import Watcher
from tests.support.processes import NodeProcess, RedisServer
from tests.support.waiting import eventually_async

SLACK = 1.5  # scheduling noise on a loaded 2-core machine
CALL_TIMEOUT = 1.0  # PRESENCE_REDIS_CALL_TIMEOUT of the stall test
USERS = 40

T = TypeVar("T")


def redis_pid(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """Redis frozen (SIGSTOP) until the block ends; SIGCONT unless it was killed meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def listed(node: NodeProcess, sid: str) -> set[str] | None:
    """Users the study lists now; None while the node cannot read it."""
    async with httpx.AsyncClient(timeout=10) as http:
        reply = await http.get(f"{node.base_url}/presence/{sid}", headers=bearer(token("reader")))
    if reply.status_code != 200:
        return None
    return {u["user_id"] for u in reply.json()["users"]}


async def hold(node: NodeProcess, sid: str, user: str) -> Watcher:
    """A user's socket that heartbeats once, so it holds the user's session."""
    socket = await Watcher.open(node.ws_url, sid, token(user))
    await socket.send({"type": "heartbeat"})
    return socket


def holders_left(server: RedisServer, sid: str) -> list[bytes]:
    """The study's connection sets still in Redis (each holds a session for a socket)."""
    client = redis.Redis.from_url(server.url)
    try:
        return list(client.scan_iter(match=f"faults:{{{sid}}}:conns:*"))
    finally:
        client.close()


async def test_releases_cut_by_a_stall_and_a_crash_are_not_lost(
    redis_server: RedisServer, nodes: NodeFactory
) -> None:
    # The default call timeout (longer than the stall): the releases of the closed sockets are
    # still waiting for their replies when Redis dies, as in the run that found the ghosts.
    a = nodes()
    sid = study()
    users = [f"u{n}" for n in range(USERS)]
    sockets = [await hold(a, sid, user) for user in users]

    async def all_listed() -> bool:
        return await listed(a, sid) == set(users)

    await eventually_async(all_listed, within=10, what="every user listed")

    with stopped(redis_pid(redis_server)):
        await asyncio.gather(*(s.close() for s in sockets))
        await asyncio.sleep(2.0)  # the stall, then the crash
        redis_server.kill()
    redis_server.start()  # from its append-only file: every session, no release

    async def nobody_listed() -> bool:
        return await listed(a, sid) == set()

    # Within the node's retries, a TTL and the grace (and a few sweeps).
    took = await eventually_async(
        nobody_listed, within=10 + LEASE_TTL + GRACE + SLACK, what="every user left"
    )
    record("redis stall + crash", f"{USERS} users gone after the restart", took)
    assert holders_left(redis_server, sid) == []
    record("redis stall + crash", "users left listed", len(await listed(a, sid) or ()), "")

    # A user who comes back and leaves again is not pinned by anything stale.
    back = await hold(a, sid, users[0])

    async def back_listed() -> bool:
        return await listed(a, sid) == {users[0]}

    await eventually_async(back_listed, within=10, what="the user back")
    await back.close()
    gone = await eventually_async(nobody_listed, within=GRACE + 5, what="the user gone again")
    record("redis stall + crash", "returning user gone after its close", gone)
    assert holders_left(redis_server, sid) == []


async def test_a_heartbeat_applied_after_its_socket_s_release_leaves_no_ghost(
    redis_server: RedisServer, nodes: NodeFactory
) -> None:
    # During a stall the node's batcher drops a connection with a heartbeat still on it; the
    # socket closes and its release goes out on a new connection. When Redis resumes it may run
    # the old connection's heartbeat after the release, holding the session for a socket that
    # is gone. Which connection Redis reads first is not the test's to choose, so the stall
    # gives the node its failures (a heartbeat and a release past their deadline) and the test
    # then applies that heartbeat itself, after the release: the node's own commands.
    a = nodes(redis_call_timeout=str(CALL_TIMEOUT))
    sid = study()
    stays, ghost = await hold(a, sid, "stays"), await hold(a, sid, "ghost")
    try:

        async def both_listed() -> bool:
            return await listed(a, sid) == {"stays", "ghost"}

        await eventually_async(both_listed, within=10, what="both users listed")
        with stopped(redis_pid(redis_server)):
            await ghost.send({"type": "heartbeat"})
            await ghost.wait_until(
                lambda w: any(m["type"] == "error" for m in w.messages),
                within=CALL_TIMEOUT + SLACK,
                what="the heartbeat unavailable",
            )
            await ghost.close()
            await asyncio.sleep(CALL_TIMEOUT + 0.5)  # its release fails by its deadline too
        await late_heartbeat(a, redis_server, sid, "ghost", str(ghost.connected["connection_id"]))

        async def ghost_gone() -> bool:
            return await listed(a, sid) == {"stays"}

        # Within one periodic pass (AUDIT_EVERY renewals a third of the TTL apart), the grace.
        gone = await eventually_async(
            ghost_gone, within=AUDIT_EVERY * LEASE_TTL / 3 + GRACE + SLACK, what="the ghost gone"
        )
        record("late heartbeat", "ghost gone after its late hold", gone)
        held = [key.decode() for key in holders_left(redis_server, sid)]
        assert held == [f"faults:{{{sid}}}:conns:stays"]
        assert not stays.closed
    finally:
        await stays.close()


async def late_heartbeat(
    node: NodeProcess, server: RedisServer, sid: str, user: str, connection_id: str
) -> None:
    """Once the node has released the closed socket's lease and renewed after that, apply the
    socket's heartbeat as the node would have sent it (its lease set first, then the hold)."""
    keys = Keys("faults")
    node_id = str(node.health()["node_id"])
    member = f"{sid} {user} {connection_id}"
    client = aioredis.Redis.from_url(server.url)
    late = RedisStore(client, keys, Thresholds(IDLE, AWAY, EXPIRE))
    try:

        async def released() -> bool:
            return not await client.sismember(keys.node_leases(node_id), member)

        await eventually_async(released, within=LEASE_TTL + SLACK, what="the release retried")
        # Past the pass that followed the failures (it ran in the renewal that retried the
        # release): the next renewal has begun.
        at = await client.zscore(keys.live_nodes, node_id)

        async def renewed() -> bool:
            return await client.zscore(keys.live_nodes, node_id) != at

        await eventually_async(renewed, within=LEASE_TTL + SLACK, what="a renewal")
        now_ms = int(time.time() * 1000)
        await late.heartbeat(user, sid, CursorUpdate(), now_ms, Holder(node_id, connection_id))
        # Held for the gone socket, unless a periodic pass has found it already.
        held = await client.sismember(keys.node_leases(node_id), member)
        assert held or "leases that no open socket holds" in node.log_text()
    finally:
        await late.close()
        await client.aclose()


async def test_a_stall_longer_than_the_call_timeout_answers_unavailable(
    redis_server: RedisServer, nodes: NodeFactory
) -> None:
    a = nodes(redis_call_timeout=str(CALL_TIMEOUT))
    sid = study()
    holder = await hold(a, sid, "holder")

    async def held() -> bool:
        return await listed(a, sid) == {"holder"}

    await eventually_async(held, within=10, what="the holder listed")

    async with httpx.AsyncClient(timeout=30) as http:
        with stopped(redis_pid(redis_server)):
            frozen = time.monotonic()
            beat = await timed(
                "REST heartbeat",
                http.post(
                    f"{a.base_url}/presence/heartbeat",
                    json={"study_id": sid},
                    headers=bearer(token("rest")),
                ),
            )
            assert beat.status_code == 503, beat.text
            assert beat.headers["retry-after"] == "1"
            assert beat.json()["error"] == "unavailable"

            read = await timed(
                "REST presence read",
                http.get(f"{a.base_url}/presence/{sid}", headers=bearer(token("r"))),
            )
            assert read.status_code == 503, read.text
            assert read.headers["retry-after"] == "1"
            assert read.json()["error"] == "unavailable"

            await holder.send({"type": "heartbeat"})
            await timed(
                "WebSocket heartbeat",
                holder.wait_until(
                    lambda w: any(m["type"] == "error" for m in w.messages),
                    within=10,
                    what="an error for the heartbeat",
                ),
            )
            errors = [m["data"]["code"] for m in holder.messages if m["type"] == "error"]
            assert errors == ["unavailable"]

            closed = await timed("new socket's snapshot", snapshot_refused(a, sid))
            assert closed == (1011, "presence storage is unreachable")
            # Frozen a good deal longer than a call may take, as in the run that found it.
            await asyncio.sleep(max(0.0, frozen + 4 * CALL_TIMEOUT - time.monotonic()))
        thawed = time.monotonic()

        async def answers() -> bool:
            reply = await http.post(
                f"{a.base_url}/presence/heartbeat",
                json={"study_id": sid},
                headers=bearer(token("rest")),
            )
            return reply.status_code == 200

        recovered = await eventually_async(answers, within=10, what="heartbeats answered again")
        record("redis stall", "REST heartbeats back after SIGCONT", recovered)
    assert not holder.closed

    await holder.close()

    async def holder_gone() -> bool:
        return "holder" not in (await listed(a, sid) or {"holder"})

    gone = await eventually_async(holder_gone, within=GRACE + 5, what="the holder gone")
    record("redis stall", "holder gone after its close", gone)
    record("redis stall", "freeze", thawed - frozen)


async def timed(what: str, call: Awaitable[T]) -> T:
    """`call`'s outcome, which must come by the call timeout (give or take the noise)."""
    started = time.monotonic()
    outcome = await call
    took = time.monotonic() - started
    record("redis stall", f"{what} answered", took)
    assert took < CALL_TIMEOUT + SLACK, f"{what} took {took:.1f}s"
    return outcome


async def snapshot_refused(node: NodeProcess, sid: str) -> tuple[int | None, str | None]:
    """Open a socket while Redis is frozen: how the node closes it (its code and reason)."""
    async with websockets.connect(
        f"{node.ws_url}/ws/presence?study_id={sid}",
        additional_headers=bearer(token("late")),
        open_timeout=10,
    ) as ws:
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass  # nothing comes before the close: no snapshot, no `connected`
        return ws.close_code, ws.close_reason
