"""Protection through the real proxy against the fault-injecting reference agent.

Breakers, retries, limits, validation, deadlines and the error shape, each checked on
the wire: status code, ErrorInfo reason and the details a caller would act on.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import uuid
import zlib
from dataclasses import dataclass, field

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.proxy.v1 import admin_service_pb2 as admin_pb
from aiproxy.core.errors import DOMAIN, OVERLOADED_RETRY_DELAY_S
from tests.conftest import agent_args, proxy_args
from tests.integration.test_pool import endpoints
from tests.support.grpc_helpers import SERVING, health_status, max_wire_timeout_ms, stub
from tests.support.waiting import eventually

PROMPT = pb.GenerateRequest(prompt="protect me", options=pb.GenerationOptions(max_tokens=4))
STREAM_PROMPT = pb.StreamGenerateRequest(
    prompt="stream for me", options=pb.GenerationOptions(max_tokens=8)
)


@dataclass
class Rich:
    """What a caller can read from a failed call's google.rpc.Status."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_delay_s: float | None = None
    quota: list[tuple[str, str]] = field(default_factory=list)
    fields: list[tuple[str, str]] = field(default_factory=list)


def rich(err: grpc.aio.AioRpcError) -> Rich:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status on {err.code()}: {err.details()}"
    assert status.code == err.code().value[0] and status.message == err.details()
    return rich_from_status(status)


def rich_from_status(status) -> Rich:
    out = Rich(grpc.StatusCode(_code_tuple(status.code)), status.message)
    kinds = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.reason, out.domain, out.metadata = info.reason, info.domain, dict(info.metadata)
            kinds.append("ErrorInfo")
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out.retry_delay_s = retry.retry_delay.ToNanoseconds() / 1e9
            kinds.append("RetryInfo")
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            out.quota = [(v.subject, v.description) for v in quota.violations]
            kinds.append("QuotaFailure")
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.fields = [(v.field, v.description) for v in bad.field_violations]
            kinds.append("BadRequest")
        else:
            raise AssertionError(f"unexpected detail {detail.type_url}")
    assert kinds and kinds[0] == "ErrorInfo", kinds  # ErrorInfo always comes first
    assert out.domain == DOMAIN
    return out


def _code_tuple(number: int):
    return next(c.value for c in grpc.StatusCode if c.value[0] == number)


def rid() -> str:
    return f"req-{uuid.uuid4().hex[:12]}"


async def call_error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value


async def read_stream(call) -> tuple[list, grpc.aio.AioRpcError | None]:
    chunks = []
    try:
        async for chunk in call:
            chunks.append(chunk)
    except grpc.aio.AioRpcError as exc:
        return chunks, exc
    return chunks, None


def started_ids(agent) -> list[str]:
    return [e.get("request_id") for e in agent.log_events("call_started")]


async def wait_started(agent, n: int, timeout: float = 5.0) -> None:
    """Until the agent has started `n` calls (a stream's headers come with its first
    chunk, so a hanging stream shows it was admitted only at the agent)."""

    def started() -> bool:
        count = len(started_ids(agent))
        assert count >= n, f"agent started {count} calls, not {n}"
        return True

    await eventually(started, timeout, f"the agent to start {n} calls")


def env(**values: object) -> dict[str, str]:
    return {f"AIPROXY_{k.upper()}": str(v) for k, v in values.items()}


async def breaker_state(channel, address: str) -> int:
    return (await endpoints(channel))[address].breaker_state


async def wait_breaker(channel, address: str, state: int, timeout: float = 5.0) -> None:
    async def reached() -> bool:
        return await breaker_state(channel, address) == state

    await eventually(
        reached, timeout, f"the breaker of {address} to be {admin_pb.BreakerState.Name(state)}"
    )


def caller(i: int | str) -> tuple[str, str]:
    """Metadata that makes a call come from caller `i`: a client address set by the edge
    (the test runs on loopback, a trusted edge by default). An x-client-id would not do:
    it is self-declared, so the breaker never counts it as a distinct caller."""
    n = zlib.crc32(str(i).encode()) % 0xFFFFFE + 1
    return ("x-envoy-external-address", str(ipaddress.IPv4Address(0x0A000000 + n)))


