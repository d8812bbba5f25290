"""Routing that follows the conversation, with three real agent replicas behind one proxy.

Which replica served a call is read from the agents' own logs (each logs call_started
with the request id the proxy forwarded). Where a key must go is computed with the
balancer's pure functions over the replicas' addresses: the proxy's routing is checked
against that prediction, call by call, not only for being consistent.
"""

from __future__ import annotations

import asyncio
import collections
import random
import signal
import urllib.request
import uuid
from typing import Any

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.headers import AFFINITY_HEADER
from aiproxy.server.pool.balancer import Member, key_hash, rendezvous_order, seed
from tests.conftest import agent_args, proxy_args
from tests.integration.test_pool import wait_endpoint
from tests.support.grpc_helpers import stub
from tests.support.procs import ServiceProcess
from tests.support.waiting import eventually

ANON = "anonymous"


def predicted(replicas: list[ServiceProcess], key: str) -> list[str]:
    """The key's rendezvous order over the replicas' addresses (balancer.py)."""

    class Ep:
        def __init__(self, address: str) -> None:
            self.address = address
            self.in_flight = 0

    members = [Member(*seed(r.address), Ep(r.address), True) for r in replicas]  # type: ignore[arg-type]
    return [m.endpoint.address for m in rendezvous_order(members, key_hash(f"{ANON}\x00{key}"))]


async def served_by(replicas: list[ServiceProcess], request_id: str) -> str:
    """The address of the replica that logged this request id (exactly one did)."""

    def find() -> str | None:
        hits = [
            r.address
            for r in replicas
            if r.proc is not None
            and r.proc.poll() is None
            and any(e.get("request_id") == request_id for e in r.log_events("call_started"))
        ]
        assert len(hits) <= 1, hits
        return hits[0] if hits else None

    return await eventually(find, 5.0, f"the replica that served {request_id}", interval=0.02)


def scrape_affinity(proxy: ServiceProcess) -> dict[str, float]:
    """ai_proxy_affinity_total by outcome, summed over methods."""
    address = proxy.ready["metrics_address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        if line.startswith("ai_proxy_affinity_total{"):
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] += float(value)
    return dict(out)


async def turn(
    channel: grpc.aio.Channel, session: str, text: str, *, streamed: bool = False, **headers: str
) -> str:
    """One chat turn; returns the request id it was sent with."""
    rid = uuid.uuid4().hex
    md = (("x-request-id", rid), *headers.items())
    if streamed:
        req = pb.StreamChatRequest(session_id=session, user_message=text)
        async for _ in stub(channel).StreamChat(req, metadata=md, timeout=10):
            pass
    else:
        await stub(channel).Chat(
            pb.ChatRequest(session_id=session, user_message=text), metadata=md, timeout=10
        )
    return rid


@pytest.fixture
def replicas(spawn: Any) -> list[ServiceProcess]:
    return [spawn(*agent_args(), name=f"agent{i}") for i in range(3)]


async def proxy_over(spawn: Any, replicas: list[ServiceProcess], **env: str) -> Any:
    proxy = spawn(*proxy_args(*(r.address for r in replicas)), env=env, name="proxy")
    channel = grpc.aio.insecure_channel(proxy.address)
    for r in replicas:
        await wait_endpoint(channel, r.address, usable=True, timeout=5)
    return proxy, channel


async def test_a_session_stays_on_one_replica_and_follows_one_fallback_when_it_dies(
    spawn: Any, replicas: list[ServiceProcess]
) -> None:
    proxy, channel = await proxy_over(spawn, replicas)
    async with channel:
        order = predicted(replicas, "conv-1")
        rids = [await turn(channel, "conv-1", f"turn {i}", streamed=i % 2 == 1) for i in range(8)]
        assert {await served_by(replicas, rid) for rid in rids} == {order[0]}
        assert scrape_affinity(proxy) == {"hit": 8.0}

        # Its replica dies without a word: the next turns all go to the key's second
        # choice (the first of them by a retry, if the proxy has not noticed yet).
        home = next(r for r in replicas if r.address == order[0])
        home.send_signal(signal.SIGKILL)
        rids = [await turn(channel, "conv-1", f"after {i}", streamed=i % 2 == 1) for i in range(6)]
        assert {await served_by(replicas, rid) for rid in rids} == {order[1]}
        outcomes = scrape_affinity(proxy)
        assert outcomes["hit"] == 8 and outcomes["failover"] == 6, outcomes


async def test_generated_keys_spread_over_the_replicas_as_predicted(
    spawn: Any, replicas: list[ServiceProcess]
) -> None:
    _, channel = await proxy_over(spawn, replicas)
    rng = random.Random(22)
    sessions = [f"s-{rng.getrandbits(64):016x}" for _ in range(45)]
    async with channel:
        served = {}
        for i in range(0, len(sessions), 9):  # a few at a time, so none spills
            batch = sessions[i : i + 9]
            rids = await asyncio.gather(*(turn(channel, s, "hi") for s in batch))
            for s, rid in zip(batch, rids, strict=True):
                served[s] = await served_by(replicas, rid)
    assert all(served[s] == predicted(replicas, s)[0] for s in sessions)
    per_replica = collections.Counter(served.values())
    assert len(per_replica) == 3, per_replica  # P(a replica gets none of 45) ~ 1e-8


async def test_the_affinity_header_routes_calls_without_a_session(
    spawn: Any, replicas: list[ServiceProcess]
) -> None:
    _, channel = await proxy_over(spawn, replicas)
    async with channel:
        for key in ("user-7", "user-8"):
            home = predicted(replicas, key)[0]
            for _ in range(4):
                rid = uuid.uuid4().hex
                await stub(channel).Generate(
                    pb.GenerateRequest(prompt="hello"),
                    metadata=(("x-request-id", rid), (AFFINITY_HEADER, key)),
                    timeout=10,
                )
                assert await served_by(replicas, rid) == home
            # The same name as a session id: the same replica (one namespace per scope).
            assert await served_by(replicas, await turn(channel, key, "hi")) == home


async def test_a_replica_at_the_load_bound_spills_its_sessions_to_their_next_choice(
    spawn: Any, replicas: list[ServiceProcess]
) -> None:
    proxy, channel = await proxy_over(
        spawn, replicas, AIPROXY_UPSTREAM__AFFINITY__MIN_SPILL_IN_FLIGHT="2"
    )
    async with channel:
        order = predicted(replicas, "busy")
        # Two calls of the session that never answer hold its replica at 2 in flight,
        # the bound here: max(2, ceil(1.25 x (2 + 1) / 3)).
        held = [
            asyncio.create_task(turn(channel, "busy", "hold", **{"x-fault-hang": "1"}))
            for _ in range(2)
        ]
        home = next(r for r in replicas if r.address == order[0])
        await eventually(
            lambda: len(home.log_events("call_started")) >= 2, 10.0, "the held calls to start"
        )
        rid = await turn(channel, "busy", "now")
        assert await served_by(replicas, rid) == order[1]
        assert scrape_affinity(proxy).get("spill") == 1

        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)

        # Under the bound again: back to its replica.
        async def back_home() -> str:
            return await served_by(replicas, await turn(channel, "busy", "again"))

        for _ in range(20):  # the cancellations reach the proxy within a moment
            if await back_home() == order[0]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the session never returned to its replica")
