"""A resumable SSE stream whose origin replica dies, through real Envoys (issue 20 §5).

agent <- proxy A <- Envoy A and agent <- proxy B <- Envoy B, the proxies sharing one
redis-server. A browser-like caller reads 10 events from Envoy A; proxy A is SIGKILLed;
the EventSource reconnect (GET, Last-Event-ID "<id>:3") to Envoy B gets 200, the events
after 3 (every one the caller had read among them), then an error event (isFinal, the
Status with ErrorInfo STREAM_ORIGIN_LOST and RetryInfo), and the body ends, within a
bound derived from the owner's lease (it used to get no HTTP status at all for 146 s).
Its next reconnect, after the error event's id, gets HTTP 503 with the same Status JSON:
an EventSource stops on it.
"""

from __future__ import annotations

import signal
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.integration.test_resume_origin_lost import DETECTION_BOUND_S, GENEROUS_BOUND_S
from tests.support.edge import OpenStream, request, sse_events, sse_ids
from tests.support.procs import ServiceProcess, aiproxy_argv
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.envoy

STREAM = "/api/v1/ai/generate/stream"
PROMPT = "the origin dies behind the edge"


def envoy_argv(upstream: str) -> list[str]:
    return aiproxy_argv(
        "envoy", "--listen", "127.0.0.1:0", "--proxy", upstream, "--concurrency", "1",
        "--log-flush-ms", "50", "--health-interval-s", "0.5",
    )  # fmt: skip


@pytest.fixture
def stack() -> Iterator[dict[str, Any]]:
    started: list[Any] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(argv, env=env, name=name)
        started.append(proc)
        return proc.start(timeout=60)

    redis = RedisServer().start()
    started.append(redis)
    try:
        agent = start(aiproxy_argv(*agent_args(token_delay_ms=100)), "agent")
        env = {
            **GENEROUS_LIMITS,
            "AIPROXY_REDIS__URL": redis.url,
            "AIPROXY_REDIS__TIMEOUT_MS": "250",
            "AIPROXY_STREAM__RESUME__BACKEND": "redis",
            "AIPROXY_STREAM__RESUME__GRACE_S": "30",
            "AIPROXY_STREAM__RESUME__OWNER_LEASE_S": "1.0",
        }
        proxies = [start(aiproxy_argv(*proxy_args(agent.address)), f"proxy-{i}", env) for i in "ab"]
        edges = [
            start(envoy_argv(p.address), f"envoy-{i}") for i, p in zip("ab", proxies, strict=True)
        ]
        yield {"edges": [e.address for e in edges], "proxies": proxies}
    finally:
        for proc in reversed(started):
            proc.cleanup()


def eventsource_get(edge: str, last_event_id: str) -> Any:
    """What an EventSource's automatic reconnect sends: the same GET, Last-Event-ID."""
    query = urllib.parse.urlencode({"prompt": PROMPT, "options.maxTokens": "400"})
    return request(
        edge, "GET", f"{STREAM}?{query}", headers={"last-event-id": last_event_id}, timeout=60
    )


def reasons(status: dict[str, Any]) -> dict[str, Any]:
    """ErrorInfo's reason and RetryInfo's delay of a google.rpc.Status as JSON."""
    out: dict[str, Any] = {}
    for detail in status.get("details", []):
        if detail["@type"].endswith("google.rpc.ErrorInfo"):
            out["reason"] = detail["reason"]
        elif detail["@type"].endswith("google.rpc.RetryInfo"):
            out["retry_delay"] = detail["retryDelay"]
    return out


def test_sse_resumer_of_a_killed_origin_gets_the_error_event_and_ends(
    stack: dict[str, Any],
) -> None:
    edge_a, edge_b = stack["edges"]
    proxy_a = stack["proxies"][0]
    stream = OpenStream(
        edge_a,
        STREAM,
        {"prompt": PROMPT, "options": {"maxTokens": 400}},
        headers={"x-aiproxy-resumable": "1"},
    )
    try:
        sid = stream.resp.getheader("x-aiproxy-stream-id")
        assert sid, "the stream id is a response header through Envoy"
        seen = []
        for event in stream.events():
            seen.append(event)
            if len(seen) == 10:
                break
        proxy_a.send_signal(signal.SIGKILL)
        assert proxy_a.wait(timeout=10) == -signal.SIGKILL
        killed_at = time.monotonic()
    finally:
        stream.close()

    reply = eventsource_get(edge_b, f"{sid}:3")
    ended_after_s = time.monotonic() - killed_at
    assert reply.status == 200, reply.body
    events = sse_events(reply.body)
    assert ended_after_s < GENEROUS_BOUND_S, (ended_after_s, DETECTION_BOUND_S)
    final = events[-1]
    assert final["isFinal"] and final["finishReason"] == "FINISH_REASON_ERROR", final
    assert final["error"]["code"] == 14  # UNAVAILABLE
    got = reasons(final["error"])
    assert got["reason"] == "STREAM_ORIGIN_LOST" and got.get("retry_delay"), got
    # Every event the caller had read after id 3 is there, the same; no gap, no duplicate.
    assert [e["seq"] for e in events] == list(range(4, 4 + len(events)))
    assert events[:6] == seen[4:10]
    ids = sse_ids(reply.body)
    assert ids[-1] == f"{sid}:{final['seq']}"

    # The EventSource reconnects with the error event's id: an HTTP error ends its retries.
    again = eventsource_get(edge_b, ids[-1] or "")
    assert again.status == 503, again.body
    assert reasons(again.json())["reason"] == "STREAM_ORIGIN_LOST"
