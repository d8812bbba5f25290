"""Error shaping: every error leaves the proxy in the one shape of core/errors.py.

The pipeline (server/request/pipeline.py) is the one frame that turns exceptions into the
status; these are its pieces:

- A ProxyError raised anywhere inside (a stage, the forwarder) becomes its
  google.rpc.Status; a failed upstream call is mapped by core/upstream_errors.py; anything
  else is a bug: INTERNAL with a generic message, the traceback in the log.
- A status already set (someone called context.abort) is never overwritten.
- Request bytes that do not decode (grpc would answer UNKNOWN with the exception's
  class name) are INVALID_ARGUMENT with reason MALFORMED_REQUEST: the pipeline takes the
  request as raw bytes and decodes it itself (`decode`), after the overload gate. Other
  services (health, reflection, admin) get the same with `safe_handler`.
- Streams: an error after the first chunk cannot become an HTTP status any more, and
  browsers cannot read trailers, so the caller first gets a last in-band chunk
  (is_final, finish_reason ERROR, `error` = the status; `final_chunk`) and then the same
  status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, cast

import grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.callinfo import CallInfo
from aiproxy.core.errors import Internal, MalformedRequest, ProxyError, abort_with, to_status_proto
from aiproxy.core.logs import log_event
from aiproxy.core.types import Context
from aiproxy.core.upstream_errors import to_proxy_error

log = logging.getLogger("aiproxy.errors")


# A call whose stream ended without one whole request message (no DATA, or a length
# prefix larger than the bytes that came, then END_STREAM). grpc.aio's unary-request path
# never calls the handler for it and never answers either (the caller waits until its own
# deadline, forever without one), so every handler of the proxy is registered as
# request-streaming and reads its one message itself (`read_one`): such a call is
# answered at once.
NO_MESSAGE: Final = "the request stream ended without a complete message"
# And one whose message has not all arrived this long after the call began (a caller that
# sends part of it and then nothing, or trickles it): it would otherwise hold its stream,
# and a task here, for as long as its connection lives. Every real caller sends its one
# message at once; 30 s is a 1 MiB request at 35 KB/s.
READ_TIMEOUT_S: Final = 30.0
NO_MESSAGE_IN_TIME: Final = f"the request message did not arrive within {READ_TIMEOUT_S:g} s"


class _ReadWatch:
    """One event loop's calls waiting for their request message, each with the time it
    is refused at; cancelled by ONE timer set for the earliest of them.

    `asyncio.timeout` around each read made a Timeout, a TimerHandle pushed on the loop's
    heap and cancelled again on every call (~10-25 us of the event loop per unary call
    under load, where nearly every read returns at once). Here a call costs two dict
    operations; the timer fires about once per READ_TIMEOUT_S while calls keep coming
    and not at all when the proxy is idle (it is not re-armed once nothing waits)."""

    __slots__ = ("_loop", "_timer", "_when", "expired", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.waiting: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._when = 0.0

    def add(self, task: asyncio.Task[Any], timeout_s: float) -> None:
        at = self._loop.time() + timeout_s
        self.waiting[task] = at
        if self._timer is None or at < self._when:
            self._arm(at)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._when = at
        self._timer = self._loop.call_at(at, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        late = [task for task, at in self.waiting.items() if at <= now]
        for task in late:
            del self.waiting[task]
            self.expired.add(task)
            task.cancel()
        if self.waiting:
            self._arm(min(self.waiting.values()))
        else:
            _WATCHES.pop(self._loop, None)


_WATCHES: dict[asyncio.AbstractEventLoop, _ReadWatch] = {}


async def read_one(context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    """The call's one request message, or MalformedRequest raised (NO_MESSAGE or
    NO_MESSAGE_IN_TIME)."""
    loop = asyncio.get_running_loop()
    watch = _WATCHES.get(loop)
    if watch is None:
        for closed in [other for other in _WATCHES if other.is_closed()]:
            del _WATCHES[closed]  # loops that ended with a timer still set (tests)
        watch = _WATCHES[loop] = _ReadWatch(loop)
    task = asyncio.current_task()
    assert task is not None  # a grpc handler always runs in a task
    watch.add(task, READ_TIMEOUT_S)
    try:
        request = await context.read()
    except asyncio.CancelledError:
        if task not in watch.expired:
            raise
        watch.expired.discard(task)
        task.uncancel()
        raise MalformedRequest(NO_MESSAGE_IN_TIME) from None
    finally:
        watch.waiting.pop(task, None)
    if request is grpc.aio.EOF:
        raise MalformedRequest(NO_MESSAGE)
    return request


def malformed() -> MalformedRequest:
    return MalformedRequest("the request is not a valid message of the method's request type")


def decode(request_cls: Any, raw: bytes) -> Any:
    """The request message from its bytes, or MalformedRequest."""
    try:
        return request_cls.FromString(raw)
    except Exception:  # noqa: BLE001  (DecodeError, and whatever a message class raises)
        raise malformed() from None


def shape(exc: Exception, call: CallInfo | None, method: str) -> ProxyError:
    """`exc` as the ProxyError the caller gets; call.code / call.reason say which."""
    err = to_proxy_error(exc)
    if isinstance(err, Internal) and not isinstance(exc, ProxyError):
        request_id = call.request_id if call is not None else ""
        log_event(
            log,
            "unexpected_error",
            level=logging.ERROR,
            method=method,
            request_id=request_id,
            error=repr(exc),
        )
        log.error("traceback for request %s", request_id, exc_info=exc)
    if call is not None:
        call.code = err.code.name
        call.reason = err.reason.value
    # Only its status is used from here on: drop the traceback and chained
    # exceptions, whose frames would otherwise sit in reference cycles (with the
    # call's objects) until a full collection, which cancel storms make costly.
    err.__traceback__ = err.__context__ = err.__cause__ = None
    return err


def final_chunk(chunk_cls: Any, seq: int, err: ProxyError) -> Any:
    """The in-band last chunk of a stream that fails after its first chunk."""
    return chunk_cls(
        is_final=True, seq=seq, error=to_status_proto(err), finish_reason=pb.FINISH_REASON_ERROR
    )


async def fail(context: grpc.aio.ServicerContext[Any, Any], err: ProxyError) -> None:
    await abort_with(context, err)


def cancelled_code(context: Context) -> str:
    """Why a call was cancelled under the handler: the caller's deadline (grpc-core ends
    the call when it passes; the proxy normally answers just before, see
    interceptors/deadline.py) or the caller leaving."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"


