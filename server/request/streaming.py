"""The stream pump: upstream chunks to the caller, bounded, with heartbeats.

A reader task pulls chunks from the upstream call into a bounded queue; the caller's
side takes them out. A slow caller therefore fills the queue and then stops the reader,
and gRPC flow control pushes back on the upstream: memory per stream stays bounded.
The reader is a separate task because cancelling a pending grpc.aio read cancels the
whole upstream call; the caller's side can wait on the queue with a timeout instead,
which is how heartbeats and the idle timeout are measured.

Every chunk the caller sees is renumbered (`seq`), since heartbeats and coalescing
change how many chunks there are. Chunks that queued up behind a slow caller may be
merged into one (the first chunk is never held back: merging only takes what is
already waiting). With a coalescing window (opt-in: `coalesce_window_ms`, per method, or
the caller's `x-aiproxy-coalesce-ms` header, see server/request/forwarding.py) later chunks are
pushed at most once per window, so a fast token stream becomes fewer, larger messages.

The pump reads the time (heartbeat and idle deadlines, the call's deadline, the coalescing
window) from one injected `clock` only, like the breaker: time.monotonic by default, the
clock `end_at` is on. The waits sleep the difference, so a test that moves a fake clock
crosses a deadline at the pump's next wake-up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aiproxy.core.errors import DeadlineExceeded
from aiproxy.core.settings import StreamSettings

# Fields a chunk may carry and still be merged into the chunk before it.
_MERGEABLE_FIELDS = frozenset({"delta", "seq"})


class _End:
    """Queue marker: the upstream stream ended; `error` is why, if it failed."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class StreamIdle(DeadlineExceeded):
    """The upstream sent nothing for the configured idle time."""

    def __init__(self, idle_s: float) -> None:
        super().__init__(
            f"upstream sent nothing for {idle_s:g} s", metadata={"idle_timeout_s": f"{idle_s:g}"}
        )
        self.idle_s = idle_s


class StreamDeadline(DeadlineExceeded):
    """The call's effective deadline (see interceptors/deadline.py) came: the proxy ends
    the stream itself, so the caller gets the in-band final chunk before its own
    deadline cuts the call off."""

    def __init__(self) -> None:
        super().__init__("the call's deadline passed")


