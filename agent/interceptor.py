"""Per-call concerns of AgentService, kept out of the handlers: the call log, fault
injection, and turning handler exceptions into statuses.

Log lines (JSON on stderr, see agent.logs):
  call_started   method, request_id, deadline_remaining_ms, traceparent
  call_finished  method, request_id, code, chunks, cancelled, duration_ms, injected
A caller that leaves cancels the handler's task; call_finished is logged from the
CancelledError at once (tests time it against the caller's cancel) and re-raised.

MetadataRecorder (TEST ONLY, `--record-metadata FILE`): writes the metadata each
AgentService call arrived with, names and values, one JSON line per call, so tests can
prove what the proxy forwards (e.g. that it drops authorization, cookie, x-api-key).
Off by default; it writes credentials to disk, so no production path turns it on.

Streaming handlers are async generators; the wrapper drives them and writes each chunk
with context.write, so that a cancellation raised anywhere (in the handler's sleep or
in the write) lands in this one coroutine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from aiproxy.agent import errors, faults
from aiproxy.agent.errors import InvalidArgument
from aiproxy.agent.logs import log_event

log = logging.getLogger("agent.calls")

SERVICE_NAME = "ai.agent.v1.AgentService"
# Trailing metadata on every AgentService call: which replica answered (--replica-name,
# default the bound HOST:PORT), e.g. for a demo page or a test of session routing.
REPLICA_TRAILER = "x-agent-replica"
# Methods where x-fault-rate applies to each item of the request, not to the call.
PER_ITEM_FAULT_METHODS = frozenset({"BatchGenerate"})


class _Call:
    """One call's identity and counters, and its two log lines."""

    __slots__ = ("_started", "chunks", "injected", "method", "request_id")

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.chunks = 0
        self.injected = False
        self._started = time.monotonic()
        request_id, traceparent = "", None
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id":
                request_id = value
            elif key == "traceparent":
                traceparent = value
        self.request_id = request_id
        remaining = context.time_remaining()
        log_event(
            log,
            "call_started",
            method=method,
            request_id=request_id,
            deadline_remaining_ms=None if remaining is None else round(remaining * 1000, 1),
            traceparent=traceparent,
        )

    def finished(
        self, code: str, cancelled: bool = False, level: int = logging.INFO, **extra: Any
    ) -> None:
        log_event(
            log,
            "call_finished",
            level,
            method=self.method,
            request_id=self.request_id,
            code=code,
            chunks=self.chunks,
            cancelled=cancelled,
            duration_ms=round((time.monotonic() - self._started) * 1000, 1),
            injected=self.injected,
            **extra,
        )


class MetadataRecorder:
    """TEST ONLY: one JSON line per call, {"method": ..., "metadata": [[name, value], ...]}.

    Binary (-bin) values are written as {"base64": ...}. The file is opened once, line
    buffered: a write is one short append to the page cache, which is acceptable for a
    test-only tool on the event loop (it never runs in production).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def record(self, method: str, metadata: Any) -> None:
        pairs = [
            [key, value if isinstance(value, str) else {"base64": base64.b64encode(value).decode()}]
            for key, value in metadata or ()
        ]
        self._file.write(json.dumps({"method": method, "metadata": pairs}) + "\n")

    def close(self) -> None:
        self._file.close()


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every AgentService handler; other services (health, reflection) pass through."""

    def __init__(
        self,
        *,
        enable_faults: bool,
        service: str = SERVICE_NAME,
        recorder: MetadataRecorder | None = None,
    ) -> None:
        self._enable_faults = enable_faults
        self._recorder = recorder  # test only, see MetadataRecorder
        # Set by AgentServer once it has bound its port (x-agent-replica); "" sends none.
        self.replica = ""
        self._prefix = f"/{service}/"
        self._per_item = {self._prefix + m for m in PER_ITEM_FAULT_METHODS}
        # Handlers are wrapped once per method, not per call: the wrapper reads all it
        # needs from the call's context.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if not method.startswith(self._prefix):
            return await continuation(handler_call_details)
        if self._recorder is not None:
            self._recorder.record(method, handler_call_details.invocation_metadata)
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # unknown method: let grpc answer UNIMPLEMENTED
                return handler
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self._unary(method, behavior, request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **codec)
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                await self._stream(method, stream_behavior, request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **codec)
        return handler  # the API has no client-streaming methods

    async def _unary(
        self, method: str, behavior: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        async with self._observed(method, context) as call:
            spec, fails = await self._faults(call, context)
            if fails:
                await self._inject(call, spec, context)
            with faults.active(spec):
                response = await behavior(request, context)
        return response

    async def _stream(
        self, method: str, behavior: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> None:
        async with self._observed(method, context) as call:
            spec, fails = await self._faults(call, context)
            if fails and spec.after == 0:
                await self._inject(call, spec, context)
            with faults.active(spec):
                async with contextlib.aclosing(behavior(request, context)) as chunks:
                    async for chunk in chunks:
                        if fails and call.chunks == spec.after:
                            await self._inject(call, spec, context)
                        if not call.chunks and self.replica:
                            # In the headers too: a stream's trailers come after its body,
                            # too late for a caller (a browser through Envoy) to show them.
                            await context.send_initial_metadata(((REPLICA_TRAILER, self.replica),))
                        await context.write(chunk)
                        call.chunks += 1

    @contextlib.asynccontextmanager
    async def _observed(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[_Call]:
        """Log the call's start and end; map handler exceptions to statuses."""
        call = _Call(method, context)
        if self.replica:
            # Kept by errors.abort_with, which merges its status into the trailers.
            context.set_trailing_metadata(((REPLICA_TRAILER, self.replica),))
        try:
            yield call
        except asyncio.CancelledError:
            # Past its deadline the call is cancelled too; say which it was.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            call.finished("DEADLINE_EXCEEDED" if expired else "CANCELLED", cancelled=True)
            raise
        except grpc.aio.AbortError:
            code = context.code()
            call.finished(code.name if code is not None else "UNKNOWN")
            raise
        except InvalidArgument as exc:
            call.finished("INVALID_ARGUMENT", field=exc.field)
            await errors.abort_with(context, exc.to_status())
        except errors.StatusError as exc:
            # E.g. the model server failed (agent.openai_backend): its status, as built.
            call.finished(exc.code_name, reason=exc.reason)
            await errors.abort_with(context, exc.to_status())
        except Exception:
            # A bug: log it with its traceback, tell the caller nothing internal.
            log.exception(
                "handler_failed",
                extra={"fields": {"method": method, "request_id": call.request_id}},
            )
            call.finished("INTERNAL", level=logging.ERROR)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        else:
            call.finished("OK")

    async def _faults(
        self, call: _Call, context: grpc.aio.ServicerContext
    ) -> tuple[faults.FaultSpec, bool]:
        """The call's faults and whether it is to fail; waits x-fault-delay-ms first."""
        if not self._enable_faults:
            return faults.NO_FAULTS, False
        spec = faults.parse(context.invocation_metadata() or ())
        if spec.delay_ms:
            await asyncio.sleep(spec.delay_ms / 1000)
        return spec, spec.roll_call(per_item=call.method in self._per_item)

    @staticmethod
    async def _inject(
        call: _Call, spec: faults.FaultSpec, context: grpc.aio.ServicerContext
    ) -> None:
        call.injected = True
        if spec.hang:
            await asyncio.Event().wait()  # until the caller cancels or the deadline passes
        code = spec.failure_code
        await context.abort(code, f"injected fault: {code.name}")
