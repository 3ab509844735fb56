"""The client half of Engine.IO v4 / Socket.IO v5 over a plain WebSocket, for the peer (peer.py).

No socket.io client library: the clients share the cores with the servers they measure, so
they stay the bare protocols of wsclient.py, plus the few packets a viewer needs. Each text
frame is one Engine.IO packet, its first character the packet type; a Socket.IO packet rides
in an Engine.IO `4` (message) packet, its own type second:

    server -> client   0{"sid":…,"pingInterval":…}  open: the Engine.IO session exists
    client -> server   40                           connect to the `/` namespace
    server -> client   40{"sid":…}                  connected
    client -> server   421["join","<study>"]        the `join` event, ack id 1
    server -> client   431["joined"]                its ack: the socket is in the room
    server -> client   42["<event>",{…}]            an event emitted to the room
    server -> client   2 / client -> server 3       Engine.IO ping / pong (every 25 s)
"""

from __future__ import annotations

import asyncio
import json

from presence_svc.bench.peer import JOIN_EVENT
from presence_svc.bench.wsclient import MessageHandler, WsClient, open_ws

PATH = "/socket.io/?EIO=4&transport=websocket"


class SocketIoViewer:
    """The message handler of one socket: answers the handshake and pings, hands events on.

    `joined` resolves once the server acked the join (the socket is in its room); it fails if
    the server refuses the namespace or closes the session first."""

    __slots__ = ("_join", "joined", "on_event")

    def __init__(self, room: str, on_event: MessageHandler) -> None:
        self.on_event = on_event
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._join = b"421" + json.dumps([JOIN_EVENT, room], separators=(",", ":")).encode()

    def __call__(self, client: WsClient, payload: bytes, now_ns: int) -> None:
        # Events first: they are all but every message once the socket is in its room.
        if payload.startswith(b"42"):
            self.on_event(client, payload, now_ns)
        elif payload == b"2":
            client.send_text(b"3")
        elif payload.startswith(b"0"):
            client.send_text(b"40")
        elif payload.startswith(b"40"):
            client.send_text(self._join)
        elif payload.startswith(b"431"):
            if not self.joined.done():
                self.joined.set_result(None)
        elif payload.startswith((b"44", b"41", b"1")) and not self.joined.done():
            self.joined.set_exception(ConnectionError(f"refused: {payload[:200]!r}"))


async def open_viewer(
    host: str, port: int, room: str, on_event: MessageHandler, within: float
) -> WsClient:
    """A socket in `room` on a python-socketio server, its events (`42[…]`) to `on_event`."""
    viewer = SocketIoViewer(room, on_event)
    # skip=0: the server's packets all go to the handler, the handshake's included.
    client = await open_ws(host, port, PATH, viewer, within, skip=0)
    try:
        await asyncio.wait(
            [viewer.joined, client.closed], timeout=within, return_when="FIRST_COMPLETED"
        )
        if not viewer.joined.done():
            raise ConnectionError(
                f"no join ack (closed: {client.closed.done()}, code {client.close_code})"
            )
        viewer.joined.result()
    except BaseException:
        client.close()
        raise
    return client
