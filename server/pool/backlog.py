"""How long a new call waits before the proxy's gRPC server takes it.

grpc-core queues new calls until grpc.aio asks for the next one, and grpc.aio asks from
the event loop, one call per method per turn; that queue is invisible from Python (see
interceptors/overload.py). So the proxy measures it the way a caller experiences it: a
probe call to its own listener. The API's methods are registered (server/request/
pipeline.py), so grpc-core keeps one queue per method: the probe calls each method that
is taking calls, with this process's probe token in `x-aiproxy-probe`, which the gate
answers at once, before any other work. Its round trip is that method's wait; while a
probe is out, its age is a lower bound of the wait, so a queue that keeps growing is
seen before the probe comes back. `delay()` is the longest wait of all methods.

Without `paths`, one probe on a path no handler serves (the queue of unregistered
methods), as before registered methods. One probe at a time per method, every
`interval_s`, and only to methods that took calls since their last probe (or whose last
wait was long): an idle proxy is not probed; on their own connection. With `idle` (the
gate's `next_call`) and `in_flight`, a probe loop with nothing to measure and no call open
sleeps until the next call arrives instead of looking every `interval_s`: an idle replica
uses no CPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

import grpc

# No handler serves this path; the probe's only job is to be queued and taken.
PROBE_PATH: Final = "/aiproxy.internal.v1.Backlog/Probe"


class BacklogProbe:
    def __init__(
        self,
        target: str,
        *,
        interval_s: float = 0.1,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        paths: Sequence[str] = (),
        taken: Mapping[str, int] | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        idle: Callable[[], Awaitable[None]] | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self._target = target
        self.interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._paths = tuple(paths) or (PROBE_PATH,)
        self._taken = taken
        self._metadata = metadata
        self._idle = idle
        self._in_flight = in_flight
        self._last: dict[str, float] = dict.fromkeys(self._paths, 0.0)
        self._sent: dict[str, float] = {}

    @property
    def last_s(self) -> float:
        return max(self._last.values())

    @last_s.setter
    def last_s(self, value: float) -> None:
        for path in self._last:
            self._last[path] = value

    @property
    def _sent_at(self) -> float | None:
        return min(self._sent.values()) if self._sent else None

    @_sent_at.setter
    def _sent_at(self, value: float | None) -> None:
        self._sent.clear()
        if value is not None:
            self._sent[self._paths[0]] = value

    def wait(self, path: str) -> float:
        """One method's wait: its last probe's, or the age of the one out now if longer."""
        sent = self._sent.get(path)
        last = self._last.get(path, 0.0)
        return last if sent is None else max(last, self._clock() - sent)

    def delay(self) -> float:
        """The longest wait: of the last probes, or the age of one out now if longer."""
        delay = self.last_s
        if self._sent:
            delay = max(delay, self._clock() - min(self._sent.values()))
        return delay

    async def run(self) -> None:
        """Probe until cancelled."""
        # Its own connection (not shared with any other channel to this address).
        async with grpc.aio.insecure_channel(
            self._target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            await asyncio.gather(*(self._probe(channel, path) for path in self._paths))

    async def _probe(self, channel: grpc.aio.Channel, path: str) -> None:
        clock, taken = self._clock, self._taken
        # No serializers: the probe sends and expects raw bytes.
        probe: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
        # A method is probed once it takes calls (without `taken`: always).
        seen = taken.get(path, 0) if taken is not None else -1
        while True:
            count = taken.get(path, 0) if taken is not None else 0
            if taken is None or count != seen or self._last[path] > self.interval_s:
                seen = count
                self._sent[path] = sent = clock()
                try:
                    await probe(b"", timeout=self._timeout_s, metadata=self._metadata)
                except grpc.aio.AioRpcError:
                    pass  # the gate's (or UNIMPLEMENTED's) answer; any answer ends the wait
                self._last[path] = clock() - sent
                del self._sent[path]
                # The probe's own call is counted by the gate: the next one is compared
                # with the count after it.
                seen = taken.get(path, 0) if taken is not None else 0
            else:
                self._last[path] = 0.0
                idle, in_flight = self._idle, self._in_flight
                if idle is not None and in_flight is not None and not in_flight():
                    # Nothing taken since the last look and nothing open: wait for the
                    # next call (no await between this check and the wait: none is missed).
                    await idle()
                    continue
            await asyncio.sleep(self.interval_s)
