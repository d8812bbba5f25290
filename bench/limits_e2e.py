"""The whole proxy's CPU and latency per call with `limits.backend: memory` vs `redis`, in
one run (issue 14: "the Redis round trip must not add more than about 20 % CPU per call").

    .venv/bin/python -m bench.limits_e2e [--calls 3000] [--concurrency 32] [--rounds 3]

One reference agent, two proxies in front of it that differ only in the limits backend
(Debian's redis-server on a free port for the second), the limits on and never refusing
(rate and token budgets far above the load, so every call is admitted, reserved and
settled). Rounds alternate between the two proxies so load drift on a shared machine hits
both alike; the median round is reported. Measured per path: the proxy process's CPU per
unary Generate at `--concurrency` in flight, the same for a short StreamGenerate with token
limits (admit + lease + reservation + settle), and the p50/p99 latency of a sequential caller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from bench.procs import Procs, aiproxy_argv, cpu_seconds
from devtools.redis_server import RedisServer

NEVER_REFUSES = {
    "AIPROXY_LIMITS__RATE_PER_S": "1000000000",
    "AIPROXY_LIMITS__BURST": "1000000000",
    "AIPROXY_LIMITS__MAX_STREAMS_PER_CALLER": "1000000",
    "AIPROXY_LIMITS__MAX_CONCURRENT_CALLS": "1000000",
    "AIPROXY_LIMITS__TOKENS_PER_MINUTE": "1000000000",
    "AIPROXY_LIMITS__TOKENS_PER_DAY": "1000000000",
    "AIPROXY_SERVER__OVERLOAD_WAIT_TARGET_MS": "0",
    "AIPROXY_METRICS__LISTEN": "127.0.0.1:0",
    "AIPROXY_LOG__ACCESS": "false",
}
UNARY = pb.GenerateRequest(prompt="limits cost", options=pb.GenerationOptions(max_tokens=8))
STREAM = pb.StreamGenerateRequest(prompt="limits cost", options=pb.GenerationOptions(max_tokens=8))


async def _load(address: str, calls: int, concurrency: int, stream: bool) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        api = pb_grpc.AgentServiceStub(channel)
        left = calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                if stream:
                    async for _ in api.StreamGenerate(STREAM, timeout=30):
                        pass
                else:
                    await api.Generate(UNARY, timeout=30)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _sequential(address: str, calls: int) -> list[float]:
    out = []
    async with grpc.aio.insecure_channel(address) as channel:
        api = pb_grpc.AgentServiceStub(channel)
        await api.Generate(UNARY, timeout=30)
        for _ in range(calls):
            start = time.perf_counter()
            await api.Generate(UNARY, timeout=30)
            out.append(time.perf_counter() - start)
    return out


def _cpu_per_call_us(pid: int, calls: int, run: Any) -> float:
    before = cpu_seconds(pid)
    asyncio.run(run)
    return (cpu_seconds(pid) - before) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    procs = Procs()
    redis = RedisServer().start()
    try:
        agent = procs.start(
            "agent",
            aiproxy_argv(
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--first-token-delay-ms",
                "0",
                "--token-delay-ms",
                "0",
            ),
        )
        proxies = {}
        for backend in ("memory", "redis"):
            env = {**NEVER_REFUSES, "AIPROXY_LIMITS__BACKEND": backend}
            if backend == "redis":
                env["AIPROXY_REDIS__URL"] = redis.url
            proxies[backend] = procs.start(
                f"proxy-{backend}",
                aiproxy_argv(
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--upstream",
                    agent.address,
                    "--metrics-listen",
                    "127.0.0.1:0",
                ),
                env=env,
            )
        rows: dict[str, dict[str, list[float]]] = {b: {} for b in proxies}
        for _ in range(args.rounds):
            for backend, proxy in proxies.items():
                row = rows[backend]
                for name, stream in (("unary_cpu_us", False), ("stream_cpu_us", True)):
                    run = _load(proxy.address, args.calls, args.concurrency, stream)
                    row.setdefault(name, []).append(_cpu_per_call_us(proxy.pid, args.calls, run))
                seq = asyncio.run(_sequential(proxy.address, args.sequential))
                row.setdefault("p50_ms", []).append(statistics.median(seq) * 1e3)
                row.setdefault("p99_ms", []).append(sorted(seq)[int(len(seq) * 0.99) - 1] * 1e3)
        result: dict[str, Any] = {
            b: {k: statistics.median(v) for k, v in row.items()} for b, row in rows.items()
        }
        for key in ("unary_cpu_us", "stream_cpu_us", "p50_ms"):
            result[f"redis_over_memory_{key}"] = result["redis"][key] / result["memory"][key]
        result["args"] = vars(args)
        print(json.dumps(result, indent=2))
    finally:
        procs.cleanup()
        redis.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
