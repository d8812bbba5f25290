"""The interceptor chains, built in one place.

grpc.aio runs server interceptors in list order: the first is the outermost, it sees the
call first and its result last. The order, outermost first, and why:

  1. RequestContextInterceptor  opens CallInfo and the request id that every later
                                interceptor, the access log and the upstream call use.
  2. ErrorInterceptor           turns whatever the inner ones raise into the one error
                                shape, including in-band stream errors.
  3. AuthInterceptor            (when auth is on) who the caller is: JWT or API key ->
                                CallInfo.caller, the identity the limits and logs use;
                                health and reflection stay open.

Upstream side, per endpoint channel (grpc.aio client interceptors, outermost first):

  1. BreakerClientInterceptor   that endpoint's circuit breaker: fail fast while open,
                                settle each call (streams when they end).

Retries sit above the channels, in server/forwarding.py, because the next attempt must
be free to go to another endpoint.
"""

from __future__ import annotations

import grpc

from interceptors.auth import AuthInterceptor
from interceptors.breaker import CircuitBreaker
from interceptors.error_handling import ErrorInterceptor
from interceptors.upstream_breaker import BreakerClientInterceptor
from interceptors.request_context import RequestContextInterceptor
from server.forwarding import Forwarder
from server.config import Settings


def client_interceptors(breaker: CircuitBreaker | None) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors on each upstream endpoint's channels, outermost first."""
    chain: list[grpc.aio.ClientInterceptor] = []
    if breaker is not None:
        chain.append(BreakerClientInterceptor(breaker))
    return chain


def server_interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    chain: list[grpc.aio.ServerInterceptor] = [
        RequestContextInterceptor(),
        ErrorInterceptor(Forwarder.stream_response_classes()),
    ]
    if settings.auth.active:
        chain.append(AuthInterceptor(settings.auth))
    return chain
