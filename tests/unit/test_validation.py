"""Request validation rules (pure logic): every violation reported, limits from config."""

from __future__ import annotations

import math
import re

import pytest
from google.protobuf import struct_pb2

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.errors import Reason
from aiproxy.core.service import agent_service
from aiproxy.core.settings import ConfigError, ValidationSettings, load_settings
from aiproxy.interceptors.validation import RequestRules, invalid_request

RULES = RequestRules(
    ValidationSettings(
        max_prompt_chars=100, max_messages=3, max_total_chars=150, max_batch_prompts=2
    )
)


def fields(violations) -> list[str]:
    return [v.field for v in violations]


def test_every_method_has_rules() -> None:
    validators = RULES.for_service(agent_service().descriptor)
    assert set(validators) == set(agent_service().paths)


@pytest.mark.parametrize(
    "request_msg",
    [
        pb.GenerateRequest(
            prompt="hello",
            model="ref-model-1",
            options=pb.GenerationOptions(temperature=2, top_p=1, max_tokens=4096),
        ),
        pb.StreamChatRequest(session_id="s1", user_message="hi"),
        pb.ChatRequest(
            messages=[
                pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="be brief"),
                pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="hi"),
            ]
        ),
        pb.SearchRagRequest(query="breakers", top_k=50, filters={"category": "ops"}),
        pb.StreamRagGenerateRequest(query="breakers"),
        pb.ExecuteAgentRequest(
            agent_type=pb.AGENT_TYPE_REVIEW, task="review", tools=["calculator"], max_steps=50
        ),
        pb.BatchGenerateRequest(prompts=["a", ""]),  # an empty prompt fails as its own item
    ],
)
def test_valid_requests_pass(request_msg) -> None:
    assert RULES.by_message[request_msg.DESCRIPTOR.full_name](request_msg) == []


def test_generate_reports_every_violation() -> None:
    request = pb.GenerateRequest(
        prompt="x" * 101,
        model="m" * 129,
        options=pb.GenerationOptions(
            temperature=math.nan, top_p=1.5, max_tokens=-1, stop=["ok", ""]
        ),
    )
    assert fields(RULES.generate(request)) == [
        "prompt",
        "model",
        "options.temperature",
        "options.top_p",
        "options.max_tokens",
        "options.stop[1]",
    ]


def test_chat_roles_sizes_and_emptiness() -> None:
    assert fields(RULES.chat(pb.ChatRequest())) == ["messages"]
    too_many = pb.ChatRequest(
        messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="x" * 60)] * 4
    )
    assert fields(RULES.chat(too_many)) == ["messages", "messages"]  # count, then total size
    unknown_role = pb.ChatRequest(
        messages=[pb.ChatMessage(role=99, content="hi")], session_id="bad\nid"
    )
    violations = RULES.chat(unknown_role)
    assert fields(violations) == ["session_id", "messages[0].role"]
    assert "CHAT_ROLE_SYSTEM, CHAT_ROLE_USER or CHAT_ROLE_ASSISTANT" in violations[1].description


def test_agent_rules() -> None:
    context = struct_pb2.Struct()
    context.update({"blob": "x" * (64 * 1024)})
    request = pb.ExecuteAgentRequest(
        agent_type=9, task=" ", context=context, tools=[""] * 17, max_steps=-1
    )
    assert fields(RULES.agent(request)) == [
        "agent_type",
        "task",
        "context",
        "tools",
        *[f"tools[{i}]" for i in range(16)],
        "max_steps",
    ]


def test_batch_and_rag_rules() -> None:
    assert fields(RULES.batch(pb.BatchGenerateRequest())) == ["prompts"]
    assert fields(RULES.batch(pb.BatchGenerateRequest(prompts=["a", "b", "c"]))) == ["prompts"]
    assert fields(
        RULES.rag_search(
            pb.SearchRagRequest(query="q", top_k=51, filters={f"k{i}": "v" for i in range(17)})
        )
    ) == [
        "top_k",
        "filters",
    ]


def test_invalid_request_error_carries_all_violations() -> None:
    err = invalid_request(RULES.generate(pb.GenerateRequest(options=pb.GenerationOptions(top_p=2))))
    assert err.reason is Reason.INVALID_ARGUMENT
    assert err.message == "invalid request: prompt must not be empty (and 1 more)"
    assert fields(err.field_violations) == ["prompt", "options.top_p"]


def test_deadline_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="unary_default_s"):
        load_settings(deadlines={"unary_default_s": 60, "unary_max_s": 30})
    with pytest.raises(ConfigError, match="unknown methods"):
        load_settings(deadlines={"per_method": {"Nope": {"default_s": 1, "max_s": 2}}})
    with pytest.raises(ConfigError, match=re.escape("limits.overrides.peer:10.0.0.1.burst")):
        load_settings(limits={"overrides": {"peer:10.0.0.1": {"rate_per_s": 1, "burst": 0}}})
