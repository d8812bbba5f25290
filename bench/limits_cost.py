"""CPU per admission of the limits store backends (issue 14's "<= ~20 % CPU per call").

    .venv/bin/python -m bench.limits_cost [--calls 20000] [--concurrency 64] [--redis-url URL]

Measures this process's CPU (time.process_time) per `take`,
and per streaming call with token limits (take, lease, reserve, settle, release: five
operations; or `admit` + `finish`: two) for: the memory backend's sync
twin (`take_nowait`, today's path), its coroutine (`await take`), and the Redis backend
sequentially and with `--concurrency` tasks at once, with the hiredis parser and with
redis-py's pure-Python parser. Without --redis-url it starts Debian's redis-server on a free
port (devtools/redis_server.py). redis-server's own CPU is reported separately: it is
another process (on another core or host in production), not the proxy's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from redis._parsers import _AsyncRESP2Parser

from aiproxy.core.limitstore import MemoryLimitStore, TokenLimits
from aiproxy.core.ratelimit import LimitSpec
from aiproxy.server.stores.redis_limits import RedisLimitStore, client_from_url

SPEC = LimitSpec(1e9, 1_000_000_000)  # never refuses: measures the admission, not the refusal


def _server_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _started(store: RedisLimitStore) -> bool:
    await store.start()
    return store.healthy


async def _stream_call(store: Any, key: str, limits: TokenLimits) -> None:
    """Everything one streaming call with token limits asks of the store: 5 operations."""
    decision = await store.take(key, SPEC)
    lease = await store.acquire_stream(key, 1_000_000)
    reservation = await store.reserve_tokens(key, 100, limits)
    assert decision.allowed and lease is not None
    await store.settle_tokens(reservation, 80)
    await store.release_stream(lease)


async def _stream_call_admit(store: Any, key: str, limits: TokenLimits) -> None:
    """The same streaming call with `admit` and `finish`: one operation at each end."""
    admission = await store.admit(
        key, SPEC, stream_limit=1_000_000, tokens=100, token_limits=limits
    )
    assert admission.allowed
    await store.finish(admission.lease, admission.reservation, 80)


async def _run(op: Any, calls: int, concurrency: int) -> float:
    """Seconds of this process's CPU per call of `op(i)`."""
    per_task = calls // concurrency

    async def worker(w: int) -> None:
        for i in range(per_task):
            await op(w * per_task + i)

    for i in range(min(200, calls)):  # warm up: connections, script load
        await op(i)
    start = time.process_time()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return (time.process_time() - start) / (per_task * concurrency)


async def measure(url: str, calls: int, concurrency: int, server_pid: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"calls": calls, "concurrency": concurrency}
    mem = MemoryLimitStore()
    keys = [f"client:{i % 100}" for i in range(calls)]

    async def mem_sync(i: int) -> None:
        mem.take_nowait(keys[i], SPEC)

    async def mem_async(i: int) -> None:
        await mem.take(keys[i], SPEC)

    out["memory_take_nowait_us"] = await _run(mem_sync, calls, 1) * 1e6
    out["memory_await_take_us"] = await _run(mem_async, calls, 1) * 1e6
    limits = TokenLimits(10**12, 10**15)

    async def mem_tokens(i: int) -> None:
        r = mem.reserve_tokens_nowait(keys[i], 100, limits)
        mem.settle_tokens_nowait(r, 80)  # type: ignore[arg-type]

    out["memory_reserve_settle_us"] = await _run(mem_tokens, calls, 1) * 1e6

    async def mem_stream(i: int) -> None:
        await _stream_call(mem, keys[i], limits)

    out["memory_stream_call_us"] = await _run(mem_stream, calls, 1) * 1e6

    async def mem_admit(i: int) -> None:
        await _stream_call_admit(mem, keys[i], limits)

    out["memory_stream_call_admit_us"] = await _run(mem_admit, calls, 1) * 1e6

    for parser in ("hiredis", "python"):
        extra = {} if parser == "hiredis" else {"parser_class": _AsyncRESP2Parser}
        store = RedisLimitStore(client_from_url(url, **extra), timeout_s=1.0)
        while not store.healthy or not await _started(store):  # a loaded box: try again
            await asyncio.sleep(0.5)

        async def red(i: int) -> None:
            d = await store.take(keys[i], SPEC)
            assert d.allowed

        async def red_stream(i: int) -> None:
            await _stream_call(store, keys[i], limits)

        async def red_admit(i: int) -> None:
            await _stream_call_admit(store, keys[i], limits)

        async def red_tokens(i: int) -> None:
            r = await store.reserve_tokens(keys[i], 100, limits)
            await store.settle_tokens(r, 80)  # type: ignore[arg-type]

        for conc in (1, concurrency):
            cpu0 = _server_cpu_s(server_pid)
            wall0 = time.perf_counter()
            out[f"redis_{parser}_take_c{conc}_us"] = await _run(red, calls, conc) * 1e6
            wall = time.perf_counter() - wall0
            out[f"redis_{parser}_take_c{conc}_wall_us"] = wall / calls * 1e6
            out[f"redis_server_cpu_per_take_c{conc}_us"] = (
                (_server_cpu_s(server_pid) - cpu0) / calls * 1e6
            )
        out[f"redis_{parser}_reserve_settle_c1_us"] = await _run(red_tokens, calls // 2, 1) * 1e6
        for conc in (1, concurrency):
            out[f"redis_{parser}_stream_call_c{conc}_us"] = (
                await _run(red_stream, calls // 2, conc) * 1e6
            )
            out[f"redis_{parser}_stream_call_admit_c{conc}_us"] = (
                await _run(red_admit, calls // 2, conc) * 1e6
            )
        assert store.healthy, "the store degraded during the measurement"
        await store.aclose()
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    server = None
    if args.redis_url is None:
        from devtools.redis_server import RedisServer

        server = RedisServer().start()
    try:
        url = args.redis_url or server.url  # type: ignore[union-attr]
        result = asyncio.run(
            measure(url, args.calls, args.concurrency, server.pid if server else None)
        )
    finally:
        if server is not None:
            server.cleanup()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