# ---- circuit breaker ----------------------------------------------------------------


async def test_minted_client_ids_are_one_caller_to_the_breaker(spawn) -> None:
    """x-client-id is self-declared: one address minting ids must not look like the
    several callers the breaker needs to open (issue 15); distinct addresses do."""
    agent = spawn(*agent_args(), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(breaker__min_volume=3, breaker__min_failing_callers=3, retry__max_attempts=1),
        name="proxy",
    )
    fail = (("x-fault-code", "UNAVAILABLE"),)
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        for i in range(6):
            minted = ("x-client-id", f"minted-{i}-{uuid.uuid4().hex[:6]}")
            r = rich(await call_error(api.Generate(PROMPT, metadata=(*fail, minted), timeout=5)))
            assert r.reason == "UPSTREAM_UNAVAILABLE"
        assert await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_CLOSED
        for i in range(3):
            await call_error(api.Generate(PROMPT, metadata=(*fail, caller(i)), timeout=5))
        assert await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_OPEN


async def test_a_victims_client_id_does_not_drain_the_victims_bucket(spawn, agent) -> None:
    """The limits key of an x-client-id stays inside the caller's address: a caller
    sending a victim's id spends its own bucket, not the victim's."""
    proxy = spawn(
        *proxy_args(agent.address), env=env(limits__rate_per_s=0.01, limits__burst=2), name="proxy"
    )
    victim = ("x-client-id", "victim")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        attacker = (victim, caller("attacker"))
        for _ in range(2):
            await api.Generate(PROMPT, metadata=attacker, timeout=10)
        r = rich(await call_error(api.Generate(PROMPT, metadata=attacker, timeout=10)))
        assert r.reason == "RATE_LIMITED"
        # The victim (another address) still has its whole burst.
        for _ in range(2):
            await api.Generate(PROMPT, metadata=(victim, caller("victim")), timeout=10)


