"""REST API through Starlette's TestClient (lifespan included) on fakeredis."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
from starlette.testclient import TestClient

from presence_svc.app import create_app
from presence_svc.models import MOVE_PATH_MAX_LENGTH
from presence_svc.settings import DEV_JWT_SECRET, Settings
from presence_svc.store import StoreUnavailable
from presence_svc.sweeper import Sweeper
from tests.support import app as support_app
from tests.support.app import app_client, unreachable_redis
from tests.support.auth import SECRET, auth, token
from tests.support.waiting import eventually

ISO_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SESSION_FIELDS = {
    "session_id",
    "user_id",
    "study_id",
    "chapter_id",
    "move_path",
    "status",
    "last_heartbeat",
    "joined_at",
}


def make_settings(key_prefix: str, jwt_secret: str | None = SECRET) -> Settings:
    # Long thresholds: nothing turns idle while a test runs.
    return support_app.make_settings(
        key_prefix,
        jwt_secret=jwt_secret,
        idle_after=30,
        away_after=60,
        expire_after=90,
        sweep_interval=0.1,
    )


def past_this_millisecond() -> None:
    """Wait until the wall clock (the service's) has reached a later millisecond than now."""
    now_ms = int(time.time() * 1000)
    eventually(lambda: int(time.time() * 1000) > now_ms, within=1.0, what="the next millisecond")


def parse_iso(text: str) -> datetime:
    assert ISO_MS_Z.match(text), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@pytest.fixture
def settings(key_prefix: str) -> Settings:
    return make_settings(key_prefix)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with app_client(settings) as tc:
        yield tc


@pytest.fixture
def down_client(settings: Settings) -> Iterator[TestClient]:
    """An app whose Redis is a closed loopback port (no retries, so failures are quick)."""
    with app_client(settings, redis=unreachable_redis()) as tc:
        yield tc


def heartbeat(client: TestClient, body: Any, user: str = "alice") -> Any:
    response = client.post("/presence/heartbeat", json=body, headers=auth(user))
    assert response.status_code == 200, response.text
    return response.json()


def presence(client: TestClient, study: str, user: str = "alice") -> Any:
    response = client.get(f"/presence/{study}", headers=auth(user))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def assert_error(response: Any, status: int, code: str) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == code
    return body["detail"]


def assert_problems(response: Any) -> list[dict[str, Any]]:
    detail = assert_error(response, 422, "validation_error")
    assert isinstance(detail, list)
    assert detail
    for problem in detail:
        assert set(problem) == {"loc", "msg", "type"}
        assert isinstance(problem["loc"], list)
        assert isinstance(problem["msg"], str)
        assert problem["msg"]
        assert isinstance(problem["type"], str)
    return detail


# --- heartbeat ---------------------------------------------------------------------------


def test_heartbeat_returns_the_session(client: TestClient) -> None:
    before = datetime.now(UTC)
    body = heartbeat(
        client, {"study_id": "study-1", "chapter_id": "ch1", "move_path": "main.1.var1.1"}
    )
    after = datetime.now(UTC)

    assert set(body) == SESSION_FIELDS
    assert body["user_id"] == "alice"  # from the token, not the body
    assert body["study_id"] == "study-1"
    assert body["chapter_id"] == "ch1"
    assert body["move_path"] == "main.1.var1.1"
    assert body["status"] == "active"
    assert re.fullmatch(r"[0-9a-f]{32}", body["session_id"])
    assert body["joined_at"] == body["last_heartbeat"]
    beat = parse_iso(body["last_heartbeat"])
    # Millisecond precision: allow for the truncation of `before`.
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= beat <= after


def test_heartbeat_without_cursor_fields_gives_nulls(client: TestClient) -> None:
    body = heartbeat(client, {"study_id": "s1"})
    assert body["chapter_id"] is None
    assert body["move_path"] is None


def test_second_heartbeat_keeps_the_session_and_refreshes_its_time(client: TestClient) -> None:
    first = heartbeat(client, {"study_id": "s1", "chapter_id": "c1"})
    past_this_millisecond()
    second = heartbeat(client, {"study_id": "s1"})
    assert second["session_id"] == first["session_id"]
    assert second["joined_at"] == first["joined_at"]
    assert parse_iso(second["last_heartbeat"]) > parse_iso(first["last_heartbeat"])
    # An omitted cursor field keeps its value.
    assert second["chapter_id"] == "c1"


def test_heartbeat_null_clears_a_cursor_field_and_omitted_keeps_it(client: TestClient) -> None:
    heartbeat(client, {"study_id": "s1", "chapter_id": "c1", "move_path": "main.1"})
    body = heartbeat(client, {"study_id": "s1", "move_path": None})
    assert body["chapter_id"] == "c1"
    assert body["move_path"] is None
    shown = presence(client, "s1")["users"][0]
    assert shown["chapter_id"] == "c1"
    assert shown["move_path"] is None


def test_sessions_are_per_user_and_per_study(client: TestClient) -> None:
    a1 = heartbeat(client, {"study_id": "s1"}, user="alice")
    a2 = heartbeat(client, {"study_id": "s2"}, user="alice")
    b1 = heartbeat(client, {"study_id": "s1"}, user="bob")
    assert len({a1["session_id"], a2["session_id"], b1["session_id"]}) == 3


# --- GET -----------------------------------------------------------------------------------


def test_get_unknown_study_is_empty(client: TestClient) -> None:
    assert presence(client, "nobody-here") == {
        "study_id": "nobody-here",
        "users": [],
        "total": 0,
        "counts": {"active": 0, "idle": 0, "away": 0},
        "seq": 0,
        "complete": True,
    }


def test_get_after_heartbeats(client: TestClient) -> None:
    alice = heartbeat(
        client, {"study_id": "s1", "chapter_id": "c1", "move_path": "main.2"}, "alice"
    )
    past_this_millisecond()  # distinct joined_at, so the order is by join time
    bob = heartbeat(client, {"study_id": "s1"}, "bob")
    heartbeat(client, {"study_id": "other"}, "carol")

    body = presence(client, "s1", user="carol")  # any authenticated user may read
    assert set(body) == {"study_id", "users", "total", "counts", "seq", "complete"}
    assert body["study_id"] == "s1"
    assert body["total"] == 2
    assert body["counts"] == {"active": 2, "idle": 0, "away": 0}
    assert body["complete"] is True  # no parameters: everyone
    assert body["users"] == [alice, bob]  # same shape as the heartbeat reply, in join order
    assert body["seq"] == 2  # two user_joined events


def test_seq_counts_events_not_heartbeats(client: TestClient) -> None:
    heartbeat(client, {"study_id": "s1"})
    assert presence(client, "s1")["seq"] == 1
    heartbeat(client, {"study_id": "s1"})  # nothing changed: no event
    assert presence(client, "s1")["seq"] == 1
    heartbeat(client, {"study_id": "s1", "move_path": "main.1"})  # cursor_moved
    assert presence(client, "s1")["seq"] == 2
    heartbeat(client, {"study_id": "s1", "move_path": "main.1"})  # same cursor: no event
    assert presence(client, "s1")["seq"] == 2


# --- DELETE --------------------------------------------------------------------------------


def test_delete_is_idempotent(client: TestClient) -> None:
    heartbeat(client, {"study_id": "s1"}, "alice")
    heartbeat(client, {"study_id": "s1"}, "bob")

    for _ in range(2):
        response = client.delete("/presence/s1", headers=auth("alice"))
        assert response.status_code == 200
        assert response.json() == {"status": "success"}

    body = presence(client, "s1")
    assert [u["user_id"] for u in body["users"]] == ["bob"]
    assert body["total"] == 1
    assert body["seq"] == 3  # two joins and exactly one user_left


def test_delete_without_a_session_succeeds(client: TestClient) -> None:
    response = client.delete("/presence/never-joined", headers=auth())
    assert response.status_code == 200
    assert response.json() == {"status": "success"}
    assert presence(client, "never-joined")["seq"] == 0


def test_delete_last_user_keeps_the_seq(client: TestClient) -> None:
    heartbeat(client, {"study_id": "s1"})
    client.delete("/presence/s1", headers=auth())
    assert presence(client, "s1") == {
        "study_id": "s1",
        "users": [],
        "total": 0,
        "counts": {"active": 0, "idle": 0, "away": 0},
        "seq": 2,
        "complete": True,
    }
    rejoined = heartbeat(client, {"study_id": "s1"})
    assert presence(client, "s1")["seq"] == 3
    assert rejoined["status"] == "active"


BAD_STUDY_PATHS = [
    "-starts-with-dash",
    "_underscore-first",
    "a" * 129,
    "has%20space",
    "tab%09",
    "trailing-newline%0A",
    "per%25cent",
    "%C3%A9t%C3%A9",
]


@pytest.mark.parametrize("study", BAD_STUDY_PATHS)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_invalid_study_id_in_path_is_422(client: TestClient, method: str, study: str) -> None:
    response = client.request(method, f"/presence/{study}", headers=auth())
    detail = assert_problems(response)
    assert detail[0]["loc"] == ["path", "study_id"]


def test_longest_valid_study_id_is_accepted(client: TestClient) -> None:
    study = "a" + "b.c:d@e_f-" * 12 + "x" * 7  # 128 characters
    assert len(study) == 128
    assert presence(client, study)["study_id"] == study
    heartbeat(client, {"study_id": study})
    assert presence(client, study)["total"] == 1


# --- authentication ------------------------------------------------------------------------


def _raw(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def _later() -> int:
    return int(time.time()) + 600


BAD_AUTH: dict[str, Callable[[], dict[str, str]]] = {
    "missing": lambda: {},
    "empty": lambda: {"Authorization": ""},
    "bearer-without-token": lambda: {"Authorization": "Bearer "},
    "basic-scheme": lambda: {"Authorization": "Basic YWxpY2U6cHc="},
    "token-without-scheme": lambda: {"Authorization": token("alice")},
    "garbage": lambda: {"Authorization": "Bearer not.a.jwt"},
    "forged": lambda: auth(secret="another-secret-that-is-long-enough-0123456789"),
    "dev-secret-on-configured-node": lambda: auth(secret=DEV_JWT_SECRET),
    "expired": lambda: {
        "Authorization": "Bearer " + _raw({"sub": "alice", "exp": int(time.time()) - 5})
    },
    "no-exp": lambda: {"Authorization": "Bearer " + _raw({"sub": "alice"})},
    "no-sub": lambda: {"Authorization": "Bearer " + _raw({"exp": _later()})},
    "sub-not-an-id": lambda: {
        "Authorization": "Bearer " + _raw({"sub": "alice smith", "exp": _later()})
    },
    "sub-not-a-string": lambda: {"Authorization": "Bearer " + _raw({"sub": 42, "exp": _later()})},
    "wrong-alg": lambda: {
        "Authorization": "Bearer " + _raw({"sub": "alice", "exp": _later()}, algorithm="HS512")
    },
    "alg-none": lambda: {
        "Authorization": "Bearer " + _raw({"sub": "alice", "exp": _later()}, "", "none")
    },
}


@pytest.mark.parametrize("case", sorted(BAD_AUTH))
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/presence/heartbeat", {"study_id": "s1"}),
        ("GET", "/presence/s1", None),
        ("DELETE", "/presence/s1", None),
    ],
)
def test_bad_token_is_401(
    client: TestClient, case: str, method: str, path: str, body: dict[str, str] | None
) -> None:
    heartbeat(client, {"study_id": "s1"})
    response = client.request(method, path, json=body, headers=BAD_AUTH[case]())
    detail = assert_error(response, 401, "unauthorized")
    assert isinstance(detail, str)
    assert detail
    assert response.headers["www-authenticate"] == "Bearer"
    # Nothing changed: alice is still there and no event was published.
    after = presence(client, "s1")
    assert [u["user_id"] for u in after["users"]] == ["alice"]
    assert after["seq"] == 1


