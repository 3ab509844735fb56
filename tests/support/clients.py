"""Real WebSocket and HTTP clients for tests against running nodes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect


class Watcher:
    """A WebSocket client of one study that records every message after the snapshot."""

    def __init__(self, ws: ClientConnection, connected: dict[str, Any], snapshot: dict[str, Any]):
        self.ws = ws
        self.connected = connected
        self.snapshot = snapshot
        self.messages: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, ws_base: str, study_id: str, token: str) -> Watcher:
        ws = await connect(
            f"{ws_base}/ws/presence?study_id={study_id}",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=10,
        )
        connected = json.loads(await asyncio.wait_for(ws.recv(), 10))
        snapshot = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert connected["type"] == "connected", connected
        assert snapshot["type"] == "presence.snapshot", snapshot
        return cls(ws, connected["data"], snapshot["data"])

    async def _read(self) -> None:
        async for text in self.ws:
            assert isinstance(text, str)
            self.raw.append(text)
            self.messages.append(json.loads(text))
            self._changed.set()

    def events(self, prefix: str = "presence.") -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"].startswith(prefix)]

    async def wait_until(
        self, done: Callable[[Watcher], bool], within: float = 10.0, what: str = ""
    ) -> None:
        deadline = time.monotonic() + within
        while not done(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                types = [(m["type"], m.get("data", {}).get("user_id")) for m in self.messages]
                raise AssertionError(f"timed out waiting for {what or done}; got {types}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


async def rest_heartbeat(
    client: httpx.AsyncClient, base: str, token: str, **body: Any
) -> dict[str, Any]:
    response = await client.post(
        f"{base}/presence/heartbeat", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result
