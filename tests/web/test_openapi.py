"""The OpenAPI document: valid OpenAPI 3.1, served at /openapi.json, covering every route, and
true: real responses (TestClient on fakeredis) validate against the schemas it documents."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema_rs  # comes with schemathesis (the test extra): a JSON Schema 2020-12 validator
import pytest
import schemathesis
from starlette.routing import Route
from starlette.testclient import TestClient

from presence_svc.auth import ALL_STUDIES
from presence_svc.models import ID_PATTERN, HeartbeatRequest
from presence_svc.web import openapi
from presence_svc.web import stats as stats_routes
from presence_svc.web.rest import ROUTES
from presence_svc.web.schemas import (
    HealthOut,
    LeaveOut,
    PresenceOut,
    ReadinessOut,
    SessionOut,
)
from tests.support import auth as support_auth
from tests.support.app import app_client, unreachable_redis

DOC = openapi.document()
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PRESENCE_OPERATIONS = {
    ("post", "/presence/heartbeat"),
    ("get", "/presence/{study_id}"),
    ("delete", "/presence/{study_id}"),
    ("get", "/presence/{study_id}/stats"),
    ("get", "/stats"),
}
API_ROUTES = [*ROUTES, *stats_routes.ROUTES]

# Every status each operation documents (README, "REST API").
DOCUMENTED = {
    ("post", "/presence/heartbeat"): {200, 400, 401, 403, 422, 429, 503},
    ("get", "/presence/{study_id}"): {200, 401, 403, 404, 422, 503},
    ("delete", "/presence/{study_id}"): {200, 401, 403, 404, 422, 503},
    ("get", "/presence/{study_id}/stats"): {200, 401, 403, 404, 422, 503},
    ("get", "/stats"): {200, 401, 403, 503},
    ("get", "/healthz"): {200},
    ("get", "/readyz"): {200, 503},
    ("get", "/openapi.json"): {200},
    ("get", "/metrics"): {200},
}


def auth(user: str = "alice", studies: str | list[str] = ALL_STUDIES) -> dict[str, str]:
    """Study grants are required here: a token grants every study unless told otherwise."""
    return support_auth.auth(user, studies=studies)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with app_client(require_study_grant=True) as tc:
        yield tc


@pytest.fixture
def limited_client() -> Iterator[TestClient]:
    """One REST heartbeat per user, then 429 for a long while."""
    with app_client(
        require_study_grant=True, rest_heartbeat_rate=0.01, rest_heartbeat_burst=1
    ) as tc:
        yield tc


@pytest.fixture
def down_client() -> Iterator[TestClient]:
    """An app whose Redis is a closed loopback port (no retries, so failures are quick)."""
    with app_client(redis=unreachable_redis(), require_study_grant=True) as tc:
        yield tc


# --- reading the document ----------------------------------------------------------------------


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """`node`, or what its local `$ref` points at."""
    while "$ref" in node:
        target: Any = DOC
        for key in node["$ref"].removeprefix("#/").split("/"):
            target = target[key]
        node = target
    return node


def validator(schema: dict[str, Any]) -> Any:
    # The document's components sit next to the schema, so `#/components/...` refs resolve.
    return jsonschema_rs.Draft202012Validator(
        {**schema, "components": DOC["components"]}, validate_formats=True
    )


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method, path, operation


class Conformance:
    """Checks responses against the document and remembers which documented ones it saw."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, int]] = set()

    def check(self, method: str, path: str, response: Any) -> Any:
        """Validate `response` to `method path` (a documented path template); return its body."""
        responses = DOC["paths"][path][method]["responses"]
        assert str(response.status_code) in responses, (method, path, response.text)
        self.seen.add((method, path, response.status_code))
        return check_response(resolve(responses[str(response.status_code)]), response)


