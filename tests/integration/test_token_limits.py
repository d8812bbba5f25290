"""Token-aware limits end to end, with real agent, proxy and redis-server processes (issue 14).

- No check-then-use race: N calls sent at once against a daily budget that fits K of
  them admit exactly K, with the in-memory backend and with two proxy processes sharing
  one Redis. The agent holds every answer back long enough that all N are decided
  before any settles (a settle gives back what a call did not use).
- A stream the caller cancels mid-way is charged what went out (the prompt plus the
  chunks sent), not its reservation (prompt + max_tokens), read back from the
  x-ratelimit-remaining-tokens-day header of later calls (and from Redis).
- A finished call is settled once, with the usage the agent reported.
- Tenants: two callers with different JWT subjects and the same tenant claim share one
  daily budget; a caller of another tenant keeps its own.
- Refusals are RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo at the refill.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import jwt
import pytest
import redis.asyncio as aioredis
from grpc_status import rpc_status

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.tokens import reserve
from tests.conftest import agent_args, proxy_args
from tests.integration.test_protection import rich_from_status
from tests.support.grpc_helpers import stub
from tests.support.procs import ServiceProcess
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

PREFIX = "it:tokens:"
SECRET = "token-limits-secret-0123456789abcdefghij"
DAY_REMAINING = "x-ratelimit-remaining-tokens-day"

GENERATE = pb.GenerateRequest(
    prompt="Explain token buckets briefly", options=pb.GenerationOptions(max_tokens=10)
)
PROMPT_EST, RESERVE = reserve(GENERATE)  # 4 + 10: the reference agent's count exactly


def serve(spawn: Callable[..., ServiceProcess], agent: str, env: dict[str, str]) -> ServiceProcess:
    return spawn(
        *proxy_args(agent),
        env=env,
        name="proxy",
    )


def redis_env(url: str) -> dict[str, str]:
    return {
        "AIPROXY_LIMITS__BACKEND": "redis",
        "AIPROXY_REDIS__URL": url,
        "AIPROXY_REDIS__KEY_PREFIX": PREFIX,
        "AIPROXY_LIMITS__EXPECTED_PROCESSES": "2",
        # Generous: a CPU-starved box must not send calls to the failure policy.
        "AIPROXY_REDIS__TIMEOUT_MS": "500",
    }


async def generate(
    channel: grpc.aio.Channel, request: Any = GENERATE, metadata: tuple = ()
) -> tuple[grpc.StatusCode, Any, dict[str, str]]:
    """(code, response or rich error, reply metadata: a unary answer's trailers) of one
    Generate."""
    call = stub(channel).Generate(request, metadata=metadata, timeout=30)
    try:
        response = await call
    except grpc.aio.AioRpcError as err:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        assert status is not None, err
        return err.code(), rich_from_status(status), {}
    headers = {k: str(v) for k, v in (await call.trailing_metadata() or ())}
    return grpc.StatusCode.OK, response, headers


def assert_token_refusal(rich: Any, subject: str) -> None:
    assert rich.reason == "RATE_LIMITED", rich
    assert rich.metadata["quota"] == "tokens_per_day"
    # ErrorInfo (checked by rich_from_status), RetryInfo at the refill (the next
    # 00:00 UTC for a daily budget) and QuotaFailure naming whose budget it is.
    assert rich.retry_delay_s is not None and 0 < rich.retry_delay_s <= 86_400
    assert rich.quota and rich.quota[0][0] == subject


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_n_concurrent_calls_against_a_budget_for_k_admit_exactly_k(
    spawn,
    redis_server: RedisServer,  # noqa: F811
    backend: str,
) -> None:
    n, k = 12, 5
    # Every answer waits 3 s for its first token: all N are admitted or refused before
    # any ends and settles.
    agent = spawn(*agent_args(first_token_delay_ms=3000), name="agent")
    env = {"AIPROXY_LIMITS__TOKENS_PER_DAY": str(k * RESERVE)}
    if backend == "redis":
        env |= redis_env(redis_server.url)
        proxies = [serve(spawn, agent.address, env) for _ in range(2)]
    else:
        proxies = [serve(spawn, agent.address, env)]
    channels = [grpc.aio.insecure_channel(p.address) for p in proxies]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in channels))
        # One caller through every process: a declared id inside 127.0.0.1, whose tokens
        # are its address's (a declared id splits a budget, never adds one).
        who = (("x-client-id", "team-a"),)
        results = await asyncio.gather(
            *(generate(channels[i % len(channels)], metadata=who) for i in range(n))
        )
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    codes = [code for code, _, _ in results]
    admitted = codes.count(grpc.StatusCode.OK)
    print(f"{backend}: {admitted} of {n} admitted against a budget for {k}")
    assert admitted == k, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == n - k, codes
    for code, rich, _ in results:
        if code != grpc.StatusCode.OK:
            assert_token_refusal(rich, "peer:127.0.0.1")
    # Each admitted call was reserved exactly its share (prompt + max_tokens), and the
    # agent reported exactly that much: the settles changed nothing.
    for code, response, headers in results:
        if code == grpc.StatusCode.OK:
            used = response.usage.prompt_tokens + response.usage.completion_tokens
            assert used == RESERVE, response.usage
            assert 0 <= int(headers[DAY_REMAINING]) <= (k - 1) * RESERVE
    if backend == "redis":
        assert await day_used_in_redis(redis_server.url, "peer:127.0.0.1") == k * RESERVE


async def day_used_in_redis(url: str, budget_key: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        keys = await client.keys(f"{PREFIX}day:{budget_key}:*")
        assert len(keys) == 1, keys
        return int(await client.get(keys[0]))
    finally:
        await client.aclose()


async def used_so_far(channel: grpc.aio.Channel, per_day: int, probes_used: list[int]) -> int:
    """What the day's budget has been charged before this probe, from the budget left
    after the probe's own reservation (its header); then the probe itself is settled
    with what it used (its usage), which later probes account for."""
    code, response, headers = await generate(channel)
    assert code == grpc.StatusCode.OK, response
    before = per_day - int(headers[DAY_REMAINING]) - RESERVE - sum(probes_used)
    probes_used.append(response.usage.prompt_tokens + response.usage.completion_tokens)
    return before


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_cancelled_stream_is_charged_what_it_produced_once(
    spawn,
    redis_server: RedisServer,  # noqa: F811
    backend: str,
) -> None:
    per_day = 100_000
    agent = spawn(*agent_args(token_delay_ms=100), name="agent")
    env = {"AIPROXY_LIMITS__TOKENS_PER_DAY": str(per_day)}
    if backend == "redis":
        env |= redis_env(redis_server.url)
    proxy = serve(spawn, agent.address, env)
    request = pb.StreamGenerateRequest(
        prompt="Tell me a long story about circuit breakers",
        options=pb.GenerationOptions(max_tokens=400),
    )
    prompt_est, reserved = reserve(request)
    read = 5
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        probes: list[int] = []
        assert await used_so_far(channel, per_day, probes) == 0
        call = stub(channel).StreamGenerate(request, timeout=60)
        headers = dict(await call.initial_metadata())
        # Reserved at admission: the prompt and all of max_tokens.
        assert int(headers[DAY_REMAINING]) == per_day - sum(probes) - reserved
        got = 0
        async for chunk in call:
            got += bool(chunk.delta)
            if got == read:
                break
        call.cancel()
        # The proxy notices the cancellation and settles: poll (each probe accounts for
        # the ones before it) until the stream's charge is no longer its reservation.
        deadline = time.monotonic() + 20
        charged = reserved
        while time.monotonic() < deadline:
            charged = await used_so_far(channel, per_day, probes)
            if charged < reserved:
                break
        # What went out: the prompt and the chunks sent (the caller read `read` of them;
        # a few more may have been on their way when it cancelled, on a loaded box).
        print(f"{backend}: reserved {reserved}, charged {charged} after reading {read} chunks")
        assert prompt_est + read <= charged <= prompt_est + read + 6, (charged, reserved)
        # Settled once: later calls see the same charge.
        assert await used_so_far(channel, per_day, probes) == charged
        # A stream that runs to its end is charged its reported usage, once.
        full = [c async for c in stub(channel).StreamGenerate(request, timeout=60)]
        usage = full[-1].usage
        assert full[-1].is_final and usage.completion_tokens > read
        reported = usage.prompt_tokens + usage.completion_tokens
        assert await used_so_far(channel, per_day, probes) == charged + reported
    if backend == "redis":
        assert await day_used_in_redis(redis_server.url, "peer:127.0.0.1") == (
            charged + reported + sum(probes)
        )


async def test_a_resumable_generation_that_outlives_its_caller_is_charged_in_full(spawn) -> None:
    """A resumable stream's generation goes on for the grace after its caller drops
    (issue 16): the tokens it produces after the drop are charged too, once, when it ends,
    so dropping and resuming (a replay is free) never gets a generation cheaper."""
    per_day = 100_000
    agent = spawn(*agent_args(token_delay_ms=30), name="agent")
    proxy = serve(spawn, agent.address, {"AIPROXY_LIMITS__TOKENS_PER_DAY": str(per_day)})
    request = pb.StreamGenerateRequest(
        prompt="Tell me a story about token budgets",
        options=pb.GenerationOptions(max_tokens=40),
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        probes: list[int] = []
        assert await used_so_far(channel, per_day, probes) == 0
        # What one uninterrupted run of this request costs: its reported usage.
        full = [c async for c in stub(channel).StreamGenerate(request, timeout=60)]
        cost = full[-1].usage.prompt_tokens + full[-1].usage.completion_tokens
        assert await used_so_far(channel, per_day, probes) == cost
        call = stub(channel).StreamGenerate(
            request, metadata=(("x-aiproxy-resumable", "1"),), timeout=60
        )
        got = 0
        async for chunk in call:
            got += bool(chunk.delta)
            if got == 3:
                break
        call.cancel()  # dropped, not cancelled on purpose: the generation goes on
        _, reserved = reserve(request)
        deadline = time.monotonic() + 30
        charged = reserved
        while time.monotonic() < deadline:
            charged = await used_so_far(channel, per_day, probes) - cost
            if charged != reserved:  # settled (until then its reservation shows)
                break
            await asyncio.sleep(0.2)
        print(f"dropped after 3 chunks: charged {charged}, a full run costs {cost}")
        assert charged == cost


def token(sub: str, tenant: str) -> tuple[tuple[str, str], ...]:
    now = int(time.time())
    claims = {"sub": sub, "tenant": tenant, "iat": now, "exp": now + 600}
    return (("authorization", f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"),)


async def test_callers_of_one_tenant_share_its_daily_budget(spawn) -> None:
    agent = spawn(*agent_args(), name="agent")
    env = {
        "AIPROXY_AUTH__JWT_SECRET": SECRET,
        "AIPROXY_LIMITS__TENANT_CLAIM": "tenant",
        "AIPROXY_LIMITS__TOKENS_PER_DAY": str(10 * RESERVE),
        "AIPROXY_LIMITS__OVERRIDES": json.dumps({"tenant:acme": {"tokens_per_day": 3 * RESERVE}}),
    }
    proxy = serve(spawn, agent.address, env)
    alice, bob, carol = token("alice", "acme"), token("bob", "acme"), token("carol", "globex")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        left = []
        for who in (alice, bob, alice):
            code, response, headers = await generate(channel, metadata=who)
            assert code == grpc.StatusCode.OK, response
            left.append(int(headers[DAY_REMAINING]))
        # One budget for both subjects: each call took from the same counter.
        assert left == [2 * RESERVE, RESERVE, 0]
        code, rich, _ = await generate(channel, metadata=bob)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_token_refusal(rich, "tenant:acme")
        # Another tenant (the default size) is untouched.
        code, _, headers = await generate(channel, metadata=carol)
        assert code == grpc.StatusCode.OK
        assert int(headers[DAY_REMAINING]) == 9 * RESERVE
