"""How long a new call waits before the proxy's gRPC server takes it.

grpc-core queues new calls until grpc.aio asks for the next one, and grpc.aio asks one at a
time from the event loop; that queue is invisible from Python (see
interceptors/overload.py). So the proxy measures it the way a caller experiences it: a
probe call to its own listener, on a path no handler serves, is queued with the other new
calls for unregistered methods (the API's, which the forwarder serves through a generic
handler), taken in turn, and answered UNIMPLEMENTED at once. Its round trip is the wait;
while a probe is out, its age is a lower bound of the wait, so a queue that keeps growing
is seen before the probe comes back.

One probe at a time, every `interval_s`: a few calls a second, on their own connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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
    ) -> None:
        self._target = target
        self.interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self.last_s = 0.0
        self._sent_at: float | None = None

    def delay(self) -> float:
        """The wait of the last probe, or the age of the one out now if that is longer."""
        sent_at = self._sent_at
        if sent_at is None:
            return self.last_s
        return max(self.last_s, self._clock() - sent_at)

    async def run(self) -> None:
        """Probe until cancelled."""
        clock = self._clock
        # Its own connection (not shared with any other channel to this address).
        async with grpc.aio.insecure_channel(
            self._target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            # No serializers: the probe sends and expects raw bytes.
            probe: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PROBE_PATH)
            while True:
                self._sent_at = clock()
                try:
                    await probe(b"", timeout=self._timeout_s)
                except grpc.aio.AioRpcError:
                    pass  # UNIMPLEMENTED is the answer expected; any answer ends the wait
                self.last_s = clock() - self._sent_at
                self._sent_at = None
                await asyncio.sleep(self.interval_s)
