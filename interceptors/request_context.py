"""Outermost server interceptor: open the call's CallInfo and its request id.

The request id comes from the caller's `x-request-id` (Envoy sets one on every HTTP
request) or is generated; it goes upstream with the call and back to the caller in
the response metadata (initial metadata on success, trailing metadata always).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
from grpc_interceptor.server import AsyncServerInterceptor

from core.callinfo import CallInfo, current_call

REQUEST_ID = "x-request-id"
_MAX_REQUEST_ID_LEN = 128


def request_id_from(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID and isinstance(value, str):
            # A caller's id is echoed into logs and headers: keep it short and printable.
            if 0 < len(value) <= _MAX_REQUEST_ID_LEN and value.isprintable():
                return value
            break
    return uuid.uuid4().hex


class RequestContextInterceptor(AsyncServerInterceptor):
    async def intercept(
        self,
        method: Callable,
        request_or_iterator: Any,
        context: grpc.aio.ServicerContext,
        method_name: str,
    ) -> Any:
        call = CallInfo(
            method=method_name, request_id=request_id_from(context.invocation_metadata())
        )
        current_call.set(call)
        context.set_trailing_metadata(((REQUEST_ID, call.request_id),))
        return await super().intercept(method, request_or_iterator, context, method_name)
