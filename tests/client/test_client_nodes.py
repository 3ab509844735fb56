"""PresenceClient end to end: real node processes on a real Redis, nodes killed under it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis
from websockets.asyncio.client import connect

from presence_svc.client import PresenceClient, PresenceError
from presence_svc.redis.keys import Keys
from tests.client.conftest import (
    GRACE,
    HEARTBEAT,
    IDLE,
    LEASE_TTL,
    PREFIX,
    SLACK,
    SWEEP,
    NodeFactory,
    record,
    study,
    token,
)
from tests.client.journal import Journal
from tests.support.processes import RedisServer
from tests.support.tasks import stop
from tests.support.waiting import eventually_async

Opened = Callable[..., contextlib.AbstractAsyncContextManager[tuple[PresenceClient, Journal]]]


@pytest.fixture
def opened() -> Opened:
    """Open a client (its journal listening before it connects); closed at the end."""

    @contextlib.asynccontextmanager
    async def open_client(
        urls: str | list[str], sid: str, **options: object
    ) -> AsyncIterator[tuple[PresenceClient, Journal]]:
        options.setdefault("heartbeat_interval", HEARTBEAT)
        client = PresenceClient(urls, sid, **options)  # type: ignore[arg-type]
        journal = Journal(client)
        try:
            await client.connect(within=20)
            yield client, journal
        finally:
            await client.close()
            await journal.close()

    return open_client


def moved(client: PresenceClient, log: Journal) -> bool:
    """The client lost its socket and is open again."""
    return "reconnecting" in log.states() and client.state == "open"


def present(client: PresenceClient) -> dict[str, tuple[str, str | None]]:
    return {u.user_id: (u.status, u.move_path) for u in client.users()}


async def test_two_clients_see_each_other(nodes: NodeFactory, opened: Opened) -> None:
    a, b = nodes(), nodes()
    sid = study()
    async with (
        opened(a.base_url, sid, token=token("alice")) as (alice, alice_log),
        opened(b.ws_url, sid, token=token("bob")) as (bob, bob_log),
    ):
        assert alice.state == bob.state == "open" and alice.user_id == "alice"
        await alice.set_cursor(chapter_id="ch1", move_path="main.1")
        await bob.set_cursor(chapter_id="ch1", move_path="main.2")
        for log, other in ((alice_log, "bob"), (bob_log, "alice")):
            await log.wait("join", other)
        await alice.set_cursor(move_path="main.12.var2.3")
        await bob_log.wait("cursor", "alice")
        assert present(bob) == {"alice": ("active", "main.12.var2.3"), "bob": ("active", "main.2")}
        async for users in bob.changes():  # a watch: the users now, at once
            assert [u.user_id for u in users] == ["alice", "bob"]
            break
        # Alice's own socket hears of her move through the study channel too, not necessarily
        # before bob's did.
        await eventually_async(lambda: alice.seq == bob.seq, what="alice at bob's seq")
        assert alice.users() == bob.users()
        assert alice.seq == bob.seq

        await alice.leave()
        await bob_log.wait("leave", "alice")
        assert [u.user_id for u in bob.users()] == ["bob"]
        # Left means no more heartbeats: alice does not come back by herself.
        await asyncio.sleep(2 * HEARTBEAT + SWEEP)
        assert len(bob_log.of("join", "alice")) == 1
        assert "alice" not in present(bob)


async def test_an_inactive_user_idles_while_an_active_one_does_not(
    nodes: NodeFactory, opened: Opened
) -> None:
    a = nodes()
    sid = study()
    async with (
        opened(a.base_url, sid, token=token("dozer")) as (dozer, _),
        opened(a.base_url, sid, token=token("keeper")) as (keeper, keeper_log),
    ):
        await dozer.set_cursor(chapter_id="ch1")
        await keeper.set_cursor(chapter_id="ch1")
        await keeper_log.wait("join", "dozer")
        dozer.set_active(False)
        went_idle = time.monotonic()
        await keeper_log.wait("status", "dozer", within=IDLE + 2 * HEARTBEAT + SLACK)
        assert time.monotonic() - went_idle >= IDLE - HEARTBEAT - 0.1
        assert present(keeper)["dozer"][0] == "idle"
        assert keeper_log.of("status", "keeper") == [], "the active client's user idled"
        dozer.set_active(True)  # a heartbeat at once
        await keeper_log.wait("status", "dozer", count=2, within=HEARTBEAT + SLACK)
        assert present(keeper)["dozer"][0] == "active"


async def test_a_killed_node_moves_its_client_to_another_without_a_flap(
    nodes: NodeFactory, opened: Opened
) -> None:
    a, b = nodes(), nodes()
    sid = study()
    async with (
        opened(b.base_url, sid, token=token("viewer")) as (_, viewer_log),
        opened([a.base_url, b.base_url], sid, token=token("mover")) as (mover, mover_log),
    ):
        await mover.set_cursor(chapter_id="ch1", move_path="main.4")
        await viewer_log.wait("join", "mover")
        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        a.wait(5)
        await eventually_async(lambda: moved(mover, mover_log), within=10, what="reconnected")
        took = time.monotonic() - killed
        record("kill -9: open again on the other node after", took)
        assert took < 5
        assert b.health()["sockets"] == 2
        # Past the dead node's lease TTL and the whole leave grace: a flap would be here.
        await asyncio.sleep(LEASE_TTL + GRACE + SLACK)
        assert viewer_log.of("leave", "mover") == []
        assert len(viewer_log.of("join", "mover")) == 1
        assert present(mover)["mover"] == ("active", "main.4")
        assert mover_log.of("leave") == []


async def test_sigterm_reconnects_at_once(nodes: NodeFactory, opened: Opened) -> None:
    a, b = nodes(), nodes()
    sid = study()
    async with opened([a.base_url, b.base_url], sid, token=token("mover")) as (mover, log):
        await mover.set_cursor(chapter_id="ch1")
        await log.wait("join", "mover")
        a.signal(signal.SIGTERM)
        asked = time.monotonic()
        await eventually_async(lambda: moved(mover, log), within=5, what="reconnected")
        took = time.monotonic() - asked
        record("SIGTERM (1012): open again on the other node after", took)
        assert took < 2  # 1012 is not backed off: a small jitter only
        await asyncio.sleep(GRACE + SLACK)
        assert log.of("leave") == [] and len(log.of("join", "mover")) == 1


async def test_a_seq_gap_resyncs_from_a_fresh_snapshot(
    redis_server: RedisServer, nodes: NodeFactory, opened: Opened
) -> None:
    a = nodes()
    sid = study()
    async with (
        opened(a.base_url, sid, token=token("watcher")) as (watcher, log),
        opened(a.base_url, sid, token=token("first")) as (first, _),
    ):
        await first.set_cursor(chapter_id="ch1")
        await log.wait("join", "first")
        assert len(log.of("snapshot")) == 1
        # An event lost on its way: the seq moves on without one being published.
        client = redis.Redis.from_url(redis_server.url)
        try:
            client.hincrby(Keys(PREFIX).study(sid).meta, "seq", 1)
            async with opened(a.base_url, sid, token=token("second")) as (second, _):
                await second.set_cursor(chapter_id="ch2")
                await log.wait("join", "second")
                expected = int(client.hget(Keys(PREFIX).study(sid).meta, "seq") or 0)
                assert len(log.of("snapshot")) == 2, "the gap was not resynced"
                assert watcher.seq == expected
                assert present(watcher) == {"first": ("active", None), "second": ("active", None)}
                assert log.of("leave") == []
        finally:
            client.close()


async def test_an_expiring_token_is_refreshed_over_the_socket(
    nodes: NodeFactory, opened: Opened
) -> None:
    a = nodes(jwt_leeway="0")
    sid = study()
    handed: list[str] = []

    async def get_token() -> str:
        handed.append(token("short", ttl=3))
        return handed[-1]

    async with opened(a.base_url, sid, get_token=get_token) as (short, log):
        await short.set_cursor(chapter_id="ch1")
        # Three times past a token's whole life on one socket: each was replaced in time.
        await log.wait("refreshed", count=3, within=15)
        assert log.states() == ["connecting", "open"], "the socket was closed (4401?)"
        assert len(handed) == 4 and short.state == "open"


async def test_a_refused_token_is_replaced_then_the_client_connects(
    nodes: NodeFactory, opened: Opened
) -> None:
    a = nodes()
    sid = study()
    handed = [token("late", secret="not-the-nodes-secret-0123456789abcdef01"), token("late")]

    async def get_token() -> str:
        return handed.pop(0)

    async with opened(a.base_url, sid, get_token=get_token) as (late, _):
        assert late.user_id == "late" and handed == []


async def test_a_forbidden_study_stops_with_an_error(nodes: NodeFactory) -> None:
    a = nodes()
    sid = study()
    client = PresenceClient(a.base_url, sid, token=token("outsider", studies=["elsewhere"]))
    with pytest.raises(PresenceError) as refused:
        await client.connect(within=10)
    assert refused.value.code == 4403
    assert client.state == "closed" and client.error is refused.value
    with pytest.raises(PresenceError):
        await client.set_cursor(chapter_id="ch1")
    await client.close()
    static = PresenceClient(a.base_url, sid, token=token("x", secret="wrong-secret-" + "0" * 32))
    with pytest.raises(PresenceError) as unauthorized:
        async with static:
            pass
    assert unauthorized.value.code == 4401


# -- big rooms (issue 13): signals, batched delivery, crowd snapshots ------------------------


def signals_of(log: Journal) -> list[tuple[str | None, dict[str, object] | None]]:
    return [(e.signal, e.data) for e in log.of("signal")]


async def test_signals_reach_every_other_socket_of_the_study_but_not_their_sender(
    nodes: NodeFactory, opened: Opened
) -> None:
    a, b = nodes(), nodes()
    sid = study()
    async with (
        opened(a.base_url, sid, token=token("alice")) as (alice, alice_log),
        opened(a.base_url, sid, token=token("alice")) as (_, tab_log),
        opened(b.base_url, sid, token=token("bob")) as (bob, bob_log),
    ):
        heard: list[tuple[str, dict[str, object]]] = []
        bob.on_signal(lambda name, data: heard.append((name, data)), "typing")
        assert await alice.send_signal("typing", {"chapter_id": "ch1"})
        typing = ("typing", {"chapter_id": "ch1", "user_id": "alice"})
        await bob_log.wait("signal")  # across nodes
        await tab_log.wait("signal")  # the same user's other socket
        assert signals_of(bob_log) == signals_of(tab_log) == [typing]
        assert heard == [typing]
        # Bob's answer reaches alice after anything her node handed her before it.
        assert await bob.send_signal("pointer", {"chapter_id": "ch1", "square": "e4"})
        await alice_log.wait("signal")
        assert signals_of(alice_log) == [
            ("pointer", {"chapter_id": "ch1", "square": "e4", "user_id": "bob"})
        ]
        # Not a heartbeat: signalling joined nobody.
        assert alice.users() == [] and bob.users() == []
        with pytest.raises(ValueError):
            await alice.send_signal("typing", {"text": "x" * 2000})


async def test_batched_delivery_is_applied_like_single_events(
    nodes: NodeFactory, opened: Opened
) -> None:
    a = nodes(batch_threshold="1")  # two sockets of the study on the node: batched
    sid = study()
    async with (
        opened(a.base_url, sid, token=token("watcher")) as (watcher, log),
        opened(a.base_url, sid, token=token("mover"), cursor_throttle=0) as (mover, _),
        connect(
            f"{a.ws_url}/ws/presence?study_id={sid}",
            additional_headers={"Authorization": f"Bearer {token('raw')}"},
        ) as raw,
    ):
        frames: list[str] = []

        async def read() -> None:
            async for frame in raw:
                frames.append(json.loads(frame)["type"])

        reader = asyncio.create_task(read())
        try:
            # Its snapshot first: events at or below the snapshot's seq are never sent to it.
            await eventually_async(lambda: "presence.snapshot" in frames, within=10)
            await watcher.set_cursor(chapter_id="ch1")
            for ply in range(1, 31):
                await mover.set_cursor(chapter_id="ch1", move_path=f"main.{ply}")
                await mover.send_signal("pointer", {"chapter_id": "ch1", "square": "e4"})
            await eventually_async(
                lambda: present(watcher).get("mover") == ("active", "main.30"), within=10
            )
            await eventually_async(lambda: watcher.seq == mover.seq, within=5)
            await eventually_async(lambda: "presence.batch" in frames, within=5)
        finally:
            await stop(reader)
        assert set(frames) <= {"connected", "presence.snapshot", "presence.batch"}, frames
        assert len(log.of("snapshot")) == 1, "a batch was taken for a gap"
        assert log.states() == ["connecting", "open"]
        assert log.of("join", "mover") and log.of("cursor", "mover")
        assert log.of("signal"), "no signal came out of the batches"
        assert watcher.counts() == {"active": 2, "idle": 0, "away": 0} and watcher.complete


async def test_a_big_room_snapshot_lists_some_users_and_counts_everyone(
    nodes: NodeFactory, opened: Opened
) -> None:
    a = nodes(snapshot_max_users="2")
    sid = study()
    async with contextlib.AsyncExitStack() as stack:
        members = []
        for name in ("u1", "u2", "u3", "u4"):
            member, _ = await stack.enter_async_context(opened(a.base_url, sid, token=token(name)))
            await member.set_cursor(chapter_id="ch1")
            members.append(member)
        await eventually_async(lambda: members[0].total == 4, within=10)
        watcher, log = await stack.enter_async_context(
            opened(a.base_url, sid, token=token("watcher"))
        )
        assert (watcher.total, watcher.complete, len(watcher.users())) == (4, False, 2)
        assert watcher.counts() == {"active": 4, "idle": 0, "away": 0}
        members[3].set_active(False)  # listed or not, the watcher's counts follow
        await eventually_async(
            lambda: watcher.counts() == {"active": 3, "idle": 1, "away": 0},
            within=IDLE + 2 * HEARTBEAT + SLACK,
        )
        await members[0].leave()
        await eventually_async(lambda: watcher.total == 3, within=10)
        assert watcher.counts() == {"active": 2, "idle": 1, "away": 0}
        assert "u1" not in present(watcher) and log.of("join") == log.of("join")[:2]
