"""Resumable streams and the response cache, end to end with real processes (issue 16).

One agent (slow tokens, so a stream can be dropped in the middle; --record-metadata, so
the upstream calls can be counted), two proxy replicas sharing one redis-server for the
stream buffer and the cache's L2:

- a stream dropped mid-way on replica A is resumed on replica B: the concatenated text
  and the final usage equal an uninterrupted run, and the agent ran the generation once;
- a resume after the grace expired (nobody resumed: the upstream was cancelled, and the
  agent saw the cancellation) is NOT_FOUND with ErrorInfo STREAM_EXPIRED; an unknown id
  NOT_FOUND STREAM_NOT_FOUND;
- an EventSource-style reconnect after the final chunk (last-event-id = the final seq)
  gets OUT_OF_RANGE STREAM_FINISHED and never re-runs the generation;
- x-aiproxy-cancel stops the upstream at once (metric why=cancel_requested);
- 50 identical concurrent requests with cache-control: max-age cause 1 upstream call, the
  other replica then hits the shared L2; no-store / no-cache bypass; another tenant
  (caller) never gets the answer; streams are cached too.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import jwt
import pytest
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.streambuffer import new_stream_id
from tests.conftest import agent_args, proxy_args
from tests.integration.test_protection import read_stream, rich_from_status
from tests.support.grpc_helpers import stub
from tests.support.procs import ServiceProcess, recorded_metadata
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

GRACE_S = 0.5
STREAM = "/ai.agent.v1.AgentService/StreamGenerate"
UNARY = "/ai.agent.v1.AgentService/Generate"


def stream_request(prompt: str, tokens: int = 60) -> pb.StreamGenerateRequest:
    return pb.StreamGenerateRequest(prompt=prompt, options=pb.GenerationOptions(max_tokens=tokens))


@pytest.fixture
def stack(spawn: Callable[..., ServiceProcess], redis_server: RedisServer, tmp_path: pathlib.Path):  # noqa: F811
    record = tmp_path / "agent-calls.jsonl"
    agent = spawn(*agent_args("--record-metadata", str(record), token_delay_ms=100), name="agent")
    env = {
        "AIPROXY_REDIS__URL": redis_server.url,
        "AIPROXY_STREAM__RESUME__BACKEND": "redis",
        "AIPROXY_STREAM__RESUME__GRACE_S": str(GRACE_S),
        "AIPROXY_CACHE__BACKEND": "redis",
        # Generous bounded waits: a CPU-starved 2-core box must not fail Redis calls.
        "AIPROXY_REDIS__TIMEOUT_MS": "250",
    }
    replicas = [
        spawn(
            *proxy_args(agent.address),
            env=env,
            name=f"proxy-{i}",
        )
        for i in range(2)
    ]
    return agent, record, replicas


def agent_calls(record: pathlib.Path, method: str) -> int:
    if not record.exists():
        return 0
    return sum(1 for c in recorded_metadata(record) if c["method"] == method)


def metric(proxy: ServiceProcess, name: str, **labels: str) -> float:
    address = next(e for e in proxy.stdout_lines() if "metrics_address" in e)["metrics_address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def text_of(chunks: list) -> str:
    return "".join(c.delta for c in chunks if not c.heartbeat)


async def full_run(channel: grpc.aio.Channel, request: pb.StreamGenerateRequest) -> list:
    return [c async for c in stub(channel).StreamGenerate(request, timeout=60)]


async def drop_after(
    channel: grpc.aio.Channel, request: pb.StreamGenerateRequest, n: int, metadata: tuple = ()
) -> tuple[str, list]:
    """A resumable call that reads `n` chunks and then drops its connection (cancel)."""
    call = stub(channel).StreamGenerate(
        request, metadata=(("x-aiproxy-resumable", "1"), *metadata), timeout=60
    )
    sid = dict(await call.initial_metadata()).get("x-aiproxy-stream-id")
    assert sid, "a resumable stream gets its id in the initial metadata"
    seen = []
    async for chunk in call:
        seen.append(chunk)
        if len(seen) == n:
            break
    call.cancel()
    return sid, seen


def error_of(exc: grpc.aio.AioRpcError):
    status = rpc_status.from_call(exc)
    assert status is not None, "every error carries a google.rpc.Status"
    return rich_from_status(status)


async def test_dropped_stream_resumes_on_another_replica(stack) -> None:
    agent, record, (a, b) = stack  # noqa: RUF059
    request = stream_request("resume me on another replica")
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        baseline = await full_run(ca, request)
        assert baseline[-1].is_final and len(baseline) > 20
        runs_before = agent_calls(record, STREAM)

        sid, seen = await drop_after(ca, request, 5)
        resumed_call = stub(cb).StreamGenerate(
            request,
            metadata=(("x-aiproxy-resume", sid), ("last-event-id", str(seen[-1].seq))),
            timeout=60,
        )
        assert dict(await resumed_call.initial_metadata())["x-aiproxy-stream-id"] == sid
        rest = [c async for c in resumed_call]

        # No duplicate and no gap: seqs continue, the text and usage are the uninterrupted run's.
        seqs = [c.seq for c in seen + rest]
        assert seqs == list(range(len(seqs)))
        assert text_of(seen + rest) == text_of(baseline)
        assert rest[-1].is_final and rest[-1].usage == baseline[-1].usage
        # The generation ran once for the dropped call; the resume made no upstream call.
        assert agent_calls(record, STREAM) == runs_before + 1

        # An EventSource that nobody closed reconnects with the final seq: it is told the
        # stream is over (an error status ends its retries), and nothing is generated.
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await full_run_with(cb, request, ("x-aiproxy-resume", sid), rest[-1].seq)
            rich = error_of(err.value)
            assert rich.code == grpc.StatusCode.OUT_OF_RANGE
            assert rich.reason == "STREAM_FINISHED"
        assert agent_calls(record, STREAM) == runs_before + 1
    assert metric(b, "ai_proxy_stream_resumes_total", outcome="resumed") == 1
    assert metric(b, "ai_proxy_stream_resumes_total", outcome="finished") == 3


async def full_run_with(
    channel: grpc.aio.Channel, request: pb.StreamGenerateRequest, resume: tuple, after: int
) -> list:
    return [
        c
        async for c in stub(channel).StreamGenerate(
            request, metadata=(resume, ("last-event-id", str(after))), timeout=30
        )
    ]


async def test_resume_after_the_grace_is_not_found_and_the_agent_was_cancelled(stack) -> None:
    agent, record, (a, b) = stack  # noqa: RUF059
    # ~30 tokens at 100 ms: far longer than the grace.
    request = stream_request("nobody comes back", tokens=400)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        sid, seen = await drop_after(ca, request, 3)
        # The upstream runs on for the grace, then is cancelled: the agent sees it.
        await until(
            lambda: metric(a, "ai_proxy_resumable_streams_stopped_total", why="abandoned") == 1,
            GRACE_S + 20,
            "the owner to give up after the grace",
        )
        await until(
            lambda: any(e.get("code") == "CANCELLED" for e in agent.log_events("call_finished")),
            10,
            "the agent to see the cancellation",
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await full_run_with(cb, request, ("x-aiproxy-resume", sid), seen[-1].seq)
        rich = error_of(err.value)
        assert rich.code == grpc.StatusCode.NOT_FOUND and rich.reason == "STREAM_EXPIRED"

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await full_run_with(cb, request, ("x-aiproxy-resume", "A" * 22), 0)
        rich = error_of(err.value)
        assert rich.code == grpc.StatusCode.NOT_FOUND and rich.reason == "STREAM_NOT_FOUND"


async def test_a_resume_within_the_grace_keeps_the_generation_and_cancel_stops_it(stack) -> None:
    agent, record, (a, b) = stack  # noqa: RUF059
    request = stream_request("cancel me on purpose", tokens=400)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        sid, seen = await drop_after(ca, request, 2)
        # A resumer reading on B keeps the owner on A alive past the grace.
        call = stub(cb).StreamGenerate(
            request,
            metadata=(("x-aiproxy-resume", sid), ("last-event-id", str(seen[-1].seq))),
            timeout=60,
        )
        got = []
        started = time.monotonic()
        async for chunk in call:
            got.append(chunk)
            if time.monotonic() - started > GRACE_S * 2:
                break
        assert metric(a, "ai_proxy_resumable_streams_stopped_total") == 0
        assert [c.seq for c in got] == list(range(seen[-1].seq + 1, seen[-1].seq + 1 + len(got)))
        # The caller cancels on purpose (on another replica): the owner stops at once.
        cancel = stub(cb).StreamGenerate(request, metadata=(("x-aiproxy-cancel", sid),), timeout=10)
        assert [c async for c in cancel] == []
        await until(
            lambda: (
                metric(a, "ai_proxy_resumable_streams_stopped_total", why="cancel_requested") == 1
            ),
            10,
            "the owner to stop on the cancel request",
        )
        call.cancel()


async def test_identical_concurrent_requests_make_one_upstream_call(stack) -> None:
    agent, record, (a, b) = stack  # noqa: RUF059
    request = pb.GenerateRequest(prompt="cache me", options=pb.GenerationOptions(max_tokens=20))
    cached = (("cache-control", "max-age=60"), ("x-client-id", "tenant-a"))
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):

        async def one(channel, metadata):
            call = stub(channel).Generate(request, metadata=metadata, timeout=30)
            reply = await call
            # A unary answer's reply metadata: in the trailers, with the status.
            return reply, dict(await call.trailing_metadata()).get("x-aiproxy-cache")

        answers = await asyncio.gather(*(one(ca, cached) for _ in range(50)))
        assert agent_calls(record, UNARY) == 1
        assert len({r.SerializeToString() for r, _ in answers}) == 1
        headers = [h for _, h in answers]
        assert headers.count("miss") == 1 and headers.count("hit") == 49

        # The other replica: L2 (Redis) has it.
        reply, header = await one(cb, cached)
        assert header == "hit" and reply == answers[0][0]
        assert agent_calls(record, UNARY) == 1

        # no-store and no-cache bypass the lookup (each is one more upstream call).
        for directive in ("no-store", "no-cache"):
            _, header = await one(ca, (("cache-control", directive), ("x-client-id", "tenant-a")))
            assert header in (None, "miss")
        assert agent_calls(record, UNARY) == 3

        # Another caller (tenant) never gets tenant-a's answer.
        _, header = await one(ca, (("cache-control", "max-age=60"), ("x-client-id", "tenant-b")))
        assert header == "miss"
        assert agent_calls(record, UNARY) == 4
    assert (
        metric(a, "ai_proxy_cache_requests_total", outcome="shared")
        + metric(a, "ai_proxy_cache_requests_total", outcome="hit")
        == 49
    )


async def test_streams_are_cached_and_replayed_whole(stack) -> None:
    agent, record, (a, b) = stack  # noqa: RUF059
    request = stream_request("cache this stream", tokens=30)
    md = (("cache-control", "max-age=60"), ("x-client-id", "tenant-a"))
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        first_call = stub(ca).StreamGenerate(request, metadata=md, timeout=30)
        first = [c async for c in first_call]
        assert dict(await first_call.initial_metadata())["x-aiproxy-cache"] == "miss"
        again = stub(cb).StreamGenerate(request, metadata=md, timeout=30)
        replay = [c async for c in again]
        assert dict(await again.initial_metadata())["x-aiproxy-cache"] == "hit"
        assert text_of(replay) == text_of(first) and replay[-1].usage == first[-1].usage
        assert [c.seq for c in replay] == list(range(len(replay)))
        assert agent_calls(record, STREAM) == 1


async def test_errors_and_truncated_streams_are_never_cached(stack) -> None:
    agent, record, (a, _) = stack  # noqa: RUF059
    request = stream_request("fail me once", tokens=30)
    md = (("cache-control", "max-age=60"), ("x-client-id", "tenant-a"))
    async with grpc.aio.insecure_channel(a.address) as ca:
        # Fails after 3 chunks: the caller gets the in-band error chunk; nothing is stored.
        failing = stub(ca).StreamGenerate(
            request,
            metadata=(*md, ("x-fault-code", "UNAVAILABLE"), ("x-fault-after", "3")),
            timeout=30,
        )
        chunks, error = await read_stream(failing)
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        assert chunks[-1].is_final and chunks[-1].HasField("error")
        # Dropped mid-way (truncated): not stored either.
        dropped = stub(ca).StreamGenerate(request, metadata=md, timeout=30)
        async for _ in dropped:
            break
        dropped.cancel()
        calls = agent_calls(record, STREAM)
        # So the next identical request is a miss that runs the generation (and is stored).
        ok = stub(ca).StreamGenerate(request, metadata=md, timeout=30)
        whole = [c async for c in ok]
        assert dict(await ok.initial_metadata())["x-aiproxy-cache"] == "miss"
        assert whole[-1].is_final and not whole[-1].HasField("error")
        assert agent_calls(record, STREAM) == calls + 1
        tokens = metric(a, "ai_proxy_tokens_total")
        hit = stub(ca).StreamGenerate(request, metadata=md, timeout=30)
        assert text_of([c async for c in hit]) == text_of(whole)
        assert dict(await hit.initial_metadata())["x-aiproxy-cache"] == "hit"
        assert agent_calls(record, STREAM) == calls + 1
        # A hit consumed no tokens upstream: the token counter does not move.
        assert metric(a, "ai_proxy_tokens_total") == tokens > 0


async def test_dropped_generations_are_bounded_per_caller(
    spawn: Callable[..., ServiceProcess],
) -> None:
    """Dropping streams is no way around the open-stream limit: with
    max_detached_per_caller 1 and a long grace, a caller's second dropped stream stops the
    first generation at once (the agent sees the cancellation); the second runs on."""
    agent = spawn(*agent_args(token_delay_ms=100), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env={
            "AIPROXY_STREAM__RESUME__GRACE_S": "60",
            "AIPROXY_STREAM__RESUME__MAX_DETACHED_PER_CALLER": "1",
        },
        name="proxy",
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        await drop_after(channel, stream_request("first dropped"), 2)
        assert metric(proxy, "ai_proxy_resumable_streams_stopped_total") == 0
        await drop_after(channel, stream_request("second dropped"), 2)
        await until(
            lambda: metric(proxy, "ai_proxy_resumable_streams_stopped_total", why="evicted") == 1,
            10,
            "the oldest dropped generation to be stopped",
        )
        await until(
            lambda: any(e.get("code") == "CANCELLED" for e in agent.log_events("call_finished")),
            10,
            "the agent to see the cancellation",
        )
        assert metric(proxy, "ai_proxy_resumable_streams_stopped_total") == 1


async def test_a_store_that_hangs_costs_resumability_and_hits_never_the_call(
    stack,
    redis_server: RedisServer,  # noqa: F811 - the fixture, the same instance as the stack's
) -> None:
    """Redis stops answering (SIGSTOP): a resumable request still gets its whole answer,
    without a stream id (nothing is promised that cannot be kept), and a cacheable one is
    answered from the upstream (L2 fails open); both within bounded time."""
    _agent, _record, (a, _) = stack
    request = stream_request("redis is away")
    async with grpc.aio.insecure_channel(a.address) as ca:
        baseline = await full_run(ca, request)
        redis_server.pause()
        try:
            started = time.monotonic()
            call = stub(ca).StreamGenerate(
                request, metadata=(("x-aiproxy-resumable", "1"),), timeout=30
            )
            chunks = [c async for c in call]
            assert "x-aiproxy-stream-id" not in dict(await call.initial_metadata())
            assert text_of(chunks) == text_of(baseline) and chunks[-1].is_final
            reply = stub(ca).Generate(
                pb.GenerateRequest(prompt="cache while away"),
                metadata=(("cache-control", "max-age=60"),),
                timeout=30,
            )
            assert (await reply).text
            assert time.monotonic() - started < 20
        finally:
            redis_server.resume()


# Every request header only the proxy interprets (core/headers.py), as a caller sends them,
# plus one named x-aiproxy-* that no module knows yet (the prefix rule) and the caller's own
# header that must still reach the agent (so the record proves it saw the call's metadata).
PROXY_ONLY_SENT = (
    ("x-aiproxy-resumable", "1"),
    ("x-aiproxy-resume", "sh0rt"),  # malformed: a new call, still never forwarded
    ("last-event-id", "2"),
    ("cache-control", "no-store"),
    ("x-aiproxy-coalesce-ms", "0"),
    ("x-aiproxy-some-future-knob", "1"),
)
PROXY_ONLY_NAMES = {k for k, _ in PROXY_ONLY_SENT} | {"x-aiproxy-cancel", "x-aiproxy-edge"}


def agent_saw(record: pathlib.Path, request_id: str) -> dict[str, list]:
    calls = [
        c for c in recorded_metadata(record) if request_id in c["metadata"].get("x-request-id", [])
    ]
    assert len(calls) == 1, f"{len(calls)} agent calls for {request_id}"
    return calls[0]["metadata"]


async def test_proxy_only_metadata_never_reaches_the_agent(stack) -> None:
    """Resume, cancel, cache and coalescing headers steer this proxy; the agent gets none of
    them (an agent behind another aiproxy would act on them twice; a stream id is a
    capability). Unary and stream calls, and a real cancel of a resumable stream."""
    _agent, record, (a, _) = stack
    async with grpc.aio.insecure_channel(a.address) as ca:
        for i, name in enumerate(("unary", "stream")):
            rid = f"proxy-only-{name}-{time.monotonic_ns()}"
            md = (*PROXY_ONLY_SENT, ("x-request-id", rid), ("x-caller-note", "keep"))
            if name == "unary":
                await stub(ca).Generate(pb.GenerateRequest(prompt=f"p{i}"), metadata=md, timeout=30)
            else:
                call = stub(ca).StreamGenerate(stream_request(f"p{i}", 4), metadata=md, timeout=30)
                chunks = [c async for c in call]
                assert chunks[-1].is_final
                # It was resumable (the header was acted on), only not forwarded.
                assert "x-aiproxy-stream-id" in dict(await call.initial_metadata())
            await until(lambda: record.exists(), 10, "the agent's record")
            saw = await asyncio.to_thread(wait_agent_saw, record, rid)
            assert saw.get("x-caller-note") == ["keep"]
            leaked = PROXY_ONLY_NAMES & set(saw) | {k for k in saw if k.startswith("x-aiproxy-")}
            assert not leaked, f"{name}: forwarded upstream: {sorted(leaked)}"

        # A cancel on purpose makes no upstream call of its own; the stream it stops was
        # started without the proxy's headers reaching the agent either.
        sid, _seen = await drop_after(ca, stream_request("cancel me", 400), 2)
        cancel = stub(ca).StreamGenerate(
            stream_request("cancel me", 400), metadata=(("x-aiproxy-cancel", sid),), timeout=30
        )
        assert [c async for c in cancel] == []
    for call in recorded_metadata(record):
        assert not PROXY_ONLY_NAMES & set(call["metadata"]), call["metadata"].keys()


def wait_agent_saw(record: pathlib.Path, request_id: str, timeout: float = 10) -> dict[str, list]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return agent_saw(record, request_id)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


JWT_SECRET = "resume-and-cache-secret-0123456789abcdef"


def bearer(sub: str, tenant: str) -> tuple[tuple[str, str], ...]:
    now = int(time.time())
    claims = {"sub": sub, "tenant": tenant, "iat": now, "exp": now + 600}
    return (("authorization", f"Bearer {jwt.encode(claims, JWT_SECRET, algorithm='HS256')}"),)


async def expect_not_found(call: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [c async for c in call]
    rich = error_of(err.value)
    assert rich.code == grpc.StatusCode.NOT_FOUND and rich.reason == "STREAM_NOT_FOUND"


async def test_jwt_tenants_scope_resumes_cancels_and_cached_answers(
    spawn: Callable[..., ServiceProcess], tmp_path: pathlib.Path
) -> None:
    """With limits.tenant_claim, two subjects of one tenant share its streams and its cached
    answers; a subject of another tenant gets NOT_FOUND for the stream (resume or cancel:
    the same answer as an unknown id) and never the cached answer (memory backends)."""
    record = tmp_path / "agent-calls.jsonl"
    agent = spawn(*agent_args("--record-metadata", str(record), token_delay_ms=50), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env={
            "AIPROXY_AUTH__JWT_SECRET": JWT_SECRET,
            "AIPROXY_LIMITS__TENANT_CLAIM": "tenant",
            "AIPROXY_STREAM__RESUME__GRACE_S": "30",
        },
        name="proxy",
    )
    alice, bob, carol = bearer("alice", "acme"), bearer("bob", "acme"), bearer("carol", "globex")
    request = stream_request("a tenant's own stream", tokens=60)
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        sid, seen = await drop_after(channel, request, 3, alice)
        after = (("x-aiproxy-resume", sid), ("last-event-id", str(seen[-1].seq)))
        api = stub(channel)
        # Another tenant, holding the id: neither resume nor cancel (nor a hint it exists).
        await expect_not_found(api.StreamGenerate(request, metadata=(*after, *carol), timeout=30))
        await expect_not_found(
            api.StreamGenerate(request, metadata=(("x-aiproxy-cancel", sid), *carol), timeout=30)
        )
        assert metric(proxy, "ai_proxy_resumable_streams_stopped_total") == 0
        # The same tenant's other subject resumes it to the end.
        rest = [c async for c in api.StreamGenerate(request, metadata=(*after, *bob), timeout=60)]
        assert [c.seq for c in seen + rest] == list(range(len(seen) + len(rest)))
        assert rest[-1].is_final

        # The cache: keyed by tenant. alice fills it, bob (same tenant) hits, carol misses.
        unary = pb.GenerateRequest(prompt="cache me per tenant")
        opt_in = (("cache-control", "max-age=60"),)
        calls = agent_calls(record, UNARY)
        outcomes = []
        for who in (alice, bob, carol, carol):
            reply = api.Generate(unary, metadata=(*opt_in, *who), timeout=30)
            answer = await reply
            outcomes.append(dict(await reply.trailing_metadata()).get("x-aiproxy-cache"))
            assert answer.text
        assert outcomes == ["miss", "hit", "miss", "hit"]
        assert agent_calls(record, UNARY) == calls + 2  # one per tenant


async def test_anonymous_callers_share_a_scope_the_id_is_the_capability(spawn) -> None:
    """Anonymous callers (no JWT, no API key) share one resume scope, by design: a caller
    that comes back as another caller (another address, another x-client-id) still
    resumes with the id it was given; a guessed id is NOT_FOUND (server/request/resume.py's
    stream_scope says why)."""
    agent = spawn(*agent_args(token_delay_ms=50), name="agent")
    proxy = spawn(*proxy_args(agent.address), name="proxy")
    request = stream_request("anonymous but mine", tokens=40)
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        sid, seen = await drop_after(channel, request, 2, (("x-client-id", "phone-on-wifi"),))
        api = stub(channel)
        comeback = (
            ("x-aiproxy-resume", sid),
            ("last-event-id", str(seen[-1].seq)),
            ("x-client-id", "phone-on-4g"),
        )
        rest = [c async for c in api.StreamGenerate(request, metadata=comeback, timeout=60)]
        assert rest[-1].is_final
        assert [c.seq for c in seen + rest] == list(range(len(seen) + len(rest)))
        guessed = (("x-aiproxy-resume", new_stream_id()), ("last-event-id", "0"))
        await expect_not_found(api.StreamGenerate(request, metadata=guessed, timeout=30))
        cancel = (("x-aiproxy-cancel", new_stream_id()),)
        await expect_not_found(api.StreamGenerate(request, metadata=cancel, timeout=30))


async def test_redis_killed_mid_stream_the_caller_finishes_and_resumes_fail_fast(
    stack,
    redis_server: RedisServer,  # noqa: F811 - the fixture, the same instance as the stack's
) -> None:
    """Redis is SIGKILLed in the middle of resumable streams (redis backend).

    What we decided: the stream store holds copies, never the answer's path. So the caller
    still attached gets its whole answer, to the final chunk (it is only no longer
    resumable); a resumer reading from the store (on another replica) and a new resume
    attempt both end with UNAVAILABLE STREAM_STORE_UNAVAILABLE within bounded time; the
    generation nobody reads any more is stopped after its grace (the agent sees the
    cancellation); and each replica still drains and exits cleanly on SIGTERM: no task
    or upstream call is left behind."""
    agent, _record, (a, b) = stack
    request = stream_request("redis dies under me", tokens=30)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        baseline = await full_run(ca, request)
        live = stub(ca).StreamGenerate(
            request, metadata=(("x-aiproxy-resumable", "1"),), timeout=60
        )
        live_sid = dict(await live.initial_metadata()).get("x-aiproxy-stream-id")
        assert live_sid
        got = []
        async for chunk in live:
            got.append(chunk)
            if len(got) == 3:
                break
        # A second stream, dropped on A and being resumed on B when Redis dies.
        other = stream_request("resumed when redis dies", tokens=60)
        sid, seen = await drop_after(ca, other, 2)
        resumer = stub(cb).StreamGenerate(
            other,
            metadata=(("x-aiproxy-resume", sid), ("last-event-id", str(seen[-1].seq))),
            timeout=60,
        )
        resumed = [await anext(aiter(resumer))]
        cancelled_before = sum(
            e.get("code") == "CANCELLED" for e in agent.log_events("call_finished")
        )

        redis_server.kill()
        started = time.monotonic()

        # The attached caller: the rest of its answer, the same as an uninterrupted run.
        got += [c async for c in live]
        assert text_of(got) == text_of(baseline) and got[-1].is_final
        assert got[-1].usage == baseline[-1].usage
        assert await live.code() == grpc.StatusCode.OK

        # The resumer on B: a clear error, not a hang (an in-band last chunk may precede it).
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for chunk in resumer:
                resumed.append(chunk)
        rich = error_of(err.value)
        assert rich.code == grpc.StatusCode.UNAVAILABLE, rich
        assert rich.reason == "STREAM_STORE_UNAVAILABLE" and rich.retry_delay_s == 1.0
        print(f"\nresumer ended {time.monotonic() - started:.2f} s after the kill: {rich}")

        # A new resume attempt while Redis is down, on either replica: the same, fast.
        for channel in (ca, cb):
            attempt_started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await full_run_with(channel, request, ("x-aiproxy-resume", live_sid), 3)
            rich = error_of(err.value)
            assert rich.code == grpc.StatusCode.UNAVAILABLE and (
                rich.reason == "STREAM_STORE_UNAVAILABLE" and rich.retry_delay_s == 1.0
            ), rich
            assert time.monotonic() - attempt_started < 5
        assert time.monotonic() - started < 30

        # Nobody reads the second generation any more: stopped after its grace on A.
        await until(
            lambda: metric(a, "ai_proxy_resumable_streams_stopped_total", why="abandoned") == 1,
            GRACE_S + 20,
            "the unread generation to be stopped",
        )
        await until(
            lambda: (
                sum(e.get("code") == "CANCELLED" for e in agent.log_events("call_finished"))
                > cancelled_before
            ),
            10,
            "the agent to see the cancellation",
        )
    # Both replicas still answer (nothing wedged), and say nothing of unretrieved tasks.
    async with grpc.aio.insecure_channel(a.address) as ca:
        assert [c async for c in stub(ca).StreamGenerate(stream_request("after", 3), timeout=30)]
    for proxy in (a, b):
        stopping = time.monotonic()
        assert proxy.stop(timeout=20) == 0  # SIGTERM: drained, not SIGKILLed after a hang
        print(f"{proxy.name} exited cleanly in {time.monotonic() - stopping:.2f} s")
        text = proxy.stderr_text()
        assert "Task exception was never retrieved" not in text
        assert "Task was destroyed but it is pending" not in text
