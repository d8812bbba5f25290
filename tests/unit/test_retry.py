"""Retry policy: exponential backoff with full jitter, and when not to retry."""

from __future__ import annotations

import random

import grpc
import pytest

from aiproxy.core.retry import RetryPolicy

Code = grpc.StatusCode


class FixedRng:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(1, 0.05), (2, 0.1), (3, 0.2), (4, 0.4), (5, 0.8), (6, 1.0), (50, 1.0)]
)
def test_backoff_ceiling_grows_exponentially_up_to_the_max(attempt: int, ceiling: float) -> None:
    policy = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=1.0, multiplier=2)
    assert policy.backoff(attempt, FixedRng(0.0)) == 0.0  # full jitter reaches down to zero
    assert policy.backoff(attempt, FixedRng(0.999999)) == pytest.approx(ceiling, rel=1e-5)


def test_backoff_is_spread_over_the_whole_interval() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0)
    rng = random.Random(7)
    samples = [policy.backoff(2, rng) for _ in range(2_000)]
    assert all(0 <= s < 0.2 for s in samples)
    assert min(samples) < 0.01 and max(samples) > 0.19
    assert 0.09 < sum(samples) / len(samples) < 0.11


def test_backoff_never_overflows() -> None:
    assert RetryPolicy(multiplier=10).backoff(10_000, FixedRng(0.5)) == 0.5


def test_backoff_uses_the_module_rng_by_default() -> None:
    assert 0 <= RetryPolicy().backoff(1) < 0.05


def test_backoff_counts_retries_from_one() -> None:
    with pytest.raises(ValueError):
        RetryPolicy().backoff(0)


def test_retries_only_retryable_codes() -> None:
    policy = RetryPolicy()
    assert policy.should_retry(Code.UNAVAILABLE, 1, None, 0.05)
    for code in (
        Code.DEADLINE_EXCEEDED,
        Code.RESOURCE_EXHAUSTED,
        Code.INVALID_ARGUMENT,
        Code.INTERNAL,
        Code.UNKNOWN,
        Code.CANCELLED,
    ):
        assert not policy.should_retry(code, 1, None, 0.05), code


def test_max_attempts_counts_the_first_call() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.should_retry(Code.UNAVAILABLE, 1, None, 0)
    assert policy.should_retry(Code.UNAVAILABLE, 2, None, 0)
    assert not policy.should_retry(Code.UNAVAILABLE, 3, None, 0)
    assert not RetryPolicy(max_attempts=1).should_retry(Code.UNAVAILABLE, 1, None, 0)


def test_never_retries_past_the_callers_deadline() -> None:
    policy = RetryPolicy(min_attempt_s=0.05)
    assert policy.should_retry(Code.UNAVAILABLE, 1, time_remaining_s=1.0, backoff_s=0.2)
    assert policy.should_retry(Code.UNAVAILABLE, 1, time_remaining_s=0.26, backoff_s=0.2)
    # After the wait, less than min_attempt_s would be left for the attempt.
    assert not policy.should_retry(Code.UNAVAILABLE, 1, time_remaining_s=0.24, backoff_s=0.2)
    assert not policy.should_retry(Code.UNAVAILABLE, 1, time_remaining_s=0.1, backoff_s=0.2)
    assert not policy.should_retry(Code.UNAVAILABLE, 1, time_remaining_s=0.0, backoff_s=0.0)


def test_deadline_exceeded_is_never_retried_once_the_deadline_passed() -> None:
    policy = RetryPolicy(retryable_codes=frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED}))
    assert not policy.should_retry(Code.DEADLINE_EXCEEDED, 1, time_remaining_s=0.0, backoff_s=0.0)


def test_never_retries_once_something_reached_the_caller() -> None:
    assert not RetryPolicy().should_retry(Code.UNAVAILABLE, 1, None, 0.0, committed=True)


def test_retryable_codes_are_configurable() -> None:
    policy = RetryPolicy(retryable_codes=frozenset({Code.RESOURCE_EXHAUSTED}))
    assert policy.should_retry(Code.RESOURCE_EXHAUSTED, 1, None, 0)
    assert not policy.should_retry(Code.UNAVAILABLE, 1, None, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_backoff_s": -1},
        {"initial_backoff_s": 2, "max_backoff_s": 1},
        {"multiplier": 0.5},
        {"min_attempt_s": -0.1},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
