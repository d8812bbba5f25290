"""ai.proxy.v1.ProxyAdminService: the pool as the proxy sees it (read-only).

With auth on, every method needs the caller's credentials AND `auth.admin_scopes`
(default `aiproxy.admin`; interceptors/auth.py), checked by AuthStage.guard."""

from __future__ import annotations

from aiproxy.ai.proxy.v1 import admin_service_pb2 as admin_pb
from aiproxy.ai.proxy.v1 import admin_service_pb2_grpc as admin_grpc
from aiproxy.core.settings import ADMIN_SERVICE_NAME
from aiproxy.core.types import Context
from aiproxy.server.pool.pool import UpstreamPool

# The name auth's admin scope check uses must be the proto's.
if admin_pb.DESCRIPTOR.services_by_name["ProxyAdminService"].full_name != ADMIN_SERVICE_NAME:
    raise RuntimeError("core.settings.ADMIN_SERVICE_NAME differs from the admin proto")


class ProxyAdmin(admin_grpc.ProxyAdminServiceServicer):
    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    async def ListEndpoints(
        self, request: admin_pb.ListEndpointsRequest, context: Context
    ) -> admin_pb.ListEndpointsResponse:
        endpoints = [
            admin_pb.UpstreamEndpoint(
                address=ep.address,
                serving=ep.serving,
                usable=ep.usable,
                in_flight=ep.in_flight,
                total_calls=ep.total_calls,
                breaker_state=admin_pb.BreakerState.Name(ep.breaker_state_proto()),
            )
            for ep in self._pool.endpoints.values()
        ]
        return admin_pb.ListEndpointsResponse(
            endpoints=endpoints, usable_count=self._pool.usable_count
        )
