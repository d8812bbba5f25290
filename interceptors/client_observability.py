"""Client interceptors on each upstream endpoint's channels: metrics and tracing.

- `client_metrics_interceptors` drive py-grpc-prometheus's grpc_client_* series (see
  server/telemetry.py) from grpc.aio: started, handled{grpc_code}, handling seconds
  (streams: until the stream ends), messages sent and received.
- `client_tracing_interceptors` are opentelemetry-instrumentation-grpc's aio client
  interceptors: a CLIENT span per upstream attempt, the W3C `traceparent` injected into
  the outgoing metadata (replacing the caller's, which the proxy's server span already
  continued). A request hook adds the attempt's endpoint and number from CallInfo.

See server/chain.py for where they sit relative to the breaker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from core.callinfo import current_call
from core.metrics import GrpcClientMetrics, untraced_services

OK = grpc.StatusCode.OK
CANCELLED = grpc.StatusCode.CANCELLED


class _ClientMethod:
    __slots__ = (
        "labels",
        "started",
        "handled_parent",
        "handled_children",
        "handling",
        "sent",
        "received",
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

    def finish(self, code: grpc.StatusCode, start: float, loop_time: Callable[[], float]) -> None:
        child = self.handled_children.get(code)
        if child is None:
            child = self.handled_children[code] = self.handled_parent.labels(
                *self.labels, code.name
            )
        child.inc()
        self.handling.observe(loop_time() - start)


def _path(details: Any) -> str:
    method = details.method
    # grpc sometimes hands the method over as bytes (grpc/grpc#31092).
    return method.decode() if isinstance(method, bytes) else method


class _ClientMethods:
    """Label children per (method, type), shared by one endpoint's interceptors."""

    def __init__(self, metrics: GrpcClientMetrics) -> None:
        self._metrics = metrics
        self._methods: dict[tuple[str, str], _ClientMethod] = {}

    def get(self, details: Any, grpc_type: str) -> _ClientMethod:
        path = _path(details)
        m = self._methods.get((path, grpc_type))
        if m is None:
            m = self._methods[(path, grpc_type)] = _ClientMethod(self._metrics, path, grpc_type)
        return m


def client_metrics_interceptors(metrics: GrpcClientMetrics) -> list[grpc.aio.ClientInterceptor]:
    """One interceptor per call type: grpc.aio files an interceptor under the FIRST
    interceptor base class it is an instance of, so one object implementing both
    unary-unary and unary-stream would never see streams."""
    methods = _ClientMethods(metrics)
    return [UnaryClientMetricsInterceptor(methods), StreamClientMetricsInterceptor(methods)]


class UnaryClientMetricsInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, methods: _ClientMethods) -> None:
        self._method = methods.get

    async def intercept_unary_unary(
        self, continuation: Callable, client_call_details: Any, request: Any
    ) -> Any:
        m = self._method(client_call_details, "UNARY")
        clock = asyncio.get_running_loop().time
        m.started.inc()
        m.sent.inc()
        start = clock()
        code = grpc.StatusCode.UNKNOWN
        try:
            call = await continuation(client_call_details, request)
            await call  # the outcome, for handled{grpc_code}; the caller reads it again
            code = OK
            m.received.inc()
            return call
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise
        except asyncio.CancelledError:
            code = CANCELLED
            raise
        finally:
            m.finish(code, start, clock)


class StreamClientMetricsInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, methods: _ClientMethods) -> None:
        self._method = methods.get

    async def intercept_unary_stream(
        self, continuation: Callable, client_call_details: Any, request: Any
    ) -> Any:
        m = self._method(client_call_details, "SERVER_STREAMING")
        clock = asyncio.get_running_loop().time
        m.started.inc()
        m.sent.inc()
        start = clock()
        try:
            call = await continuation(client_call_details, request)
        except grpc.aio.AioRpcError as exc:
            m.finish(exc.code(), start, clock)
            raise
        except asyncio.CancelledError:
            m.finish(CANCELLED, start, clock)
            raise
        return _observe_stream(call, m, start, clock)


async def _observe_stream(
    call: Any, m: _ClientMethod, start: float, clock: Callable[[], float]
) -> AsyncIterator[Any]:
    received = m.received
    code = grpc.StatusCode.UNKNOWN
    try:
        async for response in call:
            received.inc()
            yield response
        code = OK
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        raise
    except (asyncio.CancelledError, GeneratorExit):
        code = CANCELLED
        raise
    finally:
        m.finish(code, start, clock)


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
    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(
        tracer_provider=tracer_provider, filter_=filters.negate(skip), request_hook=_request_hook
    )
    return interceptors
