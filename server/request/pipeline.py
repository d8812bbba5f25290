"""The request pipeline: ONE grpc handler per AgentService method, composed at start-up.

API calls do not go through grpc.aio server interceptors: for each method of the service
model (core/service.py) this module binds every stage once (server/chain.py gives the
order; interceptors/stage.py the interface) and builds one RpcMethodHandler whose frame:

  1. reads the caller's metadata ONCE into a dict and runs the overload gate on it
     (nothing read or decoded, no CallInfo: a refusal is as cheap as it can be);
  2. reads the request message and opens the CallInfo with that metadata;
  3. runs each bound stage's `enter` in order, decoding the request where DECODE sits
     (bytes that do not decode: INVALID_ARGUMENT MALFORMED_REQUEST, here only);
  4. calls the terminal (the forwarder) with the message AND the caller's bytes, which
     go upstream as they came (the proxy never modifies a request: no re-serializing);
  5. is the one place errors are shaped: a ProxyError or an upstream failure becomes its
     Status (interceptors/error_handling.py), an abort is never overwritten, a stream
     that fails after its first chunk ends with the in-band final chunk;
  6. runs the `exit` of every stage whose `enter` succeeded, innermost first, exactly
     once (return, stream end, error, cancellation), with the final status in CallInfo.

A stream's chunk crosses one wrapper, this frame's own async generator, which keeps the
count, the first / last timestamps and the largest gap for observability inline.

Requests are registered with no deserializer (raw bytes), responses with the method's
serializer. Every method is registered as request-STREAMING and the frame reads its one
message itself (`context.read()`): grpc.aio's unary-request path, given a call whose
stream ends without one whole message (no DATA, or a length prefix larger than the bytes
that came, then END_STREAM), never calls the handler and never answers either, so the
caller waited until its own deadline, forever without one. Here such a call gets
INVALID_ARGUMENT / MALFORMED_REQUEST at once, like any request that does not decode.

Health, reflection and admin are registered beside the pipeline (with the same
MALFORMED_REQUEST shaping, interceptors/error_handling.safe_handler) and never run the
business chain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from aiproxy.core.callinfo import CallInfo, current_call, metadata_dict
from aiproxy.core.errors import MalformedRequest
from aiproxy.core.headers import REPLY_HEADERS_HEADER
from aiproxy.core.service import Method, Service
from aiproxy.core.shedding import Ticket
from aiproxy.core.types import Context, StreamCall, UnaryCall
from aiproxy.interceptors.error_handling import (
    cancelled_code,
    decode,
    fail,
    final_chunk,
    read_one,
    shape,
)
from aiproxy.interceptors.overload import GateCheck, OverloadGate
from aiproxy.interceptors.stage import Bound, Decode, Exit, Step

log = logging.getLogger("aiproxy.pipeline")

# What a handler decodes at DECODE: the wire input (the request bytes, for a native call)
# -> the request message and the bytes the terminal forwards upstream. A front (another
# API mapped onto a method, server/request/openai_front.py) brings its own, raising a
# ProxyError for input it refuses; the pipeline shapes that like any other refusal.
Decoder = Callable[[Any], tuple[Any, bytes]]


class Terminal(Protocol):
    """What the pipeline hands an admitted call to, per method: the forwarder (with the
    cache and resumable streams in front of it); in tests, a stand-in agent
    (tests/support/pipeline.py)."""

    def unary(self, method: Method) -> UnaryCall: ...

    def stream(self, method: Method) -> StreamCall: ...


def _aborted_code(context: Context) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _run_exits(exits: Sequence[Exit | None], n: int, call: CallInfo) -> None:
    """The exits of the first `n` stages, innermost first; one failing never skips the
    others (it is a bug: logged, the call's outcome unchanged)."""
    for i in range(n - 1, -1, -1):
        done = exits[i]
        if done is not None:
            try:
                done(call)
            except Exception:
                log.exception("a pipeline stage failed at the end of request %s", call.request_id)


class Pipeline:
    """The handlers of one service, built once (see the module docstring)."""

    def __init__(
        self,
        service: Service,
        stages: Sequence[Step],
        terminal: Terminal,
        gate: OverloadGate | None = None,
    ) -> None:
        self.service = service
        self.handlers: dict[str, grpc.RpcMethodHandler[bytes, Any]] = {}
        # Per method: what its handlers are built from (a front builds more, `behavior`).
        self._parts: dict[str, tuple[Method, GateCheck | None, list[Bound], int, Any]] = {}
        for method in service.methods:
            bound: list[Bound] = []
            decode_at = -1
            for stage in stages:
                if isinstance(stage, Decode):
                    decode_at = len(bound)
                    continue
                b = stage.bind(method)
                if b is not None:
                    bound.append(b)
            if decode_at < 0:
                decode_at = len(bound)
            check = gate.bind(method) if gate is not None else None
            # A StreamCall for a streaming method, else a UnaryCall.
            end: Any = terminal.stream(method) if method.streaming else terminal.unary(method)
            self._parts[method.name] = (method, check, bound, decode_at, end)
            decoder = native_decoder(method.request_cls)
            if method.streaming:
                self.handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    _stream_handler(method, check, bound, decode_at, end, decoder, read=True),
                    request_deserializer=None,
                    response_serializer=method.response_cls.SerializeToString,
                )
            else:
                self.handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                    _unary_handler(method, check, bound, decode_at, end, decoder, read=True),
                    request_deserializer=None,
                    response_serializer=method.response_cls.SerializeToString,
                )

    def behavior(self, name: str, decoder: Decoder) -> Callable[..., Any]:
        """Method `name`'s handler function, `(wire input, context)`, with `decoder` at
        DECODE: the same gate, stages and terminal as the method's own handler (built
        once, at start-up), given its input instead of reading it. A front calls it with
        its own input and a context of its own (server/request/openai_front.py) and gets
        the method's answer or chunks."""
        method, check, bound, decode_at, end = self._parts[name]
        if method.streaming:
            return _stream_handler(method, check, bound, decode_at, end, decoder, read=False)
        return _unary_handler(method, check, bound, decode_at, end, decoder, read=False)

    def register(self, server: grpc.aio.Server) -> None:
        # Registered, not generic: grpc-core then queues each method's new calls apart, so
        # a burst on one method does not hold up calls to the others before the gate
        # (a light caller's Generate is taken beside 3,000 queued StreamGenerate).
        server.add_registered_method_handlers(self.service.name, self.handlers)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(self.service.name, self.handlers)