def test_expired_token_says_so(client: TestClient) -> None:
    token = _raw({"sub": "alice", "exp": int(time.time()) - 5})
    response = client.get("/presence/s1", headers={"Authorization": f"Bearer {token}"})
    assert assert_error(response, 401, "unauthorized") == "token expired"


def test_auth_is_checked_before_the_body(client: TestClient) -> None:
    response = client.post("/presence/heartbeat", content=b"{not json")
    assert_error(response, 401, "unauthorized")
    response = client.post("/presence/heartbeat", json={"bogus": 1})
    assert_error(response, 401, "unauthorized")
    response = client.get("/presence/-bad-")
    assert_error(response, 401, "unauthorized")


def test_scheme_is_case_insensitive(client: TestClient) -> None:
    response = client.get("/presence/s1", headers={"Authorization": f"bearer {token('alice')}"})
    assert response.status_code == 200


def test_embedded_mode_uses_the_dev_secret(key_prefix: str) -> None:
    with app_client(make_settings(key_prefix, jwt_secret=None)) as tc:
        response = tc.post(
            "/presence/heartbeat",
            json={"study_id": "s1"},
            headers=auth("dev", secret=DEV_JWT_SECRET),
        )
        assert response.status_code == 200
        assert response.json()["user_id"] == "dev"
        assert_error(tc.get("/presence/s1", headers=auth()), 401, "unauthorized")


