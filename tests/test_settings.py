"""Settings: defaults, PRESENCE_* variables, and errors that name the variable at fault."""

from __future__ import annotations

import os
import socket

import pydantic
import pytest
from redis.asyncio.sentinel import SentinelManagedConnection

from presence_svc.app import build_node, link_tuning
from presence_svc.redis.client import RedisClients, connect, sentinel_options
from presence_svc.redis.pubsub import LinkTuning
from presence_svc.redis.sentinel import (
    PrimaryConnection,
    PrimarySSLConnection,
    data_node_options,
    pubsub_options,
)
from presence_svc.settings import DEV_JWT_SECRET, SettingsError, load_settings
from tests.support.app import fake_redis

SECRET = "s3cret-for-tests-0123456789abcdef-0123"  # >= 32 bytes


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PRESENCE_* variable of the surrounding environment leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("PRESENCE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.idle_after == 30.0
    assert settings.away_after == 300.0
    assert settings.expire_after == 600.0
    assert settings.sweep_interval == 1.0
    assert settings.key_prefix == "presence"
    assert settings.redis_url is None
    assert settings.jwt_secret is None
    assert settings.socket_queue_size == 1024
    assert settings.embedded is True
    assert settings.effective_jwt_secret == DEV_JWT_SECRET


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_REDIS_URL", "redis://redis.internal:6380/2")
    monkeypatch.setenv("PRESENCE_JWT_SECRET", SECRET)
    monkeypatch.setenv("PRESENCE_IDLE_AFTER", "2.5")
    monkeypatch.setenv("PRESENCE_AWAY_AFTER", "10")
    monkeypatch.setenv("PRESENCE_EXPIRE_AFTER", "20")
    monkeypatch.setenv("PRESENCE_SWEEP_INTERVAL", "0.25")
    monkeypatch.setenv("PRESENCE_KEY_PREFIX", "pres:eu-1")
    monkeypatch.setenv("PRESENCE_SOCKET_QUEUE_SIZE", "64")
    settings = load_settings()
    assert settings.redis_url == "redis://redis.internal:6380/2"
    assert settings.jwt_secret == SECRET
    assert settings.effective_jwt_secret == SECRET
    assert settings.embedded is False
    assert (settings.idle_after, settings.away_after, settings.expire_after) == (2.5, 10.0, 20.0)
    assert settings.sweep_interval == 0.25
    assert settings.key_prefix == "pres:eu-1"
    assert settings.socket_queue_size == 64


def test_unrelated_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_SOMETHING_ELSE", "x")
    monkeypatch.setenv("IDLE_AFTER", "1")
    assert load_settings().idle_after == 30.0


def test_blank_redis_url_and_secret_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_REDIS_URL", "   ")
    monkeypatch.setenv("PRESENCE_JWT_SECRET", "")
    settings = load_settings()
    assert settings.redis_url is None
    assert settings.jwt_secret is None
    assert settings.embedded is True


def test_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_IDLE_AFTER", "5")
    settings = load_settings(idle_after=1, away_after=2, expire_after=3)
    assert (settings.idle_after, settings.away_after, settings.expire_after) == (1, 2, 3)


@pytest.mark.parametrize(("idle", "away"), [("300", "300"), ("301", "300"), ("40", "35")])
def test_idle_must_be_less_than_away(monkeypatch: pytest.MonkeyPatch, idle: str, away: str) -> None:
    monkeypatch.setenv("PRESENCE_IDLE_AFTER", idle)
    monkeypatch.setenv("PRESENCE_AWAY_AFTER", away)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "PRESENCE_IDLE_AFTER" in message
    assert "PRESENCE_AWAY_AFTER" in message
    assert "PRESENCE_EXPIRE_AFTER" not in message


@pytest.mark.parametrize(("away", "expire"), [("600", "600"), ("700", "600")])
def test_away_must_be_less_than_expire(
    monkeypatch: pytest.MonkeyPatch, away: str, expire: str
) -> None:
    monkeypatch.setenv("PRESENCE_AWAY_AFTER", away)
    monkeypatch.setenv("PRESENCE_EXPIRE_AFTER", expire)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "PRESENCE_AWAY_AFTER" in message
    assert "PRESENCE_EXPIRE_AFTER" in message


def test_redis_url_without_secret_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_REDIS_URL", "redis://localhost:6379/0")
    with pytest.raises(SettingsError, match="PRESENCE_JWT_SECRET"):
        load_settings()


def test_cluster_needs_a_seed_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_REDIS_CLUSTER", "true")
    with pytest.raises(SettingsError, match="PRESENCE_REDIS_CLUSTER needs PRESENCE_REDIS_URL"):
        load_settings()
    monkeypatch.setenv("PRESENCE_REDIS_URL", "redis://127.0.0.1:7000")
    monkeypatch.setenv("PRESENCE_JWT_SECRET", "x" * 32)
    assert load_settings().redis_cluster is True


def test_short_secret_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_JWT_SECRET", "too-short")
    with pytest.raises(SettingsError, match="PRESENCE_JWT_SECRET"):
        load_settings()


@pytest.mark.parametrize("prefix", ["pre{sence", "presence}", "{x}", "pre sence", "tab\tbed"])
def test_key_prefix_with_braces_or_whitespace_is_rejected(
    monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    monkeypatch.setenv("PRESENCE_KEY_PREFIX", prefix)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "PRESENCE_KEY_PREFIX" in str(caught.value)
    assert "braces" in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PRESENCE_IDLE_AFTER", "abc"),
        ("PRESENCE_IDLE_AFTER", "0"),
        ("PRESENCE_EXPIRE_AFTER", "-1"),
        ("PRESENCE_SWEEP_INTERVAL", "0"),
        ("PRESENCE_SWEEP_INTERVAL", "61"),
        ("PRESENCE_KEY_PREFIX", "x" * 65),
        ("PRESENCE_SOCKET_QUEUE_SIZE", "8"),
    ],
)
def test_invalid_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith("invalid settings: ")
    assert variable in str(caught.value)


