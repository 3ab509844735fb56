"""The Redis ACLs of docs/security.md: sufficient for real nodes, and nothing more.

The ACL blocks are read from the document itself (each fenced block that starts with
`# presence-svc ACL: <user>`), so the document and this test cannot drift apart.

- Nodes connected as `presence-node` run a whole scenario (REST and WebSocket heartbeats, sweeps,
  leave, socket close and leave grace, a peer reaping a `kill -9`ed node, the operators' stats,
  shutdown) with ACL LOG empty, and every command the ACL grants shows up in Redis's
  commandstats: the grant is exactly what the service uses.
- `presence-backend` can read sessions and publish study events, and cannot write.
- Both are refused everything else (FLUSHALL, CONFIG, keys and channels outside the prefix, Lua
  calling ungranted commands).
- Over TLS (when redis-server supports it): a node connects with `rediss://` and mutual TLS,
  everything configured in the URL.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ResponseError
from redis.retry import Retry

from presence_svc.leases import LeaseKeeper
from presence_svc.models import Lease
from presence_svc.publisher import StudyEventPublisher
from presence_svc.redis.keys import Keys
from presence_svc.service import PresenceService
from presence_svc.store import NodeRenewal
from tests.support import auth as support_auth
from tests.support.clients import Watcher, rest_heartbeat
from tests.support.clock import ManualTimer
from tests.support.cluster import LocalCluster
from tests.support.nodes import private_redis
from tests.support.processes import NodeProcess, RedisServer, free_port, terminate
from tests.support.tasks import stop
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.redis, pytest.mark.multinode]

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
MARKER = "# presence-svc ACL: "
NODE_USER = "presence-node"
BACKEND_USER = "presence-backend"
PREFIX = "presence"

SECRET = "redis-acl-test-secret-of-at-least-32-bytes!"
IDLE, AWAY, EXPIRE, SWEEP = 0.8, 1.6, 60.0, 0.1
GRACE, LEASE_TTL = 0.5, 1.0
WITHIN = 15.0  # seconds any awaited event may take (a busy CI machine)

# Sent by every client before any ACL applies, or by this test as the administrator.
NOT_FROM_NODES = {"auth", "hello", "client|setinfo", "config|resetstat", "info"}


# --- the ACL blocks of docs/security.md ------------------------------------------------------


def fenced_block(first_line: str) -> list[list[str]]:
    """The lines, split into words, of the document's code block that starts with `first_line`."""
    text = SECURITY_DOC.read_text()
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        lines = block.splitlines()
        if lines and lines[0].strip() == first_line:
            return [line.split() for line in lines[1:] if line.strip()]
    raise AssertionError(f"docs/security.md has no block starting with {first_line!r}")


def acl_block(user: str) -> list[list[str]]:
    """The `ACL SETUSER` commands of the document's block for `user`, split into words."""
    commands = fenced_block(MARKER + user)
    for words in commands:
        assert words[:3] == ["ACL", "SETUSER", user], words
    return commands


def apply_acl(admin: redis.Redis, user: str, password: str) -> None:
    """Create `user` as the document says, with `password` in place of its placeholder."""
    for words in acl_block(user):
        rules = [">" + password if rule.startswith(">") else rule for rule in words[3:]]
        cast(Any, admin).execute_command("ACL", "SETUSER", user, *rules)


def granted_commands(user: str) -> set[str]:
    """The commands the block grants (lower case, `container|sub` for subcommands)."""
    rules = [rule for words in acl_block(user) for rule in words[3:]]
    broad = [r for r in rules if r.startswith("+@") or r in ("allcommands", "allkeys", "~*", "&*")]
    assert not broad, f"the {user} ACL must grant commands one by one, not {broad}"
    return {rule[1:].lower() for rule in rules if rule.startswith("+")}


