"""GET /client/...: the browser client's files, versioned and cacheable; GET /demo when enabled."""

from __future__ import annotations

import pytest

from presence_svc import __version__
from presence_svc.web.client_files import IMMUTABLE, NAMES, REVALIDATE
from tests.support.app import app_client


@pytest.mark.parametrize("name", NAMES)
def test_each_file_is_served_revalidated_with_an_etag(name: str) -> None:
    with app_client() as client:
        answer = client.get(f"/client/{name}")
        assert answer.status_code == 200
        assert answer.headers["cache-control"] == REVALIDATE
        assert answer.headers["access-control-allow-origin"] == "*"
        assert answer.headers["x-content-type-options"] == "nosniff"
        expected = "text/javascript" if name.endswith(".js") else "application/typescript"
        assert answer.headers["content-type"].startswith(expected)
        assert f"presence-svc browser client {__version__}" in answer.text.splitlines()[0]
        assert "__PRESENCE_VERSION__" not in answer.text
        etag = answer.headers["etag"]
        again = client.get(f"/client/{name}", headers={"If-None-Match": etag})
        assert again.status_code == 304
        assert again.content == b""
        assert again.headers["etag"] == etag
        stale = client.get(f"/client/{name}", headers={"If-None-Match": '"other"'})
        assert stale.status_code == 200


def test_the_versioned_path_is_immutable_and_only_for_this_version() -> None:
    with app_client() as client:
        plain = client.get("/client/presence.js")
        pinned = client.get(f"/client/{__version__}/presence.js")
        assert pinned.status_code == 200
        assert pinned.content == plain.content
        assert pinned.headers["cache-control"] == IMMUTABLE
        assert f'export const VERSION = "{__version__}";' in pinned.text
        other = client.get("/client/0.0.1/presence.js")
        assert other.status_code == 404
        assert other.json()["error"] == "not_found"
        assert __version__ in other.json()["detail"]


def test_unknown_files_are_a_json_404_and_no_path_reaches_the_disk() -> None:
    with app_client() as client:
        for path in ["/client/nope.js", "/client/..%2fclient_files.py", "/client/client/x"]:
            answer = client.get(path)
            assert answer.status_code == 404, path
            assert answer.json()["error"] == "not_found"


def test_head_answers_without_a_body() -> None:
    with app_client() as client:
        answer = client.head("/client/presence.js")
        assert answer.status_code == 200
        assert answer.content == b""
        assert answer.headers["etag"]


def test_the_demo_is_off_unless_enabled() -> None:
    with app_client() as client:
        assert client.get("/demo").status_code == 404
        assert client.get("/demo/demo.js").status_code == 404


def test_the_demo_page_and_its_assets_when_enabled() -> None:
    with app_client(demo=True) as client:
        page = client.get("/demo")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "/demo/demo.js" in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        script = client.get("/demo/demo.js")
        assert 'from "/client/presence.js"' in script.text
        assert client.get("/demo/demo.css").status_code == 200
        assert client.get("/demo/secret.txt").status_code == 404
