"""The request pipeline's order and the upstream interceptor chains, built in one place.

An API call crosses ONE handler, built per method at start-up by server/request/pipeline.py
from the stages below (interceptors/stage.py: `bind(method)`, then `enter` in this order
on the way in and `exit` in reverse when the call ends). The order, outermost first, and
why:

  0. OverloadGate               (when a capacity is set) before anything else, on the
                                caller's metadata alone (the request not yet read):
                                refusing must be as cheap as it can be while grpc-core's
                                queue backs up, and it refuses the callers using the
                                most (interceptors/overload.py, core/shedding.py). Not
                                a stage: no CallInfo exists yet.
  1. RequestContext             the request id that every later stage, the access log
                                and the upstream call use (the pipeline has already
                                read the metadata once into CallInfo).
  2. Observability              metrics, span attributes, the access log: its exit runs
                                last, once the pipeline has settled the FINAL status,
                                including the inner stages' refusals and aborts.
  3. AuthStage                  (when auth is on) who the caller is: JWT or API key ->
                                CallInfo.caller / .identity, the identity the limits,
                                the breaker and the logs use. Before the limits, so an
                                authenticated caller is limited by who it is.
  -  DECODE                     the request bytes become the message (a failure is
                                INVALID_ARGUMENT MALFORMED_REQUEST, in one place).
  4. Limits                     admission: proxy-wide cap, the caller's request
                                bucket, open streams and LLM tokens. After decoding,
                                because the token reservation needs the request
                                (max_tokens, the prompt); a malformed request is
                                refused by the decode at the cost of a parse, like an
                                unauthenticated one by auth, and never goes upstream.
                                Before validation, so invalid requests are limited.
  5. Validation                 rejects invalid requests before they cost anything
                                upstream.
  6. DeadlineStage              fixes the effective deadline the upstream call gets;
                                innermost, so the time spent above is already counted.

Error shaping is the pipeline's own frame (server/request/pipeline.py), around all of them: one
place turns exceptions into the Status, never overwrites an abort, and ends a failing
stream with its in-band final chunk.

Real grpc.aio server interceptors, outside all of the above (they run before the handler
is even chosen, for EVERY call: the API, health, reflection, admin), in this order:

  a. OpenTelemetry server        (tracing on) opens the SERVER span from the caller's W3C
     interceptor                 context, so everything below is inside it.
  b. server.extra_interceptors   the deployment's own (server/extensions.py), in the
                                 configured order, the first outermost. They see each
                                 call before the overload gate, with the request as the
                                 handler gets it: API methods take raw bytes as a request
                                 stream (the pipeline decodes), streams are async
                                 generators. A call one of them refuses never reaches
                                 the pipeline: it is not in ai_proxy_requests_total or
                                 the access log, and its abort should use
                                 aiproxy.core.errors.abort_with to be shaped like ours
                                 (google.rpc.Status + ErrorInfo; interceptors/examples/).
                                 They see the overload gate's probes of the listener too
                                 (x-aiproxy-probe), which they should let through.
With neither, the server is built with no interceptor at all: the composed pipeline's
speed is untouched for deployments that add none.

Upstream side: no grpc.aio client interceptors on the endpoints' channels unless
tracing is on (that machinery cost ~115 us of CPU per call). Each upstream
attempt (server/pool/upstream.py `Endpoint.unary` / `.stream`) does, in this order:

  1. the endpoint's circuit breaker   (interceptors/upstream_breaker.py) fail fast
                                      while open, nothing sent; settle each call on its
                                      outcome (streams when they end; cancellation is
                                      no verdict).
  2. client metrics                   (interceptors/client_observability.py) the
                                      grpc_client_* series, counting RPCs actually sent
                                      upstream (a breaker fast-fail sends nothing).
  3. the call, tracked                so that the pool can fail it at once when the
                                      endpoint stops answering (CallsInFlight).
  4. OpenTelemetry client             (tracing on) one CLIENT span per attempt,
     interceptors                     traceparent injected.
  5. upstream.extra_interceptors      the deployment's own grpc.aio ClientInterceptors,
                                      innermost (inside the CLIENT span; metadata they
                                      add is sent), once per attempt, retries included.
                                      Channel interceptors cost ~115 us of CPU per call:
                                      none are installed unless configured.

Retries sit above the channels, in server/request/forwarding.py, because the next attempt must
be free to go to another endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from aiproxy.core.limitpolicy import LimitPolicy
from aiproxy.core.limitstore import LimitStore
from aiproxy.core.metrics import CallTelemetry
from aiproxy.core.service import agent_service
from aiproxy.core.settings import Settings
from aiproxy.interceptors.auth import AuthStage
from aiproxy.interceptors.client_observability import client_tracing_interceptors
from aiproxy.interceptors.deadline import DeadlineLimit, DeadlineStage, EndMargin, MethodDeadlines
from aiproxy.interceptors.limits import Limits
from aiproxy.interceptors.observability import Observability
from aiproxy.interceptors.request_context import RequestContext
from aiproxy.interceptors.stage import DECODE, Step
from aiproxy.interceptors.validation import RequestRules, Validation
from aiproxy.server import extensions
from aiproxy.server.telemetry import Telemetry, server_tracing_interceptor


def client_interceptors(
    telemetry: Telemetry | None = None, extra: Sequence[str] = ()
) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors on each upstream endpoint's channels, outermost first: the
    OpenTelemetry client interceptors when tracing is on, then upstream.extra_interceptors
    (`extra`); none at all by default (see the module doc)."""
    out: list[grpc.aio.ClientInterceptor] = []
    if telemetry is not None and telemetry.tracing:
        out.extend(client_tracing_interceptors(telemetry.tracer_provider))
    out.extend(extensions.client_interceptors(list(extra)))
    return out


def server_interceptors(
    settings: Settings, telemetry: Telemetry | None = None
) -> list[grpc.aio.ServerInterceptor] | None:
    """The grpc.aio server interceptors, outermost first (module doc: a, b), or None when
    there are none (grpc.aio then wraps nothing)."""
    out: list[grpc.aio.ServerInterceptor] = []
    if telemetry is not None and telemetry.tracing:
        out.append(server_tracing_interceptor(telemetry.tracer_provider))
    out.extend(extensions.server_interceptors(settings.server.extra_interceptors))
    return out or None


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


def pipeline_stages(
    settings: Settings,
    telemetry: CallTelemetry | None = None,
    *,
    limit_store: LimitStore | None = None,
) -> list[Step]:
    """The API pipeline's stages, outermost first, with DECODE where the request is
    decoded (see the module doc). `limit_store`: where the limits keep their state
    (default: in this process)."""
    service = agent_service()
    order: list[Step] = [RequestContext()]
    if telemetry is not None:
        order.append(Observability(telemetry))
    if settings.auth.active:
        order.append(AuthStage(settings.auth, tenant_claim=settings.limits.tenant_claim))
    order.append(DECODE)
    if settings.limits.enabled:
        policy = LimitPolicy.from_settings(settings)
        order.append(Limits(settings.limits, limit_store, policy=policy))
    if settings.validation.enabled:
        order.append(Validation(RequestRules(settings.validation).for_service(service.descriptor)))
    order.append(DeadlineStage(method_deadlines(settings)))
    return order