class StreamPump:
    """Reads one upstream call and yields the caller's chunks.

    Raises the upstream's error (or StreamIdle) after the chunks that preceded it;
    turning that into an in-band error chunk is the caller's decision, because it
    depends on whether anything was sent.
    """

    # One per open stream: no instance dict (~0.5 KiB less per stream).
    __slots__ = (
        "_call",
        "_clock",
        "_cls",
        "_end_at",
        "_fired_for",
        "_max",
        "_queue",
        "_reader",
        "_ready",
        "_settings",
        "_space",
        "_timer",
        "_timer_at",
        "_window_ms",
        "seq",
    )

    def __init__(
        self,
        upstream_call: Any,
        response_cls: type,
        settings: StreamSettings,
        end_at: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        window_ms: float | None = None,
    ) -> None:
        self._call = upstream_call
        # This stream's coalescing window (None: settings.coalesce_window_ms).
        self._window_ms = settings.coalesce_window_ms if window_ms is None else window_ms
        self._clock = clock
        self._cls = response_cls
        self._settings = settings
        # clock() by which the stream ends with StreamDeadline (None: never).
        self._end_at = math.inf if end_at is None else end_at
        # The bounded buffer between the reader task and the caller's side: a list and
        # two wake-up futures instead of an asyncio.Queue, so that waiting for the next
        # chunk needs no timeout context per chunk (asyncio.timeout costs ~10 us of CPU
        # each time; one timer per stream is kept instead, re-armed only when it is due:
        # `_wake_at`). A list, not a deque: a slow stream's buffer is empty nearly always,
        # and an empty deque holds a 64-slot block (~0.7 KiB per open stream); taking from
        # the front of a list of at most `buffer_chunks` items is cheap.
        self._queue: list[Any] = []
        self._max = settings.buffer_chunks
        self._ready: asyncio.Future[None] | None = None  # the caller's side waits
        self._space: asyncio.Future[None] | None = None  # the reader waits (buffer full)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # clock() the timer is for
        self._fired_for = -math.inf  # clock() the last timer that fired was for
        self._reader: asyncio.Task[None] | None = None
        self.seq = 0

    def _offer(self, item: Any) -> bool:
        """Queue `item` and wake the caller's side; False when the buffer is now full (the
        reader waits for `_wait_space` before reading on: backpressure). Sync, so that a
        chunk costs the reader no coroutine."""
        queue = self._queue
        queue.append(item)
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(None)
        return len(queue) < self._max

    async def _wait_space(self) -> None:
        queue = self._queue
        while len(queue) >= self._max:  # backpressure: wait for the caller's side
            self._space = asyncio.get_running_loop().create_future()
            try:
                await self._space
            finally:
                self._space = None

    def _take(self) -> Any:
        item = self._queue.pop(0)
        space = self._space
        if space is not None and not space.done():
            space.set_result(None)
        return item

    async def _read(self) -> None:
        offer, wait_space = self._offer, self._wait_space
        call = self._call
        try:
            drain = getattr(call, "drain", None)
            if drain is not None:  # UpstreamStream (server/pool/calls.py): no frame per chunk
                await drain(offer, wait_space)
            else:
                async for chunk in call:
                    if not offer(chunk):
                        await wait_space()
            offer(_End(None))  # the end may go one past the bound
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the upstream's status, delivered in order
            # Without its traceback: the frames it references (this task's, the grpc
            # call's) would otherwise live in a reference cycle until a full collection.
            offer(_End(exc.with_traceback(None)))
            del exc

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    async def chunks(self) -> AsyncGenerator[Any, None]:
        """The caller's chunks, in upstream order, renumbered, with heartbeats."""
        queue = self._queue
        heartbeat_s = self._settings.heartbeat_interval_s
        idle_s = self._settings.idle_timeout_s
        coalesce = self._settings.coalesce
        window_s = self._window_ms / 1000 if coalesce else 0.0
        clock = self._clock
        self._reader = asyncio.create_task(self._read())
        last_upstream = last_sent = clock()
        held: Any = None  # an item taken while coalescing that could not be merged
        try:
            while True:
                if window_s and self.seq:
                    # Not the first chunk: let deltas gather until the window has passed
                    # since the last push (they are merged below).
                    pause = last_sent + window_s - clock()
                    if pause > 0:
                        await asyncio.sleep(pause)
                if held is not None:
                    item, held = held, None
                elif queue:
                    item = self._take()
                else:
                    item = await self._wait(last_upstream, last_sent, heartbeat_s, idle_s)
                    if item is None:  # idle caller connection: heartbeat due
                        last_sent = clock()
                        yield self._cls(heartbeat=True, seq=self._next_seq())
                        continue
                if isinstance(item, _End):
                    error, item.error = item.error, None
                    if error is not None:
                        try:
                            raise error
                        finally:
                            del error  # no frame -> exception -> frame cycle
                    return
                if coalesce and queue and _is_plain_delta(item):
                    held = self._merge_waiting(item)
                item.seq = self._next_seq()
                last_upstream = last_sent = clock()
                yield item
        finally:
            await self.aclose()

    async def _wait(
        self, last_upstream: float, last_sent: float, heartbeat_s: float, idle_s: float
    ) -> Any:
        """Next queue item, or None when a heartbeat is due; StreamIdle past idle_s,
        StreamDeadline at the call's deadline."""
        idle_deadline = last_upstream + idle_s
        end_at = self._end_at
        wake_at = min(idle_deadline, last_sent + heartbeat_s, end_at)
        loop = asyncio.get_running_loop()
        while not self._queue:
            now = self._clock()
            # Due by the clock, or the timer armed for this wake-up fired (a fake clock
            # that stands still: the real timer is what says "look now").
            if now >= wake_at or self._fired_for >= wake_at:
                if now >= end_at:
                    raise StreamDeadline()
                if now >= idle_deadline:
                    raise StreamIdle(idle_s)
                return None
            if self._timer_at > wake_at:
                # Re-armed only when the wake-up comes sooner than the timer (a timer
                # that fires early just makes this loop look again).
                if self._timer is not None:
                    self._timer.cancel()
                self._timer_at = wake_at
                self._timer = loop.call_later(wake_at - now, self._on_timer)
            self._ready = ready = loop.create_future()
            try:
                await ready
            finally:
                self._ready = None
        return self._take()

    def _on_timer(self) -> None:
        self._fired_for = self._timer_at
        self._timer, self._timer_at = None, math.inf
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def _merge_waiting(self, chunk: Any) -> Any:
        """Fold plain-delta chunks already queued behind `chunk` into it.

        Returns the first queued item that could not be merged (or None); the caller
        sends it next, so order is kept.
        """
        queue = self._queue
        while queue:
            nxt = self._take()
            if isinstance(nxt, _End) or not _is_plain_delta(nxt):
                return nxt
            chunk.delta += nxt.delta
        return None

    async def aclose(self) -> None:
        """Stop reading and cancel the upstream call (a no-op once it has finished)."""
        self._call.cancel()
        reader, self._reader = self._reader, None
        if reader is not None:
            if not reader.done():
                reader.cancel()
                await asyncio.wait((reader,))
            # Retrieve the outcome so the task drops its exception (and traceback) now,
            # not when the collector gets to it; leftover queue items hold errors too.
            if not reader.cancelled():
                reader.exception()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        self._queue.clear()


def _is_plain_delta(chunk: Any) -> bool:
    return all(field.name in _MERGEABLE_FIELDS for field, _ in chunk.ListFields())
