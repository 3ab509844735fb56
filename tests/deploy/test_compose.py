"""deploy/docker-compose.yml and the nginx load balancer it runs, checked statically."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from presence_svc.app import RELEASE_TIMEOUT
from presence_svc.web.rest import ROUTES
from tests.deploy.artifacts import (
    COMPOSE,
    DEPLOY,
    PLACEHOLDER_SECRETS,
    load_yaml,
    nginx_block,
    nginx_directives,
    seconds,
    served_port,
    settings_from_env,
    unknown_settings,
)

ROUTE_PATHS = {route.path for route in ROUTES}
LB_HOST_PORT = 8080


def services() -> dict[str, Any]:
    compose: dict[str, Any] = load_yaml(COMPOSE)
    result: dict[str, Any] = compose["services"]
    return result


def nodes() -> dict[str, Any]:
    """The services that run the presence-svc image (built from the repository)."""
    return {name: s for name, s in services().items() if "build" in s}


def lb_name() -> str:
    found = [name for name, s in services().items() if str(s.get("image", "")).startswith("nginx")]
    assert len(found) == 1, "one nginx load balancer"
    return found[0]


def nginx_conf() -> str:
    lb = services()[lb_name()]
    mounts = [v.split(":") for v in lb.get("volumes", [])]
    conf: list[str] = [host for host, target, *_ in mounts if target == "/etc/nginx/nginx.conf"]
    assert len(conf) == 1, "the LB must mount its config over /etc/nginx/nginx.conf"
    return (COMPOSE.parent / conf[0]).read_text()


def healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", "exec-form healthcheck"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(test))
    assert len(urls) == 1, test
    url: str = urls[0]
    return url


def test_three_nodes_redis_7_and_a_load_balancer() -> None:
    assert sorted(nodes()) == ["node1", "node2", "node3"]
    redis = services()["redis"]
    assert re.fullmatch(r"redis:7(\.\d+)*(-alpine)?", redis["image"]), redis["image"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    for node in nodes().values():
        assert node["build"]["context"] == ".."
        assert (COMPOSE.parent / node["build"]["context"] / node["build"]["dockerfile"]).is_file()


def test_nodes_share_redis_and_one_jwt_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    envs = [node["environment"] for node in nodes().values()]
    for env in envs:
        assert env["PRESENCE_REDIS_URL"] == "redis://redis:6379/0"
        # Interpolated from the user's environment: no secret is committed.
        assert re.fullmatch(r"\$\{PRESENCE_JWT_SECRET:\?[^}]*\}", env["PRESENCE_JWT_SECRET"])
        assert unknown_settings(env) == []
    assert all(env == envs[0] for env in envs), "every node needs the same settings"
    fake = {**envs[0], "PRESENCE_JWT_SECRET": PLACEHOLDER_SECRETS["PRESENCE_JWT_SECRET"]}
    settings_from_env(monkeypatch, {k: str(v) for k, v in fake.items()})


def test_nodes_wait_for_healthy_redis_and_report_readiness() -> None:
    for name, node in nodes().items():
        assert node["depends_on"]["redis"]["condition"] == "service_healthy", name
        url = urlsplit(healthcheck_url(node))
        assert url.port == served_port(), name
        assert url.path in ROUTE_PATHS, name


def test_nodes_stop_gracefully_with_a_read_only_root(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, node in nodes().items():
        env = {k: str(v) for k, v in node["environment"].items()}
        settings = settings_from_env(monkeypatch, {**env, **PLACEHOLDER_SECRETS})
        budget = settings.drain_timeout + RELEASE_TIMEOUT
        # Docker's default (10 s) would SIGKILL a node in the middle of its drain.
        assert seconds(node["stop_grace_period"]) > budget, name
        assert node["read_only"] is True, name
        assert node["cap_drop"] == ["ALL"], name


def test_load_balancer_waits_for_every_node_and_listens_on_8080() -> None:
    lb = services()[lb_name()]
    waits = {name: dep["condition"] for name, dep in lb["depends_on"].items()}
    assert waits == dict.fromkeys(nodes(), "service_healthy")
    (published,) = lb["ports"]
    host_port, container_port = str(published).split(":")[-2:]
    assert int(host_port) == LB_HOST_PORT
    listens = [d for d in nginx_directives(nginx_conf()) if d[:1] == ["listen"]]
    assert [d[1] for d in listens] == [container_port]
    assert urlsplit(healthcheck_url(lb)).port == int(container_port)


BALANCING = {"ip_hash", "hash", "least_conn", "random", "sticky"}


def upstream_of(conf: str, *location: str) -> str:
    """The upstream a location proxies to."""
    (proxy_pass,) = [d for d in nginx_block(conf, "location", *location) if d[0] == "proxy_pass"]
    return proxy_pass[1].removeprefix("http://")


def test_nginx_round_robins_rest_over_every_node() -> None:
    conf = nginx_conf()
    upstreams = [d[1] for d in nginx_directives(conf) if d[:1] == ["upstream"]]
    assert len(upstreams) == 2, "one round-robin upstream, one hashed on the study"
    for name in upstreams:
        servers = {d[1] for d in nginx_block(conf, "upstream", name) if d[0] == "server"}
        assert servers == {f"{node}:{served_port()}" for node in nodes()}, name
    name = upstream_of(conf, "/")
    assert name in upstreams
    # Any balancing directive would replace round-robin (and REST needs no stickiness).
    assert not [d for d in nginx_block(conf, "upstream", name) if d[0] in BALANCING]


def test_nginx_hashes_websockets_on_their_study() -> None:
    conf = nginx_conf()
    name = upstream_of(conf, "=", "/ws/presence")
    assert name != upstream_of(conf, "/")
    balancing = [d for d in nginx_block(conf, "upstream", name) if d[0] in BALANCING]
    # Consistent (ketama): a node that leaves moves only its own studies.
    assert balancing == [["hash", "$arg_study_id", "consistent"]]


@pytest.mark.parametrize("where", [("/",), ("=", "/ws/presence")], ids=["rest", "ws"])
def test_nginx_proxies_websocket_upgrades_with_long_timeouts(where: tuple[str, ...]) -> None:
    conf = nginx_conf()
    location = nginx_block(conf, "location", *where)
    assert ["proxy_http_version", "1.1"] in location
    assert ["proxy_set_header", "Upgrade", "$http_upgrade"] in location
    connection = [d for d in location if d[:2] == ["proxy_set_header", "Connection"]]
    assert len(connection) == 1
    value = connection[0][2]
    if value != "upgrade":
        # A map from $http_upgrade that yields "upgrade" for a handshake.
        mapping = nginx_block(conf, "map", "$http_upgrade", value)
        assert ["default", "upgrade"] in mapping, mapping
    timeouts = {d[0]: seconds(d[1]) for d in location if d[0].endswith("_timeout")}
    # nginx's 60 s default would cut quiet presence sockets.
    assert timeouts.get("proxy_read_timeout", 60) >= 600
    assert timeouts.get("proxy_send_timeout", 60) >= 600


def test_nginx_does_not_expose_metrics_or_log_tokens() -> None:
    conf = nginx_conf()
    assert ["return", "404"] in nginx_block(conf, "location", "=", "/metrics")
    formats = [d for d in nginx_directives(conf) if d[:1] == ["log_format"]]
    assert formats
    for directive in formats:
        line = " ".join(directive)
        # $request and $args carry ?token=...; the config logs a redacted query instead.
        assert "$request " not in line + " " and "$args" not in line and "$query_string" not in line


def test_nginx_parser_reads_blocks() -> None:
    conf = "http { upstream u { server a:1; server b:1; } # c\n server { listen 80; } }"
    assert nginx_block(conf, "upstream", "u") == [["server", "a:1"], ["server", "b:1"]]
    assert nginx_block(conf, "server") == [["listen", "80"]]
    assert seconds("3600s") == 3600 and seconds("1h") == 3600 and seconds("1m30s") == 90


def test_deploy_readme_walks_through_the_compose_cluster() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "still to come" not in readme
    assert "docker compose exec" in readme and "presence-svc token alice --study study123" in readme
    assert "kubectl apply -k deploy/k8s/overlays/fleet" in readme
    assert "kubectl kustomize deploy/k8s/overlays/sidecar" in readme
    assert "serve --uds" in readme
