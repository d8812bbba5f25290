"""Small helpers for tests that talk gRPC to real processes."""

from __future__ import annotations

import asyncio
import math

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiproxy.ai.agent.v1 import agent_service_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# What grpc-core's clock readings add to a timeout before it is encoded: the call's deadline
# is rounded up to the millisecond, "now" (a cached reading) down, so the timeout sent can be
# a millisecond or two above the caller's; a few more for a reading taken a little early.
CLOCK_SLACK_MS = 5


def max_wire_timeout_ms(timeout_s: float) -> float:
    """The most a server can see left of a caller's `timeout_s` (its remaining time when
    the call arrives): grpc-core sends grpc-timeout rounded UP to a unit that grows with
    the value (whole ms below 1 s, 10 ms below 10 s, 100 ms below 100 s, then seconds:
    Timeout::FromMillis in grpc/grpc src/core/lib/transport/timeout_encoding.cc). So a
    caller's 10 s was seen as 10099 ms in CI. Bound deadline assertions with this, not
    with the caller's timeout."""
    millis = math.ceil(timeout_s * 1000) + CLOCK_SLACK_MS
    unit = 1 if millis < 1000 else 10 if millis < 10_000 else 100 if millis < 100_000 else 1000
    return float(math.ceil(millis / unit) * unit)


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
