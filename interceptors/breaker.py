"""A circuit breaker per upstream endpoint: the pure state machine.

CLOSED lets calls through and counts upstream failures; it opens on
`failure_threshold` consecutive failures, or when failures are at least
`failure_ratio` of the calls in the rolling `window_s` (once there are `min_volume`
of them). OPEN rejects at once, for `reset_timeout_s`. Then HALF_OPEN admits at most
`half_open_max_probes` calls at a time — everyone else is still rejected; the source
document's version let every request through here, which hammers an upstream that is
just coming back. `success_threshold` probe successes close it; one probe failure
re-opens it.

Usage, per call:

    permit = breaker.try_acquire()
    if permit is None:  -> CircuitOpen(retry_delay_s=breaker.retry_after_s())
    ... call ...;  permit.record(code)   # or success() / failure() / ignore()

Every permit must be settled exactly once (later calls are no-ops), also when the call
is cancelled (`ignore()`), or a half-open probe slot stays taken. Single-threaded
(one asyncio loop), no locks.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from typing import Final

import grpc

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class BreakerState(enum.IntEnum):
    """The values are what the state gauge exports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


TransitionCallback = Callable[[str, BreakerState, BreakerState], None]

# Codes that mean "the upstream is in trouble". The caller's own errors
# (INVALID_ARGUMENT, NOT_FOUND, CANCELLED by the caller...) say nothing about its health.
BREAKER_FAILURE_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

# What a caller rejected in HALF_OPEN is told to wait: a probe's outcome is known within
# one call's latency, so the full reset timeout would be far too pessimistic.
HALF_OPEN_RETRY_S: Final = 1.0


def is_breaker_failure(code: grpc.StatusCode) -> bool:
    """Whether an upstream call that ended with `code` counts against the endpoint."""
    return code in BREAKER_FAILURE_CODES


_NEVER: Final = -(1 << 62)  # a slot number older than any clock reading