def test_the_document_grants_commands_one_by_one() -> None:
    # No server needed: a quick failure when the document is edited.
    for user in (NODE_USER, BACKEND_USER):
        assert acl_block(user)[0][3] == "reset", "each block must start from nothing"
    node = granted_commands(NODE_USER)
    assert {"evalsha", "publish", "subscribe"} <= node
    assert "eval" not in node
    backend = granted_commands(BACKEND_USER)
    assert "publish" in backend
    assert not backend & {"hset", "del", "zadd", "sadd", "evalsha", "eval", "subscribe"}


def commands_run(admin: redis.Redis) -> set[str]:
    """Every command Redis has run (from clients or scripts) since the last CONFIG RESETSTAT."""
    stats: dict[str, dict[str, Any]] = admin.info("commandstats")
    return {
        name.removeprefix("cmdstat_").lower()
        for name, figures in stats.items()
        if int(figures.get("calls", 0)) > 0
    }


def acl_denials(admin: redis.Redis) -> list[tuple[str, str, str, str, int]]:
    """ACL LOG as (user, context, object, reason, count), less redis-py's CLIENT SETINFO
    (refused, and ignored by redis-py, on Redis >= 7.2)."""
    entries: list[dict[str, Any]] = admin.acl_log()
    return [
        (e["username"], e["context"], e["object"], e["reason"], int(e["count"]))
        for e in entries
        if str(e["object"]).lower() != "client|setinfo"
    ]


def password() -> str:
    # Characters a URL must percent-encode, to check the documented way of writing one.
    return secrets.token_hex(16) + "@:/%"


def node_url(scheme: str, port: int, secret: str, query: str = "") -> str:
    url = f"{scheme}://{NODE_USER}:{quote(secret, safe='')}@127.0.0.1:{port}/0"
    return f"{url}?{query}" if query else url


def node_env(url: str) -> dict[str, str]:
    return {
        "PRESENCE_REDIS_URL": url,
        "PRESENCE_JWT_SECRET": SECRET,
        "PRESENCE_KEY_PREFIX": PREFIX,
        "PRESENCE_IDLE_AFTER": str(IDLE),
        "PRESENCE_AWAY_AFTER": str(AWAY),
        "PRESENCE_EXPIRE_AFTER": str(EXPIRE),
        "PRESENCE_SWEEP_INTERVAL": str(SWEEP),
        "PRESENCE_LEAVE_GRACE": str(GRACE),
        "PRESENCE_LEASE_TTL": str(LEASE_TTL),
    }


def token(user: str, *studies: str) -> str:
    """A token of the nodes' secret granting `studies` only."""
    return support_auth.token(user, secret=SECRET, ttl=600, studies=studies)


def auth(user: str, *studies: str) -> dict[str, str]:
    return support_auth.bearer(token(user, *studies))


def saw(watcher: Watcher, event_type: str, user: str) -> bool:
    return any(
        e["type"] == event_type and e["data"].get("user_id") == user for e in watcher.messages
    )


async def wait_for(watcher: Watcher, event_type: str, user: str) -> None:
    await watcher.wait_until(
        lambda w: saw(w, event_type, user), within=WITHIN, what=f"{event_type} of {user}"
    )


async def websocket_heartbeats_stored(http: httpx.AsyncClient, node: NodeProcess) -> float:
    """The node's count of WebSocket heartbeats it has the stored answer of (its metrics)."""
    response = await http.get(f"{node.base_url}/metrics")
    assert response.status_code == 200, response.text
    wanted = {"transport": "websocket", "outcome": "ok"}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "presence_heartbeats_total" and sample.labels == wanted:
                return float(sample.value)
    return 0.0  # none counted yet: the labelled series appears with the first one


def check_node_log(node: NodeProcess, *secrets_: str) -> None:
    log = node.log_text()
    assert "NOPERM" not in log, log
    assert "Traceback" not in log, log
    for secret in secrets_:
        assert secret not in log and quote(secret, safe="") not in log, "a password was logged"


def refused(call: Any, *args: Any) -> str:
    """Run a Redis call that must be refused by the ACL; the error text."""
    with pytest.raises(ResponseError) as caught:
        call(*args)
    message = str(caught.value)
    assert isinstance(caught.value, NoPermissionError) or "NOPERM" in message, message
    return message