def test_several_problems_are_all_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_IDLE_AFTER", "abc")
    monkeypatch.setenv("PRESENCE_KEY_PREFIX", "a{b}")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "PRESENCE_IDLE_AFTER" in str(caught.value)
    assert "PRESENCE_KEY_PREFIX" in str(caught.value)


def test_load_settings_raises_settings_error_not_validation_error() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(idle_after=5, away_after=5)
    assert not isinstance(caught.value, pydantic.ValidationError)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(pydantic.ValidationError):
        settings.idle_after = 1.0
    assert settings.idle_after == 30.0


# --- Redis connections and pub/sub links ------------------------------------------------------


def test_redis_and_pubsub_tunables_default_to_the_former_constants() -> None:
    settings = load_settings()
    assert (settings.redis_connect_attempts, settings.redis_connect_backoff_cap) == (10, 5.0)
    assert (settings.redis_connect_timeout, settings.redis_socket_timeout) == (2.0, 5.0)
    assert settings.pubsub_subscribe_timeout == 5.0
    assert (settings.pubsub_ping_after, settings.pubsub_dead_after) == (1.0, 3.0)
    assert (settings.pubsub_backoff_first, settings.pubsub_backoff_cap) == (0.1, 5.0)


def test_redis_and_pubsub_tunables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "PRESENCE_REDIS_CONNECT_ATTEMPTS": "3",
        "PRESENCE_REDIS_CONNECT_BACKOFF_CAP": "1.5",
        "PRESENCE_REDIS_CONNECT_TIMEOUT": "0.5",
        "PRESENCE_REDIS_SOCKET_TIMEOUT": "9",
        "PRESENCE_PUBSUB_SUBSCRIBE_TIMEOUT": "2",
        "PRESENCE_PUBSUB_PING_AFTER": "0.25",
        "PRESENCE_PUBSUB_DEAD_AFTER": "0.75",
        "PRESENCE_PUBSUB_BACKOFF_FIRST": "0.05",
        "PRESENCE_PUBSUB_BACKOFF_CAP": "0.05",
        "PRESENCE_PUBSUB_GATHER": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert (settings.redis_connect_attempts, settings.redis_connect_backoff_cap) == (3, 1.5)
    assert (settings.redis_connect_timeout, settings.redis_socket_timeout) == (0.5, 9.0)
    assert settings.pubsub_subscribe_timeout == 2.0
    assert (settings.pubsub_ping_after, settings.pubsub_dead_after) == (0.25, 0.75)
    assert (settings.pubsub_backoff_first, settings.pubsub_backoff_cap) == (0.05, 0.05)
    assert settings.pubsub_gather == 0.0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PRESENCE_REDIS_CONNECT_ATTEMPTS", "0"),
        ("PRESENCE_REDIS_CONNECT_ATTEMPTS", "1.5"),
        ("PRESENCE_REDIS_CONNECT_BACKOFF_CAP", "0.1"),
        ("PRESENCE_REDIS_CONNECT_BACKOFF_CAP", "301"),
        ("PRESENCE_REDIS_CONNECT_TIMEOUT", "0"),
        ("PRESENCE_REDIS_CONNECT_TIMEOUT", "61"),
        ("PRESENCE_REDIS_SOCKET_TIMEOUT", "-1"),
        ("PRESENCE_REDIS_SOCKET_TIMEOUT", "301"),
        ("PRESENCE_PUBSUB_SUBSCRIBE_TIMEOUT", "0"),
        ("PRESENCE_PUBSUB_SUBSCRIBE_TIMEOUT", "61"),
        ("PRESENCE_PUBSUB_PING_AFTER", "0.01"),
        ("PRESENCE_PUBSUB_DEAD_AFTER", "0"),
        ("PRESENCE_PUBSUB_DEAD_AFTER", "301"),
        ("PRESENCE_PUBSUB_BACKOFF_FIRST", "0"),
        ("PRESENCE_PUBSUB_BACKOFF_CAP", "abc"),
        ("PRESENCE_PUBSUB_GATHER", "-0.001"),
        ("PRESENCE_PUBSUB_GATHER", "0.2"),
    ],
)
def test_invalid_redis_or_pubsub_tunable_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert variable in str(caught.value)


