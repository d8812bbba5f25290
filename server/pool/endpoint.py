"""One upstream replica: its channels, the calls sent on them, its state.

Each endpoint keeps its channels for its whole life: the data channels that carry calls
(through `Endpoint.unary` / `Endpoint.stream`, which apply the endpoint's breaker, the
client metrics and the tracking of calls in flight), and one plain health channel, its
own connection, that the health supervisor (health.py) uses. `usable` says whether new
calls may come here (SERVING, answering, breaker not open); the pool (pool.py) keeps the
usable ones and the balancer (balancer.py) picks among them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from aiproxy.core.breaker import BreakerState, CircuitBreaker
from aiproxy.core.logs import log_event
from aiproxy.core.settings import UpstreamSettings
from aiproxy.interceptors.client_observability import ClientMetrics
from aiproxy.interceptors.upstream_breaker import acquire
from aiproxy.server.pool.calls import (
    CANCELLED,
    OK,
    UNKNOWN,
    CallsInFlight,
    Route,
    UpstreamStream,
    settle_failed,
)
from aiproxy.server.pool.health import EndpointHealth

log = logging.getLogger("aiproxy.upstream")


def channel_options(settings: UpstreamSettings) -> list[tuple[str, Any]]:
    keepalive_timeout_ms = int(settings.keepalive_timeout_s * 1000)
    return [
        # Keepalive pings notice a peer that vanished without closing the connection.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        # grpc-core waits for a ping's ack for GRPC_ARG_PING_TIMEOUT_MS (default 60 s),
        # and keepalive_timeout_ms alone is not what applies (grpc/grpc#39239: "keepalive
        # timeout is never triggered and we solely rely on the ping timeout"); measured
        # here on grpcio 1.85 with a SIGSTOPped agent: 60 s without it, keepalive_time +
        # keepalive_timeout with it. The liveness probe does not depend on either.
        ("grpc.http2.ping_timeout_ms", keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A replica that comes back is reconnected to within seconds.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(settings.reconnect_backoff_max_s * 1000)),
        # Each endpoint gets its own connection even when two resolve to one address.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        # No transparent retries inside grpc: the proxy owns retry policy.
        ("grpc.enable_retries", 0),
    ]


class Endpoint:
    """One upstream replica: its channels, its health, its outstanding calls."""

    def __init__(
        self,
        address: str,
        settings: UpstreamSettings,
        on_change: Callable[[Endpoint], None],
        *,
        breaker: CircuitBreaker | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        client_metrics: ClientMetrics | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        extra_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address
        self._settings = settings
        self._on_change = on_change
        self.breaker = breaker
        self.health = EndpointHealth(self, settings)
        self.calls = CallsInFlight(on_unavailable=self.health.probe_now.set)
        options = [*channel_options(settings), *extra_options]
        # Plain channels (the breaker, the client metrics and the tracking of calls in
        # flight are in `unary`/`stream`, not grpc.aio client interceptors): only the
        # opt-in tracing interceptors go here.
        chain = list(interceptors)
        self._metrics = client_metrics
        self.channels = [
            self._channel(options, chain, credentials)
            for _ in range(settings.channels_per_endpoint)
        ]
        # Health and liveness: their own connection, no interceptors (no breaker, no
        # client metrics: probes are not traffic).
        self.health_channel = self._channel(options, [], credentials)
        self.serving = False
        # Answered its last liveness check (a fresh endpoint is presumed to: Watch
        # decides when it is first used).
        self.live = True
        self.in_flight = 0
        self.total_calls = 0
        self._routes: dict[tuple[str, bool], Route] = {}

    def _channel(
        self,
        options: list[tuple[str, Any]],
        chain: list[grpc.aio.ClientInterceptor],
        credentials: grpc.ChannelCredentials | None,
    ) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(
                self.address, options=options, interceptors=chain or None
            )
        return grpc.aio.secure_channel(
            self.address, credentials, options=options, interceptors=chain or None
        )

    @property
    def healthy(self) -> bool:
        """SERVING and answering: the endpoint could take calls (its breaker aside)."""
        return self.serving and self.live

    @property
    def usable(self) -> bool:
        """New calls may come here: healthy, and its breaker is not open."""
        return self.healthy and (
            self.breaker is None or self.breaker.state is not BreakerState.OPEN
        )

    def breaker_changed(self) -> None:
        self._on_change(self)

    def start(self) -> None:
        self.health.start()

    async def close(self, grace: float | None = None) -> None:
        await self.health.stop()
        await asyncio.gather(
            *(channel.close(grace) for channel in self.channels), self.health_channel.close()
        )

    def _route(self, path: str, streaming: bool, deserializer: Callable[[bytes], Any]) -> Route:
        # serializer None: the caller's request bytes go upstream as they came.
        # _registered_method: grpc.aio's own (private) hint that spares a per-call method
        # lookup; the grpcio stubs do not declare it.
        callables: list[Any]
        if streaming:
            callables = [
                ch.unary_stream(path, response_deserializer=deserializer, _registered_method=True)  # type: ignore[call-arg]
                for ch in self.channels
            ]
        else:
            callables = [
                ch.unary_unary(path, response_deserializer=deserializer, _registered_method=True)  # type: ignore[call-arg]
                for ch in self.channels
            ]
        metrics = None if self._metrics is None else self._metrics.method(path, streaming)
        route = self._routes[(path, streaming)] = Route(callables, metrics)
        return route

    async def unary(
        self,
        path: str,
        deserializer: Callable[[bytes], Any],
        request: bytes,
        metadata: Sequence[tuple[str, Any]],
        timeout: float | None,
        on_metadata: Callable[[Any], None] | None = None,
    ) -> Any:
        """One unary call upstream: the breaker's permit first (CircuitOpen, nothing
        sent, while open), then the call on the next channel, settled by its outcome;
        the grpc_client_* series count it. UNAVAILABLE when the pool failed it.
        `on_metadata`, when given, gets the upstream's initial then trailing metadata of
        a call that succeeded."""
        route = self._routes.get((path, False)) or self._route(path, False, deserializer)
        permit = acquire(self.breaker)
        m = route.metrics
        start = 0.0 if m is None else m.begin()
        code = UNKNOWN
        entry = None
        try:
            call = route.callable()(request, metadata=metadata, timeout=timeout)
            entry = self.calls.track(call)
            response = await call
            if on_metadata is not None:
                on_metadata(await call.initial_metadata())
                on_metadata(await call.trailing_metadata())
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            settle_failed(permit, exc)
            if entry is not None:
                self.calls.ended_badly(entry, exc)
            raise
        except asyncio.CancelledError as exc:
            code = CANCELLED
            if permit is not None:
                permit.ignore()  # cancelled: no verdict on the upstream
            if entry is not None:
                self.calls.ended_badly(entry, exc)
            raise
        except BaseException:
            if permit is not None:
                permit.ignore()  # our own bug (or a closed channel): not the upstream's
            raise
        else:
            code = OK
            if permit is not None:
                permit.success()
            if m is not None:
                m.received.inc()
            return response
        finally:
            if entry is not None:
                self.calls.untrack(entry)
            if m is not None:
                m.finish(code, start)

    def stream(
        self,
        path: str,
        deserializer: Callable[[bytes], Any],
        request: bytes,
        metadata: Sequence[tuple[str, Any]],
        timeout: float | None,
    ) -> UpstreamStream:
        """One server-streaming call upstream (see `unary`), settled when it ends."""
        route = self._routes.get((path, True)) or self._route(path, True, deserializer)
        permit = acquire(self.breaker)
        m = route.metrics
        start = 0.0 if m is None else m.begin()
        try:
            call = route.callable()(request, metadata=metadata, timeout=timeout)
        except BaseException:
            if permit is not None:
                permit.ignore()
            if m is not None:
                m.finish(UNKNOWN, start)
            raise
        return UpstreamStream(call, self.calls, permit, m, start)

    @property
    def failed_calls(self) -> int:
        """Calls sent here that failed (server/pool/calls.py CallsInFlight.failed)."""
        return self.calls.failed

    def breaker_state_proto(self) -> int:
        """The breaker's state as ai.proxy.v1.BreakerState (UNSPECIFIED: no breaker)."""
        return 0 if self.breaker is None else int(self.breaker.state) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "serving": self.serving,
            "live": self.live,
            "usable": self.usable,
            "in_flight": self.in_flight,
            "breaker": None if self.breaker is None else self.breaker.state.name,
            "total_calls": self.total_calls,
        }

    def set_serving(self, serving: bool, why: str) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        log_event(log, "upstream_health", address=self.address, serving=serving, why=why)
        self._recovered_if_healthy()
        self._on_change(self)

    def _recovered_if_healthy(self) -> None:
        if self.healthy and self.breaker is not None:
            self.breaker.endpoint_recovered()

    def set_live(self, live: bool, why: str) -> None:
        if live == self.live:
            return
        self.live = live
        log_event(
            log,
            "upstream_liveness",
            level=logging.INFO if live else logging.WARNING,
            address=self.address,
            live=live,
            why=why,
        )
        self._recovered_if_healthy()
        self._on_change(self)
