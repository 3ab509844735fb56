"""Property tests of everything that parses untrusted input.

- The WebSocket client-message parser (as ws.py runs it) fails only with ValidationError, whose
  rendering as an error message never fails, and parses every valid message to its model.
- The compact-heartbeat fast path (models.compact_heartbeat) accepts only heartbeats the full
  validation accepts, with the same cursor, and takes every valid heartbeat in its form.
- The id and move-path grammars accept exactly the strings a grammar strategy (and an oracle
  written without regular expressions) accepts, and reject mutated ones.
- codec.decode_envelope fails only with EnvelopeError and round-trips encode_envelope.
- auth.TokenVerifier.principal fails only with AuthError, for garbage, for JWT-shaped garbage
  and for well-signed tokens with arbitrary claims.

No example database (`database=None`) and small example counts: the module runs in seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import string
import sys
import time
from types import SimpleNamespace
from typing import Any, cast

import msgpack
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm
from jwt.api_jwk import PyJWKSet
from jwt.utils import base64url_encode
from pydantic import TypeAdapter, ValidationError

from presence_svc.auth import LATEST_EXPIRY, AuthError, Principal, TokenVerifier, bearer
from presence_svc.codec import EnvelopeError, Outgoing, decode_envelope, encode_envelope, json_text
from presence_svc.models import (
    EVENT_TYPES,
    ID_PATTERN,
    MOVE_PATH_MAX_LENGTH,
    MOVE_PATH_PATTERN,
    ClientMessage,
    HeartbeatMessage,
    Identifier,
    MovePath,
    PingMessage,
    RefreshMessage,
    compact_heartbeat,
)
from presence_svc.node import Node
from presence_svc.redis.keys import Keys
from presence_svc.web.errors import validation_problems
from presence_svc.web.ws import _refresh
from presence_svc.web.ws_connection import Connection

FAST = settings(
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MESSAGES: TypeAdapter[Any] = TypeAdapter(ClientMessage)  # as presence_svc/ws.py builds it
IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)
MOVE_PATH: TypeAdapter[str] = TypeAdapter(MovePath)

# --- strategies ------------------------------------------------------------------------------

ID_FIRST = string.ascii_letters + string.digits
ID_REST = ID_FIRST + "_.:@-"
DIGITS = "0123456789"
# Characters that break naive checks: whitespace and line ends (`$` before a final newline),
# Redis glob and hash-tag characters, non-ASCII digits and letters, case-folding oddities.
TRICKY = list("\n\r\t \x00{}*?[]\\/.:_-@\u0663\uff11\uff41\u00e9\u0130\u017f\u212a\u2028")

ids = st.builds(
    lambda first, rest: first + rest, st.sampled_from(ID_FIRST), st.text(ID_REST, max_size=127)
)
numbers = st.text(DIGITS, min_size=1, max_size=4)
variations = st.builds(lambda var, ply: f".var{var}.{ply}", numbers, numbers)
move_paths = st.one_of(
    st.just("main"),
    st.builds(
        lambda ply, rest: f"main.{ply}" + "".join(rest), numbers, st.lists(variations, max_size=8)
    ),
    # Long ones, 390 to 660 characters: around the 512-character limit.
    st.builds(
        lambda ply, rest: f"main.{ply}" + "".join(rest),
        numbers,
        st.lists(
            st.builds(
                lambda v, p: f".var{v}.{p}",
                st.text(DIGITS, min_size=3, max_size=4),
                st.text(DIGITS, min_size=3, max_size=4),
            ),
            min_size=35,
            max_size=50,
        ),
    ),
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities too: json.dumps writes them, JSON forbids them
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[str]) -> str:
    """A valid string with one to three edits (insert, delete, replace, a newline at the end)."""
    text = draw(valid)
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["insert", "delete", "replace", "newline", "prefix"]))
        at = draw(st.integers(0, len(text)))
        char = draw(st.sampled_from(TRICKY) | st.characters() | st.sampled_from(ID_REST))
        if edit == "insert":
            text = text[:at] + char + text[at:]
        elif edit == "delete" and text:
            text = text[:at] + text[at + 1 :]
        elif edit == "replace" and at < len(text):
            text = text[:at] + char + text[at + 1 :]
        elif edit == "newline":
            text += "\n"
        else:
            text = char + text
    return text


# --- oracles, written without regular expressions --------------------------------------------


def is_identifier(text: str) -> bool:
    return (
        1 <= len(text) <= 128 and text[0] in ID_FIRST and all(char in ID_REST for char in text[1:])
    )


def _is_number(text: str) -> bool:
    return 1 <= len(text) <= 4 and all(char in DIGITS for char in text)


def in_move_grammar(text: str) -> bool:
    """The move-path grammar, regardless of length."""
    parts = text.split(".")
    if parts[0] != "main":
        return False
    rest = parts[1:]
    if not rest:
        return True
    if not _is_number(rest[0]) or len(rest) % 2 == 0:
        return False
    pairs = zip(rest[1::2], rest[2::2], strict=True)
    return all(v.startswith("var") and _is_number(v[3:]) and _is_number(p) for v, p in pairs)


def accepts(adapter: TypeAdapter[str], text: str) -> bool:
    try:
        adapter.validate_python(text)
    except ValidationError:
        return False
    return True


# --- the WebSocket message parser ------------------------------------------------------------


def parse_like_the_socket(frame: str | bytes) -> Any:
    """What ws.py does with a frame: a message, or the error it would send (never a crash)."""
    try:
        return MESSAGES.validate_json(frame)
    except ValidationError as exc:
        problems = validation_problems(exc)
        error = {"code": "invalid_message", "message": "message not understood", "errors": problems}
        json.loads(json_text({"type": "error", "data": error}))
        assert problems, "an error without problems tells the client nothing"
        return None


heartbeats = st.fixed_dictionaries(
    {"type": st.just("heartbeat")},
    optional={
        "chapter_id": st.none() | ids,
        "move_path": st.none() | move_paths.filter(lambda p: len(p) <= MOVE_PATH_MAX_LENGTH),
    },
)
refreshes = st.fixed_dictionaries(
    {"type": st.just("refresh"), "token": st.text(min_size=1, max_size=300)}
)


@st.composite
def near_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message, perhaps with one field changed, added or dropped."""
    message = dict(draw(st.just({"type": "ping"}) | heartbeats | refreshes))
    change = draw(st.sampled_from(["none", "value", "add", "drop", "type"]))
    if change == "value":
        message[draw(st.sampled_from(sorted(message)))] = draw(json_values)
    elif change == "add":
        field = draw(st.sampled_from(["chapter_id", "move_path", "token", "study_id", "Type"]))
        message[field] = draw(ids | move_paths | json_values)
    elif change == "drop":
        del message[draw(st.sampled_from(sorted(message)))]
    elif change == "type":
        message["type"] = draw(st.sampled_from(["ping", "heartbeat", "refresh", "Ping", ""]))
    return message


