"""The Redis limits store against a real redis-server: exact across processes, K of N
token reservations, leases of a dead process lapse, and Redis failing mid-load."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from aiproxy.core.limitstore import (
    TOKENS_PER_DAY,
    LimitsUnavailable,
    MemoryLimitStore,
    Reservation,
    TokenLimits,
    TokenRejection,
)
from aiproxy.core.ratelimit import Decision, LimitSpec
from aiproxy.server.stores.redis_limits import Policy, RedisLimitStore
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.support.waiting import eventually, eventually_timed

PREFIX = "aiproxy:limits:"


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Poll until `predicate()`; the seconds it took."""
    _, took = await eventually_timed(predicate, timeout, interval=0.01)
    return took


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def limits_client(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.limits_client", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finished(proc: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, float]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


# ---- behaviour matches the memory backend ---------------------------------------------------


async def test_requests_tokens_and_leases_behave_like_the_memory_store(
    redis_server: RedisServer,  # noqa: F811
    raw: aioredis.Redis,
) -> None:
    store = RedisLimitStore.from_url(redis_server.url, timeout_s=1.0)
    await store.start()
    try:
        spec = LimitSpec(rate_per_s=1, burst=3)
        started = time.monotonic()
        decisions = [await store.take("client:a", spec) for _ in range(4)]
        took = time.monotonic() - started
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert decisions[3].limit == 3 and decisions[3].remaining == 0
        # One token is 1 s away, less what refilled while the four takes ran (a fixed 0.9
        # failed when a loaded box made them slow); 10 ms for Redis's clock resolution.
        assert 1.0 - took - 0.01 < decisions[3].retry_after_s <= 1.0
        assert (await store.take("client:b", spec)).allowed  # per key

        limits = TokenLimits(per_minute=1000, per_day=1500)
        r = await store.reserve_tokens("sub:a", 900, limits, budget_key="tenant:t")
        assert isinstance(r, Reservation)
        assert r.budget.minute_remaining == 100 and r.budget.day_remaining == 600
        refused = await store.reserve_tokens("sub:b", 700, limits, budget_key="tenant:t")
        assert isinstance(refused, TokenRejection) and refused.quota == TOKENS_PER_DAY
        assert 0 < refused.retry_after_s <= 86_400  # at 00:00 UTC
        # All or nothing: sub:b's per-minute bucket was not touched by the refusal.
        ok = await store.reserve_tokens("sub:b", 600, limits, budget_key="tenant:t")
        assert isinstance(ok, Reservation) and ok.budget.minute_remaining == 400
        assert ok.budget.day_remaining == 0

        await store.settle_tokens(r, 100)  # used 800 less than reserved
        await store.settle_tokens(r, 100)  # once
        again = await store.reserve_tokens("sub:c", 800, limits, budget_key="tenant:t")
        assert isinstance(again, Reservation) and again.budget.day_remaining == 0
        await store.settle_tokens(ok, 600)
        await store.settle_tokens(again, 800)
        assert await raw.keys(f"{PREFIX}rsv:*") == []  # settled reservations leave nothing

        first = await store.acquire_stream("client:a", 1)
        assert first is not None and await store.acquire_stream("client:a", 1) is None
        await store.release_stream(first)
        await store.release_stream(first)
        second = await store.acquire_stream("client:a", 1)
        assert second is not None
        await store.release_stream(second)
        assert not await raw.exists(f"{PREFIX}streams:client:a")  # an empty set is no key
    finally:
        await store.aclose()


async def test_every_key_expires_so_idle_callers_cost_nothing(
    redis_server: RedisServer,  # noqa: F811
    raw: aioredis.Redis,
) -> None:
    store = RedisLimitStore.from_url(redis_server.url, timeout_s=1.0, lease_ttl_s=5.0)
    await store.start()
    try:
        await store.take("client:a", LimitSpec(rate_per_s=10, burst=20))  # full again in 0.1 s
        lease = await store.acquire_stream("client:a", 3)
        r = await store.reserve_tokens("client:a", 10, TokenLimits(per_minute=600, per_day=10**6))
        assert lease is not None and isinstance(r, Reservation)
        ttl = {k.decode(): await raw.pttl(k) for k in await raw.keys(f"{PREFIX}*")}
        assert all(v > 0 for v in ttl.values()), ttl  # no key lives forever
        assert ttl[f"{PREFIX}rate:client:a"] <= 101
        assert ttl[f"{PREFIX}streams:client:a"] <= 5000
        assert ttl[f"{PREFIX}tpm:client:a"] <= 1001  # 10 tokens at 10/s
        assert 0 < ttl[f"{PREFIX}day:client:a:{r.day}"] <= (86_400 + 3600) * 1000
        await store.release_stream(lease)
        await store.settle_tokens(r, 10)
    finally:
        await store.aclose()


async def test_scripts_are_loaded_again_after_redis_forgot_them(
    redis_server: RedisServer,  # noqa: F811
    raw: aioredis.Redis,
) -> None:
    store = RedisLimitStore.from_url(redis_server.url, timeout_s=1.0)
    await store.start()
    try:
        assert (await store.take("a", LimitSpec(1, 5))).allowed
        await raw.script_flush()  # what a Redis restart or failover does
        decision = await store.take("a", LimitSpec(1, 5))
        assert decision.allowed and decision.remaining == 3 and store.healthy
    finally:
        await store.aclose()


# ---- exact across processes -----------------------------------------------------------------


def test_two_processes_hammering_one_key_admit_what_one_process_would(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    # The burst holds 2 s of refill, so a process starved of CPU for up to 2 s (this box is
    # shared) loses no tokens and the lower bound stays tight.
    rate, burst, seconds = 20.0, 40, 2.0
    start_at = time.time() + 3.0  # both processes are up and connected by then
    procs = [
        limits_client("take", redis_server.url, "client:shared", str(rate), str(burst),
                      str(start_at), str(seconds))
        for _ in range(2)
    ]  # fmt: skip
    results = [finished(p) for p in procs]
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    expected = burst + rate * window  # what a single bucket admits over the window
    total = sum(r["allowed"] for r in results)
    assert all(r["allowed"] > 0 for r in results)  # both were served
    # Exact within one refill interval up (rounding) and a few polling gaps down; two
    # per-process buckets would admit about twice as much.
    assert expected - 5 <= total <= expected + 1, (total, expected, results)


def test_n_concurrent_reservations_from_two_processes_admit_exactly_k(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    start_at = time.time() + 3.0
    # 40 reservations of 100 tokens against a daily budget of 750: exactly 7 fit.
    procs = [
        limits_client("reserve", redis_server.url, "tenant:t", "100", "750", str(start_at), "20")
        for _ in range(2)
    ]
    admitted = sum(finished(p)["admitted"] for p in procs)
    assert admitted == 7


async def test_n_concurrent_per_minute_reservations_over_two_connections_admit_exactly_k(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    stores = [RedisLimitStore.from_url(redis_server.url, timeout_s=2.0) for _ in range(2)]
    try:
        for store in stores:
            await store.start()
        limits = TokenLimits(per_minute=750)
        results = await asyncio.gather(
            *(stores[i % 2].reserve_tokens("sub:a", 100, limits) for i in range(30))
        )
        assert sum(isinstance(r, Reservation) for r in results) == 7
    finally:
        for store in stores:
            await store.aclose()


# ---- stream leases across processes ---------------------------------------------------------


async def test_a_dead_holders_leases_lapse_within_seconds_a_live_ones_do_not(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    ttl = 1.0
    holder = limits_client("hold", redis_server.url, "client:x", "2", str(ttl))
    store = RedisLimitStore.from_url(redis_server.url, timeout_s=1.0, lease_ttl_s=ttl)
    try:
        assert holder.stdout is not None
        line = await asyncio.to_thread(holder.stdout.readline)
        assert json.loads(line) == {"held": 2}, holder.stderr.read() if holder.stderr else ""
        await store.start()
        # Alive, the holder renews: its slots stay taken for well past one TTL.
        deadline = time.monotonic() + 2.5 * ttl
        while time.monotonic() < deadline:
            assert await store.acquire_stream("client:x", 2) is None
            await asyncio.sleep(0.1)
        holder.kill()  # a replica that dies without releasing anything
        holder.wait(timeout=10)

        async def a_lease_is_free() -> object:
            return await store.acquire_stream("client:x", 2)

        await eventually(
            a_lease_is_free, ttl + 3.0, "the dead holder's leases to lapse", interval=0.05
        )
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=10)  # reaps it and closes its pipes
        await store.aclose()


# ---- Redis failing mid-load -----------------------------------------------------------------


def transitions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        getattr(rec, "event", "")
        for rec in caplog.records
        if rec.name == "aiproxy.limits" and getattr(rec, "event", "").startswith("limits_")
    ]


@pytest.mark.parametrize("failure", ["hang", "crash"])
@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_redis_failing_mid_load_no_call_hangs_the_policy_holds_and_it_recovers(
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    failure: str,
    policy: Policy,
) -> None:
    """hang: SIGSTOP (connections stay open, nothing answers; then SIGCONT);
    crash: SIGKILL (connections reset, then refused; then a restart on the same port)."""
    caplog.set_level(logging.INFO, logger="aiproxy.limits")
    states: list[bool] = []
    bound = 0.2
    store = RedisLimitStore.from_url(
        redis_server.url, timeout_s=bound, probe_interval_s=0.1, processes=2,
        policy=policy, on_state=states.append,
    )  # fmt: skip
    await store.start()
    spec = LimitSpec(rate_per_s=10_000, burst=1000)
    outcomes: list[Decision | LimitsUnavailable] = []
    slowest = [0.0]
    running = True

    async def caller(i: int) -> None:
        while running:
            start = time.monotonic()
            try:
                outcomes.append(await store.take(f"client:{i % 4}", spec))
            except LimitsUnavailable as exc:
                outcomes.append(exc)
            slowest[0] = max(slowest[0], time.monotonic() - start)
            await asyncio.sleep(0.002)

    def more(n: int) -> Callable[[], bool]:
        seen = len(outcomes)
        return lambda: len(outcomes) > seen + n

    tasks = [asyncio.create_task(caller(i)) for i in range(16)]
    try:
        await wait_for(more(100))
        last = outcomes[-1]
        assert isinstance(last, Decision) and last.limit == 1000 and states == []
        if failure == "hang":
            redis_server.pause()
        else:
            redis_server.kill()
        await wait_for(lambda: states == [False])
        await wait_for(more(200))  # calls go on while Redis is away, none waits for it
        recent = outcomes[-50:]
        if policy == "fail_open":  # served from the local share: burst/N
            assert all(isinstance(o, Decision) and o.limit == 500 and o.allowed for o in recent)
        else:  # refused, with the probe interval as the retry hint
            assert all(isinstance(o, LimitsUnavailable) for o in recent)
            assert recent[-1].retry_delay_s == pytest.approx(0.1)  # type: ignore[union-attr]
            with pytest.raises(LimitsUnavailable):
                await store.admit("client:x", spec, stream_limit=2)
            with pytest.raises(LimitsUnavailable):
                await store.reserve_tokens("client:x", 10, TokenLimits(per_minute=100))
        if failure == "hang":
            redis_server.resume()
        else:
            redis_server.start()  # the same port: clients keep their URL
        await wait_for(lambda: states == [False, True], timeout=20)
        await wait_for(more(200))
        last = outcomes[-1]
        assert isinstance(last, Decision) and last.limit == 1000  # shared again
    finally:
        running = False
        await asyncio.gather(*tasks)
        await store.aclose()
    # No call waited much past the bound (generous margin for a loaded 2-core machine).
    assert slowest[0] < bound + 1.0, slowest[0]
    assert transitions(caplog) == ["limits_degraded", "limits_recovered"]  # not per call
    assert states == [False, True]


async def test_settles_that_missed_redis_are_replayed_once_on_recovery(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    states: list[bool] = []
    store = RedisLimitStore.from_url(
        redis_server.url, timeout_s=0.2, probe_interval_s=0.1, on_state=states.append
    )
    await store.start()
    limits = TokenLimits(per_day=1000)
    try:
        r = await store.reserve_tokens("client:a", 500, limits)
        assert isinstance(r, Reservation)
        redis_server.pause()
        await store.settle_tokens(r, 100)  # times out: kept for later
        await store.settle_tokens(r, 100)  # counted once all the same
        assert states == [False]
        redis_server.resume()
        await wait_for(lambda: states == [False, True], timeout=20)
        after = await store.reserve_tokens("client:a", 0, limits)
        assert isinstance(after, Reservation)
        assert after.budget.day_remaining == 900  # 500 reserved, 400 given back, once
    finally:
        await store.aclose()


async def test_a_clean_shutdown_frees_its_leases_at_once(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    first = RedisLimitStore.from_url(redis_server.url, timeout_s=1.0, lease_ttl_s=30.0)
    second = RedisLimitStore.from_url(redis_server.url, timeout_s=1.0, lease_ttl_s=30.0)
    try:
        await first.start()
        await second.start()
        assert await first.acquire_stream("client:a", 1) is not None
        assert await second.acquire_stream("client:a", 1) is None
        await first.aclose()  # not released by the caller: the store frees it on the way out
        assert await second.acquire_stream("client:a", 1) is not None  # not 30 s later
        # Calls without token limits cost no round trip and are never refused.
        free = await second.reserve_tokens("client:a", 10**9, TokenLimits())
        assert isinstance(free, Reservation)
        await second.settle_tokens(free, 10)
    finally:
        await first.aclose()
        await second.aclose()


# ---- one round trip per call at each end ----------------------------------------------------


async def test_admit_and_finish_match_the_memory_store_in_one_round_trip_each(
    redis_server: RedisServer,  # noqa: F811
    raw: aioredis.Redis,
) -> None:
    store = RedisLimitStore.from_url(redis_server.url, timeout_s=1.0)
    memory = MemoryLimitStore()
    await store.start()
    try:
        spec = LimitSpec(rate_per_s=1, burst=4)
        limits = TokenLimits(per_minute=1000, per_day=1200)
        for backend in (memory, store):
            a = await backend.admit("a", spec, stream_limit=1, tokens=800, token_limits=limits)
            assert a.allowed and a.lease is not None and a.reservation is not None
            assert a.decision.remaining == 3
            assert a.reservation.budget.minute_remaining == 200
            assert a.reservation.budget.day_remaining == 400
            streams = await backend.admit("a", spec, stream_limit=1, tokens=1, token_limits=limits)
            assert streams.refused == "streams"
            day = await backend.admit("a", spec, stream_limit=2, tokens=500, token_limits=limits)
            assert day.refused == TOKENS_PER_DAY and day.lease is None
            assert day.rejection is not None and day.rejection.budget.day_remaining == 400
            await backend.finish(a.lease, a.reservation, 50)  # a stream cancelled early
            await backend.finish(a.lease, a.reservation, 50)  # once
            again = await backend.admit("a", spec, stream_limit=1, tokens=10, token_limits=limits)
            assert again.allowed and again.decision.remaining == 0
            assert again.reservation is not None
            assert again.reservation.budget.day_remaining == 1200 - 50 - 10
            rate = await backend.admit("a", spec)
            assert rate.refused == "rate" and rate.decision.retry_after_s > 0
            await backend.finish(again.lease, again.reservation, 10)
        assert await raw.keys(f"{PREFIX}rsv:*") == []
        assert not await raw.exists(f"{PREFIX}streams:a")
    finally:
        await store.aclose()


async def test_n_concurrent_admissions_over_two_connections_admit_exactly_k(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    stores = [RedisLimitStore.from_url(redis_server.url, timeout_s=2.0) for _ in range(2)]
    try:
        for store in stores:
            await store.start()
        spec = LimitSpec(rate_per_s=1, burst=1000)
        # 40 streams against 5 slots and a budget that fits 7 reservations: 5 admitted
        # (the slot is checked first), and no refused call kept tokens or a slot.
        results = await asyncio.gather(
            *(
                stores[i % 2].admit(
                    "sub:a",
                    spec,
                    stream_limit=5,
                    tokens=100,
                    token_limits=TokenLimits(per_day=700),
                )
                for i in range(40)
            )
        )
        admitted = [r for r in results if r.allowed]
        assert len(admitted) == 5
        assert {r.refused for r in results if not r.allowed} == {"streams"}
        probe = await stores[0].reserve_tokens("sub:a", 0, TokenLimits(per_day=700))
        assert isinstance(probe, Reservation) and probe.budget.day_remaining == 200
    finally:
        for store in stores:
            await store.aclose()


async def test_admit_under_fail_open_uses_the_local_share_and_finish_frees_it(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    store = RedisLimitStore.from_url(
        redis_server.url, timeout_s=0.2, probe_interval_s=0.1, processes=2
    )
    await store.start()
    try:
        redis_server.kill()
        spec = LimitSpec(rate_per_s=100, burst=10)
        limits = TokenLimits(per_minute=1000)
        first = await store.admit("a", spec, stream_limit=4, tokens=400, token_limits=limits)
        assert first.allowed and not store.healthy
        assert first.decision.limit == 5  # burst 10 over 2 processes
        assert first.reservation is not None and first.reservation.budget.minute_limit == 500
        second = await store.admit("a", spec, stream_limit=4, tokens=1, token_limits=limits)
        assert second.allowed
        third = await store.admit("a", spec, stream_limit=4)
        assert third.refused == "streams"  # 4 slots over 2 processes: 2 here
        await store.finish(first.lease, first.reservation, 400)
        fourth = await store.admit("a", spec, stream_limit=4)
        assert fourth.allowed and fourth.lease is not None
    finally:
        await store.aclose()


# ---- declared ids split their owner's budget, never multiply it (issue 20 §3) ---------------


async def test_a_declared_ids_sub_bucket_is_charged_with_its_owners_or_not_at_all(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    rng = random.Random()
    stores = [RedisLimitStore.from_url(redis_server.url, timeout_s=2.0) for _ in range(2)]
    for store in stores:
        await store.start()
    try:
        owner_spec, sub_spec = LimitSpec(0.001, 5), LimitSpec(0.001, 2)
        for backend in (MemoryLimitStore(), stores[0]):
            owner = f"peer:10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
            one = f"client:{rng.getrandbits(48):x}@{owner}"
            first = [await backend.admit(owner, owner_spec, sub_key=one, sub_spec=sub_spec)]
            first.append(await backend.admit(owner, owner_spec, sub_key=one, sub_spec=sub_spec))
            assert [a.allowed for a in first] == [True, True]
            assert first[1].decision.remaining == 0 and first[1].decision.limit == 2  # the tighter
            for _ in range(
                rng.randrange(3, 10)
            ):  # refused by its own bucket: the owner's untouched
                refused = await backend.admit(owner, owner_spec, sub_key=one, sub_spec=sub_spec)
                assert (refused.refused, refused.refused_key) == ("rate", one)
                assert refused.decision.retry_after_s > 0
            others = [f"client:{rng.getrandbits(64):x}-{i}@{owner}" for i in range(50)]
            admitted = [
                (await backend.admit(owner, owner_spec, sub_key=o, sub_spec=sub_spec)).allowed
                for o in others
            ]
            assert sum(admitted) == 3, "the owner's 5 tokens, 2 of them spent by `one`"
            last = await backend.admit(owner, owner_spec, sub_key=others[-1], sub_spec=sub_spec)
            assert (last.refused, last.refused_key) == ("rate", "")  # the owner's refusal

        # Many processes, many fresh ids at once: exactly the owner's burst is admitted.
        owner = f"peer:{rng.getrandbits(32):x}"
        outcomes = await asyncio.gather(
            *(
                stores[i % 2].admit(
                    owner,
                    owner_spec,
                    sub_key=f"key:{rng.getrandbits(128):032x}@{owner}",
                    sub_spec=sub_spec,
                )
                for i in range(rng.randrange(40, 120))
            )
        )
        assert sum(a.allowed for a in outcomes) == 5
    finally:
        for store in stores:
            await store.aclose()


async def test_rotating_client_ids_through_the_stage_on_redis_get_the_address_budget(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """What the issue measured (20/20 admitted where 2 are), with the shared store."""
    from aiproxy.core.callinfo import CallInfo
    from aiproxy.core.errors import RateLimited
    from aiproxy.core.service import agent_service
    from aiproxy.core.settings import load_settings
    from aiproxy.interceptors.limits import Limits

    rng = random.Random()
    store = RedisLimitStore.from_url(redis_server.url, timeout_s=2.0)
    await store.start()
    try:
        stage = Limits(load_settings(limits={"rate_per_s": 0.01, "burst": 2}).limits, store)
        bound = stage.bind(agent_service().by_name["Generate"])
        address = f"ipv4:10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        admitted = 0
        for header in ("x-client-id", "x-api-key"):
            for i in range(20):
                value = f"{rng.getrandbits(64):x}-{i}"
                call = CallInfo("/x", metadata={header: value}, peer=f"{address}:{i + 1}")
                try:
                    await bound.enter(call, None, None)
                except RateLimited:
                    continue
                admitted += 1
                bound.exit(call)
        assert admitted == 2
    finally:
        await store.aclose()
