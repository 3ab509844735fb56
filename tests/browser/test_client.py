"""The browser client in headless Chromium, on the demo page, against two real nodes and Redis.

Each user has a browser context of their own (a window of their own, so neither page counts as a
background tab). The pages expose `window.presence = {client, events}` (presence_svc/web/demo).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from presence_svc.redis.keys import Keys
from tests.browser.conftest import GRACE, LEASE_TTL, NodeFactory, study, token
from tests.support.processes import NodeProcess

WAIT_MS = 10_000
# The page heartbeats every 300 ms while its user is active; 1.5 s without input, it stops.
TUNING = {"hb": "300", "active": "1500", "stable": "1000"}

Opener = Callable[..., Any]


@pytest.fixture
def demo_nodes(nodes: NodeFactory) -> tuple[NodeProcess, NodeProcess]:
    return nodes(demo="true"), nodes(demo="true")


@pytest.fixture
def open_page(browser: Any, tmp_path: Path) -> Iterator[Opener]:
    """Open the demo page on `node` as `user`, in a context of its own; wait until it is open."""
    contexts: list[Any] = []

    def open_(node: NodeProcess, user: str, study_id: str, urls: list[NodeProcess]) -> Any:
        context = browser.new_context(viewport={"width": 1000, "height": 640})
        contexts.append(context)
        page = context.new_page()
        fragment = {
            "token": token(user),
            "study": study_id,
            "urls": ",".join(each.base_url for each in urls),
            **TUNING,
        }
        page.goto(node.base_url + "/demo#" + "&".join(f"{k}={v}" for k, v in fragment.items()))
        page.wait_for_function("() => window.presence?.client.state === 'open'", timeout=WAIT_MS)
        return page

    try:
        yield open_
    finally:
        for context in contexts:
            context.close()


def wait_for_user(page: Any, user: str, condition: str = "true") -> None:
    """Wait until `page`'s client lists `user` with `condition` true of it (JS, as `u`)."""
    page.wait_for_function(
        "() => window.presence.client.users()"
        f".some((u) => u.user_id === {user!r} && ({condition}))",
        timeout=WAIT_MS,
    )


def events_of(page: Any, user: str) -> list[str]:
    kinds: list[str] = page.evaluate(
        f"() => window.presence.events.filter((e) => e.detail?.user_id === {user!r})"
        ".map((e) => e.kind)"
    )
    return kinds


def test_two_users_on_two_nodes_join_move_idle_return_and_leave(
    demo_nodes: tuple[NodeProcess, NodeProcess], open_page: Opener, tmp_path: Path
) -> None:
    a, b = demo_nodes
    study_id = study()
    alice = open_page(a, "alice", study_id, [a, b])
    bob = open_page(b, "bob", study_id, [b, a])
    wait_for_user(bob, "alice")
    wait_for_user(alice, "bob")
    assert alice.evaluate("document.visibilityState") == "visible"

    alice.click('.move[data-chapter="ch1"][data-path="main.5"]')
    bob.wait_for_selector('.move[data-path="main.5"] .badge[data-user="alice"]', timeout=WAIT_MS)
    wait_for_user(bob, "alice", "u.chapter_id === 'ch1' && u.move_path === 'main.5'")

    # No input on alice's page: her heartbeats stop and she turns idle for bob.
    wait_for_user(bob, "alice", "u.status === 'idle'")
    alice.mouse.move(200, 200)
    alice.mouse.move(300, 250)
    wait_for_user(bob, "alice", "u.status === 'active'")
    assert events_of(bob, "alice")[-2:] == ["status", "status"]
    screenshot = tmp_path / "demo-bob.png"
    bob.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000

    alice.evaluate("() => window.presence.client.leave()")
    bob.wait_for_function(
        "() => !window.presence.client.users().some((u) => u.user_id === 'alice')",
        timeout=WAIT_MS,
    )
    assert events_of(bob, "alice")[-1] == "leave"
    assert events_of(bob, "alice").count("join") == 1


