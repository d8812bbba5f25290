"""Stage: metrics, span attributes and the access log of every API call.

It is bound right after the request id (server/chain.py) and its exit runs after every
other stage's, once the pipeline has settled the FINAL status the caller gets (the
pipeline's own error shaping, refusals by auth, limits and validation, aborts, and
cancellations by the caller). It never changes the outcome.

Per call it records, once, at the end (streams: after the last chunk or the error, so
durations cover the whole stream):
  - py-grpc-prometheus's grpc_server_* series;
  - ai_proxy_requests_total, ai_proxy_request_duration_seconds, retries, affinity
    outcomes (hit, spill, failover), limiter rejections, tokens by model, stream first-chunk time, mean and largest chunk
    interval, active streams;
  - the OpenTelemetry GenAI conventions' gen_ai_* histograms (core/metrics.GenAiMetrics):
    duration of every call, token usage, and for successful streams the time to the first
    chunk and per output token after it;
  - the span attributes (request id, upstream, attempts, GenAI model and tokens);
  - one JSON access log line (aiproxy.access), formatted and written off the event loop,
    in batches (core/accesslog.py).
Per chunk it does nothing itself: the pipeline's one stream wrapper counts chunks and
keeps the first / last timestamps and the largest gap in CallInfo. Label children are
resolved in bind, once per method (and once per status code), never per call.
Health checks and reflection never reach the pipeline, so they have no series here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from aiproxy.core.accesslog import access_log
from aiproxy.core.callinfo import CallInfo
from aiproxy.core.errors import Reason
from aiproxy.core.logs import log_event
from aiproxy.core.metrics import GEN_AI_OPERATIONS, CallTelemetry
from aiproxy.core.service import Method
from aiproxy.core.types import Context

OK = grpc.StatusCode.OK
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
# Reasons of admission control (the limiter's refusals), counted as rejections.
LIMIT_REASONS = frozenset(
    {Reason.RATE_LIMITED.value, Reason.CONCURRENCY_LIMITED.value, Reason.OVERLOADED.value}
)

INFO = logging.INFO
UNARY = "UNARY"
SERVER_STREAMING = "SERVER_STREAMING"


def _has_field(message: Any, name: str) -> bool:
    return name in type(message).DESCRIPTOR.fields_by_name


class _Method:
    """One method's label children (made once) and what its messages carry."""

    __slots__ = (
        "_affinity",
        "_affinity_children",
        "_handled",
        "_handled_children",
        "_obs",
        "_probed_request",
        "_probed_response",
        "_requests",
        "_requests_children",
        "active",
        "api",
        "chunks",
        "duration",
        "exit",
        "first_chunk",
        "gap_max",
        "gen_ai_children",
        "gen_ai_operation",
        "grpc_type",
        "handling",
        "interval",
        "msg_received",
        "msg_sent",
        "name",
        "path",
        "request_model",
        "response_model",
        "response_usage",
        "retries",
        "started",
    )

    def __init__(self, obs: Observability, method: Method) -> None:
        self._obs = obs
        self.exit = self._exit
        path = method.path
        _, _, name = path.lstrip("/").partition("/")
        self.path, self.name = path, name
        self.grpc_type = SERVER_STREAMING if method.streaming else UNARY
        self.api = True
        self._handled_children: dict[str, Any] = {}
        self._affinity_children: dict[str, Any] = {}
        self._requests_children: dict[str, Any] = {}
        self.request_model = self.response_model = self.response_usage = False
        self._probed_request = self._probed_response = False
        # The label children, made on the method's first call (a series appears once it
        # counts something, as it always did), then kept: never looked up per call.
        self.started: Any = None
        self.msg_received: Any = None
        self.msg_sent: Any = None
        self.handling: Any = None
        self.duration: Any = None
        self.retries: Any = None
        self.active: Any = None
        self.chunks: Any = None
        self.first_chunk: Any = None
        self.interval: Any = None
        self.gap_max: Any = None
        self.gen_ai_operation = GEN_AI_OPERATIONS.get(name, "")
        # (model label, error type) -> the gen_ai_* children of this method.
        self.gen_ai_children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def _resolve(self) -> None:
        telemetry = self._obs._t
        service, _, name = self.path.lstrip("/").partition("/")
        g = telemetry.grpc_server
        labels = (self.grpc_type, service, name)
        self.msg_received = g.msg_received.labels(*labels)
        self.msg_sent = g.msg_sent.labels(*labels)
        self.handling = g.handling_seconds.labels(*labels)
        self._handled = g.handled
        p = telemetry.proxy
        self._requests = p.requests
        self._affinity = p.affinity
        self.duration = p.request_duration.labels(name)
        self.retries = p.retries.labels(name)
        if self.grpc_type is SERVER_STREAMING:
            self.active = p.active_streams.labels(name)
            self.chunks = p.stream_chunks.labels(name)
            self.first_chunk = p.first_chunk.labels(name)
            self.interval = p.chunk_interval.labels(name)
            self.gap_max = p.chunk_gap_max.labels(name)
        self.started = g.started.labels(*labels)  # last: it marks the others as made

    def handled(self, code: str) -> Any:
        child = self._handled_children.get(code)
        if child is None:
            child = self._handled_children[code] = self._handled.labels(
                self.grpc_type, *self.path.lstrip("/").split("/", 1), code
            )
        return child

    def affinity(self, outcome: str) -> Any:
        child = self._affinity_children.get(outcome)
        if child is None:
            child = self._affinity_children[outcome] = self._affinity.labels(self.name, outcome)
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

    async def enter(self, call: CallInfo, request: Any, context: Context) -> None:
        if self.started is None:
            self._resolve()
        self.started.inc()
        self.msg_received.inc()
        if self.active is not None:
            self.active.inc()

    def _exit(self, call: CallInfo) -> None:
        self._obs.finish(self, call)


