"""Static pages served from package data: a folder of presence_svc/web/ with a fixed list of
files, behind a setting (the dashboard, the demo page).

`GET /<folder>` is the folder's `index.html` and `GET /<folder>/<name>` one of its files; any
other name, or every path while the setting is off, answers 404. Only the listed names are read,
so no path from the URL reaches the file system.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from presence_svc.node import Node
from presence_svc.settings import Settings


def page_routes(
    folder: str,
    files: Mapping[str, str],
    headers: Mapping[str, str],
    enabled: Callable[[Settings], bool],
) -> list[Route]:
    """The routes serving `files` (name -> media type) of presence_svc/web/<folder>/ with
    `headers` on every answer, while `enabled(settings)` holds."""

    # Read once per file, on first use: the package data does not change while the node runs.
    @functools.cache
    def read(name: str) -> bytes:
        return (resources.files("presence_svc.web") / folder / name).read_bytes()

    def serve(request: Request, name: str) -> Response:
        node: Node = request.app.state.node
        # The node's settings, not the module's import: each app (and test) chooses its own.
        if not enabled(node.settings) or name not in files:
            raise HTTPException(404, "Not Found")
        return Response(read(name), media_type=files[name], headers=dict(headers))

    async def page(request: Request) -> Response:
        return serve(request, "index.html")

    async def asset(request: Request) -> Response:
        return serve(request, request.path_params["name"])

    # Starlette answers HEAD on every GET route (demo.py listed HEAD too; same routes).
    return [
        Route(f"/{folder}", page, methods=["GET"]),
        Route(f"/{folder}/{{name}}", asset, methods=["GET"]),
    ]
