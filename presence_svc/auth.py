"""Bearer tokens: HS256 JWTs whose `sub` is the user id and whose `exp` is enforced."""

from __future__ import annotations

import re
import time
from collections import OrderedDict

import jwt

from presence_svc.models import ID_PATTERN

ALGORITHM = "HS256"
_USER_ID = re.compile(ID_PATTERN)


class AuthError(Exception):
    """The request carries no usable token; the message says why (never the token itself)."""


def issue_token(user_id: str, secret: str, ttl: float = 3600.0) -> str:
    """A signed token for `user_id`, valid for `ttl` seconds."""
    if not _USER_ID.fullmatch(user_id):
        raise ValueError(f"user id {user_id!r} does not match {ID_PATTERN}")
    now = int(time.time())
    claims = {"sub": user_id, "iat": now, "exp": now + max(1, round(ttl))}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class TokenVerifier:
    """Verifies tokens, remembering the ones it accepted until they expire.

    Checking an HMAC signature on every REST call is a large share of its CPU; a client sends
    the same token until it renews it, so an accepted token is looked up instead.
    """

    def __init__(self, secret: str, cache_size: int = 10_000) -> None:
        self._secret = secret
        self._accepted: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._cache_size = cache_size

    def user_id(self, token: str | None) -> str:
        """The user a token belongs to, or AuthError."""
        if not token:
            raise AuthError("missing bearer token")
        accepted = self._accepted.get(token)
        if accepted is not None and accepted[1] > time.time():
            return accepted[0]
        return self._verify(token)

    def _verify(self, token: str) -> str:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not _USER_ID.fullmatch(subject):
            raise AuthError("token subject is not a valid user id")
        self._accepted[token] = (subject, float(claims["exp"]))
        if len(self._accepted) > self._cache_size:
            self._accepted.popitem(last=False)
        return subject


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if that is what it holds."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
