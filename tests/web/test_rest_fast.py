"""The REST heartbeat's short ways hold to the long ones they replace.

- `models.rest_heartbeat_fields` (the common body without pydantic) gives what
  `HeartbeatRequest` gives for every body it accepts, and accepts every common body.
- `rest._session_json` renders what `JSONResponse(session.to_json())` renders, byte for byte.
- `rest.HeartbeatShortcut` (past ExceptionMiddleware and the router) answers every request as
  the router's way does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import fakeredis
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.testclient import TestClient

from presence_svc.app import create_app
from presence_svc.models import (
    MOVE_PATH_MAX_LENGTH,
    HeartbeatRequest,
    Session,
    Status,
    rest_heartbeat_fields,
)
from presence_svc.settings import Settings
from presence_svc.web import rest
from presence_svc.web.rest import HEARTBEAT_PATH, HeartbeatShortcut
from tests.support.app import make_settings, unreachable_redis
from tests.support.auth import auth
from tests.test_properties import FAST, ids, json_values, move_paths, mutated

# --- the body's fast path ----------------------------------------------------------------------

SPACES = st.sampled_from(["", " ", "\n", "\t", "\r\n  ", "\x0c", "\x0b", "\u00a0"])


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Heartbeat bodies as clients write them (any spacing, fields in order) or nearly so:
    invalid values, nulls, other JSON, reordered or repeated fields, edits to the text."""
    fields: list[tuple[str, Any]] = [("study_id", draw(ids | mutated(ids) | json_values))]
    for name, valid in (("chapter_id", ids), ("move_path", move_paths)):
        if draw(st.booleans()):
            fields.append((name, draw(valid | mutated(valid) | st.none() | json_values)))
    if draw(st.integers(0, 4)) == 0:
        fields = draw(st.permutations(fields))
    if draw(st.integers(0, 6)) == 0:
        fields.append(draw(st.sampled_from(fields)))  # a field twice
    if draw(st.integers(0, 6)) == 0:
        fields.append(("other", 1))
    space = draw(SPACES)
    members = [
        f"{json.dumps(k)}{space}:{draw(SPACES)}{json.dumps(v, ensure_ascii=draw(st.booleans()))}"
        for k, v in fields
    ]
    text = f"{draw(SPACES)}{{{space}{(',' + space).join(members)}{space}}}{draw(SPACES)}"
    if draw(st.integers(0, 3)) == 0:
        text = draw(mutated(st.just(text)))
    return text.encode("utf-8", "surrogatepass")


@FAST
@given(bodies())
@example(b'{"study_id":"s1","study_id":"s2"}')
@example(b'{"study_id":"s1","chapter_id":null,"move_path":null}')
@example(b'{"study_id":"s1"}\x0c')
@example(b'\xef\xbb\xbf{"study_id":"s1"}')
@example(b'{"study_id":"s1\\n"}')
@example(b'{"study_id":"s1","move_path":"main.1\\n"}')
@example(b'{"study_id":"s\\u0031"}')
@example(b'{"study_id":"s1"}{"study_id":"s1"}')
def test_the_fast_body_path_agrees_with_full_validation(body: bytes) -> None:
    fast = rest_heartbeat_fields(body)
    try:
        full = HeartbeatRequest.model_validate_json(body)
    except ValidationError:
        assert fast is None  # the full validation then answers with its errors
        return
    if fast is not None:
        assert fast == (full.study_id, full.cursor())


@FAST
@given(
    ids,
    st.fixed_dictionaries(
        {},
        optional={
            "chapter_id": ids | st.none(),
            "move_path": move_paths.filter(lambda p: len(p) <= MOVE_PATH_MAX_LENGTH) | st.none(),
        },
    ),
    st.sampled_from([(",", ":"), (", ", ": "), (",", ": ")]),
)
def test_every_common_body_takes_the_fast_path(
    study: str, cursor: dict[str, str | None], separators: tuple[str, str]
) -> None:
    ordered = {key: cursor[key] for key in ("chapter_id", "move_path") if key in cursor}
    body = json.dumps({"study_id": study, **ordered}, separators=separators).encode()
    full = HeartbeatRequest.model_validate_json(body)
    assert rest_heartbeat_fields(body) == (full.study_id, full.cursor())


def test_an_overlong_move_path_goes_to_full_validation() -> None:
    path = "main.1" + ".var1.1" * 100
    assert len(path) > MOVE_PATH_MAX_LENGTH
    assert rest_heartbeat_fields(json.dumps({"study_id": "s", "move_path": path}).encode()) is None


# --- the answer's rendering ----------------------------------------------------------------------

texts = st.text(max_size=40)


@FAST
@given(
    st.builds(
        Session,
        session_id=texts,
        user_id=texts,
        study_id=texts,
        chapter_id=texts | st.none(),
        move_path=texts | st.none(),
        status=st.sampled_from(Status),
        last_heartbeat_ms=st.integers(0, 253_402_300_799_999),
        joined_at_ms=st.integers(0, 253_402_300_799_999),
    )
)
@example(Session("s", 'a"b\\c\x00\u2028é', "st", None, "main.1", Status.IDLE, 0, 1))
def test_the_session_renders_as_json_response_renders_it(session: Session) -> None:
    assert rest._session_json(session) == JSONResponse(session.to_json()).body


# --- the shortcut against the router -------------------------------------------------------------


