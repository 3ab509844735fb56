"""The client's token: the current one, where fresh ones come from, and when to refresh it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import jwt

TokenSource = Callable[[], Awaitable[str]]

# Refresh a third of the way before expiry, but at least 1 s and at most 60 s before it, and
# never sooner than REFRESH_MIN_DELAY: a source that hands out nearly expired tokens must not
# make the client refresh in a loop.
REFRESH_LEAD_MIN = 1.0
REFRESH_LEAD_MAX = 60.0
REFRESH_MIN_DELAY = 0.25


def token_expiry(token: str) -> float | None:
    """The token's `exp` (Unix seconds), read without checking it; None if it has none.

    The server is the one that verifies tokens; the client only needs to know when to ask for
    a fresh one.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def refresh_delay(expires_at: float, now: float) -> float:
    """Seconds from `now` until a token expiring at `expires_at` should be refreshed."""
    remaining = expires_at - now
    lead = min(REFRESH_LEAD_MAX, max(REFRESH_LEAD_MIN, remaining / 3))
    return max(REFRESH_MIN_DELAY, remaining - lead)


class Tokens:
    """The token the client presents, and the source of fresh ones (if it was given one)."""

    def __init__(self, token: str | None, source: TokenSource | None) -> None:
        if token is None and source is None:
            raise ValueError("PresenceClient needs token= or get_token=")
        if token is not None and not token:
            raise ValueError("token must not be empty")
        self.current = token
        self._source = source

    @property
    def refreshable(self) -> bool:
        return self._source is not None

    async def fresh(self) -> str:
        """A fresh token from the source (which becomes the current one once accepted)."""
        if self._source is None:
            raise RuntimeError("no token source")
        token = await self._source()
        if not isinstance(token, str) or not token:
            raise ValueError("get_token() returned no token")
        return token

    async def usable(self) -> str:
        """The current token, fetching one first if there is none yet."""
        if self.current is None:
            self.current = await self.fresh()
        return self.current