def check_response(documented: dict[str, Any], response: Any) -> Any:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    schema = documented["content"]["application/json"]["schema"]
    errors = [str(e) for e in validator(schema).iter_errors(body)]
    assert not errors, (response.status_code, body, errors)
    for name, header in documented.get("headers", {}).items():
        value = response.headers.get(name)
        if value is None:
            assert not header.get("required"), f"missing header {name}"
            continue
        coerced: Any = int(value) if header["schema"].get("type") == "integer" else value
        assert validator(header["schema"]).is_valid(coerced), (name, value)
    return body


# --- the document itself -----------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1.")
    # Schemathesis checks it against the OpenAPI 3.1 meta-schema (raises if invalid).
    schemathesis.openapi.from_dict(DOC).validate()


def test_the_document_is_built_once_and_served_without_a_token(client: TestClient) -> None:
    assert openapi.document_bytes() is openapi.document_bytes()
    first = client.get("/openapi.json")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert first.json() == DOC
    assert client.get("/openapi.json").content == first.content == openapi.document_bytes()


def test_callers_cannot_change_the_cached_document() -> None:
    openapi.document()["paths"].clear()
    assert openapi.document() == DOC
    assert DOC["paths"]


def test_every_route_is_documented_with_its_methods() -> None:
    routes = {r.path: r for r in API_ROUTES if isinstance(r, Route)}
    assert len(routes) == len(API_ROUTES)
    assert set(DOC["paths"]) == set(routes)
    for path, route in routes.items():
        assert route.methods is not None
        methods = {m.lower() for m in route.methods} - {"head"}  # Starlette adds HEAD to GET
        assert set(DOC["paths"][path]) - {"parameters"} == methods, path


def test_every_operation_documents_its_statuses() -> None:
    documented = {(m, p): {int(s) for s in op["responses"]} for m, p, op in operations()}
    assert documented == DOCUMENTED


def test_errors_document_their_headers() -> None:
    expected = {"401": {"WWW-Authenticate"}, "429": {"Retry-After"}, "503": {"Retry-After"}}
    for method, path, operation in operations():
        for status, response in operation["responses"].items():
            headers = set(resolve(response).get("headers", {}))
            if path == "/readyz":  # its 503 is the readiness report, not an error
                assert headers == set()
            else:
                assert headers == expected.get(status, set()), (method, path, status)
    assert set(resolve({"$ref": "#/components/responses/MethodNotAllowed"})["headers"]) == {"Allow"}


def test_security_is_bearer_on_presence_and_none_on_probes() -> None:
    scheme = DOC["components"]["securitySchemes"][openapi.SECURITY_SCHEME]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    for method, path, operation in operations():
        if (method, path) in PRESENCE_OPERATIONS:
            assert operation["security"] == [{openapi.SECURITY_SCHEME: []}]
        else:
            assert operation["security"] == []


def test_schemas_come_from_the_models() -> None:
    body = DOC["paths"]["/presence/heartbeat"]["post"]["requestBody"]
    assert body["required"] is True
    assert resolve(body["content"]["application/json"]["schema"]) == (
        HeartbeatRequest.model_json_schema()
    )
    (study_id,) = DOC["paths"]["/presence/{study_id}"]["parameters"]
    assert study_id == {**study_id, "name": "study_id", "in": "path", "required": True}
    assert study_id["schema"] == {"type": "string", "pattern": ID_PATTERN}


# --- real responses conform --------------------------------------------------------------------


