"""OpenAI's Chat Completions API <-> the AgentService's Chat / StreamChat: pure mapping.

No I/O and no gRPC here (server/request/openai_front.py runs the calls); every function
is a translation that a unit test can pin:

- `parse_chat_request`: the caller's JSON body -> a `ChatCompletionCall` (the Chat /
  StreamChat request and what the answer must look like), or a ProxyError that names
  the OpenAI `param`: strict, because the transcoder would drop unknown fields silently
  and we see the raw body (HttpBody), so an unknown field is refused, not ignored.
  Parameters we cannot honour are refused too, unless they carry their neutral value
  (`n: 1`, `presence_penalty: 0`, `tools: []`, `null`...), which asks for nothing.
- `completion`, `ChunkWriter`: a ChatResponse / the StreamChatResponse chunks as
  `chat.completion` JSON / `chat.completion.chunk` server-sent events.
- `OpenAIError.from_status`: the proxy's one error shape (google.rpc.Status with its
  ErrorInfo, RetryInfo, BadRequest) as OpenAI's `{"error": {message, type, param, code}}`
  with its HTTP status and the headers the SDKs read (retry-after, retry-after-ms,
  x-should-retry).

The parameter table (what is accepted, mapped or refused) is in docs/openai.md.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from google.rpc import error_details_pb2, status_pb2

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.errors import (
    FieldViolation,
    InvalidArgument,
    ProxyError,
    Reason,
    http_status_for,
)
from aiproxy.core.settings import OpenAIModel

# Metadata the front adds to the upstream call for parameters AgentService has no field
# for: the agent may read them (the reference agent is deterministic: every seed repeats).
SEED_METADATA: Final = "openai-seed"
USER_METADATA: Final = "openai-user"
MAX_USER_CHARS: Final = 256
MAX_STOP: Final = 4  # OpenAI's own limit on `stop`

_ROLES: Final = {
    "system": pb.CHAT_ROLE_SYSTEM,
    # OpenAI's newer name for system instructions (o-series models): the same role here.
    "developer": pb.CHAT_ROLE_SYSTEM,
    "user": pb.CHAT_ROLE_USER,
    "assistant": pb.CHAT_ROLE_ASSISTANT,
}
_FINISH: Final[Mapping[int, str]] = {
    pb.FINISH_REASON_LENGTH: "length"
}  # everything else that ends well: "stop"

# Parameters accepted only at a value that asks for nothing: the value(s) allowed.
# (Clients such as LangChain send `n: 1` and zero penalties by default.)
_NEUTRAL: Final[Mapping[str, tuple[Any, ...]]] = {
    "n": (1,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),  # means nothing without tools
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "store": (False,),
    "metadata": ({},),  # only stored completions have metadata
    "service_tier": ("auto", "default"),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "verbosity": (),
    "prompt_cache_key": (),
    "safety_identifier": (),
}
_KNOWN: Final = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "user",
        *_NEUTRAL,
    }
)


class ModelNotFound(ProxyError):
    """404 model_not_found: the request names a model the proxy does not serve."""

    code = grpc.StatusCode.NOT_FOUND
    reason = Reason.MODEL_NOT_FOUND
    default_message = "model not found"


def _invalid(param: str | None, message: str, code: str = "invalid_value") -> InvalidArgument:
    """INVALID_ARGUMENT naming OpenAI's `param` and `code` (ErrorInfo metadata, and a
    BadRequest violation for native readers of the status)."""
    metadata = {"openai_code": code}
    violations: tuple[FieldViolation, ...] = ()
    if param is not None:
        metadata["param"] = param
        violations = (FieldViolation(param, message),)
    return InvalidArgument(message, metadata=metadata, field_violations=violations)


def _unsupported(param: str, message: str | None = None) -> InvalidArgument:
    return _invalid(
        param,
        message or f"{param} is not supported by this server",
        "unsupported_parameter",
    )


@dataclass(frozen=True, slots=True)
class Models:
    """The models the API serves (settings openai.models), by id."""

    by_id: Mapping[str, OpenAIModel]
    created: int  # the `created` time the list reports (the proxy's start)

    @classmethod
    def of(cls, models: Sequence[OpenAIModel], created: int) -> Models:
        return cls({m.id: m for m in models}, created)

    def get(self, model_id: str) -> OpenAIModel:
        model = self.by_id.get(model_id)
        if model is None:
            raise ModelNotFound(
                f"The model `{model_id[:128]}` does not exist or you do not have access to it.",
                metadata={"param": "model", "openai_code": "model_not_found"},
            )
        return model

    def object(self, model: OpenAIModel) -> dict[str, Any]:
        return {
            "id": model.id,
            "object": "model",
            "created": self.created,
            "owned_by": model.owned_by,
        }

    def list_body(self) -> bytes:
        return dumps({"object": "list", "data": [self.object(m) for m in self.by_id.values()]})


@dataclass(slots=True)
class ChatCompletionCall:
    """A parsed chat completion request: what goes upstream and how to answer."""

    model: str  # the id the caller named (answers report the agent's own model name)
    stream: bool
    include_usage: bool
    request: Any  # pb.ChatRequest (stream false) or pb.StreamChatRequest
    # (name, value) metadata for the upstream call (seed, user).
    metadata: tuple[tuple[str, str], ...] = ()
    # The name the caller used for the completion budget (max_tokens or
    # max_completion_tokens), for errors about options.max_tokens.
    max_tokens_param: str = "max_tokens"
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")


@dataclass(frozen=True, slots=True)
class Refused:
    """A request the front could not parse: the error is raised at the pipeline's DECODE
    (after auth, so an unauthenticated caller learns nothing about its request), and
    `stream` says which method's pipeline the call takes (Chat when unknown)."""

    error: ProxyError
    stream: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _content(index: int, content: Any, role: str) -> str:
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant":
            raise _unsupported(
                where, "an assistant message without content (tool calls) is not supported"
            )
        raise _invalid(where, f"{where} must be a string or an array of text parts")
    if not isinstance(content, list) or not content:
        raise _invalid(where, f"{where} must be a string or a non-empty array of text parts")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _invalid(at, f"{at} must be an object")
        kind = part.get("type")
        if kind != "text":
            if isinstance(kind, str):
                raise _unsupported(
                    f"{at}.type",
                    f"content parts of type {kind[:32]!r} are not supported: text only",
                )
            raise _invalid(f"{at}.type", f"{at}.type must be 'text'")
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise _invalid(
                f"{at}.{extra[0]}",
                f"Unrecognized content part argument: {extra[0]}",
                "unknown_parameter",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _invalid(f"{at}.text", f"{at}.text must be a string")
        texts.append(text)
    return "\n".join(texts)


def _messages(value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise _invalid("messages", "messages must be a non-empty array")
    out = []
    for i, message in enumerate(value):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(at, f"{at} must be an object")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            if role in ("tool", "function"):
                raise _unsupported(
                    f"{at}.role", f"{at}.role {role!r}: tool calling is not supported"
                )
            raise _invalid(
                f"{at}.role", f"{at}.role must be one of 'system', 'developer', 'user', 'assistant'"
            )
        for key in message:
            if key in ("role", "content"):
                continue
            if key == "refusal" and message[key] is None:
                continue
            if key in ("name", "tool_calls", "function_call", "audio", "refusal"):
                if message[key] is None or message[key] == []:
                    continue
                raise _unsupported(f"{at}.{key}")
            raise _invalid(
                f"{at}.{key}", f"Unrecognized message argument: {key}", "unknown_parameter"
            )
        out.append(
            pb.ChatMessage(role=_ROLES[role], content=_content(i, message.get("content"), role))
        )
    return out


def _neutral(name: str, value: Any) -> None:
    if value is None:
        return
    allowed = _NEUTRAL[name]
    # bool is an int in Python: `logprobs: 0` is not `false`, `n: true` is not 1.
    if any(type(value) is type(a) and value == a for a in allowed) or (
        _is_number(value)
        and not isinstance(value, bool)
        and any(_is_number(a) and value == a for a in allowed)
    ):
        return
    raise _unsupported(name, f"{name}={json.dumps(value)[:64]} is not supported by this server")


def parse_chat_request(data: bytes, models: Models) -> ChatCompletionCall | Refused:
    """The request body -> a ChatCompletionCall, or Refused with the ProxyError that
    names the parameter (see the module docstring; docs/openai.md has the table)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return Refused(
            _invalid(None, "We could not parse the JSON body of your request.", "invalid_json")
        )
    if not isinstance(body, dict):
        return Refused(_invalid(None, "The request body must be a JSON object.", "invalid_json"))
    stream = body.get("stream")
    streaming = stream is True
    try:
        return _parse(body, models, streaming)
    except ProxyError as err:
        return Refused(err, streaming)


def _parse(body: dict[str, Any], models: Models, streaming: bool) -> ChatCompletionCall:
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise _invalid(
            unknown[0], f"Unrecognized request argument supplied: {unknown[0]}", "unknown_parameter"
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", "stream must be a boolean")
    for name in _NEUTRAL:
        if name in body:
            _neutral(name, body[name])
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise _invalid("model", "you must provide a model parameter", "missing_required_parameter")
    model = models.get(model_id)
    if "messages" not in body:
        raise _invalid("messages", "messages is required", "missing_required_parameter")
    messages = _messages(body["messages"])

    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not streaming:
            raise _invalid("stream_options", "stream_options is only allowed when stream is true")
        if not isinstance(stream_options, dict):
            raise _invalid("stream_options", "stream_options must be an object")
        for key, value in stream_options.items():
            if key == "include_usage":
                if value is not None and not isinstance(value, bool):
                    raise _invalid(
                        "stream_options.include_usage", "include_usage must be a boolean"
                    )
                include_usage = value is True
            elif key == "include_obfuscation" and value in (None, False):
                continue  # no obfuscation is ever added
            else:
                raise _invalid(
                    f"stream_options.{key}",
                    f"Unrecognized stream option: {key}",
                    "unknown_parameter",
                )

    options = pb.GenerationOptions()
    max_param = "max_tokens"
    given = [k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    if len(given) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
        raise _invalid("max_tokens", "max_tokens and max_completion_tokens differ: send one")
    if given:
        max_param = given[0]
        value = body[max_param]
        if not _is_int(value) or value < 1:
            raise _invalid(max_param, f"{max_param} must be an integer of at least 1")
        options.max_tokens = min(value, 2**31 - 1)
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not low <= value <= high:
            raise _invalid(name, f"{name} must be a number between {low:g} and {high:g}")
        setattr(options, name, float(value))
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _invalid("stop", "stop must be a string or an array of strings")
        if len(stops) > MAX_STOP:
            raise _invalid("stop", f"stop takes at most {MAX_STOP} sequences")
        options.stop.extend(s for s in stops if s)
    metadata: list[tuple[str, str]] = []
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not -(2**63) <= seed < 2**63:
            raise _invalid("seed", "seed must be a 64-bit integer")
        metadata.append((SEED_METADATA, str(seed)))
    user = body.get("user")
    if user is not None:
        if (
            not isinstance(user, str)
            or len(user) > MAX_USER_CHARS
            or not user.isascii()
            or not user.isprintable()
        ):
            raise _invalid(
                "user", f"user must be printable ASCII, at most {MAX_USER_CHARS} characters"
            )
        if user:
            metadata.append((USER_METADATA, user))

    cls = pb.StreamChatRequest if streaming else pb.ChatRequest
    request = cls(messages=messages, model=model.upstream or model.id)
    if options.ByteSize():
        request.options.CopyFrom(options)
    return ChatCompletionCall(
        model=model.id,
        stream=streaming,
        include_usage=include_usage,
        request=request,
        metadata=tuple(metadata),
        max_tokens_param=max_param,
    )


# ---- answers --------------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    """Compact JSON (no whitespace: one event per line), UTF-8 as it is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _usage(usage: Any) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def finish_reason(value: int) -> str:
    return _FINISH.get(value, "stop")


def completion(call: ChatCompletionCall, response: Any, created: int) -> bytes:
    """A ChatResponse as OpenAI's `chat.completion` object."""
    out: dict[str, Any] = {
        "id": call.id,
        "object": "chat.completion",
        "created": created,
        "model": response.model or call.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": response.message.content,
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason(response.finish_reason),
            }
        ],
    }
    if response.HasField("usage"):
        out["usage"] = _usage(response.usage)
    return dumps(out)


