"""Tokens and Authorization headers for tests: a token for user X with grants Y, signed with S."""

from __future__ import annotations

from collections.abc import Iterable

from presence_svc.auth import issue_token

# 66 bytes: long enough for every HMAC algorithm a test may pin (HS512 wants 64).
SECRET = "presence-tests-secret-" + "0123456789abcdef" * 3 + "pad!"
TTL = 3600.0


def token(
    user: str = "alice",
    *,
    secret: str = SECRET,
    studies: str | Iterable[str] | None = None,
    ttl: float = TTL,
    scope: str | None = None,
) -> str:
    """An HS256 token for `user`, valid for `ttl` seconds, granting `studies` ("*": all) and
    the space-separated scopes `scope`."""
    return issue_token(user, secret, ttl=ttl, studies=studies, scope=scope)


def bearer(signed: str) -> dict[str, str]:
    """The Authorization header that carries `signed`."""
    return {"Authorization": f"Bearer {signed}"}


def auth(
    user: str = "alice",
    *,
    secret: str = SECRET,
    studies: str | Iterable[str] | None = None,
    ttl: float = TTL,
    scope: str | None = None,
) -> dict[str, str]:
    """The Authorization header of a fresh token (see `token`)."""
    return bearer(token(user, secret=secret, studies=studies, ttl=ttl, scope=scope))


def admin(user: str = "operator", *, secret: str = SECRET) -> dict[str, str]:
    """The Authorization header of an operator's token: every study, the admin scope."""
    return auth(user, secret=secret, studies="*", scope="presence:admin")
