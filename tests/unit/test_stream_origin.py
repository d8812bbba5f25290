"""The owner's lease and the store-before-hand rule of resumable streams (issue 20 §5),
as pure logic on the memory backend (real replicas: tests/integration/
test_resume_origin_lost.py)."""

from __future__ import annotations

import asyncio

import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.errors import Reason, to_status_proto
from aiproxy.core.settings import ResumeSettings
from aiproxy.core.streambuffer import (
    ChunkKind,
    Grace,
    MemoryStreamBuffer,
    StreamOriginLost,
    watch_owner,
)
from aiproxy.server.request.resume import Resumer
from tests.support.clock import FakeClock
from tests.unit.test_answers_wiring import METHOD, REQUEST, Context, Upstream, call_with


async def test_a_reader_gets_every_stored_chunk_then_origin_lost_when_the_lease_lapses() -> None:
    clock = FakeClock()
    buf = MemoryStreamBuffer(owner_lease_s=3, reader_lease_s=0.03, clock=clock)
    sid = await buf.create("t", "owner")
    assert (await buf.state(sid)).owner_alive  # create takes the first lease
    for seq in range(3):
        await buf.append(sid, seq, b"%d" % seq)
    reader = buf.read(sid, "t", 0)
    assert [(await anext(reader)).seq for _ in range(2)] == [1, 2]
    waiting = asyncio.ensure_future(anext(reader))
    await asyncio.sleep(0.1)  # a few of the reader's wake-ups: the owner is alive, it waits
    assert not waiting.done()
    clock.now += 3.01  # no heartbeat for a lease: the owner is gone
    with pytest.raises(StreamOriginLost) as err:
        await asyncio.wait_for(waiting, 10)
    status = to_status_proto(err.value)
    assert err.value.reason == Reason.STREAM_ORIGIN_LOST and status.code == 14  # UNAVAILABLE
    assert err.value.retry_delay_s and len(status.details) == 2  # ErrorInfo, RetryInfo
    # A reconnect after everything stored: the status at once, before any chunk.
    with pytest.raises(StreamOriginLost):
        await anext(buf.read(sid, "t", 2))


async def test_a_finished_stream_never_reports_its_origin_lost() -> None:
    clock = FakeClock()
    buf = MemoryStreamBuffer(owner_lease_s=3, clock=clock)
    sid = await buf.create("t", "owner")
    await buf.append(sid, 0, b"a")
    await buf.finish(sid, 1, b"f")
    clock.now += 100  # the owner let go after its final chunk
    assert [c.kind for c in [c async for c in buf.read(sid, "t")]] == [
        ChunkKind.DATA,
        ChunkKind.FINAL,
    ]


async def test_the_watcher_renews_the_lease_without_chunks_and_lets_it_lapse_when_told() -> None:
    buf = MemoryStreamBuffer(owner_lease_s=0.3)
    sid = await buf.create("t", "owner")
    recording = True
    watch = asyncio.create_task(
        watch_owner(
            buf, sid, "owner", Grace(60), interval_s=0.02, lease_s=0.3, renew=lambda: recording
        )
    )
    await asyncio.sleep(0.6)  # two leases without a chunk: a slow owner keeps its lease
    assert (await buf.state(sid)).owner_alive
    recording = False  # the store stopped receiving the stream: let the lease go
    await asyncio.sleep(0.6)
    assert not (await buf.state(sid)).owner_alive
    assert not watch.done()  # the generation itself goes on
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)


class SlowStore(MemoryStreamBuffer):
    """A store whose writes take a while (a remote one): chunks reach it late unless the
    owner waits for each write before handing the chunk on."""

    async def append(self, stream_id: str, seq: int, data: bytes) -> None:
        await asyncio.sleep(0.01)
        await super().append(stream_id, seq, data)


async def test_a_chunk_is_stored_before_its_caller_gets_it() -> None:
    buffer = SlowStore()
    resumer = Resumer(buffer, ResumeSettings(grace_s=0.5), replica_id="r1")
    wrapped = resumer.wrap(METHOD, Upstream(n=10))
    ctx = Context()
    chunks = wrapped(REQUEST, b"", ctx, call_with(("x-aiproxy-resumable", "1")))
    got: list[pb.StreamGenerateResponse] = []
    async for chunk in chunks:
        sid = dict(ctx.initial or ())["x-aiproxy-stream-id"]
        # Were this replica killed now, a resume after the chunk before would find this one.
        assert (await buffer.state(sid)).next_seq > chunk.seq, chunk.seq
        got.append(chunk)
    assert got[-1].is_final
    await resumer.aclose()
