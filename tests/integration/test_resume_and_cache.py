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

import grpc
import pytest
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from ai.agent.v1 import agent_service_pb2 as pb
from tests.conftest import agent_args
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
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--upstream",
            agent.address,
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
    channel: grpc.aio.Channel, request: pb.StreamGenerateRequest, n: int
) -> tuple[str, list]:
    """A resumable call that reads `n` chunks and then drops its connection (cancel)."""
    call = stub(channel).StreamGenerate(
        request, metadata=(("x-aiproxy-resumable", "1"),), timeout=60
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
            return reply, dict(await call.initial_metadata()).get("x-aiproxy-cache")

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
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--upstream",
        agent.address,
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
