"""The memory stream buffer and the grace rule: resume with no duplicate and no gap while
appends race the reader, bounds in bytes and time, scope isolation, cancel, abandon."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import grpc
import pytest

from aiproxy.core.errors import Reason
from aiproxy.core.streambuffer import (
    Chunk,
    ChunkKind,
    Grace,
    MemoryStreamBuffer,
    ResumeAsk,
    SequenceError,
    StreamBuffer,
    StreamExpired,
    StreamNotFound,
    StreamRecorder,
    StreamState,
    Verdict,
    new_stream_id,
    parse_resume,
    valid_stream_id,
    watch_owner,
)
from tests.support.clock import FakeClock
from tests.support.waiting import eventually


async def collect(buf: StreamBuffer, sid: str, scope: str, after: int = -1) -> list[Chunk]:
    return [chunk async for chunk in buf.read(sid, scope, after)]


def test_ids_are_unguessable_and_urlsafe() -> None:
    ids = {new_stream_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 22 and valid_stream_id(i) for i in ids)
    assert not valid_stream_id("x" * 65)
    assert not valid_stream_id("abc/../" + "a" * 20)


async def test_protocol_and_full_read() -> None:
    buf = MemoryStreamBuffer()
    assert isinstance(buf, StreamBuffer)
    sid = await buf.create("tenant-a", "replica-1")
    for seq in range(3):
        await buf.append(sid, seq, b"c%d" % seq)
    await buf.finish(sid, 3, b"final")
    chunks = await collect(buf, sid, "tenant-a")
    assert [c.seq for c in chunks] == [0, 1, 2, 3]
    assert chunks[-1].kind is ChunkKind.FINAL and chunks[-1].data == b"final"
    # Resuming after the last seen seq gives the rest; after the final, nothing.
    assert [c.seq for c in await collect(buf, sid, "tenant-a", 1)] == [2, 3]
    assert await collect(buf, sid, "tenant-a", 3) == []


async def test_sequence_is_checked() -> None:
    buf = MemoryStreamBuffer()
    sid = await buf.create("t", "o")
    with pytest.raises(SequenceError):
        await buf.append(sid, 1, b"x")
    await buf.append(sid, 0, b"x")
    with pytest.raises(SequenceError):
        await buf.append(sid, 0, b"x")
    await buf.finish(sid, 1, b"f")
    with pytest.raises(SequenceError):
        await buf.append(sid, 2, b"x")


async def test_other_scope_and_unknown_id_are_the_same_not_found() -> None:
    buf = MemoryStreamBuffer()
    sid = await buf.create("tenant-a", "o")
    await buf.finish(sid, 0, b"f")
    for bad_sid, scope in ((sid, "tenant-b"), (new_stream_id(), "tenant-a")):
        with pytest.raises(StreamNotFound) as err:
            await collect(buf, bad_sid, scope)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert err.value.reason == Reason.STREAM_NOT_FOUND
    assert not await buf.request_cancel(sid, "tenant-b")


async def test_live_tail_no_duplicate_no_gap_under_racing_appends() -> None:
    """Readers that join at random points while the owner appends with random pauses all
    see exactly the chunks after their seq, once each, in order."""
    buf = MemoryStreamBuffer()
    sid = await buf.create("t", "o")
    n = 300

    async def owner() -> None:
        for seq in range(n - 1):
            await buf.append(sid, seq, b"%d" % seq)
            if seq % 7 == 0:
                await asyncio.sleep(0)
            if seq % 50 == 0:
                await asyncio.sleep(0.001)
        await buf.finish(sid, n - 1, b"end")

    async def reader(start_after: int, delay: int) -> list[int]:
        for _ in range(delay):
            await asyncio.sleep(0)
        return [c.seq async for c in buf.read(sid, "t", start_after)]

    starts = [(-1, 0), (-1, 5), (10, 3), (100, 40), (250, 80), (298, 2)]
    results = await asyncio.gather(owner(), *(reader(a, d) for a, d in starts))
    for (after, _), seqs in zip(starts, results[1:], strict=True):
        assert seqs == list(range(after + 1, n)), after


async def test_chunks_written_while_the_reader_is_suspended_are_all_sent() -> None:
    """The reader's caller suspends at each chunk (it writes it to the network); the owner
    appends the rest of the stream, final chunk included, meanwhile. The reader must send
    them all: it once decided on `finished` after walking a stale slice and ended without
    the final chunk (about 1 resume in 2 through Envoy and over gRPC, issue 16)."""
    buf = MemoryStreamBuffer()
    sid = await buf.create("t", "o")
    await buf.append(sid, 0, b"0")
    reader = buf.read(sid, "t", -1)
    assert (await anext(reader)).seq == 0  # suspended at the yield of chunk 0
    await buf.append(sid, 1, b"1")
    await buf.finish(sid, 2, b"end")
    rest = [c async for c in reader]
    assert [c.seq for c in rest] == [1, 2] and rest[-1].kind is ChunkKind.FINAL

    # The same with a slow consumer at every chunk while the owner keeps writing.
    sid = await buf.create("t", "o")
    n = 40

    async def owner() -> None:
        for seq in range(n - 1):
            await buf.append(sid, seq, b"x")
            await asyncio.sleep(0)
        await buf.finish(sid, n - 1, b"end")

    async def slow_reader(after: int) -> list[int]:
        seqs = []
        async for chunk in buf.read(sid, "t", after):
            seqs.append(chunk.seq)
            for _ in range(3):  # the caller's write takes a few loop turns
                await asyncio.sleep(0)
        return seqs

    _, *results = await asyncio.gather(owner(), slow_reader(-1), slow_reader(5))
    assert results == [list(range(n)), list(range(6, n))]


async def test_bytes_bound_drops_oldest_and_resume_before_them_is_expired() -> None:
    buf = MemoryStreamBuffer(max_bytes=100)
    sid = await buf.create("t", "o")
    for seq in range(10):
        await buf.append(sid, seq, b"x" * 30)
    assert buf.buffered_bytes <= 100
    with pytest.raises(StreamExpired) as err:
        await collect(buf, sid, "t", -1)
    assert err.value.reason == Reason.STREAM_EXPIRED
    await buf.finish(sid, 10, b"f")
    tail = await collect(buf, sid, "t", 7)
    assert [c.seq for c in tail] == [8, 9, 10]


async def test_time_bound_after_last_write() -> None:
    clock = FakeClock()
    buf = MemoryStreamBuffer(ttl_s=60, clock=clock)
    sid = await buf.create("t", "o")
    await buf.append(sid, 0, b"a")
    clock.now += 59
    await buf.finish(sid, 1, b"f")  # a write renews the bound
    clock.now += 59
    assert len(await collect(buf, sid, "t")) == 2
    clock.now += 2
    with pytest.raises(StreamNotFound):
        await collect(buf, sid, "t")
    assert len(buf) == 0


async def test_max_streams_drops_least_recently_written() -> None:
    buf = MemoryStreamBuffer(max_streams=3)
    sids = [await buf.create("t", "o") for _ in range(3)]
    await buf.append(sids[0], 0, b"a")  # sids[0] is now the most recently written
    extra = await buf.create("t", "o")
    assert len(buf) == 3
    assert (await buf.state(sids[1])).exists is False
    assert (await buf.state(sids[0])).exists and (await buf.state(extra)).exists


async def test_reader_of_an_evicted_stream_ends_with_expired() -> None:
    buf = MemoryStreamBuffer(max_streams=1)
    sid = await buf.create("t", "o")
    await buf.append(sid, 0, b"a")
    got: list[int] = []

    async def read() -> None:
        async for c in buf.read(sid, "t"):
            got.append(c.seq)

    task = asyncio.create_task(read())
    await eventually(lambda: got, 10, "the reader's first chunk", interval=0)
    await buf.create("t", "o")  # evicts sid
    with pytest.raises(StreamExpired):
        await asyncio.wait_for(task, 5)


async def test_abandon_makes_resume_expired_and_wakes_readers() -> None:
    buf = MemoryStreamBuffer()
    sid = await buf.create("t", "o")
    await buf.append(sid, 0, b"a")
    seen: list[int] = []

    async def read() -> None:
        async for c in buf.read(sid, "t"):
            seen.append(c.seq)

    task = asyncio.create_task(read())
    await eventually(lambda: seen, 10, "the reader's first chunk", interval=0)
    await buf.abandon(sid)
    with pytest.raises(StreamExpired):
        await asyncio.wait_for(task, 5)
    with pytest.raises(StreamExpired):
        await collect(buf, sid, "t", 0)
    assert (await buf.state(sid)).abandoned


async def test_error_final_chunk_ends_the_read() -> None:
    buf = MemoryStreamBuffer()
    sid = await buf.create("t", "o")
    await buf.append(sid, 0, b"a")
    await buf.finish(sid, 1, b"status-bytes", error=True)
    chunks = await collect(buf, sid, "t")
    assert chunks[-1].kind is ChunkKind.ERROR and chunks[-1].last


async def test_heartbeat_reports_owner_reader_and_cancel() -> None:
    clock = FakeClock()
    buf = MemoryStreamBuffer(reader_lease_s=3, clock=clock)
    sid = await buf.create("t", "owner-1")
    state = await buf.heartbeat(sid, "owner-1", 3)
    assert state.owner_alive and not state.reader_attached and not state.cancel_requested
    await buf.append(sid, 0, b"a")
    reader = buf.read(sid, "t")
    assert (await anext(reader)).seq == 0  # reading renews the reader lease
    assert (await buf.heartbeat(sid, "owner-1", 3)).reader_attached
    clock.now += 3.5
    state = await buf.state(sid)
    assert not state.owner_alive and not state.reader_attached
    # Another owner name does not renew the lease.
    assert not (await buf.heartbeat(sid, "owner-2", 3)).owner_alive
    assert await buf.request_cancel(sid, "t")
    assert (await buf.state(sid)).cancel_requested
    await reader.aclose()


def test_grace_rule() -> None:
    clock = FakeClock()
    grace = Grace(5.0, clock)
    alive = StreamState(True)
    assert grace.decide(alive) is Verdict.CONTINUE
    clock.now += 100  # attached: no grace running
    assert grace.decide(alive) is Verdict.CONTINUE
    grace.caller_dropped()
    clock.now += 4.9
    assert grace.decide(alive) is Verdict.CONTINUE
    # A resumer reading elsewhere restarts the grace each time it is seen.
    assert grace.decide(alive._replace(reader_attached=True)) is Verdict.CONTINUE
    clock.now += 4.9
    assert grace.decide(alive) is Verdict.CONTINUE
    clock.now += 0.2
    assert grace.decide(alive) is Verdict.ABANDONED
    # A cancel request wins over everything, attached or not.
    grace.caller_attached()
    assert grace.decide(alive._replace(cancel_requested=True)) is Verdict.CANCEL_REQUESTED
    with pytest.raises(ValueError):
        Grace(-1)


async def test_watch_owner_cancels_after_grace_and_on_request() -> None:
    buf = MemoryStreamBuffer()
    sid = await buf.create("t", "o")
    grace = Grace(0.2)
    grace.caller_dropped()
    verdict = await asyncio.wait_for(watch_owner(buf, sid, "o", grace, interval_s=0.05), 10)
    assert verdict is Verdict.ABANDONED

    sid2 = await buf.create("t", "o")
    task = asyncio.create_task(watch_owner(buf, sid2, "o", Grace(30), interval_s=0.02))

    async def owner_alive() -> bool:  # the watcher's first heartbeat took the lease
        return (await buf.state(sid2)).owner_alive

    await eventually(owner_alive, what="the owner's lease")
    assert not task.done()
    await buf.request_cancel(sid2, "t")
    assert await asyncio.wait_for(task, 10) is Verdict.CANCEL_REQUESTED


async def test_memory_per_stream_is_bounded_and_measured() -> None:
    """What a buffered stream costs beyond its payload: the figure for the report."""
    n_streams, n_chunks, size = 200, 50, 100
    buf = MemoryStreamBuffer(max_bytes=1 << 20, max_streams=10_000)
    payload = b"x" * size
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        sids = [await buf.create("tenant", "owner") for _ in range(n_streams)]
        for sid in sids:
            for seq in range(n_chunks):
                await buf.append(sid, seq, bytes(bytearray(payload)))  # a fresh object, as read
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    per_stream = total / n_streams
    overhead = per_stream - n_chunks * size
    print(
        f"memory per buffered stream: {per_stream:.0f} B for {n_chunks} x {size} B chunks "
        f"(overhead {overhead:.0f} B, {overhead / n_chunks:.0f} B per chunk)"
    )
    assert buf.buffered_bytes == n_streams * n_chunks * size
    # Bounded: payload plus a small constant per chunk and per stream.
    assert overhead < n_chunks * 200 + 2000


async def test_one_caller_cannot_flush_other_tenants_streams() -> None:
    """Past max_streams_per_scope a caller loses its own oldest stream, nobody else's."""
    buf = MemoryStreamBuffer(max_streams=100, max_streams_per_scope=3)
    victim = await buf.create("tenant-a", "o")
    await buf.finish(victim, 0, b"answer")
    hostile = [await buf.create("tenant-b", "o") for _ in range(50)]
    assert len(buf) == 4
    assert [c.data for c in await collect(buf, victim, "tenant-a")] == [b"answer"]
    assert [(await buf.state(s)).exists for s in hostile[-4:]] == [False, True, True, True]


