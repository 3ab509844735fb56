"""The node's ASGI app: Starlette, except that presence sockets go straight to their endpoint.

An idle WebSocket is the bulk of a node's memory, and every layer Starlette puts between the
server and the endpoint stays suspended for the socket's whole life: a coroutine frame each for
ServerErrorMiddleware, the request-id and CORS middlewares, the REST shortcut,
ExceptionMiddleware (plus a WebSocket, the `wrapped_app` and `sender` closures and their frame)
and the router's three. For `WS /ws/presence` none of them does anything it needs: CORS and the
shortcut pass WebSockets through, and the route has no path parameters. The app's exception
handlers (ApiError, HTTPException, StoreUnavailable) are not applied to this socket: the
endpoint answers the failures it expects itself (ws.py: StoreUnavailable closes with 1011 or
answers `unavailable`), and anything else reaches uvicorn, which closes the socket with 1011 as
Starlette's handlers would have left it to. So that scope is
handed to the endpoint here, under this app's one frame (docs/performance.md, "Idle socket
memory"). `__call__` stays a coroutine function: uvicorn and Starlette's TestClient tell an ASGI 3
app by that.

The rest of `__call__` is Starlette's own, inlined: it relies on Starlette internals (what
`Starlette.__call__` does, `middleware_stack` built lazily by `build_middleware_stack`).
tests/web/test_internals.py fails if they change; checked against starlette 1.10.0
(pyproject.toml pins starlette below 2).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from presence_svc import requestid
from presence_svc.web.ws import presence_socket

WS_PATH = "/ws/presence"


class NodeApp(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self  # what endpoints read the node from, as Starlette sets it
        # With a root_path the router strips it before matching: left to the router.
        if scope["type"] == "websocket" and scope["path"] == WS_PATH and not scope.get("root_path"):
            requestid.enter_websocket()
            await presence_socket(scope, receive, send)
            return
        # Starlette's own __call__, inlined rather than awaited: no extra frame per request.
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        await self.middleware_stack(scope, receive, send)
