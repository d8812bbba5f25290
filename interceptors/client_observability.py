"""The upstream calls' metrics and tracing.

- `ClientMetrics` drives py-grpc-prometheus's grpc_client_* series (see
  server/telemetry.py): started, handled{grpc_code}, handling seconds (streams: until
  the stream ends), messages sent and received. The upstream call itself
  (server/pool/) calls it, not a grpc.aio client interceptor: that machinery
  cost more CPU per call than the metrics.
- `client_tracing_interceptors` (opt-in) are opentelemetry-instrumentation-grpc's aio client
  interceptors: a CLIENT span per upstream attempt, the W3C `traceparent` injected into
  the outgoing metadata (replacing the caller's, which the proxy's server span already
  continued). A request hook adds the attempt's endpoint and number from CallInfo.

The tracing interceptors are the only interceptors on the endpoints' channels.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import grpc

from aiproxy.core.callinfo import current_call
from aiproxy.core.metrics import GrpcClientMetrics, untraced_services


class ClientMethod:
    """One upstream method's grpc_client_* label children, resolved once."""

    __slots__ = (
        "handled_children",
        "handled_parent",
        "handling",
        "labels",
        "received",
        "sent",
        "started",
    )

    def __init__(self, metrics: GrpcClientMetrics, path: str, grpc_type: str) -> None:
        service, _, name = path.lstrip("/").partition("/")
        self.labels = (grpc_type, service, name)
        self.started = metrics.started.labels(*self.labels)
        self.handling = metrics.handling_seconds.labels(*self.labels)
        self.sent = metrics.msg_sent.labels(*self.labels)
        self.received = metrics.msg_received.labels(*self.labels)
        self.handled_parent = metrics.handled
        self.handled_children: dict[grpc.StatusCode, Any] = {}

    def begin(self) -> float:
        """A call (and its one request message) is sent; returns its start time."""
        self.started.inc()
        self.sent.inc()
        return monotonic()

    def finish(self, code: grpc.StatusCode, start: float) -> None:
        """The call ended with `code` (CANCELLED: cancelled on our side)."""
        child = self.handled_children.get(code)
        if child is None:
            child = self.handled_children[code] = self.handled_parent.labels(
                *self.labels, code.name
            )
        child.inc()
        self.handling.observe(monotonic() - start)


class ClientMetrics:
    """Label children per (method, type), resolved on a method's first call."""

    def __init__(self, metrics: GrpcClientMetrics) -> None:
        self._metrics = metrics
        self._methods: dict[tuple[str, bool], ClientMethod] = {}

    def method(self, path: str, streaming: bool) -> ClientMethod:
        m = self._methods.get((path, streaming))
        if m is None:
            grpc_type = "SERVER_STREAMING" if streaming else "UNARY"
            m = self._methods[(path, streaming)] = ClientMethod(self._metrics, path, grpc_type)
        return m


def _request_hook(span: Any, request: Any) -> None:
    """Attributes of this upstream attempt, from the call being forwarded."""
    if not span.is_recording():
        return
    call = current_call.get()
    if call is None:
        return
    span.set_attribute("aiproxy.request_id", call.request_id)
    if call.upstream:
        host, _, port = call.upstream.rpartition(":")
        span.set_attribute("aiproxy.upstream", call.upstream)
        span.set_attribute("server.address", host.strip("[]"))
        if port.isdigit():
            span.set_attribute("server.port", int(port))
    span.set_attribute("aiproxy.attempt", call.attempts)
    model = getattr(request, "model", "")
    if isinstance(model, str) and model:
        span.set_attribute("gen_ai.request.model", model)


def client_tracing_interceptors(tracer_provider: Any) -> list[grpc.aio.ClientInterceptor]:
    """opentelemetry-instrumentation-grpc's aio client interceptors, health and reflection
    calls (the pool's Watch streams) excluded."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

    skip = filters.any_of(*(filters.service_name(s) for s in untraced_services()))
    # The instrumentation is untyped.
    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=tracer_provider, filter_=filters.negate(skip), request_hook=_request_hook
    )
    return interceptors