@contextmanager
def _apps(settings: Settings, redis: Callable[[], Any]) -> Iterator[tuple[TestClient, TestClient]]:
    """Two nodes of one Redis: the app as built, and the same without the shortcut."""
    clients = redis(), redis()
    shortcut = create_app(settings, redis=clients[0])
    routed = create_app(settings, redis=clients[1])
    routed.user_middleware = [
        m
        for m in routed.user_middleware
        if m.cls is not HeartbeatShortcut  # type: ignore[comparison-overlap]
    ]
    assert len(routed.user_middleware) == len(shortcut.user_middleware) - 1
    with TestClient(shortcut) as a, TestClient(routed) as b:
        try:
            yield a, b
        finally:  # in each app's own loop, as tests.support.app does
            a.portal.call(clients[0].aclose)  # type: ignore[union-attr]
            b.portal.call(clients[1].aclose)  # type: ignore[union-attr]


def _answer(response: Any) -> tuple[int, dict[str, str], Any]:
    body = response.json()
    if response.status_code == 200:  # the second heartbeat of the pair is a little later
        body.pop("last_heartbeat")
    headers = dict(response.headers)
    if response.status_code == 200:
        headers.pop("content-length")
    return response.status_code, headers, body


def _requests() -> list[tuple[dict[str, str], bytes]]:
    alice, grants_s1 = auth("alice"), auth("bob", studies=["s1"])
    json_type = {"Content-Type": "application/json", "X-Request-ID": "r-1"}
    origin = {"Origin": "https://app.example"}
    return [
        ({**alice, **json_type}, b'{"study_id":"s1","chapter_id":"c1"}'),
        ({**alice, **json_type, **origin}, b'{"study_id": "s1", "move_path": "main.2"}'),
        ({**alice, **json_type}, b'{"move_path":"main.3","study_id":"s1"}'),  # pydantic's way
        ({**json_type}, b'{"study_id":"s1"}'),  # no token: 401
        ({"Authorization": "Bearer nope", **json_type, **origin}, b'{"study_id":"s1"}'),
        ({**alice, **json_type}, b'{"study_id":"s1"'),  # 400
        ({**alice, **json_type}, b'{"study_id":"s 1","chapter_id":7}'),  # 422
        ({**grants_s1, **json_type}, b'{"study_id":"s2"}'),  # 403
        ({**grants_s1, **json_type}, b'{"study_id":"s1"}'),
        ({**grants_s1, **json_type}, b'{"study_id":"s1"}'),  # 429: bob's second in a second
    ]


def test_the_shortcut_answers_as_the_router_does() -> None:
    server = fakeredis.FakeServer()
    settings = make_settings(
        require_study_grant=True,
        rest_heartbeat_rate=1,
        rest_heartbeat_burst=1,
        allowed_origins="https://app.example",
    )
    seen = set()
    with _apps(settings, lambda: fakeredis.FakeAsyncRedis(server=server)) as (a, b):
        for headers, body in _requests():
            first = _answer(a.post(HEARTBEAT_PATH, content=body, headers=headers))
            # The other node, a moment later: bob's bucket is per node, so he is as fresh.
            assert _answer(b.post(HEARTBEAT_PATH, content=body, headers=headers)) == first
            seen.add(first[0])
    assert seen == {200, 400, 401, 403, 422, 429}


def test_the_shortcut_answers_503_as_the_router_does() -> None:
    with _apps(make_settings(), unreachable_redis) as (a, b):
        headers = {**auth(), "X-Request-ID": "r-2"}
        answers = [c.post(HEARTBEAT_PATH, json={"study_id": "s1"}, headers=headers) for c in (a, b)]
        assert answers[0].status_code == 503
        assert _answer(answers[0]) == _answer(answers[1])


def test_only_what_the_router_sends_to_the_heartbeat_takes_the_shortcut() -> None:
    app = create_app(make_settings())
    # The router's first full match for the shortcut's requests is the heartbeat endpoint.
    scope = {"type": "http", "path": HEARTBEAT_PATH, "root_path": "", "method": "POST"}
    matched = next(r for r in app.routes if r.matches(scope)[0] == Match.FULL)
    assert getattr(matched, "endpoint", None) is rest.heartbeat
    # Anything else goes on to the router.
    passed: list[dict[str, Any]] = []

    async def router(scope: Any, receive: Any, send: Any) -> None:
        passed.append(scope)

    shortcut = HeartbeatShortcut(router)
    others = [
        {"type": "http", "path": HEARTBEAT_PATH, "method": "GET"},
        {"type": "http", "path": HEARTBEAT_PATH + "/", "method": "POST"},
        {"type": "http", "path": "/api" + HEARTBEAT_PATH, "root_path": "/api", "method": "POST"},
        {"type": "websocket", "path": HEARTBEAT_PATH},
        {"type": "lifespan"},
    ]
    for other in others:
        asyncio.run(shortcut(other, None, None))  # type: ignore[arg-type]
    assert passed == others


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyError("x")])
def test_an_exception_without_a_handler_is_a_500(
    monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    async def broken(*args: Any) -> bytes:
        raise failure

    monkeypatch.setattr(rest, "_heartbeat", broken)
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as client:
        response = client.post(HEARTBEAT_PATH, json={"study_id": "s1"}, headers=auth())
    assert response.status_code == 500
    assert response.text == "Internal Server Error"


def test_the_answer_is_what_json_response_sent() -> None:
    """Status, headers in order and body bytes, as `JSONResponse(session.to_json())` sent them
    (then CORS's Vary and the request id)."""
    with TestClient(create_app(make_settings())) as client:
        headers = {**auth(), "X-Request-ID": "r-3"}
        response = client.post(HEARTBEAT_PATH, json={"study_id": "s1"}, headers=headers)
    assert response.status_code == 200
    expected = JSONResponse(response.json())
    assert response.content == expected.body
    assert response.headers.raw == [
        *expected.raw_headers,
        (b"vary", b"Origin"),
        (b"x-request-id", b"r-3"),
    ]
