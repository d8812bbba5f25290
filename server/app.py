"""Assembly of the proxy process: gRPC server, the API pipeline, forwarding, pool, health.

Lifecycle: start() brings up the pool (which starts watching upstream health) and the
listener; drain() is the SIGTERM path: NOT_SERVING first, an optional delay for load
balancers to notice, then stop accepting and give calls in flight the grace period
before they are cancelled.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import secrets
import signal
import socket
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from aiproxy.ai.proxy.v1 import admin_service_pb2_grpc as admin_grpc
from aiproxy.core.errors import Reason
from aiproxy.core.limitstore import LimitStore
from aiproxy.core.logs import log_event, print_ready
from aiproxy.core.service import SERVICE_NAME, agent_service
from aiproxy.core.settings import ADMIN_SERVICE_NAME, ServerSettings, Settings, parse_hostport
from aiproxy.interceptors.auth import AuthStage, is_open_method
from aiproxy.interceptors.error_handling import SafeGenericHandler, safe_handler
from aiproxy.interceptors.overload import (
    PROBE_HEADER,
    BacklogLimit,
    CallerIdentity,
    OverloadGate,
)
from aiproxy.server import tls
from aiproxy.server.chain import client_interceptors, pipeline_stages, server_interceptors
from aiproxy.server.pool.backlog import BacklogProbe
from aiproxy.server.pool.pool import UpstreamPool
from aiproxy.server.request.admin import ProxyAdmin
from aiproxy.server.request.caching import (
    AnswerTerminal,
    Caching,
    build_response_cache,
    cache_backend,
)
from aiproxy.server.request.forwarding import Forwarder
from aiproxy.server.request.health import ProxyHealth
from aiproxy.server.request.openai_front import OPENAI_SERVICE_NAME, OpenAIFront
from aiproxy.server.request.pipeline import Pipeline
from aiproxy.server.request.resume import Resumer, build_stream_buffer, resume_backend
from aiproxy.server.stores.limits_backend import close_limit_store, open_limit_store
from aiproxy.server.telemetry import Telemetry

log = logging.getLogger("aiproxy.server")


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    s = settings.server
    return [
        ("grpc.server.max_pending_requests", s.max_pending_requests),
        ("grpc.server.max_pending_requests_hard_limit", s.max_pending_requests * 2),
        ("grpc.max_concurrent_streams", s.max_concurrent_streams_per_connection),
        ("grpc.max_receive_message_length", s.max_receive_message_bytes),
        ("grpc.max_send_message_length", s.max_send_message_bytes),
        # Soft and hard limit equal: past it every call is refused, none at random.
        ("grpc.max_metadata_size", s.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", s.max_metadata_bytes),
        *connection_limit_options(s),
        # Let callers (Envoy, meshes) keep idle connections alive with pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        # Only `--workers N` shares the port; otherwise a second proxy on a taken port
        # must fail instead of silently splitting the traffic.
        ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
    ]


def connection_limit_options(s: ServerSettings) -> list[tuple[str, Any]]:
    """Idle and age limits on callers' connections (0 = no limit: the option is left out)."""
    out: list[tuple[str, Any]] = []
    if s.max_connection_idle_s:
        out.append(("grpc.max_connection_idle_ms", int(s.max_connection_idle_s * 1000)))
    if s.max_connection_age_s:
        out.append(("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)))
        out.append(("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)))
    return out


class _BesideThePipeline:
    """What health, reflection and admin register through: the real server, with each
    method handler in the one error shape (MALFORMED_REQUEST, Status for every error) and,
    when auth is on, admin behind the same credentials (health and reflection stay
    open). They never run the business chain."""

    def __init__(self, server: grpc.aio.Server, auth: AuthStage | None) -> None:
        self._server = server
        self._wrap = None if auth is None else _guard_closed(auth)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(SafeGenericHandler(h, self._wrap) for h in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service,
            {
                name: safe_handler(h, f"/{service}/{name}", self._wrap)
                for name, h in handlers.items()
            },
        )

    def as_server(self) -> grpc.aio.Server:
        """This object, typed as what the generated `add_*_to_server` functions take
        (they call only the two methods above)."""
        return cast("grpc.aio.Server", self)


def _guard_closed(auth: AuthStage) -> Any:
    def wrap(path: str, behavior: Any, streaming: bool) -> Any:
        return behavior if is_open_method(path) else auth.guard(path, behavior, streaming)

    return wrap


class ProxyServer:
    def __init__(
        self,
        settings: Settings,
        *,
        telemetry: Telemetry | None = None,
        limit_store: LimitStore | None = None,
    ) -> None:
        self.settings = settings
        # Where the limits keep per-caller state (None: in this process).
        self.limit_store = limit_store
        # Metrics registry, scrape endpoint, tracer provider (tests may pass their own).
        self.telemetry = telemetry if telemetry is not None else Telemetry(settings)
        self.pool = UpstreamPool(
            settings.upstream,
            breaker_settings=settings.breaker,
            client_interceptors=client_interceptors(
                self.telemetry, settings.upstream.extra_interceptors
            ),
            client_metrics=self.telemetry.grpc_client,
            credentials=tls.channel_credentials(settings.tls.upstream),
            extra_channel_options=tls.channel_options(
                settings.tls.upstream, settings.upstream.endpoints
            ),
        )
        self.telemetry.watch_pool(self.pool)
        self.health = ProxyHealth(self.pool)
        self.forwarder = Forwarder(self.pool, settings)
        self._server: grpc.aio.Server | None = None
        self._backlog_limit: BacklogLimit | None = None
        self.gate: OverloadGate | None = None
        self._background: list[asyncio.Task[None]] = []
        self.port: int | None = None
        self._probe_port: int | None = None
        # Resumable streams and the response cache (opened in start, closed in drain).
        self.resumer: Resumer | None = None
        self.caching: Caching | None = None

    def _gate(self) -> OverloadGate | None:
        """The overload gate, first in the pipeline (interceptors/overload.py), when a
        capacity is set; whom it refuses is overload.* (core/shedding.py)."""
        capacity = self.settings.server.max_active_calls
        if not capacity:
            return None
        metrics = self.telemetry.proxy
        rejections = metrics.rate_limit_rejections
        requests = metrics.requests
        shed = metrics.overload_refusals
        # Label children made on a method's first refusal (a series only once it
        # counts something), then reused.
        children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}

        def count(path: str, cause: str, cls: str) -> None:
            labels = (path, cause, cls)
            trio = children.get(labels)
            if trio is None:
                name = path.rsplit("/", 1)[-1]
                trio = children[labels] = (
                    rejections.labels(name, Reason.OVERLOADED.value, "proxy"),
                    requests.labels(name, "RESOURCE_EXHAUSTED"),
                    shed.labels(name, cause, cls),
                )
            for child in trio:
                child.inc()

        forwarder = self.forwarder
        s = self.settings.server
        o = self.settings.overload
        fair = o.policy == "fair"
        top = max(1, round(capacity * (1 - o.reserve))) if fair else capacity
        # The probe calls the plaintext listener; with TLS the gate keeps its fixed limit.
        if s.overload_wait_target_ms and not self.settings.tls.server.enabled:
            self._backlog_limit = BacklogLimit(
                top, s.overload_min_active_calls, s.overload_wait_target_ms / 1000
            )
        limits = self.settings.limits
        secret = limits.edge_secret.get_secret_value() if limits.edge_secret else ""
        identity = CallerIdentity(
            address_header=limits.client_address_header,
            trusted_edges=tuple(
                ipaddress.ip_network(net, strict=False) for net in limits.trusted_edges
            ),
            edge_secret=secret.encode(),
            api_keys={k.key_hash: k.name for k in self.settings.auth.api_keys}
            if self.settings.auth.active
            else {},
            caller_classes=dict(o.callers),
        )
        gate = OverloadGate(
            active=lambda: forwarder.active,
            capacity=capacity,
            on_reject=count,
            backlog_limit=self._backlog_limit,
            policy=o.policy,
            reserve=o.reserve,
            identity=identity,
            classes={c.name: c.sheds_at for c in o.classes},
            method_classes=dict(o.methods),
            refuse_doomed_streams=o.refuse_doomed_streams,
            probe_token=secrets.token_hex(16),
            min_share=o.min_share,
            share_wait_s=o.share_wait_ms / 1000,
            distress_s=o.distress_wait_ms / 1000,
            gap_factor=o.gap_factor,
            gap_grace_s=o.gap_grace_ms / 1000,
        )
        metrics.overload_limit.set_function(gate.limit)
        metrics.overload_in_flight.set_function(lambda: gate.shedder.in_flight)
        metrics.first_chunk_estimate.set_function(gate.first_chunk.p90)
        metrics.stream_lateness.set_function(lambda: gate.late_s)
        self.gate = gate
        return gate

    def _terminal(self) -> AnswerTerminal:
        """The forwarder behind the response cache and resumable streams (server/request/caching.py,
        server/request/resume.py); both on the backend their settings name (memory, or the shared
        Redis of `redis.url`). Building them connects nothing: Redis is reached on first use,
        and a Redis that is away costs a miss (cache) or an unresumable stream, never a call."""
        s = self.settings
        metrics = self.telemetry.proxy
        self.resumer = Resumer(
            build_stream_buffer(s),
            s.stream.resume,
            replica_id=f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}",
            queue_chunks=s.stream.buffer_chunks,
            metrics=metrics,
        )
        if s.cache.enabled:
            self.caching = Caching(build_response_cache(s), s.cache, metrics)
        log_event(
            log,
            "answers_backends",
            stream_buffer=resume_backend(s),
            cache=cache_backend(s) if s.cache.enabled else "off",
        )
        return AnswerTerminal(self.forwarder, self.caching, self.resumer)

    def _start_backlog_probe(self) -> None:
        limit, gate = self._backlog_limit, self.gate
        if limit is None or gate is None:
            return
        forwarder = self.forwarder
        # Each API method has its own queue in grpc-core (registered methods): the probe
        # measures the wait of every method that is taking calls, the gate follows the
        # longest (server/pool/backlog.py).
        probe = BacklogProbe(
            f"127.0.0.1:{self._probe_port}",
            paths=tuple(gate.taken),
            taken=gate.taken,
            metadata=((PROBE_HEADER, gate.probe_token),),
            idle=gate.next_call,
            in_flight=lambda: max(forwarder.active, gate.shedder.in_flight),
        )
        gate.queue_wait = probe.wait
        self.telemetry.proxy.queue_wait.set_function(probe.delay)
        self._background = [
            asyncio.create_task(probe.run(), name="backlog-probe"),
            # What callers feel: the longest queue wait, how far streams' recent first
            # chunks are above their usual (interceptors/overload.FirstChunkEstimate), or
            # how late streams in flight are by their own cadence (stream_lateness).
            asyncio.create_task(
                limit.run(
                    lambda: max(probe.delay(), gate.first_chunk.excess(), gate.stream_lateness()),
                    lambda: max(forwarder.active, gate.shedder.in_flight),
                    gate.next_call,
                ),
                name="backlog-limit",
            ),
        ]

    @property
    def address(self) -> str:
        host, _ = parse_hostport(self.settings.server.listen)
        return f"{host}:{self.port}" if ":" not in host else f"[{host}]:{self.port}"

    async def start(self) -> int:
        await self.pool.start()
        await self.health.start()
        # Usually an upstream reports SERVING within milliseconds; waiting for it means
        # the first calls after start-up do not fail. Health stays honest either way.
        if not await self.pool.wait_usable(self.settings.upstream.startup_wait_s):
            log_event(
                log,
                "no_usable_upstream_at_start",
                level=logging.WARNING,
                endpoints=self.settings.upstream.endpoints,
            )
        self.telemetry.start_metrics_server()
        # API calls run no grpc.aio interceptor: the pipeline is their one handler. The
        # OpenTelemetry server interceptor (tracing on, opt-in) and the deployment's own
        # (server.extra_interceptors) are the only ones (server/chain.py says where).
        server = grpc.aio.server(
            interceptors=server_interceptors(self.settings, self.telemetry),
            options=server_options(self.settings),
        )
        if self.limit_store is None and self.settings.limits.enabled:
            # memory: this process's own state; redis: shared by every worker and replica
            # (limits.backend). A Redis that is down at start-up leaves the store degraded
            # under limits.failure_policy; it recovers by itself.
            self.limit_store = await open_limit_store(self.settings, self.telemetry.proxy)
        stages = pipeline_stages(self.settings, self.telemetry, limit_store=self.limit_store)
        pipeline = Pipeline(agent_service(), stages, self._terminal(), self._gate())
        pipeline.register(server)
        auth = next((s for s in stages if isinstance(s, AuthStage)), None)
        if self.settings.openai.enabled:
            # The OpenAI-compatible API: a front on the same Chat / StreamChat handlers.
            OpenAIFront(
                pipeline,
                self.settings.openai,
                auth.authenticator.authenticate if auth is not None else None,
            ).register(server)
        beside = _BesideThePipeline(server, auth).as_server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, beside)
        # Untyped: protoc's generated *_pb2_grpc.py, and the grpcio-reflection stubs'
        # declaration of it.
        resumer = self.resumer
        admin = ProxyAdmin(
            self.pool,
            settings=self.settings,
            metrics=self.telemetry.proxy,
            serving=lambda: self.health.serving,
            active_calls=lambda: self.forwarder.active,
            resumable=lambda: (0, 0) if resumer is None else (resumer.generating, resumer.detached),
        )
        admin_grpc.add_ProxyAdminServiceServicer_to_server(admin, beside)  # type: ignore[no-untyped-call]
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
            reflection.aio.ReflectionServicer(
                (
                    SERVICE_NAME,
                    OPENAI_SERVICE_NAME,
                    ADMIN_SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                )
            ),
            beside,
        )
        if self.telemetry.access_writer is not None:
            self.telemetry.access_writer.start()
        credentials = tls.server_credentials(self.settings.tls.server)
        if credentials is None:
            self.port = server.add_insecure_port(self.settings.server.listen)
        else:
            self.port = server.add_secure_port(self.settings.server.listen, credentials)
        if not self.port:
            raise OSError(f"cannot listen on {self.settings.server.listen}")
        if self._backlog_limit is not None:
            # The backlog probe's own loopback port: the same server, so the same
            # per-method queues, but a port no other process shares. With --workers N the
            # public port is shared (SO_REUSEPORT): a probe sent there could be taken by
            # another worker, which does not know this one's token and would count it as
            # a call (and measure its own queue, not this one's).
            self._probe_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        self._start_backlog_probe()
        # The admin overview's rates: counters sampled once a second while they move, asleep
        # until the next call when they do not (server/request/admin.py).
        gate, forwarder = self.gate, self.forwarder
        sampling = (
            admin.sampler.run(gate.next_call, lambda: max(forwarder.active, gate.shedder.in_flight))
            if gate is not None
            else admin.sampler.run()
        )
        self._background.append(asyncio.create_task(sampling, name="admin-sampler"))
        log_event(
            log,
            "proxy_started",
            address=self.address,
            upstreams=self.settings.upstream.endpoints,
            tls="mtls"
            if self.settings.tls.server.client_ca_file
            else "tls"
            if credentials
            else "plaintext",
            upstream_tls=self.settings.tls.upstream.active,
            auth=self.settings.auth.active,
        )
        return self.port

    async def drain(self, grace_s: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, drain delay, stop accepting, grace, cancel.

        With a drain delay, calls keep being accepted while balancers notice the
        NOT_SERVING. Without one, the listener stops accepting first, so nobody who has
        seen NOT_SERVING can still get a new call in.
        """
        grace = self.settings.server.grace_period_s if grace_s is None else grace_s
        delay = self.settings.server.drain_delay_s
        log_event(log, "proxy_draining", grace_s=grace, drain_delay_s=delay)
        stopping: asyncio.Task[None] | None = None
        if self._server is not None and not delay:
            stopping = asyncio.create_task(self._server.stop(grace))
            await asyncio.sleep(0)  # let stop() begin: new calls are refused from here
        await self.health.drain()
        if delay:
            await asyncio.sleep(delay)
        if self._server is not None:
            # stop(grace) refuses new calls at once; the forwarded calls get the grace
            # period, but long-lived health Watch streams must not hold the exit, so
            # once the forwarded calls are done stop(0) cancels whatever is left.
            if stopping is None:
                stopping = asyncio.create_task(self._server.stop(grace))
            try:
                await asyncio.wait_for(self.forwarder.wait_idle(), timeout=grace)
            except TimeoutError:
                log_event(log, "proxy_grace_expired", cancelled=self.forwarder.active)
            await self._server.stop(0)
            await stopping
        for task in self._background:
            task.cancel()
        if self._background:
            await asyncio.wait(self._background)
        if self.resumer is not None:
            await self.resumer.aclose()  # owners in their grace are cancelled now
        if self.caching is not None and self.caching.cache.l2 is not None:
            await self.caching.cache.l2.aclose()
        await self.pool.close()
        await close_limit_store(self.limit_store)
        self.telemetry.shutdown()
        if self.telemetry.access_writer is not None:
            self.telemetry.access_writer.stop()  # writes the access lines still queued
        log_event(log, "proxy_stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a process that holds thousands of streams.

    With thousands of open streams the heap holds hundreds of thousands of live objects,
    and CPython's default thresholds (700, 10, 10) re-scan them over and over: py-spy
    measured 18-20 % of the proxy's busy CPU in the collector at 3-5k open streams, about
    1 % with these settings (bench/REPORT.md). Start-up objects (modules, descriptors,
    settings) are frozen out of collection altogether; cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


# The safety net for garbage the tuned thresholds leave behind: every GC_CHECK_S, a full
# collection if at least GC_FULL_AFTER collections of generation 1 ran since the last one.
GC_CHECK_S = 10.0
GC_FULL_AFTER = 10


async def collect_garbage_periodically(
    check_s: float = GC_CHECK_S, full_after: int = GC_FULL_AFTER
) -> None:
    """With tune_gc's thresholds a full collection waits for 100 collections of generation 1,
    i.e. tens of millions of allocations: garbage in reference cycles (what a storm of
    cancelled calls leaves: exceptions, tracebacks, frames, call state) can pile up
    for a long time meanwhile (measured: RSS 127 -> 244 MiB after seven storms of 1000
    cancelled streams). The proxy breaks those cycles where it makes them
    (error_handling, streaming, forwarding); this bounds what the rest (grpc's and
    asyncio's own) can hold, at the cost of one full collection per `check_s` at most,
    and only after heavy allocation."""
    while True:
        await asyncio.sleep(check_s)
        if gc.get_count()[2] >= full_after:
            gc.collect()


async def run_proxy(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain. Prints the ready line once listening."""
    proxy = ProxyServer(settings)
    await proxy.start()
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    extra = (
        {"metrics_address": proxy.telemetry.metrics_address}
        if proxy.telemetry.metrics_address
        else {}
    )
    print_ready("proxy", proxy.address, **extra)
    collector = asyncio.create_task(collect_garbage_periodically(), name="gc-safety-net")
    await stop.wait()
    collector.cancel()
    await proxy.drain()
