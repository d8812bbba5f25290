"""The memory limits store with injected clocks: request buckets, stream leases, token
reservations (all or nothing, settled once), memory bounds, the rejection's status."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2

from aiproxy.core.errors import Reason, to_status_proto
from aiproxy.core.limitstore import (
    DAY_S,
    TOKENS_PER_DAY,
    TOKENS_PER_MINUTE,
    LimitStore,
    LimitsUnavailable,
    MemoryLimitStore,
    Reservation,
    TokenBudget,
    TokenLimits,
    TokenRejection,
    refusal_error,
    token_limited_error,
)
from aiproxy.core.ratelimit import LimitSpec
from tests.support.clock import FakeClock

# 2026-11-27 12:00:00 UTC: half a day before the next UTC midnight.
NOON = 20784 * DAY_S + DAY_S / 2


@pytest.fixture
def clocks() -> tuple[FakeClock, FakeClock]:
    return FakeClock(1000.0), FakeClock(NOON)


@pytest.fixture
def store(clocks: tuple[FakeClock, FakeClock]) -> MemoryLimitStore:
    mono, wall = clocks
    return MemoryLimitStore(clock=mono, wall_clock=wall)


def test_memory_store_is_a_limit_store_with_a_sync_fast_path(store: MemoryLimitStore) -> None:
    assert isinstance(store, LimitStore)
    assert store.local is True


# ---- request rate -------------------------------------------------------------------------


async def test_take_admits_the_burst_then_refills_continuously(
    store: MemoryLimitStore, clocks: tuple[FakeClock, FakeClock]
) -> None:
    spec = LimitSpec(rate_per_s=4, burst=3)
    decisions = [await store.take("client:a", spec) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[2].remaining == 0 and decisions[2].limit == 3
    assert decisions[3].retry_after_s == pytest.approx(0.25)
    assert decisions[3].reset_after_s == pytest.approx(0.75)
    clocks[0].advance(0.25)
    assert store.take_nowait("client:a", spec).allowed
    assert not store.take_nowait("client:a", spec).allowed


async def test_keys_have_separate_buckets_and_the_spec_comes_with_each_call(
    store: MemoryLimitStore,
) -> None:
    small, large = LimitSpec(1, 1), LimitSpec(1, 5)
    assert store.take_nowait("a", small).allowed
    assert not store.take_nowait("a", small).allowed
    assert store.take_nowait("b", small).allowed  # another caller is untouched
    # A changed spec (config reload, tenant override) takes effect at once.
    assert store.take_nowait("a", large).remaining == 4


def test_take_of_more_than_the_burst_is_a_bug_not_a_rejection(store: MemoryLimitStore) -> None:
    with pytest.raises(ValueError):
        store.take_nowait("a", LimitSpec(1, 2), n=3)


def test_buckets_idle_past_their_refill_are_dropped_and_memory_is_bounded(
    clocks: tuple[FakeClock, FakeClock],
) -> None:
    mono, wall = clocks
    store = MemoryLimitStore(max_keys=100, clock=mono, wall_clock=wall)
    spec = LimitSpec(rate_per_s=10, burst=10)  # refills in 1 s
    for i in range(1000):  # more distinct callers than max_keys
        store.take_nowait(f"client:{i}", spec)
    assert len(store._buckets) <= 100
    mono.advance(1.0)
    store.take_nowait("client:new", spec)
    assert len(store._buckets) == 1  # the idle ones were full again: dropping forgives nothing


# ---- stream leases --------------------------------------------------------------------------


async def test_leases_cap_open_streams_per_key_and_release_is_idempotent(
    store: MemoryLimitStore,
) -> None:
    first = await store.acquire_stream("a", 2)
    second = await store.acquire_stream("a", 2)
    assert first is not None and second is not None
    assert await store.acquire_stream("a", 2) is None
    assert await store.acquire_stream("b", 2) is not None  # per key
    await store.release_stream(first)
    await store.release_stream(first)  # twice: frees one slot, not two
    assert store.streams_in_use("a") == 1
    third = await store.acquire_stream("a", 2)
    assert third is not None
    assert await store.acquire_stream("a", 2) is None
    for lease in (second, third):
        store.release_stream_nowait(lease)
    assert store.streams_in_use("a") == 0 and "a" not in store._streams  # no key kept


# ---- token reservations ---------------------------------------------------------------------


async def test_reserve_takes_from_both_quotas_and_reports_what_is_left(
    store: MemoryLimitStore,
) -> None:
    limits = TokenLimits(per_minute=1000, per_day=5000)
    r = await store.reserve_tokens("sub:alice", 400, limits)
    assert isinstance(r, Reservation)
    assert r.budget == TokenBudget(1000, 600, pytest.approx(24.0), 5000, 4600, DAY_S / 2)
    assert dict(r.budget.headers()) == {
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "600",
        "x-ratelimit-reset-tokens": "24",
        "x-ratelimit-limit-tokens-day": "5000",
        "x-ratelimit-remaining-tokens-day": "4600",
        "x-ratelimit-reset-tokens-day": str(DAY_S // 2),
    }


async def test_a_rejection_takes_nothing_from_the_other_quota(
    store: MemoryLimitStore,
) -> None:
    limits = TokenLimits(per_minute=1000, per_day=500)
    assert isinstance(await store.reserve_tokens("a", 400, limits), Reservation)
    refused = await store.reserve_tokens("a", 200, limits)  # per-minute fits, the day does not
    assert isinstance(refused, TokenRejection)
    assert refused.quota == TOKENS_PER_DAY
    assert refused.retry_after_s == pytest.approx(DAY_S / 2)  # at 00:00 UTC
    # All or nothing: the per-minute bucket still has 600, not 400.
    assert store.token_budget("a", limits).minute_remaining == 600


async def test_per_minute_rejection_retries_at_the_refill(
    store: MemoryLimitStore, clocks: tuple[FakeClock, FakeClock]
) -> None:
    limits = TokenLimits(per_minute=600)  # 10 tokens per second
    assert isinstance(await store.reserve_tokens("a", 550, limits), Reservation)
    refused = await store.reserve_tokens("a", 100, limits)
    assert isinstance(refused, TokenRejection) and refused.quota == TOKENS_PER_MINUTE
    assert refused.retry_after_s == pytest.approx(5.0)  # 50 left, 50 more at 10/s
    assert refused.budget.day_limit is None
    clocks[0].advance(refused.retry_after_s)
    assert isinstance(await store.reserve_tokens("a", 100, limits), Reservation)


async def test_settle_charges_the_actual_usage_once(
    store: MemoryLimitStore,
) -> None:
    limits = TokenLimits(per_minute=1000, per_day=10_000)
    r = await store.reserve_tokens("a", 500, limits)
    assert isinstance(r, Reservation)
    await store.settle_tokens(r, 120)  # a cancelled stream: charged what it produced
    await store.settle_tokens(r, 120)  # counted once
    await store.settle_tokens(r, 0)  # a later, different settle is ignored too
    budget = store.token_budget("a", limits)
    assert budget.minute_remaining == 880 and budget.day_remaining == 9880
    more = await store.reserve_tokens("a", 100, limits)
    assert isinstance(more, Reservation)
    await store.settle_tokens(more, 300)  # used more than reserved: charged the difference
    budget = store.token_budget("a", limits)
    assert budget.minute_remaining == 580 and budget.day_remaining == 9580


async def test_an_amount_above_the_per_minute_limit_runs_on_a_full_bucket_and_leaves_debt(
    store: MemoryLimitStore, clocks: tuple[FakeClock, FakeClock]
) -> None:
    limits = TokenLimits(per_minute=60)  # 1 token per second
    big = await store.reserve_tokens("a", 90, limits)
    assert isinstance(big, Reservation)  # not refused forever
    assert big.budget.minute_remaining == -30
    assert dict(big.budget.headers())["x-ratelimit-remaining-tokens"] == "0"
    refused = await store.reserve_tokens("a", 1, limits)
    assert isinstance(refused, TokenRejection)
    assert refused.retry_after_s == pytest.approx(31.0)  # the debt is paid back first
    clocks[0].advance(31.0)
    assert isinstance(await store.reserve_tokens("a", 1, limits), Reservation)


async def test_a_tenant_budget_is_shared_by_its_callers_while_per_minute_stays_per_caller(
    store: MemoryLimitStore,
) -> None:
    limits = TokenLimits(per_minute=1000, per_day=1500)
    a = await store.reserve_tokens("sub:svc-a", 900, limits, budget_key="tenant:acme")
    assert isinstance(a, Reservation)
    b = await store.reserve_tokens("sub:svc-b", 900, limits, budget_key="tenant:acme")
    assert isinstance(b, TokenRejection) and b.quota == TOKENS_PER_DAY
    c = await store.reserve_tokens("sub:svc-b", 600, limits, budget_key="tenant:acme")
    assert isinstance(c, Reservation) and c.budget.day_remaining == 0


async def test_the_daily_budget_resets_at_utc_midnight_and_late_settles_touch_their_own_day(
    store: MemoryLimitStore, clocks: tuple[FakeClock, FakeClock]
) -> None:
    limits = TokenLimits(per_day=1000)
    r = await store.reserve_tokens("a", 1000, limits)
    assert isinstance(r, Reservation)
    assert isinstance(await store.reserve_tokens("a", 1, limits), TokenRejection)
    clocks[1].advance(DAY_S / 2)  # 00:00 UTC
    fresh = await store.reserve_tokens("a", 10, limits)
    assert isinstance(fresh, Reservation) and fresh.budget.day_remaining == 990
    await store.settle_tokens(r, 1500)  # yesterday's call ends now: not charged to today
    assert store.token_budget("a", limits).day_remaining == 990


async def test_n_concurrent_reservations_against_a_budget_that_fits_k_admit_exactly_k(
    store: MemoryLimitStore,
) -> None:
    limits = TokenLimits(per_minute=10_000, per_day=700)
    results = await asyncio.gather(*(store.reserve_tokens("a", 100, limits) for _ in range(30)))
    assert sum(isinstance(r, Reservation) for r in results) == 7


def test_token_memory_is_bounded(clocks: tuple[FakeClock, FakeClock]) -> None:
    mono, wall = clocks
    store = MemoryLimitStore(max_keys=50, clock=mono, wall_clock=wall)
    limits = TokenLimits(per_minute=100, per_day=100)
    for i in range(500):
        store.reserve_tokens_nowait(f"k{i}", 1, limits)
    assert len(store._meters) <= 50 and len(store._days) <= 50
    wall.advance(DAY_S)  # yesterday's counters go as soon as today's are used
    mono.advance(60)
    store.reserve_tokens_nowait("fresh", 1, limits)
    assert len(store._days) == 1 and len(store._meters) == 1


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenLimits(per_minute=0)
    assert not TokenLimits().enforced


# ---- errors ------------------------------------------------------------------------------


def test_a_token_rejection_is_resource_exhausted_with_quota_failure_and_retry_info(
    store: MemoryLimitStore,
) -> None:
    limits = TokenLimits(per_minute=100)
    store.reserve_tokens_nowait("sub:alice", 100, limits)
    refused = store.reserve_tokens_nowait("sub:alice", 50, limits)
    assert isinstance(refused, TokenRejection)
    err = token_limited_error("sub:alice", refused)
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason is Reason.RATE_LIMITED
    status = to_status_proto(err)
    kinds = {d.type_url.rsplit(".", 1)[-1] for d in status.details}
    assert {"ErrorInfo", "RetryInfo", "QuotaFailure"} <= kinds
    quota = error_details_pb2.QuotaFailure()
    next(d for d in status.details if d.Is(quota.DESCRIPTOR)).Unpack(quota)
    assert quota.violations[0].subject == "sub:alice"
    assert "100 tokens per minute" in quota.violations[0].description
    retry = error_details_pb2.RetryInfo()
    next(d for d in status.details if d.Is(retry.DESCRIPTOR)).Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 30_000


def test_limits_unavailable_is_unavailable_with_a_stable_reason() -> None:
    err = LimitsUnavailable(retry_delay_s=0.5)
    assert err.code is grpc.StatusCode.UNAVAILABLE
    assert to_status_proto(err).details[0].value  # ErrorInfo packed
    assert err.reason.value == "LIMITS_UNAVAILABLE"


# ---- one step per call: admit and finish ---------------------------------------------------


async def test_admit_takes_a_request_token_a_lease_and_tokens_together(
    store: MemoryLimitStore,
) -> None:
    spec = LimitSpec(rate_per_s=1, burst=5)
    limits = TokenLimits(per_minute=1000, per_day=5000)
    a = await store.admit("a", spec, stream_limit=2, tokens=300, token_limits=limits)
    assert a.allowed and a.refused is None
    assert a.decision.remaining == 4
    assert a.lease is not None and store.streams_in_use("a") == 1
    assert a.reservation is not None and a.reservation.budget.minute_remaining == 700
    await store.finish(a.lease, a.reservation, 100)
    await store.finish(a.lease, a.reservation, 100)  # idempotent
    assert store.streams_in_use("a") == 0
    assert store.token_budget("a", limits).minute_remaining == 900
    unary = await store.admit("a", spec)  # no stream, no tokens: just the request token
    assert unary.allowed and unary.lease is None and unary.reservation is None
    await store.finish(None, None)


async def test_admit_refusals_say_which_limit_and_take_no_slot_or_tokens(
    store: MemoryLimitStore,
) -> None:
    spec = LimitSpec(rate_per_s=1, burst=3)
    limits = TokenLimits(per_minute=100)
    held = await store.admit("a", spec, stream_limit=1)
    assert held.lease is not None
    streams = await store.admit("a", spec, stream_limit=1, tokens=10, token_limits=limits)
    assert streams.refused == "streams" and streams.lease is None and streams.reservation is None
    assert store.token_budget("a", limits).minute_remaining == 100  # no tokens taken
    err = refusal_error("a", streams)
    assert err.reason is Reason.CONCURRENCY_LIMITED
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    tokens = await store.admit("b", spec, stream_limit=1, tokens=500, token_limits=limits)
    assert tokens.allowed  # more than the per-minute capacity: runs on a full bucket
    refused = await store.admit("b", LimitSpec(1, 3), stream_limit=2, tokens=1, token_limits=limits)
    assert refused.refused == TOKENS_PER_MINUTE and refused.rejection is not None
    assert store.streams_in_use("b") == 1  # the refused call took no stream slot
    assert refusal_error("b", refused).metadata["quota"] == TOKENS_PER_MINUTE
    # The refused call spent its request token all the same (it is still a request):
    # "a" made 2 calls of its burst of 3, so 1 is left, then none.
    assert (await store.admit("a", spec)).decision.remaining == 0
    rate = await store.admit("a", spec)
    assert rate.refused == "rate"
    assert not rate.decision.allowed
    assert refusal_error("a", rate).reason is Reason.RATE_LIMITED
    with pytest.raises(ValueError):
        refusal_error("a", held)
