"""The browser client's files (presence_svc/web/client/), served by every node.

Two paths for each file:

- `/client/<name>`: always the node's own version; `Cache-Control: no-cache` with an ETag, so a
  browser revalidates each load (a 304 costs a few bytes) and never mixes the files of two
  versions.
- `/client/<version>/<name>`: the same bytes, `immutable` for a year. Pages that pin a version
  load nothing twice; a node of another version answers 404 for it.

Every answer carries `Access-Control-Allow-Origin: *`: the files are public code, and a module
script imported by a page of another origin is fetched in CORS mode.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from presence_svc import __version__

VERSION_MARK = "__PRESENCE_VERSION__"
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".ts": "application/typescript; charset=utf-8",
}
REVALIDATE = "no-cache"
IMMUTABLE = "public, max-age=31536000, immutable"
NAMES = ("presence.js", "presence-state.js", "presence.d.ts")


@dataclass(frozen=True, slots=True)
class ClientFile:
    body: bytes
    media_type: str
    etag: str


def _load(name: str) -> ClientFile:
    text = resources.files("presence_svc.web").joinpath("client", name).read_text("utf-8")
    body = text.replace(VERSION_MARK, __version__).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    return ClientFile(body, _TYPES["." + name.rsplit(".", 1)[1]], etag)


FILES = {name: _load(name) for name in NAMES}


def _answer(request: Request, file: ClientFile, cache_control: str) -> Response:
    headers = {
        "ETag": file.etag,
        "Cache-Control": cache_control,
        "Access-Control-Allow-Origin": "*",
        "X-Content-Type-Options": "nosniff",
    }
    if file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(file.body, media_type=file.media_type, headers=headers)


def _file(name: str) -> ClientFile:
    file = FILES.get(name)
    if file is None:
        raise HTTPException(404, f"no client file {name!r}; there are {', '.join(NAMES)}")
    return file


async def client_file(request: Request) -> Response:
    return _answer(request, _file(request.path_params["name"]), REVALIDATE)


async def versioned_client_file(request: Request) -> Response:
    version = request.path_params["version"]
    if version != __version__:
        raise HTTPException(404, f"this node serves client version {__version__}, not {version}")
    return _answer(request, _file(request.path_params["name"]), IMMUTABLE)


ROUTES = [
    Route("/client/{name}", client_file, methods=["GET", "HEAD"]),
    Route("/client/{version}/{name}", versioned_client_file, methods=["GET", "HEAD"]),
]
