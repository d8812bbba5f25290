"""The upstream pool: channels per agent endpoint, health from grpc.health.v1, P2C.

Each endpoint keeps its channels for its whole life: the data channels that carry calls
(through `Endpoint.unary` / `Endpoint.stream`, which apply the endpoint's breaker, the
client metrics and the tracking of calls in flight), and one plain health channel, its
own connection, that two supervised tasks use:

* health following: the standard Watch stream (periodic Check for servers without
  Watch) says whether the endpoint is SERVING. It never goes through the breaker: an
  open breaker used to make the re-subscription raise CircuitOpen, which ended the task
  for good, and the endpoint stayed "not serving" after it came back (issue 13.3).
* liveness: a health Check with a `keepalive_timeout_s` deadline every
  `keepalive_time_s`. A process that holds its connections but does not answer (hung,
  SIGSTOPped, a blocked event loop) is taken out within keepalive_time + keepalive_timeout
  and its calls in flight fail at once with UNAVAILABLE (streams in-band, unary calls
  retried elsewhere), whatever grpc-core's own ping timeouts do (issue 13.4).

A supervisor restarts either task after any exception, with backoff, and logs it.
New calls go only to usable endpoints (SERVING, answering, breaker not open), chosen by
power-of-two-choices on outstanding calls, so a slow replica receives less work. Calls
in flight on an endpoint that reports NOT_SERVING are left to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiproxy.core.breaker import BreakerState, CircuitBreaker, Permit
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
from aiproxy.interceptors.client_observability import ClientMethod, ClientMetrics
from aiproxy.interceptors.upstream_breaker import acquire
from aiproxy.server.pool.discovery import Discovery, Resolver, system_resolver

log = logging.getLogger("aiproxy.upstream")


def _current_caller() -> str:
    """Who is calling, unforgeably (the breaker counts distinct callers): the verified
    subject or key, else the address; never the self-declared x-client-id."""
    call = current_call.get()
    return call.identity if call is not None else ""


SERVING = health_pb2.HealthCheckResponse.SERVING
# The longest a call may still run on an endpoint removed from the pool (the agent-run
# maximum deadline); the channel is closed after it.
_RETIRE_GRACE_S = 300.0


# Health following restarts after a failure with this backoff (doubling up to the max).
_SUPERVISE_BACKOFF_S = (0.05, 2.0)
# While an endpoint does not answer, liveness is checked at least this often, so that it
# is back within about this long after it answers again.
_LIVENESS_RECHECK_S = 0.5
# A call that fails with UNAVAILABLE (a connection that died: ping timeout, reset) asks for
# a liveness check now instead of at the next interval; at most this often, whatever
# the failures (an agent that answers UNAVAILABLE to one caller's requests included).
_LIVENESS_HINT_SPACING_S = 1.0


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


class _Tracked:
    __slots__ = ("call", "why")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.why: str | None = None  # set when the pool fails the call


def _unavailable(why: str) -> grpc.aio.AioRpcError:
    """The error a call failed by the pool ends with: what grpc itself reports for a
    connection that died (UNAVAILABLE), so retries and the error shape treat it alike."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=why
    )


class CallsInFlight:
    """The calls in flight on one endpoint's data channels, so that the pool can fail
    them at once when the endpoint stops answering; grpc would otherwise let them wait
    for their deadline (streams: the idle timeout) on a connection that looks open.

    The endpoint's upstream call (`Endpoint.unary` / `Endpoint.stream`) tracks each call
    here: a call the pool fails is cancelled underneath (the breaker sees a cancellation
    and does not count it) and ends for the forwarder with UNAVAILABLE.
    """

    def __init__(self, on_unavailable: Callable[[], None] = lambda: None) -> None:
        self._calls: set[_Tracked] = set()
        # Told when a call fails with UNAVAILABLE by itself (the liveness probe's hint).
        self.on_unavailable = on_unavailable

    def __len__(self) -> int:
        return len(self._calls)

    def fail_all(self, why: str) -> int:
        """Cancel every call in flight; each ends with UNAVAILABLE `why`. How many."""
        calls, self._calls = self._calls, set()
        for entry in calls:
            entry.why = why
            entry.call.cancel()
        return len(calls)

    def track(self, call: Any) -> _Tracked:
        entry = _Tracked(call)
        self._calls.add(entry)
        return entry

    def untrack(self, entry: _Tracked) -> None:
        self._calls.discard(entry)

    def ended_badly(self, entry: _Tracked, exc: BaseException) -> None:
        """Raise UNAVAILABLE for a call the pool failed; hint at an UNAVAILABLE of its own."""
        if entry.why is not None:
            raise _unavailable(entry.why) from None
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.UNAVAILABLE:
            self.on_unavailable()


