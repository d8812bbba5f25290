"""Envoy's convert_grpc_status on its own: every gRPC code an upstream can answer with
becomes the HTTP status the API promises, with the google.rpc.Status (ErrorInfo
included) as the JSON body.

The upstream here is a minimal in-process grpc.aio AgentService that fails every call
with the status named in the request, so codes the reference agent cannot produce
through the proxy (UNAUTHENTICATED: the proxy maps an upstream's to INTERNAL; its own
comes from the auth interceptor) are covered too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from aiproxy.ai.agent.v1 import agent_service_pb2_grpc
from aiproxy.core.errors import http_status_for
from tests.support.edge import request
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = pytest.mark.envoy

CODES = [
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
]


class FailingAgent(agent_service_pb2_grpc.AgentServiceServicer):
    """Fails Generate and StreamGenerate with the code named in the prompt."""

    async def _fail(self, prompt: str, context: grpc.aio.ServicerContext) -> None:
        code = grpc.StatusCode[prompt]
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=f"TEST_{code.name}", domain="test"))
        status = status_pb2.Status(
            code=getattr(code_pb2, code.name), message=f"failed with {code.name}", details=[detail]
        )
        await context.abort_with_status(rpc_status.to_status(status))

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._fail(request.prompt, context)

    async def StreamGenerate(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        await self._fail(request.prompt, context)
        yield  # pragma: no cover  (an async generator that never yields)


@pytest.fixture
async def failing_edge() -> AsyncIterator[str]:
    server = grpc.aio.server()
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(FailingAgent(), server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("ai.agent.v1.AgentService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    envoy = ServiceProcess(
        aiproxy_argv(
            "envoy", "--listen", "127.0.0.1:0", "--proxy", f"127.0.0.1:{port}", "--concurrency", "1"
        ),
        name="envoy",
    )
    try:
        await asyncio.to_thread(envoy.start, 60.0)
        yield envoy.address
    finally:
        await asyncio.to_thread(envoy.cleanup)
        await server.stop(0)


@pytest.mark.parametrize("path", ["/api/v1/ai/generate", "/api/v1/ai/generate/stream"])
async def test_grpc_codes_become_the_promised_http_statuses(failing_edge: str, path: str) -> None:
    for code in CODES:
        reply = await asyncio.to_thread(request, failing_edge, "POST", path, {"prompt": code.name})
        assert reply.status == http_status_for(code), (code, reply.status, reply.body)
        assert reply.content_type == "application/json"
        body = reply.json()
        assert body["code"] == code.value[0] and body["message"] == f"failed with {code.name}"
        assert body["details"] == [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": f"TEST_{code.name}",
                "domain": "test",
                "metadata": {},
            }
        ]
