"""Bearer tokens: HS256 JWTs whose `sub` is the user id and whose `exp` is enforced.

A `studies` claim grants access: a list of study ids, or `"*"` for every study.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from presence_svc.models import ID_PATTERN

ALGORITHM = "HS256"
ALL_STUDIES = "*"
_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for, and which studies it grants."""

    user_id: str
    studies: frozenset[str]  # granted study ids; ALL_STUDIES grants every study
    expires_at: float

    def may_access(self, study_id: str) -> bool:
        return ALL_STUDIES in self.studies or study_id in self.studies


def _studies(claim: object) -> frozenset[str]:
    if claim is None:
        return frozenset()
    if claim == ALL_STUDIES:
        return frozenset({ALL_STUDIES})
    if isinstance(claim, list) and all(
        isinstance(s, str) and (s == ALL_STUDIES or _ID.fullmatch(s)) for s in claim
    ):
        return frozenset(claim)
    raise AuthError('invalid "studies" claim: a list of study ids, or "*"')


class AuthError(Exception):
    """The request carries no usable token; the message says why (never the token itself)."""


def issue_token(
    user_id: str, secret: str, ttl: float = 3600.0, studies: str | Iterable[str] | None = None
) -> str:
    """A signed token for `user_id`, valid for `ttl` seconds, granting `studies` ("*": all)."""
    if not _ID.fullmatch(user_id):
        raise ValueError(f"user id {user_id!r} does not match {ID_PATTERN}")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + max(1, round(ttl))}
    if studies is not None:
        grant: object = ALL_STUDIES if studies == ALL_STUDIES else sorted(studies)
        try:
            _studies(grant)
        except AuthError as exc:
            raise ValueError(str(exc)) from None
        claims["studies"] = grant
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class TokenVerifier:
    """Verifies tokens, remembering the ones it accepted until they expire.

    Checking an HMAC signature on every REST call is a large share of its CPU; a client sends
    the same token until it renews it, so an accepted token is looked up instead.
    """

    def __init__(self, secret: str, cache_size: int = 10_000) -> None:
        self._secret = secret
        self._accepted: OrderedDict[str, Principal] = OrderedDict()
        self._cache_size = cache_size

    def principal(self, token: str | None) -> Principal:
        """Who the token speaks for and what it grants, or AuthError."""
        if not token:
            raise AuthError("missing bearer token")
        accepted = self._accepted.get(token)
        if accepted is not None and accepted.expires_at > time.time():
            return accepted
        return self._verify(token)

    def user_id(self, token: str | None) -> str:
        """The user a token belongs to, or AuthError."""
        return self.principal(token).user_id

    def _verify(self, token: str) -> Principal:
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
        if not isinstance(subject, str) or not _ID.fullmatch(subject):
            raise AuthError("token subject is not a valid user id")
        principal = Principal(subject, _studies(claims.get("studies")), float(claims["exp"]))
        self._accepted[token] = principal
        if len(self._accepted) > self._cache_size:
            self._accepted.popitem(last=False)
        return principal


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if that is what it holds."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
