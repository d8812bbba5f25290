"""Limits shared through Redis, end to end with real processes (issue 14).

"Exact under N": one caller (`x-client-id: tenant-1`) sends a bounded burst, 200 calls in
2 s over 16 connections, at rate 5/s burst 5. One proxy process admits burst + rate x
window; with `limits.backend: redis`, 2 workers behind one port and 2 replicas side by
side must admit the same (± one refill interval), not twice as many as with the
in-memory backend (measured before: 14 for one process, 28 for two). Each process must
have served part of the burst, or the test would prove nothing about sharing.

Failure policy: redis-server is stopped in the middle of a steady load and started again.
No call hangs; fail_closed refuses with UNAVAILABLE (LIMITS_UNAVAILABLE) while Redis is
away, fail_open keeps admitting at about the configured rate (limit/N per process); both
come back to the shared bucket by themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import urllib.request
from collections.abc import Callable, Sequence

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.conftest import agent_args, proxy_args
from tests.integration.test_protection import rich_from_status, wait_started
from tests.support.grpc_helpers import stub
from tests.support.procs import ServiceProcess
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

RATE, BURST = 5.0, 5
CALLER = "tenant-1"
PREFIX = "it:limits:"
PROMPT = pb.GenerateRequest(prompt="shared", options=pb.GenerationOptions(max_tokens=2))


def shared_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "AIPROXY_LIMITS__BACKEND": "redis",
        "AIPROXY_REDIS__URL": url,
        "AIPROXY_REDIS__KEY_PREFIX": PREFIX,
        "AIPROXY_LIMITS__RATE_PER_S": str(RATE),
        "AIPROXY_LIMITS__BURST": str(BURST),
        "AIPROXY_LIMITS__EXPECTED_PROCESSES": "2",
        # A generous bounded wait: a CPU-starved 2-core box must not send calls to the
        # failure policy while Redis is fine (the failure test sets its own).
        "AIPROXY_REDIS__TIMEOUT_MS": "250",
        "AIPROXY_REDIS__PROBE_INTERVAL_S": "0.2",
        **extra,
    }


def serve(spawn: Callable[..., ServiceProcess], agent: str, env: dict[str, str], *extra: str):
    return spawn(
        *proxy_args(agent),
        *extra,
        env=env,
        name="proxy",
    )


@dataclasses.dataclass
class Outcome:
    sent_at: float  # seconds since the load began
    latency_s: float
    code: grpc.StatusCode
    reason: str = ""


async def one_call(channel: grpc.aio.Channel, t0: float) -> Outcome:
    sent = time.monotonic()
    try:
        await stub(channel).Generate(PROMPT, metadata=(("x-client-id", CALLER),), timeout=10)
        code, reason = grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as err:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        code = err.code()
        reason = rich_from_status(status).reason if status is not None else ""
    return Outcome(sent - t0, time.monotonic() - sent, code, reason)


async def paced_load(
    addresses: Sequence[str],
    *,
    calls: int,
    seconds: float,
    connections: int,
    during: Callable[[float], None] | None = None,
) -> list[Outcome]:
    """`calls` calls spread evenly over `seconds`, round-robin over `connections` separate
    HTTP/2 connections spread over `addresses` (as Envoy would); each call on its own task,
    so a slow answer never delays the next send. `during(t)` runs between sends."""
    channels = [
        grpc.aio.insecure_channel(
            addresses[i % len(addresses)], options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for i in range(connections)
    ]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in channels))
        t0 = time.monotonic()
        tasks = []
        for i in range(calls):
            at = t0 + i * seconds / calls
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if during is not None:
                during(time.monotonic() - t0)
            tasks.append(asyncio.create_task(one_call(channels[i % connections], t0)))
        return list(await asyncio.gather(*tasks))
    finally:
        await asyncio.gather(*(c.close() for c in channels))


def served_calls(metrics_address: str) -> float:
    """Generate calls this process answered (any status), from its /metrics."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "ai_proxy_requests"
        for sample in family.samples
        if sample.name == "ai_proxy_requests_total" and sample.labels.get("method") == "Generate"
    )


async def bucket_in_redis(url: str) -> bool:
    client = aioredis.Redis.from_url(url)
    try:
        # A self-declared client id spends its address's bucket (its own sub-bucket, of
        # the same shape, could never refuse first, so none is kept).
        return bool(await client.keys(f"{PREFIX}rate:peer:127.0.0.1"))
    finally:
        await client.aclose()