class _RollingWindow:
    """Successes and failures over the last `window_s`, in `buckets` ring slots: O(1)
    memory and amortized O(1) time per event, whatever the traffic."""

    __slots__ = ("_bad", "_bucket_s", "_head", "_ok", "failures", "successes")

    def __init__(self, window_s: float, buckets: int) -> None:
        self._bucket_s = window_s / buckets
        self._ok = [0] * buckets
        self._bad = [0] * buckets
        self._head = _NEVER  # absolute number of the newest slot
        self.successes = 0
        self.failures = 0

    def advance(self, now: float) -> None:
        """Empty the slots that fell out of the window since the last event."""
        index = int(now // self._bucket_s)
        if index <= self._head:  # same slot as the last event (or the clock stepped back)
            return
        size = len(self._ok)
        for step in range(1, min(index - self._head, size) + 1):
            slot = (self._head + step) % size
            self.successes -= self._ok[slot]
            self.failures -= self._bad[slot]
            self._ok[slot] = self._bad[slot] = 0
        self._head = index

    def record(self, now: float, failed: bool) -> None:
        self.advance(now)
        slot = self._head % len(self._ok)
        if failed:
            self._bad[slot] += 1
            self.failures += 1
        else:
            self._ok[slot] += 1
            self.successes += 1

    def reset(self) -> None:
        size = len(self._ok)
        self._ok = [0] * size
        self._bad = [0] * size
        self._head = _NEVER
        self.successes = self.failures = 0


class Permit:
    """Leave to make one call; settle it with its outcome, exactly once.

    A permit from an earlier state (e.g. issued while CLOSED, finishing after the
    breaker opened) is stale: its outcome is dropped, since it reflects what the
    breaker already acted on.
    """

    __slots__ = ("_breaker", "_epoch", "_settled")

    def __init__(self, breaker: CircuitBreaker, epoch: int) -> None:
        self._breaker = breaker
        self._epoch = epoch
        self._settled = False

    def success(self) -> None:
        self._settle(_SUCCESS)

    def failure(self) -> None:
        self._settle(_FAILURE)

    def ignore(self) -> None:
        """Neither success nor failure (the caller's own error, or cancellation); frees
        a half-open probe slot."""
        self._settle(_IGNORE)

    def record(self, code: grpc.StatusCode) -> None:
        """Settle by the call's final code: OK succeeds, `is_breaker_failure` codes fail,
        anything else is ignored."""
        if code is grpc.StatusCode.OK:
            self._settle(_SUCCESS)
        elif code in BREAKER_FAILURE_CODES:
            self._settle(_FAILURE)
        else:
            self._settle(_IGNORE)

    def _settle(self, outcome: int) -> None:
        if not self._settled:
            self._settled = True
            self._breaker._settle(self._epoch, outcome)


_SUCCESS, _FAILURE, _IGNORE = 0, 1, 2


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        failure_ratio: float = 0.5,
        window_s: float = 10.0,
        min_volume: int = 20,
        reset_timeout_s: float = 30.0,
        half_open_max_probes: int = 1,
        success_threshold: int = 1,
        window_buckets: int = 10,
        clock: Clock = time.monotonic,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        if (
            failure_threshold < 1
            or min_volume < 1
            or half_open_max_probes < 1
            or success_threshold < 1
        ):
            raise ValueError("thresholds, min_volume and half_open_max_probes must be at least 1")
        if not 0 < failure_ratio <= 1:
            raise ValueError(f"failure_ratio must be in (0, 1], got {failure_ratio}")
        if not (window_s > 0 and reset_timeout_s > 0 and window_buckets >= 1):
            raise ValueError(
                "window_s and reset_timeout_s must be positive, window_buckets at least 1"
            )
        self.name = name
        self.failure_threshold = failure_threshold
        self.failure_ratio = failure_ratio
        self.min_volume = min_volume
        self.reset_timeout_s = reset_timeout_s
        self.half_open_max_probes = half_open_max_probes
        self.success_threshold = success_threshold
        self._clock = clock
        self._on_transition = on_transition
        self._window = _RollingWindow(window_s, window_buckets)
        self._state = BreakerState.CLOSED
        self._epoch = 0  # bumped on every transition; permits carry the one they got
        self._consecutive_failures = 0
        self._opened_at = -math.inf
        self._probes_in_flight = 0
        self._probe_successes = 0

    @property
    def state(self) -> BreakerState:
        """The current state (an OPEN breaker whose reset timeout passed is HALF_OPEN)."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.reset_timeout_s
        ):
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    def try_acquire(self) -> Permit | None:
        """A permit to call the upstream, or None: reject the call with CIRCUIT_OPEN."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit(self, self._epoch)
        if state is BreakerState.HALF_OPEN and self._probes_in_flight < self.half_open_max_probes:
            self._probes_in_flight += 1
            return Permit(self, self._epoch)
        return None

    def retry_after_s(self) -> float:
        """How long a rejected caller should wait (for RetryInfo); 0 when CLOSED."""
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self.reset_timeout_s - self._clock())
        if state is BreakerState.HALF_OPEN:
            return min(HALF_OPEN_RETRY_S, self.reset_timeout_s)
        return 0.0

    def _settle(self, epoch: int, outcome: int) -> None:
        if epoch != self._epoch:
            return
        if self._state is BreakerState.CLOSED:
            self._settle_closed(outcome)
        elif self._state is BreakerState.HALF_OPEN:
            self._settle_probe(outcome)

    def _settle_closed(self, outcome: int) -> None:
        if outcome == _IGNORE:
            return
        failed = outcome == _FAILURE
        window = self._window
        window.record(self._clock(), failed)
        if not failed:
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        volume = window.successes + window.failures
        if self._consecutive_failures >= self.failure_threshold or (
            volume >= self.min_volume and window.failures >= self.failure_ratio * volume
        ):
            self._transition(BreakerState.OPEN)

    def _settle_probe(self, outcome: int) -> None:
        if outcome == _FAILURE:
            self._transition(BreakerState.OPEN)
            return
        self._probes_in_flight -= 1
        if outcome == _SUCCESS:
            self._probe_successes += 1
            if self._probe_successes >= self.success_threshold:
                self._transition(BreakerState.CLOSED)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        elif new is BreakerState.HALF_OPEN:
            self._probes_in_flight = 0
            self._probe_successes = 0
        else:
            self._consecutive_failures = 0
            self._window.reset()
        if self._on_transition is not None:
            try:
                self._on_transition(self.name, old, new)
            except Exception:  # a metrics or logging bug must not break the call path
                log.exception("breaker %s: on_transition callback failed", self.name)
