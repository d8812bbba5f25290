"""An endpoint's health, followed by two supervised tasks on its own health channel.

* health following: the standard Watch stream (periodic Check for servers without
  Watch) says whether the endpoint is SERVING. It never goes through the breaker: an
  open breaker would make the re-subscription raise CircuitOpen, which would end the task
  for good, and the endpoint would stay "not serving" after it came back.
* liveness: a health Check with a `keepalive_timeout_s` deadline every
  `keepalive_time_s`. A process that holds its connections but does not answer (hung,
  SIGSTOPped, a blocked event loop) is taken out within keepalive_time + keepalive_timeout
  and its calls in flight fail at once with UNAVAILABLE (streams in-band, unary calls
  retried elsewhere), whatever grpc-core's own ping timeouts do.

A supervisor restarts either task after any exception, with backoff, and logs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiproxy.core.logs import log_event
from aiproxy.core.settings import UpstreamSettings

if TYPE_CHECKING:
    from aiproxy.server.pool.endpoint import Endpoint

log = logging.getLogger("aiproxy.upstream")

SERVING = health_pb2.HealthCheckResponse.SERVING
# Health following restarts after a failure with this backoff (doubling up to the max).
_SUPERVISE_BACKOFF_S = (0.05, 2.0)
# While an endpoint does not answer, liveness is checked at least this often, so that it
# is back within about this long after it answers again.
_LIVENESS_RECHECK_S = 0.5
# A call that fails with UNAVAILABLE (a connection that died: ping timeout, reset) asks for
# a liveness check now instead of at the next interval; at most this often, whatever
# the failures (an agent that answers UNAVAILABLE to one caller's requests included).
_LIVENESS_HINT_SPACING_S = 1.0


class EndpointHealth:
    """The health and liveness tasks of one endpoint; they report through
    `endpoint.set_serving` / `endpoint.set_live` and fail its calls in flight."""

    def __init__(self, endpoint: Endpoint, settings: UpstreamSettings) -> None:
        self._endpoint = endpoint
        self._settings = settings
        self.address = endpoint.address
        self.probe_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(
                self._supervise("health", self._follow_health), name=f"health:{self.address}"
            ),
            asyncio.create_task(
                self._supervise("liveness", self._probe_liveness), name=f"liveness:{self.address}"
            ),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _supervise(self, what: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run` for the endpoint's whole life: restart it, with backoff, whatever
        it raises (a task that ended would leave the endpoint's state frozen)."""
        loop = asyncio.get_running_loop()
        low, high = _SUPERVISE_BACKOFF_S
        backoff = low
        while True:
            started = loop.time()
            try:
                await run()
                why = "ended"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - anything at all: restart
                why = type(exc).__name__
            if what == "health":
                self._endpoint.set_serving(False, f"health following restarts: {why}")
            log_event(
                log,
                "upstream_task_restart",
                level=logging.WARNING,
                address=self.address,
                task=what,
                why=why,
            )
            if loop.time() - started > high:
                backoff = low  # it had been running fine: restart quickly
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, high)

    async def _follow_health(self) -> None:
        stub = health_pb2_grpc.HealthStub(self._endpoint.health_channel)
        request = health_pb2.HealthCheckRequest(service=self._settings.health_service)
        backoff = 0.05
        while True:
            try:
                # wait_for_ready: while the endpoint is down the call waits for the channel
                # to reconnect instead of failing in a tight loop.
                async for response in stub.Watch(request, wait_for_ready=True):  # type: ignore[attr-defined]  # stubs: HealthStub has no methods
                    backoff = 0.05
                    self._endpoint.set_serving(response.status == SERVING, "watch")
                self._endpoint.set_serving(False, "watch stream ended")
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    await self._poll_health(stub, request)
                    return
                self._endpoint.set_serving(False, f"watch failed: {exc.code().name}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _poll_health(self, stub: health_pb2_grpc.HealthStub, request: Any) -> None:
        """For servers without Watch: Check every health_check_interval_s."""
        interval = self._settings.health_check_interval_s
        while True:
            try:
                response = await stub.Check(request, timeout=interval, wait_for_ready=True)  # type: ignore[attr-defined]  # stubs: HealthStub has no methods
                self._endpoint.set_serving(response.status == SERVING, "check")
            except grpc.aio.AioRpcError as exc:
                self._endpoint.set_serving(False, f"check failed: {exc.code().name}")
            await asyncio.sleep(interval)

    async def _probe_liveness(self) -> None:
        """A health Check with a keepalive_timeout_s deadline every keepalive_time_s.

        Any answer (even NOT_SERVING or UNIMPLEMENTED) means the process answers. No
        answer in time means it is hung: new calls avoid it and the calls in flight on
        it fail now with UNAVAILABLE instead of waiting out their deadlines. A refused
        connection (UNAVAILABLE) only takes it out of the pool: grpc fails the calls on
        a connection that closed by itself. A call failing with UNAVAILABLE brings the
        next check forward (grpc's ping timeout often fails a hung endpoint's streams
        first; new calls must stop going there as soon, not at the next interval).
        """
        stub = health_pb2_grpc.HealthStub(self._endpoint.health_channel)
        request = health_pb2.HealthCheckRequest(service=self._settings.health_service)
        interval = self._settings.keepalive_time_s
        timeout = self._settings.keepalive_timeout_s
        spacing = min(_LIVENESS_HINT_SPACING_S, interval)
        while True:
            delay = interval if self._endpoint.live else min(interval, _LIVENESS_RECHECK_S)
            await asyncio.sleep(min(spacing, delay))
            if delay > spacing:  # early on a hint: a call just failed with UNAVAILABLE
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.probe_now.wait(), delay - spacing)
            self.probe_now.clear()
            try:
                await stub.Check(request, timeout=timeout)  # type: ignore[attr-defined]  # stubs: HealthStub has no methods
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._endpoint.set_live(False, f"no health answer within {timeout:g} s")
                    # Every time, not only on the first miss: whatever is still in flight
                    # on a process that does not answer will not finish.
                    failed = self._endpoint.calls.fail_all("upstream stopped answering")
                    if failed:
                        log_event(
                            log,
                            "upstream_calls_failed",
                            level=logging.WARNING,
                            address=self.address,
                            calls=failed,
                        )
                    continue
                if code is grpc.StatusCode.UNAVAILABLE:
                    self._endpoint.set_live(False, "unreachable")
                    continue
            self._endpoint.set_live(True, "answered")
