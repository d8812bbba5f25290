"""Token buckets (fractional refill), keyed limiters, stream limits and caller keys."""

from __future__ import annotations

import grpc
import pytest

from aiproxy.core.errors import QuotaViolation, Reason
from aiproxy.core.ratelimit import (
    ConcurrencyLimiter,
    KeyedLimiter,
    LimitSpec,
    TokenBucket,
    caller_key,
    concurrency_limited_error,
    hash_api_key,
    rate_limited_error,
)
from tests.support.clock import FakeClock


def drain(bucket: TokenBucket) -> int:
    taken = 0
    while bucket.try_acquire().allowed:
        taken += 1
    return taken


def test_bucket_starts_full_and_allows_exactly_its_burst() -> None:
    bucket = TokenBucket(rate_per_s=1, burst=10, clock=FakeClock())
    assert drain(bucket) == 10


def test_refill_is_fractional_and_continuous() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=4, burst=4, clock=clock)
    drain(bucket)
    clock.advance(0.25)  # exactly one token at 4/s
    first = bucket.try_acquire()
    assert first.allowed and first.remaining == 0
    second = bucket.try_acquire()
    assert not second.allowed
    assert second.retry_after_s == pytest.approx(0.25)


def test_half_intervals_add_up_instead_of_being_lost_to_steps() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1, burst=1, clock=clock)
    bucket.try_acquire()
    clock.advance(0.5)
    denied = bucket.try_acquire()
    assert not denied.allowed
    assert denied.retry_after_s == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.try_acquire().allowed


def test_waiting_exactly_retry_after_is_enough_despite_float_noise() -> None:
    clock = FakeClock(0.2)
    bucket = TokenBucket(rate_per_s=10, burst=1, clock=clock)
    bucket.try_acquire()
    clock.now = 0.3  # 0.3 - 0.2 = 0.09999999999999998
    assert bucket.try_acquire().allowed


def test_refill_is_capped_at_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=100, burst=5, clock=clock)
    drain(bucket)
    clock.advance(3600)
    assert drain(bucket) == 5


def test_retry_after_is_exact_for_the_missing_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2, burst=4, clock=clock)
    drain(bucket)
    clock.advance(0.2)  # 0.4 tokens
    decision = bucket.try_acquire(3)
    assert not decision.allowed
    assert decision.retry_after_s == pytest.approx((3 - 0.4) / 2)
    assert decision.reset_after_s == pytest.approx((4 - 0.4) / 2)
    assert decision.remaining == 0


def test_decision_reports_remaining_reset_limit_and_headers() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2, burst=10, clock=clock)
    decision = bucket.try_acquire()
    assert (decision.allowed, decision.remaining, decision.retry_after_s, decision.limit) == (
        True,
        9,
        0.0,
        10,
    )
    assert decision.reset_after_s == pytest.approx(0.5)
    assert decision.headers() == (
        ("x-ratelimit-limit", "10"),
        ("x-ratelimit-remaining", "9"),
        ("x-ratelimit-reset", "1"),
    )


def test_a_denied_call_costs_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1, burst=2, clock=clock)
    drain(bucket)
    for _ in range(100):
        bucket.try_acquire()
    clock.advance(1)
    assert bucket.try_acquire().allowed


def test_bucket_rejects_impossible_requests_and_bad_specs() -> None:
    bucket = TokenBucket(rate_per_s=1, burst=3, clock=FakeClock())
    for n in (0, 4):
        with pytest.raises(ValueError):
            bucket.try_acquire(n)
    for rate, burst in ((0, 1), (-1, 1), (float("inf"), 1), (float("nan"), 1), (1, 0)):
        with pytest.raises(ValueError):
            LimitSpec(rate, burst)


def test_rate_limited_error_carries_retry_info_and_quota_failure() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=4, burst=1, clock=clock)
    bucket.try_acquire()
    err = rate_limited_error("peer:10.0.0.1", bucket.try_acquire())
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    assert err.retry_delay_s == pytest.approx(0.25)
    assert err.metadata == {"limit": "1"}
    assert err.quota_violations == (
        QuotaViolation("peer:10.0.0.1", "at most 1 requests in a burst"),
    )


# ---- KeyedLimiter -----------------------------------------------------------------------


def test_keys_have_their_own_buckets_and_overrides_apply() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(LimitSpec(1, 2), {"sub:batch": LimitSpec(10, 5)}, clock=clock)
    assert [limiter.try_acquire("sub:alice").allowed for _ in range(3)] == [True, True, False]
    assert limiter.try_acquire("sub:bob").allowed
    assert sum(limiter.try_acquire("sub:batch").allowed for _ in range(10)) == 5
    assert limiter.spec_for("sub:batch") == LimitSpec(10, 5)
    assert limiter.spec_for("sub:carol") == LimitSpec(1, 2)


def test_memory_stays_bounded_under_100k_distinct_keys() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(LimitSpec(1, 10), max_keys=5_000, clock=clock)
    for i in range(100_000):
        assert limiter.try_acquire(f"peer:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}").allowed
        assert len(limiter) <= 5_000
    assert len(limiter) == 5_000


def test_the_least_recently_used_key_goes_first() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(LimitSpec(1, 1), max_keys=2, clock=clock)
    limiter.try_acquire("a")
    limiter.try_acquire("b")
    assert not limiter.try_acquire("a").allowed  # a is now the most recently used
    limiter.try_acquire("c")  # evicts b, not a
    assert not limiter.try_acquire("a").allowed
    assert limiter.try_acquire("b").allowed  # b restarted full


