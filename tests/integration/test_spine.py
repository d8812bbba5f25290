"""The spine, end to end with real processes: agent <- proxy <- test client.

Every RPC through the proxy answers what the agent answers directly; streams arrive
complete and in order; cancellation, deadlines, request ids, health and SIGTERM drain
behave as the issue asks.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2  # noqa: F401  (registers BadRequest for Any -> JSON)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.conftest import agent_args, proxy_args
from tests.support.grpc_helpers import (
    NOT_SERVING,
    SERVING,
    health_status,
    max_wire_timeout_ms,
    stub,
    wait_health,
)
from tests.support.procs import recorded_metadata
from tests.support.waiting import eventually

GENERATE = pb.GenerateRequest(
    prompt="Explain circuit breakers in one paragraph", options=pb.GenerationOptions(max_tokens=20)
)
CHAT_MESSAGES = [
    pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="You are terse."),
    pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="What is backpressure?"),
]
CONTEXT = struct_pb2.Struct()
CONTEXT.update({"audience": "engineers", "limit": 3})

# (method, request) for every unary RPC of the service.
UNARY_CALLS = [
    ("Generate", GENERATE),
    ("Chat", pb.ChatRequest(session_id="s-unary", messages=CHAT_MESSAGES)),
    ("SearchRag", pb.SearchRagRequest(query="circuit breaker half-open", top_k=3)),
    (
        "ExecuteAgent",
        pb.ExecuteAgentRequest(
            agent_type=pb.AGENT_TYPE_ANALYSIS,
            task="Compare 12*7 with 90",
            tools=["calculator", "search"],
            context=CONTEXT,
        ),
    ),
    (
        "BatchGenerate",
        pb.BatchGenerateRequest(
            prompts=["one", "", "three"], options=pb.GenerationOptions(max_tokens=8)
        ),
    ),
]
STREAM_CALLS = [
    ("StreamGenerate", pb.StreamGenerateRequest(prompt="Stream a haiku about queues")),
    ("StreamChat", pb.StreamChatRequest(session_id="s-stream", messages=CHAT_MESSAGES)),
    (
        "StreamRagGenerate",
        pb.StreamRagGenerateRequest(query="how does envoy transcode grpc", top_k=2),
    ),
    (
        "StreamExecuteAgent",
        pb.StreamExecuteAgentRequest(
            agent_type=pb.AGENT_TYPE_ASSISTANT,
            task="Count words in hello big world",
            tools=["word_count"],
        ),
    ),
]
# The session API: state, not a pure answer (test_the_session_api_through_proxy_is_the_agents).
SESSION_CALLS = ["CreateSession", "GetSession", "DeleteSession"]
# The proxy must re-export every RPC of the service; this list must follow the proto.
assert {m for m, _ in UNARY_CALLS + STREAM_CALLS} | set(SESSION_CALLS) == set(
    pb.DESCRIPTOR.services_by_name["AgentService"].methods_by_name
)


@pytest.fixture
def unbuffered_proxy(spawn, agent):
    """A proxy that never coalesces, so its chunks can be compared one to one."""
    return spawn(
        *proxy_args(agent.address), env={"AIPROXY_STREAM__COALESCE": "false"}, name="proxy"
    )


@pytest.mark.parametrize(("method", "request_msg"), UNARY_CALLS, ids=[m for m, _ in UNARY_CALLS])
async def test_unary_through_proxy_equals_direct(
    method, request_msg, agent_channel, proxy_channel
) -> None:
    direct = await getattr(stub(agent_channel), method)(request_msg, timeout=10)
    proxied = await getattr(stub(proxy_channel), method)(request_msg, timeout=10)
    # Field by field: the dict form names the first field that differs.
    assert json_format.MessageToDict(proxied) == json_format.MessageToDict(direct)
    assert proxied == direct


async def test_the_session_api_through_proxy_is_the_agents(agent_channel, proxy_channel) -> None:
    """Auth off: the proxy names the owner "anonymous", as the agent calls a direct caller,
    so a session made through the proxy reads the same both ways, and is gone both ways."""
    sid = (
        await stub(proxy_channel).CreateSession(pb.CreateSessionRequest(), timeout=10)
    ).session_id
    await stub(proxy_channel).Chat(
        pb.ChatRequest(session_id=sid, messages=CHAT_MESSAGES), timeout=10
    )
    read = pb.GetSessionRequest(session_id=sid)
    proxied = await stub(proxy_channel).GetSession(read, timeout=10)
    assert proxied == await stub(agent_channel).GetSession(read, timeout=10)
    assert len(proxied.messages) == 3  # the two sent, and the answer
    await stub(proxy_channel).DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10)
    for channel in (agent_channel, proxy_channel):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub(channel).GetSession(read, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("method", "request_msg"), STREAM_CALLS, ids=[m for m, _ in STREAM_CALLS])
async def test_stream_through_proxy_equals_direct(
    method, request_msg, agent, unbuffered_proxy
) -> None:
    async with (
        grpc.aio.insecure_channel(agent.address) as a,
        grpc.aio.insecure_channel(unbuffered_proxy.address) as p,
    ):
        direct = [c async for c in getattr(stub(a), method)(request_msg, timeout=10)]
        proxied = [c async for c in getattr(stub(p), method)(request_msg, timeout=10)]
    assert len(direct) > 3
    assert [json_format.MessageToDict(c) for c in proxied] == [
        json_format.MessageToDict(c) for c in direct
    ]
    # Complete and in order.
    assert [c.seq for c in proxied] == list(range(len(proxied)))
    assert [c.is_final for c in proxied] == [False] * (len(proxied) - 1) + [True]
    assert proxied[-1].usage.completion_tokens > 0


async def test_coalescing_proxy_keeps_text_and_order(agent_channel, proxy_channel) -> None:
    request = pb.StreamGenerateRequest(
        prompt="A long answer please", options=pb.GenerationOptions(max_tokens=200)
    )
    direct = [c async for c in stub(agent_channel).StreamGenerate(request, timeout=10)]
    proxied = []
    async for chunk in stub(proxy_channel).StreamGenerate(request, timeout=10):
        proxied.append(chunk)
        await asyncio.sleep(0.002)  # a slow reader lets chunks queue up in the proxy
    assert "".join(c.delta for c in proxied) == "".join(c.delta for c in direct)
    assert [c.seq for c in proxied] == list(range(len(proxied)))
    assert proxied[-1].is_final and proxied[-1].usage == direct[-1].usage


async def test_request_id_forwarded_and_echoed(agent, proxy_channel) -> None:
    call = stub(proxy_channel).Generate(
        GENERATE, metadata=(("x-request-id", "req-abc-123"),), timeout=10
    )
    await call
    # A native unary call: the reply metadata comes with the status, in the trailers, and
    # no custom initial metadata (one gRPC batch less per call).
    assert dict(await call.trailing_metadata())["x-request-id"] == "req-abc-123"
    assert "x-request-id" not in dict(await call.initial_metadata())
    # Asked for first (what the edge asks for its HTTP, gRPC-Web and Connect callers):
    # as initial metadata, and still in the trailers.
    call = stub(proxy_channel).Generate(
        GENERATE,
        metadata=(("x-request-id", "req-abc-124"), ("x-aiproxy-reply-headers", "initial")),
        timeout=10,
    )
    await call
    assert dict(await call.initial_metadata())["x-request-id"] == "req-abc-124"
    assert dict(await call.trailing_metadata())["x-request-id"] == "req-abc-124"
    agent.wait_for_log(
        lambda e: e.get("event") == "call_started" and e.get("request_id") == "req-abc-123"
    )

    # Absent: the proxy makes one up, sends it upstream, and tells the caller.
    call = stub(proxy_channel).StreamGenerate(pb.StreamGenerateRequest(prompt="x"), timeout=10)
    async for _ in call:
        pass
    generated = dict(await call.initial_metadata())["x-request-id"]
    assert len(generated) >= 16
    agent.wait_for_log(
        lambda e: e.get("event") == "call_started" and e.get("request_id") == generated
    )


async def test_credentials_are_not_forwarded_upstream(spawn, tmp_path) -> None:
    """upstream.drop_metadata: the agent records what it receives (--record-metadata, a
    test-only flag) and never sees authorization, cookie or x-api-key; other metadata
    (request id, trace context, fault headers) still passes."""
    record = tmp_path / "agent-metadata.jsonl"
    recording_agent = spawn(*agent_args("--record-metadata", str(record)), name="agent")
    proxy = spawn(*proxy_args(recording_agent.address), name="proxy")
    tag = f"{random.getrandbits(32):x}"
    secrets = {
        "authorization": "Bearer tok-5ecret-b34rer",
        "cookie": "session=c00kie-5ecret",
        "x-api-key": "ak-5ecret-k3y",
        # Issue 20 §4: proxy-authorization reached the agents. The class, not the name:
        "proxy-authorization": "Basic cHJveHk6NWVjcmV0",
        "x-auth-token": f"auth-5ecret-{tag}",
        "x-csrf-token": f"csrf-5ecret-{tag}",
        "x-goog-api-key": f"goog-5ecret-{tag}",
        f"x-{tag}-secret": f"gen-5ecret-{tag}",
        f"x-{tag}_session": f"sess-5ecret-{tag}",
    }
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        for i, (name, value) in enumerate(secrets.items()):
            metadata = (
                ("x-request-id", f"req-cred-{i}"),
                (name, value),
                ("traceparent", traceparent),
                ("x-fault-slow-ms", "0"),
            )
            await stub(channel).Generate(GENERATE, metadata=metadata, timeout=10)
            call = stub(channel).StreamGenerate(
                pb.StreamGenerateRequest(prompt="x"), metadata=metadata, timeout=10
            )
            assert [c async for c in call][-1].is_final
        # All three at once.
        metadata = (("x-request-id", "req-cred-all"), *secrets.items())
        await stub(channel).Generate(GENERATE, metadata=metadata, timeout=10)
    calls = await wait_for_calls(record, 2 * len(secrets) + 1)
    assert {c["method"].rsplit("/", 1)[-1] for c in calls} == {"Generate", "StreamGenerate"}
    for call in calls:
        received = call["metadata"]
        assert not set(secrets) & set(received), f"credentials reached the agent: {received}"
        assert received["x-request-id"][0].startswith("req-cred")  # the recorder sees real metadata
    with_trace = [c for c in calls if c["metadata"]["x-request-id"][0] != "req-cred-all"]
    assert all(c["metadata"]["traceparent"][0].startswith("00-aaaa") for c in with_trace)
    assert all(c["metadata"]["x-fault-slow-ms"] == ["0"] for c in with_trace)
    raw = record.read_text()
    for value in secrets.values():
        assert value not in raw
        assert value not in recording_agent.stderr_text()


async def wait_for_calls(record, count: int, timeout: float = 10.0) -> list[dict]:
    """The agent writes a call's line when the call arrives; wait until `count` are there."""

    def recorded() -> list[dict]:
        calls = recorded_metadata(record)
        assert len(calls) >= count, f"{len(calls)} calls recorded, expected {count}"
        return calls

    return await eventually(recorded, timeout, f"{count} calls recorded")


