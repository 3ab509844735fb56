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
from websockets.exceptions import ConnectionClosed


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
    async def open(cls, ws_base: str, study_id: str, token: str, **options: Any) -> Watcher:
        ws = await connect(
            f"{ws_base}/ws/presence?study_id={study_id}",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=10,
            **options,
        )
        connected = json.loads(await asyncio.wait_for(ws.recv(), 10))
        snapshot = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert connected["type"] == "connected", connected
        assert snapshot["type"] == "presence.snapshot", snapshot
        return cls(ws, connected["data"], snapshot["data"])

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                assert isinstance(text, str)
                self.raw.append(text)
                self.messages.append(json.loads(text))
                self._changed.set()
        except ConnectionClosed:
            pass  # any close code; close_code tells which
        finally:
            self._changed.set()  # let waiters look at close_code

    @property
    def closed(self) -> bool:
        return self._reader.done()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def events(self, prefix: str = "presence.") -> list[dict[str, Any]]:
        """Events (not snapshots) whose type starts with `prefix`."""
        return [
            m
            for m in self.messages
            if m["type"].startswith(prefix) and m["type"] != "presence.snapshot"
        ]

    def snapshots(self) -> list[dict[str, Any]]:
        """Snapshots sent after the first one (resyncs), as their data."""
        return [m["data"] for m in self.messages if m["type"] == "presence.snapshot"]

    async def wait_until(
        self, done: Callable[[Watcher], bool], within: float = 10.0, what: str = ""
    ) -> None:
        deadline = time.monotonic() + within
        while not done(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                types = [(m["type"], m.get("data", {}).get("user_id")) for m in self.messages]
                shown = f"{types[:20]} ... {types[-5:]}" if len(types) > 25 else f"{types}"
                raise AssertionError(
                    f"timed out waiting for {what or done}; got {len(types)}: {shown}"
                )
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
