"""The overload gate (interceptors/overload.py) and the backlog probe (server/pool/backlog.py).

BacklogLimit is pure logic, fed samples by hand; the gate runs on a real grpc.aio server
on port 0 with a counter standing in for the forwarder's active calls; the probe runs
against a real server whose accept path is held up by a busy event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.errors import OVERLOADED_RETRY_DELAY_S
from aiproxy.interceptors.overload import BacklogLimit, CallerIdentity, OverloadGate
from aiproxy.server.pool.backlog import BacklogProbe
from tests.support.pipeline import channel_for
from tests.support.probes import record_probes
from tests.support.waiting import eventually

# ---- BacklogLimit --------------------------------------------------------------------------


def test_limit_starts_at_the_ceiling_and_stays_while_the_wait_is_short() -> None:
    limit = BacklogLimit(ceiling=2000, floor=16, target_s=0.25)
    for _ in range(10):
        limit.sample(0.01, active=500)
    assert limit.limit == 2000


def test_a_long_wait_drops_the_limit_below_what_is_open_now_down_to_the_floor() -> None:
    limit = BacklogLimit(ceiling=2000, floor=16, target_s=0.25)
    limit.sample(0.5, active=100)
    assert limit.limit == 90  # 0.9 x the 100 calls open, not 0.9 x 2000
    limit.sample(0.5, active=100)
    assert limit.limit == 81  # 0.9 x min(limit, open)
    for _ in range(100):
        limit.sample(2.0, active=100)
    assert limit.limit == 16  # never below the floor


def test_the_limit_climbs_back_once_the_wait_is_short_again() -> None:
    limit = BacklogLimit(ceiling=200, floor=16, target_s=0.25)
    limit.sample(1.0, active=0)
    assert limit.limit == 16
    limit.sample(0.0, active=0)
    assert limit.limit == 17  # at least +1
    for _ in range(200):
        limit.sample(0.0, active=0)
    assert limit.limit == 200  # up to the ceiling, not past it


def test_floor_never_exceeds_the_ceiling() -> None:
    assert BacklogLimit(ceiling=8, floor=16, target_s=0.1).floor == 8


# ---- OverloadGate on a real server -----------------------------------------------------

SERVICE = "ai.agent.v1.AgentService"
UNARY = f"/{SERVICE}/Generate"
STREAM = f"/{SERVICE}/StreamGenerate"
HEALTH = "/test.Beside/Health"
OK = pb.GenerateResponse(text="ok").SerializeToString()
CHUNK = pb.StreamGenerateResponse(delta="chunk").SerializeToString()


class Harness:
    def __init__(self) -> None:
        self.active = 0
        self.refused: list[str] = []
        self.handled = 0


@pytest.fixture
async def gated() -> AsyncIterator[tuple[grpc.aio.Channel, Harness, OverloadGate]]:
    """The AgentService pipeline with the gate first, and a service beside it."""
    harness = Harness()

    class Agent:
        async def Generate(self, request: Any, context: Any) -> Any:
            harness.handled += 1
            return pb.GenerateResponse(text="ok")

        async def StreamGenerate(self, request: Any, context: Any) -> AsyncIterator[Any]:
            harness.handled += 1
            yield pb.StreamGenerateResponse(delta="chunk")

        def __getattr__(self, name: str) -> Any:
            return self.Generate

    async def health(request: bytes, context: Any) -> bytes:
        return b"serving"

    beside = grpc.method_handlers_generic_handler(
        "test.Beside", {"Health": grpc.unary_unary_rpc_method_handler(health)}
    )
    gate = OverloadGate(
        active=lambda: harness.active,
        capacity=10,
        on_reject=lambda path, cause, cls: harness.refused.append(path),
        policy="blind",
    )
    async with channel_for(Agent(), gate=gate, beside=[beside]) as channel:
        yield channel, harness, gate


def _overloaded(err: grpc.aio.AioRpcError) -> float:
    """Checks the refusal's shape; returns its RetryInfo delay."""
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.reason == "OVERLOADED"
    assert info.metadata["limit"] == "10"
    assert status.details[1].Unpack(retry)
    # HTTP callers read the same delay as retry-after (whole seconds, rounded up).
    trailers = dict(err.trailing_metadata() or ())
    assert trailers["retry-after"] == str(-(-retry.retry_delay.ToNanoseconds() // 10**9))
    return retry.retry_delay.ToNanoseconds() / 1e9


async def test_below_capacity_calls_pass(gated) -> None:
    channel, harness, _ = gated
    harness.active = 9
    assert await channel.unary_unary(UNARY)(b"", timeout=5) == OK
    assert [c async for c in channel.unary_stream(STREAM)(b"", timeout=5)] == [CHUNK]
    assert harness.refused == [] and harness.handled == 2


async def test_at_capacity_api_calls_are_refused_shaped_and_never_reach_the_handler(gated) -> None:
    channel, harness, _ = gated
    harness.active = 10
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        # Bytes that would be MALFORMED_REQUEST: the gate refuses before decoding.
        await channel.unary_unary(UNARY)(b"\x0a\x64abc", timeout=5)
    assert _overloaded(caught.value) == pytest.approx(OVERLOADED_RETRY_DELAY_S)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in channel.unary_stream(STREAM)(b"", timeout=5):
            pass
    _overloaded(caught.value)
    assert harness.handled == 0
    assert harness.refused == [UNARY, STREAM]
    # Services beside the pipeline (health, admin) always get through.
    assert await channel.unary_unary(HEALTH)(b"", timeout=5) == b"serving"


async def test_the_backlog_limit_lowers_the_capacity(gated) -> None:
    channel, harness, gate = gated
    gate.backlog_limit = BacklogLimit(ceiling=10, floor=2, target_s=0.1)
    harness.active = 5
    assert await channel.unary_unary(UNARY)(b"", timeout=5) == OK
    gate.backlog_limit.sample(1.0, active=5)  # a long wait: limit 4 < 5 open
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(UNARY)(b"", timeout=5)
    _overloaded(caught.value)


# ---- BacklogProbe --------------------------------------------------------------------------


def test_probe_delay_is_the_last_wait_or_the_age_of_the_one_out() -> None:
    now = [100.0]
    probe = BacklogProbe("127.0.0.1:1", clock=lambda: now[0])
    assert probe.delay() == 0.0
    probe.last_s = 0.05
    assert probe.delay() == 0.05
    probe._sent_at = 99.0  # a probe out for a second already
    assert probe.delay() == pytest.approx(1.0)


async def test_probe_measures_how_long_a_new_call_waits_to_be_taken() -> None:
    """A server whose loop is blocked cannot take new calls: the probe's delay grows
    with the block, and comes back down once the server takes calls again."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    probe = BacklogProbe(f"127.0.0.1:{port}", interval_s=0.02)
    task = asyncio.create_task(probe.run())
    try:
        deadline = time.monotonic() + 10
        while probe.last_s == 0.0 or probe._sent_at is not None:  # one probe answered
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert probe.delay() < 0.5
        # Block the loop (server and probe share it) while a probe is out: it waits.
        while probe._sent_at is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0)
        time.sleep(0.4)  # noqa: ASYNC251  (on purpose: a saturated loop)
        assert probe.delay() >= 0.4
        while probe._sent_at is not None:  # ...and its round trip counted the block
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert probe.last_s >= 0.4
        deadline = time.monotonic() + 10
        while probe.delay() >= 0.3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)


# ---- the fair gate on a real server -------------------------------------------------------


class Slow:
    """An agent whose calls wait until released, so calls stay in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def Generate(self, request: Any, context: Any) -> Any:
        await self.release.wait()
        return pb.GenerateResponse(text="ok")

    async def StreamGenerate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self.release.wait()
        yield pb.StreamGenerateResponse(delta="chunk")


async def wait_until_async(check: Any) -> None:
    await eventually(check, 5, "calls in flight at the gate", interval=0.01)


def _cause(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None and err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == "OVERLOADED"
    assert status.details[1].Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    return info.metadata["cause"]


async def test_fair_gate_refuses_the_heavy_caller_and_admits_the_light_one() -> None:
    agent = Slow()
    refused: list[tuple[str, str, str]] = []
    gate = OverloadGate(
        active=lambda: 0, capacity=100, on_reject=lambda *a: refused.append(a), reserve=0.9
    )  # limit 10
    async with channel_for(agent, gate=gate) as channel:
        generate = channel.unary_unary(UNARY)
        heavy = [
            asyncio.ensure_future(generate(b"", metadata=(("x-client-id", "heavy"),), timeout=10))
            for _ in range(10)
        ]
        await wait_until_async(lambda: gate.shedder.in_flight == 10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(b"", metadata=(("x-client-id", "heavy"),), timeout=5)
        assert _cause(caught.value) == "over_share"
        light = asyncio.ensure_future(
            generate(b"", metadata=(("x-client-id", "light"),), timeout=10)
        )
        await wait_until_async(lambda: gate.shedder.in_flight == 11)
        agent.release.set()
        assert await light == OK and all(r == OK for r in await asyncio.gather(*heavy))
    assert refused == [(UNARY, "over_share", "default")]
    assert gate.shedder.in_flight == 0 and len(gate.shedder) == 0  # every place released


class Held:
    """An agent whose calls each wait for their own release, in the order they came."""

    def __init__(self) -> None:
        self.calls: list[asyncio.Event] = []

    async def Generate(self, request: Any, context: Any) -> Any:
        done = asyncio.Event()
        self.calls.append(done)
        await done.wait()
        return pb.GenerateResponse(text="ok")

    def release_all(self) -> None:
        for done in self.calls:
            done.set()


def _share_gate(
    share_wait_s: float, refused: list[tuple[str, str, str]], min_share: int = 6
) -> OverloadGate:
    """Limit 10, callers told apart by the edge's address header (loopback is the edge);
    min_share 6, so a caller holding 10 (< 2 x 6) still counts as a handful that waits."""
    identity = CallerIdentity(
        address_header="x-envoy-external-address",
        trusted_edges=(ipaddress.ip_network("127.0.0.0/8"),),
    )
    return OverloadGate(
        active=lambda: 0, capacity=100, reserve=0.9, identity=identity,
        on_reject=lambda *a: refused.append(a), share_wait_s=share_wait_s,
        min_share=min_share,
    )  # fmt: skip


def _from(address: str) -> tuple[tuple[str, str], ...]:
    return (("x-envoy-external-address", address),)


async def _hold(generate: Any, agent: Held, address: str, n: int) -> list[asyncio.Future[Any]]:
    """`n` calls from `address`, once all are held by the agent (in flight at the gate)."""
    calls = [
        asyncio.ensure_future(generate(b"", metadata=_from(address), timeout=60)) for _ in range(n)
    ]
    await wait_until_async(lambda: len(agent.calls) == n)
    return calls


async def test_a_call_over_its_share_waits_for_one_of_its_own_calls_and_is_admitted() -> None:
    """Calls that reach the gate together take their caller's own slots in turn: another
    caller's call ending never lets it in, one of its own does."""
    agent, refused = Held(), []
    gate = _share_gate(30.0, refused)
    async with channel_for(agent, gate=gate) as channel:
        generate = channel.unary_unary(UNARY)
        heavy = await _hold(generate, agent, "10.0.0.1", 10)
        over = asyncio.ensure_future(generate(b"", metadata=_from("10.0.0.1"), timeout=60))
        await wait_until_async(lambda: gate.shedder.waiters() == 1)
        other = asyncio.ensure_future(generate(b"", metadata=_from("10.0.0.2"), timeout=60))
        await wait_until_async(lambda: len(agent.calls) == 11)  # under its share: admitted
        agent.calls[10].set()
        assert await other == OK
        assert gate.shedder.waiters() == 1 and len(agent.calls) == 11  # still waiting
        agent.calls[0].set()  # one of its own ends: its place is taken by the waiter
        ended, _ = await asyncio.wait(heavy, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert [t.result() for t in ended] == [OK]
        await wait_until_async(lambda: len(agent.calls) == 12)
        assert gate.shedder.waiters() == 0
        agent.release_all()
        assert await over == OK and all(r == OK for r in await asyncio.gather(*heavy))
    assert refused == []
    assert gate.shedder.in_flight == 0 and gate.shedder.waiters() == 0


async def test_a_call_whose_own_calls_do_not_end_is_refused_after_the_wait() -> None:
    agent, refused = Held(), []
    gate = _share_gate(0.2, refused)
    async with channel_for(agent, gate=gate) as channel:
        generate = channel.unary_unary(UNARY)
        heavy = await _hold(generate, agent, "10.0.0.1", 10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(b"", metadata=_from("10.0.0.1"), timeout=60)
        assert _cause(caught.value) == "over_share"
        # A deadline shorter than the wait: refused in time to be told why, at half of it.
        gate.share_wait_s = 30.0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(b"", metadata=_from("10.0.0.1"), timeout=2)
        assert _cause(caught.value) == "over_share"
        # A caller that gives up while waiting leaves nothing behind.
        gone = asyncio.ensure_future(generate(b"", metadata=_from("10.0.0.1"), timeout=60))
        await wait_until_async(lambda: gate.shedder.waiters() == 1)
        gone.cancel()
        await wait_until_async(lambda: gate.shedder.waiters() == 0)
        agent.release_all()
        assert all(r == OK for r in await asyncio.gather(*heavy))
    assert [cause for _, cause, _ in refused] == ["over_share", "over_share"]
    assert gate.shedder.in_flight == 0 and len(agent.calls) == 10


async def test_a_caller_holding_more_than_a_handful_is_refused_without_waiting() -> None:
    """Past 2 x min_share calls a caller's calls are no bunch (and its streams would rarely
    end within the wait): refused at once, as before the share wait."""
    agent, refused = Held(), []
    gate = _share_gate(30.0, refused, min_share=2)  # 10 held >= 2 x 2
    async with channel_for(agent, gate=gate) as channel:
        generate = channel.unary_unary(UNARY)
        heavy = await _hold(generate, agent, "10.0.0.1", 10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            # Well inside the 30 s it would wait: a bound that only says it did not.
            await asyncio.wait_for(generate(b"", metadata=_from("10.0.0.1"), timeout=60), 10)
        assert _cause(caught.value) == "over_share"
        agent.release_all()
        assert all(r == OK for r in await asyncio.gather(*heavy))
    assert len(refused) == 1 and gate.shedder.waiters() == 0


async def test_no_more_calls_wait_than_the_ceiling_allows_in_flight() -> None:
    """Waiting is no way around server.max_active_calls: past `capacity` waiters, a call
    over its share is refused at once."""
    agent, refused = Held(), []
    gate = _share_gate(30.0, refused)
    gate.capacity = 3  # at most 3 waiters (the limit stays 10)
    async with channel_for(agent, gate=gate) as channel:
        generate = channel.unary_unary(UNARY)
        calls = [
            asyncio.ensure_future(generate(b"", metadata=_from("10.0.0.1"), timeout=60))
            for _ in range(13)
        ]
        await wait_until_async(lambda: len(agent.calls) == 10 and gate.shedder.waiters() == 3)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(b"", metadata=_from("10.0.0.1"), timeout=60)
        assert _cause(caught.value) == "over_share"

        def all_admitted() -> bool:  # the waiters are admitted as the others end
            agent.release_all()
            return len(agent.calls) == 13

        await wait_until_async(all_admitted)
        agent.release_all()
        assert all(r == OK for r in await asyncio.gather(*calls))
    assert len(refused) == 1 and gate.shedder.waiters() == 0


async def test_one_caller_cannot_take_the_room_others_wait_in() -> None:
    """At most 4 x min_share calls of one caller wait (24 here); its next is refused at
    once, and the room left is everyone else's."""
    agent, refused = Held(), []
    gate = _share_gate(30.0, refused)  # min_share 6
    async with channel_for(agent, gate=gate) as channel:
        generate = channel.unary_unary(UNARY)
        heavy = await _hold(generate, agent, "10.0.0.1", 10)
        waiting = [
            asyncio.ensure_future(generate(b"", metadata=_from("10.0.0.1"), timeout=60))
            for _ in range(24)
        ]
        await wait_until_async(lambda: gate.shedder.waiters("peer:10.0.0.1") == 24)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(generate(b"", metadata=_from("10.0.0.1"), timeout=60), 10)
        assert _cause(caught.value) == "over_share"
        assert gate.shedder.waiters() == 24

        def all_admitted() -> bool:
            agent.release_all()
            return len(agent.calls) == 34

        await wait_until_async(all_admitted)
        agent.release_all()
        assert all(r == OK for r in await asyncio.gather(*heavy, *waiting))
    assert len(refused) == 1 and gate.shedder.waiters() == 0


async def test_a_stream_that_would_time_out_before_its_first_chunk_is_refused_at_the_door() -> None:
    agent = Slow()
    agent.release.set()
    gate = OverloadGate(active=lambda: 0, capacity=100)
    for _ in range(16):
        gate.first_chunk.sample(2.0)  # streams lately took 2 s to their first chunk
    async with channel_for(agent, gate=gate) as channel:
        stream = channel.unary_stream(STREAM)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream(b"", timeout=0.5):
                pass
        assert _cause(caught.value) == "deadline"
        assert [c async for c in stream(b"", timeout=10)] == [CHUNK]  # a long deadline
        assert [c async for c in stream(b"")] == [CHUNK]  # no deadline
    assert gate.shedder.in_flight == 0


async def test_the_probe_is_answered_at_once_and_not_counted() -> None:
    gate = OverloadGate(active=lambda: 0, capacity=1, probe_token="t0k3n")
    gate.shedder.in_flight = 1  # full: a real call would be refused
    async with channel_for(Slow(), gate=gate) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(UNARY)(
                b"", metadata=(("x-aiproxy-probe", "t0k3n"),), timeout=5
            )
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # a wrong token is a call
            await channel.unary_unary(UNARY)(b"", metadata=(("x-aiproxy-probe", "x"),), timeout=5)
        assert _cause(caught.value) == "full"
    assert gate.taken[UNARY] == 1


def test_a_verified_bearer_token_counts_under_its_identity_after_its_first_call() -> None:
    gate = OverloadGate(active=lambda: 0, capacity=10)
    headers = {"authorization": "Bearer abc"}
    group, key, cred, _ = gate.identity(headers, "ipv4:10.0.0.1:1")
    ticket = gate.shedder.admit(group, key)
    assert not isinstance(ticket, str)
    ticket.cred = cred
    gate.release(ticket, "sub:alice", "")
    assert gate.identity(headers, "ipv4:10.0.0.1:1")[0] == "sub:alice"
    # An identity auth did not verify ("peer:...") is never learned.
    other = {"authorization": "Bearer xyz"}
    group, key, cred, _ = gate.identity(other, "ipv4:10.0.0.1:1")
    ticket = gate.shedder.admit(group, key)
    assert not isinstance(ticket, str)
    ticket.cred = cred
    gate.release(ticket, "peer:10.0.0.1", "")
    assert gate.identity(other, "ipv4:10.0.0.1:1")[0] == "peer:10.0.0.1"


async def test_probe_only_methods_that_take_calls() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    taken = {"/a.S/Busy": 0, "/a.S/Idle": 0}
    probe = BacklogProbe(f"127.0.0.1:{port}", interval_s=0.01, paths=tuple(taken), taken=taken)
    sent = record_probes(probe)
    task = asyncio.create_task(probe.run())
    try:
        for i in range(20):
            taken["/a.S/Busy"] = i
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)
    # Only the method that takes calls is probed.
    assert sent.count("/a.S/Idle") == 0 and sent.count("/a.S/Busy") > 3