def test_idle_keys_are_dropped_only_once_their_bucket_is_full_again() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(LimitSpec(rate_per_s=1, burst=10), idle_ttl_s=1, clock=clock)
    assert limiter.idle_ttl_s == 10  # never shorter than the refill time
    for i in range(1_000):
        limiter.try_acquire(f"client:{i}")
    for _ in range(10):
        limiter.try_acquire("client:hot")
    clock.advance(9.9)
    limiter.try_acquire("client:new")
    assert len(limiter) == 1_002  # nothing idle long enough yet
    clock.advance(0.1)
    limiter.try_acquire("client:new")
    assert len(limiter) == 1  # everyone but the one just used
    # client:hot was dropped with a full bucket: it lost nothing and gained nothing.
    assert sum(limiter.try_acquire("client:hot").allowed for _ in range(11)) == 10


def test_keyed_limiter_rejects_a_bad_max_keys() -> None:
    with pytest.raises(ValueError):
        KeyedLimiter(LimitSpec(1, 1), max_keys=0)


# ---- ConcurrencyLimiter -----------------------------------------------------------------


def test_concurrency_limiter_admits_up_to_the_limit_per_key() -> None:
    limiter = ConcurrencyLimiter(max_per_key=2, overrides={"sub:batch": 3})
    leases = [limiter.try_acquire("sub:alice"), limiter.try_acquire("sub:alice")]
    assert all(leases)
    assert limiter.try_acquire("sub:alice") is None
    assert limiter.try_acquire("sub:bob") is not None  # other keys are independent
    assert sum(limiter.try_acquire("sub:batch") is not None for _ in range(5)) == 3
    assert limiter.in_use("sub:alice") == 2 and limiter.limit_for("sub:batch") == 3


def test_release_frees_a_slot_once_however_often_it_is_called() -> None:
    limiter = ConcurrencyLimiter(max_per_key=2)
    first = limiter.try_acquire("k")
    second = limiter.try_acquire("k")
    assert first is not None and second is not None
    first.release()
    first.release()
    first.release()
    assert limiter.in_use("k") == 1
    third = limiter.try_acquire("k")
    assert third is not None
    assert limiter.try_acquire("k") is None


def test_counters_are_deleted_at_zero_so_memory_follows_open_leases() -> None:
    limiter = ConcurrencyLimiter(max_per_key=1)
    for i in range(10_000):
        lease = limiter.try_acquire(f"peer:{i}")
        assert lease is not None
        with lease:
            assert len(limiter) == 1
    assert len(limiter) == 0


def test_lease_is_released_when_its_block_raises() -> None:
    limiter = ConcurrencyLimiter(max_per_key=1)
    lease = limiter.try_acquire("k")
    assert lease is not None
    with pytest.raises(RuntimeError), lease:
        raise RuntimeError("stream failed")
    assert limiter.in_use("k") == 0


def test_concurrency_limited_error() -> None:
    err = concurrency_limited_error("sub:alice", 4)
    assert (err.code, err.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.CONCURRENCY_LIMITED,
    )
    assert err.retry_delay_s == 1.0
    assert err.quota_violations == (QuotaViolation("sub:alice", "at most 4 concurrent streams"),)


def test_concurrency_limiter_rejects_a_bad_limit() -> None:
    with pytest.raises(ValueError):
        ConcurrencyLimiter(max_per_key=0)


# ---- caller_key -------------------------------------------------------------------------

KEY = "sk-live-0123456789abcdef"


@pytest.mark.parametrize(
    ("metadata", "peer", "subject", "expected"),
    [
        ({"x-api-key": KEY, "x-client-id": "web"}, "ipv4:10.0.0.1:5555", "alice", "sub:alice"),
        (
            {"x-api-key": KEY, "x-client-id": "web"},
            "ipv4:10.0.0.1:5555",
            None,
            f"key:{hash_api_key(KEY)}",
        ),
        ({"x-client-id": "web"}, "ipv4:10.0.0.1:5555", None, "client:web"),
        ({"x-client-id": "w" * 129}, "ipv4:10.0.0.1:5555", None, "peer:10.0.0.1"),
        ({"x-client-id": "bad\nid"}, "ipv4:10.0.0.1:5555", None, "peer:10.0.0.1"),
        ({"x-api-key": ""}, "ipv4:10.0.0.1:5555", "", "peer:10.0.0.1"),
        ({}, "ipv4:127.0.0.1:5555", None, "peer:127.0.0.1"),
        ({}, "ipv6:[::1]:5555", None, "peer:::1"),
        ({}, "ipv6:%5B::1%5D:5555", None, "peer:::1"),  # how grpc 1.85 writes it
        ({}, "ipv6:%5B2001:db8:1:2:aa:bb:cc:dd%5D:443", None, "peer:2001:db8:1:2::/64"),
        ({}, "ipv6:[2001:db8:1:2::ffff]:443", None, "peer:2001:db8:1:2::/64"),
        ({}, "ipv6:[::ffff:10.1.2.3]:443", None, "peer:10.1.2.3"),
        ({}, "unix:/run/aiproxy.sock", None, "peer:unix:/run/aiproxy.sock"),
    ],
)
def test_caller_key(
    metadata: dict[str, str], peer: str, subject: str | None, expected: str
) -> None:
    assert caller_key(metadata, peer, subject) == expected


def test_the_raw_api_key_is_never_kept() -> None:
    key = caller_key({"x-api-key": KEY}, "ipv4:10.0.0.1:1", None)
    assert KEY not in key
    assert key == f"key:{hash_api_key(KEY)}" and len(hash_api_key(KEY)) == 32
    assert hash_api_key(KEY) != hash_api_key(KEY + "x")
