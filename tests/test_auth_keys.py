"""Asymmetric tokens (RS256, ES256, JWKS), pinned algorithms, audience, issuer and leeway."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.websockets import WebSocketDisconnect

from presence_svc.auth import AuthError, TokenVerifier
from presence_svc.settings import SettingsError, load_settings
from tests.support.app import app_client, make_settings
from tests.support.auth import bearer

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> str:
    pem: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 600, "studies": ["s1"], **extra}


def sign(key: Any, algorithm: str, headers: dict[str, Any] | None = None, **extra: Any) -> str:
    return jwt.encode(claims(**extra), key, algorithm=algorithm, headers=headers)


def rs256(**options: Any) -> TokenVerifier:
    return TokenVerifier(public_pem(RSA_KEY), algorithm="RS256", **options)


def unsigned(**extra: Any) -> str:
    header = jwt.utils.base64url_encode(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = jwt.utils.base64url_encode(json.dumps(claims(**extra)).encode())
    return f"{header.decode()}.{body.decode()}."


def test_rs256_and_es256_tokens_verify() -> None:
    assert rs256().principal(sign(RSA_KEY, "RS256")).user_id == "alice"
    es256 = TokenVerifier(public_pem(EC_KEY), algorithm="ES256")
    assert es256.principal(sign(EC_KEY, "ES256")).studies == {"s1"}


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda: sign(OTHER_RSA_KEY, "RS256"), id="forged-signature"),
        pytest.param(lambda: unsigned(), id="alg-none"),
        pytest.param(lambda: sign(EC_KEY, "ES256"), id="other-algorithm"),
        pytest.param(lambda: sign(RSA_KEY, "RS512"), id="rs512-not-pinned"),
        pytest.param(lambda: sign(RSA_KEY, "RS256", exp=int(time.time()) - 60), id="expired"),
    ],
)
def test_refused(token: Any) -> None:
    with pytest.raises(AuthError):
        rs256().principal(token())


def test_hmac_signed_with_the_public_key_is_refused() -> None:
    # The classic confusion: an attacker signs HS256 with the (public) verification key.
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = jwt.utils.base64url_encode(json.dumps(claims()).encode())
    signing_input = header + b"." + body
    mac = hmac.new(public_pem(RSA_KEY).encode(), signing_input, hashlib.sha256).digest()
    forged = (signing_input + b"." + jwt.utils.base64url_encode(mac)).decode()
    with pytest.raises(AuthError):
        rs256().principal(forged)
    with pytest.raises(AuthError):
        TokenVerifier(public_pem(RSA_KEY), algorithm="HS256").principal(sign(RSA_KEY, "RS256"))


def test_audience_and_issuer() -> None:
    verifier = rs256(audience="presence", issuer="https://auth.example")
    good = sign(RSA_KEY, "RS256", aud="presence", iss="https://auth.example")
    assert verifier.principal(good).user_id == "alice"
    for bad in (
        sign(RSA_KEY, "RS256", aud="other", iss="https://auth.example"),
        sign(RSA_KEY, "RS256", aud="presence", iss="https://evil.example"),
        sign(RSA_KEY, "RS256", iss="https://auth.example"),  # no aud at all
        sign(RSA_KEY, "RS256", aud="presence"),  # no iss at all
    ):
        with pytest.raises(AuthError):
            verifier.principal(bad)


def test_leeway_tolerates_a_little_clock_skew() -> None:
    just_expired = sign(RSA_KEY, "RS256", exp=int(time.time()) - 2)
    assert rs256(leeway=5).principal(just_expired).user_id == "alice"
    with pytest.raises(AuthError, match="expired"):
        rs256(leeway=0).principal(just_expired)


def jwks_file(tmp_path: Path) -> Path:
    keys = []
    for kid, key in (("a", OTHER_RSA_KEY), ("b", RSA_KEY)):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return path


def test_a_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    settings = load_settings(jwt_algorithm="RS256", jwt_jwks_file=str(jwks_file(tmp_path)))
    verifier = TokenVerifier.from_settings(settings)
    assert verifier.principal(sign(RSA_KEY, "RS256", headers={"kid": "b"})).user_id == "alice"
    with pytest.raises(AuthError, match="unknown key id"):
        verifier.principal(sign(RSA_KEY, "RS256", headers={"kid": "zzz"}))
    with pytest.raises(AuthError):
        verifier.principal(sign(RSA_KEY, "RS256", headers={"kid": "a"}))  # wrong key for kid


def test_the_public_key_may_be_a_file(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text(public_pem(EC_KEY))
    settings = load_settings(jwt_algorithm="ES256", jwt_public_key=str(path))
    assert TokenVerifier.from_settings(settings).principal(sign(EC_KEY, "ES256")).user_id


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"jwt_algorithm": "RS256"}, "PRESENCE_JWT_PUBLIC_KEY"),
        ({"jwt_algorithm": "RS256", "jwt_public_key": "x", "jwt_jwks_file": "y"}, "exactly one"),
        ({"jwt_public_key": "-----BEGIN PUBLIC KEY-----"}, "PRESENCE_JWT_SECRET"),
        ({"jwt_algorithm": "none"}, "PRESENCE_JWT_ALGORITHM"),
        ({"jwt_leeway": 3600}, "PRESENCE_JWT_LEEWAY"),
    ],
)
def test_inconsistent_key_settings_stop_the_node(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(**overrides)


def test_a_node_on_rs256_serves_rs256_tokens_only(key_prefix: str) -> None:
    settings = make_settings(
        key_prefix,
        jwt_secret=None,
        jwt_algorithm="RS256",
        jwt_public_key=public_pem(RSA_KEY),
        jwt_audience="presence",
        require_study_grant=True,
    )
    good = sign(RSA_KEY, "RS256", aud="presence")
    hs256 = jwt.encode(claims(aud="presence"), "a-secret-that-is-32-bytes-long!!!", "HS256")
    with app_client(settings) as client:
        ok = client.post("/presence/heartbeat", json={"study_id": "s1"}, headers=bearer(good))
        assert ok.status_code == 200
        refused = client.get("/presence/s1", headers=bearer(hs256))
        assert refused.status_code == 401
        with client.websocket_connect(f"/ws/presence?study_id=s1&token={good}") as ws:
            assert ws.receive_json()["type"] == "connected"
        with (
            client.websocket_connect(f"/ws/presence?study_id=s1&token={hs256}") as ws,
            pytest.raises(WebSocketDisconnect) as closed,
        ):
            ws.receive_json()
        assert closed.value.code == 4401
