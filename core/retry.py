"""When and how long to wait before retrying an upstream call: the pure policy.

Retries are safe only before anything reached the caller (a unary call, or a stream
that has not delivered its first chunk: `committed`), only on codes that mean "this
endpoint could not take the call", and never past the caller's deadline. The next
attempt should go to another endpoint; that choice is the pool's.

Default retryable codes: UNAVAILABLE only. Not RESOURCE_EXHAUSTED: an overloaded fleet
gets worse when every proxy multiplies its load, and the caller gets RetryInfo instead.
Not DEADLINE_EXCEEDED: an attempt runs on the caller's whole remaining deadline, so when
it expires there is no time left for another. A breaker rejection (CIRCUIT_OPEN) is not
an attempt at all: nothing was sent, the pool just picks another endpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Final, Protocol

import grpc

# Cap on the exponent so a large attempt number cannot overflow a float.
_MAX_EXPONENT: Final = 64


class Rng(Protocol):
    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """max_attempts counts the first call: 3 means at most 2 retries.

    min_attempt_s: an attempt that would start with less of the caller's deadline left
    cannot finish; the caller is better served by the original error (which carries
    RetryInfo) than by a DEADLINE_EXCEEDED.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    min_attempt_s: float = 0.05
    retryable_codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")
        if self.min_attempt_s < 0:
            raise ValueError(f"min_attempt_s must not be negative, got {self.min_attempt_s}")

    def backoff(self, attempt: int, rng: Rng | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1 = the first retry).

        Full jitter: uniform in [0, min(max_backoff, initial * multiplier^(attempt-1))).
        Spreading retries over the whole interval is what keeps many proxies that failed
        at the same moment from retrying at the same moment.
        """
        if attempt < 1:
            raise ValueError(f"attempt must be at least 1, got {attempt}")
        exponent = min(attempt - 1, _MAX_EXPONENT)
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**exponent)
        return ceiling * (rng.random() if rng is not None else random.random())

    def should_retry(
        self,
        code: grpc.StatusCode,
        attempt: int,
        time_remaining_s: float | None,
        backoff_s: float,
        *,
        committed: bool = False,
    ) -> bool:
        """Whether to retry after attempt number `attempt` (1-based) failed with `code`
        and a wait of `backoff_s`, given the caller's remaining time (None: no deadline).
        `committed`: something already reached the caller (a stream's first chunk)."""
        if committed or code not in self.retryable_codes or attempt >= self.max_attempts:
            return False
        return time_remaining_s is None or time_remaining_s - backoff_s >= self.min_attempt_s
