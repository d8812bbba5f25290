"""What Envoy's http.max_requests_per_io_cycle costs a caller that multiplexes many streams
on one connection (a backend service on one gRPC channel): 1,000 streams at once on one
connection through `aiproxy envoy`, with the turn limit at 1 (the edge's default) and 0
(Envoy's default, no limit), rounds alternated; first-chunk latency and wall time.

    flock /work/load.lock .venv/bin/python -m bench.edge_mux [--streams 1000] [--rounds 3]

One reference agent (20 ms to the first token and between tokens, 10 tokens), one proxy
with admission far above the load (nothing refused), two Envoys (2 workers each) in front
of it. docs/overload.md, "Through Envoy", quotes a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from bench.procs import Procs, aiproxy_argv

PROXY_ENV = {
    "AIPROXY_LIMITS__RATE_PER_S": "1000000",
    "AIPROXY_LIMITS__BURST": "1000000",
    "AIPROXY_LIMITS__MAX_STREAMS_PER_CALLER": "1000000",
    "AIPROXY_LIMITS__MAX_CONCURRENT_CALLS": "1000000",
    "AIPROXY_SERVER__MAX_ACTIVE_CALLS": "1000000",
    "AIPROXY_SERVER__OVERLOAD_WAIT_TARGET_MS": "0",
    "AIPROXY_LOG__ACCESS": "false",
}


async def one_connection(address: str, streams: int) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(address)  # one channel: one HTTP/2 connection
    try:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.AgentServiceStub(channel)
        request = pb.StreamGenerateRequest(
            prompt="mux", options=pb.GenerationOptions(max_tokens=10)
        )

        async def one() -> tuple[float | None, str]:
            started, first = time.monotonic(), None
            try:
                async for _ in stub.StreamGenerate(request, timeout=60):
                    if first is None:
                        first = time.monotonic() - started
            except grpc.aio.AioRpcError as err:
                return first, err.code().name
            return first, "OK"

        await asyncio.gather(*(one() for _ in range(20)))  # warm up
        t0 = time.monotonic()
        results = await asyncio.gather(*(one() for _ in range(streams)))
        wall = time.monotonic() - t0
    finally:
        await channel.close()
    firsts = sorted(f for f, _ in results if f is not None)
    return {
        "wall_s": round(wall, 2),
        "ttfc_p50_ms": round(1000 * firsts[len(firsts) // 2]) if firsts else None,
        "ttfc_p99_ms": round(1000 * firsts[int(0.99 * (len(firsts) - 1))]) if firsts else None,
        "not_ok": sum(1 for _, code in results if code != "OK"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.edge_mux", description=__doc__)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    procs = Procs()
    try:
        agent = procs.start(
            "agent",
            aiproxy_argv(
                "agent", "--listen", "127.0.0.1:0", "--token-delay-ms", "20",
                "--first-token-delay-ms", "20",
            ),
        )  # fmt: skip
        proxy = procs.start(
            "proxy",
            aiproxy_argv("serve", "--listen", "127.0.0.1:0", "--upstream", agent.address),
            env=PROXY_ENV,
        )
        edges = {}
        for turns in ("1", "0"):
            argv = aiproxy_argv(
                "envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address,
                "--concurrency", "2", "--max-requests-per-io-cycle", turns, "--log-level", "error",
            )  # fmt: skip
            edges[turns] = procs.start("envoy", argv)
        for n in range(args.rounds):
            for turns, edge in edges.items():
                row = asyncio.run(one_connection(edge.address, args.streams))
                print(json.dumps({"max_requests_per_io_cycle": turns, "round": n, **row}))
    finally:
        procs.cleanup()


if __name__ == "__main__":
    main()
