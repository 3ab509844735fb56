"""The operators' live dashboard: one page and its script and style, served by the node.

Off unless PRESENCE_DASHBOARD=true (404 otherwise). The page itself holds no data: it reads
`GET /stats` and `GET /presence/{study_id}/stats` with the operator's token, and watches a
study through the browser client (`/client/presence.js`). The token comes from the URL's
fragment (`/dashboard#token=<JWT>`, which browsers never send to the server) or a paste field.
Everything the page loads comes from the node, and its Content-Security-Policy says so.
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
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    # Same-origin only: scripts, styles, fetches and the WebSocket (CSP 3 `'self'` covers ws:).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return (resources.files("presence_svc.web") / "dashboard" / name).read_bytes()


def _serve(request: Request, name: str) -> Response:
    node: Node = request.app.state.node
    if not node.settings.dashboard or name not in FILES:
        raise HTTPException(404, "Not Found")
    return Response(_read(name), media_type=FILES[name], headers=SECURITY_HEADERS)


async def page(request: Request) -> Response:
    return _serve(request, "index.html")


async def asset(request: Request) -> Response:
    return _serve(request, request.path_params["name"])


ROUTES = [
    Route("/dashboard", page, methods=["GET"]),
    Route("/dashboard/{name}", asset, methods=["GET"]),
]