# An idle stream's keep-alive: a comment line WITHOUT the blank line that would end an
# event. openai-python keeps the last `id:` it saw and turns every blank line after one
# into an event with empty data, which it fails to parse; a lone comment line dispatches
# nothing in any SSE parser (WHATWG: only a blank line dispatches) and still moves bytes,
# so proxies and clients see the connection alive. The next event's blank line ends it.
HEARTBEAT: Final = b": keep-alive\n"
DONE: Final = b"data: [DONE]\n\n"


class ChunkWriter:
    """StreamChatResponse chunks -> `chat.completion.chunk` events, per call.

    The first chunk with content opens with the role delta (`{"role": "assistant",
    "content": ""}`); the final chunk gives the `finish_reason` chunk, then (with
    include_usage) the usage chunk with `choices: []`, then `data: [DONE]`. With
    include_usage every other chunk carries `"usage": null`, as OpenAI's do. An in-band
    error (the stream failed after it started) becomes one `data: {"error": {...}}`
    event, which the SDKs raise as APIError; no [DONE] follows. `ids`: the stream's
    resumable id (x-aiproxy-stream-id): each event then carries `id: <stream id>:<seq>`
    (the native chunk's seq, what a resume's last-event-id counts).
    """

    __slots__ = ("_base", "_call", "_created", "_opened", "_prefix", "done")

    def __init__(
        self, call: ChatCompletionCall, created: int, stream_id: str | None = None
    ) -> None:
        self._call = call
        self._created = created
        self._opened = False
        self._prefix = f"id: {stream_id}:".encode() if stream_id else None
        self._base: dict[str, Any] = {}
        self.done = False  # the final event (finish, usage, [DONE], or error) was written

    def _event(self, payload: dict[str, Any], seq: int) -> bytes:
        line = b"data: " + dumps(payload) + b"\n\n"
        if self._prefix is None:
            return line
        return self._prefix + str(seq).encode() + b"\n" + line

    def _chunk(self, delta: dict[str, Any], finish: str | None, seq: int) -> bytes:
        payload = {
            **self._base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self._call.include_usage:
            payload["usage"] = None
        return self._event(payload, seq)

    def write(self, chunk: Any) -> bytes:
        """The bytes for one chunk (b"" when it gives none)."""
        if chunk.heartbeat:
            return HEARTBEAT
        seq = chunk.seq
        out = []
        if not self._opened:
            self._opened = True
            self._base = {
                "id": self._call.id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": chunk.model or self._call.model,
                "system_fingerprint": None,
            }
            if not chunk.HasField("error"):
                out.append(self._chunk({"role": "assistant", "content": ""}, None, seq))
        if chunk.HasField("error"):
            self.done = True
            out.append(self._event(OpenAIError.from_status(chunk.error).body_dict(), seq))
            return b"".join(out)
        if chunk.delta:
            out.append(self._chunk({"content": chunk.delta}, None, seq))
        if chunk.is_final:
            self.done = True
            out.append(self._chunk({}, finish_reason(chunk.finish_reason), seq))
            if self._call.include_usage and chunk.HasField("usage"):
                out.append(
                    self._event({**self._base, "choices": [], "usage": _usage(chunk.usage)}, seq)
                )
            out.append(DONE)
        return b"".join(out)


# ---- errors ---------------------------------------------------------------------------

# The OpenAI error `type` for a status that carries no more specific one.
_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    429: "requests",
}
# Proxy validation paths (interceptors/validation.py, on the ChatRequest) -> OpenAI params.
_PARAMS: Final = {
    "options.temperature": "temperature",
    "options.top_p": "top_p",
    "options.stop": "stop",
}
_AUTH_CODES: Final = {
    "missing_credentials": "missing_api_key",
    "missing_scope": "insufficient_permissions",
}


