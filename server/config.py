"""Settings: embedded defaults, then a YAML file, then AIPROXY_* environment, then flags.

pydantic-settings does the merging and gives error messages that name the bad key; the
defaults alone run the demo. Nested keys map to environment variables with `__`, e.g.
`upstream.endpoints` <- AIPROXY_UPSTREAM__ENDPOINTS='["10.0.0.1:50052"]'.
"""

from __future__ import annotations

import contextvars
import pathlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "AIPROXY_"
SERVICE_NAME = "ai.agent.v1.AgentService"


def parse_hostport(value: str) -> tuple[str, int]:
    """Split 'HOST:PORT' ('[::1]:PORT' for IPv6); the port may be 0 (pick a free one)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _check_address(value: str) -> str:
    parse_hostport(value)
    return value


class _Section(BaseModel):
    # Unknown keys are typos: refuse them instead of silently running on defaults.
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    """The proxy's gRPC listener."""

    listen: str = "127.0.0.1:50051"
    # SIGTERM: report NOT_SERVING, wait drain_delay_s for balancers to notice, stop
    # accepting, let calls finish for grace_period_s, then cancel what is left.
    grace_period_s: float = Field(default=30.0, ge=0)
    drain_delay_s: float = Field(default=0.0, ge=0)
    # grpc.aio cancels bursts of new calls past max_pending_requests (default 1000):
    # admission is the limiters' job, so this is set far above any real burst.
    max_pending_requests: int = Field(default=20_000, ge=1)
    max_concurrent_streams_per_connection: int = Field(default=10_000, ge=1)
    max_receive_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_send_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Processes serving the one port (SO_REUSEPORT; the kernel spreads connections), so a
    # machine's cores are all used: `aiproxy serve --workers N`. 1: this process alone.
    workers: int = Field(default=1, ge=1, le=64)

    _v_listen = field_validator("listen")(classmethod(lambda cls, v: _check_address(v)))


class UpstreamSettings(_Section):
    """The agent replicas the proxy forwards to."""

    endpoints: list[str] = Field(default_factory=lambda: ["127.0.0.1:50052"], min_length=1)
    # Start-up waits this long for a usable endpoint before it reports ready.
    startup_wait_s: float = Field(default=5.0, ge=0)
    # Names (not IP literals) are re-resolved this often; the pool follows the answer.
    dns_refresh_s: float = Field(default=5.0, gt=0)
    # Connections per endpoint, so HTTP/2 stream limits never queue thousands of
    # concurrent streams behind one connection; calls take them in turn.
    channels_per_endpoint: int = Field(default=2, ge=1, le=64)
    # grpc.health.v1 service name watched on each endpoint ("" = the server as a whole).
    health_service: str = SERVICE_NAME
    # Used only when an endpoint does not implement Health/Watch.
    health_check_interval_s: float = Field(default=2.0, gt=0)
    # Keepalive pings notice a silently dead peer in keepalive_time + keepalive_timeout.
    keepalive_time_s: float = Field(default=10.0, gt=0)
    keepalive_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_backoff_max_s: float = Field(default=2.0, gt=0)
    # Metadata never forwarded upstream (credentials the agent has no business seeing).
    drop_metadata: list[str] = Field(default_factory=lambda: ["authorization", "cookie", "x-api-key"])

    @field_validator("endpoints")
    @classmethod
    def _v_endpoints(cls, value: list[str]) -> list[str]:
        return [_check_address(v) for v in value]


class StreamSettings(_Section):
    """How server streams are pumped from the upstream to the caller."""

    # Chunks read ahead of a slow caller; past it the upstream read waits (backpressure).
    buffer_chunks: int = Field(default=100, ge=1)
    # A heartbeat chunk after this long without one, so idle connections stay open.
    heartbeat_interval_s: float = Field(default=15.0, gt=0)
    # An upstream that sends nothing for this long ends the stream with DEADLINE_EXCEEDED.
    idle_timeout_s: float = Field(default=60.0, gt=0)
    # Merge chunks that queued up behind a slow caller into one (never delays a chunk).
    coalesce: bool = True
    # Opt-in: at most one push per this many ms after the first chunk (the source
    # documents' 50 ms); deltas arriving meanwhile go out merged. Fewer, larger messages
    # are what a Python proxy's CPU is spent on (bench/REPORT.md). 0 = off.
    coalesce_window_ms: float = Field(default=0.0, ge=0, le=1000)