# --- plain TCP: the whole scenario -----------------------------------------------------------


@pytest.fixture
def acl_redis() -> Iterator[RedisServer]:
    """A private redis-server (never a shared one: this test rewrites its users)."""
    with private_redis("needs") as server:
        yield server


async def test_nodes_run_on_the_node_acl_and_backends_on_theirs(
    acl_redis: RedisServer, tmp_path: Path
) -> None:
    admin = redis.Redis.from_url(acl_redis.url, decode_responses=True)
    node_password, backend_password = password(), password()
    apply_acl(admin, NODE_USER, node_password)
    apply_acl(admin, BACKEND_USER, backend_password)
    admin.acl_log_reset()
    admin.config_resetstat()

    url = node_url("redis", acl_redis.port, node_password)
    env = node_env(url)
    a = NodeProcess(env, tmp_path).start()
    b = NodeProcess(env, tmp_path).start()
    study, other = f"study-{uuid.uuid4().hex[:8]}", f"study-{uuid.uuid4().hex[:8]}"
    sk = Keys(PREFIX).study(study)
    try:
        watcher = await Watcher.open(a.ws_url, study, token("watcher", study, other))
        assert watcher.snapshot["total"] == 0
        # A study watched and left again: its channel is unsubscribed.
        passer_by = await Watcher.open(a.ws_url, other, token("watcher", study, other))
        await passer_by.close()

        async with httpx.AsyncClient() as http:
            # REST heartbeat: a new session.
            await rest_heartbeat(
                http,
                a.base_url,
                token("alice", study),
                study_id=study,
                chapter_id="ch1",
                move_path="main.12.var2.3",
            )
            await wait_for(watcher, "presence.user_joined", "alice")
            # A WebSocket heartbeat without a cursor: the socket holds bob's session.
            bob = await Watcher.open(a.ws_url, study, token("bob", study))
            await bob.send({"type": "heartbeat"})
            await wait_for(watcher, "presence.user_joined", "bob")
            # The sweep turns alice idle; her next heartbeat makes her active and moves her.
            await wait_for(watcher, "presence.user_idle", "alice")
            await rest_heartbeat(
                http, b.base_url, token("alice", study), study_id=study, move_path="main.13"
            )
            await wait_for(watcher, "presence.cursor_moved", "alice")
            assert saw(watcher, "presence.user_active", "alice")
            listing = await http.get(f"{b.base_url}/presence/{study}", headers=auth("x", study))
            assert listing.status_code == 200, listing.text
            assert {u["user_id"] for u in listing.json()["users"]} == {"alice", "bob"}
            # DELETE: alice leaves at once.
            response = await http.delete(
                f"{b.base_url}/presence/{study}", headers=auth("alice", study)
            )
            assert response.json() == {"status": "success"}
            await wait_for(watcher, "presence.user_left", "alice")

            # Carol's socket on node b holds her session; bob closes his socket and leaves
            # after the grace period.
            carol = await Watcher.open(b.ws_url, study, token("carol", study))
            stored_before = await websocket_heartbeats_stored(http, b)
            await carol.send({"type": "heartbeat", "chapter_id": "ch2"})
            await wait_for(watcher, "presence.user_joined", "carol")

            # Once node b has the answer, carol's next heartbeat is a steady one (one script,
            # which checks with SISMEMBER that her socket still holds the session).
            async def carol_stored() -> bool:
                return await websocket_heartbeats_stored(http, b) > stored_before

            await eventually_async(carol_stored, within=WITHIN)
            # Clearing a cursor field is the one write of a heartbeat that deletes one (HDEL).
            await carol.send({"type": "heartbeat", "chapter_id": None})
            await wait_for(watcher, "presence.cursor_moved", "carol")
            await bob.close()
            await wait_for(watcher, "presence.user_left", "bob")

            # Node b dies without a word: node a reaps its lease, carol leaves after the grace
            # and the study is empty (its meta gets a TTL).
            dead_id = str(b.health()["node_id"])
            b.signal(signal.SIGKILL)
            b.wait(5)
            await carol.close()
            await wait_for(watcher, "presence.user_left", "carol")
            await rest_heartbeat(http, a.base_url, token("dave", study), study_id=study)
            await wait_for(watcher, "presence.user_joined", "dave")
            await check_stats(http, a, study)

        used = commands_run(admin) - NOT_FROM_NODES
        assert acl_denials(admin) == []
        granted = granted_commands(NODE_USER)
        assert used - granted == set(), "the nodes ran commands the ACL does not grant"
        assert granted - used == set(), "the ACL grants commands the nodes never ran"

        backend_secret = quote(backend_password, safe="")
        backend = redis.Redis.from_url(
            f"redis://{BACKEND_USER}:{backend_secret}@127.0.0.1:{acl_redis.port}/0"
        )
        try:
            check_backend(backend, study, seq=max(e["data"]["seq"] for e in watcher.events()))
            await watcher.wait_until(
                lambda w: any(m["type"] == "study.chapter_renamed" for m in w.messages),
                within=WITHIN,
                what="the backend's event",
            )
        finally:
            backend.close()
        check_node_user_refusals(acl_redis.port, node_password)
        denials = acl_denials(admin)
        assert denials, "the refusals above should be in ACL LOG"

        await watcher.close()
        a.signal(signal.SIGTERM)
        assert a.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        assert acl_denials(admin) == denials, "stopping the node was refused something"
        # The dead node was reaped to the end, and the clean stop left no lease set behind.
        assert admin.zscore(Keys(PREFIX).live_nodes, dead_id) is None
        assert admin.zscore(Keys(PREFIX).dead_nodes, dead_id) is None
        assert admin.keys(f"{PREFIX}:{{node:*") == []
        assert admin.zrange(sk.index, 0, -1) == ["dave"]
    finally:
        a.stop()
        b.stop()
        admin.close()
    check_node_log(a, node_password, backend_password)
    check_node_log(b, node_password, backend_password)


