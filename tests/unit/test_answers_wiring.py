"""server/request/resume.py and server/request/caching.py around a stand-in terminal (pure logic: the
real processes are in tests/integration/test_resume_and_cache.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.cache import LruCache, ResponseCache
from aiproxy.core.callinfo import CallInfo
from aiproxy.core.service import agent_service
from aiproxy.core.settings import CacheSettings, ResumeSettings
from aiproxy.core.streambuffer import MemoryStreamBuffer, StreamExpired
from aiproxy.server.request.caching import Caching
from aiproxy.server.request.resume import Resumer, StreamFinished, stream_scope
from tests.support.waiting import eventually

METHOD = next(m for m in agent_service().methods if m.name == "StreamGenerate")


class Context:
    def __init__(self) -> None:
        self.initial: tuple | None = None

    async def send_initial_metadata(self, metadata: Any) -> None:
        self.initial = tuple(metadata)

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


class Upstream:
    """A stream terminal: `n` deltas (a heartbeat after the first), then a final chunk
    unless `final` is False; records how often it ran and whether it was closed early."""

    def __init__(self, n: int = 5, final: bool = True, delay_s: float = 0.0) -> None:
        self.n, self.final, self.delay_s = n, final, delay_s
        self.runs = 0
        self.closed_early = 0

    def __call__(
        self, request: Any, raw: bytes, context: Any, call: CallInfo
    ) -> AsyncIterator[Any]:
        return self._run()

    async def _run(self) -> AsyncIterator[Any]:
        self.runs += 1
        seq = 0
        done = False
        try:
            for i in range(self.n):
                await asyncio.sleep(self.delay_s)
                yield pb.StreamGenerateResponse(delta=f"t{i} ", seq=seq)
                seq += 1
                if i == 0:
                    yield pb.StreamGenerateResponse(heartbeat=True, seq=seq)
                    seq += 1
            if self.final:
                yield pb.StreamGenerateResponse(is_final=True, seq=seq)
            done = True
        finally:
            if not done:
                self.closed_early += 1


def call_with(*metadata: tuple[str, str], caller: str = "sub:alice") -> CallInfo:
    return CallInfo(METHOD.path, metadata=dict(metadata), caller=caller)


REQUEST = pb.StreamGenerateRequest(prompt="hi")


def test_stream_scope_prefers_tenant_then_authenticated_identity() -> None:
    assert stream_scope(CallInfo("m", tenant="acme", caller="sub:a", identity="sub:a")) == (
        "tenant:acme"
    )
    assert stream_scope(CallInfo("m", caller="key:abc", identity="key:abc")) == "key:abc"
    # Anonymous: the id alone (a phone that comes back from another address resumes).
    assert stream_scope(CallInfo("m", caller="peer:10.0.0.1", identity="peer:10.0.0.1")) == "anon"
    # A declared (unverified) key is a label, never a scope of its own.
    unverified = CallInfo("m", caller="key:abc@peer:10.0.0.1", identity="peer:10.0.0.1")
    assert stream_scope(unverified) == "anon"


async def test_cached_stream_skips_heartbeats_and_incomplete_streams_are_not_stored() -> None:
    caching = Caching(ResponseCache(LruCache(1 << 20)), CacheSettings())
    incomplete = Upstream(final=False)
    wrapped = caching.stream(METHOD, incomplete)
    md = ("cache-control", "max-age=60")
    for _ in range(2):
        got = [c async for c in wrapped(REQUEST, b"", Context(), call_with(md))]
        assert len(got) == 6  # every chunk delivered, heartbeat included
    assert incomplete.runs == 2  # never stored

    upstream = Upstream()
    wrapped = caching.stream(METHOD, upstream)
    first = [c async for c in wrapped(REQUEST, b"", Context(), call_with(md))]
    ctx = Context()
    again = [c async for c in wrapped(REQUEST, b"", ctx, call_with(md))]
    assert upstream.runs == 1 and ("x-aiproxy-cache", "hit") in (ctx.initial or ())
    assert not any(c.heartbeat for c in again)
    assert [c.seq for c in again] == list(range(len(again)))
    assert [c.delta for c in again] == [c.delta for c in first if not c.heartbeat]
    # Another caller: another key.
    [c async for c in wrapped(REQUEST, b"", Context(), call_with(md, caller="sub:bob"))]
    assert upstream.runs == 2


async def test_dropped_resumable_stream_runs_for_the_grace_then_is_cancelled() -> None:
    buffer = MemoryStreamBuffer()
    resumer = Resumer(buffer, ResumeSettings(grace_s=0.2), replica_id="r1")
    upstream = Upstream(n=1000, delay_s=0.01)
    wrapped = resumer.wrap(METHOD, upstream)
    ctx = Context()
    chunks = wrapped(REQUEST, b"", ctx, call_with(("x-aiproxy-resumable", "1")))
    seen = [await anext(chunks) for _ in range(3)]
    sid = dict(ctx.initial or ())["x-aiproxy-stream-id"]
    await chunks.aclose()  # type: ignore[attr-defined]  # the caller drops
    assert resumer.detached == 1 and upstream.closed_early == 0  # still generating
    # A resume within the grace continues after the last seq seen, with no gap.
    resumed = resumer.wrap(METHOD, upstream)(
        REQUEST,
        b"",
        Context(),
        call_with(("x-aiproxy-resume", sid), ("last-event-id", str(seen[-1].seq))),
    )
    more = [await anext(resumed) for _ in range(5)]
    assert [c.seq for c in more] == list(range(seen[-1].seq + 1, seen[-1].seq + 6))
    await resumed.aclose()  # type: ignore[attr-defined]
    # The grace runs out: the upstream is cancelled.
    await eventually(lambda: upstream.closed_early, 10, "the upstream to be cancelled")
    assert upstream.runs == 1
    with pytest.raises(StreamExpired):
        late = resumer.wrap(METHOD, upstream)(
            REQUEST, b"", Context(), call_with(("x-aiproxy-resume", sid))
        )
        await anext(late)
    await resumer.aclose()


async def test_resume_after_the_final_chunk_is_stream_finished() -> None:
    resumer = Resumer(MemoryStreamBuffer(), ResumeSettings(), replica_id="r1")
    upstream = Upstream(n=3)
    ctx = Context()
    whole = [
        c
        async for c in resumer.wrap(METHOD, upstream)(
            REQUEST, b"", ctx, call_with(("x-aiproxy-resumable", "1"))
        )
    ]
    sid = dict(ctx.initial or ())["x-aiproxy-stream-id"]

    async def finished() -> bool:
        return (await resumer.buffer.state(sid)).finished

    await eventually(finished, 10, "the final chunk in the buffer")
    with pytest.raises(StreamFinished):
        late = resumer.wrap(METHOD, upstream)(
            REQUEST,
            b"",
            Context(),
            call_with(("x-aiproxy-resume", sid), ("last-event-id", str(whole[-1].seq))),
        )
        await anext(late)
    assert upstream.runs == 1
    await resumer.aclose()
