"""What wakes an idle proxy: nothing. The loops that measure traffic (the backlog probe,
the adaptive limit, the admin overview's sampler) park on the overload gate's
`next_call()` while there is nothing to measure, and the next call wakes them.

The gate runs on a real grpc.aio server on port 0; the loops are driven with a
stand-in for `next_call` that the test releases by hand.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.interceptors.overload import BacklogLimit, OverloadGate
from aiproxy.server.pool.backlog import BacklogProbe
from aiproxy.server.request import admin
from aiproxy.server.request.admin import OverviewSampler
from tests.support.pipeline import channel_for
from tests.support.probes import record_probes
from tests.support.waiting import eventually

UNARY = "/ai.agent.v1.AgentService/Generate"


class Idle:
    """Stands in for `gate.next_call`: counts the loop's pauses; `wake()` ends one."""

    def __init__(self) -> None:
        self.parked = 0
        self.woken = 0
        self._event = asyncio.Event()

    async def __call__(self) -> None:
        self.parked += 1
        self._event.clear()
        await self._event.wait()
        self.woken += 1

    @property
    def waiting(self) -> bool:
        return self.parked > self.woken

    def wake(self) -> None:
        self._event.set()


class Agent:
    async def Generate(self, request: Any, context: Any) -> Any:
        return pb.GenerateResponse(text="ok")

    def __getattr__(self, name: str) -> Any:
        return self.Generate


async def _stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# ---- the gate's wake-up -------------------------------------------------------------------


async def test_the_next_call_wakes_every_waiter_and_a_probe_wakes_none() -> None:
    gate = OverloadGate(active=lambda: 0, capacity=10, probe_token="t0k3n", policy="blind")
    async with channel_for(Agent(), gate=gate) as channel:
        waiters = [asyncio.create_task(gate.next_call()) for _ in range(3)]
        await asyncio.sleep(0)
        # The probe measures the queue; it is not traffic.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(UNARY)(
                b"", metadata=(("x-aiproxy-probe", "t0k3n"),), timeout=5
            )
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        for _ in range(5):
            await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        # One waiter cancelled (a loop stopping) leaves the others waiting.
        await _stop(waiters[0])
        assert not any(w.done() for w in waiters[1:])
        await channel.unary_unary(UNARY)(b"", timeout=5)
        await asyncio.wait_for(asyncio.gather(*waiters[1:]), 5)
        # The next pause waits for the next call, not the one already seen.
        again = asyncio.create_task(gate.next_call())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not again.done()
        await channel.unary_unary(UNARY)(b"", timeout=5)
        await asyncio.wait_for(again, 5)


# ---- the adaptive limit ----------------------------------------------------------------


async def test_the_adaptive_limit_parks_while_idle_and_samples_again_after_a_call() -> None:
    limit = BacklogLimit(ceiling=100, floor=4, target_s=0.1, interval_s=0.001)
    waits = [0.0]
    open_calls = [0]
    samples = [0]

    def delay() -> float:
        samples[0] += 1
        return waits[0]

    idle = Idle()
    task = asyncio.create_task(limit.run(delay, lambda: open_calls[0], idle))
    try:
        await eventually(lambda: idle.waiting, 5, "the limit's first pause")
        seen = samples[0]
        await asyncio.sleep(0.05)  # fifty intervals: none sampled while parked
        assert samples[0] == seen
        # A call arrives and stays open: sampled every interval, no pause.
        open_calls[0] = 3
        idle.wake()
        await eventually(lambda: samples[0] > seen + 10, 5, "sampling while calls are open")
        assert idle.parked == 1
        # A long wait drops the limit; with nothing open it climbs back before pausing.
        waits[0] = 1.0
        await eventually(lambda: limit.limit < 100, 5, "the limit to drop")
        open_calls[0] = 0
        waits[0] = 0.0
        await eventually(lambda: idle.waiting, 5, "the second pause")
        assert idle.parked == 2 and limit.limit == limit.ceiling
    finally:
        await _stop(task)


