"""StreamPump: ordering, renumbering, coalescing, heartbeats, idle timeout, cancellation.

The upstream is a fake async iterator (pure logic: the pump's contract with grpc.aio is
just async iteration and cancel()); the integration tests drive the real thing. The
deadlines are also driven on an injected fake clock (the last section).
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.settings import StreamSettings
from aiproxy.server.request.streaming import StreamDeadline, StreamIdle, StreamPump
from tests.support.clock import FakeClock


class FakeUpstream:
    """Yields scripted items; an item that is a float sleeps that long first."""

    def __init__(self, script: list, error: BaseException | None = None) -> None:
        self.script = script
        self.error = error
        self.cancelled = False
        self.sent = 0

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    async def __aiter__(self):
        for item in self.script:
            if isinstance(item, float):
                await asyncio.sleep(item)
                continue
            self.sent += 1
            yield item
        if self.error is not None:
            raise self.error


class DrainingUpstream(FakeUpstream):
    """The same script through `drain(offer, space)`, the path UpstreamStream gives the
    pump (server/pool/calls.py): no iteration."""

    async def drain(self, offer, space) -> None:
        async for item in FakeUpstream.__aiter__(self):
            if not offer(item):
                await space()

    def __aiter__(self):
        raise AssertionError("the pump must drain an upstream that can, not iterate it")


UPSTREAMS = pytest.mark.parametrize("upstream_cls", [FakeUpstream, DrainingUpstream])


def chunk(delta: str = "", **fields) -> pb.StreamGenerateResponse:
    return pb.StreamGenerateResponse(delta=delta, **fields)


def settings(**overrides) -> StreamSettings:
    return StreamSettings(**{"heartbeat_interval_s": 10.0, "idle_timeout_s": 10.0, **overrides})


async def collect(pump: StreamPump, *, delay: float = 0.0) -> list:
    out = []
    async for item in pump.chunks():
        out.append(item)
        if delay:
            await asyncio.sleep(delay)
    return out


@UPSTREAMS
async def test_passes_chunks_in_order_and_renumbers_seq(upstream_cls) -> None:
    upstream = upstream_cls(
        [chunk("a", seq=7, model="m"), chunk("b", seq=9), chunk("", is_final=True)]
    )
    out = await collect(StreamPump(upstream, pb.StreamGenerateResponse, settings(coalesce=False)))
    assert [c.delta for c in out] == ["a", "b", ""]
    assert [c.seq for c in out] == [0, 1, 2]
    assert out[-1].is_final and out[0].model == "m"


async def test_coalesces_only_plain_deltas_already_waiting() -> None:
    script = (
        [chunk("first", model="m")]
        + [chunk(f"{i} ") for i in range(20)]
        + [chunk("", is_final=True)]
    )
    upstream = FakeUpstream(script)
    # A slow caller lets chunks queue up behind the first one.
    out = await collect(StreamPump(upstream, pb.StreamGenerateResponse, settings()), delay=0.01)
    assert out[0].delta == "first"  # never held back
    assert "".join(c.delta for c in out) == "first" + "".join(f"{i} " for i in range(20))
    assert len(out) < len(script)
    assert out[-1].is_final and [c.seq for c in out] == list(range(len(out)))


async def test_heartbeat_when_upstream_is_quiet() -> None:
    upstream = FakeUpstream([chunk("a"), 0.25, chunk("b"), chunk("", is_final=True)])
    out = await collect(
        StreamPump(upstream, pb.StreamGenerateResponse, settings(heartbeat_interval_s=0.1))
    )
    heartbeats = [c for c in out if c.heartbeat]
    assert heartbeats, "expected at least one heartbeat during the 250 ms pause"
    assert [c.delta for c in out if not c.heartbeat] == ["a", "b", ""]
    assert [c.seq for c in out] == list(range(len(out)))


async def test_idle_upstream_ends_stream() -> None:
    upstream = FakeUpstream([chunk("a"), 5.0, chunk("never")])
    pump = StreamPump(
        upstream, pb.StreamGenerateResponse, settings(idle_timeout_s=0.1, heartbeat_interval_s=0.04)
    )
    out = []
    with pytest.raises(StreamIdle):
        async for item in pump.chunks():
            out.append(item)
    assert out[0].delta == "a"
    assert upstream.cancelled


@UPSTREAMS
async def test_upstream_error_after_chunks_is_raised_in_order(upstream_cls) -> None:
    upstream = upstream_cls([chunk("a"), chunk("b")], error=RuntimeError("boom"))
    pump = StreamPump(upstream, pb.StreamGenerateResponse, settings(coalesce=False))
    out = []
    with pytest.raises(RuntimeError, match="boom"):
        async for item in pump.chunks():
            out.append(item.delta)
    assert out == ["a", "b"]


@UPSTREAMS
async def test_bounded_buffer_backpressures_the_upstream(upstream_cls) -> None:
    upstream = upstream_cls([chunk(str(i)) for i in range(1000)] + [chunk("", is_final=True)])
    pump = StreamPump(
        upstream, pb.StreamGenerateResponse, settings(buffer_chunks=5, coalesce=False)
    )
    chunks = pump.chunks()
    first = await chunks.__anext__()
    for _ in range(10):
        await asyncio.sleep(0)
    # The reader stops when the queue is full: at most buffer + the chunk in hand + one
    # read ahead.
    assert first.delta == "0"
    assert upstream.sent <= 5 + 2
    await chunks.aclose()
    assert upstream.cancelled


async def test_consumer_cancellation_cancels_upstream() -> None:
    upstream = FakeUpstream([chunk("a"), 10.0, chunk("b")])
    pump = StreamPump(upstream, pb.StreamGenerateResponse, settings())
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in pump.chunks():
            got_first.set()

    task = asyncio.create_task(consume())
    await got_first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert upstream.cancelled


async def test_coalesce_window_pushes_at_most_once_per_window() -> None:
    script = [chunk("first", model="m")]
    for i in range(20):
        script += [0.005, chunk(f"{i} ")]
    script.append(chunk("", is_final=True))
    upstream = FakeUpstream(script)
    # A 200 ms window: "not held back" (< half a window) then holds on a loaded CI box,
    # which a 20 ms bound under a 40 ms window did not promise.
    pump = StreamPump(upstream, pb.StreamGenerateResponse, settings(coalesce_window_ms=200))
    loop = asyncio.get_running_loop()
    started = loop.time()
    times, out = [], []
    async for item in pump.chunks():
        times.append(loop.time() - started)
        out.append(item)
    assert out[0].delta == "first" and times[0] < 0.1  # the first chunk is never held back
    assert "".join(c.delta for c in out) == "first" + "".join(f"{i} " for i in range(20))
    assert out[-1].is_final and [c.seq for c in out] == list(range(len(out)))
    # ~100 ms of 5 ms tokens in 200 ms windows: a handful of pushes instead of 22.
    assert len(out) <= 8
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.035 for g in gaps), gaps


async def test_coalesce_window_off_by_default_keeps_every_chunk() -> None:
    assert StreamSettings().coalesce_window_ms == 0
    script = (
        [chunk("a")]
        + [x for i in range(5) for x in (0.005, chunk(str(i)))]
        + [chunk("", is_final=True)]
    )
    out = await collect(StreamPump(FakeUpstream(script), pb.StreamGenerateResponse, settings()))
    assert [c.delta for c in out] == ["a", "0", "1", "2", "3", "4", ""]


# ---- the call's deadline --------------------------------------------------------------


async def test_the_deadline_ends_the_stream_with_stream_deadline_and_cancels_upstream() -> None:
    import time

    from aiproxy.core.errors import DeadlineExceeded

    upstream = FakeUpstream([chunk("a"), 5.0, chunk("b")])
    pump = StreamPump(
        upstream, pb.StreamGenerateResponse, settings(), end_at=time.monotonic() + 0.2
    )
    got = []
    with pytest.raises(StreamDeadline) as caught:
        async for item in pump.chunks():
            got.append(item.delta)
    assert got == ["a"]
    assert isinstance(caught.value, DeadlineExceeded)
    assert upstream.cancelled


async def test_a_deadline_in_the_future_changes_nothing() -> None:
    import time

    upstream = FakeUpstream([chunk("a"), chunk("b"), chunk("", is_final=True)])
    pump = StreamPump(
        upstream, pb.StreamGenerateResponse, settings(coalesce=False), end_at=time.monotonic() + 30
    )
    assert [c.delta for c in await collect(pump)] == ["a", "b", ""]


async def test_an_upstream_error_reaches_the_caller_without_its_traceback() -> None:
    """The reader hands the error over stripped of its traceback, so no frame ->
    exception -> frame cycle outlives the stream (issue 13, item 9)."""
    upstream = FakeUpstream([chunk("a")], error=RuntimeError("upstream broke"))
    pump = StreamPump(upstream, pb.StreamGenerateResponse, settings())
    with pytest.raises(RuntimeError) as caught:
        await collect(pump)
    # Only the frames it crossed on the caller's side, none of the reader task's.
    frames = []
    tb = caught.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "_read" not in frames and "__aiter__" not in frames


# ---- the injected clock: every deadline is read on it ----------------------------------


async def test_the_idle_timeout_is_measured_on_the_injected_clock() -> None:
    """A 60 s idle timeout crossed in milliseconds: the pump reads only its clock (the short
    real heartbeat is what wakes it up to look)."""
    clock = FakeClock()
    upstream = FakeUpstream([chunk("a"), 30.0, chunk("never")])
    pump = StreamPump(
        upstream,
        pb.StreamGenerateResponse,
        settings(idle_timeout_s=60, heartbeat_interval_s=0.01),
        clock=clock,
    )
    got = []
    with pytest.raises(StreamIdle):
        async for item in pump.chunks():
            got.append("heartbeat" if item.heartbeat else item.delta)
            if item.heartbeat:
                clock.advance(25)
    # Quiet for 0, 25 and 50 s: heartbeats; at 75 s (past 60) the stream ends.
    assert got == ["a", "heartbeat", "heartbeat", "heartbeat"]
    assert upstream.cancelled


async def test_a_stopped_clock_never_times_out_however_long_the_real_wait() -> None:
    """The other half of the same contract: real time passing is not what ends a stream."""
    clock = FakeClock()
    upstream = FakeUpstream([chunk("a"), 30.0, chunk("never")])
    pump = StreamPump(
        upstream,
        pb.StreamGenerateResponse,
        settings(idle_timeout_s=0.05, heartbeat_interval_s=0.01),
        end_at=clock() + 0.05,
        clock=clock,
    )
    chunks = pump.chunks()
    assert (await chunks.__anext__()).delta == "a"
    # 20 heartbeats take at least 0.2 s of real time, four times the idle timeout and
    # the deadline: neither is crossed, since the injected clock has not moved.
    for _ in range(20):
        assert (await chunks.__anext__()).heartbeat
    await chunks.aclose()
    assert upstream.cancelled


async def test_the_calls_deadline_is_read_on_the_injected_clock() -> None:
    clock = FakeClock()
    upstream = FakeUpstream([chunk("a"), 30.0, chunk("b")])
    pump = StreamPump(
        upstream,
        pb.StreamGenerateResponse,
        settings(idle_timeout_s=3600, heartbeat_interval_s=3600),
        end_at=clock() + 100,
        clock=clock,
    )
    chunks = pump.chunks()
    assert (await chunks.__anext__()).delta == "a"
    clock.advance(100)  # the deadline is due now: the pump must not wait an hour for it
    with pytest.raises(StreamDeadline):
        await asyncio.wait_for(chunks.__anext__(), 10)
    assert upstream.cancelled


async def test_the_coalescing_pause_is_measured_on_the_injected_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pump sleeps what is left of the window by its clock: 10 ms of a 40 ms window
    went by on the fake clock after each push, so it asks for 30 ms, not 40."""
    clock = FakeClock()
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep_on_the_clock(delay: float, result: object = None) -> object:
        pauses.append(delay)
        clock.advance(delay)
        return await real_sleep(0, result)

    script = [chunk("first", model="m"), chunk("0 "), chunk("1 "), chunk("2 ")]
    upstream = FakeUpstream([*script, chunk("", is_final=True)])
    pump = StreamPump(
        upstream, pb.StreamGenerateResponse, settings(coalesce_window_ms=40), clock=clock
    )
    monkeypatch.setattr(asyncio, "sleep", sleep_on_the_clock)
    out = []
    async for item in pump.chunks():
        out.append(item)
        clock.advance(0.01)
    monkeypatch.undo()
    assert [c.delta for c in out] == ["first", "0 1 2 ", ""]
    assert len(pauses) >= 2 and pauses == pytest.approx([0.03] * len(pauses))
