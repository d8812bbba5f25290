"""The OpenTelemetry GenAI semantic conventions' series on a real proxy's /metrics: the
Prometheus names the OpenTelemetry Prometheus compatibility spec gives, the conventions'
bucket boundaries, attributes as labels, and values that match the traffic sent."""

from __future__ import annotations

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.metrics import (
    GEN_AI_DURATION_BUCKETS,
    GEN_AI_TOKEN_BUCKETS,
    GEN_AI_TPOT_BUCKETS,
    GEN_AI_TTFT_BUCKETS,
)
from tests.conftest import agent_args, proxy_args
from tests.integration.test_observability import scrape
from tests.support.grpc_helpers import stub

MODEL_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")


def series(samples, name, **labels):
    return [
        (lab, v)
        for lab, v in samples.get(name, [])
        if all(lab.get(k) == v2 for k, v2 in labels.items())
    ]


def buckets(samples, name, **labels) -> list[float]:
    return sorted(
        float(lab["le"]) for lab, _ in series(samples, name, **labels) if lab["le"] != "+Inf"
    )


async def test_gen_ai_series(spawn) -> None:
    agent = spawn(*agent_args(token_delay_ms=5, first_token_delay_ms=30), name="agent")
    env = {
        "AIPROXY_METRICS__GEN_AI_PROVIDER_NAME": "openai",
        "AIPROXY_RETRY__MAX_ATTEMPTS": "1",
        "AIPROXY_BREAKER__ENABLED": "false",
    }
    proxy = spawn(*proxy_args(agent.address), env=env, name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        unary = await api.Generate(
            pb.GenerateRequest(prompt="one two three", options=pb.GenerationOptions(max_tokens=6)),
            timeout=10,
        )
        chunks = [
            c
            async for c in api.StreamChat(
                pb.StreamChatRequest(
                    session_id="s1",
                    user_message="hello there",
                    options=pb.GenerationOptions(max_tokens=12),
                ),
                timeout=10,
            )
        ]
        usage = chunks[-1].usage
        with pytest.raises(grpc.aio.AioRpcError):
            await api.Generate(
                pb.GenerateRequest(prompt="x"),
                timeout=10,
                metadata=(("x-fault-code", "UNAVAILABLE"),),
            )

    m = scrape(proxy.ready["metrics_address"])
    model = unary.model
    gen = dict(
        gen_ai_operation_name="text_completion",
        gen_ai_provider_name="openai",
        gen_ai_request_model=model,
    )
    chat = dict(gen, gen_ai_operation_name="chat")

    # Names, with the spec's buckets.
    assert buckets(m, "gen_ai_client_token_usage_bucket", **gen, gen_ai_token_type="input") == list(
        GEN_AI_TOKEN_BUCKETS
    )
    assert buckets(
        m, "gen_ai_server_request_duration_seconds_bucket", **gen, error_type=""
    ) == list(GEN_AI_DURATION_BUCKETS)
    assert buckets(m, "gen_ai_server_time_to_first_token_seconds_bucket", **chat) == list(
        GEN_AI_TTFT_BUCKETS
    )
    assert buckets(m, "gen_ai_server_time_per_output_token_seconds_bucket", **chat) == list(
        GEN_AI_TPOT_BUCKETS
    )
    for name in (
        "gen_ai_client_token_usage_bucket",
        "gen_ai_server_request_duration_seconds_bucket",
        "gen_ai_server_time_to_first_token_seconds_bucket",
    ):
        for labels, _ in m[name]:
            assert set(MODEL_LABELS) <= set(labels), (name, labels)

    # Token usage: one observation per call and type, summing to the usage reported.
    def one(name, **labels):
        (value,) = [v for _, v in series(m, name, **labels)]
        return value

    assert (
        one("gen_ai_client_token_usage_sum", **gen, gen_ai_token_type="input")
        == unary.usage.prompt_tokens
    )
    assert (
        one("gen_ai_client_token_usage_sum", **gen, gen_ai_token_type="output")
        == unary.usage.completion_tokens
    )
    assert one("gen_ai_client_token_usage_count", **chat, gen_ai_token_type="output") == 1
    assert (
        one("gen_ai_client_token_usage_sum", **chat, gen_ai_token_type="output")
        == usage.completion_tokens
    )

    # Duration: every call, the failed one with error_type = its status.
    assert one("gen_ai_server_request_duration_seconds_count", **gen, error_type="") == 1
    assert one("gen_ai_server_request_duration_seconds_count", **chat, error_type="") == 1
    failed = [
        lab
        for lab, v in series(
            m, "gen_ai_server_request_duration_seconds_count", error_type="UNAVAILABLE"
        )
        if v == 1
    ]
    assert failed and failed[0]["gen_ai_operation_name"] == "text_completion"

    # Streams only, successful only: time to first token (>= the agent's 30 ms) and per token.
    ttft = one("gen_ai_server_time_to_first_token_seconds_sum", **chat)
    assert one("gen_ai_server_time_to_first_token_seconds_count", **chat) == 1 and ttft >= 0.03
    assert not series(m, "gen_ai_server_time_to_first_token_seconds_count", **gen)
    assert one("gen_ai_server_time_per_output_token_seconds_count", **chat) == 1
    duration = one("gen_ai_server_request_duration_seconds_sum", **chat, error_type="")
    tpot = one("gen_ai_server_time_per_output_token_seconds_sum", **chat)
    assert tpot == pytest.approx((duration - ttft) / (usage.completion_tokens - 1), rel=0.05)
    # Today's series are still there.
    assert m["ai_proxy_requests_total"]
