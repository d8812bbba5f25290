"""The OpenAI-compatible API (ai.openai.v1.OpenAIService): a front on Chat / StreamChat.

Envoy's transcoder hands the proxy the caller's HTTP body as a google.api.HttpBody and
writes back the HttpBody messages the proxy answers with, content type included (the
first message's, for a stream). So the proxy speaks OpenAI's JSON and server-sent events
itself and stays a gRPC service; docs/openai.md says why this shape and not another.

A chat completion is not a call of its own kind: it runs through the Chat (`stream`
false) or StreamChat (`stream` true) handler of the pipeline (server/request/pipeline.py,
`Pipeline.behavior`), built once with this front's decoder at DECODE. So the overload
gate, auth, the limits (requests, open streams, token budgets), validation, deadlines,
the response cache, resumable streams, retries, the breakers and the metrics (counted
under Chat / StreamChat) are the native ones, in the native order: an unauthenticated
caller is refused before its body is even looked at, an invalid one still takes a
request from its bucket. The front only translates, at both ends (openai_api.py):

  in:   CreateChatCompletionRequest.body (JSON) -> ChatRequest / StreamChatRequest; a
        body it refuses raises at DECODE, as INVALID_ARGUMENT / NOT_FOUND naming the
        OpenAI param; `authorization: Bearer <key>` that is not a JWT -> `ApiKey <key>`
        (the OpenAI SDKs send API keys as Bearer tokens); seed / user -> metadata.
  out:  ChatResponse -> `chat.completion`; chunks -> `chat.completion.chunk` events and
        `data: [DONE]`; heartbeats -> a comment line (openai_api.HEARTBEAT says why
        without a blank line); an error before the first byte -> OpenAI's error body
        with its HTTP status in x-aiproxy-http-status (the edge moves it into :status,
        envoy/envoy.yaml.tmpl) and retry-after / retry-after-ms / x-should-retry; an
        error after it -> an error event, which the SDKs raise.

The pipeline sees a FrontContext: the real context with the adapted metadata, initial
metadata captured (the front sends it with its own answer) and abort turned into an
exception the front catches (FrontAbort), so a refusal becomes OpenAI's error instead
of ending the call. Caller cancellation is the native path: grpc cancels this handler,
the pipeline's generator is closed, the upstream call is cancelled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final, cast

import grpc
from google.api import httpbody_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.openai.v1 import openai_service_pb2 as opb
from aiproxy.core.errors import STATUS_DETAILS_KEY, Internal, MalformedRequest, ProxyError
from aiproxy.core.logs import log_event
from aiproxy.core.settings import OpenAISettings
from aiproxy.core.streambuffer import STREAM_ID_HEADER
from aiproxy.interceptors.auth import AUTHORIZATION, bearer_as_api_key
from aiproxy.interceptors.error_handling import fail, malformed, read_one
from aiproxy.server.request.openai_api import (
    SEED_METADATA,
    USER_METADATA,
    ChatCompletionCall,
    ChunkWriter,
    Models,
    OpenAIError,
    Refused,
    completion,
    dumps,
    parse_chat_request,
)
from aiproxy.server.request.pipeline import Decoder, Pipeline

log = logging.getLogger("aiproxy.openai")

OPENAI_SERVICE_NAME: Final = "ai.openai.v1.OpenAIService"
# Initial metadata carrying an error's HTTP status; the edge moves it into :status.
HTTP_STATUS_HEADER: Final = "x-aiproxy-http-status"
JSON: Final = "application/json"
EVENT_STREAM: Final = "text/event-stream"
# Caller metadata the front sets itself (a caller's own would pass for its parameters).
_OWN_METADATA: Final = frozenset({SEED_METADATA, USER_METADATA})

Metadata = tuple[tuple[str, Any], ...]
Context = grpc.aio.ServicerContext[Any, Any]
Authenticate = Callable[[Sequence[tuple[str, Any]], str], Any]


class FrontAbort(grpc.aio.AbortError):
    """The pipeline ended the call (FrontContext.abort): its code, message and trailers."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Metadata) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers
        # The caller has had its answer (an error event in a stream that had started).
        self.answered = False

    def status(self) -> status_pb2.Status:
        """The google.rpc.Status the pipeline packed into grpc-status-details-bin."""
        for key, value in self.trailers:
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                try:
                    return status_pb2.Status.FromString(value)
                except DecodeError:
                    break
        return status_pb2.Status(code=self.code.value[0], message=self.details)