# --- body validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "study_id"),
        ({"chapter_id": "c1"}, "study_id"),
        ({"study_id": "s1", "user_id": "mallory"}, "user_id"),
        ({"study_id": "s1", "extra": True}, "extra"),
        ({"study_id": 123}, "study_id"),
        ({"study_id": None}, "study_id"),
        ({"study_id": ["s1"]}, "study_id"),
        ({"study_id": ""}, "study_id"),
        ({"study_id": "bad study"}, "study_id"),
        ({"study_id": "s1\n"}, "study_id"),
        ({"study_id": "s" * 129}, "study_id"),
        ({"study_id": "s1", "chapter_id": 7}, "chapter_id"),
        ({"study_id": "s1", "chapter_id": "-c"}, "chapter_id"),
        ({"study_id": "s1", "chapter_id": {"id": "c1"}}, "chapter_id"),
        ({"study_id": "s1", "move_path": "e4 e5"}, "move_path"),
        ({"study_id": "s1", "move_path": "e4/e5"}, "move_path"),
        ({"study_id": "s1", "move_path": ".e4"}, "move_path"),
        ({"study_id": "s1", "move_path": "e4:e5"}, "move_path"),
        ({"study_id": "s1", "move_path": ""}, "move_path"),
        ({"study_id": "s1", "move_path": "e" * 513}, "move_path"),
        ({"study_id": "s1", "move_path": 4}, "move_path"),
    ],
)
def test_invalid_body_is_422_with_problem_list(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    response = client.post("/presence/heartbeat", json=body, headers=auth())
    detail = assert_problems(response)
    assert any(problem["loc"][:1] == [field] for problem in detail), detail
    # Nothing was stored.
    assert presence(client, "s1")["total"] == 0


@pytest.mark.parametrize(
    ("move_path", "valid"),
    [
        ("main", True),
        ("main.12", True),
        ("main.12.var2.3", True),
        ("main.12.var2.3.var1.5", True),
        ("main.", False),
        ("main.12.var2", False),
        ("main.x", False),
        ("Main.1", False),
        ("main.1.2", False),
        ("var1.2", False),
        ("main.12345", False),
    ],
)
def test_move_path_grammar(client: TestClient, move_path: str, valid: bool) -> None:
    response = client.post(
        "/presence/heartbeat", json={"study_id": "s1", "move_path": move_path}, headers=auth()
    )
    assert response.status_code == (200 if valid else 422)
    if not valid:
        assert [p["loc"] for p in response.json()["detail"]] == [["move_path"]]


def test_longest_valid_move_path_is_accepted(client: TestClient) -> None:
    move_path = "main.1" + ".var1.1" * 72  # 510 characters
    assert len(move_path) <= MOVE_PATH_MAX_LENGTH < len(move_path + ".var1.1")
    response = client.post(
        "/presence/heartbeat",
        json={"study_id": "s1", "move_path": move_path + ".var1.1"},
        headers=auth(),
    )
    assert response.status_code == 422
    assert heartbeat(client, {"study_id": "s1", "move_path": move_path})["move_path"] == move_path


def test_every_problem_is_reported(client: TestClient) -> None:
    response = client.post(
        "/presence/heartbeat",
        json={"study_id": "-", "move_path": " ", "nope": 1},
        headers=auth(),
    )
    locs = sorted(p["loc"][0] for p in assert_problems(response))
    assert locs == ["move_path", "nope", "study_id"]


@pytest.mark.parametrize("raw", [b"[]", b"null", b"42", b'"s1"', b"true"])
def test_json_that_is_not_an_object_is_422(client: TestClient, raw: bytes) -> None:
    response = client.post(
        "/presence/heartbeat",
        content=raw,
        headers={**auth(), "Content-Type": "application/json"},
    )
    detail = assert_problems(response)
    assert detail[0]["loc"] == []


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b" ",
        b"{",
        b'{"study_id": "s1"',
        b'{"study_id": "s1",}',
        b"{'study_id': 's1'}",
        b"study_id=s1",
        b"\xff\xfe\x00",
        b'{"study_id": "s1"} trailing',
        b"[" * 10_000,
    ],
)
def test_malformed_json_is_400(client: TestClient, raw: bytes) -> None:
    response = client.post(
        "/presence/heartbeat",
        content=raw,
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert assert_error(response, 400, "invalid_json") == "request body is not valid JSON"


# --- routing -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/nope", "/presence", "/presence/s1/extra", "/ws/nope"])
def test_unknown_path_is_404_json(client: TestClient, path: str) -> None:
    assert_error(client.get(path, headers=auth()), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/presence/heartbeat", {"POST"}),
        ("PATCH", "/presence/heartbeat", {"POST"}),
        ("POST", "/presence/s1", {"GET", "HEAD", "DELETE"}),
        ("PATCH", "/presence/s1", {"GET", "HEAD", "DELETE"}),
        ("POST", "/healthz", {"GET", "HEAD"}),
        ("DELETE", "/readyz", {"GET", "HEAD"}),
    ],
)
def test_wrong_method_is_405_json(
    client: TestClient, method: str, path: str, allowed: set[str]
) -> None:
    response = client.request(method, path, headers=auth())
    assert_error(response, 405, "method_not_allowed")
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed


def test_get_heartbeat_path_reads_a_study_named_heartbeat(client: TestClient) -> None:
    # `heartbeat` is a valid study id; GET on it is a presence read, not a 405.
    assert presence(client, "heartbeat")["study_id"] == "heartbeat"


# --- pages: limit and after ------------------------------------------------------------------


@pytest.fixture(params=["fake", "real"])
def either_client(request: pytest.FixtureRequest, settings: Settings) -> Iterator[TestClient]:
    """The app on fakeredis, or connected to the real Redis itself (as a node is, owning and
    closing its clients; the keys under the test's prefix are deleted after)."""
    if request.param == "fake":
        with app_client(settings) as tc:
            yield tc
        return
    url: str = request.getfixturevalue("cleanup_real_redis")
    real = settings.model_copy(update={"redis_url": url, "require_study_grant": False})
    with TestClient(create_app(real)) as tc:
        yield tc


def page(client: TestClient, study: str, query: str) -> Any:
    response = client.get(f"/presence/{study}?{query}", headers=auth())
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"study_id", "users", "total", "counts", "seq", "complete", "next"}
    return body


def test_a_walk_by_limit_and_after_lists_everyone_present_once(either_client: TestClient) -> None:
    client = either_client
    stable = [f"m{n:02d}" for n in range(13)]
    for user in [*stable, "c1", "c2", "c3"]:
        heartbeat(client, {"study_id": "s1"}, user)
    visited: list[str] = []
    query = "limit=4"
    for step in range(20):
        body = page(client, "s1", query)
        users = [u["user_id"] for u in body["users"]]
        assert users == sorted(users) and len(users) <= 4
        assert body["total"] == sum(body["counts"].values())
        assert body["complete"] is False
        visited += users
        # Between pages: a churner leaves, users join ahead of the walk and behind it.
        if step < 3:
            client.delete("/presence/s1", headers=auth(f"c{step + 1}"))
        heartbeat(client, {"study_id": "s1"}, f"a{step}")
        heartbeat(client, {"study_id": "s1"}, f"z{step}")
        if body["next"] is None:
            break
        assert body["next"] == users[-1]
        query = f"limit=4&after={body['next']}"
    assert body["next"] is None
    assert len(visited) == len(set(visited))  # nobody twice
    assert set(stable) <= set(visited)  # everyone present throughout
    assert any(u.startswith("z") for u in visited)


