"""One trace spans caller -> proxy -> agent.

Proxy (ProxyServer) and agent (AgentServer) run in this test's event loop, each a real
grpc.aio server on port 0 with its real tracing interceptors, all exporting to one
InMemorySpanExporter, so the spans of the three parties can be joined by trace id and
parent span id. (Separate processes could not share an in-memory exporter.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aiproxy.agent.server import AgentServer, AgentSettings
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from aiproxy.core.settings import load_settings
from aiproxy.server.app import ProxyServer
from aiproxy.server.telemetry import Telemetry
from tests.support.waiting import eventually

SERVICE = "ai.agent.v1.AgentService"
SERVER, CLIENT = trace.SpanKind.SERVER, trace.SpanKind.CLIENT


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


async def start_agent(provider: TracerProvider, enable_faults: bool = False) -> AgentServer:
    agent = AgentServer(
        AgentSettings(
            listen="127.0.0.1:0",
            first_token_delay_ms=0,
            token_delay_ms=1,
            enable_faults=enable_faults,
        ),
        tracer_provider=provider,
    )
    await agent.start()
    return agent


async def start_proxy(provider: TracerProvider, *upstreams: str, **overrides: Any) -> ProxyServer:
    settings = load_settings(
        server={"listen": "127.0.0.1:0", "drain_delay_s": 0},
        upstream={"endpoints": list(upstreams)},
        metrics={"enabled": False},
        **overrides,
    )
    proxy = ProxyServer(settings, telemetry=Telemetry(settings, tracer_provider=provider))
    await proxy.start()
    return proxy


@pytest.fixture
async def stack(provider: TracerProvider) -> AsyncIterator[tuple[AgentServer, ProxyServer]]:
    agent = await start_agent(provider)
    proxy = await start_proxy(provider, agent.address)
    try:
        yield agent, proxy
    finally:
        await proxy.drain(grace_s=1)
        await agent.stop(grace=None)


async def wait_spans(
    exporter: InMemorySpanExporter, done: Callable[[list[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    """Spans end a moment after the caller has its answer: wait (bounded) until `done`."""

    def complete() -> list[ReadableSpan]:
        spans = list(exporter.get_finished_spans())
        assert done(spans), f"spans so far: {[(s.name, s.kind) for s in spans]}"
        return spans

    return await eventually(complete, 10, "the spans to complete", interval=0.01)


def children(
    spans: list[ReadableSpan], parent: ReadableSpan, kind: trace.SpanKind
) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.parent is not None and s.parent.span_id == parent.context.span_id and s.kind is kind
    ]


def one(items: list[ReadableSpan]) -> ReadableSpan:
    assert len(items) == 1, [(s.name, s.kind, dict(s.attributes or {})) for s in items]
    return items[0]


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_one_trace_caller_proxy_agent(stack, provider, exporter, streaming: bool) -> None:
    agent, proxy = stack
    method = "StreamGenerate" if streaming else "Generate"
    path = f"/{SERVICE}/{method}"
    tracer = provider.get_tracer("test-caller")
    async with grpc.aio.insecure_channel(
        proxy.address, interceptors=aio_client_interceptors(tracer_provider=provider)
    ) as channel:
        s = pb_grpc.AgentServiceStub(channel)
        with tracer.start_as_current_span("caller") as root:
            metadata = (("x-request-id", f"trace-{method}"),)
            if streaming:
                chunks = [
                    c
                    async for c in s.StreamGenerate(
                        pb.StreamGenerateRequest(prompt="hello"), metadata=metadata, timeout=10
                    )
                ]
                model, usage = chunks[0].model, chunks[-1].usage
            else:
                reply = await s.Generate(
                    pb.GenerateRequest(prompt="hello"), metadata=metadata, timeout=10
                )
                model, usage = reply.model, reply.usage

    def complete(spans: list[ReadableSpan]) -> bool:
        return sum(1 for x in spans if x.name == path and x.kind is SERVER) == 2 and any(
            x.name == "caller" for x in spans
        )

    spans = await wait_spans(exporter, complete)
    trace_id = root.get_span_context().trace_id
    in_trace = [x for x in spans if x.context.trace_id == trace_id]
    root_span = one([x for x in in_trace if x.name == "caller"])
    caller_client = one(children(in_trace, root_span, CLIENT))
    proxy_server = one(children(in_trace, caller_client, SERVER))
    proxy_client = one(children(in_trace, proxy_server, CLIENT))
    agent_server = one(children(in_trace, proxy_client, SERVER))
    assert caller_client.name == proxy_server.name == proxy_client.name == agent_server.name == path
    # Nothing of this call outside the one trace (health checks are not traced at all).
    assert [x for x in spans if x.name == path and x.context.trace_id != trace_id] == []

    attrs = dict(proxy_server.attributes or {})
    assert attrs["rpc.service"] == SERVICE and attrs["rpc.method"] == method
    assert attrs["rpc.grpc.status_code"] == 0
    assert attrs["aiproxy.request_id"] == f"trace-{method}"
    assert attrs["aiproxy.upstream"] == agent.address
    assert attrs["aiproxy.attempts"] == 1
    assert attrs["gen_ai.request.model"] == attrs["gen_ai.response.model"] == model
    assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens > 0
    if streaming:
        assert attrs["aiproxy.chunks"] == len(chunks) and attrs["aiproxy.first_chunk_ms"] > 0

    client_attrs = dict(proxy_client.attributes or {})
    host, port = agent.address.rsplit(":", 1)
    assert client_attrs["aiproxy.attempt"] == 1
    assert client_attrs["aiproxy.upstream"] == agent.address
    assert (client_attrs["server.address"], client_attrs["server.port"]) == (host, int(port))
    assert client_attrs["aiproxy.request_id"] == f"trace-{method}"
    assert client_attrs["rpc.grpc.status_code"] == 0
    # The span covers the whole stream: the proxy's server span ends after its client span.
    assert proxy_server.end_time >= proxy_client.end_time >= agent_server.start_time


async def test_retry_attempts_are_numbered_client_spans(provider, exporter) -> None:
    """Agent A fails every call it gets (UNAVAILABLE, via faults); agent B ignores the
    fault header. A call that lands on A first is retried on B: two client spans under
    one server span, attempts 1 and 2, only the first in error."""
    bad = await start_agent(provider, enable_faults=True)
    good = await start_agent(provider, enable_faults=False)
    proxy = await start_proxy(
        provider,
        bad.address,
        good.address,
        breaker={"enabled": False},
        retry={"initial_backoff_s": 0.001},
    )
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            s = pb_grpc.AgentServiceStub(channel)
            for i in range(12):
                await s.Generate(
                    pb.GenerateRequest(prompt="p"),
                    metadata=(("x-request-id", f"r-{i}"), ("x-fault-code", "UNAVAILABLE")),
                    timeout=10,
                )
        path = f"/{SERVICE}/Generate"

        def complete(spans: list[ReadableSpan]) -> bool:
            servers = [
                x
                for x in spans
                if x.kind is SERVER and (x.attributes or {}).get("aiproxy.request_id")
            ]
            return len(servers) == 12

        spans = await wait_spans(exporter, complete)
        servers = [
            x for x in spans if x.kind is SERVER and (x.attributes or {}).get("aiproxy.request_id")
        ]
        retried = 0
        for server_span in servers:
            attempts = sorted(
                children(spans, server_span, CLIENT), key=lambda x: x.attributes["aiproxy.attempt"]
            )
            assert [x.attributes["aiproxy.attempt"] for x in attempts] == list(
                range(1, len(attempts) + 1)
            )
            assert server_span.attributes["aiproxy.attempts"] == len(attempts)
            assert [x.attributes["aiproxy.upstream"] for x in attempts][-1] == good.address
            assert all(
                x.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
                for x in attempts[:-1]
            )
            assert attempts[-1].attributes["rpc.grpc.status_code"] == 0
            assert all(x.name == path for x in attempts)
            # Every attempt reached an agent, whose span is the attempt's child.
            for attempt in attempts:
                one(children(spans, attempt, SERVER))
            retried += len(attempts) > 1
        # P2C between two endpoints: 12 calls all avoiding the bad one is ~1 in 4096.
        assert retried >= 1
    finally:
        await proxy.drain(grace_s=1)
        await bad.stop(grace=None)
        await good.stop(grace=None)


async def test_console_exporter_per_process_joins_into_one_trace(spawn) -> None:
    """Real processes, exporter chosen by configuration: each writes its spans as JSON
    lines on stderr; the caller's traceparent ties them into one trace."""
    from tests.conftest import agent_args, proxy_args

    agent = spawn(*agent_args("--trace-exporter", "console"), name="agent")
    proxy = spawn(
        *proxy_args(agent.address), env={"AIPROXY_TRACING__EXPORTER": "console"}, name="proxy"
    )
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller_span = "00f067aa0ba902b7"
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        await pb_grpc.AgentServiceStub(channel).Generate(
            pb.GenerateRequest(prompt="hi"),
            metadata=(
                ("traceparent", f"00-{trace_id}-{caller_span}-01"),
                ("x-request-id", "console-1"),
            ),
            timeout=10,
        )
    # Batched spans are flushed when the processes shut down.
    assert proxy.stop() == 0 and agent.stop() == 0

    def spans(process) -> list[dict]:
        return [line for line in process.log_events() if "context" in line and "kind" in line]

    proxy_spans = {
        s["kind"]: s for s in spans(proxy) if s["context"]["trace_id"] == f"0x{trace_id}"
    }
    agent_spans = [s for s in spans(agent) if s["context"]["trace_id"] == f"0x{trace_id}"]
    assert set(proxy_spans) == {"SpanKind.SERVER", "SpanKind.CLIENT"}
    server, client = proxy_spans["SpanKind.SERVER"], proxy_spans["SpanKind.CLIENT"]
    assert server["parent_id"] == f"0x{caller_span}"
    assert server["attributes"]["aiproxy.request_id"] == "console-1"
    assert server["resource"]["attributes"]["service.name"] == "aiproxy"
    assert client["parent_id"] == server["context"]["span_id"]
    assert [s["parent_id"] for s in agent_spans] == [client["context"]["span_id"]]
    assert agent_spans[0]["kind"] == "SpanKind.SERVER"


