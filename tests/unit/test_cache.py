"""The response cache's pure parts and single flight: keys, cache-control, the LRU bound,
L1/L2, and 50 identical calls causing one upstream call, whatever the callers do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.cache import (
    CacheControl,
    Decision,
    Entry,
    L2Cache,
    LruCache,
    MemoryL2,
    Outcome,
    ProducerCancelled,
    ResponseCache,
    cache_key,
    canonical_request,
    decide,
    parse_cache_control,
)
from aiproxy.core.errors import UpstreamUnavailable
from tests.support.clock import FakeClock
from tests.support.waiting import eventually

CACHED = Decision(True, 60)


def request_type() -> type:
    """Any request message of the agent API with a map or repeated field is fine."""
    for name in dir(pb):
        if name.endswith("Request"):
            return getattr(pb, name)
    raise AssertionError("no request message in the agent API")


# ---- keys and cache-control -------------------------------------------------------------


def test_key_scope_method_and_canonical_bytes() -> None:
    req_type = request_type()
    a = req_type()
    b = req_type()
    b.ParseFromString(a.SerializeToString() + b"\xf8\x7f\x01")  # an unknown field 2047
    assert canonical_request(a) == canonical_request(b)
    k = cache_key("/m/A", "tenant-1", canonical_request(a))
    assert k == cache_key("/m/A", "tenant-1", canonical_request(b))
    assert k != cache_key("/m/A", "tenant-2", canonical_request(a))  # never across tenants
    assert k != cache_key("/m/B", "tenant-1", canonical_request(a))
    # Length-prefixed: moving a boundary makes another key.
    assert cache_key("ab", "c", b"") != cache_key("a", "bc", b"")
    assert len(k) == 64


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], CacheControl()),
        ([("cache-control", "max-age=30")], CacheControl(30)),
        ([("Cache-Control", "No-Cache, max-age=5")], CacheControl(5, no_cache=True)),
        ([("cache-control", "no-store")], CacheControl(no_store=True)),
        ([("cache-control", b"max-age=10"), ("cache-control", "max-age=3")], CacheControl(3)),
        ([("cache-control", "max-age=-1")], CacheControl()),
        ([("cache-control", "max-age=abc")], CacheControl()),
        ([("cache-control", "max-age=99999999999999")], CacheControl()),
        ([("cache-control", 'max-age="7"')], CacheControl(7)),
        ([("other", "max-age=30")], CacheControl()),
    ],
)
def test_parse_cache_control(
    headers: list[tuple[str, str | bytes]], expected: CacheControl
) -> None:
    assert parse_cache_control(headers) == expected


def test_decide() -> None:
    assert decide(CacheControl()) == Decision(False, 0)
    assert decide(CacheControl(), method_ttl_s=30) == Decision(True, 30)
    assert decide(CacheControl(120), method_ttl_s=30) == Decision(True, 120)
    assert decide(CacheControl(10**6), max_ttl_s=600) == Decision(True, 600)
    assert decide(CacheControl(0), method_ttl_s=30).bypass  # max-age=0: not cached
    assert decide(CacheControl(30, no_store=True)).bypass
    assert decide(CacheControl(30, no_cache=True)) == Decision(False, 30)  # refresh


def test_entry_encoding_round_trip_and_malformed() -> None:
    for entry in (Entry((b"one",)), Entry((b"a", b"", b"c" * 1000), stream=True), Entry(())):
        assert Entry.decode(entry.encode()) == entry
    blob = Entry((b"abc",)).encode()
    for bad in (b"", blob[:-1], blob + b"x", b"\x09" + blob[1:]):
        assert Entry.decode(bad) is None


# ---- L1 ---------------------------------------------------------------------------------


def test_lru_bounded_in_bytes_with_ttl() -> None:
    clock = FakeClock(100.0)
    lru = LruCache(1000, max_entry_bytes=400, clock=clock)
    big = Entry((b"x" * 300,))
    assert lru.put("a", big, 10) and lru.put("b", big, 10)
    assert lru.get("a") is not None  # a is now the most recent
    assert lru.put("c", big, 10)
    assert lru.nbytes <= 1000
    assert lru.get("b") is None and lru.get("a") is not None  # b was the LRU one
    assert not lru.put("huge", Entry((b"x" * 500,)), 10)  # over the per-entry bound
    clock.now += 10.5
    assert lru.get("a") is None and lru.get("c") is None
    assert lru.nbytes == 0 and len(lru) == 0


# ---- L1 + L2 ----------------------------------------------------------------------------


async def test_l2_hit_fills_l1_with_remaining_ttl() -> None:
    clock = FakeClock(100.0)
    l2 = MemoryL2(clock)
    assert isinstance(l2, L2Cache)
    writer = ResponseCache(LruCache(10_000, clock=clock), l2)
    reader = ResponseCache(LruCache(10_000, clock=clock), l2)
    await writer.store("k", Entry((b"answer",)), 10)
    clock.now += 4
    assert (await reader.lookup("k")) == Entry((b"answer",))
    assert reader.stats.hit_l2 == 1
    hit = reader.l1.get("k")
    assert hit is not None and hit[1] == pytest.approx(6)
    clock.now += 6.5
    assert await reader.lookup("k") is None


# ---- single flight ----------------------------------------------------------------------


class Upstream:
    """A fake upstream: counts calls, releases chunks when told, or fails."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error
        self.calls = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def produce(self) -> AsyncIterator[bytes]:
        self.calls += 1
        try:
            yield self.chunks[0]
            await self.release.wait()
            for c in self.chunks[1:]:
                yield c
            if self.error is not None:
                raise self.error
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def consume(cache: ResponseCache, key: str, up: Upstream) -> tuple[Outcome, list[bytes]]:
    outcome, chunks = await cache.stream(key, CACHED, up.produce)
    return outcome, [c async for c in chunks]


