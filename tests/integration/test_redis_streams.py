"""The Redis stream buffer against a real redis-server: one replica writes, another
resumes (separate clients), no duplicate and no gap in the live tail, bounds in bytes and
time, cancel and grace across replicas, and Redis going away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.errors import Reason
from aiproxy.core.streambuffer import (
    Chunk,
    ChunkKind,
    Grace,
    SequenceError,
    StreamExpired,
    StreamNotFound,
    StreamOriginLost,
    StreamRecorder,
    StreamStoreUnavailable,
    Verdict,
    new_stream_id,
    watch_owner,
)
from aiproxy.server.stores.redis_streams import RedisStreamBuffer
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.support.waiting import eventually


@pytest.fixture
async def pair(
    redis_server: RedisServer,  # noqa: F811
) -> AsyncIterator[tuple[RedisStreamBuffer, RedisStreamBuffer]]:
    """Two replicas' buffers: independent clients on one Redis."""
    a = RedisStreamBuffer.from_url(redis_server.url, timeout_s=1.0, block_s=0.3)
    b = RedisStreamBuffer.from_url(redis_server.url, timeout_s=1.0, block_s=0.3)
    yield a, b
    await a.aclose()
    await b.aclose()


async def collect(buf: RedisStreamBuffer, sid: str, scope: str, after: int = -1) -> list[Chunk]:
    return [c async for c in buf.read(sid, scope, after)]


async def test_resume_on_another_replica_no_duplicate_no_gap(
    pair: tuple[RedisStreamBuffer, RedisStreamBuffer],
) -> None:
    owner, other = pair
    sid = await owner.create("tenant-a", "replica-a")
    n = 200

    async def produce() -> None:
        for seq in range(n - 1):
            await owner.append(sid, seq, b"chunk-%d" % seq)
            if seq % 20 == 0:
                await asyncio.sleep(0.005)
        await owner.finish(sid, n - 1, b"final-usage")

    async def resume(after: int, delay_s: float) -> list[Chunk]:
        await asyncio.sleep(delay_s)
        return await collect(other, sid, "tenant-a", after)

    starts = [(-1, 0.0), (5, 0.01), (50, 0.03), (150, 0.05)]
    results = await asyncio.wait_for(
        asyncio.gather(produce(), *(resume(a, d) for a, d in starts)), 60
    )
    for (after, _), chunks in zip(starts, results[1:], strict=True):
        assert [c.seq for c in chunks] == list(range(after + 1, n))
        assert chunks[-1].kind is ChunkKind.FINAL and chunks[-1].data == b"final-usage"
        assert all(c.data == b"chunk-%d" % c.seq for c in chunks[:-1])
    # After the end: a reconnect that saw everything gets nothing more (no re-run).
    assert await collect(other, sid, "tenant-a", n - 1) == []


async def test_scope_sequence_and_unknown(
    pair: tuple[RedisStreamBuffer, RedisStreamBuffer],
) -> None:
    owner, other = pair
    sid = await owner.create("tenant-a", "a")
    await owner.append(sid, 0, b"x")
    with pytest.raises(SequenceError):
        await owner.append(sid, 0, b"dup")
    with pytest.raises(SequenceError):
        await owner.append(sid, 5, b"hole")
    for bad_sid, scope in ((sid, "tenant-b"), (new_stream_id(), "tenant-a")):
        with pytest.raises(StreamNotFound) as err:
            await collect(other, bad_sid, scope)
        assert err.value.reason == Reason.STREAM_NOT_FOUND
    with pytest.raises(StreamNotFound):
        await owner.append(new_stream_id(), 0, b"x")
    assert not await other.request_cancel(sid, "tenant-b")


async def test_bytes_and_count_bounds(redis_server: RedisServer) -> None:  # noqa: F811
    buf = RedisStreamBuffer.from_url(redis_server.url, timeout_s=1.0, max_bytes=100, max_chunks=3)
    try:
        sid = await buf.create("t", "o")
        for seq in range(10):
            await buf.append(sid, seq, b"x" * 30)
        with pytest.raises(StreamExpired) as err:
            await collect(buf, sid, "t")
        assert err.value.reason == Reason.STREAM_EXPIRED
        await buf.finish(sid, 10, b"f")
        assert [c.seq for c in await collect(buf, sid, "t", 7)] == [8, 9, 10]
    finally:
        await buf.aclose()


