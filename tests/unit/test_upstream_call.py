"""The upstream call (server/pool/endpoint.py Endpoint.unary / .stream) against a real
in-process grpc.aio server: the breaker gate and settlement and the grpc_client_* series
that used to be grpc.aio client interceptors, and the caller's coalescing header."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from aiproxy.core.breaker import BreakerState, CircuitBreaker
from aiproxy.core.callinfo import CallInfo
from aiproxy.core.errors import CircuitOpen
from aiproxy.core.metrics import GrpcClientMetrics
from aiproxy.core.settings import ConfigError, UpstreamSettings, load_settings
from aiproxy.interceptors.client_observability import ClientMetrics
from aiproxy.server.pool.endpoint import Endpoint
from aiproxy.server.request.forwarding import coalesce_window
from tests.support.clock import FakeClock
from tests.support.waiting import eventually

UNARY = "/test.Echo/Unary"
STREAM = "/test.Echo/Stream"


def _identity(b: bytes) -> bytes:
    return b


class _Echo:
    """Unary: echoes, or fails with UNAVAILABLE on b"fail". Stream: two chunks, then
    UNAVAILABLE on b"fail"; b"hang" never ends."""

    def __init__(self) -> None:
        self.calls = 0

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        if request == b"fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        return request

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext):
        self.calls += 1
        yield b"a"
        if request == b"hang":
            await asyncio.Event().wait()
        yield b"b"
        if request == b"fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")


@pytest.fixture
async def echo():
    service = _Echo()
    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(service.unary, _identity, _identity),
        "Stream": grpc.unary_stream_rpc_method_handler(service.stream, _identity, _identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _breaker(clock: FakeClock) -> CircuitBreaker:
    # Opens on the first failure (the rules themselves are tests/unit/test_breaker.py's).
    return CircuitBreaker(
        "echo",
        min_volume=1,
        min_failing_callers=1,
        failure_ratio=0.5,
        reset_timeout_s=30,
        clock=clock,
    )


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_an_open_breaker_fails_fast_without_sending_or_counting(echo) -> None:
    service, address = echo
    clock = FakeClock()
    registry = CollectorRegistry()
    breaker = _breaker(clock)
    endpoint = Endpoint(
        address,
        UpstreamSettings(endpoints=[address]),
        lambda _ep: None,
        breaker=breaker,
        client_metrics=ClientMetrics(GrpcClientMetrics(registry)),
    )
    try:
        assert await endpoint.unary(UNARY, _identity, b"hi", (), 5) == b"hi"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await endpoint.unary(UNARY, _identity, b"fail", (), 5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpen):
            await endpoint.unary(UNARY, _identity, b"hi", (), 5)
        with pytest.raises(CircuitOpen):
            endpoint.stream(STREAM, _identity, b"hi", (), 5)
    finally:
        await endpoint.close()
    assert service.calls == 2  # the fast fails sent nothing
    labels = {"grpc_type": "UNARY", "grpc_service": "test.Echo", "grpc_method": "Unary"}
    assert _sample(registry, "grpc_client_started_total", **labels) == 2
    assert _sample(registry, "grpc_client_handled_total", grpc_code="OK", **labels) == 1
    assert _sample(registry, "grpc_client_handled_total", grpc_code="UNAVAILABLE", **labels) == 1
    assert _sample(registry, "grpc_client_msg_received_total", **labels) == 1


async def test_a_stream_is_settled_when_it_ends_and_counted_per_message(echo) -> None:
    _service, address = echo
    clock = FakeClock()
    registry = CollectorRegistry()
    breaker = _breaker(clock)
    endpoint = Endpoint(
        address,
        UpstreamSettings(endpoints=[address]),
        lambda _ep: None,
        breaker=breaker,
        client_metrics=ClientMetrics(GrpcClientMetrics(registry)),
    )
    labels = {"grpc_type": "SERVER_STREAMING", "grpc_service": "test.Echo", "grpc_method": "Stream"}
    try:
        assert [c async for c in endpoint.stream(STREAM, _identity, b"ok", (), 5)] == [b"a", b"b"]
        assert breaker.state is BreakerState.CLOSED
        got = []
        with pytest.raises(grpc.aio.AioRpcError):
            async for c in endpoint.stream(STREAM, _identity, b"fail", (), 5):
                got.append(c)
        assert got == [b"a", b"b"]
        assert breaker.state is BreakerState.OPEN  # a stream failing mid-way counts
    finally:
        await endpoint.close()
    assert _sample(registry, "grpc_client_msg_received_total", **labels) == 4
    assert _sample(registry, "grpc_client_handled_total", grpc_code="OK", **labels) == 1
    assert _sample(registry, "grpc_client_handled_total", grpc_code="UNAVAILABLE", **labels) == 1
    assert len(endpoint.calls) == 0


async def test_drain_settles_like_iteration_and_waits_for_space(echo) -> None:
    """What the stream pump's reader runs: every chunk offered in order; a full buffer
    (offer answers False) makes it wait for space before the next read; the end and a
    failure settle the breaker and the metrics as iteration does."""
    _service, address = echo
    clock = FakeClock()
    registry = CollectorRegistry()
    breaker = _breaker(clock)
    endpoint = Endpoint(
        address,
        UpstreamSettings(endpoints=[address]),
        lambda _ep: None,
        breaker=breaker,
        client_metrics=ClientMetrics(GrpcClientMetrics(registry)),
    )
    labels = {"grpc_type": "SERVER_STREAMING", "grpc_service": "test.Echo", "grpc_method": "Stream"}
    got: list[bytes] = []
    waits = 0

    def offer(chunk: bytes) -> bool:
        got.append(chunk)
        return False  # always "full": every chunk is followed by a wait for space

    async def space() -> None:
        nonlocal waits
        waits += 1

    try:
        await endpoint.stream(STREAM, _identity, b"ok", (), 5).drain(offer, space)
        assert (got, waits) == ([b"a", b"b"], 2)
        assert breaker.state is BreakerState.CLOSED
        got.clear()
        with pytest.raises(grpc.aio.AioRpcError):
            await endpoint.stream(STREAM, _identity, b"fail", (), 5).drain(offer, space)
        assert got == [b"a", b"b"]
        assert breaker.state is BreakerState.OPEN  # a stream failing mid-way counts
    finally:
        await endpoint.close()
    assert _sample(registry, "grpc_client_msg_received_total", **labels) == 4
    assert _sample(registry, "grpc_client_handled_total", grpc_code="OK", **labels) == 1
    assert _sample(registry, "grpc_client_handled_total", grpc_code="UNAVAILABLE", **labels) == 1
    assert len(endpoint.calls) == 0


async def test_a_stream_cancelled_before_its_first_read_frees_the_half_open_probe(echo) -> None:
    _service, address = echo
    clock = FakeClock()
    breaker = _breaker(clock)
    endpoint = Endpoint(
        address, UpstreamSettings(endpoints=[address]), lambda _ep: None, breaker=breaker
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await endpoint.unary(UNARY, _identity, b"fail", (), 5)
        clock.advance(31)
        assert breaker.state is BreakerState.HALF_OPEN
        stream = endpoint.stream(STREAM, _identity, b"hang", (), 5)  # takes the one probe
        assert breaker.try_acquire() is None
        stream.cancel()  # never read (the pump closed before its reader started)
        await eventually(lambda: breaker.try_acquire() is not None, what="the probe freed")
        assert len(endpoint.calls) == 0
    finally:
        await endpoint.close()


async def test_the_pool_fails_a_call_in_flight_with_unavailable(echo) -> None:
    _service, address = echo
    clock = FakeClock()
    breaker = _breaker(clock)
    endpoint = Endpoint(
        address, UpstreamSettings(endpoints=[address]), lambda _ep: None, breaker=breaker
    )
    try:
        stream = endpoint.stream(STREAM, _identity, b"hang", (), 5)
        chunks = stream.__aiter__()
        assert await chunks.__anext__() == b"a"
        assert endpoint.calls.fail_all("upstream stopped answering") == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await chunks.__anext__()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert breaker.state is BreakerState.CLOSED  # the pool's cancellation: no verdict
    finally:
        await endpoint.close()


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 50.0), ("0", 0.0), ("20", 20.0), ("1000", 1000.0), ("-1", 50.0), ("x", 50.0)],
)
def test_a_caller_chooses_its_coalescing_window(header: str | None, expected: float) -> None:
    call = CallInfo("/ai.agent.v1.AgentService/StreamGenerate")
    if header is not None:
        call.metadata["x-aiproxy-coalesce-ms"] = header
    assert coalesce_window(call, 50.0) == expected


def test_per_method_windows_name_real_methods() -> None:
    settings = load_settings(stream={"coalesce_window_ms_per_method": {"StreamGenerate": 0}})
    assert settings.stream.coalesce_window_ms_per_method == {"StreamGenerate": 0}
    with pytest.raises(ConfigError, match="unknown methods"):
        load_settings(stream={"coalesce_window_ms_per_method": {"Nope": 10}})
