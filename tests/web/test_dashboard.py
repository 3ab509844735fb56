"""GET /dashboard: off unless PRESENCE_DASHBOARD=true, only its own files, everything from the
node (no external resource, a same-origin CSP), and a page that holds no data of its own."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from presence_svc.web.dashboard import FILES
from tests.support.app import app_client

PATHS = [
    "/dashboard",
    "/dashboard/index.html",
    "/dashboard/dashboard.js",
    "/dashboard/dashboard.css",
]


@pytest.fixture
def client() -> Iterator[TestClient]:
    with app_client(dashboard=True) as tc:
        yield tc


@pytest.mark.parametrize("path", PATHS)
def test_off_by_default_with_a_json_404(path: str) -> None:
    with app_client() as tc:
        response = tc.get(path)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize("path", PATHS)
def test_served_when_on_with_a_same_origin_policy(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    name = path.removeprefix("/dashboard").lstrip("/") or "index.html"
    assert response.headers["content-type"] == FILES[name]
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    for directive in ("script-src 'self'", "style-src 'self'", "connect-src 'self'"):
        assert directive in policy
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name", ["secret.txt", "..%2Fdashboard.py", "dashboard.js.map", "x"])
def test_no_other_file_is_served(client: TestClient, name: str) -> None:
    assert client.get(f"/dashboard/{name}").status_code == 404


def test_the_page_loads_nothing_from_elsewhere(client: TestClient) -> None:
    texts = {name: client.get(f"/dashboard/{name}").text for name in FILES}
    for name, text in texts.items():
        # The SVG namespace is a name, not a resource; any other absolute URL would be loaded.
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)
        assert "@import" not in text and "@font-face" not in text, name
    page = texts["index.html"]
    assert 'src="/dashboard/dashboard.js"' in page
    assert 'href="/dashboard/dashboard.css"' in page
    assert "<script>" not in page and "style=" not in page  # nothing inline: the CSP forbids it
    assert 'from "/client/presence.js"' in texts["dashboard.js"]


def test_the_page_reads_the_token_from_the_fragment_and_the_stats_endpoints(
    client: TestClient,
) -> None:
    script = client.get("/dashboard/dashboard.js").text
    assert "location.hash" in script and "history.replaceState" in script
    assert "innerHTML" not in script  # data is only ever set as text
    assert '"/stats"' in script and "/stats`" in script
    assert client.get("/client/presence.js").status_code == 200  # the client it imports


def test_the_page_shows_watchers_next_to_the_sockets(client: TestClient) -> None:
    page = client.get("/dashboard/index.html").text
    script = client.get("/dashboard/dashboard.js").text
    # Each card right after the sockets it is a part of: in total, and in a study.
    assert (
        page.index('id="c-sockets"') < page.index('id="c-watchers"') < page.index('id="c-studies"')
    )
    assert page.index('id="s-watching"') < page.index('id="s-watchers"') < page.index('id="s-seq"')
    assert '$("c-watchers").textContent = stats.watchers' in script
    assert '$("s-watchers").textContent = stats.watchers' in script
    assert "cell(n.sockets), cell(n.watchers)" in script  # and per node