# ---- the backlog probe -----------------------------------------------------------------


async def test_the_probe_sleeps_until_a_call_arrives_then_measures_that_method() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    path = "/a.S/M"
    taken = {path: 0}
    in_flight = [0]
    idle = Idle()
    probe = BacklogProbe(
        f"127.0.0.1:{port}",
        # Long enough that the probe's own round trip never counts as a long wait (which
        # would be probed again at once).
        interval_s=0.1,
        paths=(path,),
        taken=taken,
        idle=idle,
        in_flight=lambda: in_flight[0],
    )
    sent = record_probes(probe)
    task = asyncio.create_task(probe.run())
    try:
        await eventually(lambda: idle.waiting, 5, "the probe's first pause")
        assert sent == []  # nothing taken: nothing probed
        taken[path] = 1  # a call reached the gate...
        idle.wake()  # ...and woke the loops
        await eventually(lambda: sent == [path], 5, "one probe of the method")
        await eventually(lambda: idle.parked == 2 and idle.waiting, 5, "the next pause")
        assert sent == [path]
        # With a call open (a long stream), no pause: it looks every interval.
        in_flight[0] = 1
        idle.wake()
        await eventually(lambda: idle.woken == 2, 5)
        await asyncio.sleep(0.3)  # three intervals
        assert idle.parked == 2 and sent == [path]
        in_flight[0] = 0
        await eventually(lambda: idle.parked == 3, 5, "a pause once nothing is open")
    finally:
        await _stop(task)
        await server.stop(None)


# ---- the admin overview's sampler -----------------------------------------------------------


async def test_the_sampler_sleeps_through_a_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "SAMPLE_INTERVAL_S", 0.005)
    endpoint = SimpleNamespace(total_calls=0, failed_calls=0)
    sampler = OverviewSampler(SimpleNamespace(endpoints={"a": endpoint}), None)  # type: ignore[arg-type]
    idle = Idle()
    in_flight = [0]
    task = asyncio.create_task(sampler.run(idle, lambda: in_flight[0]))
    try:
        await eventually(lambda: idle.waiting, 5, "the sampler's first pause")
        size = len(sampler._ring)
        await asyncio.sleep(0.05)
        assert len(sampler._ring) == size  # nothing sampled while parked
        idle.wake()
        in_flight[0] = 1  # the call that woke it is open
        await eventually(lambda: len(sampler._ring) > size + 3, 5, "sampling while busy")
        endpoint.total_calls = 1
        in_flight[0] = 0
        await eventually(lambda: idle.parked == 2 and idle.waiting, 5, "the second pause")
        assert sampler._ring[-1].by_endpoint == {"a": (1, 0)}
    finally:
        await _stop(task)


def test_rates_after_a_pause_count_from_the_sample_taken_on_waking() -> None:
    now = [0.0]
    endpoint = SimpleNamespace(total_calls=0, failed_calls=0)
    sampler = OverviewSampler(
        SimpleNamespace(endpoints={"a": endpoint}),  # type: ignore[arg-type]
        None,
        clock=lambda: now[0],
    )
    sampler.sample()
    now[0] = 1.0
    sampler.sample()  # flat: the sampler pauses here
    # Asked before the sampler woke: nothing moved through the pause, so no rates, over
    # the whole pause.
    now[0] = 100.0
    window, _, endpoints = sampler.rates()
    assert window == pytest.approx(99.0) and endpoints["a"] == (0.0, 0.0)
    # Woken at 100 (the counters as they stood), then 50 calls, 5 failed, by 105.
    sampler.sample()
    endpoint.total_calls, endpoint.failed_calls = 50, 5
    now[0] = 105.0
    window, _, endpoints = sampler.rates()
    assert window == pytest.approx(5.0)
    assert endpoints["a"] == (pytest.approx(10.0), pytest.approx(0.1))
