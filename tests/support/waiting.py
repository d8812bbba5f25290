"""Wait for a state, never for a time: the one poll loop the tests use.

`await eventually(check, timeout, what)` calls `check` (a plain function, or one that
returns an awaitable) until it returns something truthy, and returns that value. A check
may also assert: an AssertionError means "not yet", and the last one is what a timeout
reports (so its message can say what was seen); such a check ends with `return True`.
Any other exception ends the wait at once (a broken check should fail, not time out).

`wait_until` is the same for synchronous tests (the Envoy tests drive blocking clients).

Timeouts are generous on purpose (CI shares two cores with other work); a state that comes
early ends the wait early, so a generous bound costs nothing when things go well.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_INTERVAL_S = 0.02


def _timed_out(what: str | None, timeout: float, last: object) -> AssertionError:
    message = f"timed out after {timeout:g} s waiting for {what or 'the condition'}"
    if isinstance(last, AssertionError) and str(last):
        message += f" (last: {last})"
    elif last is not None and not isinstance(last, AssertionError):
        message += f" (last value: {last!r})"
    return AssertionError(message)


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    timeout: float = DEFAULT_TIMEOUT_S,
    what: str | None = None,
    *,
    interval: float = DEFAULT_INTERVAL_S,
) -> T:
    """The first truthy value of `check()` (awaited if it is awaitable), polled every
    `interval` s; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        last: object
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last)
        await asyncio.sleep(interval)


async def eventually_timed(
    check: Callable[[], Awaitable[T] | T],
    timeout: float = DEFAULT_TIMEOUT_S,
    what: str | None = None,
    *,
    interval: float = DEFAULT_INTERVAL_S,
) -> tuple[T, float]:
    """`eventually`, also saying how long the state took to come: (value, seconds)."""
    start = time.monotonic()
    value = await eventually(check, timeout, what, interval=interval)
    return value, time.monotonic() - start


def wait_until(
    check: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT_S,
    what: str | None = None,
    *,
    interval: float = DEFAULT_INTERVAL_S,
) -> T:
    """`eventually` for synchronous code: blocks the calling thread between polls (never
    call it on a running event loop)."""
    deadline = time.monotonic() + timeout
    while True:
        last: object
        try:
            value = check()
            if value:
                return value
            last = value
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last)
        time.sleep(interval)
