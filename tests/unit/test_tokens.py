"""core/tokens.py: the token estimates the limits reserve and charge."""

from __future__ import annotations

import time

from aiproxy.agent import textgen
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core import tokens


def test_the_estimate_is_the_reference_agents_count() -> None:
    for text in ("", "Hello, world!", "Explain token buckets briefly", "a-b c_d 12.5%"):
        assert tokens.count_tokens(text) == textgen.count_tokens(text)


def test_every_text_field_counts_but_identifiers_do_not() -> None:
    chat = pb.ChatRequest(
        session_id="a very long session id",
        model="some-model-name",
        messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Hello there, friend!")],
        user_message="how are you?",
        options=pb.GenerationOptions(max_tokens=10),
    )
    assert tokens.reserve(chat) == (9, 19)
    agent = pb.ExecuteAgentRequest(task="do it")
    agent.context.update({"k": "v w", "nested": {"x": "y"}})
    prompt, reserved = tokens.reserve(agent)
    assert prompt == 2 + 6 and reserved == prompt + tokens.DEFAULT_COMPLETION_TOKENS
    batch = pb.BatchGenerateRequest(
        prompts=["a b", "c"], options=pb.GenerationOptions(max_tokens=5)
    )
    assert tokens.reserve(batch) == (3, 3 + 2 * 5)
    assert tokens.reserve(b"not decoded") == (0, 0)


def test_long_text_is_extrapolated_with_bounded_work() -> None:
    text = "The quick brown fox, jumps over the lazy dog. " * 20_000  # 920 KB
    exact = textgen.count_tokens(text)
    started = time.process_time()
    got = tokens.count_tokens(text)
    took = time.process_time() - started
    assert abs(got - exact) <= exact * 0.01
    # A regex over 920 KB takes ~100x longer: the estimate reads EXACT_CHARS of it.
    assert took < 0.05, took


def test_usage_and_chunks() -> None:
    assert tokens.reports_usage(pb.GenerateResponse)
    assert not tokens.reports_usage(pb.SearchRagResponse)
    answer = pb.GenerateResponse(usage=pb.Usage(prompt_tokens=3, completion_tokens=4))
    assert tokens.reported_usage(answer) == 7
    assert tokens.reported_usage(pb.GenerateResponse(text="x")) is None
    assert tokens.reported_usage(None) is None
    assert tokens.chunk_tokens(pb.StreamGenerateResponse(delta=" world,")) == 2
    assert tokens.chunk_tokens(pb.StreamGenerateResponse(heartbeat=True)) == 0