@pytest.mark.parametrize(("ping", "dead"), [("1", "1"), ("2", "1.5"), ("5", "3")])
def test_pubsub_dead_after_must_exceed_ping_after(
    monkeypatch: pytest.MonkeyPatch, ping: str, dead: str
) -> None:
    monkeypatch.setenv("PRESENCE_PUBSUB_PING_AFTER", ping)
    monkeypatch.setenv("PRESENCE_PUBSUB_DEAD_AFTER", dead)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "PRESENCE_PUBSUB_DEAD_AFTER" in message
    assert "PRESENCE_PUBSUB_PING_AFTER" in message


@pytest.mark.parametrize(("first", "cap"), [("0.5", "0.4"), ("2", "1")])
def test_pubsub_backoff_cap_must_be_at_least_its_first_wait(
    monkeypatch: pytest.MonkeyPatch, first: str, cap: str
) -> None:
    monkeypatch.setenv("PRESENCE_PUBSUB_BACKOFF_FIRST", first)
    monkeypatch.setenv("PRESENCE_PUBSUB_BACKOFF_CAP", cap)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "PRESENCE_PUBSUB_BACKOFF_CAP" in message
    assert "PRESENCE_PUBSUB_BACKOFF_FIRST" in message


def test_the_node_tunes_its_pubsub_links_as_the_settings_say() -> None:
    settings = load_settings(
        pubsub_subscribe_timeout=2,
        pubsub_ping_after=0.5,
        pubsub_dead_after=1.5,
        pubsub_backoff_first=0.2,
        pubsub_backoff_cap=3,
        pubsub_gather=0.001,
    )
    assert link_tuning(settings) == LinkTuning(2.0, 0.5, 1.5, 0.2, 3.0, 0.001)
    assert link_tuning(load_settings()) == LinkTuning()


async def test_start_up_gives_up_after_the_configured_attempts() -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = load_settings(
        redis_url=f"redis://127.0.0.1:{port}/0",
        jwt_secret=SECRET,
        redis_connect_attempts=2,
        redis_connect_backoff_cap=0.2,
    )
    with pytest.raises(RuntimeError, match="cannot reach Redis after 2 attempts"):
        await connect(settings)


# --- the deadline of a store call -------------------------------------------------------------


def test_redis_call_timeout_defaults_to_five_seconds_and_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().redis_call_timeout == 5.0
    monkeypatch.setenv("PRESENCE_REDIS_CALL_TIMEOUT", "0.75")
    assert load_settings().redis_call_timeout == 0.75


