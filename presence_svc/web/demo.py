"""The demo page (`make demo`): a small chess study built on the browser client.

Off unless PRESENCE_DEMO=true (404 otherwise). The page holds no data and no secret: tokens
come from the URL's fragment (`/demo#token=<JWT>&study=<id>`, never sent to the server), and it
watches the study through `/client/presence.js` like any frontend would.
"""

from __future__ import annotations

import functools
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from presence_svc.node import Node

# name -> media type: the only files served (no path from the URL reaches the file system).
FILES = {
    "index.html": "text/html; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
}
HEADERS = {
    # The page talks to other nodes too (the client's failover list), hence connect-src.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "connect-src 'self' ws: wss: http: https:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return (resources.files("presence_svc.web") / "demo" / name).read_bytes()


def _serve(request: Request, name: str) -> Response:
    node: Node = request.app.state.node
    if not node.settings.demo or name not in FILES:
        raise HTTPException(404, "Not Found")
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


async def page(request: Request) -> Response:
    return _serve(request, "index.html")


async def asset(request: Request) -> Response:
    return _serve(request, request.path_params["name"])


ROUTES = [
    Route("/demo", page, methods=["GET", "HEAD"]),
    Route("/demo/{name}", asset, methods=["GET", "HEAD"]),
]