@dataclass(frozen=True, slots=True)
class OpenAIError:
    """An error as OpenAI's SDKs read it: HTTP status, body, headers."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def body_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return dumps(self.body_dict())

    @classmethod
    def from_error(cls, err: ProxyError, max_tokens_param: str = "max_tokens") -> OpenAIError:
        from aiproxy.core.errors import to_status_proto

        return cls.from_status(to_status_proto(err), max_tokens_param)

    @classmethod
    def from_status(
        cls, status: status_pb2.Status, max_tokens_param: str = "max_tokens"
    ) -> OpenAIError:
        """The proxy's google.rpc.Status (ErrorInfo, RetryInfo, BadRequest) as OpenAI's."""
        code = grpc.StatusCode.UNKNOWN
        for candidate in grpc.StatusCode:
            if candidate.value[0] == status.code:
                code = candidate
                break
        http = http_status_for(code)
        if http == 499:
            http = 400  # a caller's own cancel never reaches it; keep it a client error
        reason, meta = "", {}
        retry_s: float | None = None
        violations: list[tuple[str, str]] = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, meta = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_s = retry.retry_delay.ToTimedelta().total_seconds()
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [(v.field, v.description) for v in bad.field_violations]
        param = meta.get("param")
        message = status.message or "error"
        openai_code = meta.get("openai_code")
        if param is None and violations:
            field_path, description = violations[0]
            if field_path == "options.max_tokens":
                param = max_tokens_param
            else:
                param = _PARAMS.get(field_path, field_path)
            message = f"Invalid '{param}': {description}"
            openai_code = openai_code or "invalid_value"
        kind = _TYPES.get(http, "server_error")
        headers: list[tuple[str, str]] = []
        if http == 401:
            openai_code = openai_code or _AUTH_CODES.get(meta.get("cause", ""), "invalid_api_key")
        elif http == 403:
            openai_code = openai_code or _AUTH_CODES.get(meta.get("cause", ""), "permission_denied")
        elif http == 429:
            quota = meta.get("quota", "")
            openai_code = "rate_limit_exceeded"
            if quota == "tokens_per_day":
                # Retrying cannot help before 00:00 UTC: the SDKs would retry a 429.
                kind, openai_code = "insufficient_quota", "insufficient_quota"
                headers.append(("x-should-retry", "false"))
            elif quota:
                kind = "tokens"
            elif reason == Reason.CONCURRENCY_LIMITED:
                openai_code = "concurrency_limit_exceeded"
            elif reason == Reason.OVERLOADED:
                openai_code = "overloaded"
        elif http == 503:
            openai_code = "service_unavailable"
        elif http == 504:
            openai_code = "timeout"
        elif http >= 500:
            openai_code = None  # nothing internal reaches the caller
        elif openai_code is None and reason:
            openai_code = reason.lower()
        if retry_s is not None and http in (429, 503) and not headers:
            # OpenAI's SDKs read retry-after-ms first (fractions), then retry-after (s).
            headers.append(("retry-after", str(max(1, math.ceil(retry_s)))))
            headers.append(("retry-after-ms", str(max(0, math.ceil(retry_s * 1000)))))
        return cls(http, message, kind, param, openai_code, tuple(headers))
