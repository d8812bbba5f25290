"""The interceptor chains, built in one place.

grpc.aio runs server interceptors in list order: the first is the outermost, it sees the
call first and its result last. The order, outermost first, and why:

  1. RequestContextInterceptor  opens CallInfo and the request id that every later
                                interceptor, the access log and the upstream call use.
"""

from __future__ import annotations

import grpc

from interceptors.request_context import RequestContextInterceptor
from server.config import Settings


def server_interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    return [
        RequestContextInterceptor(),
    ]
