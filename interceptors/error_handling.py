"""Server interceptor: every error leaves the proxy in the one shape of errors.py.

- A ProxyError raised anywhere inside (limits, validation, the forwarder) becomes its
  google.rpc.Status; a failed upstream call is mapped by errors.from_upstream; anything
  else is a bug: INTERNAL with a generic message, the traceback in the log.
- A status already set (someone called context.abort) is never overwritten.
- Streams: an error after the first chunk cannot become an HTTP status any more, and
  browsers cannot read trailers, so the caller first gets a last in-band chunk
  (is_final, finish_reason ERROR, `error` = the status) and then the same status.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from grpc_interceptor.server import AsyncServerInterceptor

from ai.agent.v1 import agent_service_pb2 as pb
from interceptors.errors import Internal, ProxyError, abort_with, to_proxy_error, to_status_proto
from server.callinfo import current_call
from server.logs import log_event

log = logging.getLogger("aiproxy.errors")


class ErrorInterceptor(AsyncServerInterceptor):
    def __init__(self, stream_response_classes: Mapping[str, type]) -> None:
        # method path -> the chunk message of that server-streaming method
        self._chunk_classes = dict(stream_response_classes)

    async def intercept(
        self, method: Callable, request_or_iterator: Any, context: grpc.aio.ServicerContext, method_name: str
    ) -> Any:
        try:
            result = method(request_or_iterator, context)
            if hasattr(result, "__aiter__"):
                return self._guard_stream(result, context, method_name)
            return await result
        except grpc.aio.AbortError:
            raise  # a status someone already chose
        except Exception as exc:
            await self._fail(context, self._convert(exc, method_name))

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
            chunk_cls = self._chunk_classes.get(method_name)
            if sent and chunk_cls is not None:
                # seq continues the stream's numbering: every chunk so far passed here.
                yield chunk_cls(is_final=True, seq=sent, error=to_status_proto(err), finish_reason=pb.FINISH_REASON_ERROR)
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
        return err

    async def _fail(self, context: grpc.aio.ServicerContext, err: ProxyError) -> None:
        await abort_with(context, err)
