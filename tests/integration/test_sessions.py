"""Conversations that belong to their caller and survive the pool (issue 22), with real
processes: three agent replicas sharing one redis-server session store, behind one proxy
with JWT auth on (tokens as tests/integration/test_auth.py mints them).

Which replica served a call is read from the agents' own call logs (by request id); the
agents' x-agent-replica trailer stays between agent and proxy.
"""

from __future__ import annotations

import asyncio
import collections
import json
import pathlib
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.headers import SESSION_OWNER_HEADER
from aiproxy.core.sessions import ANONYMOUS_OWNER
from tests.conftest import agent_args, proxy_args
from tests.integration.test_auth import AUTH_ENV, bearer, error_info, token
from tests.support.grpc_helpers import stub
from tests.support.procs import ServiceProcess, recorded_metadata
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.support.waiting import eventually

USER, ASSISTANT = pb.CHAT_ROLE_USER, pb.CHAT_ROLE_ASSISTANT
QUESTIONS = [
    "What is backpressure?",
    "And load shedding?",
    "How do token buckets refill?",
    "Why jitter retries?",
    "What does a breaker count?",
    "When is a retry safe?",
    "What is a deadline?",
    "Summarize all of that.",
]


class Stack:
    def __init__(
        self,
        agents: list[ServiceProcess],
        proxy: ServiceProcess,
        channel: grpc.aio.Channel,
        records: list[pathlib.Path],
    ) -> None:
        self.agents = agents
        self.proxy = proxy
        self.channel = channel
        self.records = records

    def served_by(self, request_id: str) -> ServiceProcess:
        """The replica whose call log finished this request id."""
        found = [
            a
            for a in self.agents
            if any(e.get("request_id") == request_id for e in a.log_events("call_finished"))
        ]
        assert len(found) == 1, f"{request_id} finished on {len(found)} replicas"
        return found[0]


def _rid() -> str:
    return f"sess-{uuid.uuid4().hex[:12]}"


async def _endpoints_usable(channel: grpc.aio.Channel, addresses: list[str]) -> None:
    from aiproxy.ai.proxy.v1 import admin_service_pb2 as admin_pb
    from aiproxy.ai.proxy.v1 import admin_service_pb2_grpc as admin_grpc

    async def all_usable() -> bool:
        reply = await admin_grpc.ProxyAdminServiceStub(channel).ListEndpoints(
            admin_pb.ListEndpointsRequest(),
            metadata=bearer(token(scope="aiproxy.admin")),
            timeout=5,
        )
        usable = {ep.address for ep in reply.endpoints if ep.usable}
        return set(addresses) <= usable

    await eventually(all_usable, 10, "every replica usable")


