"""The circuit breaker's state machine, driven by a fake clock."""

from __future__ import annotations

import itertools
import logging

import grpc
import pytest

from aiproxy.core.breaker import BreakerState, CircuitBreaker, Permit, is_breaker_failure
from tests.support.clock import FakeClock

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


# Callers take turns unless a test names one: most tests are about what many callers see.
_callers = itertools.cycle([f"sub:user-{i}" for i in range(7)])


def permit(breaker: CircuitBreaker, caller: str | None = None) -> Permit:
    got = breaker.try_acquire(next(_callers) if caller is None else caller)
    assert got is not None, f"breaker {breaker.state.name} rejected"
    return got


def fail(breaker: CircuitBreaker, times: int = 1, caller: str | None = None) -> None:
    for _ in range(times):
        permit(breaker, caller).failure()


def succeed(breaker: CircuitBreaker, times: int = 1, caller: str | None = None) -> None:
    for _ in range(times):
        permit(breaker, caller).success()


def open_breaker(clock: FakeClock, **kwargs: object) -> CircuitBreaker:
    kwargs.setdefault("min_volume", 3)
    breaker = CircuitBreaker("up", clock=clock, **kwargs)  # type: ignore[arg-type]
    for i in range(breaker.min_volume):
        permit(breaker, f"sub:opener-{i}").failure()
    assert breaker.state is OPEN
    return breaker


def test_gauge_values() -> None:
    assert (int(CLOSED), int(HALF_OPEN), int(OPEN)) == (0, 1, 2)


def alternate(breaker: CircuitBreaker, calls: int, first_fails: bool) -> None:
    for i in range(calls):
        (permit(breaker).failure if (i % 2 == 0) == first_fails else permit(breaker).success)()


def test_opens_on_failure_ratio_once_there_is_enough_volume() -> None:
    breaker = CircuitBreaker("up", failure_ratio=0.5, min_volume=20, clock=FakeClock())
    alternate(breaker, 19, first_fails=False)  # 9 failures of 19
    assert breaker.state is CLOSED
    fail(breaker)  # 10 of 20 = 0.5
    assert breaker.state is OPEN


def test_a_short_run_of_failures_is_not_enough() -> None:
    """No "N in a row" rule: five failures among many successes is a request problem."""
    breaker = CircuitBreaker("up", failure_ratio=0.5, min_volume=20, clock=FakeClock())
    succeed(breaker, 30)
    fail(breaker, 10)  # ten in a row from different callers: 10 of 40
    assert breaker.state is CLOSED


def test_does_not_open_on_ratio_below_min_volume() -> None:
    breaker = CircuitBreaker("up", failure_ratio=0.5, min_volume=20, clock=FakeClock())
    alternate(breaker, 19, first_fails=True)  # 10 failures of 19: ratio > 0.5, volume < 20
    assert breaker.state is CLOSED


def test_failures_age_out_of_the_rolling_window() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("up", failure_ratio=0.5, min_volume=20, window_s=10, clock=clock)
    alternate(breaker, 18, first_fails=True)  # 9 failures of 18
    clock.advance(10.5)  # all of them are older than the window now
    alternate(breaker, 18, first_fails=False)  # 9 of 18 again: the window holds 18, not 36
    assert breaker.state is CLOSED
    clock.advance(5)  # the window keeps the last 18 and adds 2 failures: 11 of 20
    fail(breaker, 2)
    assert breaker.state is OPEN


# ---- one caller cannot open it ---------------------------------------------------------


def test_one_caller_alone_never_opens_it_however_many_failures() -> None:
    breaker = CircuitBreaker("up", min_volume=5, min_failing_callers=3, clock=FakeClock())
    fail(breaker, 10_000, caller="peer:10.0.0.66")  # 100 % failures, huge volume
    assert breaker.state is CLOSED


def test_two_callers_are_not_enough_when_three_are_required() -> None:
    breaker = CircuitBreaker("up", min_volume=5, min_failing_callers=3, clock=FakeClock())
    for _ in range(50):
        permit(breaker, "client:a").failure()
        permit(breaker, "client:b").failure()
    assert breaker.state is CLOSED
    permit(breaker, "client:c").failure()
    assert breaker.state is OPEN


def test_failing_callers_age_out_with_the_window() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("up", min_volume=3, min_failing_callers=3, window_s=10, clock=clock)
    permit(breaker, "client:a").failure()
    permit(breaker, "client:b").failure()
    clock.advance(10.5)  # a and b are forgotten
    fail(breaker, 20, caller="client:c")
    assert breaker.state is CLOSED
    permit(breaker, "client:d").failure()
    permit(breaker, "client:e").failure()
    assert breaker.state is OPEN


def test_the_callers_of_an_outage_are_counted_across_window_slots() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("up", min_volume=3, min_failing_callers=3, window_s=10, clock=clock)
    for caller in ("client:a", "client:b", "client:c"):
        permit(breaker, caller).failure()
        clock.advance(2)  # each in its own slot
    assert breaker.state is OPEN


