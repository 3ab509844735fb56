"""`PresenceClient`: a study's presence for backends, bots and tests, over one WebSocket.

The socket work is in link.py, the state in state.py, the reconnect schedule in policy.py;
this module holds them together: one socket at a time, reconnects by the policy, the public
API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from presence_svc.client.endpoints import Endpoints
from presence_svc.client.feed import (
    ChangeStream,
    EventKind,
    EventStream,
    Feed,
    PresenceError,
    PresenceEvent,
    SignalListener,
)
from presence_svc.client.intent import Intent, check_cursor
from presence_svc.client.link import Link, LinkEnd, Timing
from presence_svc.client.policy import Backoff, Reaction, Retry, reaction
from presence_svc.client.rest import Unauthorized, delete_presence
from presence_svc.client.signals import DEFAULT_MAX_BYTES, encode_signal
from presence_svc.client.state import StudyState, User
from presence_svc.client.tokens import Tokens, TokenSource
from presence_svc.models import ID_PATTERN

log = logging.getLogger(__name__)

_STUDY_ID = re.compile(ID_PATTERN)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()  # a cursor field left as it is


class PresenceClient:
    """The presence of one study, kept up to date over one WebSocket, with reconnects.

    `urls` is the base URL of a node (http, https, ws or wss), or several: the client moves to
    the next one whenever a socket fails. Give `token=`, or `get_token=` (an async callable),
    which is called for the first token, before each token expires (the fresh one is sent
    over the socket), and when the server refuses one (4401).

    Heartbeats start once the caller joins (`set_cursor`), every `heartbeat_interval`
    seconds while it is active; keep that well below the server's PRESENCE_IDLE_AFTER (30 s
    by default; a third of it is a good interval). `set_active(False)` stops them, so the
    user turns idle and away honestly.

    `signal_max_bytes` is the largest signal data this client sends (the server's
    PRESENCE_SIGNAL_MAX_BYTES; its default).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        study_id: str,
        *,
        token: str | None = None,
        get_token: TokenSource | None = None,
        heartbeat_interval: float = 10.0,
        cursor_throttle: float = 0.05,
        backoff: Backoff | None = None,
        open_timeout: float = 10.0,
        keepalive: float | None = 20.0,
        max_message_size: int = 64 * 1024 * 1024,
        events_queue_size: int = 4096,
        signal_max_bytes: int = DEFAULT_MAX_BYTES,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(study_id, str) or not _STUDY_ID.fullmatch(study_id):
            raise ValueError(f"study_id must match {ID_PATTERN}: {study_id!r}")
        if not heartbeat_interval > 0 or not cursor_throttle >= 0 or not open_timeout > 0:
            raise ValueError("heartbeat_interval and open_timeout must be > 0, throttle >= 0")
        self.study_id = study_id
        self._endpoints = Endpoints(urls)
        self._tokens = Tokens(token, get_token)
        self._timing = Timing(heartbeat_interval, cursor_throttle)
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._open_timeout = open_timeout
        self._keepalive = keepalive
        self._max_message_size = max_message_size
        self._signal_max_bytes = signal_max_bytes
        self._study = StudyState()
        self._feed = Feed(self._study.users, events_queue_size)
        self._intent = Intent()
        self._link: Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._opened: asyncio.Event = asyncio.Event()
        self._state = "closed"
        self._last_failure = ""
        self.user_id: str | None = None  # from the server's `connected` message
        self.connection_id: str | None = None
        self.error: PresenceError | None = None  # why the client stopped, if it did

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> PresenceClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self, within: float | None = 30.0) -> None:
        """Open the socket; return once the first snapshot is applied.

        Failed attempts are retried by the backoff for `within` seconds (None: no limit).
        PresenceError if the server refuses the client for good (4400, 4403, or 4401 without
        get_token), or when no snapshot came in time (the client is then closed).
        """
        if self._task is not None:
            raise RuntimeError("PresenceClient.connect() called twice")
        self._set_state("connecting")
        self._task = asyncio.create_task(self._run())
        opened = asyncio.create_task(self._opened.wait())
        try:
            await asyncio.wait({opened, self._task}, timeout=within, return_when="FIRST_COMPLETED")
        finally:
            opened.cancel()
        if self.error is not None:
            raise self.error
        if not self._opened.is_set():
            await self.close()
            raise PresenceError(f"no snapshot within {within}s; last failure: {self._last_failure}")

    async def close(self) -> None:
        """Close the socket and stop. The session, if joined, leaves after the server's leave
        grace; call `leave()` first to end it at once."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._state != "closed":
            self._set_state("closed")
        self._feed.finish(self.error)

    # -- reading -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """ "connecting", "open", "reconnecting" or "closed"."""
        return self._state

    @property
    def seq(self) -> int | None:
        """The seq of the last event applied; None while waiting for a snapshot."""
        return self._study.seq

    def users(self) -> list[User]:
        """The users listed, by user id: everyone unless `complete` is False (a big room's
        snapshot lists only some; a later event of another user lists them too)."""
        return self._study.users()

    def counts(self) -> dict[str, int]:
        """Sessions by status ({"active", "idle", "away"}), listed or not, kept exact from
        the events."""
        return dict(self._study.counts)

    @property
    def total(self) -> int:
        """The number of sessions in the study (the sum of `counts()`)."""
        return self._study.total

    @property
    def complete(self) -> bool:
        """Whether `users()` lists everyone; False in a study larger than the server's
        PRESENCE_SNAPSHOT_MAX_USERS."""
        return self._study.complete

    def changes(self) -> ChangeStream:
        """`async for users in client.changes()`: the users now, then after every change
        (a consumer slower than the changes skips to the latest)."""
        return ChangeStream(self._feed)

    def events(self, *kinds: EventKind) -> EventStream:
        """Events of these kinds (all if none), in order, from now on; see PresenceEvent."""
        return EventStream(self._feed, kinds)

    def signals(self, *names: str) -> EventStream:
        """Signals of these names (all if none), as "signal" events, in order, from now on."""
        return EventStream(self._feed, ["signal"], names)

    def on_signal(self, listener: SignalListener, *names: str) -> Callable[[], None]:
        """Call `listener(name, data)` as each signal of these names (all if none) arrives;
        `data` carries the sender's `user_id`. Returns the function that stops it."""
        return self._feed.listen(listener, names)

    # -- writing -------------------------------------------------------------------------

    async def set_cursor(
        self, *, chapter_id: str | _Unset | None = UNSET, move_path: str | _Unset | None = UNSET
    ) -> None:
        """Join the study (if not yet) and move the cursor; a field left out keeps its value,
        None clears it. Sent at once (moves within `cursor_throttle` coalesce, the latest
        wins) while connected, else on the next socket. It counts as activity."""
        fields: dict[str, str | None] = {}
        if not isinstance(chapter_id, _Unset):
            fields["chapter_id"] = chapter_id
        if not isinstance(move_path, _Unset):
            fields["move_path"] = move_path
        check_cursor(fields.get("chapter_id"), fields.get("move_path"))
        self._check_running()
        self._intent.set_cursor(fields)
        await asyncio.sleep(0)  # let the heartbeat go out now if the socket is open

    async def send_signal(self, name: str, data: Mapping[str, Any] | None = None) -> bool:
        """Send a signal to the study's other sockets (`signal.<name>`); False when not
        connected: signals are never queued, a reconnect does not send them.

        ValueError for a name not matching ^[a-z][a-z0-9_]{0,31}$ or data that is not JSON
        of at most `signal_max_bytes`. The server holds the newest of each name while this
        socket is over its signal rate. A signal is not a heartbeat.
        """
        text = encode_signal(name, data, self._signal_max_bytes)
        link = self._link
        if link is None or self._state != "open":
            return False
        return await link.send(text)

    def set_active(self, active: bool) -> None:
        """Whether the user is active: heartbeats stop while not, and resume at once."""
        self._intent.set_active(active)

    async def leave(self, within: float = 10.0) -> None:
        """End this user's session in the study now (`user_left`), and stop heartbeating; the
        client keeps watching. PresenceError if no node accepts the leave."""
        self._check_running()
        self._intent.leave()
        link = self._link
        if link is not None:
            # Heartbeats sent before must not land after the leave and start a new session.
            await link.barrier(within)
        urls = self._endpoints.rest_urls(f"/presence/{self.study_id}")
        try:
            await delete_presence(urls, await self._tokens.usable(), within)
        except Unauthorized:
            if not self._tokens.refreshable:
                raise
            self._tokens.current = await self._tokens.fresh()
            await delete_presence(urls, self._tokens.current, within)

    def _check_running(self) -> None:
        if self.error is not None:
            raise self.error
        if self._task is None:
            raise PresenceError("the client is not connected (use `async with` or connect())")

    # -- the connection loop -------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._reconnecting()
        except Exception as exc:  # a bug: stop loudly rather than hang the callers
            log.exception("presence client of study %s failed", self.study_id)
            self._stop(PresenceError(f"presence client failed: {exc!r}"))

    async def _reconnecting(self) -> None:
        retry = Retry(self._backoff, self._rng)
        while True:
            end = await self._attempt(retry)
            react = reaction(end.code, end.resync)
            if react is Reaction.REFRESH_TOKEN:
                react = await self._refresh_after_refusal()
            if react is Reaction.STOP:
                self._stop(PresenceError(_describe(end, "refused by the server"), end.code))
                return
            self._last_failure = _describe(end, "socket ended")
            if react is Reaction.BACK_OFF or end.code == 1012:
                self._endpoints.rotate()
            if react is Reaction.BACK_OFF:
                self._feed.emit([PresenceEvent("error", error=PresenceError(self._last_failure))])
            self._set_state("reconnecting")
            await asyncio.sleep(retry.delay(react, time.monotonic()))

    async def _attempt(self, retry: Retry) -> LinkEnd:
        try:
            token = await self._tokens.usable()
        except Exception as exc:
            return LinkEnd(None, f"get_token failed: {exc}")
        self._study.expect_snapshot()
        url = self._endpoints.socket_url(self.study_id)
        try:
            ws = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=self._open_timeout,
                ping_interval=self._keepalive,
                ping_timeout=self._keepalive,
                close_timeout=2,
                max_size=self._max_message_size,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            return LinkEnd(None, f"{url}: {exc}")

        def opened(connected: dict[str, Any]) -> None:
            self.user_id = connected.get("user_id") or self.user_id
            self.connection_id = connected.get("connection_id")
            retry.opened(time.monotonic())
            self._set_state("open")
            self._opened.set()

        link = Link(ws, self._study, self._feed, self._intent, self._tokens, self._timing, opened)
        self._link = link
        try:
            return await link.run()
        finally:
            self._link = None
            await ws.close()

    async def _refresh_after_refusal(self) -> Reaction:
        if not self._tokens.refreshable:
            return Reaction.STOP
        try:
            self._tokens.current = await self._tokens.fresh()
        except Exception as exc:
            self._feed.emit([PresenceEvent("error", error=PresenceError(f"get_token: {exc}"))])
            return Reaction.BACK_OFF
        return Reaction.REFRESH_TOKEN

    def _stop(self, error: PresenceError) -> None:
        self.error = error
        self._feed.emit([PresenceEvent("error", error=error)])
        self._set_state("closed")
        self._feed.finish(error)

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self._feed.emit([PresenceEvent("state", state=state)])


def _describe(end: LinkEnd, what: str) -> str:
    if end.code is None:
        return f"could not connect: {end.reason}"
    return f"{what}: {end.code} {end.reason}".rstrip()
