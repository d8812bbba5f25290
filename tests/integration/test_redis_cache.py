"""The response cache's L2 on a real redis-server: two replicas (independent clients)
share answers, single flight per replica, fail-open to L1 when Redis goes away, and the
cost of a hit vs a miss in the store operations."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from aiproxy.core.cache import Decision, Entry, LruCache, Outcome, ResponseCache
from aiproxy.server.stores.redis_cache import RedisL2
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.support.waiting import eventually

CACHED = Decision(True, 60)


@pytest.fixture
async def replicas(
    redis_server: RedisServer,  # noqa: F811
) -> AsyncIterator[tuple[ResponseCache, ResponseCache]]:
    l2s = [RedisL2.from_url(redis_server.url, timeout_s=1.0) for _ in range(2)]
    yield ResponseCache(LruCache(1 << 20), l2s[0]), ResponseCache(LruCache(1 << 20), l2s[1])
    for l2 in l2s:
        await l2.aclose()


async def test_two_replicas_share_answers_through_l2(
    replicas: tuple[ResponseCache, ResponseCache],
) -> None:
    a, b = replicas
    calls = 0

    async def upstream() -> AsyncIterator[bytes]:
        nonlocal calls
        calls += 1
        for i in range(3):
            yield b"chunk-%d" % i

    outcome, chunks = await a.stream("k1", CACHED, upstream)
    assert outcome is Outcome.MISS and [c async for c in chunks] == [
        b"chunk-0",
        b"chunk-1",
        b"chunk-2",
    ]
    outcome, chunks = await b.stream("k1", CACHED, upstream)  # the other replica
    assert outcome is Outcome.HIT and [c async for c in chunks] == [
        b"chunk-0",
        b"chunk-1",
        b"chunk-2",
    ]
    assert calls == 1 and b.stats.hit_l2 == 1
    # Now in b's L1 too: served without Redis.
    outcome, _ = await b.stream("k1", CACHED, upstream)
    assert outcome is Outcome.HIT and b.stats.hit_l1 == 1
    # Another key (another tenant's scope makes another key) is a miss on both.
    outcome, chunks = await b.stream("k2", CACHED, upstream)
    assert outcome is Outcome.MISS
    await chunks.aclose()  # type: ignore[attr-defined]


async def test_fifty_concurrent_on_each_of_two_replicas(
    replicas: tuple[ResponseCache, ResponseCache],
) -> None:
    """Single flight is per replica; L2 makes the later calls hits everywhere."""
    calls = 0
    gate = asyncio.Event()

    async def loader() -> bytes:
        nonlocal calls
        calls += 1
        await gate.wait()
        return b"answer"

    tasks = [asyncio.create_task(r.unary("k", CACHED, loader)) for r in replicas for _ in range(50)]
    # Both replicas' loaders running, or (a replica joined the other's flight) 10 s passed.
    with contextlib.suppress(AssertionError):
        await eventually(lambda: calls >= 2, 10, interval=0.01)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert 1 <= calls <= 2  # at most one per replica
    assert {r[1] for r in results} == {b"answer"}


async def test_fail_open_to_l1_when_redis_goes_away(redis_server: RedisServer) -> None:  # noqa: F811
    l2 = RedisL2.from_url(redis_server.url, timeout_s=0.2, probe_interval_s=0.3)
    cache = ResponseCache(LruCache(1 << 20), l2)
    try:
        await cache.store("k", Entry((b"v",)), 60)
        redis_server.stop()
        assert await cache.lookup("k") == Entry((b"v",))  # L1
        start = time.monotonic()
        assert await cache.lookup("other") is None  # the failing call: bounded
        assert not l2.healthy
        for _ in range(20):  # while degraded: no wait at all
            assert await cache.lookup("other") is None
        await cache.store("k3", Entry((b"w",)), 60)  # L1 only, no error
        assert time.monotonic() - start < 2.0
        assert await cache.lookup("k3") == Entry((b"w",))
        redis_server.start()
        deadline = time.monotonic() + 20
        while not l2.healthy:
            assert time.monotonic() < deadline
            await cache.lookup("probe")
            await asyncio.sleep(0.1)
    finally:
        await l2.aclose()


async def test_hit_vs_miss_cost(redis_server: RedisServer) -> None:  # noqa: F811
    """The store operations' cost (figures for the report; asserts only sanity)."""
    l2 = RedisL2.from_url(redis_server.url, timeout_s=1.0)
    cache = ResponseCache(LruCache(1 << 24), l2)
    other = ResponseCache(LruCache(1 << 24), l2)
    entry = Entry(tuple(b"x" * 40 for _ in range(50)), stream=True)  # ~2 kB, 50 chunks
    n = 300
    try:
        await cache.store("warm", entry, 60)

        async def timed(op: object) -> float:
            for i in range(20):  # warm: connection, script cache, allocator
                await op(i)  # type: ignore[operator]
            start = time.perf_counter()
            for i in range(n):
                await op(i)  # type: ignore[operator]
            return (time.perf_counter() - start) / n * 1e6

        store_us = await timed(lambda i: cache.store(f"k{i}", entry, 60))
        l1_us = await timed(lambda i: cache.lookup(f"k{i}"))
        l2_us = await timed(lambda i: other.lookup(f"k{i}"))  # other's L1 is empty
        miss_us = await timed(lambda i: other.lookup(f"absent{i}"))
        print(
            f"\ncache cost per call (us): L1 hit {l1_us:.1f}, L2 hit {l2_us:.1f} "
            f"(2 kB, 50 chunks), miss lookup {miss_us:.1f}, store L1+L2 {store_us:.1f}"
        )
        assert other.stats.hit_l2 == n
        assert l1_us < l2_us
    finally:
        await l2.aclose()
