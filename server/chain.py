"""The interceptor chains, built in one place.

grpc.aio runs server interceptors in list order: the first is the outermost, it sees the
call first and its result last. The order, outermost first, and why:

  1. RequestContextInterceptor  opens CallInfo and the request id that every later
                                interceptor, the access log and the upstream call use.
  2. OpenTelemetry server       (tracing on) continues the caller's W3C trace context and
     interceptor                opens the SERVER span the upstream attempts hang under.
  3. ObservabilityInterceptor   metrics, span attributes, the access log: outside the
                                ErrorInterceptor so it sees the FINAL status, including
                                the inner interceptors' rejections and aborts.
  4. ErrorInterceptor           turns whatever the inner ones raise into the one error
                                shape, including in-band stream errors; everything
                                below it only raises ProxyErrors.
  5. AuthInterceptor            (when auth is on) who the caller is: JWT or API key ->
                                CallInfo.caller, the identity the limits and logs use;
                                health and reflection stay open. Before the limits, so
                                an authenticated caller is limited by who it is.
  6. LimitsInterceptor          admission: proxy-wide cap, the caller's token bucket,
                                the caller's open streams. Before validation, so that a
                                flood of malformed requests is limited like any other.
  7. ValidationInterceptor      rejects malformed requests before they cost anything
                                upstream.
  8. DeadlineInterceptor        fixes the effective deadline the upstream call gets;
                                innermost, so the time spent above is already counted.

Upstream side, per endpoint channel (grpc.aio client interceptors, outermost first):

  1. Breaker{Unary,Stream}Interceptor  that endpoint's circuit breaker: fail fast while
                                open, settle each call (streams when they end).
  2. client metrics             grpc_client_* series, so they count RPCs actually sent
     interceptors               upstream (a breaker fast-fail sends nothing).
  3. OpenTelemetry client       (tracing on) one CLIENT span per attempt, traceparent
     interceptors               injected. Innermost on purpose: the instrumentation ends
                                its unary span from the call's done-callback, and leaves
                                it un-ended when its continuation raises instead (which
                                an inner interceptor that awaits the call, like 1 and 2,
                                or a CircuitOpen fast-fail, would do).

Retries sit above the channels, in server/forwarding.py, because the next attempt must
be free to go to another endpoint.
"""

from __future__ import annotations

import grpc

from core.service import agent_service
from core.settings import Settings
from interceptors.auth import AuthInterceptor
from interceptors.breaker import CircuitBreaker
from interceptors.client_observability import (
    client_metrics_interceptors,
    client_tracing_interceptors,
)
from interceptors.deadline import DeadlineInterceptor, DeadlineLimit, EndMargin, MethodDeadlines
from interceptors.error_handling import ErrorInterceptor
from interceptors.limits import LimitsInterceptor
from interceptors.observability import ObservabilityInterceptor
from interceptors.request_context import RequestContextInterceptor
from interceptors.upstream_breaker import breaker_interceptors
from interceptors.validation import RequestRules, ValidationInterceptor
from server.forwarding import Forwarder
from server.telemetry import Telemetry, server_tracing_interceptor


def client_interceptors(
    breaker: CircuitBreaker | None, telemetry: Telemetry | None = None
) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors on each upstream endpoint's channels, outermost first."""
    chain: list[grpc.aio.ClientInterceptor] = []
    if breaker is not None:
        chain += breaker_interceptors(breaker)
    if telemetry is not None:
        chain.extend(client_metrics_interceptors(telemetry.grpc_client))
        if telemetry.tracing:
            chain.extend(client_tracing_interceptors(telemetry.tracer_provider))
    return chain


def method_deadlines(settings: Settings) -> MethodDeadlines:
    d = settings.deadlines
    return MethodDeadlines.for_service(
        agent_service(),
        unary=DeadlineLimit(d.unary_default_s, d.unary_max_s),
        stream=DeadlineLimit(d.stream_default_s, d.stream_max_s),
        agent=DeadlineLimit(d.agent_default_s, d.agent_max_s),
        overrides={name: DeadlineLimit(o.default_s, o.max_s) for name, o in d.per_method.items()},
        margin=EndMargin(d.end_margin_ratio, d.end_margin_min_s, d.end_margin_max_s),
    )


def server_interceptors(
    settings: Settings, telemetry: Telemetry | None = None
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors on calls into the proxy, outermost first (see the module doc)."""
    service = agent_service()
    paths, streaming = service.paths, service.streaming_paths
    chain: list[grpc.aio.ServerInterceptor] = [RequestContextInterceptor()]
    if telemetry is not None:
        if telemetry.tracing:
            chain.append(server_tracing_interceptor(telemetry.tracer_provider))
        chain.append(ObservabilityInterceptor(telemetry))
    chain.append(ErrorInterceptor(Forwarder.stream_response_classes()))
    if settings.auth.active:
        chain.append(AuthInterceptor(settings.auth))
    if settings.limits.enabled:
        chain.append(LimitsInterceptor(settings.limits, paths, streaming))
    if settings.validation.enabled:
        chain.append(
            ValidationInterceptor(RequestRules(settings.validation).for_service(service.descriptor))
        )
    chain.append(DeadlineInterceptor(method_deadlines(settings)))
    return chain
