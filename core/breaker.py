"""A circuit breaker per upstream endpoint: the pure state machine.

What it is for. A breaker takes an endpoint out of the pool for everybody, so what
opens it must be something that is true for everybody: "this endpoint is failing calls
that would succeed elsewhere". Taken out it is for `reset_timeout_s`, every caller's
calls go elsewhere or get CIRCUIT_OPEN; so one caller must never be able to open it.
The first version opened on 5 consecutive INTERNAL/UNKNOWN/DEADLINE_EXCEEDED/UNAVAILABLE
answers: one caller repeating a request that made the agent crash (the calculator on
4294967296**40 -> INTERNAL), or one EventSource reconnecting into a stream that failed
mid-way, ejected the endpoint for everyone. What counts now, and why:

* Codes (`failure_codes`, default UNAVAILABLE only). UNAVAILABLE is what grpc reports
  when the connection fails, resets or is refused, and what a server says when it
  cannot take calls at all. INTERNAL and UNKNOWN say "this request broke the handler":
  request-specific, provoked at will by whoever sends that request. DEADLINE_EXCEEDED
  is the caller's own deadline (any caller can ask for a long answer in 1 ms).
  RESOURCE_EXHAUSTED is usually a per-caller quota upstream. Deployments may add codes.
* Distinct callers (`min_failing_callers`, default 3). Failures count only once they
  come from that many different callers within the window (CallInfo.identity: the
  verified JWT subject or API key, else the address; never the self-declared
  x-client-id, which any caller could mint). One caller alone, however many requests it
  sends, never opens it. Caveat: callers the proxy cannot tell apart (auth and limits both off, or every browser behind an edge
  that does not pass the client's address) are one caller, so only calls from elsewhere
  can open it (set `min_failing_callers: 1` where one trusted caller is all there is).
* Ratio over volume, not a short run: at least `min_volume` settled calls in the rolling
  `window_s`, of which at least `failure_ratio` failed. A handful of failures among many
  successes is a request problem, not an endpoint problem; and there is no "N in a row"
  rule, which any caller can satisfy between two other callers' calls.
* The health check is NOT a veto. SERVING from the endpoint says its process is up, not
  that its calls work (an agent whose model backend is down answers SERVING and fails
  every call: exactly the case only a breaker catches). What a health check does show
  (process gone, process hung) takes the endpoint out directly and faster: health
  following and the liveness probe in server/pool/health.py, whatever the traffic.

So the breaker opens only on an endpoint-wide, multi-caller failure that health cannot
see; a dead or hung endpoint is handled before it gets there. Breaker state also does
not decide the proxy's own readiness (server/request/health.py): an open breaker on every
endpoint still answers each call at once, with CIRCUIT_OPEN and RetryInfo.

States. CLOSED lets calls through and counts as above. OPEN rejects at once, for
`reset_timeout_s`. Then HALF_OPEN admits at most `half_open_max_probes` calls at a time
(everyone else is still rejected: a half-open state that lets every request through
hammers an upstream that is just coming back). `success_threshold`
probe successes close it. Probe failures re-open it once they come from
`min_failing_callers` distinct callers: one caller whose requests fail cannot keep it
open either, and a failed probe only frees its slot for the next caller's probe.

Usage, per call:

    permit = breaker.try_acquire(caller)
    if permit is None:  -> CircuitOpen(retry_delay_s=breaker.retry_after_s())
    ... call ...;  permit.record(code)   # or success() / failure() / ignore()

Every permit must be settled exactly once (later calls are no-ops), also when the call
is cancelled (`ignore()`), or a half-open probe slot stays taken. Single-threaded
(one asyncio loop), no locks. Memory is bounded whatever the traffic: the window keeps
counts per time slot and at most `min_failing_callers` caller keys per slot.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable, Collection
from typing import Final

import grpc

from aiproxy.core.types import Clock

log = logging.getLogger(__name__)


class BreakerState(enum.IntEnum):
    """The values are what the state gauge exports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


TransitionCallback = Callable[[str, BreakerState, BreakerState], None]
# Who is calling now (the caller key of the call in progress), for try_acquire().
CallerSource = Callable[[], str]


