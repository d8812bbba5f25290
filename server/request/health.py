"""The proxy's own grpc.health.v1: SERVING only while the pool has a healthy endpoint.

Healthy means SERVING by its own health check and answering the liveness probe; an
endpoint's circuit breaker does not count. An open breaker is a verdict on calls, and
this proxy still answers them at once (CIRCUIT_OPEN with RetryInfo, or another
endpoint); NOT_SERVING would instead make the balancer in front eject this proxy, so one
breaker trip became "no healthy upstream" for every caller of the proxy, and it also
stops the traffic whose half-open probes would close the breaker. When no endpoint is
healthy the proxy cannot serve anything, and says so.

Statuses are kept for the server as a whole ("") and for ai.agent.v1.AgentService;
Watch subscribers hear every change at once. A third service, "liveness", is SERVING
from start to exit, draining included: it says the process is alive (a liveness probe
must not restart a proxy whose upstreams are down, or one that is draining).
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2

from aiproxy.core.service import SERVICE_NAME
from aiproxy.server.pool.pool import UpstreamPool

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", SERVICE_NAME)
LIVENESS_SERVICE = "liveness"


class ProxyHealth:
    def __init__(self, pool: UpstreamPool) -> None:
        self.servicer = health.aio.HealthServicer()
        self._pool = pool
        self._draining = False
        self._status: int | None = None
        self._updates: set[asyncio.Task[None]] = set()
        pool.add_listener(lambda _pool: self.refresh())

    @property
    def serving(self) -> bool:
        return self._status == SERVING

    async def start(self) -> None:
        await self.servicer.set(LIVENESS_SERVICE, SERVING)
        self.refresh()

    def refresh(self) -> None:
        serving = not self._draining and self._pool.healthy_count > 0
        status = SERVING if serving else NOT_SERVING
        if status == self._status:
            return
        self._status = status
        # The aio servicer's set() is a coroutine (it wakes Watch streams); updates are
        # applied in order because each takes the same per-service condition lock FIFO.
        task = asyncio.get_running_loop().create_task(self._apply(status))
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)

    async def _apply(self, status: int) -> None:
        for service in SERVICES:
            await self.servicer.set(service, status)

    async def drain(self) -> None:
        """Report NOT_SERVING for good: the process is shutting down."""
        self._draining = True
        self.refresh()
        await asyncio.gather(*self._updates)
        # Not servicer.enter_graceful_shutdown(): it would take liveness down too; the
        # readiness services stay NOT_SERVING since refresh() honours _draining.