async def test_rotating_declared_ids_gets_one_addresss_budget(spawn, agent) -> None:
    """Issue 20 §3, as measured: auth off, one client rotating x-client-id (or x-api-key,
    unverified) got 20/20 admitted where its limit admits 2."""
    proxy = spawn(
        *proxy_args(agent.address), env=env(limits__rate_per_s=0.01, limits__burst=2), name="proxy"
    )
    me = caller(f"rotating-{uuid.uuid4().hex}")
    codes = []
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        for i in range(20):
            header = "x-client-id" if i % 2 else "x-api-key"
            declared = (header, f"{uuid.uuid4().hex}-{i}")
            try:
                await api.Generate(PROMPT, metadata=(me, declared), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as err:
                codes.append(err.code())
    assert codes.count(grpc.StatusCode.OK) == 2, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 18, codes


async def test_breaker_opens_rejects_half_open_admits_exact_probes_then_closes(spawn) -> None:
    agent = spawn(*agent_args(), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(
            breaker__min_volume=3,
            breaker__min_failing_callers=3,
            breaker__reset_timeout_s=0.5,
            breaker__half_open_max_probes=2,
            breaker__success_threshold=2,
            retry__max_attempts=1,
        ),
        name="proxy",
    )
    fail = (("x-fault-code", "UNAVAILABLE"),)
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        for i in range(3):  # three callers: an outage, not one caller's requests
            err = await call_error(api.Generate(PROMPT, metadata=(*fail, caller(i)), timeout=5))
            r = rich(err)
            assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
            assert r.metadata == {"upstreamCode": "UNAVAILABLE"} and r.retry_delay_s == 1.0
        assert await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_OPEN

        # Open: rejected by the proxy, nothing reaches the agent.
        sent_before = len(started_ids(agent))
        for _ in range(5):
            r = rich(await call_error(api.Generate(PROMPT, timeout=5)))
            assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN")
            assert r.retry_delay_s is not None and 0 < r.retry_delay_s <= 0.5
        assert len(started_ids(agent)) == sent_before

        # Half-open: exactly two probes get through; the third caller is turned away.
        await wait_breaker(channel, agent.address, admin_pb.BREAKER_STATE_HALF_OPEN)
        slow = (("x-fault-delay-ms", "400"),)
        probes = [
            asyncio.ensure_future(api.Generate(PROMPT, metadata=slow, timeout=5)) for _ in range(2)
        ]
        await wait_started(agent, sent_before + 2)  # both probes in flight (400 ms each)
        r = rich(await call_error(api.Generate(PROMPT, timeout=5)))
        assert r.reason == "CIRCUIT_OPEN"
        await asyncio.gather(*probes)
        assert len(started_ids(agent)) == sent_before + 2

        # Two successful probes close it; calls flow again.
        assert await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_CLOSED
        await api.Generate(PROMPT, timeout=5)

        # Probes failing for three callers re-open it (one caller's only free the slot).
        for i in range(3):
            await call_error(api.Generate(PROMPT, metadata=(*fail, caller(i)), timeout=5))
        await wait_breaker(channel, agent.address, admin_pb.BREAKER_STATE_HALF_OPEN)
        for i in range(3):
            await call_error(api.Generate(PROMPT, metadata=(*fail, caller(i)), timeout=5))
            if i < 2:
                assert (
                    await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_HALF_OPEN
                )
        assert await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_OPEN
        assert rich(await call_error(api.Generate(PROMPT, timeout=5))).reason == "CIRCUIT_OPEN"
    transitions = [(e["old"], e["new"]) for e in proxy.log_events("breaker_transition")]
    assert transitions == [
        ("CLOSED", "OPEN"),
        ("OPEN", "HALF_OPEN"),
        ("HALF_OPEN", "CLOSED"),
        ("CLOSED", "OPEN"),
        ("OPEN", "HALF_OPEN"),
        ("HALF_OPEN", "OPEN"),
    ]


@pytest.mark.parametrize("after", ["0", "2"], ids=["before-first-chunk", "mid-stream"])
async def test_failing_streams_open_the_breaker_and_are_then_refused(after, spawn) -> None:
    agent = spawn(*agent_args(), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(
            breaker__min_volume=3,
            breaker__min_failing_callers=3,
            breaker__reset_timeout_s=30,
            retry__max_attempts=1,
        ),
        name="proxy",
    )
    fail = (("x-fault-code", "UNAVAILABLE"), ("x-fault-after", after))
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        for i in range(3):
            _, err = await read_stream(
                api.StreamGenerate(STREAM_PROMPT, metadata=(*fail, caller(i)), timeout=5)
            )
            assert rich(err).reason == "UPSTREAM_UNAVAILABLE"
        assert await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_OPEN
        sent = len(started_ids(agent))
        chunks, err = await read_stream(api.StreamGenerate(STREAM_PROMPT, timeout=5))
        assert chunks == [] and rich(err).reason == "CIRCUIT_OPEN"
        assert len(started_ids(agent)) == sent


async def test_callers_own_errors_never_open_the_breaker(spawn) -> None:
    agent = spawn(*agent_args(), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(breaker__min_volume=2, breaker__min_failing_callers=1),
        name="proxy",
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        for i in range(5):
            metadata = (("x-fault-code", "INVALID_ARGUMENT"), caller(i))
            err = await call_error(stub(channel).Generate(PROMPT, metadata=metadata, timeout=5))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_CLOSED


HOSTILE_CALC = pb.ExecuteAgentRequest(
    agent_type=pb.AGENT_TYPE_ANALYSIS, task="compute 4294967296**40", tools=["calculator"]
)


async def test_the_calculator_overflow_is_a_tool_error_not_internal(spawn) -> None:
    """The issue's trigger: the agent raised OverflowError into a Struct (INTERNAL)."""
    agent = spawn(*agent_args(), name="agent")
    proxy = spawn(*proxy_args(agent.address), name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        for _ in range(10):
            reply = await stub(channel).ExecuteAgent(HOSTILE_CALC, timeout=10)
            (tool_call,) = reply.tool_calls
            assert tool_call.error == "result too large" and not tool_call.HasField("result")
        assert await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_CLOSED
    assert not [e for e in agent.log_events("call_finished") if e["code"] != "OK"]


HOSTILE_FAULTS = {
    # One caller whose requests make the agent fail, unary and mid-stream, with the
    # request-specific code and with the endpoint-wide one.
    "unary-internal": (False, (("x-fault-code", "INTERNAL"),)),
    "unary-unavailable": (False, (("x-fault-code", "UNAVAILABLE"),)),
    "stream-mid-internal": (True, (("x-fault-code", "INTERNAL"), ("x-fault-after", "2"))),
    "stream-mid-unavailable": (True, (("x-fault-code", "UNAVAILABLE"), ("x-fault-after", "2"))),
}


@pytest.mark.parametrize("fault", list(HOSTILE_FAULTS))
async def test_one_hostile_caller_cannot_open_the_breaker_for_everyone(fault, spawn) -> None:
    """Default breaker settings; the hostile caller hammers its failing request (200
    calls, far past the old 5-in-a-row) while another caller keeps working."""
    streaming, faults = HOSTILE_FAULTS[fault]
    agent = spawn(*agent_args(), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(retry__max_attempts=1, stream__coalesce="false"),
        name="proxy",
    )
    hostile = (*faults, ("x-client-id", "hostile"))
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)

        async def attack() -> int:
            failed = 0
            for _ in range(200):
                if streaming:
                    chunks, err = await read_stream(
                        api.StreamGenerate(STREAM_PROMPT, metadata=hostile, timeout=10)
                    )
                    # Failed mid-stream: two deltas, then the error in-band as the final chunk.
                    assert len(chunks) == 3 and chunks[-1].is_final and chunks[-1].error.code
                else:
                    err = await call_error(api.Generate(PROMPT, metadata=hostile, timeout=10))
                assert err is not None
                failed += 1
            return failed

        async def legit() -> int:
            ok = 0
            for _ in range(40):
                await api.Generate(PROMPT, metadata=(caller("legit"),), timeout=10)
                ok += 1
                await asyncio.sleep(0.01)
            return ok

        failed, ok = await asyncio.gather(attack(), legit())
        assert (failed, ok) == (200, 40)
        assert await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_CLOSED
        assert await health_status(channel, "ai.agent.v1.AgentService") == SERVING
    assert proxy.log_events("breaker_transition") == []


async def test_an_outage_for_every_caller_still_opens_it_and_the_proxy_stays_ready(spawn) -> None:
    """Default breaker settings; four callers all get UNAVAILABLE: the breaker opens. The
    proxy keeps reporting SERVING (its endpoint is healthy, and calls are answered at once
    with CIRCUIT_OPEN) instead of being ejected by the balancer in front."""
    agent = spawn(*agent_args(), name="agent")
    proxy = spawn(*proxy_args(agent.address), env=env(retry__max_attempts=1), name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        failing = (("x-fault-code", "UNAVAILABLE"),)
        for i in range(20):
            err = await call_error(
                api.Generate(PROMPT, metadata=(*failing, caller(i % 4)), timeout=5)
            )
            assert rich(err).reason == "UPSTREAM_UNAVAILABLE"
        assert await breaker_state(channel, agent.address) == admin_pb.BREAKER_STATE_OPEN
        r = rich(await call_error(api.Generate(PROMPT, metadata=(caller("other"),), timeout=5)))
        assert r.reason == "CIRCUIT_OPEN" and r.retry_delay_s is not None and r.retry_delay_s > 0
        assert await health_status(channel, "ai.agent.v1.AgentService") == SERVING


# ---- retries --------------------------------------------------------------------------


@pytest.fixture
def flaky_and_healthy(spawn):
    """Two replicas: `flaky` obeys fault metadata, `healthy` ignores it (no --enable-faults)."""
    flaky = spawn(*agent_args(), name="flaky")
    healthy = spawn("agent", "--listen", "127.0.0.1:0", "--token-delay-ms", "1", name="healthy")
    proxy = spawn(
        *proxy_args(flaky.address, healthy.address),
        # No coalescing: these tests count chunks, and under load queued chunks merge.
        env=env(breaker__enabled="false", retry__initial_backoff_s=0.001, stream__coalesce="false"),
        name="proxy",
    )
    return flaky, healthy, proxy


async def test_unary_retries_land_on_the_other_replica(flaky_and_healthy) -> None:
    flaky, healthy, proxy = flaky_and_healthy
    attempts = collections.Counter()
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        for _ in range(20):
            call = stub(channel).Generate(
                PROMPT, metadata=(("x-fault-code", "UNAVAILABLE"),), timeout=5
            )
            await call
            attempts[dict(await call.trailing_metadata())["x-aiproxy-attempts"]] += 1
    failed_first = started_ids(flaky)
    assert failed_first, "no call was balanced onto the flaky replica first"
    assert attempts == {"1": 20 - len(failed_first), "2": len(failed_first)}
    # Every call that failed on `flaky` was answered by `healthy`, marked as a retry.
    retried = {e["request_id"]: e for e in healthy.log_events("call_started")}
    for request_id in failed_first:
        assert request_id in retried


async def test_with_no_other_replica_the_error_comes_without_a_backoff(spawn) -> None:
    """A retry goes to another endpoint, never the one that failed: with a single
    replica, waiting the backoff first would only delay the same error."""
    agent = spawn(*agent_args(), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(breaker__enabled="false", retry__initial_backoff_s=5, retry__max_backoff_s=5),
        name="proxy",
    )
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        await stub(channel).Generate(PROMPT, timeout=10)  # connected, warm
        started = loop.time()
        call = stub(channel).Generate(
            PROMPT, metadata=(("x-fault-code", "UNAVAILABLE"),), timeout=10
        )
        err = await call_error(call)
        elapsed = loop.time() - started
        trailers = dict(await call.trailing_metadata())
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert trailers["x-aiproxy-attempts"] == "1"
    assert elapsed < 2.5, f"waited {elapsed:.2f} s: the 5 s backoff was slept"


async def test_streams_retry_before_the_first_chunk_never_after(flaky_and_healthy) -> None:
    flaky, healthy, proxy = flaky_and_healthy
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        # Failing before the first chunk: retried elsewhere, the caller never notices.
        for _ in range(10):
            chunks, err = await read_stream(
                stub(channel).StreamGenerate(
                    STREAM_PROMPT, metadata=(("x-fault-code", "UNAVAILABLE"),), timeout=5
                )
            )
            assert err is None and chunks[-1].is_final and not chunks[-1].HasField("error")
        before_first = set(started_ids(flaky))
        assert before_first and before_first <= set(started_ids(healthy))

        # Failing after two chunks: never repeated; the caller sees the chunks, then the error.
        outcomes = collections.Counter()
        for _ in range(10):
            request_id = rid()
            chunks, err = await read_stream(
                stub(channel).StreamGenerate(
                    STREAM_PROMPT,
                    metadata=(
                        ("x-fault-code", "UNAVAILABLE"),
                        ("x-fault-after", "2"),
                        ("x-request-id", request_id),
                    ),
                    timeout=5,
                )
            )
            if err is None:
                outcomes["completed"] += 1
                continue
            outcomes["failed"] += 1
            assert [c.seq for c in chunks] == [0, 1, 2]
            assert chunks[2].is_final and chunks[2].finish_reason == pb.FINISH_REASON_ERROR
            assert rich_from_status(chunks[2].error).reason == "UPSTREAM_UNAVAILABLE"
            assert rich(err).reason == "UPSTREAM_UNAVAILABLE"
            assert request_id in started_ids(flaky) and request_id not in started_ids(healthy)
        assert outcomes["failed"] >= 1, outcomes


# ---- rate and concurrency limits --------------------------------------------------------


async def test_100_concurrent_calls_against_a_burst_of_10_admit_exactly_10(spawn, agent) -> None:
    # 0.01 tokens/s: no token comes back during the test, so the burst is all there is.
    proxy = spawn(
        *proxy_args(agent.address), env=env(limits__rate_per_s=0.01, limits__burst=10), name="proxy"
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)

        async def one():
            call = api.Generate(PROMPT, timeout=10)
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                return exc
            return dict(await call.trailing_metadata())  # a unary answer's, with the status

        results = await asyncio.gather(*(one() for _ in range(100)))
        ok = [r for r in results if isinstance(r, dict)]
        rejected = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(ok) == 10 and len(rejected) == 90
        assert sorted(int(h["x-ratelimit-remaining"]) for h in ok) == list(range(10))
        assert {h["x-ratelimit-limit"] for h in ok} == {"10"}
        assert all(0 < int(h["x-ratelimit-reset"]) <= 1000 for h in ok)
        for err in rejected:
            r = rich(err)
            assert (r.code, r.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
            assert r.metadata == {"limit": "10"}
            assert r.quota == [("peer:127.0.0.1", "at most 10 requests in a burst")]
            # One token at 0.01/s: about 100 s from an empty bucket.
            assert r.retry_delay_s is not None and 95 < r.retry_delay_s <= 100
        # Another caller (another address, set by the edge) has its own bucket.
        await api.Generate(PROMPT, metadata=(caller("other-service"),), timeout=10)
    assert len(agent.log_events("call_started")) == 11


async def test_stream_cap_per_caller_and_proxy_wide_cap(spawn, agent) -> None:
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(limits__max_streams_per_caller=2, limits__max_concurrent_calls=3),
        name="proxy",
    )
    hang = (("x-fault-hang", "1"),)
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        open_streams = [
            api.StreamGenerate(STREAM_PROMPT, metadata=hang, timeout=10) for _ in range(2)
        ]
        await wait_started(agent, 2)
        _, err = await read_stream(api.StreamGenerate(STREAM_PROMPT, timeout=10))
        r = rich(err)
        assert (r.code, r.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CONCURRENCY_LIMITED")
        assert (
            r.quota == [("peer:127.0.0.1", "at most 2 concurrent streams")]
            and r.retry_delay_s == 1.0
        )

        # Another caller may stream; then the proxy-wide cap (3 calls in flight) is reached.
        other = api.StreamGenerate(STREAM_PROMPT, metadata=(*hang, caller("b")), timeout=10)
        await wait_started(agent, 3)
        r = rich(await call_error(api.Generate(PROMPT, metadata=(caller("c"),), timeout=10)))
        assert (r.code, r.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
        assert r.metadata == {"limit": "3"} and r.retry_delay_s == OVERLOADED_RETRY_DELAY_S

        # A stream that ends gives its slots back.
        open_streams[0].cancel()

        async def a_slot_came_back() -> bool:
            try:
                await api.Generate(PROMPT, timeout=10)
            except grpc.aio.AioRpcError as exc:
                if rich(exc).reason != "OVERLOADED":
                    raise  # any other failure ends the wait at once
                return False
            return True

        await eventually(a_slot_came_back, 10, "the cancelled stream's slot to come back")
        for s in (open_streams[1], other):
            s.cancel()


# ---- validation -------------------------------------------------------------------------


BAD_REQUESTS = {
    "Generate": (
        pb.GenerateRequest(
            prompt=" ", options=pb.GenerationOptions(temperature=3, top_p=-1, max_tokens=10**6)
        ),
        {"prompt", "options.temperature", "options.top_p", "options.max_tokens"},
    ),
    "StreamChat": (
        pb.StreamChatRequest(
            messages=[
                pb.ChatMessage(role=pb.CHAT_ROLE_UNSPECIFIED, content="hi"),
                pb.ChatMessage(role=7, content=""),
            ]
        ),
        {"messages[0].role", "messages[1].role", "messages[1].content"},
    ),
    "SearchRag": (pb.SearchRagRequest(query="", top_k=-3), {"query", "top_k"}),
    "ExecuteAgent": (
        pb.ExecuteAgentRequest(agent_type=pb.AGENT_TYPE_UNSPECIFIED, task="", max_steps=1000),
        {"agent_type", "task", "max_steps"},
    ),
    "BatchGenerate": (pb.BatchGenerateRequest(), {"prompts"}),
}


@pytest.mark.parametrize("method", sorted(BAD_REQUESTS))
async def test_invalid_requests_never_reach_the_upstream(method, agent, proxy_channel) -> None:
    request, fields = BAD_REQUESTS[method]
    call = getattr(stub(proxy_channel), method)(request, timeout=5)
    if method.startswith("Stream"):
        _, err = await read_stream(call)
    else:
        err = await call_error(call)
    r = rich(err)
    assert (r.code, r.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert {f for f, _ in r.fields} == fields, r.fields
    assert r.message.startswith("invalid request: ")
    assert agent.log_events("call_started") == []


# ---- deadlines --------------------------------------------------------------------------


async def test_method_maximum_caps_the_callers_deadline(spawn, agent) -> None:
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(deadlines__unary_default_s=0.3, deadlines__unary_max_s=0.5),
        name="proxy",
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        for caller_timeout, request_id in ((30, "req-capped"), (None, "req-default")):
            err = await call_error(
                stub(channel).Generate(
                    PROMPT,
                    metadata=(("x-fault-hang", "1"), ("x-request-id", request_id)),
                    timeout=caller_timeout,
                )
            )
            r = rich(err)
            assert (r.code, r.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
            seen = agent.wait_for_log(
                lambda e, i=request_id: (
                    e.get("event") == "call_started" and e.get("request_id") == i
                )
            )
            limit_s = 0.5 if caller_timeout else 0.3
            # The proxy's own deadline, sent as grpc-timeout (rounded up on the wire).
            assert 0 < seen["deadline_remaining_ms"] <= max_wire_timeout_ms(limit_s)


async def test_idle_stream_ends_with_deadline_exceeded_in_band(spawn, agent) -> None:
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(stream__idle_timeout_s=0.4, stream__heartbeat_interval_s=30),
        name="proxy",
    )
    request_id = rid()
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        chunks, err = await read_stream(
            stub(channel).StreamGenerate(
                STREAM_PROMPT,
                metadata=(
                    ("x-fault-hang", "1"),
                    ("x-fault-after", "1"),
                    ("x-request-id", request_id),
                ),
                timeout=30,
            )
        )
    assert len(chunks) == 2 and not chunks[0].is_final
    last = rich_from_status(chunks[1].error)
    assert (last.code, last.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
    assert last.metadata == {"idle_timeout_s": "0.4"}
    assert rich(err).reason == "DEADLINE_EXCEEDED"
    # The idle upstream call was cancelled, not left hanging.
    finished = agent.wait_for_log(
        lambda e: e.get("event") == "call_finished" and e.get("request_id") == request_id
    )
    assert finished["cancelled"] is True


# ---- the error shape for every upstream failure ----------------------------------------

# upstream code -> (code the caller gets, reason, RetryInfo expected)
UPSTREAM_FAILURES = {
    "UNAVAILABLE": (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", True),
    "DEADLINE_EXCEEDED": (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", False),
    "INVALID_ARGUMENT": (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", False),
    "PERMISSION_DENIED": (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", False),
    "RESOURCE_EXHAUSTED": (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_ERROR", False),
    "UNAUTHENTICATED": (grpc.StatusCode.INTERNAL, "UPSTREAM_ERROR", False),
    "INTERNAL": (grpc.StatusCode.INTERNAL, "UPSTREAM_ERROR", False),
    "UNKNOWN": (grpc.StatusCode.UNKNOWN, "UPSTREAM_ERROR", False),
    "NOT_FOUND": (grpc.StatusCode.NOT_FOUND, "UPSTREAM_ERROR", False),
}


@pytest.fixture
def single_attempt_proxy(spawn, agent):
    # No coalescing: the test counts chunks, and under load queued chunks merge.
    return spawn(
        *proxy_args(agent.address),
        env=env(retry__max_attempts=1, breaker__enabled="false", stream__coalesce="false"),
        name="proxy",
    )


@pytest.mark.parametrize("upstream_code", sorted(UPSTREAM_FAILURES))
async def test_upstream_failures_map_to_one_shape(upstream_code, single_attempt_proxy) -> None:
    code, reason, retry_info = UPSTREAM_FAILURES[upstream_code]
    async with grpc.aio.insecure_channel(single_attempt_proxy.address) as channel:
        api = stub(channel)
        fault = (("x-fault-code", upstream_code),)
        unary = rich(await call_error(api.Generate(PROMPT, metadata=fault, timeout=5)))
        # Before the first chunk a stream fails like a unary call: status only, no chunks.
        chunks, err = await read_stream(
            api.StreamGenerate(STREAM_PROMPT, metadata=fault, timeout=5)
        )
        assert chunks == []
        before = rich(err)
        # After chunks: the same status in-band as a last chunk, and as the call's status.
        chunks, err = await read_stream(
            api.StreamGenerate(STREAM_PROMPT, metadata=(*fault, ("x-fault-after", "3")), timeout=5)
        )
        in_band = rich_from_status(chunks[-1].error)
        after = rich(err)
    assert [c.seq for c in chunks] == [0, 1, 2, 3] and [c.is_final for c in chunks] == [
        False
    ] * 3 + [True]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_ERROR and chunks[-1].delta == ""
    for r in (unary, before, in_band, after):
        assert (r.code, r.reason) == (code, reason), r
        assert r.metadata["upstreamCode"] == upstream_code
        assert (r.retry_delay_s is not None) == retry_info
        # Nothing of the upstream's internals leaks into the message.
        assert "Traceback" not in r.message and "ipv4:" not in r.message
    assert in_band == after


async def test_unexpected_upstream_message_text_is_not_passed_on(single_attempt_proxy) -> None:
    # The agent's INTERNAL messages name the fault; the caller gets a generic message.
    async with grpc.aio.insecure_channel(single_attempt_proxy.address) as channel:
        err = await call_error(
            stub(channel).Generate(PROMPT, metadata=(("x-fault-code", "INTERNAL"),), timeout=5)
        )
    assert err.details() == "upstream error"


async def test_limits_run_before_validation(spawn, agent) -> None:
    """Chain order on the wire: a malformed request still spends a token, so a flood of
    them is limited like any other (server/chain.py)."""
    proxy = spawn(
        *proxy_args(agent.address), env=env(limits__rate_per_s=0.01, limits__burst=1), name="proxy"
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        assert (
            rich(await call_error(api.Generate(pb.GenerateRequest(), timeout=5))).reason
            == "INVALID_ARGUMENT"
        )
        assert rich(await call_error(api.Generate(PROMPT, timeout=5))).reason == "RATE_LIMITED"
        assert (
            rich(await call_error(api.Generate(pb.GenerateRequest(), timeout=5))).reason
            == "RATE_LIMITED"
        )
    assert agent.log_events("call_started") == []


async def test_behind_a_trusted_proxy_callers_are_keyed_by_its_client_address_header(
    spawn, agent
) -> None:
    proxy = spawn(
        *proxy_args(agent.address),
        env=env(
            limits__rate_per_s=0.01,
            limits__burst=1,
            limits__client_address_header="x-envoy-external-address",
        ),
        name="proxy",
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        for client in ("203.0.113.7", "2001:db8::1"):
            await api.Generate(PROMPT, metadata=(("x-envoy-external-address", client),), timeout=5)
        r = rich(
            await call_error(
                api.Generate(
                    PROMPT, metadata=(("x-envoy-external-address", "203.0.113.7"),), timeout=5
                )
            )
        )
        assert r.quota[0][0] == "peer:203.0.113.7"
        r = rich(
            await call_error(
                api.Generate(
                    PROMPT, metadata=(("x-envoy-external-address", "2001:db8::1"),), timeout=5
                )
            )
        )
        assert r.quota[0][0] == "peer:2001:db8::/64"
        # Not an address: the connection's peer is used.
        await api.Generate(PROMPT, metadata=(("x-envoy-external-address", "not-an-ip"),), timeout=5)
        r = rich(await call_error(api.Generate(PROMPT, timeout=5)))
        assert r.quota[0][0] == "peer:127.0.0.1"