def test_every_documented_response_is_real_and_conforms(
    client: TestClient, limited_client: TestClient, down_client: TestClient
) -> None:
    seen = Conformance()
    beat, study = "/presence/heartbeat", "/presence/{study_id}"

    # 200s
    body = {"study_id": "s1", "chapter_id": "c1", "move_path": "main.3"}
    assert seen.check("post", beat, client.post(beat, json=body, headers=auth()))["move_path"]
    seen.check("post", beat, client.post(beat, json={"study_id": "s1"}, headers=auth("bob")))
    assert seen.check("get", study, client.get("/presence/s1", headers=auth()))["total"] == 2
    assert seen.check("get", study, client.get("/presence/empty", headers=auth()))["users"] == []
    # A page (the other shape of the 200): `next`, as the document says.
    paged = seen.check("get", study, client.get("/presence/s1?limit=1", headers=auth()))
    assert paged["next"] == "alice" and paged["complete"] is False
    seen.check("delete", study, client.delete("/presence/s1", headers=auth()))
    seen.check("delete", study, client.delete("/presence/s1", headers=auth()))  # no session left
    seen.check("get", "/healthz", client.get("/healthz"))
    seen.check("get", "/readyz", client.get("/readyz"))
    seen.check("get", "/openapi.json", client.get("/openapi.json"))
    metrics = client.get("/metrics")  # text, not JSON: checked by hand
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "presence_websocket_connections" in metrics.text
    seen.seen.add(("get", "/metrics", 200))

    # 400, 401, 403, 404, 422
    seen.check("post", beat, client.post(beat, content=b"{not json", headers=auth()))
    one = "/presence/s1"
    calls = [("post", beat, beat), ("get", study, one), ("delete", study, one)]
    for method, path, url in calls:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
            r = client.request(method, url, json={"study_id": "s1"}, headers=headers)
            assert r.status_code == 401
            seen.check(method, path, r)
        r = client.request(method, url, json={"study_id": "s1"}, headers=auth(studies=["other"]))
        assert r.status_code == 403
        seen.check(method, path, r)
    for body in ({"study_id": "s1", "extra": 1}, {"study_id": "-bad"}, [], {"move_path": "x"}):
        r = client.post(beat, json=body, headers=auth())
        assert r.status_code == 422
        seen.check("post", beat, r)
    for method in ("get", "delete"):
        for url in ("/presence/-bad", "/presence/" + "x" * 129, "/presence/a%20b"):
            r = client.request(method, url, headers=auth())
            assert r.status_code == 422
            seen.check(method, study, r)
        if method == "get":
            for url in ("/presence/s1?limit=0", "/presence/s1?limit=2&after=-x"):
                r = client.request(method, url, headers=auth())
                assert r.status_code == 422
                seen.check(method, study, r)
        for url in ("/presence/", "/presence/a/b"):
            r = client.request(method, url, headers=auth())
            assert r.status_code == 404
            seen.check(method, study, r)

    # 405 (a method no path documents): the reusable response, with `Allow`
    not_allowed = resolve({"$ref": "#/components/responses/MethodNotAllowed"})
    for method, url in [("put", beat), ("patch", "/presence/s1"), ("post", "/healthz")]:
        r = client.request(method, url, headers=auth())
        assert r.status_code == 405
        check_response(not_allowed, r)
        assert r.headers["allow"]

    # 429
    first = limited_client.post(beat, json={"study_id": "s1"}, headers=auth())
    assert first.status_code == 200
    r = limited_client.post(beat, json={"study_id": "s1"}, headers=auth())
    assert r.status_code == 429
    seen.check("post", beat, r)

    # 503: Redis does not answer
    for method, url in [("post", beat), ("get", "/presence/s1"), ("delete", "/presence/s1")]:
        r = down_client.request(method, url, json={"study_id": "s1"}, headers=auth())
        assert r.status_code == 503
        path = beat if url == beat else study
        seen.check(method, path, r)
    r = down_client.get("/readyz")
    assert r.status_code == 503
    assert seen.check("get", "/readyz", r)["status"] == "not ready"

    check_stats(seen, client, down_client)

    # ... and each documented response was seen for real.
    documented = {(m, p, s) for (m, p), statuses in DOCUMENTED.items() for s in statuses}
    assert seen.seen == documented


