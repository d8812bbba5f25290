"""Transport bounds on what a caller can send, with real processes: request message size,
metadata size, streams per connection, idle connections. Oversized input is refused by
grpc itself with RESOURCE_EXHAUSTED (before any interceptor runs, so without the proxy's
ErrorInfo), and the proxy keeps serving everyone else meanwhile.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.settings import load_settings
from aiproxy.server.app import server_options
from tests.conftest import agent_args, proxy_args
from tests.support.grpc_helpers import stub

MESSAGE_LIMIT = 64 * 1024
METADATA_LIMIT = 4 * 1024
BOUNDS_ENV = {
    "AIPROXY_SERVER__MAX_RECEIVE_MESSAGE_BYTES": str(MESSAGE_LIMIT),
    "AIPROXY_SERVER__MAX_METADATA_BYTES": str(METADATA_LIMIT),
}
SMALL = pb.GenerateRequest(prompt="hello", options=pb.GenerationOptions(max_tokens=4))


@pytest.fixture
def slow_agent(spawn):
    """Streams 30 tokens, 20 ms apart: long enough to be in flight during other calls."""
    return spawn(*agent_args(token_delay_ms=20), name="agent")


@pytest.fixture
def bounded_proxy(spawn, slow_agent):
    return spawn(*proxy_args(slow_agent.address), env=BOUNDS_ENV, name="proxy")


async def long_stream(address: str) -> list[pb.StreamGenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        request = pb.StreamGenerateRequest(
            prompt="a long answer", options=pb.GenerationOptions(max_tokens=30)
        )
        return [c async for c in stub(channel).StreamGenerate(request, timeout=30)]


async def test_oversized_message_is_resource_exhausted_and_others_are_served(bounded_proxy) -> None:
    other = asyncio.create_task(long_stream(bounded_proxy.address))
    async with grpc.aio.insecure_channel(bounded_proxy.address) as channel:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub(channel).Generate(
                    pb.GenerateRequest(prompt="x" * (MESSAGE_LIMIT + 1)), timeout=10
                )
            assert exc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (exc.value.details() or "")
        # The same connection still works for a message within the limit (and within
        # the request validation's prompt cap).
        assert (
            await stub(channel).Generate(pb.GenerateRequest(prompt="x" * 8000), timeout=10)
        ).text
    chunks = await asyncio.wait_for(other, timeout=30)
    assert chunks[-1].is_final and not chunks[-1].HasField("error")


async def test_oversized_metadata_is_resource_exhausted_and_others_are_served(
    bounded_proxy,
) -> None:
    other = asyncio.create_task(long_stream(bounded_proxy.address))
    async with grpc.aio.insecure_channel(bounded_proxy.address) as channel:
        for size in (METADATA_LIMIT + 1, 4 * METADATA_LIMIT):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub(channel).Generate(
                    SMALL, metadata=(("x-padding", "p" * size),), timeout=10
                )
            assert exc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "metadata" in (exc.value.details() or "")
        assert (
            await stub(channel).Generate(SMALL, metadata=(("x-padding", "p" * 1024),), timeout=10)
        ).text
    chunks = await asyncio.wait_for(other, timeout=30)
    assert chunks[-1].is_final and not chunks[-1].HasField("error")


async def test_streams_per_connection_are_bounded(spawn, slow_agent) -> None:
    """With one stream per connection, a second stream on the same channel starts only
    after the first one ends (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)."""
    proxy = spawn(
        *proxy_args(slow_agent.address),
        env={"AIPROXY_SERVER__MAX_CONCURRENT_STREAMS_PER_CONNECTION": "1"},
        name="proxy",
    )
    request = pb.StreamGenerateRequest(
        prompt="one at a time", options=pb.GenerationOptions(max_tokens=15)
    )
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        await stub(channel).Generate(SMALL, timeout=10)  # connected; SETTINGS received
        first = stub(channel).StreamGenerate(request, timeout=30)
        await first.read()  # the first stream is open and flowing

        async def second_stream_first_chunk_at() -> float:
            second = stub(channel).StreamGenerate(request, timeout=30)
            assert (await second.read()) is not grpc.aio.EOF
            at = loop.time()
            while (await second.read()) is not grpc.aio.EOF:
                pass
            return at

        second = asyncio.create_task(second_stream_first_chunk_at())
        while (await first.read()) is not grpc.aio.EOF:
            pass
        first_ended = loop.time()
        second_started = await asyncio.wait_for(second, timeout=30)
    assert second_started >= first_ended


async def test_idle_connections_are_closed(spawn, slow_agent) -> None:
    proxy = spawn(
        *proxy_args(slow_agent.address),
        env={"AIPROXY_SERVER__MAX_CONNECTION_IDLE_S": "0.5"},
        name="proxy",
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        await stub(channel).Generate(SMALL, timeout=10)
        assert channel.get_state() is grpc.ChannelConnectivity.READY

        async def until_not_ready() -> grpc.ChannelConnectivity:
            state = channel.get_state()
            while state is grpc.ChannelConnectivity.READY:
                await channel.wait_for_state_change(state)
                state = channel.get_state()
            return state

        # The server's GOAWAY after 0.5 s idle sends the channel back to IDLE.
        assert (
            await asyncio.wait_for(until_not_ready(), timeout=15) is grpc.ChannelConnectivity.IDLE
        )
        # ...and the next call simply reconnects.
        assert (await stub(channel).Generate(SMALL, timeout=10)).text


def test_server_options_carry_the_bounds(monkeypatch) -> None:
    monkeypatch.setenv("AIPROXY_SERVER__MAX_CONNECTION_AGE_S", "600")
    options = dict(server_options(load_settings()))
    assert (
        options["grpc.max_metadata_size"] == options["grpc.absolute_max_metadata_size"] == 16 * 1024
    )
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 330_000
    monkeypatch.setenv("AIPROXY_SERVER__MAX_CONNECTION_AGE_S", "0")
    monkeypatch.setenv("AIPROXY_SERVER__MAX_CONNECTION_IDLE_S", "0")
    options = dict(server_options(load_settings()))
    assert (
        "grpc.max_connection_age_ms" not in options and "grpc.max_connection_idle_ms" not in options
    )


# ---- bytes that are not a valid message (issue 13, item 7) -------------------------------

# Field 1, wire type 2 (length-delimited), length 100, but only 3 bytes follow.
TRUNCATED = b"\x0a\x64abc"


@pytest.mark.parametrize(
    "path, streaming",
    [
        ("/ai.agent.v1.AgentService/Generate", False),
        ("/ai.agent.v1.AgentService/StreamGenerate", True),
        ("/grpc.health.v1.Health/Check", False),
    ],
)
async def test_malformed_request_bytes_are_invalid_argument_without_internals(
    bounded_proxy, path, streaming
) -> None:
    from tests.integration.test_protection import rich

    async with grpc.aio.insecure_channel(bounded_proxy.address) as channel:
        if streaming:
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
                TRUNCATED, timeout=10
            )
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in call:
                    pass
        else:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await channel.unary_unary(
                    path, request_serializer=None, response_deserializer=None
                )(TRUNCATED, timeout=10)
        err = exc.value
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        shaped = rich(err)
        assert shaped.reason == "MALFORMED_REQUEST"
        details = err.details() or ""
        assert "class" not in details and "Error" not in details and "<" not in details, details
        # The connection still serves well-formed calls.
        assert (await stub(channel).Generate(SMALL, timeout=10)).text