def test_the_injected_caller_source_is_used_when_no_caller_is_given() -> None:
    who = {"now": "sub:alice"}
    breaker = CircuitBreaker(
        "up", min_volume=3, min_failing_callers=2, clock=FakeClock(), caller=lambda: who["now"]
    )
    for _ in range(5):
        breaker.try_acquire().failure()  # type: ignore[union-attr]
    assert breaker.state is CLOSED  # alice alone
    who["now"] = "sub:bob"
    breaker.try_acquire().failure()  # type: ignore[union-attr]
    assert breaker.state is OPEN


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
)
def test_request_specific_codes_never_open_it_even_from_many_callers(code: grpc.StatusCode) -> None:
    breaker = CircuitBreaker("up", min_volume=3, min_failing_callers=2, clock=FakeClock())
    for _ in range(200):
        permit(breaker).record(code)
    assert breaker.state is CLOSED


def test_failure_codes_are_configurable() -> None:
    breaker = CircuitBreaker(
        "up",
        min_volume=3,
        min_failing_callers=2,
        clock=FakeClock(),
        failure_codes={grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL},
    )
    for _ in range(3):
        permit(breaker).record(grpc.StatusCode.INTERNAL)
    assert breaker.state is OPEN


def test_one_caller_cannot_keep_it_open_through_half_open_probes() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, min_failing_callers=3, reset_timeout_s=30)
    clock.advance(30)
    for _ in range(20):  # the hostile caller takes the probe slot again and again
        permit(breaker, "client:hostile").failure()
    assert breaker.state is HALF_OPEN
    permit(breaker, "client:someone").success()
    assert breaker.state is CLOSED


def test_rejects_while_open_with_the_time_left_as_retry_after() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, reset_timeout_s=30)
    clock.advance(10)
    assert breaker.try_acquire() is None
    assert breaker.retry_after_s() == pytest.approx(20)
    clock.advance(19.9)
    assert breaker.state is OPEN
    assert breaker.retry_after_s() == pytest.approx(0.1)


def test_an_endpoint_that_recovers_goes_half_open_at_once() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, reset_timeout_s=30)
    clock.advance(1)
    breaker.endpoint_recovered()  # health says SERVING again (restarted on its port)
    assert breaker.state is HALF_OPEN
    permit(breaker).success()
    assert breaker.state is CLOSED
    breaker.endpoint_recovered()  # no-op unless open
    assert breaker.state is CLOSED


def test_closed_breaker_says_no_wait() -> None:
    assert CircuitBreaker("up", clock=FakeClock()).retry_after_s() == 0


@pytest.mark.parametrize("probes", [1, 3])
def test_half_open_admits_exactly_the_configured_probes_at_a_time(probes: int) -> None:
    clock = FakeClock()
    breaker = open_breaker(
        clock, reset_timeout_s=30, half_open_max_probes=probes, success_threshold=99
    )
    clock.advance(30)
    assert breaker.state is HALF_OPEN
    admitted = [breaker.try_acquire() for _ in range(probes + 10)]
    assert sum(p is not None for p in admitted) == probes
    assert admitted[probes:] == [None] * 10
    assert breaker.retry_after_s() == pytest.approx(1.0)
    admitted[0].success()  # type: ignore[union-attr]
    assert breaker.try_acquire() is not None  # that slot is free again
    assert breaker.try_acquire() is None


def test_a_probe_success_closes() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, reset_timeout_s=30)
    clock.advance(30)
    permit(breaker).success()
    assert breaker.state is CLOSED
    assert all(breaker.try_acquire() for _ in range(100))


def test_success_threshold_needs_that_many_probe_successes() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, success_threshold=2)
    clock.advance(30)
    permit(breaker).success()
    assert breaker.state is HALF_OPEN
    permit(breaker).success()
    assert breaker.state is CLOSED


def test_probe_failures_from_distinct_callers_reopen_for_a_full_reset_timeout() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock, reset_timeout_s=30, min_failing_callers=2)
    clock.advance(30)
    permit(breaker, "client:a").failure()
    assert breaker.state is HALF_OPEN  # one caller's failed probe frees the slot only
    permit(breaker, "client:b").failure()
    assert breaker.state is OPEN
    assert breaker.retry_after_s() == pytest.approx(30)
    clock.advance(29)
    assert breaker.try_acquire() is None


def test_ignore_releases_the_probe_slot_without_deciding() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(30)
    probe = permit(breaker)
    assert breaker.try_acquire() is None
    probe.ignore()
    assert breaker.state is HALF_OPEN
    permit(breaker).success()
    assert breaker.state is CLOSED