async def test_time_bound(redis_server: RedisServer) -> None:  # noqa: F811
    buf = RedisStreamBuffer.from_url(redis_server.url, timeout_s=1.0, ttl_s=0.3)
    try:
        sid = await buf.create("t", "o")
        await buf.finish(sid, 0, b"f")
        assert len(await collect(buf, sid, "t")) == 1
        deadline = time.monotonic() + 10
        while (await buf.state(sid)).exists:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        with pytest.raises(StreamNotFound):
            await collect(buf, sid, "t")
    finally:
        await buf.aclose()


async def test_cancel_on_purpose_reaches_the_owner_on_another_replica(
    pair: tuple[RedisStreamBuffer, RedisStreamBuffer],
) -> None:
    owner, other = pair
    sid = await owner.create("t", "replica-a")
    watch = asyncio.create_task(watch_owner(owner, sid, "replica-a", Grace(30), interval_s=0.05))
    deadline = time.monotonic() + 10
    while not (await other.state(sid)).owner_alive:  # the lease is visible elsewhere
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert await other.request_cancel(sid, "t")
    assert await asyncio.wait_for(watch, 10) is Verdict.CANCEL_REQUESTED


async def test_grace_kept_alive_by_a_resumer_elsewhere_then_abandoned(
    pair: tuple[RedisStreamBuffer, RedisStreamBuffer],
) -> None:
    owner, other = pair
    sid = await owner.create("t", "replica-a")
    await owner.append(sid, 0, b"a")
    grace = Grace(0.5)
    grace.caller_dropped()
    watch = asyncio.create_task(watch_owner(owner, sid, "replica-a", grace, interval_s=0.05))
    # A resumer on the other replica reads the live tail for 1.5 s (> the grace).
    reader = other.read(sid, "t", -1)
    assert (await anext(reader)).seq == 0
    pending = asyncio.ensure_future(anext(reader))
    await asyncio.sleep(1.5)
    assert not watch.done()
    # The resumer goes away: its lease lapses, then the grace runs out.
    pending.cancel()
    await asyncio.gather(pending, return_exceptions=True)
    await reader.aclose()
    assert await asyncio.wait_for(watch, 20) is Verdict.ABANDONED
    await owner.abandon(sid)
    with pytest.raises(StreamExpired) as err:
        await collect(other, sid, "t", 0)
    assert err.value.reason == Reason.STREAM_EXPIRED


async def test_reader_blocked_on_the_tail_is_woken_at_once(
    pair: tuple[RedisStreamBuffer, RedisStreamBuffer],
) -> None:
    owner, other = pair
    owner._block_s = other._block_s = 5.0  # a wake must come from the XADD, not the timeout
    sid = await owner.create("t", "o")
    got: list[float] = []

    async def read() -> None:
        async for _ in other.read(sid, "t"):
            got.append(time.monotonic())

    async def reader_blocked() -> bool:
        # The state itself, not a sleep: Redis lists the reader's connection as blocked
        # (flag b) in XREAD. Any blocked XREAD is ours: the test's Redis is its own.
        clients = await owner._client.client_list()
        return any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in clients)

    task = asyncio.create_task(read())
    await eventually(reader_blocked, what="the reader blocked in XREAD on the tail")
    assert not got and not task.done()
    sent = time.monotonic()
    await owner.append(sid, 0, b"a")
    await owner.finish(sid, 1, b"f")
    await asyncio.wait_for(task, 10)
    assert len(got) == 2 and got[0] - sent < 2.0


async def test_redis_down_fails_fast_and_recovers(redis_server: RedisServer) -> None:  # noqa: F811
    # A probe interval long enough that "within it" survives a stall of a loaded CI box.
    buf = RedisStreamBuffer.from_url(redis_server.url, timeout_s=0.2, probe_interval_s=2.0)
    try:
        sid = await buf.create("t", "o")
        redis_server.stop()
        with pytest.raises(StreamStoreUnavailable):
            await buf.append(sid, 0, b"x")
        assert not buf.healthy
        tried_at = buf._last_try
        with pytest.raises(StreamStoreUnavailable):
            await buf.create("t", "o")  # within the probe interval: no wait at all
        # ...because Redis was not tried (a try records its time): the state, not a timing.
        assert buf._last_try == tried_at
        redis_server.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                await buf.create("t", "o")
                break
            except StreamStoreUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        assert buf.healthy
    finally:
        await buf.aclose()