@pytest.mark.parametrize("value", ["0", "-1", "301", "soon"])
def test_invalid_redis_call_timeout_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("PRESENCE_REDIS_CALL_TIMEOUT", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "PRESENCE_REDIS_CALL_TIMEOUT" in str(caught.value)


def test_the_node_gives_its_store_calls_the_call_timeout() -> None:
    settings = load_settings(redis_call_timeout=0.75)
    node = build_node(settings, RedisClients.around(fake_redis()))
    assert node.store.call_timeout == 0.75


@pytest.mark.parametrize(("socket_timeout", "call_timeout", "used"), [(5, 2, 2), (1, 2, 1)])
async def test_a_command_never_waits_past_the_call_timeout(
    real_redis_url: str, socket_timeout: float, call_timeout: float, used: float
) -> None:
    settings = load_settings(
        redis_url=real_redis_url,
        jwt_secret=SECRET,
        redis_socket_timeout=socket_timeout,
        redis_call_timeout=call_timeout,
    )
    clients = await connect(settings)
    try:
        pool = clients.commands.connection_pool
        assert pool.connection_kwargs["socket_timeout"] == used
        assert pool.timeout == call_timeout  # the wait for a free connection
    finally:
        await clients.aclose()


# --- clock skew -------------------------------------------------------------------------------


def test_max_clock_skew_defaults_to_three_seconds_and_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().max_clock_skew == 3.0
    monkeypatch.setenv("PRESENCE_MAX_CLOCK_SKEW", "0.5")
    assert load_settings().max_clock_skew == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "3601", "soon"])
def test_invalid_max_clock_skew_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("PRESENCE_MAX_CLOCK_SKEW", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "PRESENCE_MAX_CLOCK_SKEW" in str(caught.value)


# --- signals ----------------------------------------------------------------------------------


def test_signal_settings_default_and_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    default = load_settings()
    assert (default.signal_rate, default.signal_burst, default.signal_max_bytes) == (10, 20, 1024)
    monkeypatch.setenv("PRESENCE_SIGNAL_RATE", "2.5")
    monkeypatch.setenv("PRESENCE_SIGNAL_BURST", "4")
    monkeypatch.setenv("PRESENCE_SIGNAL_MAX_BYTES", "4096")
    read = load_settings()
    assert (read.signal_rate, read.signal_burst, read.signal_max_bytes) == (2.5, 4, 4096)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PRESENCE_SIGNAL_RATE", "0"),
        ("PRESENCE_SIGNAL_RATE", "-1"),
        ("PRESENCE_SIGNAL_RATE", "1001"),
        ("PRESENCE_SIGNAL_RATE", "often"),
        ("PRESENCE_SIGNAL_BURST", "0"),
        ("PRESENCE_SIGNAL_BURST", "1.5"),
        ("PRESENCE_SIGNAL_MAX_BYTES", "1"),
        ("PRESENCE_SIGNAL_MAX_BYTES", "65537"),
    ],
)
def test_invalid_signal_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert name in str(caught.value)


def test_the_signal_size_limit_must_fit_in_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_WS_MAX_MESSAGE_SIZE", "2048")
    monkeypatch.setenv("PRESENCE_SIGNAL_MAX_BYTES", "2048")
    assert load_settings().signal_max_bytes == 2048
    monkeypatch.setenv("PRESENCE_SIGNAL_MAX_BYTES", "2049")
    with pytest.raises(SettingsError, match=r"PRESENCE_SIGNAL_MAX_BYTES \(2049\) must not exceed"):
        load_settings()


# --- Redis Sentinel ---------------------------------------------------------------------------


def test_sentinel_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_REDIS_SENTINELS", "10.0.0.1:26379, sentinel-b:26380,[::1]:26381")
    monkeypatch.setenv("PRESENCE_REDIS_SENTINEL_MASTER", "presence")
    monkeypatch.setenv("PRESENCE_REDIS_SENTINEL_PASSWORD", "sentinel-pw")
    monkeypatch.setenv("PRESENCE_REDIS_SENTINEL_TLS", "true")
    monkeypatch.setenv("PRESENCE_REDIS_SENTINEL_TLS_CA_CERTS", "/etc/ca.pem")
    monkeypatch.setenv("PRESENCE_JWT_SECRET", SECRET)
    settings = load_settings()
    assert settings.redis_sentinels == [
        ("10.0.0.1", 26379),
        ("sentinel-b", 26380),
        ("::1", 26381),
    ]
    assert settings.redis_sentinel_master == "presence"
    assert settings.redis_url is None  # optional: only how to talk to the primary
    assert settings.embedded is False
    assert settings.study_grant_required is True
    options = sentinel_options(settings)
    assert options["password"] == "sentinel-pw" and "username" not in options
    assert options["ssl"] is True and options["ssl_ca_certs"] == "/etc/ca.pem"


