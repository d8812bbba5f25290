"""OpenTelemetry for the reference agent: a SERVER span per call that continues the
caller's W3C trace context (the proxy's client span), so one trace spans
caller -> proxy -> agent.

The agent is its own service, so it builds its own tracer provider here instead of
importing the proxy's. Exporters: none (default), console (one JSON line per span on
stderr; stdout is for the ready line), otlp (OTLP/gRPC).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

EXPORTERS = ("none", "console", "otlp")
DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:4317"
SERVICE_NAME = "aiproxy-agent"

# Probes and tooling are not traffic: no spans for them.
_UNTRACED = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


def build_tracer_provider(exporter: str, otlp_endpoint: str = DEFAULT_OTLP_ENDPOINT) -> Any | None:
    if exporter == "none":
        return None
    if exporter not in EXPORTERS:
        raise ValueError(f"trace exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME_KEY: SERVICE_NAME}))
    span_exporter: Any
    if exporter == "console":
        span_exporter = ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(
            endpoint=otlp_endpoint, insecure=otlp_endpoint.startswith("http://")
        )
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider


def server_interceptors(tracer_provider: Any) -> list[grpc.aio.ServerInterceptor]:
    """opentelemetry-instrumentation-grpc's aio server interceptor (probes excluded), then
    the adapter its streaming wrapper needs in front of agent.interceptor.CallInterceptor.
    These go first (outermost), so spans cover fault injection and the call log too."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    skip = filters.any_of(*(filters.service_name(s) for s in _UNTRACED))
    return [
        aio_server_interceptor(tracer_provider=tracer_provider, filter_=filters.negate(skip)),
        StreamAsGenerator(),
    ]


class StreamAsGenerator(grpc.aio.ServerInterceptor):
    """Presents every server-streaming handler as an async generator.

    The instrumentation's streaming wrapper runs `async for` over the handler's result, but
    the agent's CallInterceptor writes chunks with `context.write` and returns None (a
    coroutine, not a generator). Awaiting it inside an empty async generator keeps the
    writes as they are and gives the instrumentation something to iterate.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_stream is None:
            return handler
        behavior = handler.unary_stream

        async def as_generator(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                async for item in result:
                    yield item

        return grpc.unary_stream_rpc_method_handler(
            as_generator,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
