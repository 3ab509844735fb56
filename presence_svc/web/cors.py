"""CORS for REST calls from pages of other origins: Starlette's `CORSMiddleware`, with a short
way through for requests that carry no `Origin`.

Most REST calls come from other backends, which send no `Origin`. For those, all that
CORSMiddleware does is add `Vary: Origin` to the answer, through two header objects built per
request and a partial; here that is one scan of the request's headers and, unless the answer
already varies on something, one list append. Requests with an Origin (pages, their
preflights) go to CORSMiddleware itself, with the same options; other scopes (WebSockets)
pass through untouched, as CORSMiddleware passes them. tests/web/test_cors.py holds both ways
to the same answers.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Cors:
    """CORSMiddleware(app, **options), the same answers, cheaper without an Origin."""

    def __init__(self, app: ASGIApp, /, **options: Any) -> None:
        self.app = app
        self._cors = CORSMiddleware(app, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # WebSockets, lifespan: untouched, as CORSMiddleware does
            await self.app(scope, receive, send)
            return
        if _has_origin(scope["headers"]):
            await self._cors(scope, receive, send)
            return

        async def send_varying(message: Message) -> None:
            if message["type"] == "http.response.start":
                vary_on_origin(message)
            await send(message)

        await self.app(scope, receive, send_varying)


def _has_origin(headers: list[tuple[bytes, bytes]]) -> bool:
    # As Headers.get("origin"): ASGI servers lower-case header names.
    return any(name == b"origin" for name, _ in headers)


def vary_on_origin(message: Message) -> None:
    """What CORSMiddleware does to a response start when the request has no Origin: every
    `Vary` header merged into one that ends with `Origin` (in place, as it does)."""
    headers = message.get("headers", [])
    for name, _ in headers:
        if name == b"vary":
            varying = MutableHeaders(scope=message)
            varying["Vary"] = ", ".join([*varying.getlist("Vary"), "Origin"])
            return
    message["headers"] = [*headers, (b"vary", b"Origin")]