def test_a_killed_node_moves_its_page_to_the_other_without_a_flap(
    demo_nodes: tuple[NodeProcess, NodeProcess], open_page: Opener
) -> None:
    a, b = demo_nodes
    study_id = study()
    alice = open_page(a, "alice", study_id, [a, b])
    bob = open_page(b, "bob", study_id, [b, a])
    wait_for_user(bob, "alice")
    before = events_of(bob, "alice")

    a.signal(signal.SIGKILL)
    alice.wait_for_function(
        f"() => window.presence.client.url === {b.base_url!r}"
        " && window.presence.client.state === 'open' && window.presence.client.connects === 2",
        timeout=WAIT_MS,
    )
    alice.click('.move[data-chapter="ch2"][data-path="main.7"]')
    wait_for_user(bob, "alice", "u.chapter_id === 'ch2' && u.move_path === 'main.7'")
    # A leave would come a lease TTL (the reap) plus the grace after the kill: wait all of it,
    # since what is checked is that nothing comes.
    time.sleep(LEASE_TTL + GRACE + 1.5)
    wait_for_user(bob, "alice")
    after = events_of(bob, "alice")[len(before) :]
    assert "leave" not in after and "join" not in after, after
    assert "cursor" in after


def test_a_seq_gap_makes_the_page_resync(
    demo_nodes: tuple[NodeProcess, NodeProcess],
    open_page: Opener,
    cleanup_real_redis: str,
    key_prefix: str,
) -> None:
    a, b = demo_nodes
    study_id = study()
    alice = open_page(a, "alice", study_id, [a, b])
    bob = open_page(b, "bob", study_id, [b, a])
    wait_for_user(alice, "bob")
    assert alice.evaluate("window.presence.client.resyncs") == 0

    # One seq taken without an event: the next event is one further than alice expects.
    client = redis.Redis.from_url(cleanup_real_redis)
    try:
        client.hincrby(Keys(key_prefix).study(study_id).meta, "seq", 1)
    finally:
        client.close()
    bob.click('.move[data-chapter="ch1"][data-path="main.6.var1.2"]')

    alice.wait_for_function("() => window.presence.client.resyncs === 1", timeout=WAIT_MS)
    alice.wait_for_function("() => window.presence.client.state === 'open'", timeout=WAIT_MS)
    # The missed event is in the fresh snapshot, not guessed.
    wait_for_user(alice, "bob", "u.move_path === 'main.6.var1.2'")
    assert alice.evaluate("window.presence.client.connects") == 2
    kinds = [event["kind"] for event in alice.evaluate("window.presence.events")]
    assert "resync" in kinds
    assert events_of(bob, "alice").count("leave") == 0


def test_an_expiring_token_is_refreshed_over_the_socket(
    demo_nodes: tuple[NodeProcess, NodeProcess], open_page: Opener
) -> None:
    a, b = demo_nodes
    study_id = study()
    bob = open_page(b, "bob", study_id, [b])
    page = bob.context.new_page()
    page.goto(a.base_url + "/demo")  # same origin as the client; the demo's own client is idle
    minted: list[str] = []

    def mint() -> str:
        minted.append(token("carol", ttl=3))
        return minted[-1]

    page.expose_function("mintToken", mint)
    page.evaluate(
        """async (studyId) => {
            const { PresenceClient } = await import("/client/presence.js");
            const carol = new PresenceClient({
                url: location.origin, studyId, getToken: () => {
                    window.minted = (window.minted || 0) + 1;
                    return window.mintToken();
                },
                heartbeatInterval: 300, activityTimeout: 60000,
            });
            window.carolErrors = [];
            carol.on("error", (error) => window.carolErrors.push(error.code));
            await carol.connect();
            carol.join();
            window.carol = carol;
        }""",
        study_id,
    )
    wait_for_user(bob, "carol")
    # Three tokens: the first, then two refreshes, the second after the first token expired.
    page.wait_for_function("() => window.minted >= 3", timeout=15_000)
    assert len(minted) >= 3, minted
    state = page.evaluate(
        "() => ({connects: window.carol.connects, state: window.carol.state,"
        " errors: window.carolErrors})"
    )
    assert state == {"connects": 1, "state": "open", "errors": []}, json.dumps(state)
    wait_for_user(bob, "carol")
    assert events_of(bob, "carol") == ["join"]