class DeadlineSettings(_Section):
    """Per-kind default and maximum deadlines, in seconds (the source documents' values)."""

    unary_default_s: float = Field(default=30.0, gt=0)
    unary_max_s: float = Field(default=30.0, gt=0)
    stream_default_s: float = Field(default=120.0, gt=0)
    stream_max_s: float = Field(default=120.0, gt=0)
    agent_default_s: float = Field(default=300.0, gt=0)
    agent_max_s: float = Field(default=300.0, gt=0)


class BreakerSettings(_Section):
    """One circuit breaker per upstream endpoint (client side)."""

    enabled: bool = True
    failure_threshold: int = Field(default=5, ge=1)  # consecutive failures that open it
    failure_ratio: float = Field(default=0.5, gt=0, le=1)  # ... or this share of calls
    window_s: float = Field(default=10.0, gt=0)  # ... over this rolling window
    min_volume: int = Field(default=20, ge=1)  # ... once it holds this many calls
    reset_timeout_s: float = Field(default=30.0, gt=0)  # open -> half-open after this
    half_open_max_probes: int = Field(default=1, ge=1)  # calls admitted while half-open
    success_threshold: int = Field(default=1, ge=1)  # probe successes that close it


class RetrySettings(_Section):
    """Retries of upstream calls: unary calls, and streams before their first chunk."""

    max_attempts: int = Field(default=3, ge=1)  # the first call included
    initial_backoff_s: float = Field(default=0.05, ge=0)
    max_backoff_s: float = Field(default=1.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    # gRPC code names worth another attempt on another endpoint.
    retryable_codes: list[str] = Field(default_factory=lambda: ["UNAVAILABLE"])

    @field_validator("retryable_codes")
    @classmethod
    def _v_codes(cls, value: list[str]) -> list[str]:
        import grpc

        names = {code.name for code in grpc.StatusCode}
        bad = [v for v in value if v.upper() not in names or v.upper() == "OK"]
        if bad:
            raise ValueError(f"not gRPC error code names: {bad}")
        return [v.upper() for v in value]


class LogSettings(_Section):
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _v_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value


# The YAML file for the load in progress (sources are built by pydantic-settings, which
# gives them no arguments of ours).
_yaml_file: contextvars.ContextVar[pathlib.Path | None] = contextvars.ContextVar("_yaml_file", default=None)


class Settings(BaseSettings):
    """Everything the proxy can be told. See config.example.yaml and .env.example."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    deadlines: DeadlineSettings = Field(default_factory=DeadlineSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_file.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


class ConfigError(Exception):
    """A configuration that cannot run, with a message naming every bad key."""


def load_settings(config_file: str | pathlib.Path | None = None, **overrides: Any) -> Settings:
    """Defaults < YAML file < AIPROXY_* environment < overrides (command-line flags).

    `overrides` are nested dicts, e.g. upstream={"endpoints": [...]}; they are merged
    into, not substituted for, what the file and environment say.
    """
    path = pathlib.Path(config_file) if config_file else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    token = _yaml_file.set(path)
    try:
        base = Settings()
        if not overrides:
            return base
        merged = _deep_merge(base.model_dump(), overrides)
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except (OSError, ValueError) as exc:  # unreadable file, YAML syntax error
        raise ConfigError(f"cannot read configuration from {path}: {exc}") from None
    finally:
        _yaml_file.reset(token)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(exc: ValidationError, path: pathlib.Path | None) -> str:
    where = f" (file {path}, or environment {ENV_PREFIX}*)" if path else f" (environment {ENV_PREFIX}*)"
    lines = [f"invalid configuration{where}:"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        env = ENV_PREFIX + "__".join(str(p).upper() for p in err["loc"] if not isinstance(p, int))
        lines.append(f"  {key}: {err['msg']} (input: {err.get('input')!r}; env: {env})")
    return "\n".join(lines)
