"""ai.proxy.v1.ProxyAdminService: the pool and the process as the proxy sees them
(read-only). ListEndpoints is the pool; GetOverview is what the operators' live view
(envoy/page/admin.html, `/admin/` at the edge) shows, so grpcurl sees the same.

Rates (calls per second by status, per endpoint calls and error rate) come from counters
sampled once a second into a ring of RATE_WINDOW_S seconds (`OverviewSampler.run`, started
with the server): an overview is a subtraction, never a scan of past calls. While nothing
changes and no call is open the sampler sleeps until the next call (the overload gate's
`next_call`): the counters cannot move meanwhile, so the sample taken on waking stands for
the whole pause.

With auth on, every method needs the caller's credentials AND `auth.admin_scopes`
(default `aiproxy.admin`; interceptors/auth.py), checked by AuthStage.guard."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiproxy.ai.proxy.v1 import admin_service_pb2 as admin_pb
from aiproxy.ai.proxy.v1 import admin_service_pb2_grpc as admin_grpc
from aiproxy.core.metrics import ProxyMetrics
from aiproxy.core.settings import ADMIN_SERVICE_NAME, Settings
from aiproxy.core.types import Context
from aiproxy.server.pool.pool import UpstreamPool

# The name auth's admin scope check uses must be the proto's.
if admin_pb.DESCRIPTOR.services_by_name["ProxyAdminService"].full_name != ADMIN_SERVICE_NAME:
    raise RuntimeError("core.settings.ADMIN_SERVICE_NAME differs from the admin proto")

RATE_WINDOW_S = 10
SAMPLE_INTERVAL_S = 1.0


def _counter_by_label(counter: Any, label: str) -> dict[str, float]:
    """A prometheus_client counter's current values summed by one label."""
    out: dict[str, float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.labels.get(label, "")
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _gauge_by_label(gauge: Any, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in gauge.collect():
        for sample in family.samples:
            out[sample.labels.get(label, "")] = sample.value
    return out


@dataclass
class _Sample:
    at: float
    by_code: dict[str, float]
    # address -> (calls sent, calls failed)
    by_endpoint: dict[str, tuple[int, int]] = field(default_factory=dict)


def _same_counts(a: _Sample, b: _Sample) -> bool:
    return a.by_code == b.by_code and a.by_endpoint == b.by_endpoint


class OverviewSampler:
    """Counters sampled every SAMPLE_INTERVAL_S, the last RATE_WINDOW_S of them kept."""

    def __init__(
        self,
        pool: UpstreamPool,
        metrics: ProxyMetrics | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._clock = clock
        self._ring: collections.deque[_Sample] = collections.deque(
            maxlen=int(RATE_WINDOW_S / SAMPLE_INTERVAL_S) + 1
        )

    def sample(self) -> _Sample:
        by_code = (
            _counter_by_label(self._metrics.requests, "status") if self._metrics is not None else {}
        )
        by_endpoint = {
            address: (ep.total_calls, ep.failed_calls)
            for address, ep in self._pool.endpoints.items()
        }
        current = _Sample(self._clock(), by_code, by_endpoint)
        self._ring.append(current)
        return current

    async def run(
        self,
        idle: Callable[[], Awaitable[None]] | None = None,
        in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        """Sample until cancelled; with `idle`, sleep through pauses (no change since the
        last sample and no call open) until `idle()` returns."""
        ring = self._ring
        while True:
            current = self.sample()
            if (
                idle is not None
                and len(ring) > 1
                and _same_counts(ring[-2], current)
                and not in_flight()
            ):
                await idle()
                self.sample()  # the counters as they stood through the pause
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    def rates(self) -> tuple[float, dict[str, float], dict[str, tuple[float, float]]]:
        """(window seconds, calls/s by code, address -> (calls/s, error rate))."""
        now = self.sample()
        # The oldest sample within the window. After a pause that is the one taken on
        # waking; if the sampler has not woken yet, the last one before the pause (the
        # counters did not move through it, so the rates over the longer window are exact).
        since = now.at - RATE_WINDOW_S
        oldest = next(sample for sample in self._ring if sample.at >= since)
        if oldest is now and len(self._ring) > 1:
            oldest = self._ring[-2]
        window = now.at - oldest.at
        if window <= 0:
            return 0.0, {}, {}
        codes = {
            code: (value - oldest.by_code.get(code, 0.0)) / window
            for code, value in now.by_code.items()
            if value - oldest.by_code.get(code, 0.0) > 0
        }
        endpoints = {}
        for address, (sent, failed) in now.by_endpoint.items():
            sent0, failed0 = oldest.by_endpoint.get(address, (0, 0))
            d_sent, d_failed = sent - sent0, failed - failed0
            endpoints[address] = (d_sent / window, d_failed / d_sent if d_sent > 0 else 0.0)
        return window, codes, endpoints


class ProxyAdmin(admin_grpc.ProxyAdminServiceServicer):
    def __init__(
        self,
        pool: UpstreamPool,
        *,
        settings: Settings | None = None,
        metrics: ProxyMetrics | None = None,
        serving: Callable[[], bool] = lambda: True,
        active_calls: Callable[[], int] = lambda: 0,
        resumable: Callable[[], tuple[int, int]] = lambda: (0, 0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._serving = serving
        self._active_calls = active_calls
        self._resumable = resumable
        self._clock = clock
        self._started = clock()
        self.sampler = OverviewSampler(pool, metrics, clock)
        self._discovery: dict[str, bool] = {}
        pool.discovery.add_status_listener(self._discovery_status)

    def _discovery_status(self, source: str, up: bool) -> None:
        self._discovery[source] = up

    def _endpoints(
        self, rates: dict[str, tuple[float, float]] | None = None
    ) -> list[admin_pb.UpstreamEndpoint]:
        out = []
        for ep in self._pool.endpoints.values():
            per_s, error_rate = (rates or {}).get(ep.address, (0.0, 0.0))
            out.append(
                admin_pb.UpstreamEndpoint(
                    address=ep.address,
                    serving=ep.serving,
                    usable=ep.usable,
                    in_flight=ep.in_flight,
                    total_calls=ep.total_calls,
                    breaker_state=admin_pb.BreakerState.Name(ep.breaker_state_proto()),
                    failed_calls=ep.failed_calls,
                    recent_error_rate=error_rate,
                    recent_calls_per_second=per_s,
                    live=ep.live,
                )
            )
        return out

    async def ListEndpoints(
        self, request: admin_pb.ListEndpointsRequest, context: Context
    ) -> admin_pb.ListEndpointsResponse:
        return admin_pb.ListEndpointsResponse(
            endpoints=self._endpoints(), usable_count=self._pool.usable_count
        )

    async def GetOverview(
        self, request: admin_pb.GetOverviewRequest, context: Context
    ) -> admin_pb.GetOverviewResponse:
        window, codes, endpoint_rates = self.sampler.rates()
        open_streams = 0
        limits = admin_pb.LimitsOverview()
        if self._metrics is not None:
            open_streams = int(
                sum(_gauge_by_label(self._metrics.active_streams, "method").values())
            )
        if self._settings is not None and self._settings.limits.enabled:
            backend = self._settings.limits.backend
            up = (
                _gauge_by_label(self._metrics.limits_backend_up, "backend").get(backend, 1.0)
                if self._metrics is not None
                else 1.0
            )
            limits = admin_pb.LimitsOverview(
                enabled=True,
                backend=backend,
                up=up >= 1,
                failure_policy=self._settings.limits.failure_policy,
            )
        generating, detached = self._resumable()
        return admin_pb.GetOverviewResponse(
            endpoints=self._endpoints(endpoint_rates),
            usable_count=self._pool.usable_count,
            serving=self._serving(),
            streams=admin_pb.StreamsOverview(
                open=open_streams, resumable_generating=generating, resumable_detached=detached
            ),
            limits=limits,
            calls_per_second=[
                admin_pb.CodeRate(code=code, per_second=rate)
                for code, rate in sorted(codes.items())
            ],
            window_seconds=window,
            active_calls=self._active_calls(),
            discovery=[
                admin_pb.DiscoverySource(source=s, up=up)
                for s, up in sorted(self._discovery.items())
            ],
            uptime_seconds=self._clock() - self._started,
        )