HIDE = """(hidden) => {
    // A headless tab cannot be minimised: the document says it is hidden, then tells the page.
    if (hidden) {
        const own = (value) => ({configurable: true, get: () => value});
        Object.defineProperty(document, "visibilityState", own("hidden"));
        Object.defineProperty(document, "hidden", own(true));
    } else {
        delete document.visibilityState;
        delete document.hidden;
    }
    document.dispatchEvent(new Event("visibilitychange"));
    return document.visibilityState;
}"""


def keep_moving_until(page: Any, watcher: Any, condition: str, timeout: float = 10.0) -> None:
    """Move the mouse on `page` every 100 ms until `condition` (JS) holds on `watcher`."""
    deadline = time.monotonic() + timeout
    step = 0
    while not watcher.evaluate(f"() => {condition}"):
        assert time.monotonic() < deadline, f"not within {timeout} s: {condition}"
        step += 1
        page.mouse.move(100 + step % 7 * 40, 100 + step % 5 * 30)
        # The input reached the client: it is not for want of input that it stays quiet.
        assert page.evaluate("() => Date.now() - window.presence.client._lastActivity") < 1000
        page.wait_for_timeout(100)


def user_is(user: str, condition: str) -> str:
    return f"window.presence.client.users().some((u) => u.user_id === {user!r} && ({condition}))"


def test_a_hidden_page_stops_heartbeats_despite_input_and_resumes_when_visible(
    demo_nodes: tuple[NodeProcess, NodeProcess], open_page: Opener
) -> None:
    a, b = demo_nodes
    study_id = study()
    alice = open_page(a, "alice", study_id, [a, b])
    bob = open_page(b, "bob", study_id, [b, a])
    keep_moving_until(alice, bob, user_is("alice", "u.status === 'active'"))
    before = len(events_of(bob, "alice"))

    assert alice.evaluate(HIDE, True) == "hidden"
    # Input keeps coming, faster than the activity timeout: only the hidden document explains
    # the silence that makes alice idle for bob.
    keep_moving_until(alice, bob, user_is("alice", "u.status === 'idle'"))
    assert alice.evaluate("document.hidden") is True

    assert alice.evaluate(HIDE, False) == "visible"
    keep_moving_until(alice, bob, user_is("alice", "u.status === 'active'"))
    after = events_of(bob, "alice")[before:]
    assert after == ["status", "status"], after
    assert alice.evaluate("[window.presence.client.state, window.presence.client.connects]") == [
        "open",
        1,
    ]


def test_going_offline_drops_the_socket_and_online_reconnects_and_resyncs(
    demo_nodes: tuple[NodeProcess, NodeProcess], open_page: Opener
) -> None:
    a, b = demo_nodes
    study_id = study()
    alice = open_page(a, "alice", study_id, [a, b])
    bob = open_page(b, "bob", study_id, [b, a])
    wait_for_user(bob, "alice")
    wait_for_user(alice, "bob")
    before = events_of(bob, "alice")

    alice.context.set_offline(True)
    alice.wait_for_function(
        "() => window.presence.client.state === 'reconnecting'"
        " && window.presence.client._ws === null",
        timeout=WAIT_MS,
    )
    # While offline, bob moves: alice's socket is gone, only a fresh snapshot can bring it.
    bob.click('.move[data-chapter="ch2"][data-path="main.4"]')
    wait_for_user(bob, "bob", "u.move_path === 'main.4'")
    alice.wait_for_timeout(800)
    offline = alice.evaluate(
        "() => [window.presence.client.state, window.presence.client.connects]"
    )
    assert offline == ["reconnecting", 1], offline  # no attempt while the browser is offline
    assert not alice.evaluate(user_is("bob", "u.move_path === 'main.4'"))

    alice.context.set_offline(False)
    alice.wait_for_function(
        "() => window.presence.client.state === 'open' && window.presence.client.connects === 2",
        timeout=WAIT_MS,
    )
    wait_for_user(alice, "bob", "u.chapter_id === 'ch2' && u.move_path === 'main.4'")
    alice.click('.move[data-chapter="ch1"][data-path="main.3"]')
    wait_for_user(bob, "alice", "u.chapter_id === 'ch1' && u.move_path === 'main.3'")
    # A leave would come a grace after the release of alice's socket: wait all of it, since
    # what is checked is that nothing comes.
    time.sleep(GRACE + 1.5)
    wait_for_user(bob, "alice")
    after = events_of(bob, "alice")[len(before) :]
    assert "leave" not in after and "join" not in after, after
    states = [e["detail"] for e in alice.evaluate("window.presence.events") if e["kind"] == "state"]
    assert states[-2:] == ["reconnecting", "open"], states