def test_a_page_holding_everyone_is_complete(client: TestClient) -> None:
    for user in ("bob", "alice"):
        heartbeat(client, {"study_id": "s1"}, user)
    body = page(client, "s1", "limit=2")
    assert [u["user_id"] for u in body["users"]] == ["alice", "bob"]
    assert (body["next"], body["complete"], body["total"], body["seq"]) == (None, True, 2, 2)
    assert body["counts"] == {"active": 2, "idle": 0, "away": 0}
    assert page(client, "s1", "limit=1")["next"] == "alice"
    assert page(client, "s1", "limit=1&after=alice")["next"] is None
    assert page(client, "s1", "limit=1000&after=bob")["users"] == []
    assert page(client, "nobody", "limit=1") == {
        "study_id": "nobody",
        "users": [],
        "total": 0,
        "counts": {"active": 0, "idle": 0, "away": 0},
        "seq": 0,
        "complete": True,
        "next": None,
    }


def test_after_without_limit_reads_a_page_of_100(client: TestClient) -> None:
    users = [f"u{n:03d}" for n in range(103)]
    for user in users:
        heartbeat(client, {"study_id": "s1"}, user)
    body = page(client, "s1", "after=u000")
    assert [u["user_id"] for u in body["users"]] == users[1:101]
    assert body["next"] == "u100" and body["total"] == 103
    assert [u["user_id"] for u in page(client, "s1", "after=u100")["users"]] == users[101:]


