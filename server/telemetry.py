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

import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from py_grpc_prometheus import client_metrics, server_metrics

from interceptors.breaker import BreakerState
from server.config import Settings, TracingSettings, parse_hostport
from server.logs import log_event

log = logging.getLogger("aiproxy.telemetry")

# Distinct `model` label values before further models are reported as "other".
MAX_MODELS = 32
OTHER_MODEL = "other"

# Seconds; the first chunk alert is at 1 s, the chunk interval alert at 200 ms.
FIRST_CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
CHUNK_INTERVAL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_LEGACY_SERVER = ("legacy_grpc_server_handled_latency_seconds",)
_LEGACY_CLIENT = (
    "legacy_grpc_client_completed_counter",
    "legacy_grpc_client_completed_latency_seconds_histogram",
    "grpc_client_stream_recv_histogram",
    "grpc_client_stream_send_histogram",
)


class GrpcServerMetrics:
    """py-grpc-prometheus's server metrics, in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        m = server_metrics.init_metrics(registry)
        for name in _LEGACY_SERVER:
            registry.unregister(m.pop(name))
        self.started: Counter = m["grpc_server_started_counter"]
        self.msg_received: Counter = m["grpc_server_stream_msg_received"]
        self.msg_sent: Counter = m["grpc_server_stream_msg_sent"]
        self.handling_seconds: Histogram = m["grpc_server_handled_histogram"]
        self.handled: Counter = server_metrics.get_grpc_server_handled_counter(False, registry)


class GrpcClientMetrics:
    """py-grpc-prometheus's client metrics, in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        m = client_metrics.init_metrics(registry)
        for name in _LEGACY_CLIENT:
            registry.unregister(m.pop(name))
        self.started: Counter = m["grpc_client_started_counter"]
        self.handled: Counter = m["grpc_client_handled_counter"]
        self.msg_received: Counter = m["grpc_client_stream_msg_received"]
        self.msg_sent: Counter = m["grpc_client_stream_msg_sent"]
        self.handling_seconds: Histogram = m["grpc_client_handled_histogram"]


class ProxyMetrics:
    """The proxy's own metrics (`ai_proxy_*`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "ai_proxy_requests_total",
            "Calls to the AI API, by method and final gRPC status.",
            ["method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "ai_proxy_request_duration_seconds",
            "Whole-call duration (streams: until the last chunk or the error), by method.",
            ["method"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.rate_limit_rejections = Counter(
            "ai_proxy_rate_limit_rejections_total",
            "Calls refused by admission control (reason RATE_LIMITED, CONCURRENCY_LIMITED or "
            "OVERLOADED); source is proxy when the proxy's limiter refused the call before any "
            "upstream attempt, upstream when an upstream said it was rate limited.",
            ["method", "reason", "source"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "ai_proxy_circuit_breaker_state",
            "Circuit breaker state per upstream endpoint: 0 closed, 1 half-open, 2 open.",
            ["upstream"],
            registry=registry,
        )
        self.upstream_healthy = Gauge(
            "ai_proxy_upstream_healthy",
            "1 while the upstream endpoint reports SERVING on grpc.health.v1 and answers the liveness probe, else 0.",
            ["upstream"],
            registry=registry,
        )
        self.upstream_usable = Gauge(
            "ai_proxy_upstream_usable",
            "1 while new calls may go to the endpoint (healthy and breaker not open).",
            ["upstream"],
            registry=registry,
        )
        self.retries = Counter(
            "ai_proxy_upstream_retries_total",
            "Upstream attempts beyond the first, by method.",
            ["method"],
            registry=registry,
        )
        self.active_streams = Gauge(
            "ai_proxy_active_streams",
            "Server streams open to callers now, by method.",
            ["method"],
            registry=registry,
        )
        self.stream_chunks = Counter(
            "ai_proxy_stream_chunks_sent_total",
            "Chunks sent to callers on server streams (heartbeats and in-band errors included).",
            ["method"],
            registry=registry,
        )
        self.first_chunk = Histogram(
            "ai_proxy_stream_first_chunk_seconds",
            "Time from the start of a call to its first chunk reaching the caller.",
            ["method"],
            buckets=FIRST_CHUNK_BUCKETS,
            registry=registry,
        )
        self.chunk_interval = Histogram(
            "ai_proxy_stream_chunk_interval_seconds",
            "Mean interval between chunks of one stream (one observation per stream with "
            "at least two chunks).",
            ["method"],
            buckets=CHUNK_INTERVAL_BUCKETS,
            registry=registry,
        )
        self.chunk_gap_max = Histogram(
            "ai_proxy_stream_chunk_gap_max_seconds",
            "Longest interval between two chunks of one stream (one observation per stream).",
            ["method"],
            buckets=CHUNK_INTERVAL_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "ai_proxy_tokens_total",
            "Tokens reported by the upstream's usage, by model and kind (prompt, completion).",
            ["model", "kind"],
            registry=registry,
        )
        self._models: set[str] = set()
        self._model_lock = threading.Lock()

    def model_label(self, model: str) -> str:
        """`model`, or "other" once MAX_MODELS distinct models have been seen."""
        if model in self._models:
            return model
        with self._model_lock:
            if model in self._models:
                return model
            if len(self._models) >= MAX_MODELS:
                return OTHER_MODEL
            self._models.add(model)
            return model

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        label = self.model_label(model or "unknown")
        if prompt:
            self.tokens.labels(label, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(label, "completion").inc(completion)


class Telemetry:
    """What one proxy process exports: metrics (always), traces (when configured)."""

    def __init__(self, settings: Settings, tracer_provider: Any | None = None) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        self.grpc_server = GrpcServerMetrics(self.registry)
        self.grpc_client = GrpcClientMetrics(self.registry)
        self.proxy = ProxyMetrics(self.registry)
        self.access_log = settings.log.access
        # A provider passed in (tests: an in-memory exporter) wins over the settings.
        self.tracer_provider = tracer_provider if tracer_provider is not None else build_tracer_provider(settings.tracing)
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self.metrics_address: str | None = None
        self._pool_seen: set[str] = set()

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    # -- the scrape endpoint ------------------------------------------------------------

    def start_metrics_server(self) -> str | None:
        """Serve /metrics (prometheus-client's threaded HTTP server: scrapes never run on
        the event loop). Returns the bound HOST:PORT, or None when metrics are disabled."""
        m = self.settings.metrics
        if not m.enabled:
            return None
        host, port = parse_hostport(m.listen)
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http.server_port
        self.metrics_address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        log_event(log, "metrics_listening", address=self.metrics_address, path="/metrics")
        return self.metrics_address

    def stop_metrics_server(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
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
        exporter = ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def untraced_services() -> Sequence[str]:
    """Services whose calls get no spans (probes and tooling, not traffic)."""
    return ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


def server_tracing_interceptor(tracer_provider: Any) -> grpc.aio.ServerInterceptor:
    """opentelemetry-instrumentation-grpc's aio server interceptor: extracts the caller's
    W3C trace context from the metadata and opens the SERVER span, except for health
    checks and reflection."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    skip = filters.any_of(*(filters.service_name(s) for s in untraced_services()))
    return aio_server_interceptor(tracer_provider=tracer_provider, filter_=filters.negate(skip))