def _no_caller() -> str:
    return ""


# Codes that mean "the endpoint itself is in trouble" by default (see the module doc for
# why INTERNAL, UNKNOWN, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are not among them).
BREAKER_FAILURE_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE})

# What a caller rejected in HALF_OPEN is told to wait: a probe's outcome is known within
# one call's latency, so the full reset timeout would be far too pessimistic.
HALF_OPEN_RETRY_S: Final = 1.0


def is_breaker_failure(code: grpc.StatusCode) -> bool:
    """Whether an upstream call that ended with `code` counts against the endpoint (with
    the default codes)."""
    return code in BREAKER_FAILURE_CODES


_NEVER: Final = -(1 << 62)  # a slot number older than any clock reading


class _RollingWindow:
    """Successes, failures and failing callers over the last `window_s`, in `buckets`
    ring slots: O(1) memory and amortized O(1) time per event, whatever the traffic.

    Each slot keeps at most `callers_cap` failing caller keys: the breaker only asks
    "at least `callers_cap` distinct callers?", and if any slot holds that many the
    answer is yes, otherwise every slot holds all of its callers and the union is exact.
    """

    __slots__ = (
        "_bad",
        "_bucket_s",
        "_callers",
        "_callers_cap",
        "_head",
        "_ok",
        "failures",
        "successes",
    )

    def __init__(self, window_s: float, buckets: int, callers_cap: int = 1) -> None:
        self._bucket_s = window_s / buckets
        self._ok = [0] * buckets
        self._bad = [0] * buckets
        self._callers: list[set[str]] = [set() for _ in range(buckets)]
        self._callers_cap = callers_cap
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
            self._callers[slot].clear()
        self._head = index

    def record(self, now: float, failed: bool, caller: str = "") -> None:
        self.advance(now)
        slot = self._head % len(self._ok)
        if failed:
            self._bad[slot] += 1
            self.failures += 1
            callers = self._callers[slot]
            if len(callers) < self._callers_cap:
                callers.add(caller)
        else:
            self._ok[slot] += 1
            self.successes += 1

    def failing_callers(self) -> int:
        """Distinct callers with a failure in the window, counted up to `callers_cap`."""
        seen: set[str] = set()
        for callers in self._callers:
            seen |= callers
            if len(seen) >= self._callers_cap:
                return self._callers_cap
        return len(seen)

    def reset(self) -> None:
        size = len(self._ok)
        self._ok = [0] * size
        self._bad = [0] * size
        self._callers = [set() for _ in range(size)]
        self._head = _NEVER
        self.successes = self.failures = 0


class Permit:
    """Leave to make one call; settle it with its outcome, exactly once.

    A permit from an earlier state (e.g. issued while CLOSED, finishing after the
    breaker opened) is stale: its outcome is dropped, since it reflects what the
    breaker already acted on.
    """

    __slots__ = ("_breaker", "_caller", "_epoch", "_settled")

    def __init__(self, breaker: CircuitBreaker, epoch: int, caller: str) -> None:
        self._breaker = breaker
        self._epoch = epoch
        self._caller = caller
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
        """Settle by the call's final code: OK succeeds, the breaker's failure codes
        fail, anything else is ignored."""
        if code is grpc.StatusCode.OK:
            self._settle(_SUCCESS)
        elif code in self._breaker.failure_codes:
            self._settle(_FAILURE)
        else:
            self._settle(_IGNORE)

    def _settle(self, outcome: int) -> None:
        if not self._settled:
            self._settled = True
            self._breaker._settle(self._epoch, outcome, self._caller)


