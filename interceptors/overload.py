"""The pipeline's first step: refuse new API calls at once while the proxy is full.

Why a gate before everything else: grpc.aio takes new calls from
grpc-core one at a time, on the event loop, a few loop iterations per call. Every call it
takes then runs the whole pipeline before the limiter in interceptors/limits.py
can refuse it, and while the loop is busy with that, the next callers wait in grpc-core's
pending queue, invisible to the proxy. A burst of a few thousand streams therefore
queued for many seconds, and the calls grpc-core held past
`grpc.server_max_unrequested_time_in_server` (30 s by default) were CANCELLED without
ever reaching the proxy's code.

This gate makes a refusal as cheap as it can be, so the loop drains that queue fast:
when the calls being forwarded (`active()`) reach the current limit, a new API call is
answered RESOURCE_EXHAUSTED (ErrorInfo OVERLOADED, RetryInfo) with a prebuilt status,
before the request is decoded or a CallInfo exists (server/request/pipeline.py runs `check`
first, on the raw request bytes).
interceptors/limits.py keeps its exact, lease-based cap further in; this one reads a
counter the forwarder keeps anyway, so admitted calls pay nothing for it.

The limit is `capacity` (a fixed ceiling) lowered by `BacklogLimit` while new calls
wait too long to be taken. A fixed number alone cannot tell: a burst of short streams
backs grpc-core's queue up with only a few dozen streams open, and the active count
never reaches any sane ceiling. Nor can the loop's lag: it stays at a few ms while the
queue grows, because the loop is not slow, it only takes one call per few iterations
(grpc/grpc#43436 works on that main loop's throughput). So the proxy measures the wait
itself (server/pool/backlog.py: a probe call to its own listener that queues like any other
new call) and the limit follows it, AIMD as TCP and Netflix's concurrency-limits do with
latency: while the wait is above its target the limit drops below what is open now, so
new calls are refused cheaply and the queue drains; once the wait is back under the
target the limit climbs again. A floor keeps the proxy serving whatever happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiproxy.core.errors import OVERLOADED_RETRY_DELAY_S, Overloaded, to_grpc_status
from aiproxy.core.service import Method
from aiproxy.core.types import Context


class BacklogLimit:
    """A concurrency limit that follows how long new calls wait (pure logic: `sample` is
    fed by `run`, or by a test).

    Every `interval_s` the wait (`delay()`, seconds) is compared with `target_s`: above
    it the limit becomes `decrease` x min(limit, calls open now), never below `floor`;
    at or under it the limit grows by `increase` of itself (at least 1), up to `ceiling`.
    """

    def __init__(
        self,
        ceiling: int,
        floor: int,
        target_s: float,
        *,
        interval_s: float = 0.05,
        decrease: float = 0.9,
        increase: float = 0.05,
    ) -> None:
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.target_s = target_s
        self.interval_s = interval_s
        self._decrease = decrease
        self._increase = increase
        self.limit = ceiling

    def sample(self, delay_s: float, active: int) -> None:
        if delay_s > self.target_s:
            self.limit = max(self.floor, int(self._decrease * min(self.limit, active)))
        elif self.limit < self.ceiling:
            self.limit = min(self.ceiling, self.limit + max(1, int(self.limit * self._increase)))

    async def run(self, delay: Callable[[], float], active: Callable[[], int]) -> None:
        """Sample until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample(delay(), active())


class OverloadGate:
    """The gate (see the module docstring). Not a Stage: it runs before the CallInfo and
    the decoding; `bind(method)` gives the method's `check(context)`."""

    def __init__(
        self,
        active: Callable[[], int],
        capacity: int,
        on_reject: Callable[[str], None] | None = None,
        backlog_limit: BacklogLimit | None = None,
    ) -> None:
        self._active = active
        self.capacity = capacity
        self._on_reject = on_reject
        self.backlog_limit = backlog_limit
        status = to_grpc_status(
            Overloaded(
                "the proxy is at capacity; retry after the delay in RetryInfo",
                metadata={"limit": str(capacity)},
                retry_delay_s=OVERLOADED_RETRY_DELAY_S,
            )
        )
        self.refusal = (status.code, status.details, tuple(status.trailing_metadata))

    def full(self) -> bool:
        backlog_limit = self.backlog_limit
        limit = self.capacity if backlog_limit is None else min(self.capacity, backlog_limit.limit)
        return self._active() >= limit

    def bind(self, method: Method) -> GateCheck:
        return GateCheck(self, method.path)


class GateCheck:
    """One method's gate: `await check(context)` aborts the call when the proxy is full."""

    __slots__ = ("_gate", "_path")

    def __init__(self, gate: OverloadGate, path: str) -> None:
        self._gate, self._path = gate, path

    async def check(self, context: Context) -> None:
        gate = self._gate
        if gate.full():
            if gate._on_reject is not None:
                gate._on_reject(self._path)
            await context.abort(*gate.refusal)
