"""One call upstream: the calls in flight on an endpoint, and the stream wrapper.

`Endpoint.unary` / `Endpoint.stream` (endpoint.py) track every call they send in the
endpoint's CallsInFlight, so that the health supervisor (health.py) can fail them at once
when the endpoint stops answering; UpstreamStream settles a stream's breaker permit and
client metrics when it ends, however it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from aiproxy.core.breaker import Permit
from aiproxy.core.upstream_errors import not_the_replicas_fault
from aiproxy.interceptors.client_observability import ClientMethod


class Tracked:
    __slots__ = ("call", "why")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.why: str | None = None  # set when the pool fails the call


def settle_failed(permit: Permit | None, exc: grpc.aio.AioRpcError) -> None:
    """Settle the breaker permit of a call that failed with `exc`: its code counts,
    unless the agent said a shared dependency is down (not the replica's fault:
    core/upstream_errors.NOT_THE_REPLICAS_FAULT), which gives no verdict."""
    if permit is None:
        return
    if not_the_replicas_fault(exc):
        permit.ignore()
    else:
        permit.record(exc.code())


def _unavailable(why: str) -> grpc.aio.AioRpcError:
    """The error a call failed by the pool ends with: what grpc itself reports for a
    connection that died (UNAVAILABLE), so retries and the error shape treat it alike."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=why
    )


class CallsInFlight:
    """The calls in flight on one endpoint's data channels, so that the pool can fail
    them at once when the endpoint stops answering; grpc would otherwise let them wait
    for their deadline (streams: the idle timeout) on a connection that looks open.

    The endpoint's upstream call (`Endpoint.unary` / `Endpoint.stream`) tracks each call
    here: a call the pool fails is cancelled underneath (the breaker sees a cancellation
    and does not count it) and ends for the forwarder with UNAVAILABLE.
    """

    def __init__(self, on_unavailable: Callable[[], None] = lambda: None) -> None:
        self._calls: set[Tracked] = set()
        # Calls that ended with the endpoint's error or because the pool failed them
        # (callers' cancellations excluded): the admin overview's error rate.
        self.failed = 0
        # Told when a call fails with UNAVAILABLE by itself (the liveness probe's hint).
        self.on_unavailable = on_unavailable

    def __len__(self) -> int:
        return len(self._calls)

    def fail_all(self, why: str) -> int:
        """Cancel every call in flight; each ends with UNAVAILABLE `why`. How many."""
        calls, self._calls = self._calls, set()
        for entry in calls:
            entry.why = why
            entry.call.cancel()
        return len(calls)

    def track(self, call: Any) -> Tracked:
        entry = Tracked(call)
        self._calls.add(entry)
        return entry

    def untrack(self, entry: Tracked) -> None:
        self._calls.discard(entry)

    def ended_badly(self, entry: Tracked, exc: BaseException) -> None:
        """Raise UNAVAILABLE for a call the pool failed; hint at an UNAVAILABLE of its own."""
        if entry.why is not None:
            self.failed += 1
            raise _unavailable(entry.why) from None
        if isinstance(exc, grpc.aio.AioRpcError):
            code = exc.code()
            if code is not grpc.StatusCode.CANCELLED:
                self.failed += 1
            if code is grpc.StatusCode.UNAVAILABLE and not not_the_replicas_fault(exc):
                self.on_unavailable()


OK = grpc.StatusCode.OK
UNKNOWN = grpc.StatusCode.UNKNOWN
CANCELLED = grpc.StatusCode.CANCELLED
_EOF = grpc.aio.EOF


class Route:
    """One method on one endpoint: its multicallable per channel (round robin) and its
    client metrics, made on the method's first call."""

    __slots__ = ("callables", "metrics", "next")

    def __init__(self, callables: list[Any], metrics: ClientMethod | None) -> None:
        self.callables = callables
        self.metrics = metrics
        self.next = 0

    def callable(self) -> Any:
        callables = self.callables
        index = self.next
        self.next = (index + 1) % len(callables)
        return callables[index]


