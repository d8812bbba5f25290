"""The fake clock the unit tests inject wherever the code takes `clock=time.monotonic`
(the breaker, the token buckets and limit store, the stream pump, ...).

It stands still until the test moves it: `clock.advance(30)` crosses a 30 s timeout at
once, and `clock.now = t` sets it outright.
"""

from __future__ import annotations


class FakeClock:
    """A callable clock (seconds, like time.monotonic()) that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