@FAST
@given(
    st.text()
    | st.binary()
    | json_values.map(json.dumps)
    | near_messages().map(json.dumps)
    | near_messages().map(lambda m: json.dumps(m).encode())
)
@example("[" * 5000)
@example('{"type": "heartbeat", "move_path": "main.1\\n"}')
@example(b'{"type": "ping"}\xff')
@example('{"type": "ping", "type": "refresh"}')
def test_the_message_parser_fails_only_with_validation_errors(frame: str | bytes) -> None:
    message = parse_like_the_socket(frame)
    assert message is None or isinstance(message, PingMessage | HeartbeatMessage | RefreshMessage)


def _encode(
    message: dict[str, Any], order: list[str], compact: bool, as_bytes: bool
) -> str | bytes:
    ordered = {key: message[key] for key in order}
    text = json.dumps(ordered, separators=(",", ":") if compact else (", ", ": "))
    return text.encode() if as_bytes else text


@FAST
@given(st.data(), st.just({"type": "ping"}) | heartbeats | refreshes, st.booleans(), st.booleans())
def test_valid_messages_parse_to_their_model(
    data: st.DataObject, message: dict[str, Any], compact: bool, as_bytes: bool
) -> None:
    order = data.draw(st.permutations(list(message)))
    parsed = parse_like_the_socket(_encode(message, order, compact, as_bytes))
    kind = {"ping": PingMessage, "heartbeat": HeartbeatMessage, "refresh": RefreshMessage}
    assert type(parsed) is kind[message["type"]]
    assert parsed.model_dump(exclude_unset=True) == message
    if isinstance(parsed, HeartbeatMessage):
        cursor = parsed.cursor()
        assert cursor.sets_chapter == ("chapter_id" in message)
        assert cursor.sets_move_path == ("move_path" in message)
        assert cursor.chapter_id == message.get("chapter_id")
        assert cursor.move_path == message.get("move_path")