@pytest.fixture
async def stack(
    spawn: Any,
    redis_server: RedisServer,  # noqa: F811
    tmp_path: pathlib.Path,
) -> AsyncIterator[Stack]:
    records = [tmp_path / f"agent{i}.jsonl" for i in range(3)]
    agents = [
        spawn(
            *agent_args(
                "--sessions",
                "redis",
                "--redis-url",
                redis_server.url,
                "--replica-name",
                f"replica-{i}",
                "--record-metadata",
                str(records[i]),
            ),
            name=f"agent{i}",
        )
        for i in range(3)
    ]
    proxy = spawn(*proxy_args(*(a.address for a in agents)), env=AUTH_ENV, name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        await _endpoints_usable(channel, [a.address for a in agents])
        yield Stack(agents, proxy, channel, records)


def _who(sub: str) -> tuple[tuple[str, str], ...]:
    return bearer(token(sub=sub))


async def _turn(
    s: Stack, sub: str, session_id: str, text: str, *, streaming: bool = False
) -> tuple[str, int, str]:
    """One turn through the proxy: (answer, prompt tokens, request id)."""
    rid = _rid()
    metadata = (*_who(sub), ("x-request-id", rid))
    if streaming:
        chunks = [
            c
            async for c in stub(s.channel).StreamChat(
                pb.StreamChatRequest(session_id=session_id, user_message=text),
                metadata=metadata,
                timeout=20,
            )
        ]
        assert chunks[-1].is_final and not chunks[-1].HasField("error"), chunks[-1]
        return "".join(c.delta for c in chunks), chunks[-1].usage.prompt_tokens, rid
    reply = await stub(s.channel).Chat(
        pb.ChatRequest(session_id=session_id, user_message=text), metadata=metadata, timeout=20
    )
    assert reply.session_id == session_id
    return reply.message.content, reply.usage.prompt_tokens, rid


async def _messages(s: Stack, sub: str, session_id: str) -> list[tuple[int, str]]:
    reply = await stub(s.channel).GetSession(
        pb.GetSessionRequest(session_id=session_id), metadata=_who(sub), timeout=10
    )
    return [(m.role, m.content) for m in reply.messages]


async def test_eight_turns_keep_their_history_and_survive_the_replica_that_served_them(
    stack: Stack, spawn: Any
) -> None:
    s = stack
    created = await stub(s.channel).CreateSession(
        pb.CreateSessionRequest(), metadata=_who("alice"), timeout=10
    )
    sid = created.session_id
    turns = [await _turn(s, "alice", sid, q, streaming=i % 2 == 1) for i, q in enumerate(QUESTIONS)]
    prompts = [p for _, p, _ in turns]

    # The same eight turns straight to one agent (its own memory) use the same history.
    direct = spawn(*agent_args(), name="direct")
    async with grpc.aio.insecure_channel(direct.address) as channel:
        expected = []
        for q in QUESTIONS:
            reply = await stub(channel).Chat(
                pb.ChatRequest(session_id="d", user_message=q), timeout=10
            )
            expected.append(reply.usage.prompt_tokens)
    assert prompts == expected, (prompts, expected)
    assert prompts == sorted(prompts) and len(set(prompts)) == 8  # growing every turn
    served = collections.Counter(s.served_by(rid).name for _, _, rid in turns)
    history = await _messages(s, "alice", sid)
    assert history == [
        m
        for (answer, _, _), q in zip(turns, QUESTIONS, strict=True)
        for m in ((USER, q), (ASSISTANT, answer))
    ]

    # SIGKILL the replica that served the last turn: the next turn still has it all.
    victim = s.served_by(turns[-1][2])
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    answer, prompt, rid = await _turn(s, "alice", sid, "Anything else?")
    assert prompt > prompts[-1]
    assert s.served_by(rid) is not victim
    assert (await _messages(s, "alice", sid))[-2:] == [
        (USER, "Anything else?"),
        (ASSISTANT, answer),
    ]
    assert len(await _messages(s, "alice", sid)) == 18
    # (Without affinity routing the turns spread over the replicas; with it, one serves all.)
    assert sum(served.values()) == 8


async def test_another_subject_naming_the_id_gets_its_own_conversation(stack: Stack) -> None:
    s = stack
    sid = "support-42"  # chosen by the caller, guessable
    alice = [await _turn(s, "alice", sid, q) for q in QUESTIONS[:3]]
    _, mallory_prompt, _ = await _turn(s, "mallory", sid, QUESTIONS[0])
    assert mallory_prompt == alice[0][1] < alice[2][1]  # fresh: none of alice's history
    assert [m for m, _ in await _messages(s, "mallory", sid)] == [USER, ASSISTANT]
    assert len(await _messages(s, "alice", sid)) == 6  # alice's is untouched

    # Alice's private session: NOT_FOUND to mallory, for reading and deleting alike.
    private = (
        await stub(s.channel).CreateSession(
            pb.CreateSessionRequest(), metadata=_who("alice"), timeout=10
        )
    ).session_id
    await _turn(s, "alice", private, "my secret plan")
    for call in (
        stub(s.channel).GetSession(
            pb.GetSessionRequest(session_id=private), metadata=_who("mallory"), timeout=10
        ),
        stub(s.channel).DeleteSession(
            pb.DeleteSessionRequest(session_id=private), metadata=_who("mallory"), timeout=10
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(err.value).reason == "SESSION_NOT_FOUND"
        assert "secret" not in (err.value.details() or "")
    assert (await _messages(s, "alice", private))[0] == (USER, "my secret plan")

    # Mallory sending alice's owner header herself changes nothing: the proxy drops it.
    alice_owner = next(
        c["metadata"][SESSION_OWNER_HEADER][0]
        for record in s.records
        for c in recorded_metadata(record)
        if c["method"].endswith("/GetSession")
    )
    forged = (*_who("mallory"), (SESSION_OWNER_HEADER, alice_owner))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(s.channel).GetSession(
            pb.GetSessionRequest(session_id=private), metadata=forged, timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # What the agents saw: one owner per session call, ours, never the caller's; none
    # on methods that reach no conversation.
    calls = [c for record in s.records for c in recorded_metadata(record)]
    owners = collections.Counter(
        c["metadata"][SESSION_OWNER_HEADER][0]
        for c in calls
        if SESSION_OWNER_HEADER in c["metadata"]
    )
    assert len(owners) == 2 and ANONYMOUS_OWNER not in owners  # alice and mallory
    assert all(len(c["metadata"].get(SESSION_OWNER_HEADER, [])) == 1 for c in calls)
    await stub(s.channel).Generate(pb.GenerateRequest(prompt="hi"), metadata=_who("alice"))
    last = [c for record in s.records for c in recorded_metadata(record)]
    assert all(
        SESSION_OWNER_HEADER not in c["metadata"] for c in last if c["method"].endswith("/Generate")
    )


async def test_delete_then_a_new_turn_starts_fresh(stack: Stack) -> None:
    s = stack
    sid = (
        await stub(s.channel).CreateSession(
            pb.CreateSessionRequest(), metadata=_who("alice"), timeout=10
        )
    ).session_id
    first = [await _turn(s, "alice", sid, q) for q in QUESTIONS[:3]]
    await stub(s.channel).DeleteSession(
        pb.DeleteSessionRequest(session_id=sid), metadata=_who("alice"), timeout=10
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _messages(s, "alice", sid)
    assert error_info(err.value).reason == "SESSION_NOT_FOUND"
    _, prompt, _ = await _turn(s, "alice", sid, QUESTIONS[0])
    assert prompt == first[0][1]
    assert len(await _messages(s, "alice", sid)) == 2


async def test_concurrent_turns_on_two_replicas_lose_nothing(stack: Stack) -> None:
    s = stack
    owner = ((SESSION_OWNER_HEADER, "owner-of-the-concurrency-test"),)
    a, b = s.agents[0], s.agents[1]
    async with (
        grpc.aio.insecure_channel(a.address) as ch_a,
        grpc.aio.insecure_channel(b.address) as ch_b,
    ):

        async def turn(n: int) -> None:
            channel = ch_a if n % 2 else ch_b
            await stub(channel).Chat(
                pb.ChatRequest(session_id="both", user_message=f"question {n}"),
                metadata=owner,
                timeout=20,
            )

        await asyncio.gather(*(turn(n) for n in range(20)))
        reply = await stub(ch_a).GetSession(
            pb.GetSessionRequest(session_id="both"), metadata=owner, timeout=10
        )
    messages = [(m.role, m.content) for m in reply.messages]
    assert len(messages) == 40
    assert sorted(c for r, c in messages if r == USER) == sorted(f"question {n}" for n in range(20))
    assert [r for r, _ in messages] == [USER, ASSISTANT] * 20  # each pair adjacent

    # Through the proxy too, as one caller: nothing lost.
    sid = "concurrent-through-the-proxy"
    await asyncio.gather(*(_turn(s, "alice", sid, f"q{n}", streaming=n % 2 == 0) for n in range(8)))
    assert len(await _messages(s, "alice", sid)) == 16


def _retry_delay_s(err: grpc.aio.AioRpcError) -> float:
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return float(retry.retry_delay.ToNanoseconds() / 1e9)
    raise AssertionError("no RetryInfo")


async def test_redis_gone_mid_conversation_is_the_shaped_error_and_recovers_by_itself(
    stack: Stack,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    s = stack
    sid = "through-an-outage"
    before = [await _turn(s, "alice", sid, q) for q in QUESTIONS[:2]]

    # Hung (SIGSTOP): each call waits the agent's store bound (1 s), then fails.
    redis_server.pause()
    try:
        for streaming in (False, True):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _turn(s, "alice", sid, QUESTIONS[2], streaming=streaming)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(err.value).reason == "SESSION_STORE_UNAVAILABLE"
            assert _retry_delay_s(err.value) == 1.0
            trailers = dict(err.value.trailing_metadata() or ())
            assert trailers.get("x-aiproxy-attempts") == "1"  # not retried on another replica
    finally:
        redis_server.resume()
    # Back without a restart of anything: the conversation is all there.
    _, prompt, _ = await _turn(s, "alice", sid, QUESTIONS[2])
    assert prompt > before[1][1]
    assert len(await _messages(s, "alice", sid)) == 6

    # Gone (stopped): refused at once, on every session call, many times over; calls that
    # need no session go on (no breaker opened by it).
    redis_server.stop()
    failures = 0
    for n in range(8):
        for call in (
            _turn(s, f"user{n}", sid, "hello?"),
            _messages(s, f"user{n}", sid),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(err.value).reason == "SESSION_STORE_UNAVAILABLE"
            failures += 1
    reply = await stub(s.channel).Generate(
        pb.GenerateRequest(prompt="still here?"), metadata=_who("alice"), timeout=10
    )
    assert reply.text and failures == 16
    redis_server.start()  # same port, empty (this test's Redis keeps nothing on disk)
    _, prompt, _ = await _turn(s, "alice", sid, QUESTIONS[0])
    assert prompt == before[0][1]  # Redis lost its data: documented; the agents recovered
    assert len(await _messages(s, "alice", sid)) == 2


def _json(body: bytes) -> Any:
    return json.loads(body)


async def test_the_three_http_routes_through_envoy(spawn: Any, tmp_path: pathlib.Path) -> None:
    """POST /api/v1/ai/sessions, GET and DELETE /api/v1/ai/sessions/{id}, with the
    chat turns between them, through `aiproxy envoy` (auth off: anonymous callers)."""
    from tests.support.edge import request, sse_events, wait_until

    agent = spawn(*agent_args(), name="agent")
    proxy = spawn(*proxy_args(agent.address), name="proxy")
    edge = spawn(
        "envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address, "--concurrency", "1",
        "--health-interval-s", "0.5", name="envoy",
    )  # fmt: skip
    address = edge.address

    def ready() -> bool:
        return request(address, "POST", "/api/v1/ai/sessions", {}).status == 200

    wait_until(ready, 20, "envoy routing to the proxy")
    created = request(address, "POST", "/api/v1/ai/sessions", {})
    assert created.status == 200, created.body
    sid = created.json()["sessionId"]
    assert sid.startswith("sess_")

    reply = request(address, "POST", "/api/v1/ai/chat", {"sessionId": sid, "userMessage": "hi"})
    assert reply.status == 200, reply.body
    streamed = request(
        address,
        "GET",
        f"/api/v1/ai/chat/stream?session_id={sid}&user_message=and%20then",
    )
    events = sse_events(streamed.body)
    assert events[-1]["isFinal"]

    got = request(address, "GET", f"/api/v1/ai/sessions/{sid}")
    assert got.status == 200, got.body
    body = got.json()
    assert body["sessionId"] == sid
    assert [m["role"] for m in body["messages"]] == [
        "CHAT_ROLE_USER",
        "CHAT_ROLE_ASSISTANT",
        "CHAT_ROLE_USER",
        "CHAT_ROLE_ASSISTANT",
    ]
    assert body["messages"][0]["content"] == "hi"
    assert body["messages"][3]["content"] == "".join(e.get("delta", "") for e in events)

    # Another method on a session's path: 405 with what it allows, from the HTTP rules.
    wrong = request(address, "PUT", f"/api/v1/ai/sessions/{sid}", {})
    assert wrong.status == 405 and wrong.headers["allow"] == "DELETE, GET, OPTIONS"
    assert request(address, "GET", "/api/v1/ai/sessions").headers.get("allow") == "POST, OPTIONS"

    deleted = request(address, "DELETE", f"/api/v1/ai/sessions/{sid}")
    assert deleted.status == 200 and deleted.json() == {}, deleted.body
    for method in ("GET", "DELETE"):
        gone = request(address, method, f"/api/v1/ai/sessions/{sid}")
        assert gone.status == 404, gone.body
        status = gone.json()
        assert status["code"] == 5
        assert status["details"][0]["reason"] == "SESSION_NOT_FOUND"


async def test_an_anonymous_caller_making_sessions_pushes_out_only_its_own(spawn: Any) -> None:
    """Auth off: every caller is the owner "anonymous", but the agent's bound on sessions
    per owner (3 here) counts each caller's address (the one the proxy believes: from
    loopback, the edge header). A caller creating sessions in a loop, even one sending its
    own x-aiproxy-session-quota (dropped by the proxy), pushes out only its own."""
    agent = spawn(*agent_args(), env={"AIPROXY_AGENT_MAX_SESSIONS_PER_OWNER": "3"}, name="agent")
    proxy = spawn(*proxy_args(agent.address), name="proxy")

    def at(address: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (("x-envoy-external-address", address), *extra)

    async with grpc.aio.insecure_channel(proxy.address) as channel:
        s = stub(channel)
        alice = at("198.51.100.7")
        created = await s.CreateSession(pb.CreateSessionRequest(), metadata=alice, timeout=10)
        mine = created.session_id
        await s.Chat(pb.ChatRequest(session_id=mine, user_message="hi"), metadata=alice, timeout=10)
        # Mallory, at another address, makes sessions in a loop (naming alice's quota, in
        # vain: the proxy sends its own).
        mallory = at("203.0.113.9", ("x-aiproxy-session-quota", "anonymous"))
        theirs = [
            (
                await s.CreateSession(pb.CreateSessionRequest(), metadata=mallory, timeout=10)
            ).session_id
            for _ in range(8)
        ]
        got = await s.GetSession(pb.GetSessionRequest(session_id=mine), metadata=alice, timeout=10)
        assert got.messages[0].content == "hi"
        alive = []
        for sid in theirs:
            try:
                await s.GetSession(
                    pb.GetSessionRequest(session_id=sid), metadata=mallory, timeout=10
                )
                alive.append(sid)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
        assert alive == theirs[-3:]  # its own oldest went, nobody else's
        # A session is still reachable by its id from any address (the id is the capability).
        other = at("192.0.2.1")
        got = await s.GetSession(pb.GetSessionRequest(session_id=mine), metadata=other, timeout=10)
        assert len(got.messages) == 2