def test_settling_twice_counts_once() -> None:
    breaker = CircuitBreaker("up", min_volume=2, min_failing_callers=2, clock=FakeClock())
    once = permit(breaker, "client:a")
    once.failure()
    once.failure()
    once.success()
    assert breaker.state is CLOSED
    fail(breaker, caller="client:b")
    assert breaker.state is OPEN


def test_permits_from_an_earlier_state_are_dropped() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("up", min_volume=2, min_failing_callers=2, clock=clock)
    slow = [permit(breaker) for _ in range(3)]  # in flight when the upstream dies
    fail(breaker, 2)
    assert breaker.state is OPEN
    clock.advance(30)
    assert breaker.state is HALF_OPEN
    slow[0].success()  # an old call finishing is not a probe: must not close
    slow[1].failure()  # nor re-open
    assert breaker.state is HALF_OPEN
    probe = permit(breaker)
    probe.success()
    assert breaker.state is CLOSED
    slow[2].failure()  # still stale after closing
    fail(breaker)
    assert breaker.state is CLOSED  # one failure since closing, not two (below min volume)


def test_closing_starts_with_a_clean_window() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "up", min_volume=4, failure_ratio=0.5, min_failing_callers=2, clock=clock
    )
    alternate(breaker, 4, first_fails=False)  # 2 failures of 4, the last one trips it
    assert breaker.state is OPEN
    clock.advance(30)
    permit(breaker).success()
    assert breaker.state is CLOSED
    fail(breaker)  # 1 of 1, but below min volume in the fresh window
    assert breaker.state is CLOSED


@pytest.mark.parametrize(
    ("code", "state_after"),
    [
        (grpc.StatusCode.OK, CLOSED),
        (grpc.StatusCode.UNAVAILABLE, HALF_OPEN),  # one caller's probe failure: slot freed
        (grpc.StatusCode.INTERNAL, HALF_OPEN),
        (grpc.StatusCode.INVALID_ARGUMENT, HALF_OPEN),
        (grpc.StatusCode.CANCELLED, HALF_OPEN),
    ],
)
def test_record_settles_by_code(code: grpc.StatusCode, state_after: BreakerState) -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(30)
    permit(breaker).record(code)
    assert breaker.state is state_after
    if state_after is HALF_OPEN:  # ignored: the probe slot is free again
        assert breaker.try_acquire() is not None


@pytest.mark.parametrize(
    ("code", "counts"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False),  # the caller's deadline
        (grpc.StatusCode.INTERNAL, False),  # the request broke the handler
        (grpc.StatusCode.UNKNOWN, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False),
        (grpc.StatusCode.OK, False),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.CANCELLED, False),
        (grpc.StatusCode.NOT_FOUND, False),
        (grpc.StatusCode.PERMISSION_DENIED, False),
        (grpc.StatusCode.UNAUTHENTICATED, False),
    ],
)
def test_is_breaker_failure(code: grpc.StatusCode, counts: bool) -> None:
    assert is_breaker_failure(code) is counts


def test_ignored_outcomes_never_open_it() -> None:
    breaker = CircuitBreaker("up", min_failing_callers=1, min_volume=1, clock=FakeClock())
    for _ in range(100):
        permit(breaker).record(grpc.StatusCode.INVALID_ARGUMENT)
    assert breaker.state is CLOSED


def test_transitions_are_reported_in_order() -> None:
    clock = FakeClock()
    seen: list[tuple[str, BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        "agent-0:50052",
        min_volume=1,
        min_failing_callers=1,
        clock=clock,
        on_transition=lambda *t: seen.append(t),
    )
    fail(breaker)
    clock.advance(30)
    permit(breaker).failure()
    clock.advance(30)
    permit(breaker).success()
    assert seen == [
        ("agent-0:50052", CLOSED, OPEN),
        ("agent-0:50052", OPEN, HALF_OPEN),
        ("agent-0:50052", HALF_OPEN, OPEN),
        ("agent-0:50052", OPEN, HALF_OPEN),
        ("agent-0:50052", HALF_OPEN, CLOSED),
    ]


def test_a_failing_callback_does_not_break_calls(caplog: pytest.LogCaptureFixture) -> None:
    def broken(name: str, old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("metrics down")

    breaker = CircuitBreaker(
        "up", min_volume=1, min_failing_callers=1, clock=FakeClock(), on_transition=broken
    )
    with caplog.at_level(logging.ERROR, logger="aiproxy.core.breaker"):
        fail(breaker)
    assert breaker.state is OPEN
    assert "on_transition callback failed" in caplog.text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_failing_callers": 0},
        {"failure_codes": {grpc.StatusCode.OK}},
        {"min_volume": 0},
        {"half_open_max_probes": 0},
        {"success_threshold": 0},
        {"failure_ratio": 0},
        {"failure_ratio": 1.5},
        {"window_s": 0},
        {"reset_timeout_s": 0},
        {"window_buckets": 0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("up", **kwargs)  # type: ignore[arg-type]