ON_SENTINEL = {"PRESENCE_REDIS_SENTINELS": "a:26379", "PRESENCE_REDIS_SENTINEL_MASTER": "m"}


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({**ON_SENTINEL, "PRESENCE_REDIS_SENTINELS": "sentinel-a"}, "'sentinel-a' is not host"),
        ({**ON_SENTINEL, "PRESENCE_REDIS_SENTINELS": "a:26379,b:0"}, "'b:0' is not host:port"),
        ({**ON_SENTINEL, "PRESENCE_REDIS_SENTINELS": "a:http"}, "PRESENCE_REDIS_SENTINELS"),
        ({"PRESENCE_REDIS_SENTINELS": "a:26379"}, "needs PRESENCE_REDIS_SENTINEL_MASTER"),
        ({"PRESENCE_REDIS_SENTINEL_MASTER": "m"}, "only with PRESENCE_REDIS_SENTINELS"),
        ({"PRESENCE_REDIS_SENTINEL_PASSWORD": "pw"}, "only with PRESENCE_REDIS_SENTINELS"),
        (
            {**ON_SENTINEL, "PRESENCE_REDIS_CLUSTER": "true", "PRESENCE_REDIS_URL": "redis://s"},
            "PRESENCE_REDIS_SENTINELS and PRESENCE_REDIS_CLUSTER exclude each other",
        ),
        ({**ON_SENTINEL, "PRESENCE_REDIS_URL": "unix:///run/r.sock"}, "redis:// or rediss://"),
        (
            {**ON_SENTINEL, "PRESENCE_REDIS_SENTINEL_TLS_CA_CERTS": "/ca.pem"},
            "PRESENCE_REDIS_SENTINEL_TLS=true",
        ),
    ],
)
def test_invalid_sentinel_settings_say_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    monkeypatch.setenv("PRESENCE_JWT_SECRET", SECRET)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_sentinels_without_a_secret_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_REDIS_SENTINELS", "a:26379")
    monkeypatch.setenv("PRESENCE_REDIS_SENTINEL_MASTER", "presence")
    with pytest.raises(SettingsError, match="PRESENCE_JWT_SECRET is required"):
        load_settings()


def test_the_url_says_how_to_talk_to_the_primary_not_where_it_is() -> None:
    options = data_node_options("rediss://presence:pw@ignored-host:1234/3?ssl_ca_certs=/ca.pem")
    assert "host" not in options and "port" not in options
    assert (options["username"], options["password"], options["db"]) == ("presence", "pw", 3)
    assert options["ssl_ca_certs"] == "/ca.pem"
    assert options["connection_class"] is PrimarySSLConnection
    assert data_node_options(None) == {"connection_class": PrimaryConnection}
    assert data_node_options("redis://:pw@presence/0")["connection_class"] is PrimaryConnection
    # Pub/sub connections are redis-py's own: a write never reconnects them behind the links.
    assert pubsub_options(None)["connection_class"] is SentinelManagedConnection


# --- batched delivery ------------------------------------------------------------------------


def test_batching_defaults_and_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert (settings.batch_threshold, settings.batch_window) == (50, 0.05)
    monkeypatch.setenv("PRESENCE_BATCH_THRESHOLD", "2")
    monkeypatch.setenv("PRESENCE_BATCH_WINDOW", "0")  # off
    settings = load_settings()
    assert (settings.batch_threshold, settings.batch_window) == (2, 0.0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PRESENCE_BATCH_THRESHOLD", "0"),
        ("PRESENCE_BATCH_THRESHOLD", "-5"),
        ("PRESENCE_BATCH_THRESHOLD", "2.5"),
        ("PRESENCE_BATCH_WINDOW", "-0.01"),
        ("PRESENCE_BATCH_WINDOW", "1.01"),
        ("PRESENCE_BATCH_WINDOW", "soon"),
    ],
)
def test_invalid_batching_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert variable in str(caught.value)
