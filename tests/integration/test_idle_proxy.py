"""An idle proxy waits for traffic instead of looking for it: once its calls are over,
every loop that measures traffic (the backlog probe of each method, the adaptive limit,
the admin overview's sampler) waits on the overload gate's `next_call()`, and the next
call wakes them all. A real ProxyServer and AgentServer in this test's event loop, so
the loops' tasks can be inspected. (What that saves is bench.run's `idle` row.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aiproxy.agent.server import AgentServer, AgentSettings
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from aiproxy.core.settings import load_settings
from aiproxy.server.app import ProxyServer
from tests.support.waiting import eventually


def _parked() -> list[str]:
    """The tasks waiting in OverloadGate.next_call, by their outermost coroutine."""
    names = []
    for task in asyncio.all_tasks():
        coro: Any = task.get_coro()
        chain = []
        while coro is not None and hasattr(coro, "cr_await"):
            chain.append(coro.__qualname__)
            coro = coro.cr_await
        if any(name.endswith("OverloadGate.next_call") for name in chain):
            names.append(chain[0])
    return sorted(names)


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ProxyServer, str]]:
    agent = AgentServer(
        AgentSettings(listen="127.0.0.1:0", first_token_delay_ms=0, token_delay_ms=0)
    )
    await agent.start()
    settings = load_settings(
        server={"listen": "127.0.0.1:0", "drain_delay_s": 0},
        upstream={"endpoints": [agent.address]},
        metrics={"enabled": False},
    )
    proxy = ProxyServer(settings)
    await proxy.start()
    try:
        yield proxy, proxy.address
    finally:
        await proxy.drain(grace_s=1)
        await agent.stop(grace=None)


async def test_an_idle_proxy_parks_its_measuring_loops_and_a_call_wakes_them(proxy) -> None:
    server, address = proxy
    gate = server.gate
    assert gate is not None
    methods = len(gate.taken)
    expected = sorted(
        ["BacklogProbe._probe"] * methods + ["BacklogLimit.run", "OverviewSampler.run"]
    )

    def all_parked() -> bool:
        assert _parked() == expected
        return True

    await eventually(all_parked, 10, "every measuring loop parked at start")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        before = gate._next_call
        reply = await stub.Generate(pb.GenerateRequest(prompt="hello"), timeout=10)
        assert reply.text
        # The call resolved the future they waited on; they measured, then parked again
        # on a new one once nothing was open.
        assert before is not None and before.done()
        chunks = [
            c async for c in stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=10)
        ]
        assert chunks
    await eventually(all_parked, 10, "every measuring loop parked again")
    assert gate._next_call is not before
    assert gate.taken["/ai.agent.v1.AgentService/Generate"] == 1
