"""Bearer tokens: HS256 JWTs with a valid user id as `sub` and an enforced `exp`."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import jwt
import pytest

from presence_svc.auth import AuthError, TokenVerifier, bearer, issue_token

SECRET = "test-secret-" + "0123456789abcdef" * 4  # 76 bytes: enough for HS512 too
OTHER_SECRET = "other-secret-" + "0123456789abcdef" * 4


def b64(part: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


def signed(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def valid_claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 60, **extra}


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(SECRET)


@pytest.mark.parametrize("user", ["alice", "bob@example.org", "u:1", "A", "x" * 128])
def test_issue_and_verify_roundtrip(verifier: TokenVerifier, user: str) -> None:
    assert verifier.user_id(issue_token(user, SECRET)) == user


def test_issued_token_claims() -> None:
    before = int(time.time())
    token = issue_token("alice", SECRET, ttl=120)
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert header["alg"] == "HS256"
    assert claims["sub"] == "alice"
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 120


def test_issued_token_lives_at_least_one_second() -> None:
    claims = jwt.decode(issue_token("alice", SECRET, ttl=0), SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 1


@pytest.mark.parametrize("user", ["", "-alice", "al ice", "alice\n", "a/b", "x" * 129, "é"])
def test_issue_token_refuses_invalid_user_ids(user: str) -> None:
    with pytest.raises(ValueError, match="does not match"):
        issue_token(user, SECRET)


def test_token_signed_with_another_secret_is_rejected(verifier: TokenVerifier) -> None:
    with pytest.raises(AuthError, match="invalid token"):
        verifier.user_id(issue_token("alice", OTHER_SECRET))


def test_forged_signature_is_rejected(verifier: TokenVerifier) -> None:
    header, payload, _ = issue_token("alice", SECRET).split(".")
    forged_payload = b64({"sub": "mallory", "exp": int(time.time()) + 60})
    _, _, real_sig = issue_token("alice", SECRET).split(".")
    with pytest.raises(AuthError, match="invalid token"):
        verifier.user_id(f"{header}.{forged_payload}.{real_sig}")
    with pytest.raises(AuthError, match="invalid token"):
        verifier.user_id(f"{header}.{payload}.{real_sig[:-4]}AAAA")


def test_expired_token_is_rejected(verifier: TokenVerifier) -> None:
    token = signed({"sub": "alice", "exp": int(time.time()) - 5})
    with pytest.raises(AuthError, match="token expired"):
        verifier.user_id(token)


def test_alg_none_token_is_rejected(verifier: TokenVerifier) -> None:
    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(valid_claims())}."
    with pytest.raises(AuthError, match="invalid token"):
        verifier.user_id(unsigned)


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_algorithms_are_rejected(verifier: TokenVerifier, algorithm: str) -> None:
    with pytest.raises(AuthError, match="invalid token"):
        verifier.user_id(signed(valid_claims(), algorithm=algorithm))


def test_missing_exp_is_rejected(verifier: TokenVerifier) -> None:
    with pytest.raises(AuthError, match="exp"):
        verifier.user_id(signed({"sub": "alice"}))


def test_missing_sub_is_rejected(verifier: TokenVerifier) -> None:
    with pytest.raises(AuthError, match="sub"):
        verifier.user_id(signed({"exp": int(time.time()) + 60}))


@pytest.mark.parametrize("sub", ["", "al ice", "alice\n", "../etc", "a{b}", "x" * 129, "-x"])
def test_subject_that_is_not_a_user_id_is_rejected(verifier: TokenVerifier, sub: str) -> None:
    with pytest.raises(AuthError):
        verifier.user_id(signed(valid_claims(sub=sub)))


@pytest.mark.parametrize("sub", [42, None, ["alice"], {"id": "alice"}])
def test_non_string_subject_is_rejected(verifier: TokenVerifier, sub: Any) -> None:
    with pytest.raises(AuthError):
        verifier.user_id(signed(valid_claims(sub=sub)))


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(verifier: TokenVerifier, token: str | None) -> None:
    with pytest.raises(AuthError, match="missing bearer token"):
        verifier.user_id(token)


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "a.b", "....."])
def test_malformed_tokens_are_rejected(verifier: TokenVerifier, token: str) -> None:
    with pytest.raises(AuthError, match="invalid token"):
        verifier.user_id(token)


def test_error_message_never_contains_the_token(verifier: TokenVerifier) -> None:
    token = issue_token("alice", OTHER_SECRET)
    with pytest.raises(AuthError) as caught:
        verifier.user_id(token)
    assert token not in str(caught.value)
    assert token.split(".")[2] not in str(caught.value)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer    ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Token abc", None),
        ("Bearerabc", None),
        ("abc", None),
    ],
)
def test_bearer_header_parsing(header: str | None, token: str | None) -> None:
    assert bearer(header) == token


def test_an_accepted_token_is_remembered_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "c" * 40
    verifier = TokenVerifier(secret)
    token = issue_token("alice", secret, ttl=60)
    assert verifier.user_id(token) == "alice"

    def no_second_check(*args: object, **kwargs: object) -> object:
        raise AssertionError("verified twice")

    monkeypatch.setattr(jwt, "decode", no_second_check)
    assert verifier.user_id(token) == "alice"

    # Past its expiry the remembered answer is not used: the token is checked (and refused).
    def expired(*args: object, **kwargs: object) -> object:
        raise jwt.ExpiredSignatureError("Signature has expired")

    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    monkeypatch.setattr(jwt, "decode", expired)
    with pytest.raises(AuthError, match="expired"):
        verifier.user_id(token)


def test_a_remembered_token_is_used_through_the_leeway_and_no_longer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "c" * 40
    now = [time.time()]
    verifier = TokenVerifier(secret, leeway=30, clock=lambda: now[0])
    token = issue_token("alice", secret, ttl=60)
    assert verifier.user_id(token) == "alice"
    expires_at = verifier.principal(token).expires_at
    checks: list[object] = []
    real_decode = jwt.decode

    def counted(*args: object, **kwargs: object) -> object:
        checks.append(args)
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counted)
    # Expired, but within the leeway a new check accepts it: the remembered answer is used.
    now[0] = expires_at + 29.5
    assert verifier.user_id(token) == "alice"
    assert checks == []
    # Past exp + leeway it is checked again, and refused as a new check refuses it.
    now[0] = expires_at + 30
    with pytest.raises(AuthError, match="expired"):
        verifier.user_id(token)
    assert len(checks) == 1
    with pytest.raises(AuthError, match="expired"):
        TokenVerifier(secret, leeway=30, clock=lambda: now[0]).user_id(token)


def test_the_remembered_tokens_are_bounded() -> None:
    secret = "c" * 40
    verifier = TokenVerifier(secret, cache_size=3)
    tokens = [issue_token(f"u{n}", secret, ttl=60) for n in range(5)]
    for token in tokens:
        verifier.user_id(token)
    assert len(verifier._accepted) == 3
    assert list(verifier._accepted) == [hashlib.sha256(t.encode()).digest() for t in tokens[2:]]


def test_principals_with_equal_grants_share_one_set() -> None:
    # Each socket and each remembered token holds a Principal: equal grants and scopes are one
    # frozenset (on this Python even empty frozensets are distinct objects, 216 bytes each).
    verifier = TokenVerifier(SECRET)
    alice, bob = (verifier.principal(issue_token(u, SECRET, studies=["s1"])) for u in ("a", "b"))
    carol, dave = (verifier.principal(issue_token(u, SECRET, studies="*")) for u in ("c", "d"))
    erin = verifier.principal(issue_token("e", SECRET, studies=[]))
    frank = verifier.principal(issue_token("f", SECRET, scope=""))
    assert alice.studies == frozenset({"s1"}) and alice.studies is bob.studies
    assert carol.studies == frozenset({"*"}) and carol.studies is dave.studies
    assert alice.scopes == frozenset() and frank.studies == frozenset()
    assert alice.scopes is carol.scopes is erin.studies is frank.studies is frank.scopes
    assert erin.may_access("s1") is False and carol.may_access("s1") is True


def test_the_shared_sets_are_bounded() -> None:
    verifier = TokenVerifier(SECRET, cache_size=3)
    for n in range(10):
        grant = verifier.principal(issue_token("alice", SECRET, studies=[f"s{n}"])).studies
        assert grant == frozenset({f"s{n}"})
        assert len(verifier._sets) <= 3


def test_a_remembered_token_is_kept_by_its_digest_only() -> None:
    verifier = TokenVerifier(SECRET)
    token = issue_token("alice", SECRET)
    verifier.principal(token)
    assert list(verifier._accepted) == [hashlib.sha256(token.encode()).digest()]
    # A token that differs from a remembered one is verified, whatever it shares with it.
    header, payload, signature = token.split(".")
    other = "B" if signature[0] == "A" else "A"
    with pytest.raises(AuthError, match="invalid token"):
        verifier.principal(f"{header}.{payload}.{other}{signature[1:]}")