async def test_caller_cancellation_reaches_upstream_at_once(spawn) -> None:
    # Tokens 5 s apart: a cancel seen only at the next token would take seconds; "at once"
    # is ~2 ms when idle, and the 1 s bound leaves room for a loaded 2-core CI box (a fixed
    # 100 ms bound did not).
    slow_agent = spawn(*agent_args(token_delay_ms=5000), name="agent")
    proxy = spawn(*proxy_args(slow_agent.address), name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        call = stub(channel).StreamGenerate(
            pb.StreamGenerateRequest(prompt="long", options=pb.GenerationOptions(max_tokens=100)),
            metadata=(("x-request-id", "req-cancel"),),
            timeout=30,
        )
        await call.read()
        cancelled_at = time.time()
        call.cancel()
    finished = slow_agent.wait_for_log(
        lambda e: e.get("event") == "call_finished" and e.get("request_id") == "req-cancel",
        timeout=10,
    )
    assert finished["cancelled"] is True
    assert finished["ts"] - cancelled_at < 1.0, (
        f"upstream saw the cancel {finished['ts'] - cancelled_at:.3f}s later"
    )


@pytest.mark.parametrize("method", ["Generate", "StreamGenerate"])
async def test_caller_deadline_propagates_upstream(method, agent, proxy_channel) -> None:
    request = (
        pb.GenerateRequest(prompt="x")
        if method == "Generate"
        else pb.StreamGenerateRequest(prompt="x")
    )
    rid = f"req-deadline-{method}"
    call = getattr(stub(proxy_channel), method)(
        request, metadata=(("x-request-id", rid), ("x-fault-hang", "1")), timeout=0.3
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if method == "Generate":
            await call
        else:
            async for _ in call:
                pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = agent.wait_for_log(
        lambda e: e.get("event") == "call_started" and e.get("request_id") == rid
    )
    # Two hops (caller -> proxy -> agent), each grpc-timeout rounded up on the wire.
    assert (
        0 < started["deadline_remaining_ms"] <= max_wire_timeout_ms(max_wire_timeout_ms(0.3) / 1000)
    )


async def test_proxy_health_follows_upstream(agent, proxy) -> None:
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        await wait_health(channel, SERVING)
        await wait_health(channel, SERVING, service="ai.agent.v1.AgentService")
        agent.send_signal(signal.SIGUSR1)  # agent -> NOT_SERVING
        await wait_health(channel, NOT_SERVING, timeout=5)
        assert await health_status(channel, "ai.agent.v1.AgentService") == NOT_SERVING
        agent.send_signal(signal.SIGUSR2)  # agent -> SERVING
        await wait_health(channel, SERVING, timeout=5)


async def test_sigterm_lets_an_inflight_stream_finish(spawn) -> None:
    agent = spawn(*agent_args(token_delay_ms=20), name="agent")
    proxy = spawn(*proxy_args(agent.address), name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        call = stub(channel).StreamGenerate(
            pb.StreamGenerateRequest(
                prompt="drain me", options=pb.GenerationOptions(max_tokens=40)
            ),
            timeout=30,
        )
        chunks = [await call.read()]
        proxy.send_signal(signal.SIGTERM)
        while (chunk := await call.read()) is not grpc.aio.EOF:
            chunks.append(chunk)
        assert chunks[-1].is_final
        assert await call.code() == grpc.StatusCode.OK
        assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert proxy.wait(timeout=15) == 0
    events = [e["event"] for e in proxy.log_events()]
    assert events.index("proxy_draining") < events.index("proxy_stopped")


async def test_new_calls_after_sigterm_are_refused(spawn) -> None:
    agent = spawn(*agent_args(token_delay_ms=50), name="agent")
    proxy = spawn(*proxy_args(agent.address), name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        call = stub(channel).StreamGenerate(
            pb.StreamGenerateRequest(prompt="keep busy"), timeout=30
        )
        await call.read()
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert (await watch.read()).status == SERVING
        proxy.send_signal(signal.SIGTERM)
        assert (await watch.read()).status == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub(channel).Generate(GENERATE, timeout=5)
        # grpc core answers calls that arrive after shutdown began with CANCELLED (or
        # UNAVAILABLE once the GOAWAY has reached the client): either way, refused.
        assert refused.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        while (chunk := await call.read()) is not grpc.aio.EOF:
            last = chunk
        assert last.is_final
    assert proxy.wait(timeout=15) == 0


# ---- the caller's deadline: the proxy answers just before it (issue 13, item 6) ----------

# A margin large enough that a loaded CI box still answers before the caller's deadline.
DEADLINE_MARGIN_ENV = {"AIPROXY_DEADLINES__END_MARGIN_MIN_S": "0.25"}


async def test_caller_deadline_ends_a_stream_in_band_with_deadline_exceeded(spawn, agent) -> None:
    """A slow stream that outlives the caller's deadline gets the in-band final chunk
    (DEADLINE_EXCEEDED, ErrorInfo) and the shaped status from the proxy -- not a silent
    end cut by grpc -- the upstream call is cancelled, and the call is logged as
    DEADLINE_EXCEEDED, not CANCELLED."""
    from tests.integration.test_protection import read_stream, rich, rich_from_status

    proxy = spawn(*proxy_args(agent.address), env=DEADLINE_MARGIN_ENV, name="proxy")
    rid = "req-deadline-inband"
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        started = time.monotonic()
        chunks, err = await read_stream(
            stub(channel).StreamGenerate(
                pb.StreamGenerateRequest(
                    prompt="slow", options=pb.GenerationOptions(max_tokens=50)
                ),
                metadata=(("x-request-id", rid), ("x-fault-hang", "1"), ("x-fault-after", "1")),
                timeout=1.0,
            )
        )
        elapsed = time.monotonic() - started
    assert err is not None and err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    shaped = rich(err)  # the proxy's own status (grpc's local deadline has no details)
    assert shaped.reason == "DEADLINE_EXCEEDED"
    assert len(chunks) == 2 and not chunks[0].is_final
    last = chunks[-1]
    assert last.is_final and last.finish_reason == pb.FINISH_REASON_ERROR
    assert rich_from_status(last.error).reason == "DEADLINE_EXCEEDED"
    # Ended by the deadline, not later (whose deadline: the details above say the proxy's);
    # slack past the 1 s for a loaded box, which the proxy's 5 % end margin alone is not.
    assert elapsed < 1.5
    finished = agent.wait_for_log(
        lambda e: e.get("event") == "call_finished" and e.get("request_id") == rid
    )
    assert finished["cancelled"] is True
    access = proxy.wait_for_log(lambda e: e.get("event") == "access" and e.get("request_id") == rid)
    assert (access["code"], access["reason"]) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")


async def test_caller_deadline_ends_a_unary_call_with_shaped_deadline_exceeded(
    spawn, agent
) -> None:
    from tests.integration.test_protection import rich

    proxy = spawn(*proxy_args(agent.address), env=DEADLINE_MARGIN_ENV, name="proxy")
    rid = "req-deadline-unary"
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub(channel).Generate(
                GENERATE, metadata=(("x-request-id", rid), ("x-fault-hang", "1")), timeout=1.0
            )
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert rich(err.value).reason == "DEADLINE_EXCEEDED"
    finished = agent.wait_for_log(
        lambda e: e.get("event") == "call_finished" and e.get("request_id") == rid
    )
    assert finished["cancelled"] is True
    access = proxy.wait_for_log(lambda e: e.get("event") == "access" and e.get("request_id") == rid)
    assert (access["code"], access["reason"]) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
