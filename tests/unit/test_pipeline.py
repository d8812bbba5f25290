"""The pipeline (server/request/pipeline.py) on a real grpc.aio server (port 0), with recording
stages: each stage's exit runs exactly once, innermost first, only after its enter
succeeded, however the call ends; decoding happens where DECODE sits; a stream's chunks
are counted and timed inline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.callinfo import CallInfo, current_call, metadata_dict
from aiproxy.core.errors import InvalidArgument, MalformedRequest
from aiproxy.core.service import Method, agent_service
from aiproxy.interceptors import error_handling
from aiproxy.server.chain import DECODE
from tests.support.pipeline import channel_for, pipeline_for
from tests.support.waiting import eventually

GENERATE = "/ai.agent.v1.AgentService/Generate"
STREAM = "/ai.agent.v1.AgentService/StreamGenerate"
TRUNCATED = b"\x0a\x64abc"


class Recorder:
    """A stage that records its enters and exits; refuses when x-refuse names it."""

    def __init__(self, name: str, log: list[str], calls: list[CallInfo]) -> None:
        self.name, self.log, self.calls = name, log, calls
        self.binds = 0
        self.exit = self._exit

    def bind(self, method: Method) -> Recorder:
        self.binds += 1
        return self

    async def enter(self, call: CallInfo, request: Any, context: Any) -> None:
        self.log.append(f"enter {self.name} {type(request).__name__}")
        if call.header("x-refuse") == self.name:
            raise InvalidArgument(f"refused by {self.name}")

    def _exit(self, call: CallInfo) -> None:
        self.log.append(f"exit {self.name} {call.code}")
        self.calls.append(call)


class Agent:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def Generate(self, request: Any, context: Any) -> Any:
        call = current_call.get()
        assert call is not None and call.request is request
        if request.prompt == "boom":
            raise RuntimeError("a bug")
        return pb.GenerateResponse(text=request.prompt)

    async def StreamGenerate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        for i in range(3):
            yield pb.StreamGenerateResponse(delta=str(i), seq=i)
        if request.prompt == "fail":
            raise RuntimeError("midway")
        if request.prompt == "hang":
            await self.release.wait()
        yield pb.StreamGenerateResponse(is_final=True, seq=3)


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, list[str], list[CallInfo], list]]:
    log: list[str] = []
    calls: list[CallInfo] = []
    stages = [
        Recorder("a", log, calls),
        Recorder("b", log, calls),
        DECODE,
        Recorder("c", log, calls),
    ]
    async with channel_for(Agent(), stages) as channel:
        yield channel, log, calls, stages


def test_stages_are_bound_once_per_method_at_build_time() -> None:
    log: list[str] = []
    stage = Recorder("a", log, [])
    pipeline_for(Agent(), [stage])
    assert stage.binds == len(agent_service().methods)
    assert log == []


async def test_unary_enters_in_order_decodes_at_its_place_and_exits_innermost_first(
    served,
) -> None:
    channel, log, calls, _ = served
    request = pb.GenerateRequest(prompt="hi").SerializeToString()
    answer = await channel.unary_unary(GENERATE)(request, timeout=5)
    assert pb.GenerateResponse.FromString(answer).text == "hi"
    assert log == [
        "enter a NoneType",
        "enter b NoneType",
        "enter c GenerateRequest",
        "exit c OK",
        "exit b OK",
        "exit a OK",
    ]
    assert len({id(c) for c in calls}) == 1  # one CallInfo for the call


async def test_a_refusal_exits_only_the_stages_that_entered(served) -> None:
    channel, log, _, _ = served
    request = pb.GenerateRequest(prompt="hi").SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(GENERATE)(request, metadata=(("x-refuse", "b"),), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert log == ["enter a NoneType", "enter b NoneType", "exit a INVALID_ARGUMENT"]


async def test_malformed_bytes_fail_at_decode_after_the_stages_before_it(served) -> None:
    channel, log, _, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(GENERATE)(TRUNCATED, timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert log == [
        "enter a NoneType",
        "enter b NoneType",
        "exit b INVALID_ARGUMENT",
        "exit a INVALID_ARGUMENT",
    ]


async def test_a_bug_is_internal_and_still_exits_everyone(served) -> None:
    channel, log, calls, _ = served
    request = pb.GenerateRequest(prompt="boom").SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(GENERATE)(request, timeout=5)
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert [e for e in log if e.startswith("exit")] == [
        "exit c INTERNAL",
        "exit b INTERNAL",
        "exit a INTERNAL",
    ]
    assert calls[0].reason == "INTERNAL"


async def test_stream_chunks_are_counted_and_timed_inline(served) -> None:
    channel, log, calls, _ = served
    request = pb.StreamGenerateRequest(prompt="x").SerializeToString()
    chunks = [c async for c in channel.unary_stream(STREAM)(request, timeout=5)]
    assert len(chunks) == 4
    await eventually(lambda: len(calls) == 3)
    call = calls[0]
    assert (call.code, call.chunks) == ("OK", 4)
    assert call.first_at <= call.last_at and call.gap_max >= 0
    assert call.first.delta == "0" and call.last.is_final
    assert [e for e in log if e.startswith("exit")] == ["exit c OK", "exit b OK", "exit a OK"]


async def test_stream_failing_midway_ends_in_band_and_exits_once(served) -> None:
    channel, log, calls, _ = served
    request = pb.StreamGenerateRequest(prompt="fail").SerializeToString()
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in channel.unary_stream(
            STREAM, response_deserializer=pb.StreamGenerateResponse.FromString
        )(request, timeout=5):
            got.append(chunk)
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert [c.seq for c in got] == [0, 1, 2, 3] and got[-1].is_final
    assert got[-1].finish_reason == pb.FINISH_REASON_ERROR
    await eventually(lambda: len(calls) == 3)
    assert calls[0].chunks == 4
    assert [e for e in log if e.startswith("exit")] == [
        "exit c INTERNAL",
        "exit b INTERNAL",
        "exit a INTERNAL",
    ]


async def test_a_cancelled_stream_exits_once_as_cancelled(served) -> None:
    channel, log, calls, _ = served
    request = pb.StreamGenerateRequest(prompt="hang").SerializeToString()
    call = channel.unary_stream(STREAM)(request, timeout=30)
    for _ in range(3):
        await call.read()
    call.cancel()
    await eventually(lambda: len(calls) == 3)
    assert [e for e in log if e.startswith("exit")] == [
        "exit c CANCELLED",
        "exit b CANCELLED",
        "exit a CANCELLED",
    ]
    await asyncio.sleep(0.1)
    assert len(calls) == 3  # exactly once


def test_metadata_is_read_once_into_a_dict_with_repeated_keys_noted() -> None:
    headers, repeated = metadata_dict((("a", "1"), ("b", "2"), ("a", "3")))
    assert headers == {"a": "1", "b": "2"} and repeated == {"a"}
    assert metadata_dict(None) == ({}, frozenset())


class _Context:
    """Just what the pipeline's stream frame asks of a grpc context."""

    def __init__(self, raw: bytes = b"") -> None:
        self._raw = raw

    async def read(self) -> bytes:
        return self._raw

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def time_remaining(self) -> float:
        return 30.0