@pytest.mark.parametrize("layout", ["one_process", "two_workers", "two_replicas"])
async def test_n_processes_admit_what_one_process_admits(
    spawn,
    redis_server: RedisServer,  # noqa: F811
    layout: str,
) -> None:
    agent = spawn(*agent_args())
    env = shared_env(redis_server.url)
    if layout == "two_workers":
        proxy = serve(spawn, agent.address, env, "--workers", "2")
        addresses = [proxy.address]
        metrics = [w["metrics_address"] for w in proxy.ready["worker_ready"]]
    else:
        proxies = [
            serve(spawn, agent.address, env) for _ in range(1 if layout == "one_process" else 2)
        ]
        addresses = [p.address for p in proxies]
        metrics = [p.ready["metrics_address"] for p in proxies]

    outcomes = await paced_load(addresses, calls=200, seconds=2.0, connections=16)

    codes = {o.code for o in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    refused = [o for o in outcomes if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert {o.reason for o in refused} <= {"RATE_LIMITED"}
    admitted = sum(o.code == grpc.StatusCode.OK for o in outcomes)
    # What one process admits over the window the calls actually spanned: the burst, plus
    # the whole tokens refilled meanwhile; ± one refill interval (one token) for where the
    # window's edges fall on the server, and the slowest answer's time on the upper side.
    window = max(o.sent_at for o in outcomes) - min(o.sent_at for o in outcomes)
    slowest = max(o.latency_s for o in outcomes)
    low = math.floor(BURST + RATE * window) - 1
    high = BURST + RATE * (window + slowest) + 1
    print(
        f"{layout}: admitted {admitted} of {len(outcomes)} in {window:.2f}s (one process: {low:.1f}-{high:.1f})"
    )
    assert low <= admitted <= high, (layout, admitted, low, high)
    # Every process served part of the burst (else sharing was not tested), and the
    # bucket they shared is the one in Redis.
    per_process = [served_calls(m) for m in metrics]
    assert all(n > 0 for n in per_process), per_process
    assert sum(per_process) == len(outcomes)
    assert await bucket_in_redis(redis_server.url)


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_redis_stopped_mid_load_no_call_hangs_the_policy_holds_and_it_recovers(
    spawn,
    redis_server: RedisServer,  # noqa: F811
    policy: str,
) -> None:
    agent = spawn(*agent_args())
    env = shared_env(
        redis_server.url,
        AIPROXY_LIMITS__FAILURE_POLICY=policy,
        AIPROXY_REDIS__TIMEOUT_MS="50",
    )
    proxies = [serve(spawn, agent.address, env) for _ in range(2)]
    stopped_at: list[float] = []

    def outage(t: float) -> None:
        if t >= 1.0 and not stopped_at:
            redis_server.stop()  # the server is gone: connections reset, nothing answers
            stopped_at.append(t)

    # 4 s at 40 calls/s: 1 s with Redis, 3 s without.
    outcomes = await paced_load(
        [p.address for p in proxies], calls=160, seconds=4.0, connections=8, during=outage
    )
    (t_stop,) = stopped_at
    # No call hangs: every one answered, well inside its deadline and the redis wait.
    assert max(o.latency_s for o in outcomes) < 3.0, max(o.latency_s for o in outcomes)
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    if policy == "fail_closed":
        allowed.add(grpc.StatusCode.UNAVAILABLE)
    assert {o.code for o in outcomes} <= allowed
    # The policy holds once the outage is noticed (the first call after it decides).
    away = [o for o in outcomes if o.sent_at >= t_stop + 0.3]
    away_s = 4.0 - (t_stop + 0.3)
    admitted_away = sum(o.code == grpc.StatusCode.OK for o in away)
    slowest = max(o.latency_s for o in outcomes)
    print(
        f"{policy}: {len(away)} calls in {away_s:.1f}s without Redis, {admitted_away} admitted, slowest {slowest * 1000:.0f} ms"
    )
    if policy == "fail_closed":
        assert admitted_away == 0, admitted_away
        unavailable = [o for o in away if o.code == grpc.StatusCode.UNAVAILABLE]
        assert unavailable and {o.reason for o in unavailable} == {"LIMITS_UNAVAILABLE"}
    else:
        # Each of the 2 processes limits alone at limit/2 (burst ceil(5/2), rate 2.5/s):
        # the pair stays near one process's limit, and callers are still served.
        share_burst, share_rate = math.ceil(BURST / 2), RATE / 2
        high = 2 * (share_burst + share_rate * away_s) + 2
        assert 1 <= admitted_away <= high, (admitted_away, high)
        assert not any(o.code == grpc.StatusCode.UNAVAILABLE for o in outcomes)

    # Recovery is automatic: Redis returns (same port, empty), and the shared bucket is
    # used again without restarting anything.
    redis_server.start()
    deadline = time.monotonic() + 20
    recovered = False
    while time.monotonic() < deadline and not recovered:
        after = await paced_load([p.address for p in proxies], calls=4, seconds=0.2, connections=2)
        assert max(o.latency_s for o in after) < 3.0
        recovered = await bucket_in_redis(redis_server.url) and any(
            o.code == grpc.StatusCode.OK for o in after
        )
        if not recovered:
            await asyncio.sleep(0.3)
    assert recovered, "the proxies did not return to the shared bucket"
    for proxy in proxies:
        assert proxy.proc is not None and proxy.proc.poll() is None  # nobody crashed


async def stream_outcome(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str]:
    """A short stream from the caller: OK (admitted and done) or its refusal."""
    request = pb.StreamGenerateRequest(prompt="probe", options=pb.GenerationOptions(max_tokens=2))
    try:
        async for _ in stub(channel).StreamGenerate(
            request, metadata=(("x-client-id", CALLER),), timeout=10
        ):
            pass
    except grpc.aio.AioRpcError as err:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        return err.code(), rich_from_status(status).reason if status is not None else ""
    return grpc.StatusCode.OK, ""


async def admitted_within(channel: grpc.aio.Channel, limit_s: float) -> float:
    """Probe until a stream is admitted; how long that took (fails past `limit_s`)."""
    start = time.monotonic()
    while True:
        code, reason = await stream_outcome(channel)
        if code == grpc.StatusCode.OK:
            return time.monotonic() - start
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CONCURRENCY_LIMITED")
        assert time.monotonic() - start < limit_s, f"no stream admitted within {limit_s}s"
        await asyncio.sleep(0.05)


async def test_stream_cap_holds_across_replicas_and_a_dead_replicas_leases_lapse(
    spawn,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    agent = spawn(*agent_args())
    env = shared_env(
        redis_server.url,
        AIPROXY_LIMITS__RATE_PER_S="1000",
        AIPROXY_LIMITS__BURST="1000",
        AIPROXY_LIMITS__MAX_STREAMS_PER_CALLER="2",
        # 3 s: a released slot must show well before a lease could lapse, with room for
        # a loaded CI box (at 1 s the release had to come within 0.9 s).
        AIPROXY_REDIS__LEASE_TTL_S="3",
    )
    a, b = (serve(spawn, agent.address, env) for _ in range(2))
    hang = (("x-client-id", CALLER), ("x-fault-hang", "1"))
    request = pb.StreamGenerateRequest(prompt="hold", options=pb.GenerationOptions(max_tokens=8))
    async with (
        grpc.aio.insecure_channel(a.address) as on_a,
        grpc.aio.insecure_channel(b.address) as on_b,
    ):
        # One open stream on each replica: the caller's two slots, taken in Redis.
        held_a = stub(on_a).StreamGenerate(request, metadata=hang, timeout=60)
        held_b = stub(on_b).StreamGenerate(request, metadata=hang, timeout=60)
        await wait_started(agent, 2)
        for channel in (on_a, on_b):  # a third is refused on either replica
            assert await stream_outcome(channel) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "CONCURRENCY_LIMITED",
            )

        # A stream that ends frees its slot for the other replica too, long before any
        # lease TTL (the cancellation has to reach B first: poll briefly).
        held_b.cancel()
        assert await admitted_within(on_a, 2.0) < 2.0

        # Fill the slot again from B, then kill A (SIGKILL: no clean release). Its lease
        # is not renewed and lapses within the lease TTL: B admits a stream again.
        held_b = stub(on_b).StreamGenerate(request, metadata=hang, timeout=60)
        await wait_started(agent, 4)  # the two held, the probe, this one (refusals never start)
        assert await stream_outcome(on_b) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "CONCURRENCY_LIMITED",
        )
        assert a.proc is not None
        a.proc.kill()
        a.proc.wait(timeout=10)
        lapsed_s = await admitted_within(on_b, 15)
        print(f"dead replica's lease lapsed after {lapsed_s:.2f}s (ttl 3 s)")
        assert lapsed_s < 10
        held_a.cancel()
        held_b.cancel()
