"""The reference agent served for real (in-process, port 0) and called over gRPC.

Delays are zero unless a test slows a call down with x-fault-slow-ms, so the whole file
runs in about a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from aiproxy.agent.interceptor import REPLICA_TRAILER
from aiproxy.agent.server import AgentServer, AgentSettings
from aiproxy.agent.sessions import SessionStoreUnavailable
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from aiproxy.core.headers import SESSION_OWNER_HEADER
from tests.support.grpc_helpers import max_wire_timeout_ms
from tests.support.waiting import eventually

SERVICE = "ai.agent.v1.AgentService"
USER = pb.CHAT_ROLE_USER
ASSISTANT = pb.CHAT_ROLE_ASSISTANT


async def _serve(**settings: Any) -> AgentServer:
    server = AgentServer(
        AgentSettings(listen="127.0.0.1:0", first_token_delay_ms=0, token_delay_ms=0, **settings)
    )
    await server.start()
    return server


@pytest.fixture
async def server() -> AsyncIterator[AgentServer]:
    server = await _serve(enable_faults=True)
    yield server
    await server.stop(None)


@pytest.fixture
async def channel(server: AgentServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.AgentServiceStub:
    return pb_grpc.AgentServiceStub(channel)


@pytest.fixture
def call_log(caplog: pytest.LogCaptureFixture) -> Callable[..., list[dict[str, Any]]]:
    """The agent's call log lines (their JSON fields), optionally one event only."""
    caplog.set_level(logging.INFO, logger="agent")

    def events(event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for record in caplog.records:
            if record.name == "agent.calls" and event in (None, record.getMessage()):
                out.append(
                    {
                        "event": record.getMessage(),
                        "ts": record.created,
                        **getattr(record, "fields", {}),
                    }
                )
        return out

    return events


async def _wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll a state (not a fixed sleep): the value of `predicate` once it is truthy."""
    return await eventually(predicate, timeout, interval=0.005)


def _faults(**keys: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"x-fault-{k.replace('_', '-')}", v) for k, v in keys.items())


def _assert_stream_shape(chunks: list[Any]) -> None:
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [c.is_final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[0].model == "ref-model-1" and all(not c.model for c in chunks[1:])
    assert all(not c.HasField("usage") for c in chunks[:-1])
    usage = chunks[-1].usage
    assert (
        usage.completion_tokens > 0
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )
    assert chunks[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


async def _read_rest(call: Any) -> list[Any]:
    """The remaining chunks of a call already read with read() (iteration cannot follow)."""
    chunks = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    return chunks


def _bad_request_fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields += [v.field for v in bad.field_violations]
    return fields


# --- generation -----------------------------------------------------------------------


async def test_generate_and_stream_generate_agree(stub: pb_grpc.AgentServiceStub) -> None:
    options = pb.GenerationOptions(temperature=0.7)
    whole = await stub.Generate(
        pb.GenerateRequest(prompt="Explain circuit breakers", options=options)
    )
    assert (
        whole.text and whole.model == "ref-model-1" and whole.finish_reason == pb.FINISH_REASON_STOP
    )
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = [
        c
        async for c in stub.StreamGenerate(
            pb.StreamGenerateRequest(prompt="Explain circuit breakers", options=options)
        )
    ]
    _assert_stream_shape(chunks)
    assert "".join(c.delta for c in chunks) == whole.text
    assert len(chunks) == whole.usage.completion_tokens + 1  # a token per chunk, then the final one
    assert chunks[-1].usage == whole.usage and chunks[-1].delta == ""


async def test_generation_is_deterministic_and_echoes_the_model(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    request = pb.GenerateRequest(prompt="Explain backpressure")
    assert await stub.Generate(request) == await stub.Generate(request)
    other = await stub.Generate(
        pb.GenerateRequest(prompt="Explain backpressure", model="big-model-2")
    )
    assert other.model == "big-model-2"
    assert other.text != (await stub.Generate(request)).text


async def test_max_tokens_caps_with_finish_reason_length(stub: pb_grpc.AgentServiceStub) -> None:
    capped = await stub.Generate(
        pb.GenerateRequest(prompt="queues", options=pb.GenerationOptions(max_tokens=4))
    )
    assert capped.usage.completion_tokens == 4 and capped.finish_reason == pb.FINISH_REASON_LENGTH
    chunks = [
        c
        async for c in stub.StreamGenerate(
            pb.StreamGenerateRequest(prompt="queues", options=pb.GenerationOptions(max_tokens=4))
        )
    ]
    assert len(chunks) == 5 and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (pb.GenerationOptions(temperature=2.5), "options.temperature"),
        (pb.GenerationOptions(top_p=-0.1), "options.top_p"),
        (pb.GenerationOptions(max_tokens=-1), "options.max_tokens"),
    ],
)
async def test_bad_generation_requests_are_invalid_argument(stub, options, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(pb.GenerateRequest(prompt="x", options=options))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request_fields(err.value) == [field]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(pb.GenerateRequest(prompt="  "))
    assert _bad_request_fields(err.value) == ["prompt"]


async def test_batch_reports_each_prompt_and_sums_usage(stub: pb_grpc.AgentServiceStub) -> None:
    reply = await stub.BatchGenerate(
        pb.BatchGenerateRequest(
            prompts=["one", "", "three"], options=pb.GenerationOptions(max_tokens=8)
        )
    )
    assert [r.index for r in reply.results] == [0, 1, 2]
    assert (reply.succeeded, reply.failed) == (2, 1)
    bad = reply.results[1]
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not bad.text
    assert bad.finish_reason == pb.FINISH_REASON_ERROR
    single = await stub.Generate(
        pb.GenerateRequest(prompt="three", options=pb.GenerationOptions(max_tokens=8))
    )
    assert reply.results[2].text == single.text  # a batch answers like single calls
    good = [reply.results[0].usage, reply.results[2].usage]
    assert reply.usage.total_tokens == sum(u.total_tokens for u in good) > 0


async def test_batch_size_is_capped(stub: pb_grpc.AgentServiceStub) -> None:
    for prompts in ([], ["p"] * 65):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.BatchGenerate(pb.BatchGenerateRequest(prompts=prompts))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        len((await stub.BatchGenerate(pb.BatchGenerateRequest(prompts=["p"] * 64))).results) == 64
    )


# --- chat -----------------------------------------------------------------------------


async def test_chat_answers_and_remembers_the_session(stub: pb_grpc.AgentServiceStub) -> None:
    question = pb.ChatMessage(role=USER, content="What is backpressure?")
    first = await stub.Chat(pb.ChatRequest(session_id="s1", messages=[question]))
    assert first.session_id == "s1" and first.message.role == ASSISTANT and first.message.content
    assert first == await stub.Chat(
        pb.ChatRequest(session_id="s1", messages=[question])
    )  # messages replace memory

    follow_up = await stub.Chat(pb.ChatRequest(session_id="s1", user_message="And load shedding?"))
    explicit = await stub.Chat(
        pb.ChatRequest(
            session_id="s2",
            messages=[
                question,
                first.message,
                pb.ChatMessage(role=USER, content="And load shedding?"),
            ],
        )
    )
    assert follow_up.message.content == explicit.message.content  # memory == sending the history
    assert follow_up.message.content != first.message.content
    assert follow_up.usage.prompt_tokens > first.usage.prompt_tokens


async def test_chat_without_session_id_gets_one(stub: pb_grpc.AgentServiceStub) -> None:
    reply = await stub.Chat(pb.ChatRequest(user_message="hello"))
    assert reply.session_id.startswith("sess_")
    continued = await stub.Chat(
        pb.ChatRequest(session_id=reply.session_id, user_message="more please")
    )
    assert continued.usage.prompt_tokens > reply.usage.prompt_tokens


def _owner(name: str) -> tuple[tuple[str, str], ...]:
    """The owner the proxy would name (x-aiproxy-session-owner: the agent trusts it)."""
    return ((SESSION_OWNER_HEADER, name),)


def _reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


async def test_the_session_api_is_scoped_by_the_owner(stub: pb_grpc.AgentServiceStub) -> None:
    created = await stub.CreateSession(pb.CreateSessionRequest(), metadata=_owner("alice"))
    sid = created.session_id
    assert sid.startswith("sess_") and len(sid) == 5 + 22  # 128 bits, URL-safe base64
    assert sid != (await stub.CreateSession(pb.CreateSessionRequest())).session_id
    empty = await stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=_owner("alice"))
    assert empty.session_id == sid and list(empty.messages) == []

    first = await stub.Chat(
        pb.ChatRequest(session_id=sid, user_message="hello there"), metadata=_owner("alice")
    )
    second = await stub.Chat(
        pb.ChatRequest(session_id=sid, user_message="and then?"), metadata=_owner("alice")
    )
    got = await stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=_owner("alice"))
    assert [(m.role, m.content) for m in got.messages] == [
        (USER, "hello there"),
        (ASSISTANT, first.message.content),
        (USER, "and then?"),
        (ASSISTANT, second.message.content),
    ]

    # Another owner naming the id: its own empty conversation, NOT_FOUND on the API.
    other = await stub.Chat(
        pb.ChatRequest(session_id=sid, user_message="hello there"), metadata=_owner("mallory")
    )
    assert other.usage.prompt_tokens == first.usage.prompt_tokens < second.usage.prompt_tokens
    for call in (
        stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=_owner("carol")),
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=_owner("carol")),
        stub.GetSession(pb.GetSessionRequest(session_id="never-made"), metadata=_owner("alice")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert _reason(err.value) == "SESSION_NOT_FOUND"

    await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=_owner("alice"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=_owner("alice"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    fresh = await stub.Chat(
        pb.ChatRequest(session_id=sid, user_message="hello there"), metadata=_owner("alice")
    )
    assert fresh.usage.prompt_tokens == first.usage.prompt_tokens  # starts fresh
    # Mallory's conversation under the same id was never touched.
    kept = await stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=_owner("mallory"))
    assert len(kept.messages) == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda stub: stub.GetSession(pb.GetSessionRequest()),
        lambda stub: stub.DeleteSession(pb.DeleteSessionRequest(session_id="x" * 129)),
    ],
)
async def test_session_ids_are_checked(stub: pb_grpc.AgentServiceStub, call: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(stub)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request_fields(err.value) == ["session_id"]


async def test_an_answer_the_store_cannot_remember_ends_with_its_error(
    server: AgentServer, stub: pb_grpc.AgentServiceStub
) -> None:
    """A stream is remembered just before its final chunk: when that write fails, the
    caller gets SESSION_STORE_UNAVAILABLE instead of a final chunk (never an answer that
    looks complete but is not in the session); a unary turn fails whole."""
    store = server.conversations.store

    async def failing_append(*args: Any, **kwargs: Any) -> None:
        raise SessionStoreUnavailable()

    store.append = failing_append  # type: ignore[method-assign]
    chunks = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for chunk in stub.StreamChat(pb.StreamChatRequest(session_id="w", user_message="hi")):
            chunks.append(chunk)
    assert chunks and not any(c.is_final for c in chunks)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _reason(err.value) == "SESSION_STORE_UNAVAILABLE"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Chat(pb.ChatRequest(session_id="w", user_message="hi"))
    assert _reason(err.value) == "SESSION_STORE_UNAVAILABLE"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetSession(pb.GetSessionRequest(session_id="w"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was remembered


async def test_every_answer_says_which_replica_gave_it(server: AgentServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        call = stub.Generate(pb.GenerateRequest(prompt="hi"))
        await call
        assert (REPLICA_TRAILER, server.address) in list(await call.trailing_metadata())
        failing = stub.GetSession(pb.GetSessionRequest(session_id="nope"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await failing
        trailers = list(err.value.trailing_metadata())
        assert (REPLICA_TRAILER, server.address) in trailers  # errors keep it
        assert _reason(err.value) == "SESSION_NOT_FOUND"


async def test_the_modelled_prefix_cache_delays_only_uncached_prompt_tokens() -> None:
    """Prefill (the first token's extra wait) is per prompt token this replica has not
    cached: a whole prompt on a replica new to the session, only the new turn after."""
    a = await _serve(prefill_ms_per_token=20, replica_name="replica-a")
    b = await _serve(prefill_ms_per_token=20, replica_name="replica-b")
    try:
        async with (
            grpc.aio.insecure_channel(a.address) as ch_a,
            grpc.aio.insecure_channel(b.address) as ch_b,
        ):
            stub_a, stub_b = pb_grpc.AgentServiceStub(ch_a), pb_grpc.AgentServiceStub(ch_b)
            history = [pb.ChatMessage(role=USER, content="word " * 30)]
            first = await stub_a.Chat(pb.ChatRequest(session_id="p", messages=history))
            assert first.usage.prompt_tokens >= 30
            history.append(first.message)
            history.append(pb.ChatMessage(role=USER, content="more"))
            caches = {
                "a": a.conversations.prefix_cache,
                "b": b.conversations.prefix_cache,
            }
            key = next(iter(caches["a"]._entries))
            prompt = first.usage.prompt_tokens + first.usage.completion_tokens + 3
            # a holds the first turn (prompt and answer); b has never seen the session.
            assert caches["a"].uncached(key, prompt) <= 5
            assert caches["b"].uncached(key, prompt) == prompt
            call = stub_b.Chat(pb.ChatRequest(session_id="p", messages=history))
            await call
            assert ("x-agent-replica", "replica-b") in list(await call.trailing_metadata())
            assert caches["b"].uncached(key, prompt) <= 5
    finally:
        await a.stop(None)
        await b.stop(None)


async def test_stream_chat_shape(stub: pb_grpc.AgentServiceStub) -> None:
    request = pb.StreamChatRequest(
        session_id="s3",
        messages=[
            pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="Be terse."),
            pb.ChatMessage(role=USER, content="Why retries?"),
        ],
    )
    chunks = [c async for c in stub.StreamChat(request)]
    _assert_stream_shape(chunks)
    assert chunks[0].session_id == "s3" and all(not c.session_id for c in chunks[1:])
    unary = await stub.Chat(pb.ChatRequest(session_id="s3", messages=request.messages))
    assert "".join(c.delta for c in chunks) == unary.message.content


@pytest.mark.parametrize(
    ("request_msg", "field"),
    [
        (pb.ChatRequest(session_id="s"), "messages"),
        (pb.ChatRequest(messages=[pb.ChatMessage(content="no role")]), "messages[0].role"),
        (
            pb.ChatRequest(
                messages=[
                    pb.ChatMessage(role=USER, content="a"),
                    pb.ChatMessage(role=9, content="b"),
                ]
            ),
            "messages[1].role",
        ),
    ],
)
async def test_bad_chats_are_invalid_argument(stub, request_msg, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Chat(request_msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request_fields(err.value) == [field]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.StreamChat(
            pb.StreamChatRequest(
                **json_format.MessageToDict(request_msg, preserving_proto_field_name=True)
            )
        ):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- retrieval ------------------------------------------------------------------------


async def test_search_rag(stub: pb_grpc.AgentServiceStub) -> None:
    reply = await stub.SearchRag(pb.SearchRagRequest(query="circuit breaker half-open"))
    assert 1 <= len(reply.sources) <= 3 and reply.sources[0].id == "res-001"
    top = reply.sources[0]
    assert (
        top.title
        and top.snippet
        and 0 < top.score <= 1
        and top.metadata["category"] == "resilience"
    )

    filtered = await stub.SearchRag(
        pb.SearchRagRequest(query="health", top_k=20, filters={"category": "kubernetes"})
    )
    assert filtered.sources and {s.metadata["category"] for s in filtered.sources} == {"kubernetes"}
    assert (
        len((await stub.SearchRag(pb.SearchRagRequest(query="grpc envoy llm", top_k=1000))).sources)
        <= 20
    )
    for bad in (pb.SearchRagRequest(query=""), pb.SearchRagRequest(query="x", top_k=-1)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SearchRag(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stream_rag_generate_cites_its_sources(stub: pb_grpc.AgentServiceStub) -> None:
    request = pb.StreamRagGenerateRequest(query="token bucket rate limiting", top_k=2)
    chunks = [c async for c in stub.StreamRagGenerate(request)]
    _assert_stream_shape(chunks)
    searched = await stub.SearchRag(pb.SearchRagRequest(query=request.query, top_k=2))
    assert list(chunks[0].sources) == list(searched.sources)
    assert all(not c.sources for c in chunks[1:])
    text = "".join(c.delta for c in chunks)
    assert "[1]" in text and "[2]" in text and searched.sources[0].snippet in text
    assert chunks == [c async for c in stub.StreamRagGenerate(request)]


# --- agents ---------------------------------------------------------------------------


async def test_execute_agent(stub: pb_grpc.AgentServiceStub) -> None:
    context = struct_pb2.Struct()
    context.update({"audience": "engineers"})
    request = pb.ExecuteAgentRequest(
        agent_type=pb.AGENT_TYPE_ANALYSIS,
        task="Compare 12*7 with 90",
        tools=["calculator", "search"],
        context=context,
    )
    reply = await stub.ExecuteAgent(request)
    assert reply.status == pb.AGENT_STATUS_COMPLETED and reply.model == "ref-model-1"
    assert [c.name for c in reply.tool_calls] == ["calculator", "search"]
    calc = reply.tool_calls[0]
    assert json_format.MessageToDict(calc.arguments) == {"expression": "12*7"}
    assert json_format.MessageToDict(calc.result)["value"] == 84 and not calc.error
    assert [s.index for s in reply.reasoning_steps] == list(range(len(reply.reasoning_steps)))
    assert [s.tool_call_id for s in reply.reasoning_steps if s.tool_call_id] == [
        c.id for c in reply.tool_calls
    ]
    assert "12*7 = 84" in reply.result and reply.usage.completion_tokens > 0
    assert reply == await stub.ExecuteAgent(request)

    limited = await stub.ExecuteAgent(
        pb.ExecuteAgentRequest(agent_type=pb.AGENT_TYPE_REVIEW, task="Review this", max_steps=1)
    )
    assert limited.status == pb.AGENT_STATUS_STEP_LIMIT and len(limited.reasoning_steps) == 1


async def test_stream_execute_agent_reports_steps_then_result(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    fields = {
        "agent_type": pb.AGENT_TYPE_ASSISTANT,
        "task": "Count words in hello big world",
        "tools": ["word_count"],
    }
    chunks = [c async for c in stub.StreamExecuteAgent(pb.StreamExecuteAgentRequest(**fields))]
    unary = await stub.ExecuteAgent(pb.ExecuteAgentRequest(**fields))
    _assert_stream_shape(chunks)
    steps = [c.step for c in chunks if c.HasField("step")]
    calls = [c.tool_call for c in chunks if c.HasField("tool_call")]
    assert steps == list(unary.reasoning_steps) and calls == list(unary.tool_calls)
    # A tool call comes right after the step that made it.
    call_at = next(i for i, c in enumerate(chunks) if c.HasField("tool_call"))
    assert chunks[call_at - 1].step.tool_call_id == chunks[call_at].tool_call.id
    assert json_format.MessageToDict(calls[0].result)["words"] == 6
    assert "".join(c.delta for c in chunks) == unary.result
    assert chunks[-1].status == pb.AGENT_STATUS_COMPLETED and chunks[-1].usage == unary.usage


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"task": "x"}, "agent_type"),
        ({"agent_type": pb.AGENT_TYPE_CREATIVE, "task": ""}, "task"),
        (
            {
                "agent_type": pb.AGENT_TYPE_CREATIVE,
                "task": "x",
                "tools": ["search", "current_time"],
            },
            "tools[1]",
        ),
        ({"agent_type": pb.AGENT_TYPE_CREATIVE, "task": "x", "max_steps": -1}, "max_steps"),
    ],
)
async def test_bad_agent_requests_are_invalid_argument(stub, fields, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ExecuteAgent(pb.ExecuteAgentRequest(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request_fields(err.value) == [field]


# --- faults ---------------------------------------------------------------------------


async def test_fault_code_before_the_first_chunk(stub: pb_grpc.AgentServiceStub, call_log) -> None:
    call = stub.StreamGenerate(
        pb.StreamGenerateRequest(prompt="x"), metadata=_faults(code="UNAVAILABLE")
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for chunk in call:
            received.append(chunk)
    assert received == []
    assert (
        err.value.code() == grpc.StatusCode.UNAVAILABLE
        and err.value.details() == "injected fault: UNAVAILABLE"
    )
    finished = call_log("call_finished")[-1]
    assert (
        finished["code"] == "UNAVAILABLE"
        and finished["injected"] is True
        and finished["chunks"] == 0
    )


async def test_fault_after_n_chunks(stub: pb_grpc.AgentServiceStub) -> None:
    call = stub.StreamGenerate(
        pb.StreamGenerateRequest(prompt="x"), metadata=_faults(code="RESOURCE_EXHAUSTED", after="3")
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for chunk in call:
            received.append(chunk)
    assert [c.seq for c in received] == [0, 1, 2]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_fault_after_more_chunks_than_the_stream_has_is_harmless(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    request = pb.StreamGenerateRequest(prompt="x", options=pb.GenerationOptions(max_tokens=2))
    chunks = [
        c async for c in stub.StreamGenerate(request, metadata=_faults(code="INTERNAL", after="3"))
    ]
    assert len(chunks) == 3 and chunks[-1].is_final


async def test_unary_fault_fails_before_the_response(stub: pb_grpc.AgentServiceStub) -> None:
    for method, request in (
        ("Generate", pb.GenerateRequest(prompt="x")),
        ("SearchRag", pb.SearchRagRequest(query="grpc")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(stub, method)(request, metadata=_faults(code="INTERNAL", after="5"))
        assert err.value.code() == grpc.StatusCode.INTERNAL


async def test_fault_delay_postpones_the_first_chunk(stub: pb_grpc.AgentServiceStub) -> None:
    started = time.monotonic()
    call = stub.StreamGenerate(
        pb.StreamGenerateRequest(prompt="x"), metadata=_faults(delay_ms="150")
    )
    await call.read()
    assert time.monotonic() - started >= 0.15
    await _read_rest(call)
    assert await call.code() == grpc.StatusCode.OK


async def test_fault_slow_paces_every_token(stub: pb_grpc.AgentServiceStub) -> None:
    request = pb.StreamGenerateRequest(prompt="x", options=pb.GenerationOptions(max_tokens=6))
    started = time.monotonic()
    chunks = [c async for c in stub.StreamGenerate(request, metadata=_faults(slow_ms="30"))]
    assert time.monotonic() - started >= 5 * 0.030  # 6 tokens: the first is due at once
    assert len(chunks) == 7


async def test_fault_hang_until_the_deadline(stub: pb_grpc.AgentServiceStub, call_log) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(
            pb.GenerateRequest(prompt="x"),
            metadata=(("x-request-id", "hang-1"), *_faults(hang="1")),
            timeout=0.2,
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = next(e for e in call_log("call_started") if e["request_id"] == "hang-1")
    # grpc-timeout goes on the wire rounded up (300.8 ms seen for 0.3 s): see the helper.
    assert 0 < started["deadline_remaining_ms"] <= max_wire_timeout_ms(0.2)
    finished = await _wait_for(
        lambda: [e for e in call_log("call_finished") if e["request_id"] == "hang-1"]
    )
    assert finished[0]["cancelled"] is True and finished[0]["code"] == "DEADLINE_EXCEEDED"


async def test_fault_hang_after_chunks_stalls_a_stream(stub: pb_grpc.AgentServiceStub) -> None:
    call = stub.StreamGenerate(
        pb.StreamGenerateRequest(prompt="x"), metadata=_faults(hang="true", after="2"), timeout=0.3
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for chunk in call:
            received.append(chunk)
    assert len(received) == 2 and err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_fault_rate(stub: pb_grpc.AgentServiceStub) -> None:
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(pb.GenerateRequest(prompt="x"), metadata=_faults(rate="1.0"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the default code
        reply = await stub.Generate(
            pb.GenerateRequest(prompt="x"), metadata=_faults(rate="0", code="INTERNAL")
        )
        assert reply.text


async def test_fault_rate_applies_per_batch_item(stub: pb_grpc.AgentServiceStub) -> None:
    request = pb.BatchGenerateRequest(prompts=["a", "b", "c"])
    reply = await stub.BatchGenerate(request, metadata=_faults(rate="1", code="RESOURCE_EXHAUSTED"))
    assert (reply.succeeded, reply.failed) == (0, 3)
    assert {r.error.code for r in reply.results} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert reply.results[0].error.message == "injected fault: RESOURCE_EXHAUSTED"
    with pytest.raises(grpc.aio.AioRpcError) as err:  # without a rate the call itself fails
        await stub.BatchGenerate(request, metadata=_faults(code="RESOURCE_EXHAUSTED"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_bad_fault_metadata_is_invalid_argument(stub: pb_grpc.AgentServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(pb.GenerateRequest(prompt="x"), metadata=_faults(after="soon"))
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "x-fault-after" in err.value.details()
    )
    assert _bad_request_fields(err.value) == ["x-fault-after"]


async def test_faults_are_ignored_unless_enabled() -> None:
    server = await _serve(enable_faults=False)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            metadata = _faults(code="UNAVAILABLE", hang="1", after="nonsense")
            assert (
                await stub.Generate(pb.GenerateRequest(prompt="x"), metadata=metadata, timeout=5)
            ).text
            chunks = [
                c
                async for c in stub.StreamGenerate(
                    pb.StreamGenerateRequest(prompt="x"), metadata=metadata, timeout=5
                )
            ]
            assert chunks[-1].is_final
    finally:
        await server.stop(None)


# --- call log, cancellation -------------------------------------------------------------


async def test_call_log_lines(stub: pb_grpc.AgentServiceStub, call_log) -> None:
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    metadata = (("x-request-id", "req-7"), ("traceparent", traceparent))
    chunks = [
        c
        async for c in stub.StreamGenerate(
            pb.StreamGenerateRequest(prompt="secret prompt text"), metadata=metadata, timeout=10
        )
    ]
    started = next(e for e in call_log("call_started") if e["request_id"] == "req-7")
    assert (
        started["method"] == f"/{SERVICE}/StreamGenerate" and started["traceparent"] == traceparent
    )
    # grpc-core rounds the wire grpc-timeout up (to a coarser unit as the value grows: 10099 ms was
    # seen for timeout=10), so the remaining time the agent sees may exceed the caller's timeout.
    assert 0 < started["deadline_remaining_ms"] <= max_wire_timeout_ms(10)
    finished = next(e for e in call_log("call_finished") if e["request_id"] == "req-7")
    assert (finished["code"], finished["chunks"], finished["cancelled"]) == (
        "OK",
        len(chunks),
        False,
    )
    await stub.Generate(pb.GenerateRequest(prompt="x"))
    assert (
        call_log("call_started")[-1]["request_id"] == ""
        and call_log("call_started")[-1]["deadline_remaining_ms"] is None
    )
    assert not any("secret" in str(e) for e in call_log())


async def test_caller_cancellation_is_logged_at_once(
    stub: pb_grpc.AgentServiceStub, call_log
) -> None:
    call = stub.StreamGenerate(
        pb.StreamGenerateRequest(prompt="long", options=pb.GenerationOptions(max_tokens=100)),
        # Tokens 5 s apart: a cancel seen only at the next token would take seconds.
        metadata=(("x-request-id", "req-cancel"), *_faults(slow_ms="5000")),
    )
    await call.read()
    cancelled_at = time.time()
    call.cancel()
    finished = await _wait_for(
        lambda: [e for e in call_log("call_finished") if e["request_id"] == "req-cancel"]
    )
    assert (
        finished[0]["cancelled"] is True
        and finished[0]["code"] == "CANCELLED"
        and finished[0]["chunks"] == 1
    )
    # At once: ~2 ms when idle; 1 s leaves room for a loaded CI box (0.1 s did not).
    assert finished[0]["ts"] - cancelled_at < 1.0


async def test_handler_bug_is_internal_without_details(
    server: AgentServer, stub, call_log, monkeypatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.servicer.corpus, "search", broken)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SearchRag(pb.SearchRagRequest(query="grpc"))
    assert err.value.code() == grpc.StatusCode.INTERNAL and "secret" not in err.value.details()
    assert call_log("call_finished")[-1]["code"] == "INTERNAL"


# --- health, reflection -----------------------------------------------------------------


async def test_health_and_its_flip(server: AgentServer, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    await server.set_serving(False)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert (
        await health.Check(health_pb2.HealthCheckRequest())
    ).status == health_pb2.HealthCheckResponse.NOT_SERVING
    await server.set_serving(True)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    replies = [r async for r in reflection.ServerReflectionInfo(ask())]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_stop_drains_in_flight_streams(
    server: AgentServer, stub: pb_grpc.AgentServiceStub
) -> None:
    call = stub.StreamGenerate(
        pb.StreamGenerateRequest(prompt="x", options=pb.GenerationOptions(max_tokens=5)),
        metadata=_faults(slow_ms="20"),
    )
    chunks = [await call.read()]
    stopping = asyncio.create_task(server.stop(grace=5))
    chunks += await _read_rest(call)
    await stopping
    assert chunks[-1].is_final and await call.code() == grpc.StatusCode.OK
