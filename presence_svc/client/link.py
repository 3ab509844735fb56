"""One socket of a client, from its handshake to its close.

It reads the server's messages into the study state, heartbeats from the client's intent,
refreshes the token before it expires, and ends with how the socket ended: the reconnect
decision is the client's (client.py, policy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from presence_svc.client.feed import Feed, PresenceError, PresenceEvent
from presence_svc.client.intent import Intent
from presence_svc.client.signals import received
from presence_svc.client.state import (
    BATCH,
    PRESENCE_PREFIX,
    SNAPSHOT,
    Change,
    MalformedMessage,
    StudyState,
    Verdict,
)
from presence_svc.client.tokens import Tokens, refresh_delay, token_expiry

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
REFRESH_REPLY_TIMEOUT = 10.0
REFRESH_RETRY = 1.0  # seconds before trying again after a refused or failed refresh


@dataclass(frozen=True, slots=True)
class LinkEnd:
    """How a socket ended: its close code (None if it never opened), and whether the client
    closed it itself to resync after a seq gap."""

    code: int | None
    reason: str = ""
    resync: bool = False


@dataclass(frozen=True, slots=True)
class Timing:
    heartbeat_interval: float
    cursor_throttle: float


class Link:
    """An open socket of the client."""

    def __init__(
        self,
        ws: ClientConnection,
        state: StudyState,
        feed: Feed,
        intent: Intent,
        tokens: Tokens,
        timing: Timing,
        on_open: Callable[[dict[str, Any]], None],
    ) -> None:
        self._ws = ws
        self._state = state
        self._feed = feed
        self._intent = intent
        self._tokens = tokens
        self._timing = timing
        self._on_open = on_open
        self._connected: dict[str, Any] = {}
        self._opened = False
        self._refresh_reply: asyncio.Future[str] | None = None
        self._pongs: list[asyncio.Future[None]] = []

    async def run(self) -> LinkEnd:
        """Serve the socket until it closes; how it ended."""
        helpers = [
            asyncio.create_task(self._guarded(self._heartbeats())),
            asyncio.create_task(self._guarded(self._refreshes())),
        ]
        try:
            return await self._read()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            for pong in self._pongs:
                pong.cancel()

    async def send(self, text: str) -> bool:
        """Send one message now; False if the socket has closed."""
        try:
            await self._ws.send(text)
        except ConnectionClosed:
            return False
        return True

    async def barrier(self, within: float) -> None:
        """Return once the node has read everything sent before (a ping's pong came back)."""
        pong = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        with contextlib.suppress(ConnectionClosed, TimeoutError, asyncio.CancelledError):
            await self._ws.send('{"type":"ping"}')
            await asyncio.wait_for(pong, within)

    async def _read(self) -> LinkEnd:
        ws = self._ws
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                if isinstance(raw, bytes):
                    self._error("the server sent a binary frame")
                    continue
                if self._handle(raw):
                    await ws.close(CLOSE_NORMAL, "resync")
                    return LinkEnd(CLOSE_NORMAL, "seq gap", resync=True)
        return LinkEnd(ws.close_code, ws.close_reason or "")

    def _handle(self, raw: str) -> bool:
        """Act on one message; True when the state needs a fresh snapshot."""
        try:
            message = json.loads(raw)
            kind = message["type"]
            data = message.get("data") or {}
            if not isinstance(kind, str) or not isinstance(data, dict):
                raise MalformedMessage("no string type or object data")
        except (ValueError, KeyError, TypeError) as exc:
            self._error(f"a server message not understood: {exc}")
            return False
        if kind == SNAPSHOT:
            return self._snapshot(data)
        if kind == BATCH:
            return self._batch(data)
        if kind.startswith(PRESENCE_PREFIX):
            return self._event(kind, data)
        self._reply(kind, data, message)
        return False

    def _snapshot(self, data: dict[str, Any]) -> bool:
        try:
            changes, gap = self._state.apply_snapshot(data)
        except MalformedMessage as exc:
            self._error(f"a malformed snapshot: {exc}")
            return True
        self._report(changes, always=True)
        self._feed.emit([PresenceEvent("snapshot", seq=self._state.seq)])
        if not self._opened:
            self._opened = True
            self._on_open(self._connected)
        return gap

    def _event(self, kind: str, data: dict[str, Any]) -> bool:
        counts = dict(self._state.counts)
        try:
            verdict, changes = self._state.apply_event(kind, data)
        except MalformedMessage as exc:
            self._error(f"a malformed {kind}: {exc}")
            return True
        if verdict is Verdict.GAP:
            log.info("seq gap in study %s after %s: resyncing", data.get("study_id"), data)
            return True
        self._report(changes, always=counts != self._state.counts)
        return False

    def _batch(self, data: dict[str, Any]) -> bool:
        """Apply a presence.batch; its messages are reported as if they had come one by one,
        and listeners of changes() are woken once for the whole batch."""
        counts = dict(self._state.counts)
        try:
            verdict, steps = self._state.apply_batch(data)
        except MalformedMessage as exc:
            self._error(f"a malformed presence.batch: {exc}")
            return True
        changes = [change for step in steps if step is not None for change in step]
        if changes or counts != self._state.counts:
            self._feed.changed()
        for message, step in zip(data["events"], steps, strict=True):
            if step is None:
                kind, body = message["type"], message.get("data")
                self._message(kind, body if isinstance(body, dict) else {}, message)
            else:
                self._feed.emit(PresenceEvent.of(change) for change in step)
        if verdict is Verdict.GAP:
            log.info("seq gap before a batch from first_seq %s: resyncing", data.get("first_seq"))
            return True
        return False

    def _reply(self, kind: str, data: dict[str, Any], message: dict[str, Any]) -> None:
        if kind == "connected":
            self._connected = data
        elif kind == "pong":
            if self._pongs:
                pong = self._pongs.pop(0)
                if not pong.done():
                    pong.set_result(None)
        elif kind == "refreshed":
            if self._refresh_reply is not None and not self._refresh_reply.done():
                self._refresh_reply.set_result(str(data.get("expires_at", "")))
        elif kind == "error":
            code = str(data.get("code", ""))
            text = f"{code}: {data.get('message', '')}"
            reply = self._refresh_reply
            if code == "invalid_token" and reply is not None and not reply.done():
                reply.set_exception(PresenceError(f"refresh refused: {text}"))
            self._error(text)
        else:
            self._message(kind, data, message)

    def _message(self, kind: str, data: dict[str, Any], message: dict[str, Any]) -> None:
        """A message without a seq: a signal, or an event another backend published."""
        signal = received(kind, data, message)
        self._feed.emit([signal or PresenceEvent("message", message=message)])

    def _report(self, changes: list[Change], always: bool = False) -> None:
        if changes or always:
            self._feed.changed()
        self._feed.emit(PresenceEvent.of(change) for change in changes)

    def _error(self, text: str) -> None:
        self._feed.emit([PresenceEvent("error", error=PresenceError(text))])

    async def _guarded(self, work: Any) -> None:
        with contextlib.suppress(ConnectionClosed):  # the reader sees the close, reports it
            await work

    async def _heartbeats(self) -> None:
        intent, timing = self._intent, self._timing
        intent.wake.clear()
        if intent.joined:
            # At once on every socket, with the last cursor: a reconnect within the leave
            # grace then causes no leave/join for those watching.
            await self._ws.send(intent.heartbeat(full=True))
        sent = time.monotonic()
        while True:
            beating = intent.joined and intent.active
            due = sent + timing.heartbeat_interval - time.monotonic() if beating else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(intent.wake.wait(), due)
            if intent.wake.is_set():
                # Latest wins within the throttle window: cursor moves coalesce.
                await asyncio.sleep(max(0.0, sent + timing.cursor_throttle - time.monotonic()))
                intent.wake.clear()
            if intent.joined and intent.active:
                await self._ws.send(intent.heartbeat(full=False))
                sent = time.monotonic()

    async def _refreshes(self) -> None:
        tokens = self._tokens
        while tokens.refreshable and tokens.current is not None:
            expires_at = token_expiry(tokens.current)
            if expires_at is None:
                return
            await asyncio.sleep(refresh_delay(expires_at, time.time()))
            try:
                fresh = await tokens.fresh()
                self._refresh_reply = asyncio.get_running_loop().create_future()
                await self._ws.send(json.dumps({"type": "refresh", "token": fresh}))
                await asyncio.wait_for(self._refresh_reply, REFRESH_REPLY_TIMEOUT)
            except ConnectionClosed:
                raise
            except Exception as exc:
                # If no refresh lands in time the server closes with 4401, and the client
                # reconnects with a fresh token: nothing is lost but a reconnect.
                self._error(f"token refresh failed: {exc}")
                await asyncio.sleep(REFRESH_RETRY)
                continue
            tokens.current = fresh
            self._feed.emit([PresenceEvent("refreshed")])