_OK = grpc.StatusCode.OK
_EOF = grpc.aio.EOF
_UNKNOWN = grpc.StatusCode.UNKNOWN
_CANCELLED = grpc.StatusCode.CANCELLED


class _Route:
    """One method on one endpoint: its multicallable per channel (round robin) and its
    client metrics, made on the method's first call."""

    __slots__ = ("callables", "metrics", "next")

    def __init__(self, callables: list[Any], metrics: ClientMethod | None) -> None:
        self.callables = callables
        self.metrics = metrics
        self.next = 0

    def callable(self) -> Any:
        callables = self.callables
        index = self.next
        self.next = (index + 1) % len(callables)
        return callables[index]


class UpstreamStream:
    """One upstream server-streaming call: iterate it for the chunks, `cancel()` it.

    Settles the breaker permit and the client metrics when the stream ends (completed,
    failed, or cancelled: ignored by the breaker); a call the pool failed ends with
    UNAVAILABLE (CallsInFlight)."""

    __slots__ = (
        "_call",
        "_calls",
        "_entry",
        "_metrics",
        "_permit",
        "_settled",
        "_start",
        "_started",
    )

    def __init__(
        self,
        call: Any,
        calls: CallsInFlight,
        permit: Permit | None,
        metrics: ClientMethod | None,
        start: float,
    ) -> None:
        self._call = call
        self._calls = calls
        self._entry = calls.track(call)
        self._permit = permit
        self._metrics = metrics
        self._start = start
        self._started = False
        self._settled = False
        # Also when nobody ever reads it (a stream closed before its first read).
        call.add_done_callback(self._done)

    def cancel(self) -> bool:
        cancelled: bool = self._call.cancel()
        return cancelled

    def _done(self, call: Any) -> None:
        self._calls.untrack(self._entry)
        if not self._started and call.cancelled():
            # Cancelled before anyone read it (a stream closed before its first read):
            # the iteration below would never settle it.
            self._settled = True
            if self._permit is not None:
                self._permit.ignore()
            if self._metrics is not None:
                self._metrics.finish(_CANCELLED, self._start)

    async def __aiter__(self) -> AsyncIterator[Any]:
        self._started = True
        permit = None if self._settled else self._permit
        m = None if self._settled else self._metrics
        received = 0  # counted once at the end: no metric lock per chunk
        code = _UNKNOWN
        # call.read() rather than `async for`: grpc.aio's iterator is one more async
        # generator frame per chunk (_fetch_stream_responses) around the same read.
        read = self._call.read
        try:
            while True:
                response = await read()
                if response is _EOF:
                    break
                received += 1
                yield response
            code = _OK
            if permit is not None:
                permit.success()
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if permit is not None:
                permit.record(code)
            self._calls.ended_badly(self._entry, exc)
            raise
        except asyncio.CancelledError as exc:
            code = _CANCELLED
            if permit is not None:
                permit.ignore()
            self._calls.ended_badly(self._entry, exc)
            raise
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):  # closed early by its reader
                code = _CANCELLED
            if permit is not None:
                permit.ignore()
            raise
        finally:
            self._calls.untrack(self._entry)
            if m is not None:
                if received:
                    m.received.inc(received)
                m.finish(code, self._start)


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
        self._probe_now = asyncio.Event()
        self.calls = CallsInFlight(on_unavailable=self._probe_now.set)
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
        self._routes: dict[tuple[str, bool], _Route] = {}
        self._tasks: list[asyncio.Task[None]] = []

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
        self._tasks = [
            asyncio.create_task(
                self._supervise("health", self._follow_health), name=f"health:{self.address}"
            ),
            asyncio.create_task(
                self._supervise("liveness", self._probe_liveness), name=f"liveness:{self.address}"
            ),
        ]

    async def close(self, grace: float | None = None) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(
            *(channel.close(grace) for channel in self.channels), self.health_channel.close()
        )

    def _route(self, path: str, streaming: bool, deserializer: Callable[[bytes], Any]) -> _Route:
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
        route = self._routes[(path, streaming)] = _Route(callables, metrics)
        return route

    async def unary(
        self,
        path: str,
        deserializer: Callable[[bytes], Any],
        request: bytes,
        metadata: Sequence[tuple[str, Any]],
        timeout: float | None,
    ) -> Any:
        """One unary call upstream: the breaker's permit first (CircuitOpen, nothing
        sent, while open), then the call on the next channel, settled by its outcome;
        the grpc_client_* series count it. UNAVAILABLE when the pool failed it."""
        route = self._routes.get((path, False)) or self._route(path, False, deserializer)
        permit = acquire(self.breaker)
        m = route.metrics
        start = 0.0 if m is None else m.begin()
        code = _UNKNOWN
        entry = None
        try:
            call = route.callable()(request, metadata=metadata, timeout=timeout)
            entry = self.calls.track(call)
            response = await call
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if permit is not None:
                permit.record(code)
            if entry is not None:
                self.calls.ended_badly(entry, exc)
            raise
        except asyncio.CancelledError as exc:
            code = _CANCELLED
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
            code = _OK
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
                m.finish(_UNKNOWN, start)
            raise
        return UpstreamStream(call, self.calls, permit, m, start)

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

    def _set_serving(self, serving: bool, why: str) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        log_event(log, "upstream_health", address=self.address, serving=serving, why=why)
        self._recovered_if_healthy()
        self._on_change(self)

    def _recovered_if_healthy(self) -> None:
        if self.healthy and self.breaker is not None:
            self.breaker.endpoint_recovered()

    def _set_live(self, live: bool, why: str) -> None:
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

    async def _supervise(self, what: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run` for the endpoint's whole life: restart it, with backoff, whatever
        it raises (a task that ended would leave the endpoint's state frozen)."""
        loop = asyncio.get_running_loop()
        low, high = _SUPERVISE_BACKOFF_S
        backoff = low
        while True:
            started = loop.time()
            try:
                await run()
                why = "ended"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - anything at all: restart
                why = type(exc).__name__
            if what == "health":
                self._set_serving(False, f"health following restarts: {why}")
            log_event(
                log,
                "upstream_task_restart",
                level=logging.WARNING,
                address=self.address,
                task=what,
                why=why,
            )
            if loop.time() - started > high:
                backoff = low  # it had been running fine: restart quickly
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, high)

    async def _follow_health(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.health_channel)
        request = health_pb2.HealthCheckRequest(service=self._settings.health_service)
        backoff = 0.05
        while True:
            try:
                # wait_for_ready: while the endpoint is down the call waits for the channel
                # to reconnect instead of failing in a tight loop.
                async for response in stub.Watch(request, wait_for_ready=True):  # type: ignore[attr-defined]  # stubs: HealthStub has no methods
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
                response = await stub.Check(request, timeout=interval, wait_for_ready=True)  # type: ignore[attr-defined]  # stubs: HealthStub has no methods
                self._set_serving(response.status == SERVING, "check")
            except grpc.aio.AioRpcError as exc:
                self._set_serving(False, f"check failed: {exc.code().name}")
            await asyncio.sleep(interval)

    async def _probe_liveness(self) -> None:
        """A health Check with a keepalive_timeout_s deadline every keepalive_time_s.

        Any answer (even NOT_SERVING or UNIMPLEMENTED) means the process answers. No
        answer in time means it is hung: new calls avoid it and the calls in flight on
        it fail now with UNAVAILABLE instead of waiting out their deadlines. A refused
        connection (UNAVAILABLE) only takes it out of the pool: grpc fails the calls on
        a connection that closed by itself. A call failing with UNAVAILABLE brings the
        next check forward (grpc's ping timeout often fails a hung endpoint's streams
        first; new calls must stop going there as soon, not at the next interval).
        """
        stub = health_pb2_grpc.HealthStub(self.health_channel)
        request = health_pb2.HealthCheckRequest(service=self._settings.health_service)
        interval = self._settings.keepalive_time_s
        timeout = self._settings.keepalive_timeout_s
        spacing = min(_LIVENESS_HINT_SPACING_S, interval)
        while True:
            delay = interval if self.live else min(interval, _LIVENESS_RECHECK_S)
            await asyncio.sleep(min(spacing, delay))
            if delay > spacing:  # early on a hint: a call just failed with UNAVAILABLE
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._probe_now.wait(), delay - spacing)
            self._probe_now.clear()
            try:
                await stub.Check(request, timeout=timeout)  # type: ignore[attr-defined]  # stubs: HealthStub has no methods
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._set_live(False, f"no health answer within {timeout:g} s")
                    # Every time, not only on the first miss: whatever is still in flight
                    # on a process that does not answer will not finish.
                    failed = self.calls.fail_all("upstream stopped answering")
                    if failed:
                        log_event(
                            log,
                            "upstream_calls_failed",
                            level=logging.WARNING,
                            address=self.address,
                            calls=failed,
                        )
                    continue
                if code is grpc.StatusCode.UNAVAILABLE:
                    self._set_live(False, "unreachable")
                    continue
            self._set_live(True, "answered")


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
        proxy's readiness follows (server/health.py)."""
        return sum(1 for ep in self.endpoints.values() if ep.healthy)

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