# --- the compact heartbeat fast path --------------------------------------------------------


@st.composite
def compact_heartbeats(draw: st.DrawFn) -> str:
    """Heartbeats as clients write them (compact, fields in order), valid or nearly so."""
    fields: dict[str, Any] = {"type": "heartbeat"}
    if draw(st.booleans()):
        fields["chapter_id"] = draw(ids | mutated(ids) | st.none() | json_values)
    if draw(st.booleans()):
        fields["move_path"] = draw(move_paths | mutated(move_paths) | st.none() | json_values)
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=draw(st.booleans()))
    if draw(st.integers(0, 3)) == 0:
        text = draw(mutated(st.just(text)))
    return text


@FAST
@given(compact_heartbeats() | near_messages().map(lambda m: json.dumps(m, separators=(",", ":"))))
@example('{"type":"heartbeat","move_path":"main.1\\n"}')
@example('{"type":"heartbeat","chapter_id":"a","chapter_id":"b"}')
@example('{"type":"heartbeat","move_path":"main.1"}\n')
def test_the_compact_heartbeat_path_agrees_with_full_validation(text: str) -> None:
    fast = compact_heartbeat(text)
    try:
        full = MESSAGES.validate_json(text)
    except ValidationError:
        assert fast is None  # the full validation then sends its errors
        return
    if fast is not None:
        assert isinstance(full, HeartbeatMessage)
        assert full.cursor() == fast


@FAST
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "chapter_id": ids,
            "move_path": move_paths.filter(lambda p: len(p) <= MOVE_PATH_MAX_LENGTH),
        },
    )
)
def test_every_compact_heartbeat_takes_the_fast_path(cursor: dict[str, str]) -> None:
    ordered = {key: cursor[key] for key in ("chapter_id", "move_path") if key in cursor}
    text = json.dumps({"type": "heartbeat", **ordered}, separators=(",", ":"))
    assert compact_heartbeat(text) == MESSAGES.validate_json(text).cursor()


def test_the_refresh_token_length_limit() -> None:
    assert isinstance(
        parse_like_the_socket(json.dumps({"type": "refresh", "token": "t" * 8192})), RefreshMessage
    )
    assert parse_like_the_socket(json.dumps({"type": "refresh", "token": "t" * 8193})) is None
    assert parse_like_the_socket(json.dumps({"type": "refresh", "token": ""})) is None


# --- the grammars ----------------------------------------------------------------------------


@FAST
@given(ids)
def test_generated_ids_are_accepted_and_are_their_own_hash_tag(study_id: str) -> None:
    assert is_identifier(study_id)
    assert re.fullmatch(ID_PATTERN, study_id)  # how ws.py, http.py and auth.py check ids
    assert accepts(IDENTIFIER, study_id)  # how the request models check them
    index = Keys("presence").study(study_id).index
    assert index == f"presence:{{{study_id}}}:index"
    assert index[index.index("{") + 1 : index.index("}")] == study_id


@FAST
@given(mutated(ids) | st.text(max_size=140))
@example("a\n")
@example("a" * 129)
@example("\u0663")
@example("a{b}")
def test_ids_are_accepted_exactly_when_the_grammar_says(text: str) -> None:
    expected = is_identifier(text)
    assert bool(re.fullmatch(ID_PATTERN, text)) == expected
    assert accepts(IDENTIFIER, text) == expected
    if expected:
        assert not set(text) & set("{}*?[] \t\n\\")