async def test_redis_memory_per_buffered_stream(redis_server: RedisServer) -> None:  # noqa: F811
    """What a buffered stream costs in Redis (MEMORY USAGE of its keys): the report's figure."""
    buf = RedisStreamBuffer.from_url(redis_server.url, timeout_s=1.0)
    raw = buf._client
    try:
        n_chunks, size = 50, 100
        sid = await buf.create("tenant", "owner")
        for seq in range(n_chunks - 1):
            await buf.append(sid, seq, b"x" * size)
        await buf.finish(sid, n_chunks - 1, b"x" * size)
        meta, stream, _, _ = buf._keys(sid)
        used = sum([await raw.memory_usage(k) or 0 for k in (meta, stream)])
        print(f"\nredis memory per buffered stream: {used} B for {n_chunks} x {size} B chunks")
        assert n_chunks * size <= used < n_chunks * size * 3 + 4096
    finally:
        await buf.aclose()


async def test_drop_and_resume_on_another_replica_equals_an_uninterrupted_run(
    pair: tuple[RedisStreamBuffer, RedisStreamBuffer],
) -> None:
    """The owner records real chunk messages through a StreamRecorder while its caller
    reads them directly; the caller drops after 5 and resumes on the other replica with
    last-event-id: the text and the final usage equal the uninterrupted run's."""
    owner, other = pair
    words = [f"w{i} " for i in range(30)]

    async def upstream() -> AsyncIterator[pb.StreamGenerateResponse]:
        for seq, word in enumerate(words):
            yield pb.StreamGenerateResponse(delta=word, seq=seq)
            await asyncio.sleep(0.005)
        yield pb.StreamGenerateResponse(
            is_final=True, seq=len(words), usage=pb.Usage(completion_tokens=len(words))
        )

    sid = await owner.create("tenant", "replica-a")
    recorder = StreamRecorder(owner, sid)
    seen: list[pb.StreamGenerateResponse] = []

    async def pump() -> None:  # the owner keeps going after its caller dropped (grace)
        async for msg in upstream():
            recorder.record(
                msg.seq,
                msg.SerializeToString(),
                ChunkKind.FINAL if msg.is_final else ChunkKind.DATA,
            )
            if len(seen) < 5:
                seen.append(msg)  # what the caller got before its connection dropped
        await recorder.close()

    pumping = asyncio.create_task(pump())
    await eventually(lambda: len(seen) >= 5, 30, "five chunks to the caller", interval=0.001)
    resumed = [
        pb.StreamGenerateResponse.FromString(c.data)
        async for c in other.read(sid, "tenant", seen[-1].seq)
    ]
    await asyncio.wait_for(pumping, 30)
    got = seen + resumed
    assert [m.seq for m in got] == list(range(len(words) + 1))
    assert "".join(m.delta for m in got) == "".join(words)
    assert got[-1].is_final and got[-1].usage.completion_tokens == len(words)
    assert recorder.failed is None


async def test_a_reader_elsewhere_gets_origin_lost_once_the_owner_lease_lapses(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The owner (replica a) stores 3 chunks, renews its lease for a while with no chunk
    (a slow generation: the reader on replica b keeps waiting), then stops renewing (it
    died): b's reader gets the 3 chunks, then STREAM_ORIGIN_LOST, never silence."""
    lease_s = 0.5
    a = RedisStreamBuffer.from_url(
        redis_server.url, timeout_s=1.0, block_s=0.2, owner_lease_s=lease_s
    )
    b = RedisStreamBuffer.from_url(redis_server.url, timeout_s=1.0, block_s=0.2)
    try:
        sid = await a.create("t", "replica-a")
        for seq in range(3):
            await a.append(sid, seq, b"%d" % seq)
        watch = asyncio.create_task(
            watch_owner(a, sid, "replica-a", Grace(60), interval_s=0.05, lease_s=lease_s)
        )
        reader = b.read(sid, "t", -1)
        assert [(await anext(reader)).seq for _ in range(3)] == [0, 1, 2]
        waiting = asyncio.ensure_future(anext(reader))
        await asyncio.sleep(lease_s * 4)  # no chunk for 4 leases: alive, so b waits
        assert not waiting.done()
        watch.cancel()  # the owner dies: nobody renews its lease
        await asyncio.gather(watch, return_exceptions=True)
        died = time.monotonic()
        with pytest.raises(StreamOriginLost) as err:
            await asyncio.wait_for(waiting, 30)
        assert err.value.reason == Reason.STREAM_ORIGIN_LOST and err.value.retry_delay_s
        # Bound: the lease, then one blocking wait of the reader (generous on a busy box).
        assert time.monotonic() - died < 10 * (lease_s + 0.2 + 1.0)
        # A reconnect after everything stored: the status at once, no chunk.
        with pytest.raises(StreamOriginLost):
            await collect(b, sid, "t", 2)
    finally:
        await a.aclose()
        await b.aclose()
