"""Metrics and access logs of a real proxy process (and a real agent), port 0 everywhere.

Known traffic goes through the proxy: successes, a stream, an upstream RESOURCE_EXHAUSTED
rejection, upstream failures that open the breaker, and a call the open breaker fails
fast. Then /metrics is scraped over HTTP and the exact counters and label sets are
checked, and the access log lines are parsed.
"""

from __future__ import annotations

import dataclasses
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.conftest import agent_args, proxy_args
from tests.support.grpc_helpers import stub

SERVICE = "ai.agent.v1.AgentService"
# Never logged: the access log must not carry prompt text.
PROMPT = "confidential prompt text 7f3a"
# Breaker opens on the second upstream UNAVAILABLE and stays open for the test; one
# attempt per call, so every count below is exact; no coalescing, so chunks are 1:1.
PROXY_ENV = {
    # Opens on the second UNAVAILABLE of drive() (2 of 6 settled calls; RESOURCE_EXHAUSTED
    # does not count), from its one caller.
    "AIPROXY_BREAKER__MIN_VOLUME": "2",
    "AIPROXY_BREAKER__MIN_FAILING_CALLERS": "1",
    "AIPROXY_BREAKER__FAILURE_RATIO": "0.3",
    "AIPROXY_BREAKER__RESET_TIMEOUT_S": "300",
    "AIPROXY_RETRY__MAX_ATTEMPTS": "1",
    "AIPROXY_STREAM__COALESCE": "false",
}


@dataclasses.dataclass
class Traffic:
    ok_usage: list[pb.Usage]
    stream_chunks: list[pb.StreamGenerateResponse]
    errors: dict[str, grpc.StatusCode]


