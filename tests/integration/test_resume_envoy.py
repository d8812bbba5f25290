"""Resumable streams over SSE through real Envoys, on another replica (issue 16).

agent <- proxy A <- Envoy A and agent <- proxy B <- Envoy B, the proxies sharing one
redis-server: a browser-like caller reads a resumable stream from Envoy A, drops the
connection, and reconnects to Envoy B the way an EventSource does (GET, the same URL,
Last-Event-ID: "<stream id>:<seq>" as the edge's sse_ids filter wrote it). It gets the
rest with no gap and no duplicate; the text equals an uninterrupted run. An EventSource
that nobody closed after isFinal reconnects with the final id: it gets an HTTP error
(OUT_OF_RANGE STREAM_FINISHED as a Status JSON), which ends its retries, and the agent
never runs the generation again. An id that does not exist is 404 STREAM_NOT_FOUND.
"""

from __future__ import annotations

import pathlib
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from aiproxy.core.errors import http_status_for
from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import OpenStream, request, sse_events, sse_ids
from tests.support.procs import ServiceProcess, aiproxy_argv, recorded_metadata
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.envoy

STREAM = "/api/v1/ai/generate/stream"
AGENT_STREAM = "/ai.agent.v1.AgentService/StreamGenerate"
PROMPT = "resume me through the edge"


def envoy_argv(upstream: str) -> list[str]:
    return aiproxy_argv(
        "envoy", "--listen", "127.0.0.1:0", "--proxy", upstream, "--concurrency", "1",
        "--log-flush-ms", "50", "--health-interval-s", "0.5",
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    record = tmp_path_factory.mktemp("resume-edge") / "agent-metadata.jsonl"
    started: list[Any] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(argv, env=env, name=name)
        started.append(proc)
        return proc.start(timeout=60)

    redis = RedisServer().start()
    started.append(redis)
    try:
        agent = start(
            aiproxy_argv(*agent_args("--record-metadata", str(record), token_delay_ms=100)),
            "agent",
        )
        env = {
            **GENEROUS_LIMITS,
            "AIPROXY_REDIS__URL": redis.url,
            "AIPROXY_REDIS__TIMEOUT_MS": "250",
            "AIPROXY_STREAM__RESUME__BACKEND": "redis",
            "AIPROXY_STREAM__RESUME__GRACE_S": "5",
        }
        proxies = [start(aiproxy_argv(*proxy_args(agent.address)), f"proxy-{i}", env) for i in "ab"]
        edges = [
            start(envoy_argv(p.address), f"envoy-{i}") for i, p in zip("ab", proxies, strict=True)
        ]
        yield {"edges": [e.address for e in edges], "record": record}
    finally:
        for proc in reversed(started):
            proc.cleanup()


def generations(record: pathlib.Path) -> int:
    return sum(1 for c in recorded_metadata(record) if c["method"] == AGENT_STREAM)


def eventsource_get(edge: str, last_event_id: str) -> Any:
    """What an EventSource's automatic reconnect sends: the same GET, Last-Event-ID."""
    query = urllib.parse.urlencode({"prompt": PROMPT})
    return request(edge, "GET", f"{STREAM}?{query}", headers={"last-event-id": last_event_id})


def text(events: list[dict[str, Any]]) -> str:
    return "".join(e.get("delta", "") for e in events if not e.get("heartbeat"))


def test_sse_stream_dropped_on_one_replica_resumes_on_another(stack: dict[str, Any]) -> None:
    edge_a, edge_b = stack["edges"]
    record = stack["record"]
    baseline = request(edge_a, "POST", STREAM, {"prompt": PROMPT})
    assert baseline.status == 200
    whole = sse_events(baseline.body)
    assert whole[-1]["isFinal"] and len(whole) > 10
    before = generations(record)

    stream = OpenStream(edge_a, STREAM, {"prompt": PROMPT}, headers={"x-aiproxy-resumable": "1"})
    try:
        sid = stream.resp.getheader("x-aiproxy-stream-id")
        assert sid, "the stream id is a response header through Envoy"
        seen = []
        for event in stream.events():
            seen.append(event)
            if len(seen) == 4:
                break
        last_id = stream.last_id
    finally:
        stream.close()  # the connection drops mid-stream
    assert last_id == f"{sid}:{seen[-1]['seq']}"

    reply = eventsource_get(edge_b, last_id)
    assert reply.status == 200, reply.body
    assert reply.headers.get("x-aiproxy-stream-id") == sid
    rest = sse_events(reply.body)
    assert [e["seq"] for e in seen + rest] == list(range(len(seen) + len(rest)))
    assert sse_ids(reply.body) == [f"{sid}:{e['seq']}" for e in rest]
    assert text(seen + rest) == text(whole)
    assert rest[-1]["isFinal"] and rest[-1]["usage"] == whole[-1]["usage"]
    assert generations(record) == before + 1

    # The unclosed EventSource reconnects after isFinal, on either replica: an HTTP error
    # (ends its retries), no new generation.
    for edge in (edge_a, edge_b, edge_b):
        again = eventsource_get(edge, f"{sid}:{rest[-1]['seq']}")
        assert again.status == http_status_for_name("OUT_OF_RANGE"), again.body
        body = again.json()
        assert body["details"][0]["reason"] == "STREAM_FINISHED"
    assert generations(record) == before + 1


def test_unknown_stream_id_is_not_found_through_the_edge(stack: dict[str, Any]) -> None:
    edge_a, _ = stack["edges"]
    reply = eventsource_get(edge_a, "A" * 22 + ":3")
    assert reply.status == 404, reply.body
    assert reply.json()["details"][0]["reason"] == "STREAM_NOT_FOUND"


def http_status_for_name(name: str) -> int:
    import grpc

    return http_status_for(grpc.StatusCode[name])


def test_cache_control_header_through_the_edge(stack: dict[str, Any]) -> None:
    """The HTTP convention works from a browser: cache-control: max-age opts in, the
    answer says x-aiproxy-cache (exposed to CORS callers), no-store bypasses."""
    edge_a, _ = stack["edges"]
    body = {"prompt": "cache me through the edge", "options": {"maxTokens": 5}}
    cached = {"cache-control": "max-age=60", "x-client-id": "edge-cache"}
    first = request(edge_a, "POST", "/api/v1/ai/generate", body, headers=cached)
    second = request(edge_a, "POST", "/api/v1/ai/generate", body, headers=cached)
    assert first.status == second.status == 200
    assert first.headers.get("x-aiproxy-cache") == "miss"
    assert second.headers.get("x-aiproxy-cache") == "hit"
    assert second.json() == first.json()
    bypass = request(
        edge_a,
        "POST",
        "/api/v1/ai/generate",
        body,
        headers={"cache-control": "no-store", "x-client-id": "edge-cache"},
    )
    assert bypass.status == 200 and bypass.headers.get("x-aiproxy-cache") is None