@pytest.mark.parametrize("query", ["limit=1000", "limit=01", "limit=7&other=x"])
def test_valid_page_queries(client: TestClient, query: str) -> None:
    heartbeat(client, {"study_id": "s1"})
    assert [u["user_id"] for u in page(client, "s1", query)["users"]] == ["alice"]


def test_other_query_parameters_are_ignored(client: TestClient) -> None:
    heartbeat(client, {"study_id": "s1"})
    response = client.get("/presence/s1?other=x&_=123", headers=auth())
    assert response.json() == presence(client, "s1")
    assert "next" not in response.json()  # no page parameter: everyone


BAD_PAGES = [
    ("limit=0", "limit", "greater_than_equal"),
    ("limit=-1", "limit", "int_parsing"),
    ("limit=abc", "limit", "int_parsing"),
    ("limit=5000", "limit", "less_than_equal"),
    ("limit=1001", "limit", "less_than_equal"),
    ("limit=" + "9" * 5000, "limit", "less_than_equal"),
    ("limit=", "limit", "int_parsing"),
    ("limit=%2B5", "limit", "int_parsing"),
    ("limit=5.0", "limit", "int_parsing"),
    ("limit=1e2", "limit", "int_parsing"),
    ("limit=%205", "limit", "int_parsing"),
    ("limit=%D9%A5", "limit", "int_parsing"),  # an Arabic-Indic five: not an ASCII digit
    ("limit=1&limit=2", "limit", "repeated"),
    ("limit=2&after=-x", "after", "pattern"),
    ("limit=2&after=a%20b", "after", "pattern"),
    ("limit=2&after=a%7Bb%7D", "after", "pattern"),
    ("limit=2&after=" + "a" * 129, "after", "pattern"),
    ("after=", "after", "pattern"),
    ("limit=2&after=x&after=y", "after", "repeated"),
]


@pytest.mark.parametrize(("query", "name", "kind"), BAD_PAGES)
def test_bad_page_parameters_are_422(client: TestClient, query: str, name: str, kind: str) -> None:
    heartbeat(client, {"study_id": "s1"})
    before = presence(client, "s1")
    response = client.get(f"/presence/s1?{query}", headers=auth())
    assert assert_problems(response) == [
        {"loc": ["query", name], "msg": response.json()["detail"][0]["msg"], "type": kind}
    ]
    assert presence(client, "s1") == before


