"""A resumable stream whose origin replica dies (issue 20, section 5), with real processes:
one agent, two proxy replicas sharing a real redis-server for the stream buffer.

- The caller reads 10 chunks from P1, P1 is SIGKILLed, the caller resumes on P2 after
  seq 3: it gets every chunk it had read (4..9, the same text: a chunk is stored before a
  caller gets it), whatever else the store held, then an in-band final chunk with
  ErrorInfo STREAM_ORIGIN_LOST + RetryInfo, and the call ends UNAVAILABLE with the same
  status, within a bound derived from the owner's lease (not the caller's deadline). An
  EventSource-style reconnect after that final chunk gets the status alone (HTTP 503
  through the edge), so it stops reconnecting.
- A slow origin is not a dead one: a gap between tokens longer than the lease does not
  end a resume (the lease is renewed on its own clock, not per chunk).
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.conftest import agent_args, proxy_args
from tests.integration.test_protection import read_stream, rich_from_status
from tests.integration.test_resume_and_cache import error_of, metric, stream_request, text_of
from tests.support.grpc_helpers import stub
from tests.support.procs import ServiceProcess
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

OWNER_LEASE_S = 1.0  # stream.resume.owner_lease_s (the minimum the settings allow)
READER_BLOCK_S = 1.0  # RedisStreamBuffer: min(block_s 1.0, reader lease 3.0 / 3)
STORE_TIMEOUT_S = 0.25  # AIPROXY_REDIS__TIMEOUT_MS below
# The owner renewed last no later than its death; the lease lapses OWNER_LEASE_S after,
# and a reader on the tail sees it at its next read, at most READER_BLOCK_S (+ one store
# call) later.
DETECTION_BOUND_S = OWNER_LEASE_S + READER_BLOCK_S + STORE_TIMEOUT_S
# Generous: a CPU-starved 2-core box shared with other suites. Still far below the
# caller's own deadline (the symptom was silence until it).
GENEROUS_BOUND_S = 4 * DETECTION_BOUND_S + 5
CALL_TIMEOUT_S = 40.0


@pytest.fixture
def replicas(
    spawn: Callable[..., ServiceProcess],
    redis_server: RedisServer,  # noqa: F811
    tmp_path: pathlib.Path,
) -> list[ServiceProcess]:
    agent = spawn(*agent_args(token_delay_ms=100), name="agent")
    env = {
        "AIPROXY_REDIS__URL": redis_server.url,
        "AIPROXY_STREAM__RESUME__BACKEND": "redis",
        "AIPROXY_STREAM__RESUME__OWNER_LEASE_S": str(OWNER_LEASE_S),
        "AIPROXY_STREAM__RESUME__GRACE_S": "30",
        "AIPROXY_REDIS__TIMEOUT_MS": str(round(STORE_TIMEOUT_S * 1000)),
    }
    return [spawn(*proxy_args(agent.address), env=env, name=f"proxy-{i}") for i in range(2)]


def origin_lost(rich: Any) -> None:
    assert rich.code == grpc.StatusCode.UNAVAILABLE, rich
    assert rich.reason == "STREAM_ORIGIN_LOST", rich
    assert rich.retry_delay_s is not None and rich.retry_delay_s > 0, rich


async def test_origin_killed_the_resumer_gets_every_seen_chunk_then_origin_lost(
    replicas: list[ServiceProcess],
) -> None:
    p1, p2 = replicas
    request = stream_request("the origin dies under me", tokens=400)
    async with (
        grpc.aio.insecure_channel(p1.address) as c1,
        grpc.aio.insecure_channel(p2.address) as c2,
    ):
        call = stub(c1).StreamGenerate(
            request, metadata=(("x-aiproxy-resumable", "1"),), timeout=CALL_TIMEOUT_S
        )
        sid = dict(await call.initial_metadata())["x-aiproxy-stream-id"]
        seen: list[pb.StreamGenerateResponse] = []
        async for chunk in call:
            seen.append(chunk)
            if len(seen) == 10:
                break
        # The caller read seq 0..9; the origin dies at once, while still generating.
        p1.send_signal(signal.SIGKILL)
        assert p1.wait(timeout=10) == -signal.SIGKILL
        killed_at = time.monotonic()
        call.cancel()

        resumed = stub(c2).StreamGenerate(
            request,
            metadata=(("x-aiproxy-resume", sid), ("last-event-id", "3")),
            timeout=CALL_TIMEOUT_S,
        )
        chunks, err = await read_stream(resumed)
        ended_after_s = time.monotonic() - killed_at
        print(
            f"\norigin lost seen {ended_after_s:.2f} s after the kill (bound {DETECTION_BOUND_S} s)"
        )

        # It ends with the status, long before the caller's deadline...
        assert err is not None, "the resume must end with an error status, not OK"
        assert err.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "silence until the deadline"
        origin_lost(error_of(err))
        assert ended_after_s < GENEROUS_BOUND_S, (ended_after_s, DETECTION_BOUND_S)
        # ...after an in-band final chunk carrying the same (what an SSE browser sees).
        assert chunks, "the stored chunks after last-event-id, then the final error chunk"
        final, data = chunks[-1], chunks[:-1]
        assert final.is_final and final.finish_reason == pb.FINISH_REASON_ERROR
        origin_lost(rich_from_status(final.error))
        # No gap, no duplicate; every chunk the caller had read after seq 3 is there, the same.
        seqs = [c.seq for c in chunks]
        assert seqs == list(range(4, 4 + len(chunks)))
        assert [c.seq for c in data[:6]] == [c.seq for c in seen[4:10]]
        assert text_of(data[:6]) == text_of(seen[4:10])
        assert all(not c.is_final for c in data)

        # An EventSource reconnects with the final chunk's id: the status alone (HTTP 503
        # through the edge), no body, so it stops; as fast (the lease is already gone).
        again = stub(c2).StreamGenerate(
            request,
            metadata=(("x-aiproxy-resume", sid), ("last-event-id", str(final.seq))),
            timeout=CALL_TIMEOUT_S,
        )
        chunks, err = await read_stream(again)
        assert chunks == [] and err is not None
        origin_lost(error_of(err))
    # Counted where an operator looks: once in the resumed stream, once at the reconnect.
    assert metric(p2, "ai_proxy_stream_resumes_total", outcome="origin_lost") == 2


async def test_a_slow_origin_is_not_a_dead_one(replicas: list[ServiceProcess]) -> None:
    """Tokens 2.5 lease-lengths apart: a resumer on the other replica waits them out and
    gets the whole answer (the lease is renewed on its own clock, not per chunk)."""
    p1, p2 = replicas
    gap_ms = round(OWNER_LEASE_S * 2500)
    request = stream_request("slow but alive", tokens=3)
    async with (
        grpc.aio.insecure_channel(p1.address) as c1,
        grpc.aio.insecure_channel(p2.address) as c2,
    ):
        call = stub(c1).StreamGenerate(
            request,
            metadata=(("x-aiproxy-resumable", "1"), ("x-fault-slow-ms", str(gap_ms))),
            timeout=CALL_TIMEOUT_S * 2,
        )
        sid = dict(await call.initial_metadata())["x-aiproxy-stream-id"]
        first = await call.read()
        assert first is not grpc.aio.EOF
        resumed = stub(c2).StreamGenerate(
            request,
            metadata=(("x-aiproxy-resume", sid), ("last-event-id", str(first.seq))),
            timeout=CALL_TIMEOUT_S * 2,
        )

        async def rest_of_original() -> list[pb.StreamGenerateResponse]:
            out = []
            while (chunk := await call.read()) is not grpc.aio.EOF:
                out.append(chunk)
            return out

        (chunks, err), original = await asyncio.gather(read_stream(resumed), rest_of_original())
        assert err is None, error_of(err)
        assert chunks and chunks[-1].is_final and not chunks[-1].HasField("error")
        assert [c.seq for c in chunks] == [c.seq for c in original]
        assert text_of(chunks) == text_of(original)
        # The gaps were really longer than the lease: the test tests what it says.
        assert len(chunks) >= 3
