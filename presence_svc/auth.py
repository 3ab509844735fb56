"""Bearer tokens: HS256 JWTs whose `sub` is the user id and whose `exp` is enforced.

A `studies` claim grants access: a list of study ids, or `"*"` for every study. A `scope` claim
(space-separated, as in OAuth 2.0) grants operations: `presence:admin`, with every study, makes
an operator's token (GET /stats, the dashboard).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from presence_svc.models import ID_PATTERN
from presence_svc.settings import Settings

ALGORITHM = "HS256"
ALL_STUDIES = "*"
ADMIN_SCOPE = "presence:admin"
LATEST_EXPIRY = 253_402_300_799  # 9999-12-31T23:59:59Z
_ID = re.compile(ID_PATTERN)

# Every socket holds its Principal, and the verifier remembers one per accepted token, so the
# common grants are shared: on CPython 3.11 every frozenset, even an empty one, is an object of
# its own, and the smallest is 216 bytes (docs/performance.md, "Idle socket memory").
_NONE: frozenset[str] = frozenset()
_EVERY_STUDY: frozenset[str] = frozenset({ALL_STUDIES})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for, and which studies it grants."""

    user_id: str
    studies: frozenset[str]  # granted study ids; ALL_STUDIES grants every study
    expires_at: float
    scopes: frozenset[str] = _NONE  # the `scope` claim's space-separated values

    def may_access(self, study_id: str) -> bool:
        return ALL_STUDIES in self.studies or study_id in self.studies

    @property
    def is_admin(self) -> bool:
        """An operator's token: it grants every study and carries the admin scope."""
        return ALL_STUDIES in self.studies and ADMIN_SCOPE in self.scopes


def _studies(claim: object) -> frozenset[str]:
    if claim is None:
        return _NONE
    if claim == ALL_STUDIES:
        return _EVERY_STUDY
    if isinstance(claim, list) and all(
        isinstance(s, str) and (s == ALL_STUDIES or _ID.fullmatch(s)) for s in claim
    ):
        return frozenset(claim) if claim else _NONE
    raise AuthError('invalid "studies" claim: a list of study ids, or "*"')


def _scopes(claim: object) -> frozenset[str]:
    if claim is None:
        return _NONE
    if isinstance(claim, str):
        scopes = claim.split()
        return frozenset(scopes) if scopes else _NONE
    raise AuthError('invalid "scope" claim: a string of space-separated scopes')


class AuthError(Exception):
    """The request carries no usable token; the message says why (never the token itself)."""


