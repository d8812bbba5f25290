"""The metric families every layer records into: py-grpc-prometheus's standard gRPC
series and the proxy's own `ai_proxy_*` series, each registered in a registry the caller
owns (server/telemetry.py makes one per process; tests make their own).

Label values are bounded: method names come from the service descriptor, codes and
reasons from enums, upstreams from the configured pool, models from upstream answers
(capped at MAX_MODELS distinct values, the rest is "other"). No request or caller ids.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from py_grpc_prometheus import client_metrics, server_metrics

if TYPE_CHECKING:
    from aiproxy.core.accesslog import AccessLogWriter

# Distinct `model` label values before further models are reported as "other".
MAX_MODELS = 32
OTHER_MODEL = "other"

# Seconds; the first chunk alert is at 1 s, the chunk interval alert at 200 ms.
FIRST_CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
CHUNK_INTERVAL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

# The OpenTelemetry GenAI semantic conventions' bucket boundaries (semantic-conventions
# docs/gen-ai/gen-ai-metrics.md, "ExplicitBucketBoundaries").
GEN_AI_TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
GEN_AI_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
GEN_AI_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
GEN_AI_TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip

# gen_ai.operation.name per AgentService method: the spec's well-known values where one
# applies (text_completion, chat, invoke_agent); RAG search is "retrieval" (a custom value,
# which the spec allows when none applies).
GEN_AI_OPERATIONS = {
    "Generate": "text_completion",
    "StreamGenerate": "text_completion",
    "BatchGenerate": "text_completion",
    "StreamRagGenerate": "text_completion",
    "Chat": "chat",
    "StreamChat": "chat",
    "SearchRag": "retrieval",
    "ExecuteAgent": "invoke_agent",
    "StreamExecuteAgent": "invoke_agent",
}

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


class GenAiMetrics:
    """The OpenTelemetry GenAI semantic conventions' instruments, named for Prometheus as
    the OpenTelemetry Prometheus compatibility spec says: dots become underscores, a unit
    in curly braces (`{token}`) adds no suffix, `s` adds `_seconds`; histograms add
    `_bucket`/`_sum`/`_count`. Attributes become labels the same way (`gen_ai.operation.name`
    -> `gen_ai_operation_name`, `error.type` -> `error_type`, empty when the call succeeded).

      gen_ai.client.token.usage            {token} gen_ai_client_token_usage
      gen_ai.server.request.duration       s       gen_ai_server_request_duration_seconds
      gen_ai.server.time_to_first_token    s       gen_ai_server_time_to_first_token_seconds
      gen_ai.server.time_per_output_token  s       gen_ai_server_time_per_output_token_seconds
    """

    def __init__(self, registry: CollectorRegistry, provider: str) -> None:
        self.provider = provider
        common = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Number of input and output tokens used (gen_ai.client.token.usage, {token}), per "
            "call the upstream answered with usage; cache hits and resumes consumed none.",
            [*common, "gen_ai_token_type"],
            buckets=GEN_AI_TOKEN_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Generative AI server request duration, to the last output chunk "
            "(gen_ai.server.request.duration, s); error_type is the gRPC status of a failed call.",
            [*common, "error_type"],
            buckets=GEN_AI_DURATION_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to generate the first token for successful responses: the first chunk of a "
            "stream (gen_ai.server.time_to_first_token, s).",
            common,
            buckets=GEN_AI_TTFT_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token generated after the first token for successful streams: "
            "(duration - time to first token) / (output tokens - 1) "
            "(gen_ai.server.time_per_output_token, s).",
            common,
            buckets=GEN_AI_TPOT_BUCKETS,
            registry=registry,
        )


class ProxyMetrics:
    """The proxy's own metrics (`ai_proxy_*`), and the GenAI conventions' (`gen_ai`)."""

    def __init__(self, registry: CollectorRegistry, gen_ai_provider: str = "aiproxy.agent") -> None:
        self.gen_ai = GenAiMetrics(registry, gen_ai_provider)
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
        self.overload_refusals = Counter(
            "ai_proxy_overload_refusals_total",
            "Calls the overload gate refused, by method, cause (over_share: past the limit and "
            "holding its fair share or more; queue: past the limit while the method's queue is "
            "long; full: at server.max_active_calls; deadline: its "
            "deadline ends before a first chunk could come; limit: the blind policy) and the "
            "caller's class (overload.classes).",
            ["method", "cause", "caller_class"],
            registry=registry,
        )
        self.overload_limit = Gauge(
            "ai_proxy_overload_limit",
            "The overload gate's current limit of calls in flight (past it, only callers under "
            "their fair share are admitted, up to server.max_active_calls).",
            registry=registry,
        )
        self.overload_in_flight = Gauge(
            "ai_proxy_overload_in_flight",
            "Calls the overload gate admitted that have not ended.",
            registry=registry,
        )
        self.queue_wait = Gauge(
            "ai_proxy_queue_wait_seconds",
            "How long a new call waits before the proxy's gRPC server takes it (the longest "
            "of the probed methods' queues).",
            registry=registry,
        )
        self.stream_lateness = Gauge(
            "ai_proxy_overload_stream_lateness_seconds",
            "How late admitted streams in flight are by their own cadence (p90 of a sample; "
            "0: on time); past server.overload_wait_target_ms the gate's limit drops.",
            registry=registry,
        )
        self.first_chunk_estimate = Gauge(
            "ai_proxy_overload_first_chunk_seconds",
            "The gate's estimate of time to first chunk (p90 of recent admitted streams, "
            "from the gate); streams whose deadline is shorter are refused at the door.",
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
        self.affinity = Counter(
            "ai_proxy_affinity_total",
            "Calls with an affinity key (a session id or x-aiproxy-affinity), by method and "
            "where the pool sent them: hit (the key's replica), spill (its replica was at "
            "the load bound: the key's next choice under it), failover (its replica is not "
            "usable, or failed this call already: the key's next choice).",
            ["method", "outcome"],
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
        self.limits_backend_up = Gauge(
            "ai_proxy_limits_backend_up",
            "1 while the limits backend answers (memory: always), 0 while it is degraded and "
            "limits.failure_policy applies; backend is memory or redis.",
            ["backend"],
            registry=registry,
        )
        self.limits_backend_transitions = Counter(
            "ai_proxy_limits_backend_transitions_total",
            "Changes of the limits backend's state, by backend and the state entered "
            "(healthy or degraded).",
            ["backend", "state"],
            registry=registry,
        )
        self.stream_resumes = Counter(
            "ai_proxy_stream_resumes_total",
            "Resume requests of resumable streams, by method and outcome (resumed, "
            "not_found, expired, finished, origin_lost: the generating replica died; also "
            "counted when it ends a resume counted as resumed).",
            ["method", "outcome"],
            registry=registry,
        )
        self.streams_stopped = Counter(
            "ai_proxy_resumable_streams_stopped_total",
            "Upstream generations of resumable streams stopped before their end, by why "
            "(abandoned: the caller dropped and nobody resumed within the grace; "
            "cancel_requested: a caller cancelled on purpose; evicted: past the bound on "
            "generations without their caller; shutdown).",
            ["method", "why"],
            registry=registry,
        )
        self.cache_requests = Counter(
            "ai_proxy_cache_requests_total",
            "Calls that used the response cache, by method and outcome (hit, shared: joined "
            "an identical call in flight, miss, bypass: no-store / no-cache).",
            ["method", "outcome"],
            registry=registry,
        )
        self.discovery_up = Gauge(
            "ai_proxy_discovery_up",
            "1 while a dynamic discovery source (consul://..., dns://NAME:PORT) answers, 0 "
            "while it fails and the pool keeps its last known endpoints.",
            ["source"],
            registry=registry,
        )
        self.discovery_errors = Counter(
            "ai_proxy_discovery_errors_total",
            "Failed queries or resolutions of a discovery source (the last known endpoints "
            "were kept).",
            ["source"],
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


def untraced_services() -> Sequence[str]:
    """Services whose calls get no spans (probes and tooling, not traffic)."""
    return (
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    )


class CallTelemetry(Protocol):
    """What the server-side observability needs of a process's telemetry (server/telemetry.py's
    Telemetry is one)."""

    grpc_server: GrpcServerMetrics
    proxy: ProxyMetrics
    access_log: bool
    # Where the access lines go when a server runs (None: through the logger itself).
    access_writer: AccessLogWriter | None

    @property
    def tracing(self) -> bool: ...
