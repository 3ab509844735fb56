"""Sockets the client workers hold for a scenario, by group: opened from a layout (one list of
[host, port, study index, study id, user id] per worker), closed a group at a time."""

from __future__ import annotations

from typing import Any

from presence_svc.bench.harness import Context

Layout = list[list[list[Any]]]


def open_group(
    ctx: Context,
    group: str,
    kind: str,
    layout: Layout,
    *,
    timeout: float = 120,
    concurrency: int = 100,
    connect_timeout: float = 30,
) -> list[dict[str, Any]]:
    """Open `layout` as `group` ("node" or "baseline" sockets); each worker's reply (opened,
    failed, errors)."""
    return ctx.pool.call_all(
        "open",
        timeout,
        [
            {
                "group": group,
                "kind": kind,
                "specs": part,
                "secret": ctx.secret,
                "concurrency": concurrency,
                "connect_timeout": connect_timeout,
            }
            for part in layout
        ],
    )


def open_all(ctx: Context, group: str, kind: str, layout: Layout) -> None:
    """open_group, for a scenario whose figures mean nothing unless every socket opened."""
    replies = open_group(ctx, group, kind, layout)
    failed = sum(r["failed"] for r in replies)
    if failed:
        raise RuntimeError(f"{failed} {kind} sockets failed to open: {replies[0]['errors']}")


def close_groups(ctx: Context, *groups: str, timeout: float = 60) -> None:
    for group in groups:
        ctx.pool.call_all("close", timeout, [{"group": group}] * ctx.clients)
