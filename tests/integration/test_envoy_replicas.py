"""Two proxy replicas behind one Envoy, balanced by their grpc.health.v1.

Each proxy has its own agent, so a proxy can be made NOT_SERVING honestly: SIGUSR1 on
its agent makes the agent NOT_SERVING, the proxy then has no usable upstream and
reports NOT_SERVING itself, and Envoy's active health check ejects it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import request, sse_events, wait_access_log, wait_host_health, wait_until
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = pytest.mark.envoy


@pytest.fixture
def replicas() -> Iterator[dict[str, ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), name=name, env=env)
        started.append(proc)
        return proc.start(timeout=60)

    try:
        agent_a = start(agent_args(), "agent-a")
        agent_b = start(agent_args(), "agent-b")
        proxy_a = start(proxy_args(agent_a.address), "proxy-a", GENEROUS_LIMITS)
        proxy_b = start(proxy_args(agent_b.address), "proxy-b", GENEROUS_LIMITS)
        envoy = start(
            ["envoy", "--listen", "127.0.0.1:0", "--proxy", proxy_a.address, "--proxy", proxy_b.address,
             "--concurrency", "1", "--log-flush-ms", "50", "--health-interval-s", "0.5"],
            "envoy",
        )  # fmt: skip
        yield {
            "agent_a": agent_a,
            "agent_b": agent_b,
            "proxy_a": proxy_a,
            "proxy_b": proxy_b,
            "envoy": envoy,
        }
    finally:
        for proc in reversed(started):
            proc.cleanup()


def _call(edge: str, rid: str, stream: bool) -> int:
    """One request; returns the HTTP status, and fails on an incomplete stream."""
    if stream:
        reply = request(
            edge,
            "POST",
            "/api/v1/ai/generate/stream",
            {"prompt": "hi", "options": {"maxTokens": 3}},
            headers={"x-request-id": rid},
        )
        if reply.status == 200:
            final = sse_events(reply.body)[-1]
            assert final["isFinal"] and "error" not in final, final
        return reply.status
    reply = request(
        edge,
        "POST",
        "/api/v1/ai/generate",
        {"prompt": "hi", "options": {"maxTokens": 3}},
        headers={"x-request-id": rid},
    )
    return reply.status


def test_not_serving_replica_is_ejected_and_traffic_continues(
    replicas: dict[str, ServiceProcess],
) -> None:
    envoy = replicas["envoy"]
    edge = envoy.address
    a, b = replicas["proxy_a"].address, replicas["proxy_b"].address
    wait_host_health(envoy, a, True)
    wait_host_health(envoy, b, True)

    # Both replicas take traffic (least-request balancing; bounded number of tries).
    seen: set[str] = set()
    for i in range(60):
        rid = f"warm-{i}-{time.monotonic_ns()}"
        assert _call(edge, rid, stream=i % 2 == 0) == 200
        seen.add(wait_access_log(envoy, rid)["upstream_host"])
        if seen == {a, b}:
            break
    assert seen == {a, b}

    # Replica A loses its only agent: it reports NOT_SERVING, Envoy ejects it.
    replicas["agent_a"].send_signal(signal.SIGUSR1)
    flipped_at = time.monotonic()
    wait_host_health(envoy, a, False, timeout=20)
    ejected_after = time.monotonic() - flipped_at
    assert ejected_after < 10

    # From now on every request succeeds, on B.
    rids = [f"after-{i}-{time.monotonic_ns()}" for i in range(30)]
    statuses = [_call(edge, rid, stream=i % 2 == 0) for i, rid in enumerate(rids)]
    assert statuses == [200] * len(rids)
    hosts = {wait_access_log(envoy, rid)["upstream_host"] for rid in rids}
    assert hosts == {b}

    # A recovers and is taken back.
    replicas["agent_a"].send_signal(signal.SIGUSR2)
    wait_host_health(envoy, a, True, timeout=20)
    back: set[str] = set()
    for i in range(60):
        rid = f"back-{i}-{time.monotonic_ns()}"
        assert _call(edge, rid, stream=False) == 200
        back.add(wait_access_log(envoy, rid)["upstream_host"])
        if a in back:
            break
    assert a in back


def test_no_healthy_replica_is_a_503_status_and_healthz_says_so(
    replicas: dict[str, ServiceProcess],
) -> None:
    envoy = replicas["envoy"]
    edge = envoy.address
    for agent, proxy in (("agent_a", "proxy_a"), ("agent_b", "proxy_b")):
        wait_host_health(envoy, replicas[proxy].address, True)
        replicas[agent].send_signal(signal.SIGUSR1)
    for proxy in ("proxy_a", "proxy_b"):
        wait_host_health(envoy, replicas[proxy].address, False, timeout=20)

    # healthy_panic_threshold 0: no routing to unhealthy replicas, a fast 503 instead.
    reply = request(
        edge,
        "POST",
        "/api/v1/ai/generate",
        {"prompt": "x"},
        headers={"x-request-id": "none-healthy"},
    )
    assert reply.status == 503
    body = reply.json()
    assert body["code"] == 14 and body["message"] == "the service is unavailable", body
    assert [d["@type"].rpartition(".")[2] for d in body["details"]] == ["ErrorInfo", "RetryInfo"]
    assert (
        body["details"][0]["reason"] == "UPSTREAM_UNAVAILABLE"
        and reply.headers["retry-after"] == "1"
    )
    assert wait_access_log(envoy, "none-healthy")["response_flags"] == "UH"
    assert request(edge, "GET", "/healthz").status == 503

    replicas["agent_b"].send_signal(signal.SIGUSR2)
    wait_host_health(envoy, replicas["proxy_b"].address, True, timeout=20)
    wait_until(lambda: request(edge, "GET", "/healthz").status == 200, 10, "/healthz to recover")
    assert _call(edge, "one-back", stream=True) == 200
    assert wait_access_log(envoy, "one-back")["upstream_host"] == replicas["proxy_b"].address
