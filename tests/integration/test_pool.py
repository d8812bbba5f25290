"""The upstream pool with three real agent replicas: balance, health, failure, recovery."""

from __future__ import annotations

import asyncio
import collections
import signal

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.proxy.v1 import admin_service_pb2 as admin_pb
from aiproxy.ai.proxy.v1 import admin_service_pb2_grpc as admin_grpc
from tests.conftest import agent_args, proxy_args
from tests.support.grpc_helpers import stub
from tests.support.waiting import eventually, eventually_timed

REQUEST = pb.GenerateRequest(prompt="balance me", options=pb.GenerationOptions(max_tokens=4))


async def endpoints(channel: grpc.aio.Channel) -> dict[str, admin_pb.UpstreamEndpoint]:
    reply = await admin_grpc.ProxyAdminServiceStub(channel).ListEndpoints(
        admin_pb.ListEndpointsRequest(), timeout=5
    )
    return {ep.address: ep for ep in reply.endpoints}


async def wait_endpoint(
    channel: grpc.aio.Channel, address: str, *, usable: bool, timeout: float
) -> float:
    """Poll the admin RPC until `address` is (not) usable; returns the time it took."""

    async def reached() -> bool:
        return (await endpoints(channel))[address].usable == usable

    _, took = await eventually_timed(reached, timeout, f"{address} usable={usable}")
    return took


async def fire(
    channel: grpc.aio.Channel,
    n: int,
    concurrency: int,
    codes: list[grpc.StatusCode] | None = None,
) -> list[grpc.StatusCode]:
    """n unary calls, `concurrency` at a time; returns each call's status code (appended to
    `codes` as they finish, when given, so a test can watch the load's progress)."""
    codes = [] if codes is None else codes
    queue = iter(range(n))

    async def worker() -> None:
        for _ in queue:
            try:
                await stub(channel).Generate(REQUEST, timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return codes


def calls_per_agent(agents) -> dict[str, int]:
    return {a.address: len(a.log_events("call_started")) for a in agents}


@pytest.fixture
def replicas(spawn):
    return [
        spawn(*agent_args(first_token_delay_ms=2, token_delay_ms=1), name=f"agent{i}")
        for i in range(3)
    ]


@pytest.fixture
async def pool_proxy(spawn, replicas):
    proxy = spawn(*proxy_args(*(a.address for a in replicas)), name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        for agent in replicas:
            await wait_endpoint(channel, agent.address, usable=True, timeout=5)
        yield proxy, channel


async def test_uniform_load_spreads_evenly(replicas, pool_proxy) -> None:
    _, channel = pool_proxy
    codes = await fire(channel, 300, concurrency=12)
    assert collections.Counter(codes) == {grpc.StatusCode.OK: 300}
    counts = calls_per_agent(replicas)
    fair = 300 / 3
    assert sum(counts.values()) == 300
    assert max(counts.values()) <= 1.5 * fair, counts


async def test_not_serving_replica_gets_no_new_calls_within_1s(replicas, pool_proxy) -> None:
    _, channel = pool_proxy
    sick = replicas[0]
    sick.send_signal(signal.SIGUSR1)
    took = await wait_endpoint(channel, sick.address, usable=False, timeout=1.0)
    before = len(sick.log_events("call_started"))
    codes = await fire(channel, 60, concurrency=6)
    assert set(codes) == {grpc.StatusCode.OK}
    assert len(sick.log_events("call_started")) == before, (
        f"NOT_SERVING replica got calls ({took:.3f}s to notice)"
    )

    # It comes back: used again.
    sick.send_signal(signal.SIGUSR2)
    await wait_endpoint(channel, sick.address, usable=True, timeout=2.0)
    await fire(channel, 60, concurrency=6)
    assert len(sick.log_events("call_started")) > before


async def test_killed_replica_detected_within_5s_and_calls_keep_succeeding(
    replicas, pool_proxy
) -> None:
    _, channel = pool_proxy
    victim = replicas[1]
    codes: list[grpc.StatusCode] = []
    load = asyncio.create_task(fire(channel, 400, concurrency=4, codes=codes))
    # The kill lands in the middle of the load: calls have finished, the victim has taken
    # its share of them, and most of the 400 are still to come.
    await eventually(
        lambda: len(codes) >= 20 and victim.log_events("call_started"),
        30,
        "the load under way, on the victim too",
    )
    assert len(codes) < 400, "the load finished before the kill"
    victim.proc.send_signal(signal.SIGKILL)
    took = await wait_endpoint(channel, victim.address, usable=False, timeout=5.0)
    assert await load is codes
    assert collections.Counter(codes) == {grpc.StatusCode.OK: 400}, f"detected after {took:.3f}s"
    assert set(await fire(channel, 50, concurrency=5)) == {grpc.StatusCode.OK}


async def test_slow_replica_receives_less(spawn) -> None:
    fast = [
        spawn(*agent_args(first_token_delay_ms=1, token_delay_ms=0), name=f"fast{i}")
        for i in range(2)
    ]
    slow = spawn(*agent_args(first_token_delay_ms=60, token_delay_ms=0), name="slow")
    proxy = spawn(*proxy_args(*(a.address for a in [*fast, slow])), name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        for agent in [*fast, slow]:
            await wait_endpoint(channel, agent.address, usable=True, timeout=5)
        codes = await fire(channel, 300, concurrency=12)
    assert set(codes) == {grpc.StatusCode.OK}
    counts = calls_per_agent([*fast, slow])
    slow_share = counts[slow.address]
    fast_share = min(counts[a.address] for a in fast)
    assert slow_share < 0.6 * fast_share, counts


async def test_admin_lists_endpoints_with_breaker_state(replicas, pool_proxy) -> None:
    _, channel = pool_proxy
    listed = await endpoints(channel)
    assert set(listed) == {a.address for a in replicas}
    for ep in listed.values():
        assert ep.serving and ep.usable
        assert ep.breaker_state == admin_pb.BREAKER_STATE_CLOSED


async def test_health_tasks_are_supervised_and_restart_after_any_exception(caplog) -> None:
    """Whatever a health task raises (the old one died on CircuitOpen and froze the
    endpoint as "not serving" for good), the supervisor logs it and runs it again."""
    import logging

    from aiproxy.core.settings import UpstreamSettings
    from aiproxy.server.pool.endpoint import Endpoint

    endpoint = Endpoint(
        "127.0.0.1:1", UpstreamSettings(endpoints=["127.0.0.1:1"]), lambda _ep: None
    )
    runs = 0
    healthy_again = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("a bug")
        if runs == 2:
            raise grpc.aio.UsageError("closed channel")  # not an AioRpcError either
        if runs == 3:
            return  # ended by itself
        endpoint.set_serving(True, "watch")
        healthy_again.set()
        await asyncio.Event().wait()

    with caplog.at_level(logging.WARNING, logger="aiproxy.upstream"):
        task = asyncio.create_task(endpoint.health._supervise("health", flaky))
        try:
            await asyncio.wait_for(healthy_again.wait(), 5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await endpoint.close()
    assert runs == 4 and endpoint.serving
    restarts = [r for r in caplog.records if r.getMessage() == "upstream_task_restart"]
    assert [r.fields["why"] for r in restarts] == ["RuntimeError", "UsageError", "ended"]  # type: ignore[attr-defined]
