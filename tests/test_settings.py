"""Settings: defaults, PRESENCE_* variables, and errors that name the variable at fault."""

from __future__ import annotations

import os

import pydantic
import pytest

from presence_svc.settings import DEV_JWT_SECRET, SettingsError, load_settings

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