async def test_failed_call_spans_carry_the_error(provider, exporter) -> None:
    agent = await start_agent(provider, enable_faults=True)
    proxy = await start_proxy(
        provider, agent.address, breaker={"enabled": False}, retry={"max_attempts": 1}
    )
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.AgentServiceStub(channel).Generate(
                    pb.GenerateRequest(prompt="p"),
                    metadata=(("x-request-id", "fails-1"), ("x-fault-code", "UNAVAILABLE")),
                    timeout=10,
                )
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE

        def complete(spans: list[ReadableSpan]) -> bool:
            return sum(1 for x in spans if x.kind is SERVER) == 2

        spans = await wait_spans(exporter, complete)
        server = one(
            [
                x
                for x in spans
                if x.kind is SERVER and (x.attributes or {}).get("aiproxy.request_id")
            ]
        )
        client = one(children(spans, server, CLIENT))
        agent_span = one(children(spans, client, SERVER))
        unavailable = grpc.StatusCode.UNAVAILABLE.value[0]
        for span in (server, client, agent_span):
            assert span.status.status_code is trace.StatusCode.ERROR
            assert span.attributes["rpc.grpc.status_code"] == unavailable
        assert server.attributes["aiproxy.reason"] == "UPSTREAM_UNAVAILABLE"
        assert server.attributes["aiproxy.attempts"] == 1
    finally:
        await proxy.drain(grace_s=1)
        await agent.stop(grace=None)
