"""The dashboard in headless Chromium against two real nodes on one real Redis: a heartbeat of a
new study shows within a second, a study's users and events arrive live, watchers (sockets with
no heartbeat yet) are counted across the nodes, and the operator's token never travels in a
page's URL. Screenshots go to SHOTS for a person to look at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.browser.conftest import SECRET, NodeFactory, study, token
from tests.support import auth as support_auth
from tests.support.processes import NodeProcess
from tests.support.waiting import eventually

SHOTS = Path("/tmp/presence-dashboard-shots")
# Playwright's `expect`, not wait_for_function: the page's CSP forbids evaluating strings.
expect = pytest.importorskip("playwright.sync_api", reason="needs Playwright").expect
ADMIN = support_auth.token("operator", secret=SECRET, studies="*", scope="presence:admin")


def dashboard_nodes(nodes: NodeFactory) -> tuple[NodeProcess, NodeProcess]:
    # Reports every 0.2 s, so both nodes are listed soon after they start.
    return nodes(dashboard="true", stats_interval="0.2"), nodes(stats_interval="0.2")


def beat(node: NodeProcess, user: str, study_id: str, **cursor: str) -> None:
    response = httpx.post(
        node.base_url + "/presence/heartbeat",
        json={"study_id": study_id, **cursor},
        headers=support_auth.bearer(token(user)),
        timeout=5,
    )
    assert response.status_code == 200, response.text


def text_of(page: Any, selector: str) -> str:
    content: str = page.locator(selector).inner_text()
    return content


def test_a_new_study_shows_within_a_second_then_its_users_and_events(
    context: Any, nodes: NodeFactory
) -> None:
    a, b = dashboard_nodes(nodes)
    page = context.new_page()
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.on("websocket", lambda socket: urls.append(socket.url))
    page.goto(f"{a.base_url}/dashboard#token={ADMIN}")
    expect(page.locator("#c-nodes")).to_have_text("2", timeout=5000)
    assert ADMIN not in page.url  # the fragment left the address bar at once

    sid = study()
    beat(b, "alice", sid, chapter_id="ch1", move_path="main.12")  # through the other node
    # Looked at every 20 ms from here (Playwright's own waits poll up to 500 ms apart).
    shown_after = eventually(lambda: sid in text_of(page, "#top tbody"), within=1.0, poll=0.02)
    print(f"\nnew study shown {shown_after * 1000:.0f} ms after its heartbeat returned")
    assert shown_after < 1.0
    # Nodes report themselves: both are listed with their counts.
    assert page.locator("#nodes tbody tr").count() == 2
    expect(page.locator("#c-sessions")).to_have_text("1", timeout=2000)
    for step in range(12):  # moves, so the event rate has something to show
        beat(b, "alice", sid, move_path=f"main.{step + 1}")
    expect(page.locator("#c-rate")).not_to_have_text("0.0", timeout=3000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "overview.png"), full_page=True)

    page.locator("#top tbody").get_by_text(sid).click()
    page.locator('#users tr[data-user="alice"]').wait_for(timeout=3000)
    assert "main.12" in text_of(page, '#users tr[data-user="alice"]')
    page.locator("#log li.ev-here").get_by_text("alice").wait_for(timeout=3000)
    beat(a, "bob", sid)
    beat(b, "alice", sid, move_path="main.13.var1.2")
    page.locator("#log li.ev-join").get_by_text("bob").wait_for(timeout=3000)
    page.locator("#log li.ev-cursor").get_by_text("alice").wait_for(timeout=3000)
    assert "main.13.var1.2" in text_of(page, '#users tr[data-user="alice"]')
    # The page's own socket watches the study (counted from the node's report); it never joins.
    expect(page.locator("#s-watching")).to_have_text("1")
    expect(page.locator("#s-watchers")).to_have_text("1")  # it only watches
    expect(page.locator("#s-active")).to_have_text("2")
    assert page.locator("#users tbody tr").count() == 2
    # Nobody heartbeats any more: both turn idle (IDLE is 2 s), live, in colour and in the log.
    expect(page.locator('#users tr[data-user="bob"]')).to_contain_text("idle", timeout=5000)
    page.locator("#log li.ev-status").get_by_text("bob").wait_for(timeout=3000)
    expect(page.locator("#s-idle")).to_have_text("2", timeout=3000)
    page.screenshot(path=str(SHOTS / "study.png"), full_page=True)

    # Only the WebSocket carries the token in its URL (browsers cannot set its headers).
    carrying = [url for url in urls if ADMIN in url]
    assert carrying and all(url.startswith("ws://") for url in carrying), carrying


def test_watchers_are_counted_across_the_nodes_until_their_first_heartbeat(
    context: Any, nodes: NodeFactory
) -> None:
    a, b = dashboard_nodes(nodes)
    b_id = b.health()["node_id"]
    sid = study()
    page = context.new_page()
    url = f"{b.ws_url}/ws/presence?study_id={sid}&token={token('carol')}"
    with connect(url, open_timeout=10) as carol:  # on the other node, and no heartbeat yet
        assert json.loads(carol.recv(10))["type"] == "connected"
        assert json.loads(carol.recv(10))["type"] == "presence.snapshot"
        page.goto(f"{a.base_url}/dashboard#token={ADMIN}")
        expect(page.locator("#c-nodes")).to_have_text("2", timeout=5000)
        expect(page.locator("#c-watchers")).to_have_text("1", timeout=3000)
        b_watchers = page.locator(f'#nodes tr:has(td[title="{b_id}"]) td:nth-child(3)')
        expect(b_watchers).to_have_text("1")

        page.fill("#open-study-id", sid)
        page.click("#open-study button")
        # The page's own socket on this node, carol's on the other: both only watch.
        expect(page.locator("#s-watching")).to_have_text("2", timeout=5000)
        expect(page.locator("#s-watchers")).to_have_text("2")

        carol.send(json.dumps({"type": "heartbeat"}))
        assert json.loads(carol.recv(10))["type"] == "presence.user_joined"
        expect(page.locator("#s-watchers")).to_have_text("1", timeout=3000)
        expect(page.locator("#s-watching")).to_have_text("2")
        expect(page.locator("#s-active")).to_have_text("1")
    # Carol's socket closed: it no longer watches.
    expect(page.locator("#s-watching")).to_have_text("1", timeout=3000)
    expect(page.locator("#s-watchers")).to_have_text("1")
    page.locator("#home").click()  # the overview: the page's study socket closes too
    expect(page.locator("#c-watchers")).to_have_text("0", timeout=3000)
    expect(b_watchers).to_have_text("0")


def test_the_paste_field_takes_a_token_and_refuses_a_non_operator(
    context: Any, nodes: NodeFactory
) -> None:
    node = nodes(dashboard="true")
    page = context.new_page()
    page.goto(f"{node.base_url}/dashboard")
    page.locator("#login").wait_for()
    page.fill("#token-input", token("mallory"))  # every study, but no admin scope
    page.click("#token-form button")
    page.locator("#login-error").get_by_text("403").wait_for(timeout=3000)
    assert page.locator("#overview").is_hidden()

    page.fill("#token-input", ADMIN)
    page.click("#token-form button")
    expect(page.locator("#c-nodes")).to_have_text("1", timeout=5000)
    assert page.locator("#login").is_hidden()
