"""The limits backend of one proxy process: which LimitStore it uses, its lifecycle, and
its state in the metrics.

`limits.backend: memory` is core/limitstore.py's MemoryLimitStore (state in this process:
with N workers or replicas every caller gets N times its limits). `redis` is
server/stores/redis_limits.py's RedisLimitStore on `redis.url`, shared by every worker and
replica; its failure policy, bounded wait and lease TTL come from the settings.

The assembly does, once per process:

    store = await open_limit_store(settings, telemetry.proxy)   # at start-up
    ...                                                         # the limits stage uses it
    await store.aclose()                                        # at shutdown, after the server

`open_limit_store` builds the store, wires its state transitions to
`ai_proxy_limits_backend_up` / `ai_proxy_limits_backend_transitions_total`, and connects it
(if Redis does not answer, the store starts degraded and serves under its policy, then
recovers by itself: a proxy never refuses to start because Redis is away).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiproxy.core.limitstore import LimitStore, MemoryLimitStore
from aiproxy.core.logs import log_event
from aiproxy.core.metrics import ProxyMetrics
from aiproxy.core.settings import Settings
from aiproxy.server.stores.redis_limits import RedisLimitStore, client_from_settings

log = logging.getLogger("aiproxy.limits")

StateCallback = Callable[[bool], None]


def build_limit_store(settings: Settings, *, on_state: StateCallback | None = None) -> LimitStore:
    """The store `settings.limits.backend` names, not yet started. `on_state(healthy)` is
    called on each change of a shared store's state (never for memory: it cannot fail)."""
    limits = settings.limits
    if limits.backend == "memory":
        return MemoryLimitStore(max_keys=limits.max_tracked_callers)
    r = settings.redis
    client = client_from_settings(r)
    return RedisLimitStore(
        client,
        prefix=r.key_prefix,
        timeout_s=r.timeout_ms / 1000,
        policy=limits.failure_policy,
        processes=limits.expected_processes,
        lease_ttl_s=r.lease_ttl_s,
        reservation_ttl_s=r.reservation_ttl_s,
        probe_interval_s=r.probe_interval_s,
        # A recovery probe may wait longer than a call: it holds no caller up.
        probe_timeout_s=max(0.5, r.timeout_ms / 1000),
        on_state=on_state,
        fallback=MemoryLimitStore(max_keys=limits.max_tracked_callers, name="fallback"),
    )


def backend_state_recorder(metrics: ProxyMetrics, backend: str) -> StateCallback:
    """An `on_state` that keeps the backend's gauge and transition counter; the gauge
    starts at 1 (a store starts healthy until a call or the start-up PING fails)."""
    up = metrics.limits_backend_up.labels(backend)
    to_healthy = metrics.limits_backend_transitions.labels(backend, "healthy")
    to_degraded = metrics.limits_backend_transitions.labels(backend, "degraded")
    up.set(1)

    def record(healthy: bool) -> None:
        up.set(1 if healthy else 0)
        (to_healthy if healthy else to_degraded).inc()

    return record


async def start_limit_store(store: LimitStore) -> None:
    """Connect a shared store before the first call (a cold connect takes longer than one
    call's bounded wait); nothing to do for memory."""
    start = getattr(store, "start", None)
    if start is not None:
        await start()


async def open_limit_store(settings: Settings, metrics: ProxyMetrics | None = None) -> LimitStore:
    """Build, instrument and start the process's store (see the module docstring)."""
    backend = settings.limits.backend
    on_state = backend_state_recorder(metrics, backend) if metrics is not None else None
    store = build_limit_store(settings, on_state=on_state)
    await start_limit_store(store)
    healthy = getattr(store, "healthy", True)
    log_event(
        log,
        "limits_backend_started",
        backend=backend,
        healthy=healthy,
        policy=settings.limits.failure_policy if backend == "redis" else None,
        expected_processes=settings.limits.expected_processes if backend == "redis" else None,
    )
    return store


async def close_limit_store(store: LimitStore | None) -> None:
    """Release the store's connections (and a shared store's leases); idempotent."""
    if store is not None:
        await store.aclose()