class UpstreamStream:
    """One upstream server-streaming call: iterate it for the chunks, `cancel()` it.

    Settles the breaker permit and the client metrics when the stream ends (completed,
    failed, or cancelled: ignored by the breaker); a call the pool failed ends with
    UNAVAILABLE (CallsInFlight)."""

    __slots__ = (
        "_call",
        "_calls",
        "_entry",
        "_metrics",
        "_permit",
        "_settled",
        "_start",
        "_started",
    )

    def __init__(
        self,
        call: Any,
        calls: CallsInFlight,
        permit: Permit | None,
        metrics: ClientMethod | None,
        start: float,
    ) -> None:
        self._call = call
        self._calls = calls
        self._entry = calls.track(call)
        self._permit = permit
        self._metrics = metrics
        self._start = start
        self._started = False
        self._settled = False
        # Also when nobody ever reads it (a stream closed before its first read).
        call.add_done_callback(self._done)

    def cancel(self) -> bool:
        cancelled: bool = self._call.cancel()
        return cancelled

    async def initial_metadata(self) -> Any:
        """The upstream's response headers (already here once a chunk has come)."""
        return await self._call.initial_metadata()

    def _done(self, call: Any) -> None:
        self._calls.untrack(self._entry)
        if not self._started and call.cancelled():
            # Cancelled before anyone read it (a stream closed before its first read):
            # the iteration below would never settle it.
            self._settled = True
            if self._permit is not None:
                self._permit.ignore()
            if self._metrics is not None:
                self._metrics.finish(CANCELLED, self._start)

    def _begin(self) -> tuple[Permit | None, ClientMethod | None]:
        self._started = True
        if self._settled:
            return None, None
        return self._permit, self._metrics

    def _failed(self, permit: Permit | None, exc: BaseException) -> Any:
        """The status code a stream that raised `exc` ends with; settles the permit (then
        the caller calls `ended_badly`, which may raise UNAVAILABLE instead)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            settle_failed(permit, exc)
            return exc.code()
        if permit is not None:
            permit.ignore()
        if isinstance(exc, asyncio.CancelledError):
            return CANCELLED
        if isinstance(exc, GeneratorExit):  # closed early by its reader
            return CANCELLED
        return UNKNOWN

    def _end(self, m: ClientMethod | None, code: Any, received: int) -> None:
        self._calls.untrack(self._entry)
        if m is not None:
            if received:  # counted once at the end: no metric lock per chunk
                m.received.inc(received)
            m.finish(code, self._start)

    async def __aiter__(self) -> AsyncIterator[Any]:
        permit, m = self._begin()
        received = 0
        code = UNKNOWN
        # call.read() rather than `async for`: grpc.aio's iterator is one more async
        # generator frame per chunk (_fetch_stream_responses) around the same read.
        read = self._call.read
        try:
            while True:
                response = await read()
                if response is _EOF:
                    break
                received += 1
                yield response
            code = OK
            if permit is not None:
                permit.success()
        except BaseException as exc:
            code = self._failed(permit, exc)
            if isinstance(exc, grpc.aio.AioRpcError | asyncio.CancelledError):
                self._calls.ended_badly(self._entry, exc)
            raise
        finally:
            self._end(m, code, received)

    async def drain(
        self, offer: Callable[[Any], bool], space: Callable[[], Awaitable[None]]
    ) -> None:
        """What the stream pump's reader runs (server/request/streaming.py): every chunk
        into `offer` (sync; False when the buffer is full, then `space()` is awaited before
        the next read), the upstream's error raised. The same settling as iteration, but
        per chunk only one grpc read and one plain call: no async generator frame and no
        coroutine around each chunk."""
        permit, m = self._begin()
        received = 0
        code = UNKNOWN
        read = self._call.read
        try:
            while True:
                response = await read()
                if response is _EOF:
                    break
                received += 1
                if not offer(response):
                    await space()
            code = OK
            if permit is not None:
                permit.success()
        except BaseException as exc:
            code = self._failed(permit, exc)
            if isinstance(exc, grpc.aio.AioRpcError | asyncio.CancelledError):
                self._calls.ended_badly(self._entry, exc)
            raise
        finally:
            self._end(m, code, received)
