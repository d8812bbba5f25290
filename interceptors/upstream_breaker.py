"""An endpoint's circuit breaker at the upstream call: the gate and its settlement.

Plain helpers, not grpc.aio client interceptors: the upstream call (server/pool/endpoint.py,
`Endpoint.unary` / `Endpoint.stream`) takes the permit before anything is sent and
settles it with the outcome. grpc.aio's client-interceptor machinery cost about 115 us
of CPU per call (extra tasks and call objects per interceptor), more than the breaker.

While the breaker is open a call fails in microseconds with CIRCUIT_OPEN, nothing is
sent. Otherwise the call's outcome settles its permit, which carries the caller's key
(the breaker's injected caller source): failures with the breaker's failure codes count,
everything else (the caller's own errors, request-specific INTERNAL, cancellations) does
not. A stream is settled when it ends, so a stream that fails mid-way with UNAVAILABLE
counts; which callers failed is what decides (core/breaker.py).
"""

from __future__ import annotations

from aiproxy.core.breaker import CircuitBreaker, Permit
from aiproxy.core.errors import CircuitOpen


def circuit_open_error(breaker: CircuitBreaker) -> CircuitOpen:
    # The endpoint's address is for the log, not for callers.
    return CircuitOpen("upstream circuit breaker is open", retry_delay_s=breaker.retry_after_s())


def acquire(breaker: CircuitBreaker | None) -> Permit | None:
    """The permit for one upstream call (None: no breaker); CircuitOpen while open.

    Settle it exactly once: `record(code)` on the call's final status, `ignore()` when
    it was cancelled (no verdict on the upstream), `success()` when it completed."""
    if breaker is None:
        return None
    permit = breaker.try_acquire()
    if permit is None:
        raise circuit_open_error(breaker)
    return permit