async def check_stats(http: httpx.AsyncClient, node: NodeProcess, study: str) -> None:
    """The operators' reads (the dashboard's too) answer on the node ACL: dave alone in `study`,
    node `node` among the live nodes."""
    operator = support_auth.admin(secret=SECRET)
    overview = await http.get(f"{node.base_url}/stats", headers=operator)
    assert overview.status_code == 200, overview.text
    assert node.health()["node_id"] in {n["node_id"] for n in overview.json()["nodes"]}
    counted = await http.get(f"{node.base_url}/presence/{study}/stats", headers=auth("x", study))
    assert counted.status_code == 200, counted.text
    assert counted.json()["users"]["total"] == 1


def check_backend(backend: redis.Redis, study: str, seq: int) -> None:
    """What other backends may do (read presence, publish study events), and may not."""
    keys = Keys(PREFIX)
    sk = keys.study(study)
    assert backend.ping()
    members: list[tuple[bytes, float]] = cast(Any, backend).zrange(sk.index, 0, -1, withscores=True)
    assert [member for member, _ in members] == [b"dave"]
    session = backend.hgetall(sk.session("dave"))
    assert session[b"user_id"] == b"dave" and session[b"status"] == b"active"
    assert int(backend.hget(sk.meta, "seq") or 0) == seq
    received = StudyEventPublisher(backend, PREFIX).publish(
        study, "study.chapter_renamed", {"chapter_id": "c1", "name": "Najdorf"}
    )
    assert received == 1  # node a's subscription

    # Writes, node keys and other channels are refused.
    refused(backend.hset, sk.session("dave"), "status", "away")
    refused(backend.delete, sk.session("dave"))
    refused(backend.zadd, sk.index, {"mallory": 1})
    refused(backend.execute_command, "HSET", sk.meta, "seq", "1")  # HSET granted nowhere
    refused(backend.zrange, keys.live_nodes, 0, -1)
    refused(backend.zrange, keys.schedule_shard(0), 0, -1)
    refused(backend.publish, f"{PREFIX}:{{nodes}}:alive", b"x")
    refused(backend.publish, "another-app:events", b"x")
    refused(backend.flushall)


