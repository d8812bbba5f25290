"""The whole stack against a real model: SmolLM2-135M-Instruct through llama.cpp's server
(`aiproxy model-server`), `aiproxy agent --backend openai`, `aiproxy serve`, `aiproxy envoy`.

What a mock cannot prove: the tokens a real inference engine streams reach the caller in
order and complete, with the engine's own usage; a caller who leaves frees the engine (it
serves one request at a time: an abandoned generation that ran on would delay the next
caller by its whole length); an engine that dies mid-answer is an in-band UNAVAILABLE; a
chat session's history really goes to the model (its prompt grows).

Generations are short (max_tokens 8-96) and greedy (top_p 0.0001 keeps one candidate token:
the same answer on every path, so paths can be compared). Timing assertions are bounds
derived from a baseline measured in the same test, never fixed numbers.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.realmodel.conftest import MODEL, Stack
from tests.support.edge import request, sse_events
from tests.support.grpc_helpers import NOT_SERVING, stub, wait_health
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.realmodel

TOP_P = 0.0001  # greedy: the nucleus keeps the most likely token only
SHORT_PROMPT = "Name one colour."
ANSWER_PROMPT = "Explain in two sentences what a circuit breaker does in software."
# A prompt SmolLM2 answers at length (greedy, it does not stop before 128 tokens).
LONG_PROMPT = "Write a long story about a lighthouse keeper and the sea."


def greedy(max_tokens: int) -> pb.GenerationOptions:
    return pb.GenerationOptions(max_tokens=max_tokens, top_p=TOP_P)


def direct_completion(
    base_url: str, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    """The model server's own answer, asked over HTTP without the agent or the proxy."""
    reply = httpx.post(
        f"{base_url}/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": max_tokens, "top_p": TOP_P},
        timeout=60,
    )
    reply.raise_for_status()
    body: dict[str, Any] = reply.json()
    return body


async def read_stream(
    channel: grpc.aio.Channel, prompt: str, max_tokens: int, timeout: float = 60
) -> tuple[list[pb.StreamGenerateResponse], float]:
    started = time.perf_counter()
    chunks = [
        c
        async for c in stub(channel).StreamGenerate(
            pb.StreamGenerateRequest(prompt=prompt, options=greedy(max_tokens)), timeout=timeout
        )
    ]
    return chunks, time.perf_counter() - started


async def test_stream_is_the_models_answer_in_order_with_its_usage(stack: Stack) -> None:
    max_tokens = 48
    direct = direct_completion(
        stack.base_url, [{"role": "user", "content": ANSWER_PROMPT}], max_tokens
    )
    expected = direct["choices"][0]["message"]["content"]
    assert expected.strip(), "the model said nothing"
    async with grpc.aio.insecure_channel(stack.proxy.address) as ch:
        chunks, _ = await read_stream(ch, ANSWER_PROMPT, max_tokens)
        unary = await stub(ch).Generate(
            pb.GenerateRequest(prompt=ANSWER_PROMPT, options=greedy(max_tokens)), timeout=60
        )
    *body, final = chunks
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert body and all(c.delta and not c.is_final for c in body)
    assert final.is_final and not final.HasField("error")
    # Exactly the model's text, token after token, through agent and proxy.
    assert "".join(c.delta for c in chunks) == expected
    assert chunks[0].model == MODEL
    # The usage is the model's own (its tokenizer), not an estimate.
    usage = direct["usage"]
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert final.usage.total_tokens == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < final.usage.completion_tokens <= max_tokens
    assert len(body) <= final.usage.completion_tokens  # at most one chunk per token
    finish = direct["choices"][0]["finish_reason"]
    assert final.finish_reason == (
        pb.FINISH_REASON_LENGTH if finish == "length" else pb.FINISH_REASON_STOP
    )
    # The unary call gets the same answer and usage.
    assert unary.text == expected
    assert unary.usage == final.usage


@pytest.mark.envoy
def test_the_edge_streams_the_models_text_as_sse(stack: Stack, envoy: ServiceProcess) -> None:
    """The browser's path: HTTP POST, server-sent events through Envoy's transcoder."""
    max_tokens = 24
    direct = direct_completion(
        stack.base_url, [{"role": "user", "content": ANSWER_PROMPT}], max_tokens
    )
    reply = request(
        envoy.address,
        "POST",
        "/api/v1/ai/generate/stream",
        {"prompt": ANSWER_PROMPT, "options": {"maxTokens": max_tokens, "topP": TOP_P}},
        timeout=60,
    )
    assert reply.status == 200 and reply.content_type.startswith("text/event-stream")
    events = sse_events(reply.body)
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert "".join(e["delta"] for e in events) == direct["choices"][0]["message"]["content"]
    final = events[-1]
    assert final["isFinal"] and not any(e["isFinal"] for e in events[:-1])
    assert final["usage"]["completionTokens"] == direct["usage"]["completion_tokens"]
    assert final["usage"]["promptTokens"] == direct["usage"]["prompt_tokens"]