async def test_callers_sharing_a_scope_cannot_flush_each_others_streams() -> None:
    """The anonymous scope is shared (the id is the capability), the per-caller bound is
    not: it counts per holder, so one anonymous caller past it loses its own oldest."""
    buf = MemoryStreamBuffer(max_streams=100, max_streams_per_scope=3)
    victim = await buf.create("anon", "o", "peer:10.0.0.1")
    await buf.finish(victim, 0, b"answer")
    hostile = [await buf.create("anon", "o", "peer:10.0.0.2") for _ in range(50)]
    assert len(buf) == 4
    # Any caller of the scope holding the id reads it (a phone back on another network).
    assert [c.data for c in await collect(buf, victim, "anon")] == [b"answer"]
    assert [(await buf.state(s)).exists for s in hostile[-4:]] == [False, True, True, True]
    # Without a holder the scope is the holder (the old rule, for direct users).
    shared = [await buf.create("anon", "o") for _ in range(5)]
    assert [(await buf.state(s)).exists for s in shared] == [False, False, True, True, True]
    assert (await buf.state(victim)).exists


def test_parse_resume() -> None:
    sid = new_stream_id()
    assert parse_resume([]) == ResumeAsk()
    got = parse_resume(
        [("x-aiproxy-resumable", "1"), ("x-aiproxy-resume", sid), ("last-event-id", "41")]
    )
    assert got == ResumeAsk(True, sid, 41, None)
    # The edge's combined form, from a direct caller that kept it.
    assert parse_resume([("last-event-id", f"{sid}:7")]) == ResumeAsk(None, sid, 7, None)
    assert parse_resume([("x-aiproxy-cancel", sid)]).cancel == sid
    assert parse_resume([("x-aiproxy-resumable", "false")]).resumable is False
    # Malformed values read as absent.
    bad = parse_resume(
        [
            ("x-aiproxy-resume", "short"),
            ("last-event-id", "-3"),
            ("x-aiproxy-resumable", "maybe"),
            ("x-aiproxy-cancel", "x" * 100),
            ("last-event-id", "9" * 11),
        ]
    )
    assert bad == ResumeAsk()


