"""Node settings: every `PRESENCE_*` variable is read and validated here, once, at start-up."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

# Only the embedded single-node mode may run with this; `presence-svc token` signs with it
# by default.
DEV_JWT_SECRET = "presence-svc-dev-secret-not-for-production"


class SettingsError(Exception):
    """A `PRESENCE_*` variable is missing or invalid; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRESENCE_", extra="ignore", frozen=True)

    redis_url: str | None = None
    # PRESENCE_REDIS_URL names a seed node of a Redis Cluster (7+): commands go to the shards
    # that own their keys and fan-out uses sharded pub/sub.
    redis_cluster: bool = False
    jwt_secret: str | None = None
    # The one algorithm tokens may use (pinned: "none" and HS/RS confusion are refused).
    jwt_algorithm: Literal["HS256", "HS384", "HS512", "RS256", "ES256"] = "HS256"
    # For RS256/ES256: the PEM public key (the PEM text itself, or a file path), or a local
    # JWKS file whose keys are picked by the token's `kid`.
    jwt_public_key: str | None = None
    jwt_jwks_file: str | None = None
    # When set, tokens must carry this `aud` / `iss`.
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
    jwt_leeway: float = Field(5.0, ge=0, le=300)
    idle_after: float = Field(30.0, gt=0)
    away_after: float = Field(300.0, gt=0)
    expire_after: float = Field(600.0, gt=0)
    sweep_interval: float = Field(1.0, gt=0, le=60)
    key_prefix: str = Field("presence", min_length=1, max_length=64)
    # After a user's last WebSocket closes, how long before user_left (a reconnect cancels it).
    leave_grace: float = Field(10.0, ge=0, le=3600)
    # A node silent this long is dead: its sockets' sessions then leave after leave_grace.
    lease_ttl: float = Field(5.0, ge=0.5, le=300)
    # Seconds this node's clock may be off Redis's before the node reports it (a warning, the
    # readiness check "clock": "skewed", not ready). Presence runs on Redis's time whatever it is.
    max_clock_skew: float = Field(3.0, gt=0, le=3600)
    # On SIGTERM: how long the node may take to close its sockets and release its leases.
    drain_timeout: float = Field(10.0, gt=0, le=600)
    # Whether a token must grant a study (its `studies` claim) to read or join it. Unset: yes
    # with a real Redis, no in the embedded dev mode.
    require_study_grant: bool | None = None
    # Messages one socket may send per second (token bucket); beyond it the socket is closed
    # with 1008.
    ws_message_rate: float = Field(50.0, gt=0)
    ws_message_burst: int = Field(200, ge=1)
    # WebSockets one user may hold open on one node; more are refused with 4429.
    max_sockets_per_user: int = Field(32, ge=1)
    # REST heartbeats one user may send per second to one node; beyond it 429 + Retry-After.
    rest_heartbeat_rate: float = Field(10.0, gt=0)
    rest_heartbeat_burst: int = Field(20, ge=1)
    # Largest WebSocket message a client may send; a bigger one closes the socket with 1009.
    ws_max_message_size: int = Field(65_536, ge=1024, le=16 * 1024 * 1024)
    # Signals (typing, pointer) one socket may send per second (token bucket); beyond it the
    # newest of each name waits for the rate (latest wins). A signal's data may be at most
    # signal_max_bytes of compact JSON (signal_too_large beyond).
    signal_rate: float = Field(10.0, gt=0, le=1000)
    signal_burst: int = Field(20, ge=1, le=10_000)
    signal_max_bytes: int = Field(1024, ge=2, le=65_536)
    # Browser origins allowed to open WebSockets (comma-separated); empty allows any. Clients
    # that send no Origin header (other backends) are not affected.
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Connections to Redis for commands (pub/sub has its own); callers beyond it wait.
    redis_max_connections: int = Field(50, ge=2, le=10_000)
    # Start-up: attempts to reach Redis before giving up, waiting 0.2 s after the first and
    # doubling up to the cap (seconds) between the next.
    redis_connect_attempts: int = Field(10, ge=1, le=1000)
    redis_connect_backoff_cap: float = Field(5.0, ge=0.2, le=300)
    # Seconds to open a Redis connection, and for a command's reply (pub/sub has no read
    # timeout: its links are watched with pings instead).
    redis_connect_timeout: float = Field(2.0, gt=0, le=60)
    redis_socket_timeout: float = Field(5.0, gt=0, le=300)
    # Seconds one store call may take in all (its commands, retries and reconnects, and the
    # wait for a connection) before it fails as unavailable: 503 with Retry-After over REST,
    # `unavailable` over a WebSocket. Pipelined calls are due by it; a plain command's socket
    # timeout is the smaller of it and PRESENCE_REDIS_SOCKET_TIMEOUT.
    redis_call_timeout: float = Field(5.0, gt=0, le=300)
    # Pub/sub links (seconds): how long Redis may take to confirm a subscription; silence
    # before a link is pinged, and before it is taken for dead and replaced; the reconnect
    # backoff, random up to a bound that starts at `first` and doubles up to `cap`.
    pubsub_subscribe_timeout: float = Field(5.0, gt=0, le=60)
    pubsub_ping_after: float = Field(1.0, ge=0.05, le=60)
    pubsub_dead_after: float = Field(3.0, gt=0, le=300)
    pubsub_backoff_first: float = Field(0.1, gt=0, le=60)
    pubsub_backoff_cap: float = Field(5.0, gt=0, le=300)
    # A busy link lets its socket fill this long between reads (seconds; 0: read whenever
    # anything arrives): CPU per received event against at most this much more latency.
    pubsub_gather: float = Field(0.005, ge=0, le=0.1)
    # Events a socket may have queued before it counts as a slow consumer and is closed.
    socket_queue_size: int = Field(1024, ge=16, le=1_000_000)
    # A study with more local sockets than the threshold gets its messages in one
    # presence.batch frame per window (seconds) instead of one frame each; 0 turns it off.
    batch_threshold: int = Field(50, ge=1)
    batch_window: float = Field(0.05, ge=0, le=1.0)
    # `text` for a terminal; `json` (one object per line, with request/connection ids) for log
    # shippers, which the container image sets.
    log_format: Literal["text", "json"] = "text"
    # The `--log-level` option of `serve` overrides it.
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # Bytes the node may hold unsent for one WebSocket, checked whenever it reads from it; past
    # it the socket is closed with 1013 (a client sending pings and never reading the pongs).
    # Must exceed the largest message the node sends: a snapshot (snapshot_max_users sessions).
    ws_max_outgoing_buffer: int = Field(4 * 1024 * 1024, ge=256 * 1024, le=1024 * 1024 * 1024)
    # Sessions a WebSocket's presence.snapshot lists at most: those with the most recent
    # heartbeats (its total and counts still cover everyone; `complete` says whether it is all).
    snapshot_max_users: int = Field(100, ge=1, le=10_000)
    # Redis Sentinel (docs/topologies.md): the sentinels (`host:port,...`) and the name of the
    # primary they watch; the node connects to whichever server they name. PRESENCE_REDIS_URL
    # is then optional and only says how to talk to that server (credentials, db, rediss://,
    # query options), not where it is. The sentinels' own credentials and TLS are separate.
    redis_sentinels: Annotated[list[tuple[str, int]], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str | None = None
    redis_sentinel_username: str | None = None
    redis_sentinel_password: str | None = None
    redis_sentinel_tls: bool = False
    redis_sentinel_tls_ca_certs: str | None = None

    # GET /dashboard serves the operators' live page (its data still needs an admin token).
    dashboard: bool = False
    # Seconds between two writes of this node's own stats (sockets, watched studies, leases,
    # event rate) to Redis, for GET /stats and the dashboard.
    stats_interval: float = Field(1.0, ge=0.1, le=60)
    # GET /demo serves a small chess-study page built on the browser client (make demo).
    demo: bool = False

    @field_validator(
        "redis_url",
        "jwt_secret",
        "jwt_public_key",
        "jwt_jwks_file",
        "jwt_audience",
        "jwt_issuer",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower_case_or_default(cls, value: object, info: ValidationInfo) -> object:
        # Blank counts as unset, as for the optional settings above (tests blank PRESENCE_*).
        if isinstance(value, str):
            value = value.strip().lower()
            if not value:
                return cls.model_fields[info.field_name or ""].default
        return value

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _secret_is_long_enough(cls, value: str | None) -> str | None:
        # RFC 7518 3.2: an HS256 key shorter than the hash output weakens the signature.
        if value is not None and len(value.encode()) < 32:
            raise ValueError("must be at least 32 bytes long")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix_has_no_hash_tag(cls, value: str) -> str:
        # Braces would change which part of every key Redis Cluster hashes.
        if "{" in value or "}" in value or any(c.isspace() for c in value):
            raise ValueError("must not contain braces or whitespace")
        return value

    @model_validator(mode="after")
    def _thresholds_rise(self) -> Settings:
        if self.redis_cluster and self.redis_url is None:
            raise ValueError("PRESENCE_REDIS_CLUSTER needs PRESENCE_REDIS_URL (a seed node)")
        if not self.idle_after < self.away_after:
            raise ValueError(
                f"PRESENCE_IDLE_AFTER ({self.idle_after}) must be less than "
                f"PRESENCE_AWAY_AFTER ({self.away_after})"
            )
        if not self.away_after < self.expire_after:
            raise ValueError(
                f"PRESENCE_AWAY_AFTER ({self.away_after}) must be less than "
                f"PRESENCE_EXPIRE_AFTER ({self.expire_after})"
            )
        if self.jwt_algorithm.startswith("HS"):
            if self.jwt_public_key is not None or self.jwt_jwks_file is not None:
                raise ValueError(
                    f"PRESENCE_JWT_ALGORITHM={self.jwt_algorithm} verifies with "
                    "PRESENCE_JWT_SECRET; unset PRESENCE_JWT_PUBLIC_KEY and PRESENCE_JWT_JWKS_FILE"
                )
            if not self.embedded and self.jwt_secret is None:
                raise ValueError(
                    "PRESENCE_JWT_SECRET is required when PRESENCE_REDIS_URL or "
                    "PRESENCE_REDIS_SENTINELS is set; "
                    "only the embedded dev mode has a built-in secret"
                )
        elif (self.jwt_public_key is None) == (self.jwt_jwks_file is None):
            raise ValueError(
                f"PRESENCE_JWT_ALGORITHM={self.jwt_algorithm} needs exactly one of "
                "PRESENCE_JWT_PUBLIC_KEY and PRESENCE_JWT_JWKS_FILE"
            )
        return self

    @model_validator(mode="after")
    def _signals_fit_in_a_message(self) -> Settings:
        # A larger limit would never be reached: the message carrying it closes with 1009.
        if self.signal_max_bytes > self.ws_max_message_size:
            raise ValueError(
                f"PRESENCE_SIGNAL_MAX_BYTES ({self.signal_max_bytes}) must not exceed "
                f"PRESENCE_WS_MAX_MESSAGE_SIZE ({self.ws_max_message_size})"
            )
        return self

    @model_validator(mode="after")
    def _pubsub_timings_fit(self) -> Settings:
        if not self.pubsub_ping_after < self.pubsub_dead_after:
            raise ValueError(
                f"PRESENCE_PUBSUB_DEAD_AFTER ({self.pubsub_dead_after}) must be more than "
                f"PRESENCE_PUBSUB_PING_AFTER ({self.pubsub_ping_after})"
            )
        if not self.pubsub_backoff_first <= self.pubsub_backoff_cap:
            raise ValueError(
                f"PRESENCE_PUBSUB_BACKOFF_CAP ({self.pubsub_backoff_cap}) must be at least "
                f"PRESENCE_PUBSUB_BACKOFF_FIRST ({self.pubsub_backoff_first})"
            )
        return self

    @field_validator(
        "redis_sentinel_master",
        "redis_sentinel_username",
        "redis_sentinel_password",
        "redis_sentinel_tls_ca_certs",
        mode="before",
    )
    @classmethod
    def _blank_sentinel_setting_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: object) -> object:
        if isinstance(value, str):
            return [_host_port(part.strip()) for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _sentinel_settings_fit(self) -> Settings:
        if not self.redis_sentinels:
            stray = [
                f"PRESENCE_{name.upper()}"
                for name in _SENTINEL_ONLY
                if getattr(self, name) not in (None, False)
            ]
            if stray:
                raise ValueError(f"{', '.join(stray)}: only with PRESENCE_REDIS_SENTINELS")
            return self
        if self.redis_sentinel_master is None:
            raise ValueError("PRESENCE_REDIS_SENTINELS needs PRESENCE_REDIS_SENTINEL_MASTER")
        if self.redis_cluster:
            raise ValueError(
                "PRESENCE_REDIS_SENTINELS and PRESENCE_REDIS_CLUSTER exclude each other"
            )
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ValueError(
                "with PRESENCE_REDIS_SENTINELS, PRESENCE_REDIS_URL must be a redis:// or "
                "rediss:// URL (its host and port are not used)"
            )
        if self.redis_sentinel_tls_ca_certs is not None and not self.redis_sentinel_tls:
            raise ValueError(
                "PRESENCE_REDIS_SENTINEL_TLS_CA_CERTS needs PRESENCE_REDIS_SENTINEL_TLS=true"
            )
        return self

    @property
    def embedded(self) -> bool:
        """True when no Redis URL is configured: one node on an in-process Redis."""
        return self.redis_url is None and not self.redis_sentinels

    @property
    def study_grant_required(self) -> bool:
        if self.require_study_grant is not None:
            return self.require_study_grant
        return not self.embedded

    @property
    def effective_jwt_secret(self) -> str:
        return self.jwt_secret if self.jwt_secret is not None else DEV_JWT_SECRET


_SENTINEL_ONLY = (
    "redis_sentinel_master",
    "redis_sentinel_username",
    "redis_sentinel_password",
    "redis_sentinel_tls",
    "redis_sentinel_tls_ca_certs",
)


def _host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[v6 address]:port` as a pair; ValueError naming the bad part."""
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port)


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus explicit overrides) or raise SettingsError naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(part) for part in err["loc"])
            name = f"PRESENCE_{loc.upper()}" if loc else ""
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}" if name else message)
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