@FAST
@given(move_paths)
def test_generated_move_paths_are_accepted_up_to_the_length_limit(path: str) -> None:
    assert in_move_grammar(path)
    assert re.fullmatch(MOVE_PATH_PATTERN, path)
    assert accepts(MOVE_PATH, path) == (len(path) <= MOVE_PATH_MAX_LENGTH)


@FAST
@given(mutated(move_paths) | st.text(DIGITS + ".mainvr", max_size=40))
@example("main.1\n")
@example("main.")
@example("main.12.var2")
@example("main.12345")
@example("main.\u0663")
@example("main.1.var1.1.")
def test_move_paths_are_accepted_exactly_when_the_grammar_says(text: str) -> None:
    grammatical = in_move_grammar(text)
    assert bool(re.fullmatch(MOVE_PATH_PATTERN, text)) == grammatical
    assert accepts(MOVE_PATH, text) == (grammatical and len(text) <= MOVE_PATH_MAX_LENGTH)


def test_the_move_path_length_limit_is_exact() -> None:
    # "main.9999" + 38 variations of 13 characters = 503; one more of 9 or 10 characters.
    base = "main.9999" + ".var9999.9999" * 38
    assert len(base + ".var12.12") == 512 and accepts(MOVE_PATH, base + ".var12.12")
    assert len(base + ".var12.123") == 513 and not accepts(MOVE_PATH, base + ".var12.123")


# --- the channel envelope --------------------------------------------------------------------

msgpack_ints = st.integers(-(2**63), 2**64 - 1)
jsonable = st.recursive(
    st.none()
    | st.booleans()
    | msgpack_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
event_types = (
    st.sampled_from(EVENT_TYPES)
    | st.text(min_size=1, max_size=30)
    | st.text(max_size=10).map(lambda t: "presence." + t)
)


@FAST
@given(
    event_types,
    st.dictionaries(st.text(max_size=8), jsonable, max_size=5)
    | st.builds(
        lambda data, seq: {**data, "seq": seq},
        st.dictionaries(st.text(max_size=8), jsonable, max_size=3),
        jsonable,
    ),
    st.integers(0, 2**53),
)
def test_envelopes_round_trip(event_type: str, data: dict[str, Any], ts: int) -> None:
    out = decode_envelope(encode_envelope(event_type, data, ts))
    assert json.loads(out.text) == {"type": event_type, "data": data}
    seq = data.get("seq")
    # A bool is an int to Python, but true or false is no seq.
    is_seq = isinstance(seq, int) and not isinstance(seq, bool)
    presence = event_type.startswith("presence.") and is_seq
    assert out.seq == (seq if presence else None)
    assert out.floor is None


msgpack_scalars = (
    st.none()
    | st.booleans()
    | msgpack_ints
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=6))
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=6) | st.binary(max_size=4) | st.integers(-5, 5), inner, max_size=4
        )
    ),
    max_leaves=12,
)
envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "type": event_types | msgpack_values,
        "data": st.dictionaries(st.text(max_size=6), msgpack_values, max_size=4) | msgpack_values,
        "ts": msgpack_values,
    },
)


def decode_or_refuse(raw: bytes) -> Outgoing | None:
    try:
        out = decode_envelope(raw)
    except EnvelopeError:
        return None
    # Whether the text is valid JSON, not whether Python's stack is deep enough to parse it:
    # a relayed message nested near the recursion limit must parse in a client (a browser has
    # no such limit), however many frames deep this check runs.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 5000)
    try:
        parsed = json.loads(out.text)
    finally:
        sys.setrecursionlimit(limit)
    assert isinstance(parsed["type"], str)
    return out


@FAST
@given(
    st.binary(max_size=200)
    | msgpack_values.map(msgpack.packb)
    | envelope_like.map(msgpack.packb)
    | envelope_like.map(msgpack.packb).flatmap(
        lambda raw: st.integers(0, max(0, len(raw) - 1)).map(lambda cut: raw[:cut])
    )
)
@example(b"\xc1")  # never used in msgpack
@example(b"\xdb\xff\xff\xff\xff")  # a 4 GiB string that is not there
def test_decoding_fails_only_with_envelope_errors(raw: bytes) -> None:
    decode_or_refuse(raw)