def scrape(address: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics as {sample name: [(labels, value)]}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def api_samples(samples: list[tuple[dict[str, str], float]]) -> dict[tuple[str, ...], float]:
    """Samples of the AgentService methods, keyed by their sorted label values."""
    return {
        tuple(v for _, v in sorted(labels.items())): value
        for labels, value in samples
        if labels.get("grpc_service", SERVICE) == SERVICE
    }


async def drive(channel: grpc.aio.Channel) -> Traffic:
    s = stub(channel)
    usage = []
    for i in range(3):
        reply = await s.Generate(
            pb.GenerateRequest(prompt=PROMPT, options=pb.GenerationOptions(max_tokens=12)),
            metadata=(("x-request-id", f"ok-{i}"),),
            timeout=10,
        )
        usage.append(reply.usage)
    chunks = [
        c
        async for c in s.StreamGenerate(
            pb.StreamGenerateRequest(prompt=PROMPT, options=pb.GenerationOptions(max_tokens=8)),
            metadata=(("x-request-id", "stream-0"),),
            timeout=10,
        )
    ]
    errors = {}
    for request_id, fault in [
        ("limited-0", "RESOURCE_EXHAUSTED"),
        ("down-0", "UNAVAILABLE"),
        ("down-1", "UNAVAILABLE"),
        ("open-0", None),  # the breaker is open now: fails fast, nothing sent
    ]:
        metadata = [("x-request-id", request_id)]
        if fault:
            metadata.append(("x-fault-code", fault))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.Generate(pb.GenerateRequest(prompt=PROMPT), metadata=metadata, timeout=10)
        errors[request_id] = err.value.code()
    return Traffic(usage, chunks, errors)


@pytest.fixture
def agent(spawn):
    return spawn(*agent_args(), name="agent")


@pytest.fixture
def proxy(spawn, agent):
    return spawn(*proxy_args(agent.address), env=PROXY_ENV, name="proxy")


async def test_metrics_after_known_traffic(agent, proxy) -> None:
    # The ready line keeps its keys and adds where /metrics listens.
    assert {"event", "service", "address", "metrics_address"} <= set(proxy.ready)
    assert proxy.ready["metrics_address"].startswith("127.0.0.1:")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        traffic = await drive(channel)
    assert traffic.errors == {
        "limited-0": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "down-0": grpc.StatusCode.UNAVAILABLE,
        "down-1": grpc.StatusCode.UNAVAILABLE,
        "open-0": grpc.StatusCode.UNAVAILABLE,
    }
    n_chunks = len(traffic.stream_chunks)
    assert n_chunks > 3
    m = scrape(proxy.ready["metrics_address"])

    assert api_samples(m["ai_proxy_requests_total"]) == {
        ("Generate", "OK"): 3,
        ("Generate", "RESOURCE_EXHAUSTED"): 1,
        ("Generate", "UNAVAILABLE"): 3,
        ("StreamGenerate", "OK"): 1,
    }
    # (grpc_code, grpc_method, grpc_service, grpc_type)
    assert api_samples(m["grpc_server_handled_total"]) == {
        ("OK", "Generate", SERVICE, "UNARY"): 3,
        ("RESOURCE_EXHAUSTED", "Generate", SERVICE, "UNARY"): 1,
        ("UNAVAILABLE", "Generate", SERVICE, "UNARY"): 3,
        ("OK", "StreamGenerate", SERVICE, "SERVER_STREAMING"): 1,
    }
    assert api_samples(m["grpc_server_started_total"]) == {
        ("Generate", SERVICE, "UNARY"): 7,
        ("StreamGenerate", SERVICE, "SERVER_STREAMING"): 1,
    }
    assert api_samples(m["grpc_server_msg_received_total"]) == {
        ("Generate", SERVICE, "UNARY"): 7,
        ("StreamGenerate", SERVICE, "SERVER_STREAMING"): 1,
    }
    assert api_samples(m["grpc_server_msg_sent_total"]) == {
        ("Generate", SERVICE, "UNARY"): 3,
        ("StreamGenerate", SERVICE, "SERVER_STREAMING"): n_chunks,
    }
    assert api_samples(m["grpc_server_handling_seconds_count"]) == {
        ("Generate", SERVICE, "UNARY"): 7,
        ("StreamGenerate", SERVICE, "SERVER_STREAMING"): 1,
    }
    # Upstream side: the fast-failed call never reached the agent.
    assert api_samples(m["grpc_client_handled_total"]) == {
        ("OK", "Generate", SERVICE, "UNARY"): 3,
        ("RESOURCE_EXHAUSTED", "Generate", SERVICE, "UNARY"): 1,
        ("UNAVAILABLE", "Generate", SERVICE, "UNARY"): 2,
        ("OK", "StreamGenerate", SERVICE, "SERVER_STREAMING"): 1,
    }
    assert api_samples(m["grpc_client_msg_received_total"]) == {
        ("Generate", SERVICE, "UNARY"): 3,
        ("StreamGenerate", SERVICE, "SERVER_STREAMING"): n_chunks,
    }
    # The pool's health Watch and liveness Checks run on a plain channel of their own (no
    # breaker, no client metrics): probes are not upstream traffic (server/pool/).
    assert not any(
        labels["grpc_method"] in ("Watch", "Check") for labels, _ in m["grpc_client_started_total"]
    )

    upstream = agent.address
    assert m["ai_proxy_circuit_breaker_state"] == [({"upstream": upstream}, 2.0)]
    assert m["ai_proxy_upstream_healthy"] == [({"upstream": upstream}, 1.0)]
    assert m["ai_proxy_upstream_usable"] == [({"upstream": upstream}, 0.0)]
    # The agent's RESOURCE_EXHAUSTED carries no RATE_LIMITED ErrorInfo: it is an upstream
    # error, not a limiter rejection (those are covered in tests/unit).
    assert "ai_proxy_rate_limit_rejections_total" not in m
    # One attempt per call (max_attempts 1); the series exist from the first call at 0.
    assert sorted(m["ai_proxy_upstream_retries_total"], key=lambda s: s[0]["method"]) == [
        ({"method": "Generate"}, 0.0),
        ({"method": "StreamGenerate"}, 0.0),
    ]

    assert m["ai_proxy_active_streams"] == [({"method": "StreamGenerate"}, 0.0)]
    assert m["ai_proxy_stream_chunks_sent_total"] == [
        ({"method": "StreamGenerate"}, float(n_chunks))
    ]
    assert m["ai_proxy_stream_first_chunk_seconds_count"] == [({"method": "StreamGenerate"}, 1.0)]
    assert m["ai_proxy_stream_chunk_interval_seconds_count"] == [
        ({"method": "StreamGenerate"}, 1.0)
    ]
    assert {labels["method"]: v for labels, v in m["ai_proxy_request_duration_seconds_count"]} == {
        "Generate": 7,
        "StreamGenerate": 1,
    }

    final = traffic.stream_chunks[-1]
    model = traffic.stream_chunks[0].model
    assert model and final.is_final
    expected_prompt = sum(u.prompt_tokens for u in traffic.ok_usage) + final.usage.prompt_tokens
    expected_completion = (
        sum(u.completion_tokens for u in traffic.ok_usage) + final.usage.completion_tokens
    )
    assert expected_completion > 0
    assert sorted(m["ai_proxy_tokens_total"], key=lambda s: s[0]["kind"]) == [
        ({"model": model, "kind": "completion"}, float(expected_completion)),
        ({"model": model, "kind": "prompt"}, float(expected_prompt)),
    ]
    # Label sets stay bounded: no request ids anywhere in the exposition.
    for samples in m.values():
        for labels, _ in samples:
            assert not any(
                v.startswith(("ok-", "stream-", "down-", "open-", "limited-"))
                for v in labels.values()
            )


async def test_access_log_lines(agent, proxy) -> None:
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        traffic = await drive(channel)
    wanted = {"ok-0", "ok-1", "ok-2", "stream-0", "limited-0", "down-0", "down-1", "open-0"}
    proxy.wait_for_log(
        lambda line: line.get("event") == "access" and line.get("request_id") == "open-0",
        timeout=10,
    )
    lines = {line["request_id"]: line for line in proxy.log_events("access")}
    # One line per API call, none for the pool's or anyone's health checks.
    assert set(lines) == wanted
    assert all(line["method"].startswith(f"/{SERVICE}/") for line in lines.values())
    fields = {
        "request_id",
        "method",
        "caller",
        "code",
        "reason",
        "duration_ms",
        "first_chunk_ms",
        "chunks",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "upstream",
        "attempts",
        "retries",
    }
    assert all(fields <= set(line) for line in lines.values())

    ok = lines["ok-0"]
    assert (ok["code"], ok["reason"], ok["upstream"], ok["attempts"]) == (
        "OK",
        "",
        agent.address,
        1,
    )
    assert ok["completion_tokens"] == traffic.ok_usage[0].completion_tokens
    assert ok["first_chunk_ms"] is None and ok["duration_ms"] > 0

    stream = lines["stream-0"]
    assert stream["code"] == "OK" and stream["chunks"] == len(traffic.stream_chunks)
    assert 0 < stream["first_chunk_ms"] <= stream["duration_ms"]
    assert stream["model"] == traffic.stream_chunks[0].model
    assert stream["completion_tokens"] == traffic.stream_chunks[-1].usage.completion_tokens

    assert (lines["limited-0"]["code"], lines["limited-0"]["reason"]) == (
        "RESOURCE_EXHAUSTED",
        "UPSTREAM_ERROR",
    )
    assert (lines["down-1"]["code"], lines["down-1"]["reason"]) == (
        "UNAVAILABLE",
        "UPSTREAM_UNAVAILABLE",
    )
    fast = lines["open-0"]
    assert (fast["code"], fast["reason"], fast["attempts"], fast["upstream"]) == (
        "UNAVAILABLE",
        "CIRCUIT_OPEN",
        0,
        "",
    )

    # Breaker transition and upstream health have their own lines.
    assert [(e["old"], e["new"]) for e in proxy.log_events("breaker_transition")] == [
        ("CLOSED", "OPEN")
    ]
    assert any(
        e["serving"] is True and e["address"] == agent.address
        for e in proxy.log_events("upstream_health")
    )
    # No prompt text in any log line.
    assert PROMPT not in proxy.stderr_text()


def gauge(address: str, name: str, upstream: str) -> float | None:
    for labels, value in scrape(address).get(name, []):
        if labels.get("upstream") == upstream:
            return value
    return None


async def test_breaker_gauge_follows_open_half_open_closed(spawn, agent) -> None:
    proxy = spawn(
        *proxy_args(agent.address),
        env={
            **PROXY_ENV,
            "AIPROXY_BREAKER__MIN_VOLUME": "2",
            "AIPROXY_BREAKER__MIN_FAILING_CALLERS": "1",
            "AIPROXY_BREAKER__RESET_TIMEOUT_S": "1",
        },
        name="proxy",
    )
    metrics = proxy.ready["metrics_address"]
    assert gauge(metrics, "ai_proxy_circuit_breaker_state", agent.address) == 0
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        s = stub(channel)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await s.Generate(
                    pb.GenerateRequest(prompt="x"),
                    metadata=(("x-fault-code", "UNAVAILABLE"),),
                    timeout=10,
                )
        assert gauge(metrics, "ai_proxy_circuit_breaker_state", agent.address) == 2
        assert gauge(metrics, "ai_proxy_upstream_usable", agent.address) == 0
        # After reset_timeout_s the pool re-reads the breaker: HALF_OPEN, usable for a probe.
        proxy.wait_for_log(
            lambda e: e.get("event") == "breaker_transition" and e.get("new") == "HALF_OPEN",
            timeout=15,
        )
        assert gauge(metrics, "ai_proxy_circuit_breaker_state", agent.address) == 1
        assert gauge(metrics, "ai_proxy_upstream_usable", agent.address) == 1
        await s.Generate(pb.GenerateRequest(prompt="x"), timeout=10)  # the probe succeeds
    assert gauge(metrics, "ai_proxy_circuit_breaker_state", agent.address) == 0
    assert [(e["old"], e["new"]) for e in proxy.log_events("breaker_transition")] == [
        ("CLOSED", "OPEN"),
        ("OPEN", "HALF_OPEN"),
        ("HALF_OPEN", "CLOSED"),
    ]
