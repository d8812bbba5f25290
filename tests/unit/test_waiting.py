"""tests/support: eventually()/wait_until (wait for a state) and the fake clock."""

from __future__ import annotations

import itertools

import pytest

from tests.support.clock import FakeClock
from tests.support.waiting import eventually, eventually_timed, wait_until


async def test_eventually_returns_the_first_truthy_value() -> None:
    values = iter([None, 0, [], "ready"])
    assert await eventually(lambda: next(values), 5, interval=0.001) == "ready"


async def test_eventually_awaits_an_async_check() -> None:
    calls = itertools.count()

    async def check() -> int:
        return next(calls) >= 3

    value, took = await eventually_timed(check, 5, interval=0.001)
    assert value is True and took >= 0


async def test_an_assertion_means_not_yet_and_the_last_one_is_reported() -> None:
    seen = itertools.count()

    def check() -> bool:
        assert next(seen) > 10**9, f"seen {next(seen)}"
        return True

    with pytest.raises(AssertionError, match=r"timed out after 0.05 s waiting for the count"):
        await eventually(check, 0.05, "the count", interval=0.001)
    with pytest.raises(AssertionError, match=r"\(last: seen \d+"):
        await eventually(check, 0.05, interval=0.001)


async def test_any_other_exception_ends_the_wait_at_once() -> None:
    calls = []

    def broken() -> bool:
        calls.append(1)
        raise KeyError("a broken check")

    with pytest.raises(KeyError):
        await eventually(broken, 30)
    assert calls == [1]


def test_wait_until_is_the_same_for_synchronous_code() -> None:
    values = iter([False, False, 7])
    assert wait_until(lambda: next(values), 5, interval=0.001) == 7
    with pytest.raises(AssertionError, match=r"last value: 0"):
        wait_until(lambda: 0, 0.02, "zero to become truthy", interval=0.001)


def test_the_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock()
    assert clock() == 1000.0
    clock.advance(2.5)
    assert clock() == 1002.5
    clock.now = 5.0
    assert clock() == 5.0
