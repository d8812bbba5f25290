"""Server interceptor: every error leaves the proxy in the one shape of errors.py.

- A ProxyError raised anywhere inside (limits, validation, the forwarder) becomes its
  google.rpc.Status; a failed upstream call is mapped by core/upstream_errors.py; anything
  else is a bug: INTERNAL with a generic message, the traceback in the log.
- A status already set (someone called context.abort) is never overwritten.
- Request bytes that do not decode (grpc would answer UNKNOWN with the exception's
  class name) are INVALID_ARGUMENT with reason MALFORMED_REQUEST, for every service.
- Streams: an error after the first chunk cannot become an HTTP status any more, and
  browsers cannot read trailers, so the caller first gets a last in-band chunk
  (is_final, finish_reason ERROR, `error` = the status) and then the same status.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import grpc
from grpc_interceptor.server import AsyncServerInterceptor

from ai.agent.v1 import agent_service_pb2 as pb
from core.callinfo import current_call
from core.errors import (
    Internal,
    MalformedRequest,
    ProxyError,
    abort_with,
    to_status_proto,
)
from core.logs import log_event
from core.upstream_errors import to_proxy_error

log = logging.getLogger("aiproxy.errors")

# (request streaming, response streaming) -> the grpc handler factory of that kind.
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


def safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserialize` that returns MALFORMED instead of raising.

    grpc runs the request deserializer before any interceptor; when it raises (a
    DecodeError on bytes that are not the message) grpc answers UNKNOWN with
    "Unexpected <class '...DecodeError'>: ...", neither the right code nor a message a
    caller should see. The interceptor turns MALFORMED into INVALID_ARGUMENT instead.
    """
    if deserialize is None:
        return None

    def deserialize_or_mark(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception:
            return MALFORMED

    return deserialize_or_mark


def _malformed() -> MalformedRequest:
    return MalformedRequest("the request is not a valid message of the method's request type")


async def _checked_requests(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is MALFORMED:
            raise _malformed()
        yield request


class ErrorInterceptor(AsyncServerInterceptor):
    def __init__(self, stream_response_classes: Mapping[str, type]) -> None:
        # method path -> the chunk message of that server-streaming method
        self._chunk_classes = dict(stream_response_classes)

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        """The wrapped handler, with a request deserializer that never raises (every
        service: the API, health, reflection). Interceptors outside this one copy it."""
        handler = await super().intercept_service(continuation, handler_call_details)
        if handler is None:
            return None
        factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
        behavior = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        return factory(
            behavior,
            request_deserializer=safe_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    async def intercept(
        self,
        method: Callable,
        request_or_iterator: Any,
        context: grpc.aio.ServicerContext,
        method_name: str,
    ) -> Any:
        try:
            if request_or_iterator is MALFORMED:
                raise _malformed()
            if hasattr(request_or_iterator, "__aiter__"):
                request_or_iterator = _checked_requests(request_or_iterator)
            result = method(request_or_iterator, context)
            if hasattr(result, "__aiter__"):
                return self._guard_stream(result, context, method_name)
            return await result
        except grpc.aio.AbortError:
            raise  # a status someone already chose
        except Exception as exc:
            err = self._convert(exc, method_name)
        # Aborted outside the except block: the abort does not chain the original
        # exception (and, through its traceback, this call's frames) as its __context__.
        await self._fail(context, err)

    async def _guard_stream(
        self, chunks: AsyncIterator[Any], context: grpc.aio.ServicerContext, method_name: str
    ) -> AsyncIterator[Any]:
        sent = 0
        try:
            async for chunk in chunks:
                yield chunk
                sent += 1
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            err = self._convert(exc, method_name)
        else:
            return
        chunk_cls = self._chunk_classes.get(method_name)
        if sent and chunk_cls is not None:
            # seq continues the stream's numbering: every chunk so far passed here.
            yield chunk_cls(
                is_final=True,
                seq=sent,
                error=to_status_proto(err),
                finish_reason=pb.FINISH_REASON_ERROR,
            )
        await self._fail(context, err)

    def _convert(self, exc: Exception, method_name: str) -> ProxyError:
        err = to_proxy_error(exc)
        call = current_call.get()
        if isinstance(err, Internal) and not isinstance(exc, ProxyError):
            log_event(
                log,
                "unexpected_error",
                level=logging.ERROR,
                method=method_name,
                request_id=call.request_id if call else "",
                error=repr(exc),
            )
            log.error("traceback for request %s", call.request_id if call else "", exc_info=exc)
        if call is not None:
            call.code = err.code.name
            call.reason = err.reason.value
        # Only its status is used from here on: drop the traceback and chained
        # exceptions, whose frames would otherwise sit in reference cycles (with the
        # call's objects) until a full collection, which cancel storms make costly.
        err.__traceback__ = err.__context__ = err.__cause__ = None
        return err

    async def _fail(self, context: grpc.aio.ServicerContext, err: ProxyError) -> None:
        await abort_with(context, err)
