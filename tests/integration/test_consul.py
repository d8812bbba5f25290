"""Consul discovery with real agent and proxy processes against a fake Consul that follows
Consul's documented health API and blocking-query semantics (tests/support/fake_consul.py;
no Consul binary can be installed here)."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.server.pool.consul import ConsulTarget, ConsulWatch, addresses_from_health
from tests.conftest import agent_args, proxy_args
from tests.integration.test_pool import endpoints
from tests.support.fake_consul import ConsulThread, FakeConsul, Instance
from tests.support.grpc_helpers import stub
from tests.support.waiting import eventually, eventually_timed

TOKEN = "s3cr3t-acl-token"


def test_target_grammar() -> None:
    t = ConsulTarget.parse("consul://127.0.0.1:8500/agent?tag=primary&dc=eu1")
    assert (t.host, t.port, t.service, t.tag, t.dc) == (
        "127.0.0.1",
        8500,
        "agent",
        "primary",
        "eu1",
    )
    assert t.name == "consul://127.0.0.1:8500/agent"
    for bad in (
        "consul://127.0.0.1/agent",  # no port
        "consul://127.0.0.1:8500/",  # no service
        "consul://user:pw@127.0.0.1:8500/agent",  # credentials belong in CONSUL_HTTP_TOKEN
        "consul://127.0.0.1:8500/agent?token=x",  # unknown parameter
    ):
        with pytest.raises(ValueError):
            ConsulTarget.parse(bad)
    # The node's address applies when the service registered none.
    entries = [
        {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "a", "Address": "", "Port": 7}},
        {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "b", "Address": "::1", "Port": 8}},
    ]
    assert addresses_from_health(entries) == ["10.0.0.1:7", "[::1]:8"]


async def test_blocking_rules_against_the_fake() -> None:
    """The documented rules: a return is no proof of change (the pool is told only on a
    change), a backwards index is reset to 0 (the next query does not block), the token
    goes in X-Consul-Token, and the wait is sent with the index."""
    fake = await FakeConsul("agent", token=TOKEN).start()
    seen: list[list[str]] = []

    async def changed(addresses: list[str]) -> None:
        seen.append(addresses)

    watch = ConsulWatch(
        ConsulTarget.parse(f"consul://{fake.address}/agent"), changed, token=TOKEN, wait_s=1
    )
    try:
        await fake.register(Instance("a", "127.0.0.1", 1001))
        assert await watch.query()
        assert seen == [["127.0.0.1:1001"]] and watch.index == fake.index
        task = asyncio.create_task(watch.query())
        await eventually(lambda: len(fake.requests) == 2, 5, "the blocking query")
        assert fake.requests[-1].query["index"] == str(fake.index)
        assert fake.requests[-1].query["wait"] == "1s"
        assert fake.requests[-1].token == TOKEN
        assert not task.done()  # held by Consul until something changes
        await fake.touch()  # a write this query does not see: no change for the pool
        assert await task
        assert len(seen) == 1
        # The index goes backwards (snapshot restore): the answer counts, the index resets.
        await fake.set_index(3)
        await fake.register(Instance("b", "127.0.0.1", 1002))  # index 4
        fake.index = 4
        watch.index = 9
        assert await watch.query()
        assert watch.index == 0 and seen[-1] == ["127.0.0.1:1001", "127.0.0.1:1002"]
        # ... so the next query is a plain read (no index, answers at once) that gets one.
        assert await asyncio.wait_for(watch.query(), 2)
        assert "index" not in fake.requests[-1].query and watch.index == 4
        # A wrong token is an error, not an empty pool.
        bad = ConsulWatch(watch.target, changed, token="wrong", wait_s=1)
        assert not await bad.query()
        assert bad.last_error is not None and "403" in bad.last_error
        await bad.aclose()
    finally:
        await watch.aclose()
        await fake.stop()


@pytest.fixture
def consul():
    fake = ConsulThread("agent", token=TOKEN)
    yield fake
    fake.close()


def discovery_up(metrics_address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("ai_proxy_discovery_up{", "ai_proxy_discovery_errors_total{")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def test_proxy_follows_consul(spawn, consul) -> None:
    agents = [spawn(*agent_args(token_delay_ms=40), name=f"agent{i}") for i in range(3)]
    consul.register("a0", agents[0].address, tags=["primary"])
    consul.register("other", agents[2].address, tags=["canary"])  # filtered out by ?tag=
    target = f"consul://{consul.address}/agent?tag=primary&dc=dc1"
    # A short wait, so the query held across the index reset below returns soon.
    env = {"CONSUL_HTTP_TOKEN": TOKEN, "AIPROXY_UPSTREAM__CONSUL_WAIT_S": "2"}
    proxy = spawn(*proxy_args(target), env=env, name="proxy")
    assert TOKEN not in proxy.stderr_text()
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        assert set(await endpoints(channel)) == {agents[0].address}
        reply = await stub(channel).Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
        assert reply.text
        # A blocking query is waiting in Consul (index and wait sent, with the token).
        await eventually(
            lambda: any("index" in r.query and "wait" in r.query for r in consul.fake.requests),
            5,
            "a blocking query",
        )
        assert all(r.token == TOKEN for r in consul.fake.requests)
        assert all(r.query.get("tag") == "primary" for r in consul.fake.requests)

        # A new healthy instance reaches the pool as soon as Consul has it.
        consul.register("a1", agents[1].address, tags=["primary"])

        async def both() -> bool:
            return set(await endpoints(channel)) == {agents[0].address, agents[1].address}

        _, took = await eventually_timed(both, 10, "the new instance in the pool")
        print(f"consul registration -> pool: {took * 1000:.0f} ms")

        # An instance that leaves drains: its stream in flight finishes, new calls avoid it.
        stream = stub(channel).StreamGenerate(
            pb.StreamGenerateRequest(
                prompt="drain me", options=pb.GenerationOptions(max_tokens=30)
            ),
            timeout=20,
        )
        first = await stream.read()
        assert first is not grpc.aio.EOF
        busy = {a for a, ep in (await endpoints(channel)).items() if ep.in_flight}
        leaving = agents[0] if agents[0].address in busy else agents[1]
        assert leaving.address in busy
        consul.set_passing("a0" if leaving is agents[0] else "a1", False)
        staying = agents[1] if leaving is agents[0] else agents[0]

        async def only_staying() -> bool:
            return set(await endpoints(channel)) == {staying.address}

        _, took = await eventually_timed(only_staying, 10, "the failing instance gone")
        print(f"consul check failing -> pool: {took * 1000:.0f} ms")
        chunks = [first]
        for _ in range(100):
            chunk = await stream.read()
            if chunk is grpc.aio.EOF:
                break
            chunks.append(chunk)
        assert chunks[-1].is_final and await stream.code() == grpc.StatusCode.OK

        # Consul away: the last known set stays, a log line and the metric say so.
        consul.stop()
        proxy.wait_for_log(lambda e: e.get("event") == "consul_unreachable", timeout=15)
        line = proxy.log_events("consul_unreachable")[0]
        assert line["kept_addresses"] == [staying.address]
        metrics = discovery_up(proxy.ready["metrics_address"])
        key = f'ai_proxy_discovery_up{{source="consul://{consul.address}/agent"}}'
        assert metrics[key] == 0.0
        for _ in range(3):
            reply = await stub(channel).Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
            assert reply.text
        assert set(await endpoints(channel)) == {staying.address}

        # Back, after a restore that put its index backwards: the proxy follows again.
        consul.set_index(2)
        consul.restart()
        consul.set_passing("a0" if leaving is agents[0] else "a1", True)
        await eventually(both, 15, "the instance back after Consul's return")
        proxy.wait_for_log(lambda e: e.get("event") == "consul_recovered", timeout=5)
        assert discovery_up(proxy.ready["metrics_address"])[key] == 1.0