def test_every_bad_page_parameter_is_reported(client: TestClient) -> None:
    detail = assert_problems(client.get("/presence/s1?limit=0&after=-", headers=auth()))
    assert [(p["loc"], p["type"]) for p in detail] == [
        (["query", "limit"], "greater_than_equal"),
        (["query", "after"], "pattern"),
    ]


def test_page_parameters_are_checked_after_the_token_and_before_the_grant(
    key_prefix: str,
) -> None:
    with app_client(key_prefix=key_prefix, require_study_grant=True) as client:
        assert_error(client.get("/presence/s1?limit=0"), 401, "unauthorized")
        other = auth("alice", studies=["elsewhere"])
        assert_problems(client.get("/presence/s1?limit=0", headers=other))
        assert_error(client.get("/presence/s1?limit=1", headers=other), 403, "forbidden")


# --- health --------------------------------------------------------------------------------


def test_healthz_and_readyz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    assert (health["sockets"], health["studies"], health["leases"]) == (0, 0, 0)
    assert isinstance(health["node_id"], str)
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "redis": "ok",
        "pubsub": "ok",
        "draining": False,
        "clock": "ok",
    }


# --- store unavailable ---------------------------------------------------------------------


def _unavailable(*args: object, **kwargs: object) -> Any:
    async def fail() -> Any:
        raise StoreUnavailable("connection refused")

    return fail()


@pytest.mark.parametrize(
    ("method", "path", "body", "service_method"),
    [
        ("POST", "/presence/heartbeat", {"study_id": "s1"}, "heartbeat"),
        ("GET", "/presence/s1", None, "presence"),
        ("GET", "/presence/s1?limit=2", None, "page"),
        ("DELETE", "/presence/s1", None, "leave"),
    ],
)
def test_store_unavailable_is_503(
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    body: dict[str, str] | None,
    service_method: str,
) -> None:
    service = client.app.state.node.service  # type: ignore[attr-defined]
    monkeypatch.setattr(service, service_method, _unavailable)
    response = client.request(method, path, json=body, headers=auth())
    assert assert_error(response, 503, "unavailable") == "presence storage is unreachable"
    assert response.headers["retry-after"] == "1"
    # Connection details never reach the client.
    assert "refused" not in response.text


def test_unreachable_redis_is_503_everywhere(down_client: TestClient) -> None:
    for method, path, body in [
        ("POST", "/presence/heartbeat", {"study_id": "s1"}),
        ("GET", "/presence/s1", None),
        ("DELETE", "/presence/s1", None),
    ]:
        response = down_client.request(method, path, json=body, headers=auth())
        assert_error(response, 503, "unavailable")
        assert response.headers["retry-after"] == "1"

    ready = down_client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "not ready"
    assert ready.json()["redis"] == "unreachable"
    # Liveness does not depend on Redis.
    assert down_client.get("/healthz").status_code == 200
    # Validation and auth still answer without Redis.
    assert_error(down_client.get("/presence/s1"), 401, "unauthorized")
    assert_error(down_client.get("/presence/-x", headers=auth()), 422, "validation_error")
    response = down_client.post("/presence/heartbeat", content=b"{", headers=auth())
    assert_error(response, 400, "invalid_json")


# --- shutdown ------------------------------------------------------------------------------


def test_shutdown_ends_a_background_task_that_lost_its_cancel(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.11 `asyncio.wait_for` (inside redis-py) can swallow a cancel; shutting the
    node down must not hang on a sweeper that kept running through one."""
    swallowed: list[bool] = []

    async def stubborn_run(self: Sweeper) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # as if the cancel had been lost

    monkeypatch.setattr(Sweeper, "run", stubborn_run)
    stopped = threading.Event()

    def serve() -> None:
        with app_client(settings) as tc:
            assert tc.get("/healthz").status_code == 200
        stopped.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    thread.join(5)
    assert stopped.is_set(), "lifespan shutdown hung on a task that ignored one cancel"
    assert swallowed == [True]