def check_node_user_refusals(port: int, secret: str) -> None:
    """The node user reaches nothing outside its commands, keys and channels, Lua included."""
    node = redis.Redis.from_url(node_url("redis", port, secret))
    try:
        assert node.ping()
        refused(node.flushall)
        refused(node.config_get, "*")
        refused(node.keys, "*")
        refused(node.execute_command, "SCAN", 0)
        refused(node.execute_command, "ACL", "LIST")
        refused(node.eval, "return 1", 0)
        refused(node.set, f"{PREFIX}:x", "1")  # SET is not granted even under the prefix
        refused(node.hset, "another-app:key", "f", "v")
        refused(node.publish, "another-app:events", b"x")
        # A script runs with the same rights: it cannot reach an ungranted command or key.
        flush = node.script_load("return redis.call('FLUSHALL')")
        with pytest.raises(ResponseError, match=r"(?i)noperm|can.t (run|access)"):
            node.evalsha(flush, 0)
        write = node.script_load("return redis.call('HSET', KEYS[1], 'f', 'v')")
        refused(node.evalsha, write, 1, "another-app:key")
        sneak = node.script_load("return redis.call('HSET', 'another-app:key', 'f', 'v')")
        with pytest.raises(ResponseError, match=r"(?i)noperm|can.t (run|access)"):
            node.evalsha(sneak, 0)
    finally:
        node.close()


async def test_a_stats_read_the_acl_refuses_is_a_json_503(
    acl_redis: RedisServer, tmp_path: Path
) -> None:
    # Found with the node ACL lacking +zcount: GET /stats and the study stats answered a bare
    # 500 (NoPermissionError and its traceback) on every poll of the dashboard.
    admin = redis.Redis.from_url(acl_redis.url, decode_responses=True)
    secret = password()
    apply_acl(admin, NODE_USER, secret)
    admin.execute_command("ACL", "SETUSER", NODE_USER, "-zcount")
    node = NodeProcess(node_env(node_url("redis", acl_redis.port, secret)), tmp_path).start()
    study = f"study-{uuid.uuid4().hex[:8]}"
    operator = support_auth.admin(secret=SECRET)
    try:
        async with httpx.AsyncClient() as http:
            await rest_heartbeat(http, node.base_url, token("alice", study), study_id=study)
            for url, headers in (
                ("/stats", operator),
                (f"/presence/{study}/stats", auth("x", study)),
            ):
                response = await http.get(node.base_url + url, headers=headers)
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "unavailable"
                assert response.headers["retry-after"] == "1"
            # Only the stats reads are refused: heartbeats and the listing go on.
            await rest_heartbeat(http, node.base_url, token("alice", study), study_id=study)
            listing = await http.get(f"{node.base_url}/presence/{study}", headers=auth("x", study))
            assert listing.json()["total"] == 1
    finally:
        node.stop()
        admin.close()
    log = node.log_text()
    assert "Traceback" not in log, log
    assert "refused by Redis" in log and "'zcount'" in log, "the node did not log the refusal"
    assert secret not in log and quote(secret, safe="") not in log


class _RefusingService:
    """Renews fine; reaping is refused, as with a node ACL that lacks SRANDMEMBER."""

    def __init__(self) -> None:
        self.renewals = 0

    async def renew_node(self, node_id: str) -> NodeRenewal:
        self.renewals += 1
        return NodeRenewal(True, int(time.time() * 1000))

    async def leases_of(self, node_id: str) -> list[Lease]:
        return []  # its periodic pass finds nothing to release

    async def reap_dead_nodes(self, node_id: str) -> int:
        raise NoPermissionError(
            "this user has no permissions to run the 'srandmember' command or its subcommand"
        )