# -- other services (health, reflection, admin): the same MALFORMED_REQUEST ----------------

_FACTORIES: Final = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _Malformed:
    """What the safe deserializer returns for bytes that are not a valid message."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<malformed request>"


MALFORMED: Final = _Malformed()


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize_or_mark(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception:  # noqa: BLE001
            return MALFORMED

    return deserialize_or_mark


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is MALFORMED:
            raise malformed()
        yield request


Wrap = Callable[[str, Callable[..., Any], bool], Callable[..., Any]]


def safe_handler(
    handler: grpc.RpcMethodHandler[Any, Any], path: str, wrap: Wrap | None = None
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` (of a service beside the pipeline) in the one error shape: a request
    deserializer that never raises (bytes that do not decode get INVALID_ARGUMENT
    MALFORMED_REQUEST, not grpc's UNKNOWN naming the exception class), ProxyErrors as
    their Status, anything else INTERNAL without its text; an abort is kept. `wrap`
    (e.g. the auth guard) wraps the behaviour first. Built once, at registration."""
    if handler.request_streaming and handler.request_deserializer is None and wrap is None:
        return handler
    # grpc's stubs type the behaviours as sync callables; on a grpc.aio server they are
    # coroutine functions or async generator functions, hence Any.
    behavior: Callable[..., Any] = cast(
        Callable[..., Any],
        handler.unary_unary
        or handler.unary_stream
        or handler.stream_unary
        or handler.stream_stream,
    )
    if wrap is not None:
        behavior = wrap(path, behavior, handler.response_streaming)
    deserializer = (
        None if handler.request_deserializer is None else _safe(handler.request_deserializer)
    )
    if handler.response_streaming:

        async def guarded_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                if not handler.request_streaming:
                    request = await read_one(context)
                if request is MALFORMED:
                    raise malformed()
                if handler.request_streaming:
                    request = _checked(request)
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write (health Watch)
                    await result
                return
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                err = shape(exc, None, path)
            await fail(context, err)

        wrapped: Callable[..., Any] = guarded_stream
    else:

        async def guarded_unary(request: Any, context: Any) -> Any:
            try:
                if not handler.request_streaming:
                    request = await read_one(context)
                if request is MALFORMED:
                    raise malformed()
                if handler.request_streaming:
                    request = _checked(request)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                err = shape(exc, None, path)
            await fail(context, err)

        wrapped = guarded_unary
    # Request-streaming whatever the method's kind: see NO_MESSAGE.
    factory = _FACTORIES[(True, handler.response_streaming)]
    return factory(
        wrapped,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


class SafeGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers go through `safe_handler` (cached: built
    once per method path that exists)."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Wrap | None = None) -> None:
        self._inner = inner
        self._wrap = wrap
        self._cache: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if method in self._cache:
            return self._cache[method]
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None  # not cached: callers choose the paths
        safe = self._cache[method] = safe_handler(handler, method, self._wrap)
        return safe