def test_a_user_typing_a_note_shows_on_the_other_page_until_they_stop(
    demo_nodes: tuple[NodeProcess, NodeProcess], open_page: Opener
) -> None:
    # Signals cross nodes (alice on a, bob on b): the typing line is the demo's, end to end.
    a, b = demo_nodes
    study_id = study()
    alice = open_page(a, "alice", study_id, [a, b])
    bob = open_page(b, "bob", study_id, [b, a])
    wait_for_user(alice, "bob")
    wait_for_user(bob, "alice")

    bob.evaluate(
        "() => { window.typingSignals = [];"
        " window.presence.client.on('signal.typing', (data) => window.typingSignals.push(data)); }"
    )
    alice.click("#note")
    started = time.monotonic()
    alice.keyboard.type("Nf3 is stronger")
    took = time.monotonic() - started
    bob.wait_for_function(
        "() => document.getElementById('typing').textContent === 'alice is typing…'",
        timeout=WAIT_MS,
    )
    assert bob.evaluate("window.presence.client.typingUsers()") == [
        {"user_id": "alice", "chapter_id": "ch1"}
    ]
    # Her own page shows nobody: the node does not echo a signal to its sender.
    assert alice.text_content("#typing") == ""

    alice.keyboard.press("Enter")  # the note is done: typing ends at once, not 5 s later
    bob.wait_for_function(
        "() => document.getElementById('typing').textContent === ''", timeout=WAIT_MS
    )
    assert bob.evaluate("window.presence.client.typingUsers()") == []
    signals = bob.evaluate("window.typingSignals")
    assert signals[-1] == {"active": False, "user_id": "alice"}, signals
    # 15 keys, one typing signal: at most one every 2 s, however fast she types.
    assert len(signals) == 2 or took >= 2, (took, signals)


def test_batched_delivery_moves_the_cursors_without_a_resync(
    nodes: NodeFactory, open_page: Opener
) -> None:
    # More than one socket of the study on the node: it delivers in presence.batch frames.
    a = nodes(demo="true", batch_threshold="1")
    study_id = study()
    alice = open_page(a, "alice", study_id, [a])
    bob = open_page(a, "bob", study_id, [a])
    wait_for_user(bob, "alice")
    bob.evaluate(
        "() => { window.frameTypes = [];"
        " window.presence.client._ws.addEventListener('message',"
        " (m) => window.frameTypes.push(JSON.parse(m.data).type)); }"
    )
    for path in ("main.2", "main.3", "main.6.var1.1", "main.7"):
        alice.click(f'.move[data-chapter="ch1"][data-path="{path}"]')
    bob.wait_for_selector('.move[data-path="main.7"] .badge[data-user="alice"]', timeout=WAIT_MS)
    wait_for_user(bob, "alice", "u.move_path === 'main.7'")
    assert "presence.batch" in bob.evaluate("window.frameTypes")
    state = bob.evaluate(
        "() => [window.presence.client.resyncs, window.presence.client.connects,"
        " window.presence.client.total(), window.presence.client.complete()]"
    )
    assert state == [0, 1, 2, True], state
    assert events_of(bob, "alice").count("join") == 1