class FrontContext:
    """The servicer context a front's call runs the pipeline with (see the module doc)."""

    __slots__ = ("_code", "_context", "_metadata", "initial")

    def __init__(self, context: Context, metadata: Metadata) -> None:
        self._context = context
        self._metadata = metadata
        self._code: grpc.StatusCode | None = None
        self.initial: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    async def send_initial_metadata(self, metadata: Any) -> None:
        self.initial = tuple(metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        self._code = code
        raise FrontAbort(code, details, tuple(trailing_metadata or ()))

    def code(self) -> Any:
        return self._code if self._code is not None else self._context.code()

    def as_context(self) -> Context:
        return cast("Context", self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _body(content_type: str, data: bytes) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=content_type, data=data)


def _decoder(parsed_cls: Any) -> Decoder:
    """The pipeline's DECODE for this front: the parsed call's request (a refusal raises
    its error here, after auth) and its bytes, which go upstream."""

    def decode_openai(parsed: ChatCompletionCall | Refused) -> tuple[Any, bytes]:
        if isinstance(parsed, Refused):
            raise parsed.error
        request = parsed.request
        assert isinstance(request, parsed_cls)
        return request, request.SerializeToString()

    return decode_openai


class OpenAIFront:
    """The OpenAIService handlers (see the module docstring)."""

    def __init__(
        self,
        pipeline: Pipeline,
        settings: OpenAISettings,
        authenticate: Authenticate | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._models = Models.of(settings.models, int(clock()))
        self._authenticate = authenticate
        self._chat = pipeline.behavior("Chat", _decoder(pb.ChatRequest))
        self._stream_chat = pipeline.behavior("StreamChat", _decoder(pb.StreamChatRequest))

    def generic_handler(self) -> grpc.GenericRpcHandler:
        serialize = httpbody_pb2.HttpBody.SerializeToString
        return grpc.method_handlers_generic_handler(
            OPENAI_SERVICE_NAME,
            {
                # Request-streaming, the one message read by the handler, as the
                # pipeline's (server/request/pipeline.py says why).
                "ListModels": grpc.stream_unary_rpc_method_handler(
                    self.list_models, response_serializer=serialize
                ),
                "GetModel": grpc.stream_unary_rpc_method_handler(
                    self.get_model, response_serializer=serialize
                ),
                "CreateChatCompletion": grpc.stream_stream_rpc_method_handler(
                    self.create_chat_completion, response_serializer=serialize
                ),
            },
        )

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((self.generic_handler(),))

    # -- per call ---------------------------------------------------------------------

    def _metadata(self, context: Context, extra: Metadata = ()) -> Metadata:
        out: list[tuple[str, Any]] = []
        for key, value in context.invocation_metadata() or ():
            if key in _OWN_METADATA:
                continue
            if key == AUTHORIZATION and isinstance(value, str):
                value = bearer_as_api_key(value) or value
            out.append((key, value))
        out.extend(extra)
        return tuple(out)

    async def _error(
        self, context: Context, err: OpenAIError, initial: Metadata = ()
    ) -> httpbody_pb2.HttpBody:
        """OpenAI's error body; its status and headers go out as initial metadata."""
        await context.send_initial_metadata(
            ((HTTP_STATUS_HEADER, str(err.status)), *err.headers, *initial)
        )
        return _body(JSON, err.body())

    def _checked(self, context: Context) -> OpenAIError | None:
        """Auth for the model list (no pipeline: a static answer costs nothing upstream)."""
        if self._authenticate is None:
            return None
        try:
            self._authenticate(self._metadata(context), context.peer())
        except ProxyError as err:
            return OpenAIError.from_error(err)
        return None

    async def _read(self, context: Context) -> bytes:
        try:
            raw: bytes = await read_one(context)
        except MalformedRequest as err:
            await fail(context, err)
        return raw

    async def list_models(self, _requests: Any, context: Context) -> httpbody_pb2.HttpBody:
        await self._read(context)
        refused = self._checked(context)
        if refused is not None:
            return await self._error(context, refused)
        return _body(JSON, self._models.list_body())

    async def get_model(self, _requests: Any, context: Context) -> httpbody_pb2.HttpBody:
        raw = await self._read(context)
        refused = self._checked(context)
        if refused is not None:
            return await self._error(context, refused)
        try:
            model = self._models.get(opb.GetModelRequest.FromString(raw).model)
        except (ProxyError, DecodeError) as exc:
            err = exc if isinstance(exc, ProxyError) else malformed()
            return await self._error(context, OpenAIError.from_error(err))
        return _body(JSON, dumps(self._models.object(model)))

    async def create_chat_completion(
        self, _requests: Any, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        raw = await self._read(context)
        try:
            data = opb.CreateChatCompletionRequest.FromString(raw).body.data
        except DecodeError:
            data = b""
        parsed = parse_chat_request(data, self._models)
        extra = parsed.metadata if isinstance(parsed, ChatCompletionCall) else ()
        front = FrontContext(context, self._metadata(context, extra))
        max_param = parsed.max_tokens_param if isinstance(parsed, ChatCompletionCall) else ""
        abort: FrontAbort | None = None
        try:
            if parsed.stream:
                async for body in self._stream(parsed, front, context):
                    yield body
            else:
                try:
                    response = await self._chat(parsed, front.as_context())
                except FrontAbort as exc:
                    abort = exc
                else:
                    assert isinstance(parsed, ChatCompletionCall)
                    await context.send_initial_metadata(front.initial)
                    yield _body(JSON, completion(parsed, response, int(self._clock())))
                    return
        except FrontAbort as exc:
            abort = exc
        if abort is None:
            return
        if not isinstance(abort.code, grpc.StatusCode) or abort.code is grpc.StatusCode.OK:
            return
        if not abort.answered:
            err = OpenAIError.from_status(abort.status(), max_param or "max_tokens")
            yield await self._error(context, err, front.initial)
        # The call's own status in the trailers, for the edge's access log and gRPC
        # observers; an HTTP caller has its answer already.
        await context.abort(abort.code, abort.details, abort.trailers)

    async def _stream(
        self,
        parsed: ChatCompletionCall | Refused,
        front: FrontContext,
        context: Context,
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        chunks = self._stream_chat(parsed, front.as_context())
        writer: ChunkWriter | None = None
        try:
            try:
                async for chunk in chunks:
                    if writer is None:
                        assert isinstance(parsed, ChatCompletionCall)
                        sid = next((v for k, v in front.initial if k == STREAM_ID_HEADER), None)
                        writer = ChunkWriter(parsed, int(self._clock()), sid)
                        await context.send_initial_metadata(front.initial)
                    data = writer.write(chunk)
                    if data:
                        yield _body(EVENT_STREAM, data)
            except FrontAbort as abort:
                if writer is not None:
                    if not writer.done:
                        err = OpenAIError.from_status(abort.status())
                        yield _body(EVENT_STREAM, b"data: " + dumps(err.body_dict()) + b"\n\n")
                    abort.answered = True
                raise
        finally:
            await chunks.aclose()
        if writer is not None and not writer.done:
            # Ended without its final chunk (nothing the pipeline lets happen): say so.
            log_event(log, "openai_stream_unfinished", level=logging.WARNING)
            err = OpenAIError.from_error(Internal("the stream ended before its final chunk"))
            yield _body(EVENT_STREAM, b"data: " + dumps(err.body_dict()) + b"\n\n")