_SUCCESS, _FAILURE, _IGNORE = 0, 1, 2


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_ratio: float = 0.5,
        window_s: float = 10.0,
        min_volume: int = 20,
        min_failing_callers: int = 3,
        failure_codes: Collection[grpc.StatusCode] = BREAKER_FAILURE_CODES,
        reset_timeout_s: float = 30.0,
        half_open_max_probes: int = 1,
        success_threshold: int = 1,
        window_buckets: int = 10,
        clock: Clock = time.monotonic,
        on_transition: TransitionCallback | None = None,
        caller: CallerSource = _no_caller,
    ) -> None:
        if (
            min_volume < 1
            or min_failing_callers < 1
            or half_open_max_probes < 1
            or success_threshold < 1
        ):
            raise ValueError(
                "min_volume, min_failing_callers, half_open_max_probes and success_threshold must be at least 1"
            )
        if grpc.StatusCode.OK in failure_codes:
            raise ValueError("OK is not a failure code")
        if not 0 < failure_ratio <= 1:
            raise ValueError(f"failure_ratio must be in (0, 1], got {failure_ratio}")
        if not (window_s > 0 and reset_timeout_s > 0 and window_buckets >= 1):
            raise ValueError(
                "window_s and reset_timeout_s must be positive, window_buckets at least 1"
            )
        self.name = name
        self.failure_ratio = failure_ratio
        self.min_volume = min_volume
        self.min_failing_callers = min_failing_callers
        self.failure_codes = frozenset(failure_codes)
        self.reset_timeout_s = reset_timeout_s
        self.half_open_max_probes = half_open_max_probes
        self.success_threshold = success_threshold
        self._clock = clock
        self._on_transition = on_transition
        self._caller = caller
        self._window = _RollingWindow(window_s, window_buckets, min_failing_callers)
        self._state = BreakerState.CLOSED
        self._epoch = 0  # bumped on every transition; permits carry the one they got
        self._opened_at = -math.inf
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._probe_failers: set[str] = set()  # at most min_failing_callers keys

    @property
    def state(self) -> BreakerState:
        """The current state (an OPEN breaker whose reset timeout passed is HALF_OPEN)."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.reset_timeout_s
        ):
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    def try_acquire(self, caller: str | None = None) -> Permit | None:
        """A permit for `caller` (default: the injected caller source) to call the
        upstream, or None: reject the call with CIRCUIT_OPEN."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit(self, self._epoch, self._caller() if caller is None else caller)
        if state is BreakerState.HALF_OPEN and self._probes_in_flight < self.half_open_max_probes:
            self._probes_in_flight += 1
            return Permit(self, self._epoch, self._caller() if caller is None else caller)
        return None

    def endpoint_recovered(self) -> None:
        """The endpoint answers its health check again after it did not (restarted,
        resumed): an OPEN verdict was about the process that failed, so let probes
        decide now instead of after the rest of the reset timeout."""
        if self.state is BreakerState.OPEN:
            self._transition(BreakerState.HALF_OPEN)

    def retry_after_s(self) -> float:
        """How long a rejected caller should wait (for RetryInfo); 0 when CLOSED."""
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self.reset_timeout_s - self._clock())
        if state is BreakerState.HALF_OPEN:
            return min(HALF_OPEN_RETRY_S, self.reset_timeout_s)
        return 0.0

    def _settle(self, epoch: int, outcome: int, caller: str) -> None:
        if epoch != self._epoch:
            return
        if self._state is BreakerState.CLOSED:
            self._settle_closed(outcome, caller)
        elif self._state is BreakerState.HALF_OPEN:
            self._settle_probe(outcome, caller)

    def _settle_closed(self, outcome: int, caller: str) -> None:
        if outcome == _IGNORE:
            return
        failed = outcome == _FAILURE
        window = self._window
        window.record(self._clock(), failed, caller)
        if not failed:
            return
        volume = window.successes + window.failures
        if (
            volume >= self.min_volume
            and window.failures >= self.failure_ratio * volume
            and window.failing_callers() >= self.min_failing_callers
        ):
            self._transition(BreakerState.OPEN)

    def _settle_probe(self, outcome: int, caller: str) -> None:
        self._probes_in_flight -= 1
        if outcome == _FAILURE:
            if len(self._probe_failers) < self.min_failing_callers:
                self._probe_failers.add(caller)
            if len(self._probe_failers) >= self.min_failing_callers:
                self._transition(BreakerState.OPEN)
            return
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
            self._probe_failers = set()
        else:
            self._window.reset()
        if self._on_transition is not None:
            try:
                self._on_transition(self.name, old, new)
            except Exception:  # a metrics or logging bug must not break the call path
                log.exception("breaker %s: on_transition callback failed", self.name)
