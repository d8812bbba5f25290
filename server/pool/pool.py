"""The upstream pool: the endpoints calls are balanced over.

Endpoints come from discovery (discovery.py: static addresses, DNS names re-resolved);
the pool adds new ones, retires missing ones (their calls in flight finish), gives each a
circuit breaker, and keeps the list of usable endpoints (SERVING, answering, breaker not
open) up to date as their states change. New calls go only to usable endpoints, chosen by
the balancer (balancer.py); calls in flight on an endpoint that reports NOT_SERVING are
left to finish.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from aiproxy.core.breaker import BreakerState, CircuitBreaker
from aiproxy.core.callinfo import current_call
from aiproxy.core.errors import (
    UNAVAILABLE_RETRY_DELAY_S,
    CircuitOpen,
    ProxyError,
    UpstreamUnavailable,
)
from aiproxy.core.logs import log_event
from aiproxy.core.metrics import GrpcClientMetrics
from aiproxy.core.settings import BreakerSettings, UpstreamSettings
from aiproxy.interceptors.client_observability import ClientMetrics
from aiproxy.server.pool.balancer import Member, Outcome, pick_affine, pick_p2c, seed
from aiproxy.server.pool.discovery import Discovery, Resolver, system_resolver
from aiproxy.server.pool.endpoint import Endpoint

log = logging.getLogger("aiproxy.upstream")

# The longest a call may still run on an endpoint removed from the pool (the agent-run
# maximum deadline); the channel is closed after it.
_RETIRE_GRACE_S = 300.0


def _current_caller() -> str:
    """Who is calling, unforgeably (the breaker counts distinct callers): the verified
    subject or key, else the address; never the self-declared x-client-id."""
    call = current_call.get()
    return call.identity if call is not None else ""


class UpstreamPool:
    """The set of endpoints calls are balanced over."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        breaker_settings: BreakerSettings | None = None,
        client_interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        client_metrics: GrpcClientMetrics | None = None,
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
        # Channel interceptors: only the opt-in tracing ones (server/chain.py).
        self._client_interceptors = tuple(client_interceptors)
        self._client_metrics = None if client_metrics is None else ClientMetrics(client_metrics)
        self.discovery = Discovery(
            settings.endpoints,
            self.set_addresses,
            refresh_s=settings.dns_refresh_s,
            resolver=resolver or system_resolver,
            consul_options={"wait_s": settings.consul_wait_s},
        )
        self._rng = rng or random.Random()
        self.endpoints: dict[str, Endpoint] = {}
        self._listeners: list[Callable[[UpstreamPool], None]] = []
        self._usable: list[Endpoint] = []
        # Every endpoint with its rendezvous coefficients, for keyed calls (balancer.py).
        affinity = settings.affinity
        self.affinity = affinity.enabled
        self._load_factor = affinity.load_factor
        self._min_spill = affinity.min_spill_in_flight
        self._members: tuple[Member, ...] = ()
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
                failure_ratio=b.failure_ratio,
                window_s=b.window_s,
                min_volume=b.min_volume,
                min_failing_callers=b.min_failing_callers,
                failure_codes=frozenset(grpc.StatusCode[name] for name in b.failure_codes),
                caller=_current_caller,
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
            interceptors=self._client_interceptors,
            client_metrics=self._client_metrics,
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
            if ep.healthy and ep.breaker is not None and ep.breaker.state is BreakerState.OPEN
        ]
        if open_breakers:
            return CircuitOpen(
                "every healthy upstream's circuit breaker is open",
                retry_delay_s=min(b.retry_after_s() for b in open_breakers),
            )
        return UpstreamUnavailable(
            "no healthy upstream endpoint", retry_delay_s=UNAVAILABLE_RETRY_DELAY_S
        )

    async def close(self) -> None:
        await self.discovery.stop()
        endpoints, self.endpoints = list(self.endpoints.values()), {}
        self._refresh()
        await asyncio.gather(
            *(ep.close() for ep in endpoints), *self._retiring, return_exceptions=True
        )

    @property
    def usable_count(self) -> int:
        return len(self._usable)

    @property
    def healthy_count(self) -> int:
        """Endpoints SERVING and answering, whatever their breakers say: what the
        proxy's readiness follows (server/request/health.py)."""
        return sum(1 for ep in self.endpoints.values() if ep.healthy)

    def pick(self, exclude: frozenset[str] | set[str] = frozenset()) -> Endpoint | None:
        """The endpoint for the next attempt (balancer.py), avoiding `exclude` when it
        can; None when none is usable."""
        return pick_p2c(self._usable, self._rng, exclude)

    def pick_affine(
        self, key_hash: int, exclude: frozenset[str] | set[str] = frozenset()
    ) -> tuple[Endpoint | None, Outcome]:
        """The endpoint for the next attempt of a call with an affinity key (its
        `balancer.key_hash`): the key's first usable choice under the load bound, avoiding
        `exclude` when it can; None when none is usable. With the outcome: hit, spill or
        failover (balancer.py)."""
        return pick_affine(
            self._members,
            key_hash,
            load_factor=self._load_factor,
            min_spill=self._min_spill,
            exclude=exclude,
        )

    def snapshot(self) -> list[dict[str, Any]]:
        return [ep.snapshot() for ep in self.endpoints.values()]

    def _endpoint_changed(self, _endpoint: Endpoint) -> None:
        self._refresh()

    def _refresh(self) -> None:
        usable: list[Endpoint] = []
        members: list[Member] = []
        for ep in self.endpoints.values():
            ok = ep.usable
            if ok:
                usable.append(ep)
            members.append(Member(*seed(ep.address), ep, ok))
        self._usable = usable
        self._members = tuple(members)
        for listener in self._listeners:
            listener(self)