async def _read_one(context: Context) -> bytes:
    """The call's request message (see the module docstring: why not grpc's own read)."""
    try:
        raw: bytes = await read_one(context)
    except MalformedRequest as err:
        await fail(context, err)
    return raw


def native_decoder(request_cls: Any) -> Decoder:
    """A native call's decoder: the message from the caller's bytes, which go upstream
    as they came (never re-serialized)."""

    def decode_native(raw: bytes) -> tuple[Any, bytes]:
        return decode(request_cls, raw), raw

    return decode_native


def _open(
    method: Method,
    context: Context,
    headers: dict[str, str | bytes],
    repeated: frozenset[str],
) -> CallInfo:
    call = CallInfo(method.path, metadata=headers, repeated=repeated, peer=context.peer())
    current_call.set(call)
    return call


def _release(check: GateCheck, ticket: Ticket | None, call: CallInfo | None) -> None:
    """The gate's place of a call that ends, with what auth verified about its caller."""
    if call is None:
        check.gate.release(ticket, "", "")
    else:
        check.gate.release(ticket, call.identity, call.tenant)


def _unary_handler(
    method: Method,
    check: GateCheck | None,
    bound: Sequence[Bound],
    decode_at: int,
    terminal: UnaryCall,
    decoder: Decoder,
    *,
    read: bool,
) -> Callable[[Any, Context], Awaitable[Any]]:
    """`read`: the handler reads its request message itself (native, registered as
    request-streaming; its first argument is grpc's request iterator, unused), else its
    first argument is the wire input (a front's)."""
    enters = tuple(b.enter for b in bound)
    exits = tuple(b.exit for b in bound)
    n = len(enters)
    path = method.path

    async def unary(given: Any, context: Context) -> Any:
        headers, repeated = metadata_dict(context.invocation_metadata())
        ticket = None
        if check is not None:
            ticket = await check.check(context, headers)
        call: CallInfo | None = None
        entered = 0
        try:
            wire = await _read_one(context) if read else given
            call = _open(method, context, headers, repeated)
            # A native caller gets the reply metadata with the status unless it asks
            # otherwise; a front's caller (read=False) reads them as response headers.
            call.reply_in_trailers = read and headers.get(REPLY_HEADERS_HEADER) != "initial"
            request = None
            raw = b""
            while entered < n:
                if entered == decode_at:
                    request, raw = decoder(wire)
                    call.request = request
                await enters[entered](call, request, context)
                entered += 1
            if decode_at == n:
                request, raw = decoder(wire)
                call.request = request
            response = await terminal(request, raw, context, call)
            call.first = call.last = response
            return response
        except grpc.aio.AbortError:
            if call is not None:
                call.code = _aborted_code(context)
            raise  # a status someone already chose
        except asyncio.CancelledError:
            if call is not None:
                call.code = cancelled_code(context)
            raise
        except Exception as exc:
            if call is None:
                raise
            err = shape(exc, call, path)
        finally:
            if call is not None:
                _run_exits(exits, entered, call)
            if check is not None:
                _release(check, ticket, call)
        # Aborted outside the except block: the abort does not chain the original
        # exception (and, through its traceback, this call's frames) as its __context__.
        await fail(context, err)

    return unary


