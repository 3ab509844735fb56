"""Scenario 5, the big room: one study, thousands of watchers, members moving their cursors.

W watchers (sockets that never heartbeat) and M members (sockets that heartbeat, each a cursor
move `main.<n>` R times a second) over 2 nodes, one study; every 1/C s one member leaves
(DELETE) and a new one joins on the next node. Run twice on fresh nodes: batching on
(PRESENCE_BATCH_THRESHOLD=50, PRESENCE_BATCH_WINDOW=0.05, the defaults) and off
(PRESENCE_BATCH_WINDOW=0). Watchers sit in the client workers, members in the last worker,
which moves them and logs when it sent each n (bigroom_clients.py). Every socket applies every
frame by the protocol's rule (bigroom_feed.py) and counts its seq gaps; a sample of watchers
logs when it first held each cursor, which gives each heartbeat's staleness.

Then the connect cost: the first two frames (connected, presence.snapshot) of a socket opening
onto a study of few and of many members (sessions written through the store's heartbeat).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import secrets
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from presence_svc.bench import report
from presence_svc.bench.harness import Context
from presence_svc.bench.runner import CpuWindow, Endpoint
from presence_svc.bench.scenarios.bigroom_feed import move_number
from presence_svc.models import CursorUpdate, Thresholds
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore

# The batching settings of each run; "on" spells out the defaults.
MODES: tuple[tuple[str, dict[str, str]], ...] = (
    ("on", {"PRESENCE_BATCH_THRESHOLD": "50", "PRESENCE_BATCH_WINDOW": "0.05"}),
    ("off", {"PRESENCE_BATCH_WINDOW": "0"}),
)
EXTERNAL = "external"  # nodes given on the command line: one run, on their own settings
CORE_LIMIT = 1.0  # cores per node, batching on
STALENESS_LIMIT_MS = 250.0  # p99, batching on
THRESHOLDS = Thresholds(30.0, 300.0, 600.0)  # the service's defaults
TIMEOUT = 180.0  # seconds any one worker command may take
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _all(ctx: Context, op: str, watchers: dict[str, Any], members: dict[str, Any]) -> list[Any]:
    """The bigroom command `op` in every worker: `watchers` to the client workers, `members`
    to the last one (which holds the members); the replies in worker order."""
    per_worker = [{"op": op, **watchers}] * ctx.clients + [{"op": op, **members}]
    return ctx.pool.call_all("bigroom", TIMEOUT, per_worker)


def _members(ctx: Context, op: str, **args: Any) -> Any:
    return ctx.pool.call(ctx.publisher, "bigroom", TIMEOUT, op=op, **args)


def run(ctx: Context) -> dict[str, Any]:
    p = ctx.profile.bigroom
    modes = ((EXTERNAL, {}),) if ctx.external_nodes else MODES
    rows: list[dict[str, Any]] = []
    connect: list[dict[str, Any]] = []
    ctx.emit(
        f"1 study: {p.watchers:,} watchers + {p.members} members over {p.nodes} nodes; each "
        f"member moves {p.rate:g} times/s; {p.churn:g} member(s) leave and as many join per s; "
        f"{p.seconds:g} s per run; watchers in {ctx.clients} client processes, members in 1; "
        f"staleness over {p.sampled} sampled watchers"
    )
    for mode, env in modes:
        prefix = ctx.prefix("bigroom") + ("" if mode == EXTERNAL else f"-{mode}")
        study = f"bench-bigroom-{secrets.token_hex(4)}"
        with ctx.nodes(p.nodes, prefix, env) as nodes:
            try:
                rows.append(_room(ctx, nodes, prefix, study, mode, env))
            finally:
                _all(ctx, "close", {}, {})
            if not connect:
                connect = [_connect_cost(ctx, nodes, prefix, m) for m in p.connect_members]
        if not ctx.external_nodes:
            asyncio.run(_delete_prefix(ctx.redis_url, prefix))
    return _summarize(ctx, rows, connect)


def _layout(ctx: Context, nodes: list[Endpoint]) -> list[list[list[Any]]]:
    """Per client worker: [host, port, user id, sampled] of each watcher. Watcher k is on node
    k mod N; `sampled` of them, evenly spaced (so on every node), log their cursors' times."""
    p = ctx.profile.bigroom
    every = max(1, p.watchers // max(1, p.sampled))
    per_worker: list[list[list[Any]]] = [[] for _ in range(ctx.clients)]
    for k in range(p.watchers):
        node = nodes[k % len(nodes)]
        sampled = k % every == 0 and k // every < p.sampled
        per_worker[(k // len(nodes)) % ctx.clients].append(
            [node.host, node.port, f"bench-bw{k}", sampled]
        )
    return per_worker


def _open_args(ctx: Context, study: str, group: str, specs: list[list[Any]]) -> dict[str, Any]:
    return {
        "group": group,
        "study": study,
        "specs": specs,
        "secret": ctx.secret,
        "concurrency": 100,
        "connect_timeout": 30.0,
    }


def _opened(replies: list[dict[str, Any]], what: str) -> None:
    failed = sum(r["failed"] for r in replies)
    if failed:
        errors = next(r["errors"] for r in replies if r["failed"])
        raise RuntimeError(f"{failed} {what} failed to open: {errors}")


def _room(
    ctx: Context,
    nodes: list[Endpoint],
    prefix: str,
    study: str,
    mode: str,
    env: dict[str, str],
) -> dict[str, Any]:
    """One run: open everyone, join, move for the window, then what every socket ended with."""
    p = ctx.profile.bigroom
    layout = _layout(ctx, nodes)
    members = [
        [nodes[k % len(nodes)].host, nodes[k % len(nodes)].port, f"bench-bm{k}", False]
        for k in range(p.members)
    ]
    opened = time.monotonic()
    _opened(
        ctx.pool.call_all(
            "bigroom",
            TIMEOUT,
            [{"op": "open", **_open_args(ctx, study, "watchers", part)} for part in layout],
        ),
        "watchers",
    )
    _opened(
        [_members(ctx, "open", members=True, **_open_args(ctx, study, "members", members))],
        "members",
    )
    snapshots = _all(
        ctx,
        "snapshots",
        {"group": "watchers", "wait": p.settle},
        {"group": "members", "wait": p.settle},
    )
    open_s = time.monotonic() - opened
    _members(ctx, "join")
    joined = {f"bench-bm{k}": 1 for k in range(p.members)}
    held = _all(
        ctx,
        "held",
        {"group": "watchers", "expected": joined, "left": [], "wait": p.settle},
        {"group": "members", "expected": joined, "left": [], "wait": p.settle},
    )

    # The measured window: counters afresh, the processes' CPU, the members moving.
    forgotten = _all(ctx, "forget", {"group": "watchers"}, {"group": "members"})
    local = {f"node-{i}": n.pid for i, n in enumerate(nodes) if n.pid is not None}
    contention = _Contention(local).start()
    window = CpuWindow(_pids(ctx, nodes)).start()
    moved = _members(
        ctx,
        "move",
        study=study,
        duration=p.seconds,
        rate=p.rate,
        churn=p.churn,
        nodes=[[n.host, n.port] for n in nodes],
        secret=ctx.secret,
        user_prefix="bench-bm",
        first_index=p.members,
        connect_timeout=30.0,
    )
    window.stop()
    contended = contention.stop()
    marked = _all(ctx, "mark", {"group": "watchers"}, {"group": "members"})
    finished = _members(ctx, "finish", wait=p.settle)
    # What every watcher must end with: the sessions as Redis holds them after the last pong
    # (a heartbeat answered with an error stored nothing), less the members the node closed.
    unknown = {user for user, _ in finished["unknown"]}
    stored = asyncio.run(_stored_cursors(ctx.redis_url, prefix, study, list(finished["sent"])))
    expected = {u: n for u, n in stored.items() if n is not None and u not in unknown}
    gone = [u for u, n in stored.items() if n is None and u not in unknown]
    finished["stored_behind"] = sum(
        1 for u, n in expected.items() if n != finished["final"].get(u, n)
    )
    finished["expected"] = expected
    collect = {
        "expected": expected,
        "left": gone,
        "sent": finished["sent"],
        "since_ns": moved["started_ns"],
        "wait": p.settle,
    }
    replies = _all(
        ctx, "collect", {"group": "watchers", **collect}, {"group": "members", **collect}
    )
    starts = [r["at_ns"] for r in forgotten[: ctx.clients]]
    ends = [r["at_ns"] for r in marked[: ctx.clients]]
    return _row(
        ctx,
        mode,
        env,
        nodes,
        window,
        moved,
        finished,
        replies[: ctx.clients],
        replies[ctx.clients],
        counted_s=(max(ends) - min(starts)) / 1e9,
        contended=contended,
        setup={
            "open_s": round(open_s, 2),
            "without_snapshot": sum(r["without_snapshot"] for r in snapshots),
            "join_s": round(max(r["seconds"] for r in held), 2),
            "holding_joins": sum(r["holding"] for r in held[: ctx.clients]),
        },
    )


class _Contention:
    """What else held the machine's cores over a window: every core's busy time (/proc/stat:
    user, nice, system, irq, softirq), the hypervisor's steal, and how long each node was
    runnable but waiting for a core (/proc/<pid>/task/*/schedstat, second field). On a machine
    shared with other work, a slow figure with a long wait is the machine's, not the node's."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._t0 = 0.0
        self._start: tuple[float, float, dict[str, float]] = (0.0, 0.0, {})

    @staticmethod
    def _read(pids: dict[str, int]) -> tuple[float, float, dict[str, float]]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
        steal = fields[7] if len(fields) > 7 else 0
        waits: dict[str, float] = {}
        for name, pid in pids.items():
            total = 0
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError, IndexError, ValueError):
                        total += int((task / "schedstat").read_text().split()[1])
            waits[name] = total / 1e9
        return busy / _CLK_TCK, steal / _CLK_TCK, waits

    def start(self) -> _Contention:
        self._t0 = time.perf_counter()
        self._start = self._read(self._pids)
        return self

    def stop(self) -> dict[str, Any]:
        busy, steal, waits = self._read(self._pids)
        wall = time.perf_counter() - self._t0
        busy0, steal0, waits0 = self._start
        return {
            "machine_busy_cores": round((busy - busy0) / wall, 3),
            "steal_cores": round((steal - steal0) / wall, 3),
            "node_wait_cores": [round((waits[n] - waits0[n]) / wall, 3) for n in self._pids],
        }


def _pids(ctx: Context, nodes: list[Endpoint]) -> dict[str, int | None]:
    pids: dict[str, int | None] = {f"node-{i}": n.pid for i, n in enumerate(nodes)}
    pids["redis"] = ctx.redis_pid
    pids.update(ctx.client_pids())
    return pids


def _row(
    ctx: Context,
    mode: str,
    env: dict[str, str],
    nodes: list[Endpoint],
    window: CpuWindow,
    moved: dict[str, Any],
    finished: dict[str, Any],
    watchers: list[dict[str, Any]],
    members: dict[str, Any],
    *,
    counted_s: float,
    contended: dict[str, Any],
    setup: dict[str, Any],
) -> dict[str, Any]:
    """What one run measured, in the order of the table's columns."""
    p = ctx.profile.bigroom

    def total(key: str, replies: list[dict[str, Any]] = watchers) -> int:
        return sum(r[key] for r in replies)

    started, ended = moved["started_ns"], moved["started_ns"] + round(moved["seconds"] * 1e9)
    sent = sum(1 for times in finished["sent"].values() for t in times if started <= t < ended)
    stale: array.array[int] = array.array("q")
    for r in watchers:
        stale.extend(r["staleness_ns"])
    closes: Counter[int | None] = Counter()
    for r in watchers:
        closes.update(r["close_codes"])
    node_cores = [report.cores(window.cpu.get(f"node-{i}"), window.wall) for i in range(len(nodes))]
    clients_cpu = sum(v for k, v in window.cpu.items() if k.startswith("client-"))
    expected_pairs = p.watchers * len(finished["expected"])
    return {
        "mode": mode,
        "env": env,
        "watchers": p.watchers,
        "members": p.members,
        "nodes": len(nodes),
        "window_s": round(window.wall, 2),
        "heartbeats": sent,
        "moves_per_s": round(sent / moved["seconds"], 1),
        "frames_per_watcher_per_s": round(total("frames") / p.watchers / counted_s, 1),
        "bytes_per_watcher_per_s": round(total("bytes") / p.watchers / counted_s),
        "batch_frames_share": round(total("batches") / total("frames"), 3)
        if total("frames")
        else None,
        "max_frames_per_watcher_per_s": round(max(r["max_frames"] for r in watchers) / counted_s),
        "node_cores": node_cores,
        "redis_cores": report.cores(window.cpu.get("redis"), window.wall),
        "clients_cores": round(clients_cpu / window.wall, 3),
        # Every process of the machine, ours included; the nodes' time waiting for a core.
        **contended,
        "staleness_ms": report.percentiles_ms(stale),
        "staleness_samples": len(stale),
        "unheld": total("unheld"),
        "sampled": total("sampled"),
        "gaps": total("gaps") + members["gaps"],
        "sockets_with_gaps": total("sockets_with_gaps") + members["sockets_with_gaps"],
        "events_before_snapshot": total("early") + members["early"],
        "disordered_batches": total("disordered") + members["disordered"],
        "resyncs": total("resyncs") + members["resyncs"],
        "final_pairs_reached": total("pairs_reached"),
        "final_pairs_expected": expected_pairs,
        "watchers_holding_all": total("holding_all"),
        "left_still_held": total("left_still_held"),
        "watchers_open": total("open"),
        "watchers_closed": {str(k): v for k, v in sorted(closes.items(), key=str)},
        "members_closed": {str(k): v for k, v in members["close_codes"].items()},
        "members_unknown": finished["unknown"],
        "settle_s": round(max(r["settle_s"] for r in watchers), 2),
        "churn": {
            "joined": finished["joined"],
            "left": finished["left_count"],
            "join_failures": finished["join_failures"],
            "delete_statuses": finished["delete_statuses"],
            "pending": finished["pending_churn"],
        },
        "heartbeat_errors": sum(finished["heartbeat_errors"].values()),
        "heartbeat_error_codes": finished["heartbeat_errors"],
        # Present members whose stored cursor is not the last one sent (its heartbeat failed).
        "stored_behind_sent": finished["stored_behind"],
        "mover_worst_lag_ms": round(finished["worst_lag_ms"], 1),
        "frames_parsed": total("parsed"),
        "setup": setup,
    }


async def _fill(url: str, prefix: str, study: str, members: int) -> None:
    """`members` sessions in `study`, written as REST heartbeats are (the store's own call)."""
    client = aioredis.Redis.from_url(url)
    store = RedisStore(client, Keys(prefix), THRESHOLDS)
    try:
        now = int(time.time() * 1000)
        for start in range(0, members, 500):
            await asyncio.gather(
                *(
                    store.heartbeat(
                        f"bench-bc{i}",
                        study,
                        CursorUpdate("ch1", f"main.{i % 9999 + 1}", True, True),
                        now,
                    )
                    for i in range(start, min(members, start + 500))
                )
            )
    finally:
        await store.close()
        await client.aclose()


def _connect_cost(ctx: Context, nodes: list[Endpoint], prefix: str, members: int) -> dict[str, Any]:
    study = f"bench-bigroom-c{members}-{secrets.token_hex(4)}"
    asyncio.run(_fill(ctx.redis_url, prefix, study, members))
    node = nodes[0]
    reply: dict[str, Any] = ctx.pool.call(
        0,
        "bigroom",
        TIMEOUT,
        op="connect_cost",
        host=node.host,
        port=node.port,
        study=study,
        user="bench-bc-watcher",
        secret=ctx.secret,
        within=30.0,
    )
    reply["first_frames_bytes"] = reply["connected_bytes"] + reply["snapshot_bytes"]
    return {"members": members, **reply}


async def _stored_cursors(
    url: str, prefix: str, study: str, users: list[str]
) -> dict[str, int | None]:
    """Each user's stored cursor n in `study` (None: no session)."""
    client = aioredis.Redis.from_url(url)
    keys = Keys(prefix).study(study)
    try:
        pipe = client.pipeline(transaction=False)
        for user in users:
            pipe.hget(keys.session(user), "move_path")
        paths = await pipe.execute()
    finally:
        await client.aclose()
    return {
        user: None if path is None else move_number(path.decode())
        for user, path in zip(users, paths, strict=True)
    }


async def _delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        cursor = 0
        while True:
            cursor, found = await client.scan(cursor, match=f"{prefix}:*", count=10_000)
            if found:
                await client.unlink(*found)
            if cursor == 0:
                return
    finally:
        await client.aclose()


def _summarize(
    ctx: Context, rows: list[dict[str, Any]], connect: list[dict[str, Any]]
) -> dict[str, Any]:
    ctx.emit(_table(rows))
    if connect:
        ctx.emit("\n" + _connect_table(connect))
    by = {r["mode"]: r for r in rows}
    if "on" in by and "off" in by:
        ctx.emit("\n" + _breaks(by["on"], by["off"]))
    for r in rows:
        del r["staleness_ms"]["p90"], r["staleness_ms"]["p999"]
    return {
        "config": asdict(ctx.profile.bigroom),
        "rows": rows,
        "connect": connect,
        "targets": _targets(rows),
    }


def _cores(row: dict[str, Any]) -> str:
    return " / ".join(report.fmt(c) for c in row["node_cores"])


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{n} x {code}" for code, n in sorted(codes.items())) if codes else "0"


def _closed(row: dict[str, Any]) -> str:
    return _codes(row["watchers_closed"])


def _reached(row: dict[str, Any]) -> str:
    reached, expected = row["final_pairs_reached"], row["final_pairs_expected"]
    if expected and reached == expected and not row["left_still_held"]:
        return "all"
    text = f"{reached:,} of {expected:,}"
    if row["left_still_held"]:
        text += f", {row['left_still_held']:,} left held"
    return text


def _table(rows: list[dict[str, Any]]) -> str:
    columns = [
        "batching",
        "moves/s",
        "frames/s/watcher",
        "B/s/watcher",
        "node CPU",
        "stale p50 ms",
        "p99 ms",
        "max ms",
        "unheld",
        "seq gaps",
        "resyncs",
        "final cursors",
        "closed",
        "settle s",
        "redis CPU",
        "clients CPU",
        "node wait",
        "machine busy",
    ]
    table_rows = [
        [
            r["mode"],
            r["moves_per_s"],
            r["frames_per_watcher_per_s"],
            r["bytes_per_watcher_per_s"],
            _cores(r),
            r["staleness_ms"]["p50"],
            r["staleness_ms"]["p99"],
            r["staleness_ms"]["max"],
            r["unheld"],
            r["gaps"],
            r["resyncs"],
            _reached(r),
            _closed(r),
            r["settle_s"],
            r["redis_cores"],
            r["clients_cores"],
            " / ".join(report.fmt(w) for w in r["node_wait_cores"]) or "-",
            r["machine_busy_cores"],
        ]
        for r in rows
    ]
    return "\n".join(
        [
            report.table("Big room", columns, table_rows),
            "node CPU: cores, each node; B: payload bytes; stale: from a heartbeat's sending to a "
            "sampled watcher holding it or a later move; unheld: heartbeats a sampled watcher "
            "never held; resyncs: snapshots after the first (the node lost its pub/sub link); "
            "final cursors: (watcher, member) pairs holding the member's last move; settle: "
            "seconds after the last move until they did; closed: watchers the node closed "
            "(count x code); node wait: cores' worth of time each node was ready to run but "
            "waited for a core; machine busy: cores in use by every process of the machine "
            "(ours included) over the window",
        ]
    )


def _connect_table(rows: list[dict[str, Any]]) -> str:
    columns = ["members", "first frames B", "connected B", "snapshot B", "users listed", "total"]
    return report.table(
        "Connect cost (connected + presence.snapshot, payload bytes)",
        columns,
        [
            [
                r["members"],
                r["first_frames_bytes"],
                r["connected_bytes"],
                r["snapshot_bytes"],
                r["users_listed"],
                r["total"],
            ]
            for r in rows
        ],
    )


def _breaks(on: dict[str, Any], off: dict[str, Any]) -> str:
    """What batching off changed, as measured (never asserted)."""

    def most(row: dict[str, Any]) -> str:
        return report.fmt(max((c for c in row["node_cores"] if c is not None), default=None))

    closed = sum(off["watchers_closed"].values())

    def both(key: str, unit: str = "") -> str:
        return f"{report.fmt(off[key])}{unit} (with batching: {report.fmt(on[key])}{unit})"

    stale_off, stale_on = off["staleness_ms"], on["staleness_ms"]
    lines = [
        f"busiest node {most(off)} cores (with batching: {most(on)})",
        f"{both('frames_per_watcher_per_s')} frames/s and {both('bytes_per_watcher_per_s')} "
        "payload bytes/s per watcher",
        f"staleness p50 {report.fmt(stale_off['p50'])} ms, p99 {report.fmt(stale_off['p99'])} "
        f"ms (with batching: {report.fmt(stale_on['p50'])} ms, {report.fmt(stale_on['p99'])} ms)",
        f"{both('unheld')} heartbeats never held by a sampled watcher",
        f"{closed:,} of {off['watchers']:,} watchers closed by the node ({_closed(off)}); "
        f"members' sockets closed by it: {_codes(off['members_closed'])} (with batching: "
        f"{_codes(on['members_closed'])}); {both('resyncs')} resync snapshots",
        f"{both('heartbeat_errors')} heartbeats answered with an error; {both('moves_per_s')} "
        "moves/s sent",
        f"final cursors {_reached(off)} (with batching: {_reached(on)}), settled after "
        f"{both('settle_s', ' s')}",
    ]
    return "\n".join(["Without batching (measured, not asserted):", *(f"- {x}" for x in lines)])


def _contention(row: dict[str, Any]) -> str:
    """How contended the run was, for a target's note: a node that waited for a core got less
    than it asked for, so its CPU and latency figures are the machine's as much as its own."""
    waits = " / ".join(report.fmt(w) for w in row["node_wait_cores"]) or "-"
    return (
        f"nodes waited for a core {waits}, machine busy "
        f"{report.fmt(row['machine_busy_cores'])} cores"
    )


def _targets(rows: list[dict[str, Any]]) -> list[report.Target]:
    by = {r["mode"]: r for r in rows}
    judged = by.get("on") or by.get(EXTERNAL)
    if judged is None:
        return []
    where = (
        "batching on" if judged["mode"] == "on" else "external nodes, their own batching settings"
    )
    cores = [c for c in judged["node_cores"] if c is not None]
    missing = judged["final_pairs_expected"] - judged["final_pairs_reached"]
    missing += judged["left_still_held"]
    busiest = max(cores) if cores else None
    cpu = report.check(
        "big room node CPU",
        "< 1 core per node",
        busiest,
        "cores",
        CORE_LIMIT,
        False,
        f"busiest node; {where}; each: {_cores(judged)}; {_contention(judged)}",
    )
    if busiest is not None:  # under one core: strictly below the limit
        cpu = replace(cpu, met=busiest < CORE_LIMIT)
    return [
        cpu,
        report.check(
            "big room p99 cursor staleness",
            f"<= {STALENESS_LIMIT_MS:g} ms",
            judged["staleness_ms"]["p99"],
            "ms",
            STALENESS_LIMIT_MS,
            False,
            f"{where}; {judged['staleness_samples']:,} heartbeats x sampled watchers; "
            + _contention(judged),
        ),
        report.check(
            "big room seq gaps",
            "0",
            sum(r["gaps"] for r in rows),
            "frames",
            0,
            False,
            f"every socket of {' and '.join(r['mode'] for r in rows)}",
        ),
        report.check(
            "big room final cursors at every watcher",
            "all",
            missing,
            "pairs missing",
            0,
            False,
            f"{where}; {_reached(judged)}",
        ),
    ]
