"""The limits store: where per-caller limit state lives, behind one async interface.

Three kinds of state, each keyed by a caller (or tenant) key the limits stage chooses:

- request rate: a token bucket per key (`take`), the spec passed on each call so the
  store holds no policy (overrides and tenants are resolved by the caller of the store);
- open streams: leases per key (`acquire_stream` / `release_stream`). In a shared store
  a lease expires unless its holder renews it, so a replica that dies frees its callers'
  slots within one TTL; the store renews the leases it holds by itself, in one batch;
- LLM tokens: a tokens-per-minute bucket per caller and a daily budget (UTC day) per
  caller or tenant. `reserve_tokens` checks and takes from both at once, all or nothing,
  at admission (max_tokens, or an estimate); `settle_tokens` corrects by what the call
  actually used (actual - reserved), once however often it is called.

A call uses `admit` at its start (request token, then stream lease and tokens, both or
neither) and `finish` at its end (release and settle): one step, and with Redis one
round trip, at each end. The single operations exist for callers that need one of them.

`LimitStore` is the interface; `MemoryLimitStore` is the embedded backend (one process,
nothing to run) and `server/stores/redis_limits.py` the shared one. Every method is async so the
interceptor has one code path; the memory backend never suspends, and also offers
`*_nowait` twins (`store.local` says they exist) that skip the coroutine: ~2 us per call
(bench/limits_cost.py), 0.2 % of a proxied call, so awaiting is fine everywhere.

Single-threaded by design (one asyncio loop per process); nothing here locks.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Generic, Literal, NamedTuple, Protocol, TypeVar, runtime_checkable

import grpc

from aiproxy.core.errors import ProxyError, QuotaViolation, RateLimited, Reason
from aiproxy.core.ratelimit import (
    Decision,
    LimitSpec,
    TokenBucket,
    concurrency_limited_error,
    rate_limited_error,
)
from aiproxy.core.types import Clock

_EPS: Final = 1e-9
DAY_S: Final = 86_400

TokenQuota = Literal["tokens_per_minute", "tokens_per_day"]
TOKENS_PER_MINUTE: Final[TokenQuota] = "tokens_per_minute"
TOKENS_PER_DAY: Final[TokenQuota] = "tokens_per_day"


# ---- Value types ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenLimits:
    """A caller's token quotas; None means that quota is not enforced.

    per_minute: a bucket of that many tokens refilled continuously over a minute;
    per_day: a budget per UTC day (reset at 00:00 UTC, the same instant everywhere).
    """

    per_minute: int | None = None
    per_day: int | None = None

    def __post_init__(self) -> None:
        for name in ("per_minute", "per_day"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or None, got {value}")

    @property
    def enforced(self) -> bool:
        return self.per_minute is not None or self.per_day is not None


class TokenBudget(NamedTuple):
    """What is left after a reservation (or when it was refused), for x-ratelimit-* headers.

    Fields are 0/None when the quota is not enforced. `minute_remaining` can be negative:
    a call that used more than it reserved leaves the bucket in debt.
    """

    minute_limit: int | None
    minute_remaining: int
    minute_reset_s: float  # until the per-minute bucket is full again
    day_limit: int | None
    day_remaining: int
    day_reset_s: float  # until 00:00 UTC

    def headers(self) -> tuple[tuple[str, str], ...]:
        """x-ratelimit-*-tokens (the per-minute bucket, OpenAI's header names) and
        x-ratelimit-*-tokens-day (the daily budget); reset in whole seconds, rounded up."""
        out: list[tuple[str, str]] = []
        if self.minute_limit is not None:
            out += [
                ("x-ratelimit-limit-tokens", str(self.minute_limit)),
                ("x-ratelimit-remaining-tokens", str(max(0, self.minute_remaining))),
                ("x-ratelimit-reset-tokens", str(math.ceil(self.minute_reset_s))),
            ]
        if self.day_limit is not None:
            out += [
                ("x-ratelimit-limit-tokens-day", str(self.day_limit)),
                ("x-ratelimit-remaining-tokens-day", str(max(0, self.day_remaining))),
                ("x-ratelimit-reset-tokens-day", str(math.ceil(self.day_reset_s))),
            ]
        return tuple(out)


@dataclass(slots=True, eq=False)
class Reservation:
    """Tokens taken at admission; settle it once with what the call actually used.

    `id` is unique per store; `day` is the UTC day (days since the epoch) it was charged
    to, so a call that ends after midnight corrects the day it was charged to.
    `backend` tells a store with a fallback which one holds it.
    """

    id: str
    key: str
    budget_key: str
    amount: int
    limits: TokenLimits
    day: int
    budget: TokenBudget
    backend: str = "memory"
    settled: bool = field(default=False)


class TokenRejection(NamedTuple):
    """A refused reservation: which quota, when retrying can succeed, what is left."""

    quota: TokenQuota
    retry_after_s: float
    budget: TokenBudget


@dataclass(slots=True, eq=False)
class StreamLease:
    """One open stream's slot; release it with `store.release_stream(lease)` (idempotent)."""

    id: str
    key: str
    limit: int
    backend: str = "memory"
    released: bool = field(default=False)


Refusal = Literal["rate", "streams", "tokens_per_minute", "tokens_per_day"]


@dataclass(slots=True, eq=False)
class Admission:
    """The outcome of `admit`: everything one call takes at its start, in one step.

    decision: the request bucket's answer (x-ratelimit-* headers, RetryInfo when refused
    for rate); refused: None when admitted, else which limit refused; lease and
    reservation: what was taken (None when not asked for, or refused); tokens: the token
    budget left, or the TokenRejection when a token quota refused.
    """

    decision: Decision
    refused: Refusal | None = None
    lease: StreamLease | None = None
    reservation: Reservation | None = None
    rejection: TokenRejection | None = None
    stream_limit: int = 0
    # The key whose limit refused: the sub-bucket's when a declared id's own bucket
    # refused (see `admit`), else "" (the caller's key).
    refused_key: str = ""

    @property
    def allowed(self) -> bool:
        return self.refused is None


# ---- Errors for rejections --------------------------------------------------------------


def token_limited_error(key: str, rejection: TokenRejection) -> RateLimited:
    """RESOURCE_EXHAUSTED (RATE_LIMITED) for a refused token reservation: RetryInfo at the
    refill (per minute) or at 00:00 UTC (per day), QuotaFailure naming the quota."""
    budget = rejection.budget
    if rejection.quota == TOKENS_PER_MINUTE:
        limit, what = budget.minute_limit, "tokens per minute"
    else:
        limit, what = budget.day_limit, "tokens per day (UTC)"
    return RateLimited(
        "token quota exceeded",
        metadata={"quota": rejection.quota, "limit": str(limit)},
        retry_delay_s=rejection.retry_after_s,
        quota_violations=(QuotaViolation(key, f"at most {limit} {what}"),),
    )


def refusal_error(key: str, admission: Admission, stream_retry_s: float = 1.0) -> ProxyError:
    """The RESOURCE_EXHAUSTED for a refused `admission` (rate, streams or tokens)."""
    if admission.refused == "rate":
        return rate_limited_error(key, admission.decision)
    if admission.refused == "streams":
        return concurrency_limited_error(key, admission.stream_limit, stream_retry_s)
    if admission.rejection is not None:
        return token_limited_error(key, admission.rejection)
    raise ValueError("the admission was not refused")


class LimitsUnavailable(ProxyError):
    """The shared limits store cannot be reached and the policy is fail_closed."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.LIMITS_UNAVAILABLE
    default_message = "limits service unavailable"


# ---- The interface ----------------------------------------------------------------------


@runtime_checkable
class LimitStore(Protocol):
    """Per-caller limit state, local or shared. All methods are safe to call concurrently
    from one event loop; none blocks the loop; the shared backend bounds every wait."""

    @property
    def local(self) -> bool:
        """True when state is in this process and the `*_nowait` twins exist."""
        ...

    async def take(self, key: str, spec: LimitSpec, n: int = 1) -> Decision:
        """Take `n` request tokens from `key`'s bucket (shaped by `spec`)."""
        ...

    async def acquire_stream(self, key: str, limit: int) -> StreamLease | None:
        """A lease on one of `key`'s `limit` stream slots, or None when all are held."""
        ...

    async def release_stream(self, lease: StreamLease) -> None:
        """Free the slot; a second call does nothing."""
        ...

    async def reserve_tokens(
        self, key: str, amount: int, limits: TokenLimits, *, budget_key: str | None = None
    ) -> Reservation | TokenRejection:
        """Take `amount` tokens from `key`'s per-minute bucket and `budget_key`'s
        (default `key`) daily budget, both or neither."""
        ...

    async def settle_tokens(self, reservation: Reservation, actual: int) -> None:
        """Correct the reservation by `actual - reservation.amount`; once."""
        ...

    async def admit(
        self,
        key: str,
        spec: LimitSpec,
        *,
        stream_limit: int = 0,
        tokens: int = 0,
        token_limits: TokenLimits | None = None,
        budget_key: str | None = None,
        sub_key: str | None = None,
        sub_spec: LimitSpec | None = None,
    ) -> Admission:
        """Everything a call takes at its start in one step (one round trip when shared):
        a request token; then, if asked (stream_limit > 0, token_limits enforced), a
        stream lease and a token reservation, both or neither. A call refused by the
        streams or tokens still spent its request token (retrying in a loop is limited).

        `sub_key` / `sub_spec`: a bucket inside `key`'s (a caller-declared id's share of
        its address's or identity's budget). The request token is taken from both or
        from neither: `key`'s bucket is always charged, so declaring ids (any number of
        them) never adds to `key`'s budget; the sub-bucket can only refuse sooner. A
        refusal by the sub-bucket sets `refused_key`. Streams and tokens are `key`'s."""
        ...

    async def finish(
        self, lease: StreamLease | None, reservation: Reservation | None, actual_tokens: int = 0
    ) -> None:
        """The end of a call in one step: release the lease, settle the reservation with
        the tokens actually used. Idempotent, like its two halves."""
        ...

    async def aclose(self) -> None:
        """Stop background work and release connections."""
        ...


# ---- The memory backend -----------------------------------------------------------------


class TokenMeter:
    """A bucket of LLM tokens refilled continuously that may go into debt.

    Unlike a request TokenBucket it takes amounts larger than its capacity (a call whose
    max_tokens exceeds the per-minute limit is admitted when the bucket is full and leaves
    it in debt: refusing it forever would be worse), and `adjust` gives back or charges
    the difference between reserved and used.
    """

    __slots__ = ("_clock", "_rate", "_stamp", "capacity", "level")

    def __init__(self, capacity: int, window_s: float, clock: Clock) -> None:
        self.capacity = capacity
        self._rate = capacity / window_s
        self._clock = clock
        self.level = float(capacity)
        self._stamp = clock()

    @property
    def last_used(self) -> float:
        return self._stamp

    def refill(self) -> float:
        now = self._clock()
        if now > self._stamp:
            self.level = min(float(self.capacity), self.level + (now - self._stamp) * self._rate)
            self._stamp = now
        return self.level

    def shortfall_s(self, amount: int) -> float:
        """0 when `amount` can be taken now (call `refill` first), else how long to wait."""
        need = min(amount, self.capacity)
        if self.level + _EPS >= need:
            return 0.0
        return (need - self.level) / self._rate

    def adjust(self, delta: float) -> None:
        """Charge `delta` tokens (negative gives back, never above capacity)."""
        self.level = min(float(self.capacity), self.level - delta)

    def reset_s(self) -> float:
        return (self.capacity - self.level) / self._rate


V = TypeVar("V")


class _Lru(Generic[V]):
    """An LRU map dropping idle entries (`last_used` older than `idle_s`) and, past
    `max_keys`, the least recently used one (the bound KeyedLimiter documents)."""

    __slots__ = ("_clock", "_items", "idle_s", "max_keys")

    def __init__(self, max_keys: int, idle_s: float, clock: Clock) -> None:
        self._items: OrderedDict[str, V] = OrderedDict()
        self.max_keys = max_keys
        self.idle_s = idle_s
        self._clock = clock

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, item: V) -> None:
        if len(self._items) >= self.max_keys:
            self._items.popitem(last=False)
        self._items[key] = item

    def set(self, key: str, item: V) -> None:
        """Replace `key`'s item (most recently used), or add it."""
        if key in self._items:
            self._items[key] = item
            self._items.move_to_end(key)
        else:
            self.put(key, item)

    def oldest(self) -> V | None:
        return next(iter(self._items.values()), None)

    def pop_oldest(self) -> None:
        self._items.popitem(last=False)

    def evict_idle(self, last_used: Callable[[V], float]) -> None:
        horizon = self._clock() - self.idle_s
        items = self._items
        while items:
            oldest = next(iter(items.values()))
            if last_used(oldest) > horizon:
                return
            items.popitem(last=False)