def _stream_handler(
    method: Method,
    check: GateCheck | None,
    bound: Sequence[Bound],
    decode_at: int,
    terminal: StreamCall,
    decoder: Decoder,
    *,
    read: bool,
) -> Callable[[Any, Context], AsyncGenerator[Any, None]]:
    """`read` as for _unary_handler."""
    enters = tuple(b.enter for b in bound)
    exits = tuple(b.exit for b in bound)
    n = len(enters)
    path, chunk_cls = method.path, method.response_cls
    monotonic = time.monotonic

    first_chunk = check.gate.first_chunk.sample if check is not None else None

    async def stream(given: Any, context: Context) -> AsyncGenerator[Any, None]:
        taken_at = monotonic()
        headers, repeated = metadata_dict(context.invocation_metadata())
        ticket = None
        if check is not None:
            ticket = await check.check(context, headers)
        try:
            wire = await _read_one(context) if read else given
        except BaseException:
            if check is not None:
                _release(check, ticket, None)
            raise
        call = _open(method, context, headers, repeated)
        entered = 0
        sent = 0
        first: Any = None  # the first and last chunk handed to gRPC (None: none yet)
        last: Any = None
        first_at = last_at = gap_max = 0.0
        chunks: AsyncGenerator[Any, None] | None = None
        try:
            err = None
            try:
                request = None
                raw = b""
                while entered < n:
                    if entered == decode_at:
                        request, raw = decoder(wire)
                        call.request = request
                    await enters[entered](call, request, context)
                    entered += 1
                if decode_at == n:
                    request, raw = decoder(wire)
                    call.request = request
                chunks = terminal(request, raw, context, call)
                # Set by the limits stage when the call holds a token reservation: a
                # stream that ends without usage is charged the chunks that went out.
                count = call.chunk_tokens
                async for chunk in chunks:
                    now = monotonic()
                    if sent:
                        gap = now - last_at
                        if gap > gap_max:
                            gap_max = gap
                    else:
                        first_at, first = now, chunk
                        if first_chunk is not None:
                            first_chunk(now - taken_at)
                        if ticket is not None:
                            ticket.first_at = now
                    last_at, last = now, chunk
                    sent += 1
                    if ticket is not None:
                        # The gate's sampler reads the stream's cadence from its ticket
                        # (interceptors/overload.OverloadGate.stream_lateness).
                        ticket.last_at = now
                        ticket.chunks = sent
                    # Counted as it is handed to gRPC, not after the write: a caller that
                    # cancels right after reading a chunk can cancel before this frame
                    # resumes, and must still be charged for it (at most one chunk in
                    # flight is charged without being seen, never one seen and not charged).
                    if count is not None:
                        call.streamed_tokens += count(chunk)
                    yield chunk
            except grpc.aio.AbortError:
                call.code = _aborted_code(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                call.code = cancelled_code(context)
                raise
            except Exception as exc:
                err = shape(exc, call, path)
            if err is not None:
                if sent:
                    # seq continues the stream's numbering: every chunk so far passed here,
                    # except on a resume, which started after the caller's last-event-id.
                    nxt = last.seq + 1 if call.replayed == "resume" else sent
                    last = final_chunk(chunk_cls, nxt, err)
                    last_at = monotonic()
                    sent += 1
                    yield last
                await fail(context, err)
        finally:
            call.chunks, call.first, call.last = sent, first, last
            call.first_at, call.last_at, call.gap_max = first_at, last_at, gap_max
            try:
                if chunks is not None:
                    await chunks.aclose()
            finally:
                _run_exits(exits, entered, call)
                if check is not None:
                    _release(check, ticket, call)

    return stream
