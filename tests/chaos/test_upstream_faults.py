"""Agents killed, restarted on their port, hung (SIGSTOP) and resumed, under load.

Each test asserts what callers see and how fast: the figures are printed (run with -s)
so that reports can quote them. Stopped agents are always resumed (SIGCONT) before they
are stopped for good, whatever the test did.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.proxy.v1 import admin_service_pb2 as admin_pb
from tests.conftest import agent_args, proxy_args
from tests.integration.test_pool import endpoints, wait_endpoint
from tests.integration.test_protection import env, rich, rich_from_status
from tests.support.grpc_helpers import NOT_SERVING, SERVING, stub, wait_health
from tests.support.procs import ServiceProcess
from tests.support.waiting import eventually

SERVICE = "ai.agent.v1.AgentService"
# Long, slow streams: still running when the fault comes (200 tokens at 100 ms).
SLOW_STREAM = pb.StreamGenerateRequest(
    prompt="a long story about outages", options=pb.GenerationOptions(max_tokens=200)
)
PROMPT = pb.GenerateRequest(prompt="are you back", options=pb.GenerationOptions(max_tokens=4))


@contextlib.contextmanager
def resumed_at_exit(*agents: ServiceProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is None:
                os.kill(agent.pid, signal.SIGCONT)


async def open_streams(api, n: int, tag: str) -> list:
    """`n` streams from `n` callers, each past its first chunk; (request id, call)."""
    out = []
    for i in range(n):
        request_id = f"{tag}-{i}"
        # Distinct callers as the breaker counts them: edge-reported addresses (loopback is a
        # trusted edge by default); a self-declared x-client-id would be one caller.
        address = f"10.77.0.{i + 1}"
        metadata = (("x-envoy-external-address", address), ("x-request-id", request_id))
        call = api.StreamGenerate(SLOW_STREAM, metadata=metadata, timeout=90)
        first = await call.read()
        assert first.delta
        out.append((request_id, call))
    return out


async def finish(call) -> tuple[list, float]:
    """Read the rest of a stream; its chunks and when it ended (monotonic)."""
    chunks = []
    try:
        while (chunk := await call.read()) is not grpc.aio.EOF:
            chunks.append(chunk)
    except grpc.aio.AioRpcError:
        pass  # the in-band final chunk is what a browser sees; the status is checked below
    return chunks, time.monotonic()


def in_band_error(chunks: list):
    """The final chunk's google.rpc.Status (the error a browser's SSE body ends with)."""
    assert chunks, "the stream ended without a chunk"
    last = chunks[-1]
    assert last.is_final and last.HasField("error"), f"no in-band error, last chunk: {last}"
    return rich_from_status(last.error)


async def test_agent_killed_with_calls_in_flight_and_restarted_on_its_port_gets_traffic_again(
    spawn,
) -> None:
    agent = spawn(*agent_args(token_delay_ms=100), name="agent")
    port = agent.address.rsplit(":", 1)[1]
    # A breaker that the kill itself opens (three callers' streams fail): the old health
    # Watch ran through it, died on CircuitOpen, and the endpoint never came back.
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(breaker__min_volume=3, breaker__min_failing_callers=3, retry__max_attempts=1),
        name="proxy",
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        streams = await open_streams(api, 4, "killed")
        agent.proc.kill()  # SIGKILL: no goodbye, calls in flight
        agent.wait(10)
        for _request_id, call in streams:
            chunks, _ = await finish(call)
            assert in_band_error(chunks).reason == "UPSTREAM_UNAVAILABLE"
        await wait_health(channel, NOT_SERVING, SERVICE, timeout=10)
        state = (await endpoints(channel))[agent.address].breaker_state
        assert state == admin_pb.BREAKER_STATE_OPEN  # the case that used to strand the endpoint

        restarted = spawn(
            *agent_args(token_delay_ms=1), "--listen", f"127.0.0.1:{port}", name="agent-restarted"
        )
        serving_at = time.monotonic()  # it prints its ready line once SERVING
        assert restarted.address.endswith(f":{port}")

        async def a_call_succeeds() -> bool:
            try:
                await api.Generate(PROMPT, metadata=(("x-client-id", "after"),), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return True

        await eventually(
            a_call_succeeds, 10, "a call to succeed after the agent serves again", interval=0.05
        )
        took = time.monotonic() - serving_at
        print(f"\ntraffic back {took:.2f} s after the restarted agent was ready")
        assert took < 5
        await wait_health(channel, SERVING, SERVICE, timeout=5)
        # And it keeps working: many calls, none refused.
        for i in range(20):
            await api.Generate(PROMPT, metadata=(("x-client-id", f"after-{i % 3}"),), timeout=5)
    assert restarted.log_events("call_finished")


@pytest.mark.parametrize(
    "keepalive", [(5.0, 1.0), (10.0, 5.0)], ids=["time5-timeout1", "defaults-time10-timeout5"]
)
async def test_a_hung_agent_is_taken_out_and_its_streams_fail_in_band_fast(
    keepalive, spawn
) -> None:
    """SIGSTOP one of two agents with streams on both: the hung one's streams end with
    UNAVAILABLE/UPSTREAM_UNAVAILABLE in-band within keepalive_time + keepalive_timeout
    (+ slack), not the 60 s idle timeout; new calls go to the other; SIGCONT brings it
    back."""
    keepalive_time, keepalive_timeout = keepalive
    hung = spawn(*agent_args(token_delay_ms=100), name="agent-hung")
    well = spawn(*agent_args(token_delay_ms=100), name="agent-well")
    proxy = spawn(
        *proxy_args(hung.address, well.address),
        env=env(
            upstream__keepalive_time_s=keepalive_time,
            upstream__keepalive_timeout_s=keepalive_timeout,
            stream__coalesce="false",
        ),
        name="proxy",
    )
    with resumed_at_exit(hung):
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            api = stub(channel)
            await wait_endpoint(channel, hung.address, usable=True, timeout=10)
            await wait_endpoint(channel, well.address, usable=True, timeout=10)
            streams = await open_streams(api, 8, "hang")
            on_hung = {e["request_id"] for e in hung.log_events("call_started")}
            assert on_hung and len(on_hung) < 8, "P2C put every stream on one agent; rerun"

            os.kill(hung.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            ends = await asyncio.wait_for(
                asyncio.gather(*(finish(call) for _, call in streams)), 60
            )
            # The hung agent's streams: in-band UNAVAILABLE, fast.
            detection = []
            for (request_id, _), (chunks, ended) in zip(streams, ends, strict=True):
                if request_id in on_hung:
                    err = in_band_error(chunks)
                    assert (err.code, err.reason) == (
                        grpc.StatusCode.UNAVAILABLE,
                        "UPSTREAM_UNAVAILABLE",
                    )
                    detection.append(ended - stopped_at)
                else:  # the other agent's streams finish normally
                    assert chunks[-1].is_final and not chunks[-1].HasField("error")
            print(
                f"\nhung agent's {len(detection)} streams failed in-band after "
                f"{min(detection):.2f}-{max(detection):.2f} s (keepalive {keepalive_time:g}+{keepalive_timeout:g} s)"
            )
            assert max(detection) < keepalive_time + keepalive_timeout + 4
            taken_out = await wait_endpoint(channel, hung.address, usable=False, timeout=10)
            print(
                f"hung agent unusable {time.monotonic() - stopped_at:.2f} s after SIGSTOP (waited {taken_out:.2f} s more)"
            )

            # New calls go to the agent that answers; the proxy is still ready.
            for i in range(10):
                await api.Generate(PROMPT, metadata=(("x-client-id", f"new-{i}"),), timeout=5)
            await wait_health(channel, SERVING, SERVICE, timeout=2)

            os.kill(hung.pid, signal.SIGCONT)
            resumed_at = time.monotonic()
            await wait_endpoint(channel, hung.address, usable=True, timeout=15)
            print(f"resumed agent usable again {time.monotonic() - resumed_at:.2f} s after SIGCONT")
            before = len(hung.log_events("call_finished"))
            for i in range(20):
                await api.Generate(PROMPT, metadata=(("x-client-id", f"back-{i}"),), timeout=5)
            assert len(hung.log_events("call_finished")) > before  # it gets calls again


async def test_the_only_agent_hung_fails_streams_and_new_calls_fast_then_recovers(spawn) -> None:
    """One agent, SIGSTOPped: its stream ends in-band with UNAVAILABLE and its unary call
    in flight fails with UNAVAILABLE (both within keepalive time + timeout, not their
    deadlines), new calls are answered at once (UNAVAILABLE with RetryInfo, not a hang),
    the proxy reports NOT_SERVING; after SIGCONT it serves again."""
    agent = spawn(*agent_args(token_delay_ms=100), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(
            upstream__keepalive_time_s=5, upstream__keepalive_timeout_s=1, stream__coalesce="false"
        ),
        name="proxy",
    )
    with resumed_at_exit(agent):
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            api = stub(channel)
            ((_, call),) = await open_streams(api, 1, "only")
            slow = (("x-fault-delay-ms", "40000"), ("x-request-id", "slow-unary"))
            unary = asyncio.ensure_future(api.Generate(PROMPT, metadata=slow, timeout=60))
            await asyncio.to_thread(
                agent.wait_for_log, lambda e: e.get("request_id") == "slow-unary"
            )
            os.kill(agent.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            chunks, ended = await asyncio.wait_for(finish(call), 60)
            err = in_band_error(chunks)
            assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
            print(f"\nonly agent hung: stream failed in-band after {ended - stopped_at:.2f} s")
            assert ended - stopped_at < 10
            with pytest.raises(grpc.aio.AioRpcError) as unary_failed:
                await asyncio.wait_for(unary, 20)
            unary_took = time.monotonic() - stopped_at
            print(f"only agent hung: unary call in flight failed after {unary_took:.2f} s")
            assert unary_failed.value.code() == grpc.StatusCode.UNAVAILABLE and unary_took < 10
            await wait_health(channel, NOT_SERVING, SERVICE, timeout=10)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await api.Generate(PROMPT, timeout=10)
            assert time.monotonic() - started < 1.5  # answered, not left hanging
            r = rich(failed.value)
            assert r.code == grpc.StatusCode.UNAVAILABLE and r.retry_delay_s
            os.kill(agent.pid, signal.SIGCONT)
            await wait_health(channel, SERVING, SERVICE, timeout=15)
            await api.Generate(PROMPT, timeout=5)