async def test_a_refused_command_does_not_stop_the_lease_keeper(
    caplog: pytest.LogCaptureFixture, timer: ManualTimer
) -> None:
    # Found with an ACL lacking +srandmember: the refusal ended the lease task silently, the
    # node stopped renewing and its peers took it for dead (releasing its sockets' sessions).
    service = _RefusingService()
    keeper = LeaseKeeper(
        cast(PresenceService, service), lease_ttl=3.0, monotonic=timer.monotonic, sleep=timer.sleep
    )
    await keeper.start()
    task = asyncio.create_task(keeper.run())
    try:
        await timer.wait_asleep()
        # Ten ticks; from the third (a whole TTL of renewals) each also tries to reap, refused.
        await timer.advance(10.0)
        assert not task.done(), "the lease keeper stopped"
    finally:
        await stop(task)
    assert service.renewals == 1 + 10, "the lease keeper stopped renewing"
    refusals = [r for r in caplog.records if "lease renewal failed" in r.getMessage()]
    assert len(refusals) == 8
    assert all("srandmember" in r.getMessage() for r in refusals)


# --- TLS: rediss:// with everything in the URL -----------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA nobody trusts


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")


def _make_ca(name: str, folder: Path) -> None:
    _openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt",
        "ec_paramgen_curve:prime256v1", "-keyout", f"{name}.key", "-out", f"{name}.crt",
        "-days", "2", "-subj", f"/CN=presence-svc test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def _make_leaf(name: str, usage: str, folder: Path) -> None:
    (folder / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    """A throwaway CA with a server and a client certificate for 127.0.0.1, and a stranger CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS test needs openssl on PATH to make a throwaway CA")
    folder = tmp_path / "tls"
    folder.mkdir()
    _make_ca("ca", folder)
    _make_ca("other-ca", folder)
    _make_leaf("server", "serverAuth", folder)
    _make_leaf("client", "clientAuth", folder)
    return Certs(
        ca=folder / "ca.crt",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
        other_ca=folder / "other-ca.crt",
    )


class TlsRedisServer:
    """A redis-server that speaks TLS only and requires client certificates."""

    def __init__(self, certs: Certs) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("needs redis-server on PATH")
        self.port = free_port()
        self._certs = certs
        self._dir = tempfile.TemporaryDirectory(prefix="presence-redis-tls-")
        self._log = Path(self._dir.name) / "redis.log"
        self._proc = subprocess.Popen(
            [
                binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
                "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "yes",
                "--save", "", "--appendonly", "no", "--dir", self._dir.name,
                "--logfile", str(self._log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def admin(self, **overrides: Any) -> redis.Redis:
        options: dict[str, Any] = {
            "ssl": True,
            "ssl_ca_certs": str(self._certs.ca),
            "ssl_certfile": str(self._certs.client_cert),
            "ssl_keyfile": str(self._certs.client_key),
            "socket_connect_timeout": 2,
            **overrides,
        }
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                stderr = self._proc.stderr.read().decode() if self._proc.stderr else ""
                log = self._log.read_text() if self._log.exists() else ""
                said = (stderr + log).strip()[-500:]
                if "tls" in said.lower() and "directive" in said.lower():
                    pytest.skip(f"this redis-server was built without TLS: {said}")
                raise RuntimeError(f"the TLS redis-server exited: {said}")
            client = self.admin()
            try:
                if client.ping():
                    return
            except RedisConnectionError:
                time.sleep(0.05)
            finally:
                client.close()
        raise TimeoutError("the TLS redis-server did not come up")

    def stop(self) -> None:
        terminate(self._proc, 5)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        self._dir.cleanup()


@pytest.fixture
def tls_redis(certs: Certs) -> Iterator[TlsRedisServer]:
    server = TlsRedisServer(certs)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


async def test_a_node_connects_over_tls_with_the_url_alone(
    tls_redis: TlsRedisServer, certs: Certs, tmp_path: Path
) -> None:
    admin = tls_redis.admin(decode_responses=True)
    secret = password()
    apply_acl(admin, NODE_USER, secret)
    query = "&".join(
        f"{name}={quote(str(value), safe='')}"
        for name, value in [
            ("ssl_cert_reqs", "required"),
            ("ssl_ca_certs", certs.ca),
            ("ssl_certfile", certs.client_cert),
            ("ssl_keyfile", certs.client_key),
        ]
    )
    node = NodeProcess(node_env(node_url("rediss", tls_redis.port, secret, query)), tmp_path)
    study = f"study-{uuid.uuid4().hex[:8]}"
    try:
        node.start()
        async with httpx.AsyncClient() as http:
            ready = await http.get(f"{node.base_url}/readyz")
            assert ready.json()["redis"] == "ok"
            await rest_heartbeat(http, node.base_url, token("alice", study), study_id=study)
        watcher = await Watcher.open(node.ws_url, study, token("bob", study))
        assert [u["user_id"] for u in watcher.snapshot["users"]] == ["alice"]
        await watcher.send({"type": "heartbeat", "move_path": "main.1"})
        await wait_for(watcher, "presence.user_joined", "bob")
        await watcher.close()
        assert acl_denials(admin) == []
        # The session really is in this Redis, under the node user's prefix.
        assert admin.hget(Keys(PREFIX).study(study).session("alice"), "user_id") == "alice"
    finally:
        node.stop()
        admin.close()
    check_node_log(node, secret)

    # The server is verified, and so is the client.
    once = Retry(NoBackoff(), 0)  # fail at once instead of retrying with backoff
    stranger = tls_redis.admin(ssl_ca_certs=str(certs.other_ca), retry=once)
    with pytest.raises(RedisConnectionError, match=r"(?i)certificate"):
        stranger.ping()
    stranger.close()
    anonymous = tls_redis.admin(ssl_certfile=None, ssl_keyfile=None, retry=once)
    with pytest.raises(RedisConnectionError):
        anonymous.ping()
    anonymous.close()


# --- Redis Cluster: the node block plus its cluster lines, on every master --------------------

CLUSTER_MARKER = "# presence-svc ACL: presence-node on Redis Cluster"


def cluster_lines() -> list[list[str]]:
    """The document's extra `ACL SETUSER` lines for nodes on Redis Cluster."""
    return fenced_block(CLUSTER_MARKER)


@pytest.fixture
def acl_cluster() -> Iterator[LocalCluster]:
    """A private cluster (this test rewrites its users)."""
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("needs redis-server and redis-cli on PATH")
    cluster = LocalCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_node_on_a_cluster_runs_on_the_node_acl_and_its_cluster_lines(
    acl_cluster: LocalCluster, tmp_path: Path
) -> None:
    secret = password()
    for port in acl_cluster.ports:
        with acl_cluster.client(port) as admin:
            apply_acl(admin, NODE_USER, secret)
            for words in cluster_lines():
                cast(Any, admin).execute_command(*words)
            admin.acl_log_reset()
            admin.config_resetstat()
    env = {
        **node_env(node_url("redis", acl_cluster.ports[0], secret)),
        "PRESENCE_REDIS_CLUSTER": "1",
    }
    node = NodeProcess(env, tmp_path).start()
    # Enough studies that every master owns some of them.
    studies = [f"study-{uuid.uuid4().hex[:8]}" for _ in range(12)]
    try:
        watchers = [await Watcher.open(node.ws_url, s, token("watcher", *studies)) for s in studies]
        async with httpx.AsyncClient() as http:
            for study in studies:
                await rest_heartbeat(http, node.base_url, token("alice", study), study_id=study)
        for watcher in watchers:
            await wait_for(watcher, "presence.user_joined", "alice")
            await wait_for(watcher, "presence.user_idle", "alice")  # swept on its shard
        for watcher in watchers:
            await watcher.close()
    finally:
        node.stop()
    check_node_log(node, secret)
    ran: set[str] = set()
    for port in acl_cluster.ports:
        with acl_cluster.client(port) as admin:
            assert acl_denials(admin) == [], port
            ran |= commands_run(admin)
    extra = {rule[1:].lower() for words in cluster_lines() for rule in words[3:] if rule[0] == "+"}
    assert extra <= ran, f"granted for a cluster but never run: {extra - ran}"
    assert not {"publish", "subscribe"} & ran, "a cluster node used unsharded pub/sub"
