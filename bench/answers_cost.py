"""The cost of a cache hit vs a miss, of a resumable stream, and the memory a buffered
stream holds (issue 16), measured on real processes: one agent, one proxy.

    .venv/bin/python -m bench.answers_cost [--calls 200] [--redis-url URL|start]

Sequential calls (one at a time: the figure is per call, not a throughput), each phase
`--calls` times; for each: the caller's median latency and the proxy's CPU per call
(/proc/<pid>/stat). Phases: unary and stream misses (a new prompt each time, stored),
unary and stream hits (the same prompt), plain streams vs resumable ones (recorded in the
stream buffer), and resumes of finished streams (a replay: no upstream call). Then the
proxy's RSS growth per finished resumable stream held in the memory buffer. With
--redis-url the stream buffer and the cache's L2 are on that Redis (the process's CPU then
includes the client side of each Redis round trip). Figures are noisy on a shared box.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from bench.procs import Proc, Procs, aiproxy_argv

CACHED = (("cache-control", "max-age=600"),)


async def _phase(
    proxy: Proc, calls: int, one: Callable[[int], Awaitable[None]]
) -> dict[str, float]:
    latencies = []
    cpu0 = proxy.cpu()
    for i in range(calls):
        start = time.perf_counter()
        await one(i)
        latencies.append(time.perf_counter() - start)
    cpu = proxy.cpu() - cpu0
    return {
        "median_ms": round(statistics.median(latencies) * 1000, 3),
        "proxy_cpu_us_per_call": round(cpu / calls * 1e6, 1),
    }


async def measure(proxy: Proc, calls: int, held_streams: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        stub = pb_grpc.AgentServiceStub(channel)

        def unary(prompt: str, md: tuple = CACHED) -> Awaitable[Any]:
            return stub.Generate(pb.GenerateRequest(prompt=prompt), metadata=md, timeout=30)

        async def stream(prompt: str, md: tuple = CACHED) -> list[Any]:
            call = stub.StreamGenerate(pb.StreamGenerateRequest(prompt=prompt), metadata=md)
            return [c async for c in call]

        await unary("warm up")
        await stream("warm up")
        out["unary_miss"] = await _phase(proxy, calls, lambda i: unary(f"unary miss {i}"))
        out["unary_hit"] = await _phase(proxy, calls, lambda i: unary("warm up"))
        out["stream_miss"] = await _phase(proxy, calls, lambda i: stream(f"stream miss {i}"))
        out["stream_hit"] = await _phase(proxy, calls, lambda i: stream("warm up"))
        out["stream_plain"] = await _phase(proxy, calls, lambda i: stream(f"p {i}", ()))
        sids: list[str] = []

        async def resumable(i: int) -> None:
            call = stub.StreamGenerate(
                pb.StreamGenerateRequest(prompt=f"r {i}"),
                metadata=(("x-aiproxy-resumable", "1"),),
            )
            [c async for c in call]
            sids.append(dict(await call.initial_metadata())["x-aiproxy-stream-id"])

        out["stream_resumable"] = await _phase(proxy, calls, resumable)

        async def resume(i: int) -> None:
            call = stub.StreamGenerate(
                pb.StreamGenerateRequest(prompt=f"r {i}"),
                metadata=(("x-aiproxy-resume", sids[i]), ("last-event-id", "0")),
            )
            [c async for c in call]

        out["stream_resume_replay"] = await _phase(proxy, calls, resume)

        # Memory per finished resumable stream held in the buffer (until its ttl_s).
        rss0 = proxy.rss()
        for i in range(held_streams):
            await resumable(calls + i)
        grown = proxy.rss() - rss0
        chunks = len(await stream("r 0", ()))
        out["buffered_stream_memory"] = {
            "streams": held_streams,
            "chunks_per_stream": chunks,
            "rss_growth_bytes_per_stream": round(grown / held_streams),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--held-streams", type=int, default=1000)
    parser.add_argument(
        "--redis-url", default=None, help="a URL, or 'start': Debian's redis-server"
    )
    args = parser.parse_args()
    procs = Procs()
    redis = None
    try:
        if args.redis_url == "start":
            from devtools.redis_server import RedisServer

            redis = RedisServer().start()
            args.redis_url = redis.url
        agent = procs.start(
            "agent",
            aiproxy_argv("agent", "--listen", "127.0.0.1:0", "--token-delay-ms", "0"),
        )
        env = {
            "AIPROXY_LIMITS__RATE_PER_S": "1000000",
            "AIPROXY_LIMITS__BURST": "1000000",
            "AIPROXY_LOG__ACCESS": "false",
        }
        if args.redis_url:
            env |= {
                "AIPROXY_REDIS__URL": args.redis_url,
                "AIPROXY_STREAM__RESUME__BACKEND": "redis",
                "AIPROXY_CACHE__BACKEND": "redis",
                "AIPROXY_REDIS__TIMEOUT_MS": "250",
            }
        proxy = procs.start(
            "proxy",
            aiproxy_argv("serve", "--listen", "127.0.0.1:0", "--upstream", agent.address),
            env=env,
        )
        result = asyncio.run(measure(proxy, args.calls, args.held_streams))
        result["backend"] = "redis" if args.redis_url else "memory"
        print(json.dumps(result, indent=2))
    finally:
        procs.cleanup()
        if redis is not None:
            redis.cleanup()


if __name__ == "__main__":
    main()