async def test_fifty_identical_streams_one_upstream_call_then_hits() -> None:
    cache = ResponseCache(LruCache(1 << 20))
    up = Upstream([b"c0", b"c1", b"final"])
    tasks = [asyncio.create_task(consume(cache, "k", up)) for _ in range(50)]
    await eventually(lambda: cache.in_flight and up.calls, 10, "the upstream call", interval=0)
    for _ in range(5):
        await asyncio.sleep(0)
    up.release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert up.calls == 1
    assert all(chunks == [b"c0", b"c1", b"final"] for _, chunks in results)
    outcomes = [o for o, _ in results]
    assert outcomes.count(Outcome.MISS) == 1 and outcomes.count(Outcome.SHARED) == 49
    assert {o.header for o in outcomes} == {"hit", "miss"}
    # Complete: stored; the next call is a hit, replayed at once.
    outcome, chunks = await consume(cache, "k", up)
    assert outcome is Outcome.HIT and chunks == [b"c0", b"c1", b"final"] and up.calls == 1


async def test_followers_get_the_same_error_and_nothing_is_stored() -> None:
    cache = ResponseCache(LruCache(1 << 20), MemoryL2())
    up = Upstream([b"c0", b"c1"], error=UpstreamUnavailable("upstream went away"))
    up.release.set()
    results = await asyncio.gather(
        *(consume(cache, "k", up) for _ in range(20)), return_exceptions=True
    )
    assert up.calls == 1
    assert all(isinstance(r, UpstreamUnavailable) for r in results)
    assert {r.message for r in results} == {"upstream went away"}  # type: ignore[union-attr]
    assert len({id(r) for r in results}) == 20  # one object each: no shared traceback
    assert await cache.lookup("k") is None and cache.in_flight == 0
    # The next call tries the upstream again.
    up.error = None
    outcome, chunks = await consume(cache, "k", up)
    assert outcome is Outcome.MISS and chunks == [b"c0", b"c1"] and up.calls == 2


async def test_cancelled_leader_neither_cancels_nor_hangs_the_followers() -> None:
    cache = ResponseCache(LruCache(1 << 20))
    up = Upstream([b"c0", b"c1", b"final"])
    leader = asyncio.create_task(consume(cache, "k", up))
    await eventually(lambda: up.calls, 10, "the leader's upstream call", interval=0)
    followers = [asyncio.create_task(consume(cache, "k", up)) for _ in range(10)]
    for _ in range(10):
        await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    up.release.set()
    results = await asyncio.wait_for(asyncio.gather(*followers), 10)
    assert all(r == (Outcome.SHARED, [b"c0", b"c1", b"final"]) for r in results)
    assert up.calls == 1 and up.cancelled == 0
    assert (await cache.lookup("k")) == Entry((b"c0", b"c1", b"final"), stream=True)


async def test_everyone_leaving_cancels_the_upstream_and_stores_nothing() -> None:
    cache = ResponseCache(LruCache(1 << 20))
    up = Upstream([b"c0", b"c1"])
    outcome, chunks = await cache.stream("k", CACHED, up.produce)
    assert outcome is Outcome.MISS
    assert await anext(chunks) == b"c0"  # first chunk at once
    await chunks.aclose()  # type: ignore[attr-defined]
    await eventually(lambda: up.cancelled, what="the upstream cancelled")
    assert up.cancelled == 1  # truncated: the upstream stops, nothing is stored
    assert await cache.lookup("k") is None and cache.in_flight == 0


async def test_producer_cancelled_from_outside_is_an_error_for_followers() -> None:
    cache = ResponseCache(LruCache(1 << 20))
    up = Upstream([b"c0"])
    results = asyncio.gather(*(consume(cache, "k", up) for _ in range(3)), return_exceptions=True)
    await eventually(lambda: cache.in_flight and up.calls, 10, "the upstream call", interval=0)
    flight = cache._flights["k"]
    assert flight.task is not None
    flight.task.cancel()  # e.g. shutdown
    got = await asyncio.wait_for(results, 10)
    assert all(isinstance(r, ProducerCancelled) for r in got)


async def test_unary_single_flight_bypass_and_no_cache() -> None:
    cache = ResponseCache(LruCache(1 << 20))
    calls = 0
    gate = asyncio.Event()

    async def loader() -> bytes:
        nonlocal calls
        calls += 1
        await gate.wait()
        return b"answer-%d" % calls

    pending = [asyncio.create_task(cache.unary("k", CACHED, loader)) for _ in range(50)]
    await eventually(lambda: calls, 10, "the loader's first call", interval=0)
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*pending), 10)
    assert calls == 1 and {r[1] for r in results} == {b"answer-1"}
    assert (await cache.unary("k", CACHED, loader)) == (Outcome.HIT, b"answer-1")
    # no-cache: a fresh call, stored for the next one; no-store: neither.
    assert (await cache.unary("k", Decision(False, 60), loader)) == (Outcome.MISS, b"answer-2")
    assert (await cache.unary("k", CACHED, loader)) == (Outcome.HIT, b"answer-2")
    assert (await cache.unary("k", Decision(False, 0), loader)) == (Outcome.BYPASS, b"answer-3")
    assert (await cache.unary("k", CACHED, loader)) == (Outcome.HIT, b"answer-2")
    assert cache.stats.bypass == 1 and cache.stats.miss == 2
