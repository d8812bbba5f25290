"""What the stream pump costs per chunk, in one process, without gRPC.

    python -m bench.pumpcost [--chunks 100000]

An upstream whose every read completes the way a grpc.aio read does (a future resolved
from a loop callback, one pass of the event loop later) is read 1) by a plain loop, as the
bare hop's handler does, and 2) through `StreamPump.chunks()` (its reader task, the bounded
buffer, the hand-off to the caller's side, the renumbering), in alternation, twice each.
The difference is what the pump adds to a chunk; also timed: one async generator layer
around a stream, and the parse + renumber + serialize the proxy does to every chunk (the
bare hop relays bytes). CPU time of this process, microseconds per chunk; one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.settings import StreamSettings
from aiproxy.server.request.streaming import StreamPump


class LoopPassUpstream:
    """`n` chunks; each read takes one pass of the event loop, like a grpc read."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.i = 0
        self.chunk = pb.StreamGenerateResponse(delta="token ")

    def cancel(self) -> bool:
        return False

    async def read(self) -> Any:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.call_soon(done.set_result, None)
        await done
        self.i += 1
        return self.chunk if self.i <= self.n else None

    async def drain(
        self, offer: Callable[[Any], bool], space: Callable[[], Awaitable[None]]
    ) -> None:
        while (chunk := await self.read()) is not None:
            if not offer(chunk):
                await space()


async def _plain(n: int) -> int:
    upstream, count = LoopPassUpstream(n), 0
    while await upstream.read() is not None:
        count += 1
    return count


async def _pumped(n: int) -> int:
    upstream, count = LoopPassUpstream(n), 0
    settings = StreamSettings(coalesce=False)
    async for _ in StreamPump(upstream, pb.StreamGenerateResponse, settings).chunks():
        count += 1
    return count


async def _layered(n: int) -> int:
    async def source() -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def layer(inner: AsyncIterator[int]) -> AsyncIterator[int]:
        async for item in inner:
            yield item

    count = 0
    async for _ in layer(source()):
        count += 1
    return count


async def _bare_gen(n: int) -> int:
    async def source() -> AsyncIterator[int]:
        for i in range(n):
            yield i

    count = 0
    async for _ in source():
        count += 1
    return count


def _us_per(fn: Callable[[int], Any], n: int) -> float:
    t0 = time.process_time()
    got = asyncio.run(fn(n))
    assert got == n, (fn.__name__, got)
    return (time.process_time() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pumpcost", description=__doc__)
    parser.add_argument("--chunks", type=int, default=100_000)
    args = parser.parse_args(argv)
    n = args.chunks
    plain, pumped = [], []
    for _ in range(2):
        plain.append(_us_per(_plain, n))
        pumped.append(_us_per(_pumped, n))
    layer = _us_per(_layered, n) - _us_per(_bare_gen, n)
    raw = pb.StreamGenerateResponse(delta="token ", seq=3).SerializeToString()
    t0 = time.process_time()
    for _ in range(n):
        msg = pb.StreamGenerateResponse.FromString(raw)
        msg.seq = 5
        msg.SerializeToString()
    reencode = (time.process_time() - t0) / n * 1e6
    out = {
        "chunks": n,
        "plain_read_us": [round(x, 2) for x in plain],
        "through_pump_us": [round(x, 2) for x in pumped],
        "pump_adds_us": round(min(pumped) - min(plain), 2),
        "one_generator_layer_us": round(layer, 3),
        "parse_renumber_serialize_us": round(reencode, 3),
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
