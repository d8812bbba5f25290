"""The observability stage in a real grpc.aio server (port 0), in the pipeline order of
server/chain.py, with a stand-in for the inner stages (a limiter that refuses calls)
and a stand-in forwarder. It must record the FINAL status the caller gets, count
limiter rejections by reason, and time streams to their end, not to generator creation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from aiproxy.core.callinfo import CallInfo, current_call
from aiproxy.core.errors import ConcurrencyLimited, Overloaded, RateLimited, UpstreamUnavailable
from aiproxy.core.metrics import MAX_MODELS, OTHER_MODEL
from aiproxy.core.service import Method, agent_service
from aiproxy.core.settings import load_settings
from aiproxy.interceptors.error_handling import cancelled_code
from aiproxy.interceptors.observability import Observability
from aiproxy.interceptors.request_context import RequestContext
from aiproxy.server.chain import DECODE
from aiproxy.server.telemetry import Telemetry
from tests.support.pipeline import channel_for
from tests.support.waiting import eventually

SERVICE = "ai.agent.v1.AgentService"
CHUNK_PAUSE_S = 0.15

# x-test-refuse: the stand-in limiter's refusal for this call.
REFUSALS = {"rate": RateLimited, "concurrency": ConcurrencyLimited, "overload": Overloaded}


class StandInLimiter:
    """Where auth/limits/validation sit: refuses calls the way the limiter does."""

    exit = None

    def bind(self, method: Method) -> StandInLimiter:
        return self

    async def enter(self, call: CallInfo, request: Any, context: Any) -> None:
        refusal = call.header("x-test-refuse")
        if refusal:
            raise REFUSALS[refusal]()


class StandInForwarder:
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        call = current_call.get()
        assert call is not None
        call.upstream, call.attempts = "10.0.0.7:50052", 1
        if request.prompt == "upstream-limited":
            raise RateLimited("upstream says slow down")  # what from_upstream makes of it
        if request.prompt == "down":
            call.retries = 2
            call.attempts = 3
            raise UpstreamUnavailable()
        return pb.GenerateResponse(
            text="ok",
            model=request.model or "m-1",
            usage=pb.Usage(prompt_tokens=4, completion_tokens=6, total_tokens=10),
        )

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        call = current_call.get()
        assert call is not None
        call.upstream, call.attempts = "10.0.0.7:50052", 1
        yield pb.StreamGenerateResponse(delta="a", model="m-1")
        for _ in range(2):
            await asyncio.sleep(CHUNK_PAUSE_S)
            yield pb.StreamGenerateResponse(delta="b")
        if request.prompt == "fail-midway":
            raise UpstreamUnavailable()
        yield pb.StreamGenerateResponse(
            is_final=True, usage=pb.Usage(prompt_tokens=3, completion_tokens=2)
        )


@pytest.fixture
async def served():
    settings = load_settings(metrics={"enabled": False})
    telemetry = Telemetry(settings)
    stages = [RequestContext(), Observability(telemetry), StandInLimiter(), DECODE]
    async with channel_for(StandInForwarder(), stages) as channel:
        yield telemetry, pb_grpc.AgentServiceStub(channel)


def value(telemetry: Telemetry, name: str, **labels: str) -> float:
    got = telemetry.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


async def test_limiter_rejections_counted_by_reason_and_source(served) -> None:
    telemetry, stub = served
    for refusal in ("rate", "rate", "concurrency", "overload"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(
                pb.GenerateRequest(prompt="hi"), metadata=(("x-test-refuse", refusal),), timeout=10
            )
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(pb.GenerateRequest(prompt="upstream-limited"), timeout=10)
    await stub.Generate(pb.GenerateRequest(prompt="fine"), timeout=10)

    rejections = "ai_proxy_rate_limit_rejections_total"
    assert (
        value(telemetry, rejections, method="Generate", reason="RATE_LIMITED", source="proxy") == 2
    )
    assert (
        value(
            telemetry, rejections, method="Generate", reason="CONCURRENCY_LIMITED", source="proxy"
        )
        == 1
    )
    assert value(telemetry, rejections, method="Generate", reason="OVERLOADED", source="proxy") == 1
    assert (
        value(telemetry, rejections, method="Generate", reason="RATE_LIMITED", source="upstream")
        == 1
    )
    assert (
        value(telemetry, "ai_proxy_requests_total", method="Generate", status="RESOURCE_EXHAUSTED")
        == 5
    )
    assert value(telemetry, "ai_proxy_requests_total", method="Generate", status="OK") == 1
    handled = dict(grpc_type="UNARY", grpc_service=SERVICE, grpc_method="Generate")
    assert (
        value(telemetry, "grpc_server_handled_total", **handled, grpc_code="RESOURCE_EXHAUSTED")
        == 5
    )
    assert value(telemetry, "grpc_server_handled_total", **handled, grpc_code="OK") == 1
    assert value(telemetry, "grpc_server_started_total", **handled) == 6
    assert value(telemetry, "grpc_server_msg_received_total", **handled) == 6
    assert value(telemetry, "grpc_server_msg_sent_total", **handled) == 1


async def test_unavailable_with_retries_and_tokens(served) -> None:
    telemetry, stub = served
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(pb.GenerateRequest(prompt="down"), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    reply = await stub.Generate(pb.GenerateRequest(prompt="x", model="m-2"), timeout=10)
    assert reply.model == "m-2"
    assert value(telemetry, "ai_proxy_upstream_retries_total", method="Generate") == 2
    assert value(telemetry, "ai_proxy_tokens_total", model="m-2", kind="prompt") == 4
    assert value(telemetry, "ai_proxy_tokens_total", model="m-2", kind="completion") == 6
    # Not a limiter rejection: UNAVAILABLE is not admission control.
    assert not [
        s
        for m in telemetry.registry.collect()
        if m.name == "ai_proxy_rate_limit_rejections"
        for s in m.samples
    ]


async def test_stream_duration_covers_the_whole_stream(served) -> None:
    telemetry, stub = served
    chunks = [
        c async for c in stub.StreamGenerate(pb.StreamGenerateRequest(prompt="p"), timeout=10)
    ]
    assert len(chunks) == 4
    labels = dict(grpc_type="SERVER_STREAMING", grpc_service=SERVICE, grpc_method="StreamGenerate")
    # Two pauses between chunks: a timer that stopped at generator creation would see ~0.
    assert (
        value(telemetry, "ai_proxy_request_duration_seconds_sum", method="StreamGenerate")
        >= 2 * CHUNK_PAUSE_S
    )
    assert value(telemetry, "grpc_server_handling_seconds_sum", **labels) >= 2 * CHUNK_PAUSE_S
    assert value(telemetry, "grpc_server_msg_sent_total", **labels) == 4
    assert value(telemetry, "ai_proxy_stream_chunks_sent_total", method="StreamGenerate") == 4
    assert (
        value(telemetry, "ai_proxy_stream_first_chunk_seconds_count", method="StreamGenerate") == 1
    )
    # No upper timing bounds (a loaded box stretches any of them); how the figures relate
    # instead: first chunk, then three gaps spanning at least the two pauses, the largest
    # gap at least one pause, and all of it inside the stream's whole duration.
    duration = value(telemetry, "ai_proxy_request_duration_seconds_sum", method="StreamGenerate")
    first = value(telemetry, "ai_proxy_stream_first_chunk_seconds_sum", method="StreamGenerate")
    mean = value(telemetry, "ai_proxy_stream_chunk_interval_seconds_sum", method="StreamGenerate")
    gap_max = value(telemetry, "ai_proxy_stream_chunk_gap_max_seconds_sum", method="StreamGenerate")
    assert first > 0
    assert 3 * mean >= 2 * CHUNK_PAUSE_S
    assert CHUNK_PAUSE_S <= gap_max <= 3 * mean + 1e-6
    assert first + 3 * mean <= duration + 1e-6
    assert value(telemetry, "ai_proxy_active_streams", method="StreamGenerate") == 0
    assert value(telemetry, "ai_proxy_tokens_total", model="m-1", kind="completion") == 2
    assert value(telemetry, "ai_proxy_requests_total", method="StreamGenerate", status="OK") == 1


async def test_stream_failing_midway_counts_the_in_band_error_chunk(served) -> None:
    telemetry, stub = served
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for chunk in stub.StreamGenerate(
            pb.StreamGenerateRequest(prompt="fail-midway"), timeout=10
        ):
            got.append(chunk)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert got[-1].error.code == grpc.StatusCode.UNAVAILABLE.value[0]  # the in-band error chunk
    labels = dict(grpc_type="SERVER_STREAMING", grpc_service=SERVICE, grpc_method="StreamGenerate")
    assert value(telemetry, "grpc_server_handled_total", **labels, grpc_code="UNAVAILABLE") == 1
    assert value(telemetry, "grpc_server_msg_sent_total", **labels) == len(got) == 4
    assert (
        value(telemetry, "ai_proxy_requests_total", method="StreamGenerate", status="UNAVAILABLE")
        == 1
    )


async def test_cancelled_stream_is_recorded_and_active_gauge_returns_to_zero(
    served, caplog
) -> None:
    telemetry, stub = served
    caplog.set_level(logging.INFO, logger="aiproxy.access")
    call = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="p"), timeout=10)
    first = await call.read()
    assert first.delta == "a"
    assert value(telemetry, "ai_proxy_active_streams", method="StreamGenerate") == 1
    call.cancel()
    labels = dict(grpc_type="SERVER_STREAMING", grpc_service=SERVICE, grpc_method="StreamGenerate")
    await eventually(  # the server sees the cancellation asynchronously
        lambda: value(telemetry, "grpc_server_handled_total", **labels, grpc_code="CANCELLED"),
        what="the cancellation counted",
    )
    assert value(telemetry, "grpc_server_handled_total", **labels, grpc_code="CANCELLED") == 1
    assert value(telemetry, "ai_proxy_active_streams", method="StreamGenerate") == 0
    lines = [r.fields for r in caplog.records if r.name == "aiproxy.access"]
    assert [(line["code"], line["reason"]) for line in lines] == [("CANCELLED", "CANCELLED")]


def test_model_label_is_bounded() -> None:
    telemetry = Telemetry(load_settings(metrics={"enabled": False}))
    for i in range(MAX_MODELS + 5):
        telemetry.proxy.count_tokens(f"model-{i}", 1, 1)
    models = {
        s.labels["model"]
        for m in telemetry.registry.collect()
        if m.name == "ai_proxy_tokens"
        for s in m.samples
    }
    assert len(models) == MAX_MODELS + 1 and OTHER_MODEL in models
    assert value(telemetry, "ai_proxy_tokens_total", model=OTHER_MODEL, kind="prompt") == 5


class _Ctx:
    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def time_remaining(self) -> float | None:
        return self._remaining


def test_a_cancellation_at_the_callers_deadline_counts_as_deadline_exceeded() -> None:
    """grpc-core cancels the handler when the caller's deadline passes; that is a
    DEADLINE_EXCEEDED for the metrics, the alert and the log, not a caller who left."""
    assert cancelled_code(_Ctx(-0.001)) == "DEADLINE_EXCEEDED"
    assert cancelled_code(_Ctx(0.0)) == "DEADLINE_EXCEEDED"
    assert cancelled_code(_Ctx(5.0)) == "CANCELLED"
    assert cancelled_code(_Ctx(None)) == "CANCELLED"


def test_usage_ignores_a_request_that_did_not_decode() -> None:
    """A request that did not decode leaves CallInfo.request None; reading the model
    from it must not fail the call's bookkeeping."""
    obs = Observability(Telemetry(load_settings(metrics={"enabled": False})))
    m = obs.bind(agent_service().by_name["Generate"])
    call = CallInfo(method=m.path, request_id="r")
    assert obs._usage(m, call, pb.GenerateRequest(model="m1"), None, None) == "m1"
    assert obs._usage(m, call, None, None, None) == ""


def test_access_log_is_written_by_a_thread_and_flushed_at_stop() -> None:
    """AccessLogWriter: the event loop only enqueues; the writer thread formats and
    writes; stop() writes what is still queued and puts the logger back. Records logged
    through the logger itself take the same queue."""
    import threading

    from aiproxy.core.accesslog import AccessLogWriter, access_log

    written: list[tuple[str, str]] = []

    class Recording(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append((threading.current_thread().name, self.format(record)))

    root = logging.getLogger()
    handler = Recording()
    saved_level, saved_handlers = access_log.level, access_log.handlers[:]
    root.addHandler(handler)
    access_log.setLevel(logging.INFO)
    writer = AccessLogWriter(access_log)
    try:
        writer.start()
        assert access_log.propagate is False and writer.running
        for i in range(50):
            access_log.info("access", extra={"fields": {"i": i}})
        for i in range(50, 100):
            writer.write({"i": i})
        writer.stop()
    finally:
        root.removeHandler(handler)
        access_log.setLevel(saved_level)
    assert len(written) == 100
    assert {thread for thread, _ in written} == {"aiproxy-access-log"}
    assert access_log.propagate is True and access_log.handlers == saved_handlers
