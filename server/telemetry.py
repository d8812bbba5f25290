"""Telemetry of one proxy process: its Prometheus registry and metrics, the scrape
endpoint, and the OpenTelemetry tracer provider.

Metrics live in a CollectorRegistry of their own (never prometheus-client's global one),
so two proxies in one process, or a test, never share counters.

- Standard gRPC metrics: the very definitions of py-grpc-prometheus
  (`server_metrics.init_metrics`, `get_grpc_server_handled_counter(legacy=False)`,
  `client_metrics.init_metrics`), registered in our registry. Its interceptors are for sync
  servers only, so interceptors/observability.py and interceptors/client_observability.py
  drive these metrics from grpc.aio. Its legacy series (`grpc_server_handled_latency_seconds`,
  `grpc_client_completed*`, per-message client latency) are unregistered: nothing fills them.
- The proxy's own `ai_proxy_*` metrics, defined in `ProxyMetrics` below.

Label values are bounded: method names come from the service descriptor, codes and
reasons from enums, upstreams from the configured pool, models from upstream answers
(capped at MAX_MODELS distinct values, the rest is "other"). No request or caller ids.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import sys
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, make_wsgi_app

from aiproxy.core.accesslog import AccessLogWriter, access_log
from aiproxy.core.breaker import BreakerState
from aiproxy.core.logs import log_event
from aiproxy.core.metrics import (
    GrpcClientMetrics,
    GrpcServerMetrics,
    ProxyMetrics,
    untraced_services,
)
from aiproxy.core.settings import Settings, TracingSettings, parse_hostport
from aiproxy.interceptors.overload import PROBE_HEADER

log = logging.getLogger("aiproxy.telemetry")


# The metrics server's accept loop looks for a shutdown request this often when nothing
# comes (stop_metrics_server wakes it at once by connecting).
_METRICS_POLL_S = 3600.0


class _MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not logged


class Telemetry:
    """What one proxy process exports: metrics (always), traces (when configured)."""

    def __init__(self, settings: Settings, tracer_provider: Any | None = None) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        self.grpc_server = GrpcServerMetrics(self.registry)
        self.grpc_client = GrpcClientMetrics(self.registry)
        self.proxy = ProxyMetrics(self.registry, settings.metrics.gen_ai_provider_name)
        self.access_log = settings.log.access
        # Started and stopped by the server (server/app.py) with the process's log handlers.
        self.access_writer = AccessLogWriter(access_log) if self.access_log else None
        # A provider passed in (tests: an in-memory exporter) wins over the settings.
        self.tracer_provider = (
            tracer_provider
            if tracer_provider is not None
            else build_tracer_provider(settings.tracing)
        )
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self.metrics_address: str | None = None
        self._pool_seen: set[str] = set()

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    # -- the scrape endpoint ------------------------------------------------------------

    def start_metrics_server(self) -> str | None:
        """Serve /metrics (a threaded WSGI server, as prometheus-client's own: scrapes never
        run on the event loop). Returns the bound HOST:PORT, or None when metrics are
        disabled. Its accept loop sleeps until a scrape comes: prometheus-client's
        start_http_server wakes twice a second to look for a shutdown request, which is
        CPU an idle proxy pays; stop_metrics_server wakes it by connecting instead."""
        m = self.settings.metrics
        if not m.enabled:
            return None
        host, port = parse_hostport(m.listen)
        server_cls = _MetricsServer6 if ":" in host else _MetricsServer
        httpd = make_server(
            host, port, make_wsgi_app(self.registry), server_cls, handler_class=_QuietHandler
        )
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": _METRICS_POLL_S},
            name="aiproxy-metrics",
            daemon=True,
        )
        thread.start()
        self._http, self._http_thread = httpd, thread
        bound = httpd.server_port
        self.metrics_address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        log_event(log, "metrics_listening", address=self.metrics_address, path="/metrics")
        return self.metrics_address

    def stop_metrics_server(self) -> None:
        httpd, thread = self._http, self._http_thread
        if httpd is None:
            return
        # shutdown() waits for the accept loop to look again; a connection wakes it now.
        stopper = threading.Thread(target=httpd.shutdown, daemon=True)
        stopper.start()
        host, _ = parse_hostport(self.metrics_address or "127.0.0.1:0")
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host in ("::", "[::]"):
            host = "::1"
        for _ in range(50):  # bounded: 50 x 0.1 s
            with contextlib.suppress(OSError):
                socket.create_connection((host.strip("[]"), httpd.server_port), timeout=0.5).close()
            stopper.join(0.1)
            if not stopper.is_alive():
                break
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._http = self._http_thread = None

    def shutdown(self) -> None:
        self.stop_metrics_server()
        provider = self.tracer_provider
        if provider is not None and hasattr(provider, "shutdown"):
            provider.shutdown()  # flushes the batch processor

    # -- upstream pool state ------------------------------------------------------------

    def watch_pool(self, pool: Any) -> None:
        """Keep the breaker, health and usable gauges in step with the pool."""
        pool.add_listener(self._pool_changed)
        self._pool_changed(pool)
        pool.discovery.add_status_listener(self._discovery_status)

    def _discovery_status(self, source: str, up: bool) -> None:
        self.proxy.discovery_up.labels(source).set(1 if up else 0)
        if not up:
            self.proxy.discovery_errors.labels(source).inc()

    def _pool_changed(self, pool: Any) -> None:
        pm = self.proxy
        current = set(pool.endpoints)
        for address in self._pool_seen - current:
            for gauge in (pm.breaker_state, pm.upstream_healthy, pm.upstream_usable):
                try:
                    gauge.remove(address)
                except KeyError:
                    pass
        for address, endpoint in pool.endpoints.items():
            # Reading breaker.state may move OPEN -> HALF_OPEN (that is its contract); the
            # pool reads it the same way on every refresh.
            state = endpoint.breaker.state if endpoint.breaker is not None else BreakerState.CLOSED
            pm.breaker_state.labels(address).set(int(state))
            pm.upstream_healthy.labels(address).set(1 if endpoint.healthy else 0)
            pm.upstream_usable.labels(address).set(1 if endpoint.usable else 0)
        self._pool_seen = current


# -- tracing --------------------------------------------------------------------------


def build_tracer_provider(settings: TracingSettings) -> Any | None:
    """A TracerProvider exporting as configured, or None for exporter "none".

    Not installed as the global provider: the interceptors get it explicitly, so a test
    (or an embedding application) keeps its own.
    """
    if settings.exporter == "none":
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: settings.service_name}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    exporter: Any
    if settings.exporter == "console":
        exporter = ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def server_tracing_interceptor(tracer_provider: Any) -> grpc.aio.ServerInterceptor:
    """opentelemetry-instrumentation-grpc's aio server interceptor: extracts the caller's
    W3C trace context from the metadata and opens the SERVER span, except for health
    checks, reflection and the overload gate's queue probe."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    def probe(details: Any) -> bool:
        # The overload gate's own queue probe (server/pool/backlog.py): not a caller's call.
        return any(key == PROBE_HEADER for key, _ in details.invocation_metadata or ())

    skip = filters.any_of(probe, *(filters.service_name(s) for s in untraced_services()))
    # opentelemetry-instrumentation-grpc declares no types for it.
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=tracer_provider, filter_=filters.negate(skip)
    )
    return interceptor
