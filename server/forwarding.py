"""The forwarding servicer: every AgentService method, re-exported and sent upstream.

Handlers are built from the service descriptor, so a method added to the proto is
forwarded without code here. Each call: pick an endpoint from the pool, forward the
caller's metadata (minus transport and credential headers) with the request id, give
the upstream call the call's effective deadline, and relay the answer. Protection
(limits, breaker, retries, error shape) lives in interceptors/, not here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory

from ai.agent.v1 import agent_service_pb2
from server.callinfo import CallInfo, current_call
from server.config import SERVICE_NAME, Settings
from server.streaming import StreamPump
from server.upstream import UpstreamPool

log = logging.getLogger("aiproxy.forward")

REQUEST_ID = "x-request-id"

# Metadata that describes the caller's hop, not the call: never forwarded.
_HOP_METADATA = frozenset(
    {"content-type", "te", "user-agent", "host", "connection", "keep-alive", "accept-encoding", "grpc-accept-encoding"}
)


class NoUpstream(Exception):
    """No endpoint can take the call (all unhealthy, or none configured)."""


def service_descriptor() -> _descriptor.ServiceDescriptor:
    return agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"]


class Forwarder:
    """Builds the generic handler that re-exports AgentService through the pool."""

    def __init__(self, pool: UpstreamPool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._drop = _HOP_METADATA | {k.lower() for k in settings.upstream.drop_metadata}

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in service_descriptor().methods:
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            path = f"/{SERVICE_NAME}/{method.name}"
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    self._stream_handler(path, request_cls, response_cls),
                    request_deserializer=request_cls.FromString,
                    response_serializer=response_cls.SerializeToString,
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary_handler(path, request_cls, response_cls),
                    request_deserializer=request_cls.FromString,
                    response_serializer=response_cls.SerializeToString,
                )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def upstream_metadata(self, context: grpc.aio.ServicerContext, call: CallInfo | None) -> list[tuple[str, Any]]:
        drop = self._drop
        out = [
            (key, value)
            for key, value in context.invocation_metadata() or ()
            if key not in drop and not key.startswith(":") and key != REQUEST_ID
        ]
        if call is not None:
            out.append((REQUEST_ID, call.request_id))
        return out

    def _timeout(self, context: grpc.aio.ServicerContext, call: CallInfo | None) -> float | None:
        if call is not None and call.timeout_s is not None:
            return call.timeout_s
        return context.time_remaining()

    def _unary_handler(self, path: str, request_cls: type, response_cls: type) -> Callable:
        serialize = request_cls.SerializeToString
        deserialize = response_cls.FromString

        async def forward_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = current_call.get()
            endpoint = self._pool.pick()
            if endpoint is None:
                raise NoUpstream("no healthy upstream endpoint")
            if call is not None:
                call.upstream = endpoint.address
                call.attempts += 1
            endpoint.in_flight += 1
            endpoint.total_calls += 1
            try:
                response = await endpoint.unary_unary(path, serialize, deserialize)(
                    request, metadata=self.upstream_metadata(context, call), timeout=self._timeout(context, call)
                )
            finally:
                endpoint.in_flight -= 1
            if call is not None:
                await context.send_initial_metadata(((REQUEST_ID, call.request_id),))
            return response

        return forward_unary

    def _stream_handler(self, path: str, request_cls: type, response_cls: type) -> Callable:
        serialize = request_cls.SerializeToString
        deserialize = response_cls.FromString
        settings = self._settings.stream

        async def forward_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = current_call.get()
            endpoint = self._pool.pick()
            if endpoint is None:
                raise NoUpstream("no healthy upstream endpoint")
            if call is not None:
                call.upstream = endpoint.address
                call.attempts += 1
            endpoint.in_flight += 1
            endpoint.total_calls += 1
            upstream_call = endpoint.unary_stream(path, serialize, deserialize)(
                request, metadata=self.upstream_metadata(context, call), timeout=self._timeout(context, call)
            )
            pump = StreamPump(upstream_call, response_cls, settings)
            try:
                async for chunk in pump.chunks():
                    if call is not None and call.chunks == 0:
                        call.first_chunk_s = time.monotonic() - call.started
                        await context.send_initial_metadata(((REQUEST_ID, call.request_id),))
                    if call is not None:
                        call.chunks += 1
                    yield chunk
            finally:
                endpoint.in_flight -= 1

        return forward_stream
