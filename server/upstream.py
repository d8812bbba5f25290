"""The upstream pool: one channel per agent endpoint, health from grpc.health.v1, P2C.

Each endpoint keeps one grpc.aio channel for its whole life and a task that follows the
endpoint's health with the standard Watch stream (falling back to periodic Check for
servers without Watch). New calls go only to usable endpoints, chosen by
power-of-two-choices on outstanding calls, so a slow replica receives less work. Calls
in flight on an endpoint that turns unhealthy are left to finish.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interceptors.breaker import BreakerState, CircuitBreaker
from interceptors.errors import UNAVAILABLE_RETRY_DELAY_S, CircuitOpen, ProxyError, UpstreamUnavailable
from server.config import BreakerSettings, UpstreamSettings
from server.discovery import Discovery, Resolver, system_resolver
from server.logs import log_event

log = logging.getLogger("aiproxy.upstream")

SERVING = health_pb2.HealthCheckResponse.SERVING
# The longest a call may still run on an endpoint removed from the pool (the agent-run
# maximum deadline); the channel is closed after it.
_RETIRE_GRACE_S = 300.0


def channel_options(settings: UpstreamSettings) -> list[tuple[str, Any]]:
    return [
        # Keepalive pings notice a peer that vanished without closing the connection.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
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
    """One upstream replica: its channel, its health, its outstanding calls."""

    def __init__(
        self,
        address: str,
        settings: UpstreamSettings,
        on_change: Callable[[Endpoint], None],
        *,
        breaker: CircuitBreaker | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        credentials: grpc.ChannelCredentials | None = None,
        extra_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address
        self._settings = settings
        self._on_change = on_change
        self.breaker = breaker
        options = [*channel_options(settings), *extra_options]
        self.channels = [
            grpc.aio.insecure_channel(address, options=options, interceptors=list(interceptors))
            if credentials is None
            else grpc.aio.secure_channel(address, credentials, options=options, interceptors=list(interceptors))
            for _ in range(settings.channels_per_endpoint)
        ]
        self._next_channel = 0
        self.serving = False
        self.in_flight = 0
        self.total_calls = 0
        self._callables: dict[tuple[str, bool, int], Any] = {}
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def usable(self) -> bool:
        """New calls may come here: healthy, and its breaker is not open."""
        return self.serving and (self.breaker is None or self.breaker.state is not BreakerState.OPEN)

    def breaker_changed(self) -> None:
        self._on_change(self)

    def start(self) -> None:
        self._watch_task = asyncio.create_task(self._follow_health(), name=f"health:{self.address}")

    async def close(self, grace: float | None = None) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        await asyncio.gather(*(channel.close(grace) for channel in self.channels))

    def _channel_index(self) -> int:
        index = self._next_channel
        self._next_channel = (index + 1) % len(self.channels)
        return index

    def unary_unary(self, path: str, serializer: Callable, deserializer: Callable) -> Any:
        """The cached multicallable for `path` on the next of this endpoint's channels."""
        key = (path, False, self._channel_index())
        callable_ = self._callables.get(key)
        if callable_ is None:
            callable_ = self.channels[key[2]].unary_unary(
                path, request_serializer=serializer, response_deserializer=deserializer, _registered_method=True
            )
            self._callables[key] = callable_
        return callable_

    def unary_stream(self, path: str, serializer: Callable, deserializer: Callable) -> Any:
        key = (path, True, self._channel_index())
        callable_ = self._callables.get(key)
        if callable_ is None:
            callable_ = self.channels[key[2]].unary_stream(
                path, request_serializer=serializer, response_deserializer=deserializer, _registered_method=True
            )
            self._callables[key] = callable_
        return callable_

    def breaker_state_proto(self) -> int:
        """The breaker's state as ai.proxy.v1.BreakerState (UNSPECIFIED: no breaker)."""
        return 0 if self.breaker is None else int(self.breaker.state) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "serving": self.serving,
            "usable": self.usable,
            "in_flight": self.in_flight,
            "breaker": None if self.breaker is None else self.breaker.state.name,
            "total_calls": self.total_calls,
        }

    def _set_serving(self, serving: bool, why: str) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        log_event(log, "upstream_health", address=self.address, serving=serving, why=why)
        self._on_change(self)

    async def _follow_health(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channels[0])
        request = health_pb2.HealthCheckRequest(service=self._settings.health_service)
        backoff = 0.05
        while True:
            try:
                # wait_for_ready: while the endpoint is down the call waits for the channel
                # to reconnect instead of failing in a tight loop.
                async for response in stub.Watch(request, wait_for_ready=True):
                    backoff = 0.05
                    self._set_serving(response.status == SERVING, "watch")
                self._set_serving(False, "watch stream ended")
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    await self._poll_health(stub, request)
                    return
                self._set_serving(False, f"watch failed: {exc.code().name}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _poll_health(self, stub: health_pb2_grpc.HealthStub, request: Any) -> None:
        """For servers without Watch: Check every health_check_interval_s."""
        interval = self._settings.health_check_interval_s
        while True:
            try:
                response = await stub.Check(request, timeout=interval, wait_for_ready=True)
                self._set_serving(response.status == SERVING, "check")
            except grpc.aio.AioRpcError as exc:
                self._set_serving(False, f"check failed: {exc.code().name}")
            await asyncio.sleep(interval)


class UpstreamPool:
    """The set of endpoints calls are balanced over."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        breaker_settings: BreakerSettings | None = None,
        client_interceptors: Callable[[CircuitBreaker | None], Sequence[grpc.aio.ClientInterceptor]] = lambda _b: (),
        rng: random.Random | None = None,
        resolver: Resolver | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        extra_channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._settings = settings
        # TLS towards the endpoints (server/tls.py); None: plaintext.
        self._credentials = credentials
        self._extra_channel_options = tuple(extra_channel_options)
        self._breaker_settings = breaker_settings
        self._client_interceptors = client_interceptors
        self.discovery = Discovery(
            settings.endpoints, self.set_addresses, refresh_s=settings.dns_refresh_s, resolver=resolver or system_resolver
        )
        self._rng = rng or random.Random()
        self.endpoints: dict[str, Endpoint] = {}
        self._listeners: list[Callable[[UpstreamPool], None]] = []
        self._usable: list[Endpoint] = []
        self._retiring: set[asyncio.Task[None]] = set()

    def add_listener(self, listener: Callable[[UpstreamPool], None]) -> None:
        """Called whenever the set of usable endpoints may have changed."""
        self._listeners.append(listener)

    async def start(self) -> None:
        await self.discovery.start()

    async def set_addresses(self, addresses: Iterable[str]) -> None:
        """Add new endpoints and retire missing ones (their calls in flight finish)."""
        wanted = list(dict.fromkeys(addresses))
        for address in wanted:
            if address not in self.endpoints:
                endpoint = self._new_endpoint(address)
                self.endpoints[address] = endpoint
                endpoint.start()
                log_event(log, "upstream_added", address=address)
        retired = [ep for addr, ep in self.endpoints.items() if addr not in wanted]
        for endpoint in retired:
            del self.endpoints[endpoint.address]
            log_event(log, "upstream_removed", address=endpoint.address)
        self._refresh()
        for endpoint in retired:
            # Calls already on a retired endpoint may run to their own deadline; the
            # caller of set_addresses (the resolver) does not wait for them.
            task = asyncio.create_task(endpoint.close(grace=_RETIRE_GRACE_S))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _new_endpoint(self, address: str) -> Endpoint:
        breaker = None
        if self._breaker_settings is not None and self._breaker_settings.enabled:
            b = self._breaker_settings
            breaker = CircuitBreaker(
                address,
                failure_threshold=b.failure_threshold,
                failure_ratio=b.failure_ratio,
                window_s=b.window_s,
                min_volume=b.min_volume,
                reset_timeout_s=b.reset_timeout_s,
                half_open_max_probes=b.half_open_max_probes,
                success_threshold=b.success_threshold,
                on_transition=self._breaker_transition,
            )
        return Endpoint(
            address,
            self._settings,
            self._endpoint_changed,
            breaker=breaker,
            interceptors=self._client_interceptors(breaker),
            credentials=self._credentials,
            extra_options=self._extra_channel_options,
        )

    def _breaker_transition(self, name: str, old: BreakerState, new: BreakerState) -> None:
        log_event(log, "breaker_transition", upstream=name, old=old.name, new=new.name)
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            return
        endpoint.breaker_changed()
        if new is BreakerState.OPEN and endpoint.breaker is not None:
            # OPEN turns HALF_OPEN lazily, when the state is read: read it when it is due
            # so the endpoint becomes usable (for probes) without waiting for a call.
            loop = asyncio.get_running_loop()
            loop.call_later(endpoint.breaker.retry_after_s() + 0.001, self._recheck_breaker, name)

    def _recheck_breaker(self, name: str) -> None:
        endpoint = self.endpoints.get(name)
        if endpoint is not None and endpoint.breaker is not None:
            _ = endpoint.breaker.state  # may transition to HALF_OPEN (and call back)
            self._refresh()

    async def wait_usable(self, timeout: float) -> bool:
        """Wait until an endpoint is usable (True) or `timeout` passes (False)."""
        if self._usable:
            return True
        ready = asyncio.Event()

        def check(pool: UpstreamPool) -> None:
            if pool._usable:
                ready.set()

        self._listeners.append(check)
        try:
            await asyncio.wait_for(ready.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._listeners.remove(check)

    def has_other_usable(self, tried: set[str]) -> bool:
        return any(ep.address not in tried for ep in self._usable)

    def unavailable_error(self) -> ProxyError:
        """Why no endpoint can take a call: all breakers open, or none healthy."""
        open_breakers = [
            ep.breaker
            for ep in self.endpoints.values()
            if ep.serving and ep.breaker is not None and ep.breaker.state is BreakerState.OPEN
        ]
        if open_breakers:
            return CircuitOpen(
                "every healthy upstream's circuit breaker is open",
                retry_delay_s=min(b.retry_after_s() for b in open_breakers),
            )
        return UpstreamUnavailable("no healthy upstream endpoint", retry_delay_s=UNAVAILABLE_RETRY_DELAY_S)

    async def close(self) -> None:
        await self.discovery.stop()
        endpoints, self.endpoints = list(self.endpoints.values()), {}
        self._refresh()
        await asyncio.gather(*(ep.close() for ep in endpoints), *self._retiring, return_exceptions=True)

    @property
    def usable_count(self) -> int:
        return len(self._usable)

    def pick(self, exclude: frozenset[str] | set[str] = frozenset()) -> Endpoint | None:
        """Power of two choices on outstanding calls among usable endpoints.

        `exclude` holds endpoints a retry should avoid; if nothing else is usable they
        are still better than failing the call.
        """
        candidates = self._usable
        if exclude:
            others = [ep for ep in candidates if ep.address not in exclude]
            candidates = others or candidates
        n = len(candidates)
        if n == 0:
            return None
        if n == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return a if a.in_flight <= b.in_flight else b

    def snapshot(self) -> list[dict[str, Any]]:
        return [ep.snapshot() for ep in self.endpoints.values()]

    def _endpoint_changed(self, _endpoint: Endpoint) -> None:
        self._refresh()

    def _refresh(self) -> None:
        self._usable = [ep for ep in self.endpoints.values() if ep.usable]
        for listener in self._listeners:
            listener(self)
