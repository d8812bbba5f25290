"""Server interceptor: metrics, span attributes and the access log of every call.

It sits right inside RequestContextInterceptor (and inside the OpenTelemetry server
interceptor when tracing is on) and outside ErrorInterceptor, so what it records is the
FINAL status the caller gets: the ErrorInterceptor's conversions, aborts by auth, limits
and validation, and cancellations by the caller. It never changes the outcome: every
exception is re-raised as it came.

Per call it records, once, at the end (streams: after the last chunk or the error, so
durations cover the whole stream):
  - py-grpc-prometheus's grpc_server_* series (all services);
  - for the API (everything but health checks and reflection): ai_proxy_requests_total,
    ai_proxy_request_duration_seconds, retries, limiter rejections, tokens by model,
    stream first-chunk time, mean and largest chunk interval, active streams;
  - the span attributes (request id, upstream, attempts, GenAI model and tokens);
  - one JSON access log line (aiproxy.access).
Per chunk it only takes a timestamp and increments two counters. Label children are
created once per method and status, never per call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from core.callinfo import CallInfo, current_call
from core.errors import Reason
from core.logs import log_event
from core.metrics import CallTelemetry, untraced_services

access_log = logging.getLogger("aiproxy.access")

OK = grpc.StatusCode.OK
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
# Reasons of admission control (the limiter's refusals), counted as rejections.
LIMIT_REASONS = frozenset(
    {Reason.RATE_LIMITED.value, Reason.CONCURRENCY_LIMITED.value, Reason.OVERLOADED.value}
)
_UNTRACED = frozenset(untraced_services())

UNARY = "UNARY"
SERVER_STREAMING = "SERVER_STREAMING"
CLIENT_STREAMING = "CLIENT_STREAMING"
BIDI_STREAMING = "BIDI_STREAMING"


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return BIDI_STREAMING if handler.response_streaming else CLIENT_STREAMING
    return SERVER_STREAMING if handler.response_streaming else UNARY


def _has_field(message: Any, name: str) -> bool:
    return name in type(message).DESCRIPTOR.fields_by_name


class _Method:
    """One method's label children (made once) and what its messages carry."""

    __slots__ = (
        "path",
        "name",
        "grpc_type",
        "api",
        "started",
        "msg_received",
        "msg_sent",
        "handling",
        "_handled",
        "_handled_children",
        "_requests",
        "_requests_children",
        "duration",
        "retries",
        "active",
        "chunks",
        "first_chunk",
        "interval",
        "gap_max",
        "request_model",
        "response_model",
        "response_usage",
        "_probed_request",
        "_probed_response",
    )

    def __init__(self, telemetry: CallTelemetry, path: str, grpc_type: str) -> None:
        service, _, name = path.lstrip("/").partition("/")
        self.path, self.name, self.grpc_type = path, name, grpc_type
        g = telemetry.grpc_server
        labels = (grpc_type, service, name)
        self.started = g.started.labels(*labels)
        self.msg_received = g.msg_received.labels(*labels)
        self.msg_sent = g.msg_sent.labels(*labels)
        self.handling = g.handling_seconds.labels(*labels)
        self._handled = g.handled
        self._handled_children: dict[grpc.StatusCode, Any] = {}
        self.api = service not in _UNTRACED
        p = telemetry.proxy
        self._requests = p.requests
        self._requests_children: dict[str, Any] = {}
        self.duration = p.request_duration.labels(name)
        self.retries = p.retries.labels(name)
        streaming = grpc_type in (SERVER_STREAMING, BIDI_STREAMING)
        self.active = p.active_streams.labels(name) if streaming and self.api else None
        self.chunks = p.stream_chunks.labels(name) if streaming and self.api else None
        self.first_chunk = p.first_chunk.labels(name) if streaming and self.api else None
        self.interval = p.chunk_interval.labels(name) if streaming and self.api else None
        self.gap_max = p.chunk_gap_max.labels(name) if streaming and self.api else None
        self.request_model = self.response_model = self.response_usage = False
        self._probed_request = self._probed_response = False

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled_children.get(code)
        if child is None:
            child = self._handled_children[code] = self._handled.labels(
                self.grpc_type, *self.path.lstrip("/").split("/", 1), code.name
            )
        return child

    def requests(self, status: str) -> Any:
        child = self._requests_children.get(status)
        if child is None:
            child = self._requests_children[status] = self._requests.labels(self.name, status)
        return child

    def probe_request(self, request: Any) -> None:
        self._probed_request = True
        self.request_model = _has_field(request, "model")

    def probe_response(self, response: Any) -> None:
        self._probed_response = True
        self.response_model = _has_field(response, "model")
        self.response_usage = _has_field(response, "usage")


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, telemetry: CallTelemetry) -> None:
        self._t = telemetry
        self._methods: dict[tuple[str, str], _Method] = {}
        self._tracing = telemetry.tracing
        self._access = telemetry.access_log
        if self._tracing:
            from opentelemetry import trace

            self._current_span: Callable[[], Any] | None = trace.get_current_span
        else:
            self._current_span = None

    def _method(self, path: str, handler: grpc.RpcMethodHandler) -> _Method:
        grpc_type = _grpc_type(handler)
        key = (path, grpc_type)
        method = self._methods.get(key)
        if method is None:
            method = self._methods[key] = _Method(self._t, path, grpc_type)
        return method

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        m = self._method(handler_call_details.method, handler)
        ser, de = handler.response_serializer, handler.request_deserializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, m), de, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, m), de, ser
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, m), de, ser
            )
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.stream_stream, m), de, ser
        )

    # -- wrappers ----------------------------------------------------------------------

    def _requests_in(self, request: Any, m: _Method) -> Any:
        if m.grpc_type in (UNARY, SERVER_STREAMING):
            m.msg_received.inc()
            return request
        return _count(request, m.msg_received)

    def _unary(self, behavior: Callable, m: _Method) -> Callable:
        async def observed_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            m.started.inc()
            start = time.monotonic()
            call = current_call.get()
            request = self._requests_in(request, m)
            response = None
            code = OK
            try:
                response = await behavior(request, context)
                code = context.code() or OK
                if code is OK:
                    m.msg_sent.inc()
                return response
            except asyncio.CancelledError:
                code = _cancelled_code(context)
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._finish(m, call, code, start, request, response, response, None)

        return observed_unary

    def _stream(self, behavior: Callable, m: _Method) -> Callable:
        async def observed_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            m.started.inc()
            start = time.monotonic()
            call = current_call.get()
            request = self._requests_in(request, m)
            active, chunk_counter, sent = m.active, m.chunks, m.msg_sent
            if active is not None:
                active.inc()
            n = 0
            first_chunk = last_chunk = None
            first_at = last_at = 0.0
            gap_max = 0.0
            code = OK
            try:
                async for chunk in behavior(request, context):
                    now = time.monotonic()
                    if n:
                        gap = now - last_at
                        if gap > gap_max:
                            gap_max = gap
                    else:
                        first_at, first_chunk = now, chunk
                    last_at, last_chunk = now, chunk
                    n += 1
                    sent.inc()
                    if chunk_counter is not None:
                        chunk_counter.inc()
                    yield chunk
                code = context.code() or OK
            except (asyncio.CancelledError, GeneratorExit):
                code = _cancelled_code(context)
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                if active is not None:
                    active.dec()
                timing = (n, first_at, last_at, gap_max)
                self._finish(m, call, code, start, request, first_chunk, last_chunk, timing)

        return observed_stream

    # -- the end of a call -------------------------------------------------------------

    def _finish(
        self,
        m: _Method,
        call: CallInfo | None,
        code: grpc.StatusCode,
        start: float,
        request: Any,
        first: Any,
        last: Any,
        timing: tuple[int, float, float, float] | None,
    ) -> None:
        elapsed = time.monotonic() - start
        m.handled(code).inc()
        m.handling.observe(elapsed)
        if not m.api or call is None:
            return
        status = code.name
        call.code = status
        if code is OK:
            call.reason = ""
        elif not call.reason or code is DEADLINE_EXCEEDED:
            # Aborted by someone other than the ErrorInterceptor (or cancelled, or cut
            # off by the caller's deadline: its reason then says so, not CANCELLED).
            call.reason = Reason.CANCELLED.value if code is grpc.StatusCode.CANCELLED else status
        m.requests(status).inc()
        m.duration.observe(elapsed)
        if call.retries:
            m.retries.inc(call.retries)
        if call.reason in LIMIT_REASONS:
            source = "proxy" if call.attempts == 0 else "upstream"
            self._t.proxy.rate_limit_rejections.labels(m.name, call.reason, source).inc()
        if timing is not None:
            n, first_at, last_at, gap_max = timing
            call.chunks = n
            if n:
                call.first_chunk_s = first_at - call.started
                m.first_chunk.observe(call.first_chunk_s)
                if n > 1:
                    m.interval.observe((last_at - first_at) / (n - 1))
                    m.gap_max.observe(gap_max)
        requested = self._usage(m, call, request, first, last)
        if self._current_span is not None:
            self._annotate_span(call, requested)
        if self._access:
            self._log(call, elapsed)

    def _usage(self, m: _Method, call: CallInfo, request: Any, first: Any, last: Any) -> str:
        """Model and token counts from the request and the answer (no text is read).
        Returns the model the request named ("" for the service's default)."""
        if not isinstance(request, Message):  # e.g. bytes that did not decode
            request = None
        if request is not None and not m._probed_request:
            m.probe_request(request)
        requested = request.model if request is not None and m.request_model else ""
        if requested and not call.model:
            call.model = requested
        if first is None:
            return requested
        if not m._probed_response:
            m.probe_response(first)
        if m.response_model and first.model:
            call.model = first.model
        if m.response_usage and last is not None and last.HasField("usage"):
            usage = last.usage
            call.prompt_tokens = usage.prompt_tokens
            call.completion_tokens = usage.completion_tokens
            self._t.proxy.count_tokens(call.model, usage.prompt_tokens, usage.completion_tokens)
        return requested

    def _annotate_span(self, call: CallInfo, requested_model: str) -> None:
        assert self._current_span is not None
        span = self._current_span()
        if not span.is_recording():
            return
        span.set_attribute("aiproxy.request_id", call.request_id)
        if call.reason:
            span.set_attribute("aiproxy.reason", call.reason)
        if call.upstream:
            span.set_attribute("aiproxy.upstream", call.upstream)
            span.set_attribute("aiproxy.attempts", call.attempts)
        if call.caller:
            span.set_attribute("enduser.id", call.caller)
        # A request that names no model gets the service's default: the one that answered.
        if requested_model or call.model:
            span.set_attribute("gen_ai.request.model", requested_model or call.model)
        if call.model:
            span.set_attribute("gen_ai.response.model", call.model)
        if call.prompt_tokens or call.completion_tokens:
            span.set_attribute("gen_ai.usage.input_tokens", call.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", call.completion_tokens)
        if call.first_chunk_s is not None:
            span.set_attribute("aiproxy.first_chunk_ms", round(call.first_chunk_s * 1000, 3))
            span.set_attribute("aiproxy.chunks", call.chunks)

    def _log(self, call: CallInfo, elapsed: float) -> None:
        log_event(
            access_log,
            "access",
            request_id=call.request_id,
            method=call.method,
            caller=call.caller,
            code=call.code,
            reason=call.reason,
            duration_ms=round(elapsed * 1000, 3),
            first_chunk_ms=None
            if call.first_chunk_s is None
            else round(call.first_chunk_s * 1000, 3),
            chunks=call.chunks,
            model=call.model,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            upstream=call.upstream,
            attempts=call.attempts,
            retries=call.retries,
        )


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why a call was cancelled under the handler: the caller's deadline (grpc-core ends
    the call when it passes; the proxy normally answers just before, see
    interceptors/deadline.py) or the caller leaving."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


async def _count(requests: Any, counter: Any) -> AsyncIterator[Any]:
    async for request in requests:
        counter.inc()
        yield request