def test_deeply_nested_data_is_refused_not_raised() -> None:
    # A backend's PUBLISH of an envelope nested about 1000 deep made json.dumps raise
    # RecursionError, which escaped decode_envelope and dropped the node's pub/sub connection
    # (fanout.py reconnects and resyncs every study). msgpack itself stops at 1024 levels.
    head = msgpack.packb({"type": "study.x", "data": {"a": 0}})[:-1]  # the value 0 dropped

    def at_depth(depth: int, stack: int) -> Outgoing | None:
        # Called under `stack` extra frames, as decode_envelope is deep inside fanout.py.
        if stack:
            return at_depth(depth, stack - 1)
        return decode_or_refuse(head + b"\x91" * depth + b"\x90")

    for depth in range(800, 1100, 3):
        for stack in (0, 100):
            at_depth(depth, stack)


# --- bearer tokens ---------------------------------------------------------------------------

SECRET = "property-test-secret-of-at-least-32-bytes"
EC_KEYS = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("k1", "k2")}
JWKS = PyJWKSet.from_dict(
    {
        "keys": [
            {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "ES256"}
            for kid, key in EC_KEYS.items()
        ]
    }
)
VERIFIERS = {
    "hs256": TokenVerifier(SECRET),
    "hs256-aud-iss": TokenVerifier(
        SECRET, audience="presence", issuer="https://id.example", leeway=5
    ),
    "es256-jwks": TokenVerifier(None, jwks=JWKS, algorithm="ES256"),
}
ES256 = ECAlgorithm(ECAlgorithm.SHA256)
NOW = int(time.time())
B64URL = string.ascii_letters + string.digits + "-_"


def segment(value: bytes) -> str:
    return base64url_encode(value).decode()


def signed(claims: bytes, verifier: str, header: dict[str, Any] | None = None) -> str:
    """`claims` (raw JSON bytes) signed as `verifier` expects, under `header` (both unchecked:
    PyJWT's encoder would refuse some of what this test wants to send)."""
    if verifier.startswith("hs256"):
        head = {"alg": "HS256", "typ": "JWT", **(header or {})}
    else:
        head = {"alg": "ES256", "typ": "JWT", "kid": "k1", **(header or {})}
    body = f"{segment(json.dumps(head).encode())}.{segment(claims)}"
    if verifier.startswith("hs256"):
        signature = hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).digest()
    else:  # the JWS form of an ES256 signature (r || s), as PyJWT makes it
        signature = ES256.sign(body.encode(), EC_KEYS["k1"])
    return f"{body}.{segment(signature)}"


headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["HS256", "ES256", "RS256", "none", "None", "HS512", ""])
        | json_values,
        "kid": st.sampled_from(["k1", "k2", "k3"]) | json_values,
        "typ": json_values,
        "crit": json_values,
        "b64": json_values,
    },
)
times = (
    st.integers(-(10**12), 10**12)
    | st.integers(NOW, NOW + 10**6)
    | st.floats()
    | st.text(DIGITS + "e.-", max_size=12)
    | json_values
)
claims = st.fixed_dictionaries(
    {},
    optional={
        "sub": ids | json_values,
        "exp": times,
        "iat": times,
        "nbf": times,
        "aud": st.sampled_from(["presence", "other"]) | st.lists(st.text(max_size=8)) | json_values,
        "iss": st.just("https://id.example") | json_values,
        "studies": st.just("*") | st.lists(ids | st.just("*"), max_size=3) | json_values,
    },
)
# Claims a real issuer would sign (so that some tokens are accepted), with odd extras.
_plausible = {
    "iat": st.integers(NOW - 10**6, NOW),
    "nbf": st.integers(NOW - 10**6, NOW + 10),
    "studies": st.just("*") | st.lists(ids | st.just("*"), max_size=3) | json_values,
    "jti": json_values,
}
plausible_claims = st.fixed_dictionaries(
    {"sub": ids, "exp": st.integers(NOW + 60, NOW + 10**9)}, optional=_plausible
) | st.fixed_dictionaries(
    {
        "sub": ids,
        "exp": st.integers(NOW + 60, NOW + 10**9),
        "aud": st.sampled_from(["presence", "other"]) | st.just(["presence", "x"]),
        "iss": st.sampled_from(["https://id.example", "https://evil.example"]),
    },
    optional=_plausible,
)
jwt_shaped = st.builds(
    lambda parts: ".".join(parts),
    st.lists(
        headers.map(lambda h: segment(json.dumps(h).encode()))
        | claims.map(lambda c: segment(json.dumps(c).encode()))
        | st.binary(max_size=40).map(segment)
        | st.text(B64URL + "=", max_size=40),
        min_size=1,
        max_size=4,
    ),
)
garbage = (
    st.text(max_size=300)
    | st.text(st.characters(max_codepoint=255), max_size=300)  # how Starlette decodes headers
    | jwt_shaped
)