_ids = itertools.count(1)


class MemoryLimitStore:
    """The embedded backend: state in this process, limits per process.

    `clock` (monotonic) drives the buckets, `wall_clock` (epoch seconds) the UTC day;
    both injectable. Memory is bounded by `max_keys` per kind of state; idle request
    buckets are dropped once they would be full (which forgives nothing), token meters
    likewise, and day counters when their day is over.
    """

    local: Final = True

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        name: str = "memory",
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self._clock = clock
        self._wall = wall_clock
        self.name = name
        # A bucket idle for its refill time is full: the LRU's own TTL is a backstop for
        # specs that change, the per-bucket check below is the rule.
        self._buckets: _Lru[tuple[LimitSpec, TokenBucket]] = _Lru(max_keys, math.inf, clock)
        self._meters: _Lru[TokenMeter] = _Lru(max_keys, 60.0, clock)
        self._days: _Lru[tuple[int, int]] = _Lru(max_keys, math.inf, clock)  # key -> (day, used)
        self._streams: dict[str, int] = {}

    # -- request rate

    def take_nowait(self, key: str, spec: LimitSpec, n: int = 1) -> Decision:
        self._evict_full_buckets()
        return self._bucket(key, spec).try_acquire(n)

    def _bucket(self, key: str, spec: LimitSpec) -> TokenBucket:
        entry = self._buckets.get(key)
        if entry is None or (entry[0] is not spec and entry[0] != spec):
            entry = (spec, TokenBucket(spec.rate_per_s, spec.burst, self._clock))
            self._buckets.put(key, entry)
        return entry[1]

    async def take(self, key: str, spec: LimitSpec, n: int = 1) -> Decision:
        return self.take_nowait(key, spec, n)

    def _evict_full_buckets(self) -> None:
        """Drop buckets from the LRU end while they have been idle past their refill time
        (so they are full): amortized O(1) per call."""
        buckets = self._buckets
        if not len(buckets):
            return
        now = self._clock()
        while (oldest := buckets.oldest()) is not None:
            spec, bucket = oldest
            if now - bucket.last_used < spec.refill_s:
                return
            buckets.pop_oldest()

    # -- stream leases (no expiry needed: they die with the process that holds them)

    def acquire_stream_nowait(self, key: str, limit: int) -> StreamLease | None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        count = self._streams.get(key, 0)
        if count >= limit:
            return None
        self._streams[key] = count + 1
        return StreamLease(f"{self.name}:{next(_ids)}", key, limit, self.name)

    async def acquire_stream(self, key: str, limit: int) -> StreamLease | None:
        return self.acquire_stream_nowait(key, limit)

    def release_stream_nowait(self, lease: StreamLease) -> None:
        if lease.released:
            return
        lease.released = True
        count = self._streams.get(lease.key, 0) - 1
        if count > 0:
            self._streams[lease.key] = count
        else:
            self._streams.pop(lease.key, None)

    async def release_stream(self, lease: StreamLease) -> None:
        self.release_stream_nowait(lease)

    def streams_in_use(self, key: str) -> int:
        return self._streams.get(key, 0)

    # -- tokens

    def _day(self) -> tuple[int, float]:
        """(UTC day number, seconds until the next one)."""
        now = self._wall()
        day = int(now // DAY_S)
        return day, (day + 1) * DAY_S - now

    def _meter(self, key: str, per_minute: int) -> TokenMeter:
        self._meters.evict_idle(lambda m: m.last_used)
        meter = self._meters.get(key)
        if meter is None or meter.capacity != per_minute:
            meter = TokenMeter(per_minute, 60.0, self._clock)
            self._meters.put(key, meter)
        meter.refill()
        return meter

    def _day_used(self, budget_key: str, day: int) -> int:
        days = self._days
        while (oldest := days.oldest()) is not None and oldest[0] < day:
            days.pop_oldest()  # a counter of a day that is over: nothing to keep
        entry = self._days.get(budget_key)
        return entry[1] if entry is not None and entry[0] == day else 0

    def reserve_tokens_nowait(
        self, key: str, amount: int, limits: TokenLimits, *, budget_key: str | None = None
    ) -> Reservation | TokenRejection:
        if amount < 0:
            raise ValueError(f"amount must not be negative, got {amount}")
        budget_key = budget_key or key
        day, day_reset = self._day()
        meter = self._meter(key, limits.per_minute) if limits.per_minute is not None else None
        used = self._day_used(budget_key, day) if limits.per_day is not None else 0

        # Check both quotas before taking from either: all or nothing.
        minute_wait = meter.shortfall_s(amount) if meter is not None else 0.0
        day_wait = 0.0
        if limits.per_day is not None and used + min(amount, limits.per_day) > limits.per_day:
            day_wait = day_reset
        if minute_wait or day_wait:
            quota = TOKENS_PER_DAY if day_wait >= minute_wait else TOKENS_PER_MINUTE
            budget = self._budget(limits, meter, used, day_reset)
            return TokenRejection(quota, max(minute_wait, day_wait), budget)

        if meter is not None:
            meter.adjust(amount)
        if limits.per_day is not None:
            used += amount
            self._days.set(budget_key, (day, used))
        return Reservation(
            f"{self.name}:{next(_ids)}",
            key,
            budget_key,
            amount,
            limits,
            day,
            self._budget(limits, meter, used, day_reset),
            self.name,
        )

    async def reserve_tokens(
        self, key: str, amount: int, limits: TokenLimits, *, budget_key: str | None = None
    ) -> Reservation | TokenRejection:
        return self.reserve_tokens_nowait(key, amount, limits, budget_key=budget_key)

    def settle_tokens_nowait(self, reservation: Reservation, actual: int) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        delta = max(0, actual) - reservation.amount
        if not delta:
            return
        limits = reservation.limits
        if limits.per_minute is not None:
            meter = self._meter(reservation.key, limits.per_minute)
            meter.adjust(delta)
        if limits.per_day is not None:
            entry = self._days.get(reservation.budget_key)
            if entry is not None and entry[0] == reservation.day:  # that day still counts
                self._days.set(reservation.budget_key, (entry[0], max(0, entry[1] + delta)))

    async def settle_tokens(self, reservation: Reservation, actual: int) -> None:
        self.settle_tokens_nowait(reservation, actual)

    def token_budget(
        self, key: str, limits: TokenLimits, *, budget_key: str | None = None
    ) -> TokenBudget:
        """What `key` has left now, without taking anything."""
        day, day_reset = self._day()
        meter = self._meter(key, limits.per_minute) if limits.per_minute is not None else None
        used = self._day_used(budget_key or key, day) if limits.per_day is not None else 0
        return self._budget(limits, meter, used, day_reset)

    @staticmethod
    def _budget(
        limits: TokenLimits, meter: TokenMeter | None, used: int, day_reset: float
    ) -> TokenBudget:
        return TokenBudget(
            limits.per_minute,
            math.floor(meter.level + _EPS) if meter is not None else 0,
            meter.reset_s() if meter is not None else 0.0,
            limits.per_day,
            (limits.per_day - used) if limits.per_day is not None else 0,
            day_reset if limits.per_day is not None else 0.0,
        )

    # -- one step per call

    def admit_nowait(
        self,
        key: str,
        spec: LimitSpec,
        *,
        stream_limit: int = 0,
        tokens: int = 0,
        token_limits: TokenLimits | None = None,
        budget_key: str | None = None,
        sub_key: str | None = None,
        sub_spec: LimitSpec | None = None,
    ) -> Admission:
        self._evict_full_buckets()
        sub = None
        if sub_key is not None and sub_spec is not None:
            # Inner first, without taking: a refusal there charges neither bucket.
            sub = self._bucket(sub_key, sub_spec)
            peeked = sub.peek()
            if not peeked.allowed:
                return Admission(peeked, "rate", stream_limit=stream_limit, refused_key=sub_key)
        decision = self._bucket(key, spec).try_acquire()
        if not decision.allowed:
            return Admission(decision, "rate", stream_limit=stream_limit)
        if sub is not None:
            inner = sub.try_acquire()  # peeked above, nothing ran since: it admits
            if inner.remaining < decision.remaining:
                decision = inner  # the headers tell the tighter of the two
        # Check the stream slot before reserving tokens: a reservation cannot fail after
        # the lease was taken, so nothing is ever taken and given back.
        if stream_limit and self._streams.get(key, 0) >= stream_limit:
            return Admission(decision, "streams", stream_limit=stream_limit)
        reservation = None
        if token_limits is not None and token_limits.enforced:
            outcome = self.reserve_tokens_nowait(key, tokens, token_limits, budget_key=budget_key)
            if isinstance(outcome, TokenRejection):
                return Admission(decision, outcome.quota, None, None, outcome, stream_limit)
            reservation = outcome
        lease = self.acquire_stream_nowait(key, stream_limit) if stream_limit else None
        return Admission(decision, None, lease, reservation, None, stream_limit)

    async def admit(
        self,
        key: str,
        spec: LimitSpec,
        *,
        stream_limit: int = 0,
        tokens: int = 0,
        token_limits: TokenLimits | None = None,
        budget_key: str | None = None,
        sub_key: str | None = None,
        sub_spec: LimitSpec | None = None,
    ) -> Admission:
        return self.admit_nowait(
            key,
            spec,
            stream_limit=stream_limit,
            tokens=tokens,
            token_limits=token_limits,
            budget_key=budget_key,
            sub_key=sub_key,
            sub_spec=sub_spec,
        )

    def finish_nowait(
        self, lease: StreamLease | None, reservation: Reservation | None, actual_tokens: int = 0
    ) -> None:
        if lease is not None:
            self.release_stream_nowait(lease)
        if reservation is not None:
            self.settle_tokens_nowait(reservation, actual_tokens)

    async def finish(
        self, lease: StreamLease | None, reservation: Reservation | None, actual_tokens: int = 0
    ) -> None:
        self.finish_nowait(lease, reservation, actual_tokens)

    async def aclose(self) -> None:
        return None
