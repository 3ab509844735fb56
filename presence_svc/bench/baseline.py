"""The fan-out ceiling: a bare Starlette/uvicorn server that broadcasts text to its sockets.

No Redis, no queues, no auth: `/viewer?study_id=S` sockets register under S; every text frame
`S\\n<payload>` on `/publish` is sent as `<payload>` to each of S's sockets in turn. It runs on
the same uvicorn settings as a node (`presence-svc serve`), so the difference in CPU per
delivery between the two is what the service adds on top of Starlette and uvicorn.

It also answers `POST /presence/heartbeat` as the REST ceiling: the request body parsed as
JSON (Starlette's `Request.json`) and a JSON object of a session's size and shape sent back
(`JSONResponse`), with no token check, validation or Redis, so the same client and request
bytes measure what a node adds per REST heartbeat.

    python -m presence_svc.bench.baseline --port 9000
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

_viewers: dict[str, set[WebSocket]] = {}


async def viewer(websocket: WebSocket) -> None:
    study = websocket.query_params.get("study_id", "")
    await websocket.accept()
    # The same two opening messages as a node, so clients treat both servers alike.
    await websocket.send_text('{"type":"connected","data":{}}')
    await websocket.send_text('{"type":"presence.snapshot","data":{}}')
    peers = _viewers.setdefault(study, set())
    peers.add(websocket)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
    finally:
        peers.discard(websocket)
        if not peers:
            _viewers.pop(study, None)


async def publish(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        study, _, payload = (message.get("text") or "").partition("\n")
        for peer in tuple(_viewers.get(study, ())):
            with contextlib.suppress(Exception):  # a viewer that left mid-broadcast
                await peer.send_text(payload)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def heartbeat(request: Request) -> Response:
    body = await request.json()
    # A node's answer: the session, 8 fields, about 230 bytes.
    return JSONResponse(
        {
            "session_id": "0" * 32,
            "user_id": "bench-h0",
            "study_id": body["study_id"],
            "chapter_id": None,
            "move_path": None,
            "status": "active",
            "last_heartbeat": "2026-01-01T00:00:00.000Z",
            "joined_at": "2026-01-01T00:00:00.000Z",
        }
    )


app = Starlette(
    routes=[
        Route("/healthz", healthz),
        Route("/presence/heartbeat", heartbeat, methods=["POST"]),
        WebSocketRoute("/viewer", viewer),
        WebSocketRoute("/publish", publish),
    ]
)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # The same uvicorn settings as `presence-svc serve`.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="off",
        ws_per_message_deflate=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