def issue_token(
    user_id: str,
    secret: str,
    ttl: float = 3600.0,
    studies: str | Iterable[str] | None = None,
    scope: str | Iterable[str] | None = None,
) -> str:
    """A signed token for `user_id`, valid for `ttl` seconds, granting `studies` ("*": all)
    and the scopes `scope` (a space-separated string or an iterable of scopes)."""
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
    if scope is not None:
        claims["scope"] = scope if isinstance(scope, str) else " ".join(scope)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class TokenVerifier:
    """Verifies tokens, remembering the ones it accepted until they expire.

    Checking a signature on every REST call is a large share of its CPU; a client sends the
    same token until it renews it, so an accepted token is looked up instead, by its SHA-256
    digest: 65 bytes a token rather than the token's own text (200 to over 1,000), and no
    bearer token kept in memory once its request is done. One algorithm is accepted (pinned),
    so `alg: none` and HMAC-with-a-public-key confusion are refused.
    """

    def __init__(
        self,
        key: str | bytes | None,
        *,
        algorithm: str = ALGORITHM,
        jwks: jwt.PyJWKSet | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if (key is None) == (jwks is None):
            raise ValueError("give a key or a JWKS, not both")
        self._key = key
        self._jwks = jwks
        self._algorithm = algorithm
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._required = (
            ["exp", "sub"] + (["aud"] if audience else []) + (["iss"] if issuer else [])
        )
        self._accepted: OrderedDict[bytes, Principal] = OrderedDict()  # by _digest(token)
        self._cache_size = cache_size
        # The grants and scopes of the remembered principals, each set once: the users of a
        # study mostly carry the same grant.
        self._sets: dict[frozenset[str], frozenset[str]] = {}
        self._clock = clock or _wall_time

    @classmethod
    def from_settings(
        cls, settings: Settings, clock: Callable[[], float] | None = None
    ) -> TokenVerifier:
        """The verifier the PRESENCE_JWT_* settings describe (files are read once, here);
        `exp`, `nbf` and `iat` are checked against `clock` (the node's shared clock)."""
        options: dict[str, Any] = {
            "algorithm": settings.jwt_algorithm,
            "audience": settings.jwt_audience,
            "issuer": settings.jwt_issuer,
            "leeway": settings.jwt_leeway,
            "clock": clock,
        }
        if settings.jwt_algorithm.startswith("HS"):
            return cls(settings.effective_jwt_secret, **options)
        if settings.jwt_jwks_file is not None:
            jwks = jwt.PyJWKSet.from_json(Path(settings.jwt_jwks_file).read_text())
            return cls(None, jwks=jwks, **options)
        assert settings.jwt_public_key is not None
        pem = settings.jwt_public_key
        if not pem.lstrip().startswith("-----BEGIN"):
            pem = Path(pem).read_text()
        return cls(pem, **options)

    def principal(self, token: str | None) -> Principal:
        """Who the token speaks for and what it grants, or AuthError."""
        if not token:
            raise AuthError("missing bearer token")
        digest = _digest(token)
        accepted = self._accepted.get(digest)
        # The leeway as _check_times applies it to `exp`: remembered exactly as long as a new
        # check would accept it (nbf and iat, once passed, stay passed).
        if accepted is not None and accepted.expires_at > self._clock() - self._leeway:
            return accepted
        return self._verify(token, digest)

    def user_id(self, token: str | None) -> str:
        """The user a token belongs to, or AuthError."""
        return self.principal(token).user_id

    def _verification_key(self, token: str) -> Any:
        if self._jwks is None:
            return self._key
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        if kid is None and len(self._jwks.keys) == 1:
            return self._jwks.keys[0]
        try:
            return self._jwks[str(kid)]
        except KeyError:
            raise AuthError("invalid token: unknown key id") from None

    def _verify(self, token: str, digest: bytes) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._verification_key(token),
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                # The times are checked below, on the node's clock rather than PyJWT's (the
                # local one, which may be off).
                options={
                    "require": self._required,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
            _check_times(claims, self._clock(), self._leeway)
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except (jwt.InvalidTokenError, jwt.exceptions.InvalidKeyError) as exc:
            raise AuthError(f"invalid token: {exc}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not _ID.fullmatch(subject):
            raise AuthError("token subject is not a valid user id")
        # An exp past the year 9999 is as good as that date (and fits a float and a datetime).
        # (PyJWT has already checked that int() takes it.)
        expires_at = float(min(int(claims["exp"]), LATEST_EXPIRY))
        principal = Principal(
            subject,
            self._shared(_studies(claims.get("studies"))),
            expires_at,
            self._shared(_scopes(claims.get("scope"))),
        )
        self._accepted[digest] = principal
        if len(self._accepted) > self._cache_size:
            self._accepted.popitem(last=False)
        return principal

    def _shared(self, names: frozenset[str]) -> frozenset[str]:
        """The one frozenset equal to `names` that this verifier's principals hold."""
        shared = self._sets.get(names)
        if shared is not None:
            return shared
        if len(self._sets) >= self._cache_size:
            # As many distinct sets as remembered tokens: most are forgotten. Starting over
            # only means that principals made before and after hold equal sets, not one set.
            self._sets.clear()
        self._sets[names] = names
        return names


def _digest(token: str) -> bytes:
    # A lookup by digest answers as a lookup by the token would: finding another text with a
    # remembered token's SHA-256 is out of reach. About 0.6 us a lookup, against about 125 us
    # for the check it spares. (A text that UTF-8 cannot encode raises here what PyJWT raised.)
    return hashlib.sha256(token.encode()).digest()


def _wall_time() -> float:
    # Looked up at each call, not bound once: a test may replace time.time.
    return time.time()


def _claim_time(claims: dict[str, Any], name: str, error: type[Exception], what: str) -> int | None:
    if name not in claims:
        return None
    try:
        return int(claims[name])
    except (ValueError, TypeError, OverflowError):
        raise error(f"{what} claim ({name}) must be an integer.") from None


def _check_times(claims: dict[str, Any], now: float, leeway: float) -> None:
    """PyJWT's checks of `iat`, `nbf` and `exp` (same order, rules and errors), at `now`."""
    iat = _claim_time(claims, "iat", jwt.InvalidIssuedAtError, "Issued At")
    if iat is not None and iat > now + leeway:
        raise jwt.ImmatureSignatureError("The token is not yet valid (iat)")
    nbf = _claim_time(claims, "nbf", jwt.DecodeError, "Not Before")
    if nbf is not None and nbf > now + leeway:
        raise jwt.ImmatureSignatureError("The token is not yet valid (nbf)")
    exp = _claim_time(claims, "exp", jwt.DecodeError, "Expiration Time")
    if exp is not None and exp <= now - leeway:
        raise jwt.ExpiredSignatureError("Signature has expired")


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if that is what it holds."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