async def test_a_callers_cancel_frees_the_model_for_the_next_call(stack: Stack) -> None:
    """The model server answers one request at a time: had the abandoned generation run on,
    the next call would wait for the rest of it. Measured here: the next call takes about
    what a short call takes alone, far less than what the rest would have taken."""
    long_tokens = 128
    async with grpc.aio.insecure_channel(stack.proxy.address) as ch:
        # Baseline: a short call alone (the second of two: the first warms up).
        for _ in range(2):
            _, alone_s = await read_stream(ch, SHORT_PROMPT, 8)
        # The control: the long answer, read to its end, and what its first chunks took.
        control, control_s = await read_stream(ch, LONG_PROMPT, long_tokens, timeout=120)
        assert control[-1].finish_reason == pb.FINISH_REASON_LENGTH, (
            "the long prompt ended early: it no longer measures anything, pick another"
        )

        # The same long answer again, abandoned after its first chunks.
        call = stub(ch).StreamGenerate(
            pb.StreamGenerateRequest(prompt=LONG_PROMPT, options=greedy(long_tokens)),
            timeout=120,
        )
        read_started = time.perf_counter()
        for _ in range(3):
            chunk = await call.read()
            assert chunk.delta and not chunk.is_final
        head_s = time.perf_counter() - read_started
        call.cancel()
        _, next_s = await read_stream(ch, SHORT_PROMPT, 8)

    rest_s = control_s - head_s  # what the abandoned generation still had to do
    bound = 3 * alone_s  # generous: the cancel reaches the model within a token or two
    assert rest_s > 2 * bound, (
        f"the rest of the long answer ({rest_s:.2f} s) is too short next to the bound "
        f"({bound:.2f} s) for this test to tell anything"
    )
    assert next_s < bound, (
        f"the call after a cancel took {next_s:.2f} s, a short call alone {alone_s:.2f} s, "
        f"the abandoned answer's rest {rest_s:.2f} s: the generation ran on"
    )


async def test_a_model_server_killed_mid_stream_is_an_in_band_unavailable(
    fresh_stack: Callable[[], Stack],
) -> None:
    mine = fresh_stack()
    async with grpc.aio.insecure_channel(mine.proxy.address) as ch:
        call = stub(ch).StreamGenerate(
            pb.StreamGenerateRequest(prompt=LONG_PROMPT, options=greedy(96)), timeout=60
        )
        got = [await call.read() for _ in range(2)]
        assert all(c.delta and not c.is_final for c in got)
        mine.model.send_signal(signal.SIGKILL)  # our own child, by PID
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for chunk in call:
                got.append(chunk)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        final = got[-1]
        # In-band first (a browser reads nothing else), then as the call's status.
        assert final.is_final and final.finish_reason == pb.FINISH_REASON_ERROR
        assert final.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        reasons = []
        for detail in final.error.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reasons.append(info.reason)
        assert reasons, "the in-band error carries no ErrorInfo"
        assert [c.seq for c in got] == list(range(len(got)))
        assert not any(c.is_final for c in got[:-1])
        # And the agent stops offering itself while its model is away.
        async with grpc.aio.insecure_channel(mine.agent.address) as agent_ch:
            await wait_health(agent_ch, NOT_SERVING, "ai.agent.v1.AgentService", timeout=15)


async def test_a_chat_session_keeps_its_history_through_the_proxy(stack: Stack) -> None:
    session = f"real-{time.monotonic_ns()}"
    turns = ["My name is Ada and I like red apples.", "What fruit do I like?", "Thank you."]
    prompts: list[int] = []
    completions: list[int] = []
    async with grpc.aio.insecure_channel(stack.proxy.address) as ch:
        for i, text in enumerate(turns):
            chunks = [
                c
                async for c in stub(ch).StreamChat(
                    pb.StreamChatRequest(session_id=session, user_message=text, options=greedy(24)),
                    timeout=60,
                )
            ]
            final = chunks[-1]
            assert final.is_final and chunks[0].session_id == session, f"turn {i}"
            prompts.append(final.usage.prompt_tokens)
            completions.append(final.usage.completion_tokens)
        # The same second message in a session of its own: no history.
        alone = await stub(ch).Chat(
            pb.ChatRequest(
                session_id=f"{session}-alone", user_message=turns[1], options=greedy(24)
            ),
            timeout=60,
        )
    # Each turn's prompt holds the turns before it: every earlier question and answer.
    for i in (1, 2):
        assert prompts[i] >= prompts[i - 1] + completions[i - 1], (prompts, completions)
    assert prompts[1] > alone.usage.prompt_tokens + completions[0], (prompts, alone.usage)
