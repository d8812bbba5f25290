"""ai.proxy.v1.ProxyAdminService: the pool as the proxy sees it (read-only)."""

from __future__ import annotations

import grpc

from aiproxy.ai.proxy.v1 import admin_service_pb2 as admin_pb
from aiproxy.ai.proxy.v1 import admin_service_pb2_grpc as admin_grpc
from aiproxy.server.pool.pool import UpstreamPool

ADMIN_SERVICE_NAME = admin_pb.DESCRIPTOR.services_by_name["ProxyAdminService"].full_name


class ProxyAdmin(admin_grpc.ProxyAdminServiceServicer):
    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    async def ListEndpoints(
        self, request: admin_pb.ListEndpointsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb.ListEndpointsResponse:
        endpoints = [
            admin_pb.UpstreamEndpoint(
                address=ep.address,
                serving=ep.serving,
                usable=ep.usable,
                in_flight=ep.in_flight,
                total_calls=ep.total_calls,
                breaker_state=ep.breaker_state_proto(),
            )
            for ep in self._pool.endpoints.values()
        ]
        return admin_pb.ListEndpointsResponse(
            endpoints=endpoints, usable_count=self._pool.usable_count
        )
