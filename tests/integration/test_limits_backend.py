"""server/stores/limits_backend.py: the store the settings name, against a real redis-server;
its state in the metrics; a Redis that is away at start-up or goes away later."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from aiproxy.core.limitstore import LimitsUnavailable, MemoryLimitStore, TokenLimits
from aiproxy.core.metrics import ProxyMetrics
from aiproxy.core.ratelimit import LimitSpec
from aiproxy.core.settings import Settings, load_settings
from aiproxy.server.stores.limits_backend import (
    backend_state_recorder,
    build_limit_store,
    close_limit_store,
    open_limit_store,
)
from aiproxy.server.stores.redis_limits import RedisLimitStore
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

SPEC = LimitSpec(5, 5)


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def redis_settings(url: str, **limits: object) -> Settings:
    return load_settings(
        limits={"backend": "redis", **limits},
        redis={"url": url, "key_prefix": "test:", "timeout_ms": 200, "probe_interval_s": 0.1},
    )


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_memory_is_the_default_and_reports_up() -> None:
    registry = CollectorRegistry()
    store = await open_limit_store(
        load_settings(limits={"max_tracked_callers": 7}), ProxyMetrics(registry)
    )
    try:
        assert isinstance(store, MemoryLimitStore) and store.local
        assert [(await store.take("sub:a", SPEC)).allowed for _ in range(6)] == [True] * 5 + [False]
        assert sample(registry, "ai_proxy_limits_backend_up", backend="memory") == 1
    finally:
        await close_limit_store(store)


async def test_redis_backend_shares_state_under_the_prefix(redis_server: RedisServer) -> None:  # noqa: F811
    settings = redis_settings(redis_server.url)
    registry = CollectorRegistry()
    # Two stores = two processes' worth of state: the bucket is one.
    a = await open_limit_store(settings, ProxyMetrics(registry))
    b = await open_limit_store(settings)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert isinstance(a, RedisLimitStore) and not a.local
        allowed = 0
        for store in (a, b, a, b, a, b, a, b):
            allowed += (await store.take("client:tenant-1", SPEC)).allowed
        assert allowed == 5
        keys = [k.decode() for k in await raw.keys("*")]
        assert keys and all(k.startswith("test:") for k in keys)
        assert sample(registry, "ai_proxy_limits_backend_up", backend="redis") == 1
        assert sample(
            registry, "ai_proxy_limits_backend_transitions_total", backend="redis", state="degraded"
        ) in (None, 0)
        # Tokens, per caller and per tenant budget, through the same settings.
        admission = await a.admit(
            "sub:svc",
            SPEC,
            tokens=100,
            token_limits=TokenLimits(1000, 5000),
            budget_key="tenant:acme",
        )
        assert admission.allowed and admission.reservation is not None
        await b.finish(None, admission.reservation, 40)  # settled by another process, once
        assert int(await raw.get(f"test:day:tenant:acme:{admission.reservation.day}")) == 40
    finally:
        await close_limit_store(a)
        await close_limit_store(b)
        await raw.aclose()


async def test_the_password_and_policy_reach_the_store(redis_server: RedisServer) -> None:  # noqa: F811
    raw = aioredis.Redis.from_url(redis_server.url)
    await raw.config_set("requirepass", "pw-for-the-test")
    stores = []
    try:
        for password, healthy in (("pw-for-the-test", True), ("wrong-password", False)):
            settings = load_settings(
                limits={"backend": "redis", "failure_policy": "fail_closed"},
                redis={"url": redis_server.url, "password": password, "timeout_ms": 300},
            )
            store = build_limit_store(settings)
            stores.append(store)
            assert isinstance(store, RedisLimitStore) and store.policy == "fail_closed"
            await store.start()
            assert store.healthy is healthy
            if healthy:
                assert (await store.take("sub:a", SPEC)).allowed
            else:  # fail_closed: refused with UNAVAILABLE, not admitted
                with pytest.raises(LimitsUnavailable):
                    await store.take("sub:a", SPEC)
    finally:
        for store in stores:
            await store.aclose()
        await raw.execute_command("AUTH", "pw-for-the-test")
        await raw.config_set("requirepass", "")
        await raw.aclose()


async def test_redis_away_at_start_then_back_is_counted_and_recovers(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    redis_server.stop()
    registry = CollectorRegistry()
    settings = redis_settings(redis_server.url, expected_processes=5)
    store = await open_limit_store(settings, ProxyMetrics(registry))
    try:
        assert isinstance(store, RedisLimitStore)
        assert not store.healthy  # the proxy starts anyway, under its policy
        assert sample(registry, "ai_proxy_limits_backend_up", backend="redis") == 0
        # fail_open at limit/N: 5 per 5 processes is 1 here.
        results = [(await store.take("sub:a", SPEC)).allowed for _ in range(3)]
        assert results == [True, False, False]
        redis_server.start()
        await wait_for(lambda: store.healthy)
        assert sample(registry, "ai_proxy_limits_backend_up", backend="redis") == 1
        assert (
            sample(
                registry,
                "ai_proxy_limits_backend_transitions_total",
                backend="redis",
                state="degraded",
            )
            == 1
        )
        assert (
            sample(
                registry,
                "ai_proxy_limits_backend_transitions_total",
                backend="redis",
                state="healthy",
            )
            == 1
        )
        assert (await store.take("sub:a", SPEC)).allowed  # Redis's bucket is full again
    finally:
        await close_limit_store(store)


async def test_redis_lost_mid_run_is_one_transition_each_way(redis_server: RedisServer) -> None:  # noqa: F811
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    store = await open_limit_store(redis_settings(redis_server.url), metrics)
    try:
        assert (await store.take("sub:a", SPEC)).allowed
        redis_server.stop()
        started = time.monotonic()
        for _ in range(20):  # many calls while it is away: one transition, none waits long
            await store.take("sub:a", SPEC)
        assert time.monotonic() - started < 5
        assert sample(registry, "ai_proxy_limits_backend_up", backend="redis") == 0
        redis_server.start()
        await wait_for(lambda: sample(registry, "ai_proxy_limits_backend_up", backend="redis") == 1)
        for state in ("degraded", "healthy"):
            assert (
                sample(
                    registry,
                    "ai_proxy_limits_backend_transitions_total",
                    backend="redis",
                    state=state,
                )
                == 1
            )
    finally:
        await close_limit_store(store)
    await close_limit_store(store)  # idempotent
    await close_limit_store(None)


def test_the_recorder_keeps_labels_bounded() -> None:
    registry = CollectorRegistry()
    record = backend_state_recorder(ProxyMetrics(registry), "redis")
    for healthy in (False, True, False, True):
        record(healthy)
    names = {
        (s.name, tuple(sorted(s.labels.items())))
        for family in registry.collect()
        if family.name.startswith("ai_proxy_limits_backend")
        for s in family.samples
        if not s.name.endswith("_created")
    }
    assert names == {
        ("ai_proxy_limits_backend_up", (("backend", "redis"),)),
        (
            "ai_proxy_limits_backend_transitions_total",
            (("backend", "redis"), ("state", "degraded")),
        ),
        ("ai_proxy_limits_backend_transitions_total", (("backend", "redis"), ("state", "healthy"))),
    }
    assert (
        sample(
            registry, "ai_proxy_limits_backend_transitions_total", backend="redis", state="healthy"
        )
        == 2
    )
