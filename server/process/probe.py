"""`aiproxy health`: a grpc.health.v1 probe for container HEALTHCHECKs and scripts.

Exit status 0 when the service is SERVING, 1 when it answers anything else, 2 when it
cannot be reached in time, like grpc-health-probe, so the image needs no extra binary.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


async def check(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[int, str]:
    """(exit status, what to print) for one Health/Check of `service` at `address`."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(  # type: ignore[attr-defined]  # stubs: HealthStub has no methods
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout_s,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            return 2, f"{address} {service or '(server)'}: {exc.code().name}: {exc.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return (0 if reply.status == SERVING else 1), f"{address} {service or '(server)'}: {name}"


def run(address: str, service: str, timeout_s: float) -> int:
    status, line = asyncio.run(check(address, service, timeout_s))
    print(line)
    return status