def check_stats(seen: Conformance, client: TestClient, down_client: TestClient) -> None:
    """The stats endpoints' documented responses, for real."""
    one, url = "/presence/{study_id}/stats", "/presence/counted/stats"
    for user in ("alice", "bob", "carol"):
        client.post("/presence/heartbeat", json={"study_id": "counted"}, headers=auth(user))
    assert seen.check("get", one, client.get(url, headers=auth()))["users"]["active"] == 3
    overview = seen.check("get", "/stats", client.get("/stats", headers=support_auth.admin()))
    assert overview["top_studies"][0]["study_id"] == "counted"
    for headers in ({}, {"Authorization": "Bearer nope"}):
        for path, target in ((one, url), ("/stats", "/stats")):
            r = client.get(target, headers=headers)
            assert r.status_code == 401
            seen.check("get", path, r)
    r = client.get(url, headers=auth(studies=["other"]))
    assert r.status_code == 403
    seen.check("get", one, r)
    r = client.get("/stats", headers=auth())  # every study, but no admin scope
    assert r.status_code == 403
    seen.check("get", "/stats", r)
    for target, status in (("/presence/-bad/stats", 422), ("/presence//stats", 404)):
        r = client.get(target, headers=auth())
        assert r.status_code == status
        seen.check("get", one, r)
    for path, target, headers in ((one, url, auth()), ("/stats", "/stats", support_auth.admin())):
        r = down_client.get(target, headers=headers)
        assert r.status_code == 503
        seen.check("get", path, r)


def test_real_responses_validate_against_the_response_models(client: TestClient) -> None:
    body = {"study_id": "s1", "chapter_id": "c1", "move_path": "main.1.var1.2"}
    session = client.post("/presence/heartbeat", json=body, headers=auth())
    SessionOut.model_validate_json(session.content)
    client.post("/presence/heartbeat", json={"study_id": "s1"}, headers=auth("bob"))
    listing = PresenceOut.model_validate_json(client.get("/presence/s1", headers=auth()).content)
    assert listing.total == len(listing.users) == 2
    assert {u.chapter_id for u in listing.users} == {"c1", None}
    LeaveOut.model_validate_json(client.delete("/presence/s1", headers=auth()).content)
    HealthOut.model_validate_json(client.get("/healthz").content)
    assert ReadinessOut.model_validate_json(client.get("/readyz").content).status == "ready"


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        ("SessionOut", {"session_id": "x"}),  # fields missing
        ("LeaveOut", {"status": "ok"}),
        ("LeaveOut", {"status": "success", "extra": True}),
        ("ErrorOut", {"error": "x"}),
        ("ErrorOut", {"error": "x", "detail": [{"loc": [], "msg": "m"}]}),
        ("ReadinessOut", {"status": "ready", "redis": "ok", "pubsub": "ok", "draining": "no"}),
    ],
)
def test_the_schemas_reject_what_the_api_never_sends(schema: str, body: Any) -> None:
    assert not validator({"$ref": f"#/components/schemas/{schema}"}).is_valid(body)


@pytest.mark.parametrize(
    ("response", "body"),
    [
        ("Unauthorized", {"error": "forbidden", "detail": "x"}),  # another code
        ("ValidationError", {"error": "validation_error", "detail": "x"}),  # not a list
    ],
)
def test_error_responses_pin_their_code(response: str, body: Any) -> None:
    documented = resolve({"$ref": f"#/components/responses/{response}"})
    assert not validator(documented["content"]["application/json"]["schema"]).is_valid(body)


def test_readiness_documents_which_status_goes_with_which_code() -> None:
    responses = DOC["paths"]["/readyz"]["get"]["responses"]
    ready = {"status": "ready", "redis": "ok", "pubsub": "ok", "draining": False, "clock": "ok"}
    not_ready = {**ready, "status": "not ready", "draining": True}
    for status, good, bad in [("200", ready, not_ready), ("503", not_ready, ready)]:
        schema = validator(responses[status]["content"]["application/json"]["schema"])
        assert schema.is_valid(good)
        assert not schema.is_valid(bad)
