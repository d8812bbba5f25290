"""The limits backend, Redis, token quota and tenant settings: names, defaults, validation."""

from __future__ import annotations

import pytest

from aiproxy.core.settings import ConfigError, load_settings

REDIS = {"url": "redis://127.0.0.1:6379/0"}


def test_defaults_are_the_embedded_backend_with_tokens_off() -> None:
    limits = load_settings().limits
    assert limits.backend == "memory"
    assert limits.failure_policy == "fail_open"
    assert limits.expected_processes == 1
    assert limits.tokens_per_minute is None and limits.tokens_per_day is None
    assert limits.tenant_claim is None


def test_the_environment_selects_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPROXY_LIMITS__BACKEND", "redis")
    monkeypatch.setenv("AIPROXY_REDIS__URL", "redis://host:6379/0")
    monkeypatch.setenv("AIPROXY_LIMITS__FAILURE_POLICY", "fail_closed")
    monkeypatch.setenv("AIPROXY_REDIS__TIMEOUT_MS", "15")
    settings = load_settings()
    assert settings.limits.backend == "redis"
    assert settings.redis.url == "redis://host:6379/0"
    assert settings.limits.failure_policy == "fail_closed"
    assert settings.redis.timeout_ms == 15


def test_redis_backend_needs_a_url() -> None:
    with pytest.raises(ConfigError, match=r"redis\.url is not set"):
        load_settings(limits={"backend": "redis"})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://host:6379", "redis://, rediss:// or unix://"),
        ("redis://:hunter2@host:6379/0", "must not carry a password"),
        ("redis://", "names no host"),
    ],
)
def test_bad_redis_urls_are_refused_without_echoing_a_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(redis={"url": url})
    assert "hunter2" not in str(caught.value)


def test_the_redis_password_is_never_echoed() -> None:
    settings = load_settings(redis={**REDIS, "password": "hunter2-secret"})
    assert "hunter2" not in repr(settings.redis)
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "hunter2-secret"
    with pytest.raises(ConfigError) as caught:
        load_settings(redis={**REDIS, "password": 12345, "timeout_ms": 0})
    assert "12345" not in str(caught.value)


def test_unix_and_tls_urls_are_accepted() -> None:
    assert load_settings(redis={"url": "unix:///run/redis.sock"}).redis.url
    assert load_settings(redis={"url": "rediss://redis.internal:6380/1"}).redis.url


@pytest.mark.parametrize(
    ("limits", "redis", "message"),
    [
        ({"backend": "etcd"}, {}, "limits.backend"),
        ({"failure_policy": "fail_maybe"}, {}, "limits.failure_policy"),
        ({"expected_processes": 0}, {}, "limits.expected_processes"),
        ({"tokens_per_minute": -1}, {}, "limits.tokens_per_minute"),
        ({}, {"timeout_ms": 0}, "redis.timeout_ms"),
        ({}, {"lease_ttl_s": 0.1}, "redis.lease_ttl_s"),
        ({}, {"key_prefix": ""}, "redis.key_prefix"),
        ({}, {"surprise": 1}, "redis.surprise"),
    ],
)
def test_bad_values_name_their_key(limits: dict, redis: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(limits=limits, redis=redis)


def test_zero_tokens_means_off() -> None:
    limits = load_settings(limits={"tokens_per_minute": 0, "tokens_per_day": 0}).limits
    assert (limits.tokens_per_minute, limits.tokens_per_day) == (None, None)


def test_overrides_inherit_what_they_leave_out_and_tokens_resolve_per_override() -> None:
    limits = load_settings(
        limits={
            "rate_per_s": 7,
            "burst": 9,
            "tokens_per_minute": 1000,
            "tokens_per_day": 50_000,
            "tenant_claim": "tenant",
            "overrides": {
                "tenant:acme": {"tokens_per_day": 2_000_000},
                "sub:batch": {"rate_per_s": 50, "burst": 100, "tokens_per_minute": 0},
            },
        }
    ).limits
    acme = limits.overrides["tenant:acme"]
    assert (acme.rate_per_s, acme.burst) == (7, 9)
    assert limits.token_quotas(acme) == (1000, 2_000_000)
    batch = limits.overrides["sub:batch"]
    assert limits.token_quotas(batch) == (None, 50_000)  # 0 in an override: off for that key
    assert limits.token_quotas(None) == (1000, 50_000)
    # The caller's own key wins over its tenant's; None entries (no tenant) are skipped.
    assert limits.override_for("sub:batch", None, "tenant:acme") is batch
    assert limits.override_for("sub:other", None, "tenant:acme") is acme
    assert limits.override_for("sub:other", None, None) is None


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"overrides": {"batch-service": {"burst": 5}}}, "must be '<kind>:<value>'"),
        ({"overrides": {"user:alice": {"burst": 5}}}, "must be '<kind>:<value>'"),
        ({"overrides": {"sub:": {"burst": 5}}}, "must be '<kind>:<value>'"),
        ({"overrides": {"tenant:acme": {"burst": 5}}}, "needs limits.tenant_claim"),
        ({"tenant_claim": "sub"}, "registered JWT claim"),
        ({"overrides": {"sub:a": {"tokens_per_day": -5}}}, "tokens_per_day"),
    ],
)
def test_override_keys_and_tenants_are_checked(limits: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(limits=limits)


def test_api_key_overrides_must_name_a_configured_key() -> None:
    key = {"name": "ci", "key_hash": "0" * 32}
    with pytest.raises(ConfigError, match=r"apikey:nobody"):
        load_settings(limits={"overrides": {"apikey:nobody": {"burst": 5}}})
    settings = load_settings(
        auth={"api_keys": [key]}, limits={"overrides": {"apikey:ci": {"rate_per_s": 5}}}
    )
    assert settings.limits.overrides["apikey:ci"].rate_per_s == 5
