"""The memory floor: a raw ASGI WebSocket app on uvicorn with the node's protocol settings.

No Starlette, no middleware, no Redis: `/viewer` (any path) accepts, sends the same two opening
messages as a node and the bare baseline, and holds the socket until it closes; `/healthz`
answers `ok`. uvicorn runs it as `presence-svc serve` runs a node (the node's
`websockets-sansio` protocol class with its default limits, no compression, the default
maximum message size), so an idle socket here costs what uvicorn and websockets alone cost: the
floor under the node's per-socket figure (bench idle scenario).

    python -m presence_svc.bench.floor --port 9000
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from starlette.types import Receive, Scope, Send

from presence_svc.bench.runner import Child, Endpoint, _http_ok, _wait_until, free_port

_CONNECTED = '{"type":"connected","data":{}}'
_SNAPSHOT = '{"type":"presence.snapshot","data":{}}'


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})
        return
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": _CONNECTED})
    await send({"type": "websocket.send", "text": _SNAPSHOT})
    while (await receive())["type"] != "websocket.disconnect":
        pass


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from presence_svc.settings import Settings
    from presence_svc.web.protocol import protocol_class

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    defaults = Settings.model_construct()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="off",
        ws=protocol_class(defaults.ws_max_outgoing_buffer, lambda reason: None),
        ws_per_message_deflate=False,
        ws_max_size=defaults.ws_max_message_size,
    )
    return 0


def start(name: str, log_dir: Path) -> tuple[Child, Endpoint]:
    """This server on a free port, once it answers /healthz."""
    port = free_port()
    argv = [sys.executable, "-m", "presence_svc.bench.floor", "--port", str(port)]
    child = Child(name, argv, log_dir, {})
    _wait_until(lambda: _http_ok(f"http://127.0.0.1:{port}/healthz"), name, 30, child.proc)
    return child, Endpoint(name, "127.0.0.1", port, child.pid)


@contextlib.contextmanager
def running(log_dir: Path) -> Iterator[Endpoint]:
    child, endpoint = start(f"floor-{time.monotonic_ns()}", log_dir)
    try:
        yield endpoint
    finally:
        child.stop()


if __name__ == "__main__":
    sys.exit(main())
