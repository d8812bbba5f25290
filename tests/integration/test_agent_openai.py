"""The agent's OpenAI-compatible backend against a real HTTP server on port 0
(tests.support.fake_openai): streams and unary calls, usage, finish reasons, cancellation
and deadlines reaching the model server, the HTTP error mapping, a model server that dies
mid-answer, health following the model server, the key kept out of logs, and one stream
through the real proxy (`aiproxy serve` in front of `aiproxy agent --backend openai`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiproxy.agent.server import LIVENESS_SERVICE, AgentServer
from aiproxy.agent.settings import AgentSettings
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.conftest import proxy_args
from tests.support.fake_openai import Behaviour, FakeOpenAI
from tests.support.grpc_helpers import NOT_SERVING, SERVING, health_status, stub, wait_health
from tests.support.procs import ServiceProcess

API_KEY = "sk-test-4f9c1d2e8a7b6c5d"
SERVICE = "ai.agent.v1.AgentService"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.shutdown()


@pytest.fixture
async def agent(fake: FakeOpenAI) -> AsyncIterator[AgentServer]:
    server = AgentServer(
        AgentSettings(
            listen="127.0.0.1:0",
            backend="openai",
            base_url=fake.base_url,
            api_key=API_KEY,
            model="fake-model",
            health_interval_s=0.2,
            batch_concurrency=2,
        )
    )
    await server.start()
    yield server
    await server.stop(grace=None)


@pytest.fixture
async def channel(agent: AgentServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(agent.address) as ch:
        yield ch


def rich_status(err: grpc.aio.AioRpcError) -> tuple[status_pb2.Status, dict[str, object]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    found: dict[str, object] = {}
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                found[cls.__name__] = msg
    return status, found


# --- answers ---------------------------------------------------------------------------


async def test_stream_maps_each_delta_to_a_chunk_and_reports_the_models_usage(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    tokens = ["Hello", ",", " world", "!"]
    fake.behaviours["fake-model"] = Behaviour(tokens=tokens, usage=(11, 4), token_delay_s=0.005)
    chunks = [
        c
        async for c in stub(channel).StreamGenerate(
            pb.StreamGenerateRequest(
                prompt="say hello", options=pb.GenerationOptions(max_tokens=9)
            ),
            timeout=10,
        )
    ]
    assert [c.delta for c in chunks[:-1]] == tokens  # one chunk per SSE delta
    assert "".join(c.delta for c in chunks) == "Hello, world!"
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert chunks[0].model == "fake-model"
    final = chunks[-1]
    assert final.is_final and final.finish_reason == pb.FINISH_REASON_STOP
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (
        11,
        4,
        15,
    )
    (request,) = fake.chat_requests()
    assert request.body is not None
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["messages"] == [{"role": "user", "content": "say hello"}]
    assert request.body["max_tokens"] == 9
    assert request.headers["authorization"] == f"Bearer {API_KEY}"


async def test_unary_generate_and_finish_reason_length(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    fake.behaviours["short"] = Behaviour(tokens=["a", "b"], usage=(3, 2), finish_reason="length")
    reply = await stub(channel).Generate(pb.GenerateRequest(prompt="x", model="short"), timeout=10)
    assert reply.text == "ab" and reply.model == "short"
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        3,
        2,
        5,
    )
    assert fake.chat_requests()[0].body["stream"] is False  # type: ignore[index]


async def test_chat_sends_roles_and_the_session_remembers_the_answer(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    first = [
        c
        async for c in stub(channel).StreamChat(
            pb.StreamChatRequest(
                session_id="s1",
                messages=[
                    pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="be brief"),
                    pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="ping pong"),
                ],
            ),
            timeout=10,
        )
    ]
    answer = "".join(c.delta for c in first)
    assert answer == "Echo: ping pong" and first[0].session_id == "s1"
    reply = await stub(channel).Chat(
        pb.ChatRequest(session_id="s1", user_message="again"), timeout=10
    )
    assert reply.message.content == "Echo: again" and reply.session_id == "s1"
    assert fake.chat_requests()[1].body["messages"] == [  # type: ignore[index]
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ping pong"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "again"},
    ]


async def test_rag_stream_puts_the_retrieved_sources_in_the_prompt(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    chunks = [
        c
        async for c in stub(channel).StreamRagGenerate(
            pb.StreamRagGenerateRequest(query="circuit breaker", top_k=2), timeout=10
        )
    ]
    sources = list(chunks[0].sources)
    assert sources, "the bundled corpus should match this query"
    system, user = fake.chat_requests()[0].body["messages"]  # type: ignore[index]
    assert system["role"] == "system" and user == {"role": "user", "content": "circuit breaker"}
    for i, source in enumerate(sources, start=1):
        assert f"[{i}] {source.title}: {source.snippet}" in system["content"]
    assert "".join(c.delta for c in chunks) == "Echo: circuit breaker"
    assert chunks[-1].is_final


async def test_batch_is_one_model_call_per_prompt_with_bounded_concurrency(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    fake.default = Behaviour(first_delay_s=0.05)
    fake.behaviours["fake-model"] = Behaviour(first_delay_s=0.05)
    prompts = [f"p{i}" for i in range(6)]
    reply = await stub(channel).BatchGenerate(pb.BatchGenerateRequest(prompts=prompts), timeout=20)
    assert [r.text for r in reply.results] == [f"Echo: p{i}" for i in range(6)]
    assert reply.succeeded == 6 and reply.failed == 0
    assert len(fake.chat_requests()) == 6
    assert fake.max_in_flight == 2  # batch_concurrency


async def test_batch_item_fails_alone_with_the_models_status(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    fake.behaviours["m400"] = Behaviour(status=400, error_message="context too long")
    reply = await stub(channel).BatchGenerate(
        pb.BatchGenerateRequest(prompts=["a", "b"], model="m400"), timeout=10
    )
    assert reply.failed == 2
    assert all(r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in reply.results)


# --- cancellation and deadlines -----------------------------------------------------------


async def test_caller_cancel_closes_the_request_to_the_model(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    fake.behaviours["slow"] = Behaviour(tokens=[f" t{i}" for i in range(200)], token_delay_s=0.05)
    call = stub(channel).StreamGenerate(
        pb.StreamGenerateRequest(prompt="x", model="slow"), timeout=30
    )
    assert (await call.read()).delta == " t0"
    cancelled_at = time.monotonic()
    call.cancel()
    seen = await asyncio.to_thread(fake.wait_for, lambda r: r.disconnected_at is not None, 5)
    assert seen.disconnected_at is not None
    lag = seen.disconnected_at - cancelled_at
    assert lag < 1.0, f"the model server saw the caller leave {lag:.3f}s later"
    assert seen.chunks_sent < 200 and not seen.completed


@pytest.mark.parametrize("streaming", [False, True])
async def test_deadline_becomes_the_model_calls_timeout(
    fake: FakeOpenAI, channel: grpc.aio.Channel, streaming: bool
) -> None:
    fake.behaviours["stuck"] = Behaviour(first_delay_s=30)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if streaming:
            async for _ in stub(channel).StreamGenerate(
                pb.StreamGenerateRequest(prompt="x", model="stuck"), timeout=0.5
            ):
                pass
        else:
            await stub(channel).Generate(pb.GenerateRequest(prompt="x", model="stuck"), timeout=0.5)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    seen = await asyncio.to_thread(fake.wait_for, lambda r: r.disconnected_at is not None, 5)
    assert seen.disconnected_at is not None and seen.disconnected_at - started < 3.0


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
async def test_429_is_resource_exhausted_with_retry_info_from_retry_after(
    fake: FakeOpenAI, channel: grpc.aio.Channel, streaming: bool
) -> None:
    fake.behaviours["m429"] = Behaviour(status=429, headers={"retry-after": "7"})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if streaming:
            async for _ in stub(channel).StreamGenerate(
                pb.StreamGenerateRequest(prompt="x", model="m429"), timeout=10
            ):
                pass
        else:
            await stub(channel).Generate(pb.GenerateRequest(prompt="x", model="m429"), timeout=10)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    _, found = rich_status(err.value)
    assert found["ErrorInfo"].reason == "MODEL_RATE_LIMITED"  # type: ignore[attr-defined]
    assert found["RetryInfo"].retry_delay.seconds == 7  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("http_status", "code", "reason"),
    [
        (500, grpc.StatusCode.UNAVAILABLE, "MODEL_UNAVAILABLE"),
        (503, grpc.StatusCode.UNAVAILABLE, "MODEL_UNAVAILABLE"),
        (408, grpc.StatusCode.UNAVAILABLE, "MODEL_UNAVAILABLE"),
        (400, grpc.StatusCode.INVALID_ARGUMENT, "MODEL_REJECTED_REQUEST"),
        (422, grpc.StatusCode.INVALID_ARGUMENT, "MODEL_REJECTED_REQUEST"),
        (401, grpc.StatusCode.INTERNAL, "MODEL_AUTH_FAILED"),
        (403, grpc.StatusCode.INTERNAL, "MODEL_AUTH_FAILED"),
        # A 404 that does not name the model: the agent's URL, not the caller's request.
        (404, grpc.StatusCode.INTERNAL, "MODEL_MISCONFIGURED"),
    ],
)
async def test_http_errors_map_to_statuses(
    fake: FakeOpenAI,
    channel: grpc.aio.Channel,
    http_status: int,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    fake.behaviours["bad"] = Behaviour(status=http_status, error_message="maximum context length")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub(channel).StreamChat(
            pb.StreamChatRequest(user_message="x", model="bad"), timeout=10
        ):
            pass
    assert err.value.code() is code
    status, found = rich_status(err.value)
    assert found["ErrorInfo"].reason == reason  # type: ignore[attr-defined]
    assert found["ErrorInfo"].metadata["httpStatus"] == str(http_status)  # type: ignore[attr-defined]
    assert API_KEY not in status.message
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert "maximum context length" in status.message  # the model server's own words
    if http_status in (401, 403):
        assert "OPENAI_API_KEY" in status.message and "request was fine" in status.message
    if http_status == 404:
        assert "POST /v1/chat/completions for model 'bad'" in status.message
        assert "request was fine" in status.message
    if code is grpc.StatusCode.UNAVAILABLE:
        assert "RetryInfo" in found


async def test_model_dying_mid_stream_ends_the_stream_unavailable(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    fake.behaviours["dies"] = Behaviour(tokens=["a", "b", "c", "d"], disconnect_after=2)
    call = stub(channel).StreamGenerate(
        pb.StreamGenerateRequest(prompt="x", model="dies"), timeout=10
    )
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for chunk in call:
            got.append(chunk)
    assert [c.delta for c in got] == ["a", "b"] and not any(c.is_final for c in got)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    _, found = rich_status(err.value)
    assert found["ErrorInfo"].reason == "MODEL_UNAVAILABLE"  # type: ignore[attr-defined]


async def test_unreachable_model_is_unavailable(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    await asyncio.to_thread(fake.stop)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(channel).Generate(pb.GenerateRequest(prompt="x"), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    _, found = rich_status(err.value)
    assert found["ErrorInfo"].reason == "MODEL_UNAVAILABLE"  # type: ignore[attr-defined]


# --- health ----------------------------------------------------------------------------------


async def test_health_follows_the_model_server(fake: FakeOpenAI, channel: grpc.aio.Channel) -> None:
    await wait_health(channel, SERVING, SERVICE)
    await asyncio.to_thread(fake.stop)
    await wait_health(channel, NOT_SERVING, SERVICE, timeout=10)
    await wait_health(channel, NOT_SERVING, "", timeout=10)
    # ...but the process is alive: a liveness probe must not restart it for its model.
    assert await health_status(channel, LIVENESS_SERVICE) == SERVING
    await asyncio.to_thread(fake.start)  # same port again
    await wait_health(channel, SERVING, SERVICE, timeout=10)
    probes = [r for r in fake.requests if r.path == "/v1/models"]
    assert probes and all(r.headers["authorization"] == f"Bearer {API_KEY}" for r in probes)


# --- processes: the key in no log, and the real proxy in front ----------------------------


def _agent_argv(fake: FakeOpenAI) -> list[str]:
    return ["agent", "--listen", "127.0.0.1:0", "--backend", "openai", "--base-url",
            fake.base_url, "--model", "fake-model", "--health-interval-s", "0.2"]  # fmt: skip


async def test_api_key_appears_in_no_log(
    fake: FakeOpenAI, spawn: Callable[..., ServiceProcess]
) -> None:
    proc = spawn(*_agent_argv(fake), env={"OPENAI_API_KEY": API_KEY}, name="agent")
    fake.behaviours["m401"] = Behaviour(status=401, error_message=f"bad key {API_KEY}")
    fake.behaviours["m500"] = Behaviour(status=500)
    async with grpc.aio.insecure_channel(proc.address) as ch:
        await stub(ch).Generate(pb.GenerateRequest(prompt="x"), timeout=10)
        for model in ("m401", "m500"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub(ch).Generate(pb.GenerateRequest(prompt="x", model=model), timeout=10)
            assert API_KEY not in (err.value.details() or "")
        await asyncio.to_thread(fake.stop)  # probes fail and are logged
        await wait_health(ch, NOT_SERVING, SERVICE, timeout=10)
        await asyncio.to_thread(fake.start)
        await wait_health(ch, SERVING, SERVICE, timeout=10)
    assert proc.stop() == 0
    assert fake.chat_requests()[0].headers["authorization"] == f"Bearer {API_KEY}"
    started = proc.log_events("agent_started")[0]
    assert started["backend"] == "openai" and started["api_key_set"] is True
    assert proc.log_events("model_http_error") and proc.log_events("model_health_changed")
    text = proc.stderr_text() + proc.stdout_path.read_text()
    assert API_KEY not in text and API_KEY[-8:] not in text


async def test_stream_through_the_real_proxy(
    fake: FakeOpenAI, spawn: Callable[..., ServiceProcess]
) -> None:
    agent_proc = spawn(*_agent_argv(fake), env={"OPENAI_API_KEY": API_KEY}, name="agent")
    proxy = spawn(*proxy_args(agent_proc.address), name="proxy")
    tokens = [f" w{i}" for i in range(20)]
    fake.behaviours["fake-model"] = Behaviour(tokens=tokens, usage=(5, 20), token_delay_s=0.002)
    fake.behaviours["dies"] = Behaviour(tokens=tokens, disconnect_after=3, token_delay_s=0.002)
    async with grpc.aio.insecure_channel(proxy.address) as ch:
        chunks = [
            c
            async for c in stub(ch).StreamGenerate(pb.StreamGenerateRequest(prompt="x"), timeout=20)
        ]
        assert "".join(c.delta for c in chunks) == "".join(tokens)
        assert chunks[-1].is_final and chunks[-1].usage.total_tokens == 25
        # The model dies mid-answer: the proxy ends the stream UNAVAILABLE, the error in-band.
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for chunk in stub(ch).StreamGenerate(
                pb.StreamGenerateRequest(prompt="x", model="dies"), timeout=20
            ):
                got.append(chunk)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "".join(c.delta for c in got) == "".join(tokens[:3])
        assert got[-1].is_final and got[-1].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        # The model's 429 reaches the proxy's caller as RESOURCE_EXHAUSTED, its retry-after
        # as RetryInfo; its 401 as INTERNAL (not UNAUTHENTICATED: the caller is fine).
        fake.behaviours["m429"] = Behaviour(status=429, headers={"retry-after": "7"})
        fake.behaviours["m401"] = Behaviour(status=401)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub(ch).Generate(pb.GenerateRequest(prompt="x", model="m429"), timeout=20)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        _, found = rich_status(err.value)
        assert found["RetryInfo"].retry_delay.seconds == 7  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub(ch).Generate(pb.GenerateRequest(prompt="x", model="m401"), timeout=20)
        assert err.value.code() is grpc.StatusCode.INTERNAL
        # A 404 about a model the caller asked for is the caller's (NOT_FOUND, and the
        # proxy passes the message on); a 404 that names no model is the agent's (INTERNAL,
        # never the INVALID_ARGUMENT that would tell the caller to change a fine request).
        fake.behaviours["gpt-9"] = Behaviour(
            status=404, error_message="The model `gpt-9` does not exist."
        )
        fake.behaviours["m404"] = Behaviour(status=404, error_message="Not Found")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub(ch).Generate(pb.GenerateRequest(prompt="x", model="gpt-9"), timeout=20)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert "gpt-9" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub(ch).Generate(pb.GenerateRequest(prompt="x", model="m404"), timeout=20)
        assert err.value.code() is grpc.StatusCode.INTERNAL


# --- the client: keep-alive, servers that say little or too much ------------------------


async def test_calls_reuse_one_kept_alive_connection(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    for _ in range(3):
        await stub(channel).Generate(pb.GenerateRequest(prompt="x"), timeout=10)
        async for _ in stub(channel).StreamGenerate(
            pb.StreamGenerateRequest(prompt="y"), timeout=10
        ):
            pass
    assert len({r.connection for r in fake.chat_requests()}) == 1


async def test_a_server_without_stream_usage_leaves_usage_unset(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    fake.behaviours["quiet"] = Behaviour(tokens=["a"], stream_usage=False)
    chunks = [
        c
        async for c in stub(channel).StreamGenerate(
            pb.StreamGenerateRequest(prompt="x", model="quiet"), timeout=10
        )
    ]
    assert chunks[-1].is_final and not chunks[-1].HasField("usage")
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP


async def test_an_endless_stream_line_is_refused_not_buffered(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    fake.behaviours["huge"] = Behaviour(tokens=["a"], endless_line_bytes=4 << 20)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub(channel).StreamGenerate(
            pb.StreamGenerateRequest(prompt="x", model="huge"), timeout=20
        ):
            pass
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    _, found = rich_status(err.value)
    assert found["ErrorInfo"].reason == "MODEL_BAD_ANSWER"  # type: ignore[attr-defined]
    seen = await asyncio.to_thread(fake.wait_for, lambda r: r.disconnected_at is not None, 10)
    assert not seen.completed


async def test_the_proxy_routes_away_from_an_agent_whose_model_is_down(
    fake: FakeOpenAI, spawn: Callable[..., ServiceProcess]
) -> None:
    """The model server is up but its /models says 503: that agent reports NOT_SERVING, so
    the proxy sends every call to the other (reference) agent and none reaches this model."""
    fake.models_status = 503
    model_agent = spawn(*_agent_argv(fake), name="agent-model")
    reference = spawn("agent", "--listen", "127.0.0.1:0", "--first-token-delay-ms", "0",
                      "--token-delay-ms", "0", name="agent-reference")  # fmt: skip
    async with grpc.aio.insecure_channel(model_agent.address) as ch:
        await wait_health(ch, NOT_SERVING, SERVICE, timeout=10)
    proxy = spawn(*proxy_args(model_agent.address, reference.address), name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as ch:
        for _ in range(10):
            reply = await stub(ch).Generate(pb.GenerateRequest(prompt="x"), timeout=10)
            assert reply.model == "ref-model-1"
        assert fake.chat_requests() == []
        fake.models_status = 200  # the model is back: the agent says SERVING again...
        async with grpc.aio.insecure_channel(model_agent.address) as agent_ch:
            await wait_health(agent_ch, SERVING, SERVICE, timeout=10)
        deadline = time.monotonic() + 15  # ...and the proxy sends it calls again
        while not fake.chat_requests():
            assert time.monotonic() < deadline, "the proxy never routed back to the model agent"
            await stub(ch).Generate(pb.GenerateRequest(prompt="x"), timeout=10)


async def test_no_free_connection_is_unavailable_not_a_long_queue(fake: FakeOpenAI) -> None:
    from aiproxy.agent.openai_backend import ModelClient, ModelError, ModelSettings

    fake.behaviours["slow"] = Behaviour(tokens=["a"] * 50, token_delay_s=0.1)
    client = ModelClient(
        ModelSettings(base_url=fake.base_url, max_connections=1, pool_timeout_s=0.2)
    )
    try:
        stream = client.stream([], model="slow", options={}, timeout_s=30)
        assert await anext(stream)  # holds the only connection
        started = time.monotonic()
        with pytest.raises(ModelError) as err:
            await client.complete([], model="fake-model", options={}, timeout_s=30)
        assert err.value.code is grpc.StatusCode.UNAVAILABLE and err.value.reason == "MODEL_BUSY"
        assert time.monotonic() - started < 5
        await stream.aclose()
    finally:
        await client.aclose()


async def test_a_cancelled_batch_closes_every_model_request(
    fake: FakeOpenAI, channel: grpc.aio.Channel
) -> None:
    fake.behaviours["stuck"] = Behaviour(first_delay_s=30)
    call = stub(channel).BatchGenerate(
        pb.BatchGenerateRequest(prompts=["a", "b", "c"], model="stuck"), timeout=30
    )
    deadline = time.monotonic() + 10
    while len(fake.chat_requests()) < 2:  # batch_concurrency=2 in flight
        assert time.monotonic() < deadline, "the batch's requests never reached the model server"
        await asyncio.sleep(0.01)
    call.cancel()
    deadline = time.monotonic() + 5
    while sum(r.disconnected_at is not None for r in fake.chat_requests()) < 2:
        assert time.monotonic() < deadline, "the model server still holds the batch's requests"
        await asyncio.sleep(0.01)
    assert len(fake.chat_requests()) == 2  # the third prompt was never sent