async def test_recorder_writes_in_order_off_the_callers_path() -> None:
    buf = MemoryStreamBuffer()
    sid = await buf.create("t", "o")
    rec = StreamRecorder(buf, sid)
    for seq in range(20):
        rec.record(seq, b"%d" % seq)  # never suspends
    rec.record(20, b"final", ChunkKind.FINAL)
    await rec.close()
    chunks = await collect(buf, sid, "t")
    assert [c.seq for c in chunks] == list(range(21)) and chunks[-1].kind is ChunkKind.FINAL
    assert rec.failed is None and not rec.recording


async def test_recorder_stops_at_the_first_failure_and_the_stream_goes_on() -> None:
    buf = MemoryStreamBuffer(max_streams_per_scope=1)
    sid = await buf.create("t", "o")
    rec = StreamRecorder(buf, sid)
    rec.record(0, b"a")
    await asyncio.sleep(0)
    await buf.create("t", "o")  # evicts sid (the caller's own cap)
    rec.record(1, b"b")
    rec.record(2, b"c")
    await rec.close()
    assert isinstance(rec.failed, StreamNotFound) and not rec.recording
    rec.record(3, b"d")  # ignored, no error


async def test_recorder_gives_up_when_the_store_cannot_keep_up() -> None:
    class Stuck(MemoryStreamBuffer):
        async def append(self, stream_id: str, seq: int, data: bytes) -> None:
            await asyncio.Event().wait()

    buf = Stuck()
    sid = await buf.create("t", "o")
    rec = StreamRecorder(buf, sid, max_queued=5)
    for seq in range(10):
        rec.record(seq, b"x")
    assert rec.failed is not None
    await rec.close(timeout_s=0.05)  # bounded even though the store never answers
