"""Small helpers for tests that talk gRPC to real processes."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ai.agent.v1 import agent_service_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def stub(channel: grpc.aio.Channel) -> agent_service_pb2_grpc.AgentServiceStub:
    return agent_service_pb2_grpc.AgentServiceStub(channel)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return reply.status


async def wait_health(
    channel: grpc.aio.Channel, status: int, service: str = "", timeout: float = 10.0
) -> float:
    """Follow Health/Watch until `status`; returns how long it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout
    )
    try:
        async for reply in watch:
            if reply.status == status:
                return loop.time() - start
    finally:
        watch.cancel()
    raise AssertionError(f"health of {service!r} never became {status}")
