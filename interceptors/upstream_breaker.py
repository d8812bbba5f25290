"""Client interceptor on each endpoint's channels: that endpoint's circuit breaker.

While the breaker is open a call fails in microseconds with CIRCUIT_OPEN, nothing is
sent. Otherwise the call's outcome settles its permit, which carries the caller's key
(the breaker's injected caller source): failures with the breaker's failure codes count,
everything else (the caller's own errors, request-specific INTERNAL, cancellations) does
not. A stream is settled when it ends, so a stream that fails mid-way with UNAVAILABLE
counts; which callers failed is what decides (interceptors/breaker.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from core.errors import CircuitOpen
from interceptors.breaker import CircuitBreaker, Permit


def circuit_open_error(breaker: CircuitBreaker) -> CircuitOpen:
    # The endpoint's address is for the log, not for callers.
    return CircuitOpen("upstream circuit breaker is open", retry_delay_s=breaker.retry_after_s())


class _BreakerGate:
    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def _permit(self) -> Permit:
        permit = self.breaker.try_acquire()
        if permit is None:
            raise circuit_open_error(self.breaker)
        return permit


# grpc.aio files an interceptor under the FIRST client-interceptor type it is an instance
# of (an if/elif in aio/_channel.py), so one class implementing both would only ever see
# unary calls: each call type gets its own object, both sharing the endpoint's breaker.


class BreakerUnaryInterceptor(_BreakerGate, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable, client_call_details: Any, request: Any
    ) -> Any:
        permit = self._permit()
        try:
            call = await continuation(client_call_details, request)
            await call  # settle on the outcome: unary calls are short
        except grpc.aio.AioRpcError as exc:
            permit.record(exc.code())
            raise
        except BaseException:
            permit.ignore()  # cancelled by our caller, or our own bug: no verdict on the upstream
            raise
        permit.success()
        return call


class BreakerStreamInterceptor(_BreakerGate, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable, client_call_details: Any, request: Any
    ) -> Any:
        permit = self._permit()
        try:
            call = await continuation(client_call_details, request)
        except grpc.aio.AioRpcError as exc:
            permit.record(exc.code())
            raise
        except BaseException:
            permit.ignore()
            raise
        return _settle_when_done(call, permit)


def breaker_interceptors(breaker: CircuitBreaker) -> list[grpc.aio.ClientInterceptor]:
    """The breaker's interceptors for one endpoint's channels: unary and streaming calls."""
    return [BreakerUnaryInterceptor(breaker), BreakerStreamInterceptor(breaker)]


async def _settle_when_done(call: Any, permit: Permit) -> AsyncIterator[Any]:
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as exc:
        permit.record(exc.code())
        raise
    except BaseException:
        permit.ignore()
        raise
    permit.success()
