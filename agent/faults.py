"""Fault injection: request metadata that makes the agent fail, stall or slow down.

Honoured only when the agent runs with enable_faults; otherwise the keys are ignored.
This is the interface other tools (proxy tests, benchmarks, demos) rely on:

  x-fault-code      gRPC status name (or number) to fail with, e.g. UNAVAILABLE
  x-fault-after     chunks to send before failing (default 0: fail before the first);
                    a stream with no more than that many chunks completes normally.
                    Unary calls fail before their response whatever the value.
  x-fault-delay-ms  extra delay before the first chunk, or before the unary response
  x-fault-hang      true-ish ("1", "true", "yes", "on"): never answer, until the caller
                    cancels or its deadline passes (honours x-fault-after too)
  x-fault-rate      0..1, fraction of calls that fail (with x-fault-code, default
                    UNAVAILABLE); on BatchGenerate it applies to each prompt instead
  x-fault-slow-ms   per-token delay override, to slow a call down

A malformed value fails the call with INVALID_ARGUMENT naming the key.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import grpc

from aiproxy.agent.errors import InvalidArgument

CODE = "x-fault-code"
AFTER = "x-fault-after"
DELAY_MS = "x-fault-delay-ms"
HANG = "x-fault-hang"
RATE = "x-fault-rate"
SLOW_MS = "x-fault-slow-ms"
KEYS = frozenset({CODE, AFTER, DELAY_MS, HANG, RATE, SLOW_MS})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_CODES_BY_NAME = {c.name: c for c in grpc.StatusCode if c is not grpc.StatusCode.OK}
_CODES_BY_NUMBER = {c.value[0]: c for c in _CODES_BY_NAME.values()}


@dataclass(frozen=True)
class FaultSpec:
    """What a call's metadata asks for. The default instance asks for nothing."""

    code: grpc.StatusCode | None = None
    after: int = 0
    delay_ms: float = 0.0
    hang: bool = False
    rate: float | None = None
    slow_ms: float | None = None

    @property
    def failure_code(self) -> grpc.StatusCode:
        return self.code or grpc.StatusCode.UNAVAILABLE

    @property
    def wants_failure(self) -> bool:
        return self.code is not None or self.hang or self.rate is not None

    def roll_call(self, per_item: bool = False) -> bool:
        """Whether this call fails (or hangs). Rolls the dice once per call.

        With `per_item`, a rate is left for the handler to roll per item (roll_item).
        """
        if not self.wants_failure or (per_item and self.rate is not None and not self.hang):
            return False
        return self.rate is None or random.random() < self.rate

    def roll_item(self) -> grpc.StatusCode | None:
        """The code one item of a batch fails with, or None if it succeeds."""
        if self.rate is None or self.hang:
            return None
        return self.failure_code if random.random() < self.rate else None


NO_FAULTS = FaultSpec()
_current: ContextVar[FaultSpec] = ContextVar("agent_faults", default=NO_FAULTS)


def current() -> FaultSpec:
    """The faults of the call being handled (NO_FAULTS outside a call, or when disabled)."""
    return _current.get()


@contextlib.contextmanager
def active(spec: FaultSpec) -> Iterator[None]:
    """Make `spec` the current call's faults while a handler runs (same task, so it sees it)."""
    token = _current.set(spec)
    try:
        yield
    finally:
        _current.reset(token)


def parse(metadata: Iterable[tuple[str, str | bytes]]) -> FaultSpec:
    """The FaultSpec in request metadata; raises InvalidArgument naming a bad key."""
    values = {k: v for k, v in metadata if k in KEYS and isinstance(v, str)}
    if not values:
        return NO_FAULTS
    return FaultSpec(
        code=_code(values[CODE]) if CODE in values else None,
        after=_count(AFTER, values[AFTER]) if AFTER in values else 0,
        delay_ms=_millis(DELAY_MS, values[DELAY_MS]) if DELAY_MS in values else 0.0,
        hang=_flag(HANG, values[HANG]) if HANG in values else False,
        rate=_fraction(RATE, values[RATE]) if RATE in values else None,
        slow_ms=_millis(SLOW_MS, values[SLOW_MS]) if SLOW_MS in values else None,
    )


def _code(raw: str) -> grpc.StatusCode:
    text = raw.strip().upper()
    code = _CODES_BY_NUMBER.get(int(text)) if text.isdigit() else _CODES_BY_NAME.get(text)
    if code is None:
        raise InvalidArgument(
            CODE, f"{raw!r} is not a non-OK gRPC status code name, e.g. UNAVAILABLE"
        )
    return code


def _count(key: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidArgument(key, f"{raw!r} is not a non-negative integer")
    return value


def _millis(key: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not (0 <= value < math.inf):
        raise InvalidArgument(key, f"{raw!r} is not a non-negative number of milliseconds")
    return value


def _fraction(key: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not (0 <= value <= 1):
        raise InvalidArgument(key, f"{raw!r} is not a fraction between 0 and 1")
    return value


def _flag(key: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidArgument(key, f"{raw!r} is not a boolean (1/true/yes/on or 0/false/no/off)")
