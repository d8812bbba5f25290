"""Deadlines: how long an upstream call may take, per method.

Each method has a default (used when the caller set no deadline) and a maximum; the
effective timeout is the tighter of the caller's remaining time and the maximum, and it
is what the upstream call gets, so a caller who leaves early or a runaway generation
never holds an upstream past it. The defaults: 30 s for unary calls, 2 min for streams,
5 min for agent runs (streamed or not: the run is what is long).

When the caller's own deadline is the binding one, the proxy ends the call a little
before it (`EndMargin`): when the caller's deadline fires, grpc-core cancels the call
under the proxy's feet, so a stream's body just stops (no final chunk, nothing for a
browser to read), a unary call gets a bare 504 without ErrorInfo, and the proxy can only
count it as CANCELLED. Ending it first lets the proxy answer DEADLINE_EXCEEDED itself,
with ErrorInfo and, for a stream, the in-band final error chunk, cancel the upstream
call, and count the call as DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiproxy.core.callinfo import CallInfo
from aiproxy.core.errors import DeadlineExceeded
from aiproxy.core.service import Method, Service
from aiproxy.core.types import Clock, Context


@dataclass(frozen=True, slots=True)
class DeadlineLimit:
    """default_s applies when the caller set no deadline; max_s caps any deadline."""

    default_s: float
    max_s: float

    def __post_init__(self) -> None:
        if not 0 < self.default_s <= self.max_s:
            raise ValueError(f"need 0 < default_s <= max_s, got {self.default_s} and {self.max_s}")


@dataclass(frozen=True, slots=True)
class EndMargin:
    """How long before the caller's deadline the proxy ends the call itself.

    `ratio` of the caller's remaining time, at least `min_s`, at most `max_s`, and never
    more than half of the remaining time (a caller in a hurry still gets a try).
    """

    ratio: float = 0.0
    min_s: float = 0.0
    max_s: float = 0.0

    def for_remaining(self, remaining_s: float) -> float:
        if remaining_s <= 0:
            return 0.0
        return min(max(self.min_s, self.ratio * remaining_s), self.max_s, remaining_s / 2)


NO_MARGIN: Final = EndMargin()


class MethodDeadlines:
    """Deadline limits keyed by full method path ("/ai.agent.v1.AgentService/Chat").

    Unknown paths get `default`; nothing is cached per path, since callers choose the
    paths and a cache would grow with them.
    """

    def __init__(
        self,
        default: DeadlineLimit,
        per_method: Mapping[str, DeadlineLimit] | None = None,
        margin: EndMargin = NO_MARGIN,
    ) -> None:
        self.default = default
        self.per_method = dict(per_method or {})
        self.margin = margin

    @classmethod
    def for_service(
        cls,
        service: Service,
        *,
        unary: DeadlineLimit,
        stream: DeadlineLimit,
        agent: DeadlineLimit,
        overrides: Mapping[str, DeadlineLimit] | None = None,
        margin: EndMargin = NO_MARGIN,
    ) -> MethodDeadlines:
        """Limits for every method of `service`: `overrides` (by bare method name) first,
        then the method's deadline class (agent runs, streams, unary calls)."""
        overrides = overrides or {}
        unknown = set(overrides) - set(service.by_name)
        if unknown:
            raise ValueError(f"{service.name} has no methods {sorted(unknown)}")
        by_class = {"unary": unary, "stream": stream, "agent": agent}
        per_method = {
            m.path: overrides.get(m.name) or by_class[m.deadline_class] for m in service.methods
        }
        return cls(unary, per_method, margin)

    def limit_for(self, method: str) -> DeadlineLimit:
        return self.per_method.get(method, self.default)

    def effective_timeout(self, method: str, caller_remaining_s: float | None) -> float:
        """Seconds the call may take: the method's default when the caller set no
        deadline, else the tighter of the caller's remaining time (less the end margin)
        and the maximum. 0 means the caller's deadline already passed: fail with
        DEADLINE_EXCEEDED."""
        limit = self.limit_for(method)
        if caller_remaining_s is None:
            return limit.default_s
        caller_s = caller_remaining_s - self.margin.for_remaining(caller_remaining_s)
        return max(0.0, min(caller_s, limit.max_s))


@dataclass(frozen=True, slots=True, order=True)
class Deadline:
    """A point in monotonic time by which something must be done (as in grpclib)."""

    expires_at: float
    clock: Clock = field(default=time.monotonic, compare=False, repr=False)

    @classmethod
    def from_timeout(cls, timeout_s: float, clock: Clock = time.monotonic) -> Deadline:
        return cls(clock() + timeout_s, clock)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.expires_at - self.clock())

    @property
    def expired(self) -> bool:
        return self.clock() >= self.expires_at


class _Bound:
    __slots__ = ("_deadlines", "_path")
    exit = None

    def __init__(self, deadlines: MethodDeadlines, path: str) -> None:
        self._deadlines, self._path = deadlines, path

    async def enter(self, call: CallInfo, request: Any, context: Context) -> None:
        timeout = self._deadlines.effective_timeout(self._path, context.time_remaining())
        if timeout <= 0:
            raise DeadlineExceeded("the caller's deadline had passed before the call started")
        call.timeout_s = timeout


class DeadlineStage:
    """Stage: fix each AgentService call's effective deadline.

    The result goes into CallInfo.timeout_s, which the forwarder gives the upstream call
    (and every retry, as what is left of it) and by which it ends the call itself with
    DEADLINE_EXCEEDED (streams: in-band first). A caller whose deadline has already passed
    is answered DEADLINE_EXCEEDED without an upstream call. Other services (health,
    reflection) never reach the pipeline and keep the caller's deadline as it is.
    """

    def __init__(self, deadlines: MethodDeadlines) -> None:
        self._deadlines = deadlines

    def bind(self, method: Method) -> _Bound | None:
        if method.path not in self._deadlines.per_method:
            return None
        return _Bound(self._deadlines, method.path)