async def test_a_chunk_handed_to_grpc_is_charged_even_if_the_caller_leaves_before_its_write_ends() -> (
    None
):
    """grpc cancels a stream by closing the handler's generator at its `yield`: the chunk
    given to grpc may already have reached the caller (it read it, then cancelled), so it
    counts in streamed_tokens (what a stream without usage is charged) before the yield."""
    calls: list[CallInfo] = []

    class Tokens:
        exit = None

        def bind(self, method: Method) -> Tokens:
            return self

        async def enter(self, call: CallInfo, request: Any, context: Any) -> None:
            call.chunk_tokens = lambda chunk: len(chunk.delta)
            calls.append(call)

    handler = pipeline_for(Agent(), [DECODE, Tokens()]).handlers["StreamGenerate"]
    raw = pb.StreamGenerateRequest(prompt="hang").SerializeToString()
    chunks = handler.stream_stream(None, _Context(raw))
    for _ in range(2):
        await chunks.__anext__()
    await chunks.aclose()  # as grpc does when the caller cancels during the second write
    (call,) = calls
    assert (call.chunks, call.streamed_tokens, call.code) == (2, 2, "CANCELLED")


async def test_a_call_without_its_whole_request_message_is_refused_not_left_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream ended without one whole message (grpc.aio's EOF): refused at once. Part of
    a message and then nothing: refused after READ_TIMEOUT_S, not held for as long as the
    connection lives (real processes: tests/chaos/test_edge_isolation.py)."""

    class Ended:
        async def read(self) -> Any:
            return grpc.aio.EOF

    class Silent:
        async def read(self) -> Any:
            await asyncio.sleep(3600)

    with pytest.raises(MalformedRequest, match="ended without"):
        await error_handling.read_one(Ended())  # type: ignore[arg-type]
    monkeypatch.setattr(error_handling, "READ_TIMEOUT_S", 0.05)
    with pytest.raises(MalformedRequest, match="did not arrive"):
        await error_handling.read_one(Silent())  # type: ignore[arg-type]
    assert await error_handling.read_one(_Context(b"raw")) == b"raw"  # type: ignore[arg-type]


async def test_the_read_timeout_refuses_only_late_reads_and_leaves_no_timer_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One timer per event loop watches every waiting read: a silent caller is refused,
    one whose message comes is not, a cancellation from elsewhere stays a cancellation,
    and once nothing waits nothing is left scheduled (an idle proxy is not woken)."""

    class Late:
        def __init__(self, after: float) -> None:
            self.after = after

        async def read(self) -> Any:
            await asyncio.sleep(self.after)
            return b"late"

    monkeypatch.setattr(error_handling, "READ_TIMEOUT_S", 0.2)
    silent = asyncio.ensure_future(error_handling.read_one(Late(3600)))  # type: ignore[arg-type]
    prompt = asyncio.ensure_future(error_handling.read_one(Late(0.01)))  # type: ignore[arg-type]
    cancelled = asyncio.ensure_future(error_handling.read_one(Late(3600)))  # type: ignore[arg-type]
    assert await prompt == b"late"
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    with pytest.raises(MalformedRequest, match="did not arrive"):
        await silent
    loop = asyncio.get_running_loop()
    watch = error_handling._WATCHES.get(loop)
    assert watch is None or (not watch.waiting and not watch.expired)
    # A shorter timeout than the one the timer is set for is still honoured.
    monkeypatch.setattr(error_handling, "READ_TIMEOUT_S", 30.0)
    slow = asyncio.ensure_future(error_handling.read_one(Late(3600)))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    monkeypatch.setattr(error_handling, "READ_TIMEOUT_S", 0.05)
    with pytest.raises(MalformedRequest, match="did not arrive"):
        await error_handling.read_one(Late(3600))  # type: ignore[arg-type]
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert error_handling._WATCHES[loop].waiting == {}