def principal_or_refusal(verifier: TokenVerifier, token: str | None) -> Principal | None:
    try:
        principal = verifier.principal(token)
    except AuthError as exc:
        assert token is None or token not in str(exc) or len(token) < 8, (
            "the error repeats the token"
        )
        return None
    assert re.fullmatch(ID_PATTERN, principal.user_id)
    assert math.isfinite(principal.expires_at)
    assert all(isinstance(s, str) for s in principal.studies)
    return principal


@FAST
@given(st.sampled_from(sorted(VERIFIERS)), st.none() | garbage)
@example("hs256", "")
@example("hs256", "a.b.c")
@example("es256-jwks", "eyJhbGciOiJub25lIn0.e30.")
def test_verifying_garbage_fails_only_with_auth_errors(verifier: str, token: str | None) -> None:
    assert principal_or_refusal(VERIFIERS[verifier], token) is None


def _claims_json(value: Any) -> bytes:
    return json.dumps(value).encode()


@FAST
@given(
    st.sampled_from(sorted(VERIFIERS)),
    (plausible_claims | claims).map(_claims_json) | json_values.map(_claims_json),
    st.none() | st.none() | headers,
)
@example("hs256", _claims_json({"sub": "alice", "exp": 2**62}), None)
@example("hs256", _claims_json({"sub": "alice", "exp": "9" * 30}), None)
@example("hs256", _claims_json({"sub": "alice", "exp": float("inf")}), None)
@example("hs256", _claims_json({"sub": "alice", "exp": True}), None)
@example(
    "hs256-aud-iss", _claims_json({"sub": "a", "exp": 2**40, "aud": [None], "iss": ["x"]}), None
)
def test_well_signed_tokens_with_any_claims_fail_only_with_auth_errors(
    verifier: str, body: bytes, header: dict[str, Any] | None
) -> None:
    token = signed(body, verifier, header)
    principal = principal_or_refusal(VERIFIERS[verifier], token)
    if principal is not None:  # accepted: then the claims were what the service needs
        payload = json.loads(body)
        assert principal.user_id == payload["sub"]
        assert principal.expires_at > time.time() - 5


@FAST
@given(st.text(st.characters(max_codepoint=255), max_size=100))
def test_bearer_header_parsing_never_fails(header: str) -> None:
    token = bearer(header)
    assert token is None or (token and token == token.strip())


def _signed_hs256(payload: dict[str, Any]) -> str:
    return signed(_claims_json(payload), "hs256")


def test_a_signed_exp_beyond_float_range_counts_as_the_latest_date() -> None:
    # Accepted, not a 500: the key holder signed it; it simply never expires in practice.
    principal = TokenVerifier(SECRET).principal(_signed_hs256({"sub": "alice", "exp": 10**400}))
    assert principal.expires_at == LATEST_EXPIRY


def test_a_refresh_with_a_far_future_exp_is_answered() -> None:
    token = _signed_hs256({"sub": "alice", "exp": 253402300800})  # 10000-01-01
    verifier = TokenVerifier(SECRET)
    node = cast(
        Node,
        SimpleNamespace(
            verifier=verifier, settings=SimpleNamespace(study_grant_required=False), clock=None
        ),
    )
    conn = cast(Connection, SimpleNamespace(expire_at=lambda when, clock: None))
    current = verifier.principal(_signed_hs256({"sub": "alice", "exp": int(time.time()) + 60}))
    answer = _refresh(node, conn, current, token, "s1")
    assert json.loads(answer.text)["type"] == "refreshed"
