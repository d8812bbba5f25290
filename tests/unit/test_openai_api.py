"""The OpenAI API mapping (server/request/openai_api.py): requests, answers, errors."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.errors import (
    FieldViolation,
    InvalidArgument,
    ProxyError,
    RateLimited,
    Unauthenticated,
    UpstreamUnavailable,
    to_status_proto,
)
from aiproxy.core.settings import OpenAIModel
from aiproxy.interceptors.auth import bearer_as_api_key
from aiproxy.server.request.openai_api import (
    DONE,
    HEARTBEAT,
    ChatCompletionCall,
    ChunkWriter,
    ModelNotFound,
    Models,
    OpenAIError,
    Refused,
    completion,
    parse_chat_request,
)

MODELS = Models.of(
    [OpenAIModel(id="m1"), OpenAIModel(id="alias", upstream="ref-model-1")], 1700000000
)
USER = [{"role": "user", "content": "hi"}]


def parse(**body: Any) -> ChatCompletionCall:
    parsed = parse_chat_request(
        json.dumps({"model": "m1", "messages": USER, **body}).encode(), MODELS
    )
    assert isinstance(parsed, ChatCompletionCall), parsed
    return parsed


def refused(raw: bytes | dict[str, Any]) -> tuple[ProxyError, dict[str, str]]:
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    parsed = parse_chat_request(data, MODELS)
    assert isinstance(parsed, Refused), parsed
    return parsed.error, parsed.error.metadata


def refused_param(**body: Any) -> tuple[str | None, str | None]:
    _, meta = refused({"model": "m1", "messages": USER, **body})
    return meta.get("param"), meta.get("openai_code")


# ---- requests ----------------------------------------------------------------------------


def test_parameters_map_onto_the_chat_request() -> None:
    call = parse(
        messages=[
            {"role": "system", "content": "be terse"},
            {"role": "developer", "content": "and kind"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "ok", "refusal": None},
        ],
        max_completion_tokens=12, temperature=0.5, top_p=0.25, stop="END", seed=-3, user="u-1",
    )  # fmt: skip
    request = call.request
    assert isinstance(request, pb.ChatRequest) and not call.stream
    assert [(m.role, m.content) for m in request.messages] == [
        (pb.CHAT_ROLE_SYSTEM, "be terse"),
        (pb.CHAT_ROLE_SYSTEM, "and kind"),
        (pb.CHAT_ROLE_USER, "a\nb"),
        (pb.CHAT_ROLE_ASSISTANT, "ok"),
    ]
    assert request.model == "m1" and request.session_id == ""
    o = request.options
    assert (o.max_tokens, o.temperature, o.top_p, list(o.stop)) == (12, 0.5, 0.25, ["END"])
    assert call.metadata == (("openai-seed", "-3"), ("openai-user", "u-1"))
    assert call.max_tokens_param == "max_completion_tokens"


def test_stream_and_usage_and_the_upstream_model_name() -> None:
    call = parse(model="alias", stream=True, stream_options={"include_usage": True}, max_tokens=3)
    assert isinstance(call.request, pb.StreamChatRequest) and call.stream and call.include_usage
    assert call.request.model == "ref-model-1" and call.model == "alias"
    assert not parse(stream=False).request.HasField("options")


@pytest.mark.parametrize(
    "body",
    [
        {"n": 1},
        {"n": None},
        {"presence_penalty": 0, "frequency_penalty": 0.0},
        {"logprobs": False, "tools": [], "tool_choice": "none", "logit_bias": {}},
        {"response_format": {"type": "text"}, "store": False, "service_tier": "auto"},
        {"stream": True, "stream_options": {"include_usage": False, "include_obfuscation": False}},
    ],
)
def test_neutral_values_ask_for_nothing(body: dict[str, Any]) -> None:
    parse(**body)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"n": True}, "n", "unsupported_parameter"),
        ({"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ({"audio": {"voice": "x"}}, "audio", "unsupported_parameter"),
        ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"temperature": "hot"}, "temperature", "invalid_value"),
        ({"top_p": -0.1}, "top_p", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"stop": 5}, "stop", "invalid_value"),
        ({"seed": 1.5}, "seed", "invalid_value"),
        ({"user": "a\nb"}, "user", "invalid_value"),
        ({"stream": "yes"}, "stream", "invalid_value"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"stream": True, "stream_options": {"x": 1}}, "stream_options.x", "unknown_parameter"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unsupported_parameter"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", "unsupported_parameter"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0].type", "unsupported_parameter"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]}, "messages[0].tool_calls", "unsupported_parameter"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_value"),
        ({"model": None}, "model", "missing_required_parameter"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_refused_naming_the_param(
    body: dict[str, Any], param: str, code: str
) -> None:
    assert refused_param(**body) == (param, code)


def test_refusals_are_400_with_a_field_violation_and_404_for_models() -> None:
    err, _ = refused({"model": "m1", "messages": USER, "n": 3})
    assert isinstance(err, InvalidArgument) and err.field_violations[0].field == "n"
    err, meta = refused({"model": "gpt-4", "messages": USER})
    assert isinstance(err, ModelNotFound) and err.code is grpc.StatusCode.NOT_FOUND
    assert meta == {"param": "model", "openai_code": "model_not_found"}
    err, meta = refused(b"{not json")
    assert isinstance(err, InvalidArgument) and meta["openai_code"] == "invalid_json"
    parsed = parse_chat_request(b'{"stream": true, "n": 5, "model": "m1", "messages": []}', MODELS)
    assert isinstance(parsed, Refused) and parsed.stream  # refused on StreamChat's pipeline


# ---- answers -----------------------------------------------------------------------------


def test_a_chat_response_as_a_chat_completion() -> None:
    call = parse()
    response = pb.ChatResponse(
        message=pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, content="hello"),
        model="ref-model-1",
        usage=pb.Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3),
        finish_reason=pb.FINISH_REASON_STOP,
    )
    body = json.loads(completion(call, response, 42))
    assert body == {
        "id": call.id,
        "object": "chat.completion",
        "created": 42,
        "model": "ref-model-1",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }


def _events(data: bytes) -> list[Any]:
    out = []
    for raw in data.split(b"\n\n"):
        lines = [line for line in raw.split(b"\n") if line.startswith(b"data: ")]
        for line in lines:
            payload = line[6:]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def test_chunks_as_chat_completion_chunks_with_usage_and_done() -> None:
    call = parse(stream=True, stream_options={"include_usage": True})
    writer = ChunkWriter(call, 7)
    cls = pb.StreamChatResponse
    assert writer.write(cls(heartbeat=True, seq=0)) == HEARTBEAT
    out = writer.write(cls(delta="Hel", seq=1, model="ref-model-1"))
    out += writer.write(cls(delta="lo", seq=2))
    out += writer.write(
        cls(is_final=True, seq=3, finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))
    )  # fmt: skip
    assert out.endswith(DONE) and writer.done and b"id:" not in out
    events = _events(out)
    assert [e["choices"][0]["delta"] if e != "[DONE]" and e["choices"] else e for e in events] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
        events[4],
        "[DONE]",
    ]
    assert events[3]["choices"][0]["finish_reason"] == "length"
    assert events[4]["choices"] == [] and events[4]["usage"]["total_tokens"] == 3
    assert all(e["usage"] is None for e in events[:4])
    assert {e["object"] for e in events[:5]} == {"chat.completion.chunk"}
    assert {e["model"] for e in events[:5]} == {"ref-model-1"}


def test_resumable_streams_carry_ids_and_heartbeats_never_end_an_event() -> None:
    writer = ChunkWriter(parse(stream=True), 7, stream_id="abcdefghijklmnop")
    out = writer.write(pb.StreamChatResponse(delta="x", seq=4))
    assert out.startswith(b"id: abcdefghijklmnop:4\ndata: ")
    assert HEARTBEAT.count(b"\n") == 1 and HEARTBEAT.startswith(b":")


def test_an_in_band_error_is_one_error_event_without_done() -> None:
    writer = ChunkWriter(parse(stream=True), 7)
    writer.write(pb.StreamChatResponse(delta="x", seq=0))
    err = UpstreamUnavailable("the agent went away", retry_delay_s=1)
    chunk = pb.StreamChatResponse(is_final=True, seq=1, error=to_status_proto(err))
    out = writer.write(chunk)
    assert writer.done and DONE not in out
    (event,) = _events(out)
    assert event == {
        "error": {
            "message": "the agent went away",
            "type": "server_error",
            "param": None,
            "code": "service_unavailable",
        }
    }


# ---- errors ------------------------------------------------------------------------------


def test_errors_take_openai_shape_status_and_retry_headers() -> None:
    limited = OpenAIError.from_error(RateLimited("rate limit exceeded", retry_delay_s=0.25))
    assert (limited.status, limited.type, limited.code) == (429, "requests", "rate_limit_exceeded")
    assert dict(limited.headers) == {"retry-after": "1", "retry-after-ms": "250"}
    day = OpenAIError.from_error(
        RateLimited(
            "token quota exceeded", metadata={"quota": "tokens_per_day"}, retry_delay_s=3600
        )
    )
    assert (day.type, day.code) == ("insufficient_quota", "insufficient_quota")
    assert dict(day.headers) == {"x-should-retry": "false"}
    minute = OpenAIError.from_error(
        RateLimited(
            "token quota exceeded", metadata={"quota": "tokens_per_minute"}, retry_delay_s=2
        )
    )
    assert minute.type == "tokens" and dict(minute.headers)["retry-after"] == "2"
    down = OpenAIError.from_error(UpstreamUnavailable(retry_delay_s=1))
    assert (down.status, down.type, down.code) == (503, "server_error", "service_unavailable")
    assert dict(down.headers) == {"retry-after": "1", "retry-after-ms": "1000"}
    who = OpenAIError.from_error(
        Unauthenticated("invalid API key", metadata={"cause": "unknown_api_key"})
    )
    assert (who.status, who.type, who.code) == (401, "invalid_request_error", "invalid_api_key")
    bad = OpenAIError.from_error(
        InvalidArgument(
            "invalid request",
            field_violations=[FieldViolation("options.max_tokens", "must be between 0 and 4096")],
        ),
        "max_completion_tokens",
    )
    assert (bad.status, bad.param, bad.code) == (400, "max_completion_tokens", "invalid_value")
    assert json.loads(bad.body()) == {
        "error": {
            "message": "Invalid 'max_completion_tokens': must be between 0 and 4096",
            "type": "invalid_request_error",
            "param": "max_completion_tokens",
            "code": "invalid_value",
        }
    }
    assert OpenAIError.from_error(ProxyError("boom")).code is None  # nothing internal


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        ("Bearer sk-abc", "ApiKey sk-abc"),
        ("bearer  sk-abc ", "ApiKey sk-abc"),
        ("Bearer aaa.bbb.ccc", None),  # a JWT stays a JWT
        ("ApiKey sk-abc", None),
        ("Bearer ", None),
        ("Basic dXNlcg==", None),
    ],
)
def test_a_bearer_api_key_on_the_openai_routes(authorization: str, expected: str | None) -> None:
    assert bearer_as_api_key(authorization) == expected
