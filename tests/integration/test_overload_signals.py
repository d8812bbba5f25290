"""The overload gate's limit follows what stream callers feel: streams in flight that go
silent past their own cadence lower it, and it climbs back once they are gone; steady slow
streams never count as late (interceptors/overload.OverloadGate.stream_lateness)."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request

import grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from tests.conftest import agent_args, proxy_args
from tests.support.waiting import eventually

TOP = 1800  # server.max_active_calls 2,000 x (1 - overload.reserve 0.1)


def _gauges(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=2).read().decode()
    out = {}
    for line in text.splitlines():
        for name in ("ai_proxy_overload_limit", "ai_proxy_overload_stream_lateness_seconds"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[1])
    return out


async def _stream(stub: pb_grpc.AgentServiceStub, tokens: int, md: tuple, timeout: float) -> str:
    request = pb.StreamGenerateRequest(
        prompt="cadence", options=pb.GenerationOptions(max_tokens=tokens)
    )
    try:
        async for _ in stub.StreamGenerate(request, metadata=md, timeout=timeout):
            pass
    except grpc.aio.AioRpcError as err:
        return err.code().name
    return "OK"


async def test_silent_streams_lower_the_limit_and_it_climbs_back(spawn) -> None:
    agent = spawn(*agent_args(token_delay_ms=10), name="agent")
    proxy = spawn(*proxy_args(agent.address), name="proxy")
    listening = proxy.wait_for_log(lambda line: line.get("event") == "metrics_listening")
    url = f"http://{listening['address']}/metrics"
    loop = asyncio.get_running_loop()

    async def gauges() -> dict[str, float]:
        return await loop.run_in_executor(None, _gauges, url)

    async with grpc.aio.insecure_channel(proxy.address) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        # Steady slow streams: a chunk every 300 ms for ~2.4 s. Never late.
        slow = [
            asyncio.create_task(_stream(stub, 8, (("x-fault-slow-ms", "300"),), 20))
            for _ in range(16)
        ]
        seen = []
        while not all(t.done() for t in slow):
            seen.append((await gauges())["ai_proxy_overload_stream_lateness_seconds"])
            await asyncio.sleep(0.1)
        assert [t.result() for t in slow] == ["OK"] * 16
        assert len(seen) >= 5 and max(seen) == 0.0, seen

        # Stuck streams: three chunks 10 ms apart, then nothing until their deadline.
        hang = (("x-fault-after", "3"), ("x-fault-hang", "1"))
        stuck = [asyncio.create_task(_stream(stub, 50, hang, 6)) for _ in range(16)]
        low = await eventually(
            lambda: _low(gauges), timeout=6, what="the limit below its top", interval=0.1
        )
        assert low["ai_proxy_overload_stream_lateness_seconds"] > 0.25, low
        assert [await t for t in stuck] == ["DEADLINE_EXCEEDED"] * 16

        # They are gone: with healthy streams in flight, the limit climbs back to its top.
        async def healthy() -> None:
            while True:
                await _stream(stub, 20, (), 20)

        keep = [asyncio.create_task(healthy()) for _ in range(2)]
        try:
            back = await eventually(
                lambda: _at_top(gauges), timeout=20, what="the limit back at its top", interval=0.2
            )
        finally:
            for t in keep:
                t.cancel()
            for t in keep:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        assert back["ai_proxy_overload_stream_lateness_seconds"] == 0.0


async def _low(gauges) -> dict[str, float] | None:  # type: ignore[no-untyped-def]
    g = await gauges()
    return g if g["ai_proxy_overload_limit"] < TOP else None


async def _at_top(gauges) -> dict[str, float] | None:  # type: ignore[no-untyped-def]
    g = await gauges()
    return g if g["ai_proxy_overload_limit"] >= TOP else None
