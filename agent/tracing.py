"""OpenTelemetry for the reference agent: a SERVER span per call that continues the
caller's W3C trace context (the proxy's client span), so one trace spans
caller -> proxy -> agent.

The agent is its own service, so it builds its own tracer provider here instead of
importing the proxy's. Exporters: none (default), console (one JSON line per span on
stderr; stdout is for the ready line), otlp (OTLP/gRPC).
"""

from __future__ import annotations

import sys
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
        span_exporter = ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=otlp_endpoint.startswith("http://"))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider


def server_interceptor(tracer_provider: Any) -> grpc.aio.ServerInterceptor:
    """opentelemetry-instrumentation-grpc's aio server interceptor, probes excluded."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    skip = filters.any_of(*(filters.service_name(s) for s in _UNTRACED))
    return aio_server_interceptor(tracer_provider=tracer_provider, filter_=filters.negate(skip))
