"""The fan-out peer: python-socketio, what a Python team would deploy instead of presence-svc.

One `socketio.AsyncServer` per process under uvicorn, its rooms shared between processes by an
`AsyncRedisManager` on the nodes' Redis (a channel of its own per run). A client connects with
Engine.IO v4 over a WebSocket (`/socket.io/?EIO=4&transport=websocket`), connects to the `/`
namespace and sends a `join` event naming its study; the server puts it in that room and acks.
Events come from another process the way python-socketio documents it: a write-only
`AsyncRedisManager` on the same channel emitting to the room (drivers.py). Each server decodes
the manager's JSON message once, encodes the Socket.IO packet once, and queues it to every
socket of the room (python-socketio's own path: a task per recipient, Engine.IO's writer task
per socket). Only `/healthz` is added, for the harness to wait on.

    python -m presence_svc.bench.peer --port 9100 --redis-url redis://127.0.0.1:6379/0 --channel C

uvicorn runs with the bare baseline's settings (baseline.py), so all three fan-out columns send
through the same WebSocket implementation; python-socketio itself keeps its defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

JOIN_EVENT = "join"
JOINED = "joined"  # the join event's ack: the socket is in its room from then on


def build_app(redis_url: str, channel: str) -> Any:
    """The ASGI app: python-socketio on `/socket.io/`, `/healthz` beside it."""
    import socketio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    manager = socketio.AsyncRedisManager(redis_url, channel=channel)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager)

    @sio.on(JOIN_EVENT)  # type: ignore[untyped-decorator]
    async def join(sid: str, room: str) -> str:
        await sio.enter_room(sid, room)
        return JOINED

    async def startup() -> None:
        # The server starts its Redis listener at the first connection; started here instead,
        # and waited for, so that no event published after /healthz answers can be missed.
        sio.manager_initialized = True
        manager.initialize()
        async with asyncio.timeout(10):
            # Polling: the listener is python-socketio's own task, which signals nothing.
            while manager.pubsub is None or not manager.pubsub.subscribed:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    other = Starlette(routes=[Route("/healthz", healthz)])
    return socketio.ASGIApp(sio, other_asgi_app=other, on_startup=startup)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--channel", required=True, help="the AsyncRedisManager channel")
    args = parser.parse_args(argv)
    uvicorn.run(
        build_app(args.redis_url, args.channel),
        host=args.host,
        port=args.port,
        log_level="warning",
        # On: the startup above runs before uvicorn accepts connections.
        lifespan="on",
        ws="websockets-sansio",  # what baseline.py's "auto" picks; named, as the nodes name it
        ws_per_message_deflate=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