class Observability:
    """Stage: see the module docstring."""

    def __init__(self, telemetry: CallTelemetry) -> None:
        self._t = telemetry
        self._tracing = telemetry.tracing
        self._access = telemetry.access_log
        self._writer = telemetry.access_writer
        self._token_children: dict[tuple[str, str], Any] = {}
        if self._tracing:
            from opentelemetry import trace

            self._current_span: Callable[[], Any] | None = trace.get_current_span
        else:
            self._current_span = None

    def bind(self, method: Method) -> _Method:
        return _Method(self, method)

    def _count_tokens(self, model: str, prompt: int, completion: int) -> None:
        """ai_proxy_tokens_total, each (model label, kind) child made once (the labels
        are bounded by core.metrics.MAX_MODELS, so is this cache)."""
        label = self._t.proxy.model_label(model or "unknown")
        if prompt:
            self._tokens(label, "prompt").inc(prompt)
        if completion:
            self._tokens(label, "completion").inc(completion)

    def _tokens(self, label: str, kind: str) -> Any:
        child = self._token_children.get((label, kind))
        if child is None:
            child = self._token_children[(label, kind)] = self._t.proxy.tokens.labels(label, kind)
        return child

    # -- the end of a call -------------------------------------------------------------

    def finish(self, m: _Method, call: CallInfo) -> None:
        elapsed = time.monotonic() - call.started
        status = call.code
        m.handled(status).inc()
        m.handling.observe(elapsed)
        if status == "OK":
            call.reason = ""
            if m.grpc_type is UNARY:
                m.msg_sent.inc()
        elif not call.reason or status == "DEADLINE_EXCEEDED":
            # Aborted by someone other than the pipeline's shaping (or cancelled, or cut
            # off by the caller's deadline: its reason then says so, not CANCELLED).
            call.reason = Reason.CANCELLED.value if status == "CANCELLED" else status
        if m.active is not None:
            m.active.dec()
        m.requests(status).inc()
        m.duration.observe(elapsed)
        if call.retries:
            m.retries.inc(call.retries)
        if call.affinity:
            m.affinity(call.affinity).inc()
        if call.reason in LIMIT_REASONS:
            source = "proxy" if call.attempts == 0 else "upstream"
            self._t.proxy.rate_limit_rejections.labels(m.name, call.reason, source).inc()
        n = call.chunks
        if n and m.chunks is not None:  # a stream (these children exist for streams only)
            m.msg_sent.inc(n)
            m.chunks.inc(n)
            call.first_chunk_s = call.first_at - call.started
            if m.first_chunk is not None:
                m.first_chunk.observe(call.first_chunk_s)
            if n > 1 and m.interval is not None and m.gap_max is not None:
                m.interval.observe((call.last_at - call.first_at) / (n - 1))
                m.gap_max.observe(call.gap_max)
        requested = self._usage(m, call, call.request, call.first, call.last)
        if m.gen_ai_operation:
            self._gen_ai(m, call, requested, elapsed)
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
            if not call.replayed:  # a cache hit or a resume consumed no tokens upstream
                self._count_tokens(call.model, usage.prompt_tokens, usage.completion_tokens)
        return requested

    def _gen_ai(self, m: _Method, call: CallInfo, requested: str, elapsed: float) -> None:
        """The gen_ai_* series (core/metrics.GenAiMetrics): gen_ai.request.model is the
        model the request named, else the one that answered (the service's default)."""
        ok = call.code == "OK"
        model = self._t.proxy.model_label(requested or call.model or "unknown")
        key = (model, "" if ok else call.code)
        children = m.gen_ai_children.get(key)
        if children is None:
            g = self._t.proxy.gen_ai
            labels = (m.gen_ai_operation, g.provider, model)
            children = m.gen_ai_children[key] = (
                g.request_duration.labels(*labels, key[1]),
                g.token_usage.labels(*labels, "input"),
                g.token_usage.labels(*labels, "output"),
                # Streams only: a unary answer has no first token to time.
                g.time_to_first_token.labels(*labels) if m.chunks is not None else None,
                g.time_per_output_token.labels(*labels) if m.chunks is not None else None,
            )
        duration, tokens_in, tokens_out, ttft, tpot = children
        duration.observe(elapsed)
        if (call.prompt_tokens or call.completion_tokens) and not call.replayed:
            tokens_in.observe(call.prompt_tokens)
            tokens_out.observe(call.completion_tokens)
        first = call.first_chunk_s
        if ok and first is not None and ttft is not None:
            ttft.observe(first)
            if call.completion_tokens > 1 and tpot is not None:
                tpot.observe(max(0.0, elapsed - first) / (call.completion_tokens - 1))

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
        if not access_log.isEnabledFor(INFO):
            return
        fields: dict[str, Any] = dict(
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
            affinity=call.affinity,
            attempts=call.attempts,
            retries=call.retries,
        )
        writer = self._writer
        if writer is not None and writer.running:
            writer.write(fields)  # a queue append; the writer thread formats and writes
        else:
            log_event(access_log, "access", INFO, **fields)
