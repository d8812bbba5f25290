"""What HTTP clients read, through a real Envoy (issue 20, section 6).

- Every retryable answer before the first chunk carries `retry-after` (whole seconds,
  rounded up) consistent with the RetryInfo of its google.rpc.Status body: the limiter's
  429, an upstream failure's 503, the breaker's 503, unary and stream alike. The proxy
  sends it as a trailer of the trailers-only response, which Envoy's transcoder turns
  into a response header. After the first chunk the status line and headers are gone: the
  in-band final event carries RetryInfo, and no header can (asserted here, so the README's
  claim stays true).
- A query string encoded the way URLSearchParams and HTML forms do (`+` for a space,
  `%2B` for a plus) reaches the agent as the text the caller meant.

One stack for the module; the limiter is tight (burst 3), so every test calls from its
own loopback address (a caller of its own for the proxy: Envoy passes the address on).
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import agent_args, proxy_args
from tests.support.edge import Reply, request, sse_events
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = pytest.mark.envoy

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
GENERATE = "/api/v1/ai/generate"
STREAM = "/api/v1/ai/generate/stream"
BURST = 3
RATE_PER_S = 0.4  # a spent bucket refills one token in 2.5 s: retry-after 3


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), env=env, name=name)
        started.append(proc)
        return proc.start(timeout=60)

    try:
        agent = start(agent_args(), "agent")
        proxy = start(
            proxy_args(agent.address),
            "proxy",
            env={
                "AIPROXY_LIMITS__RATE_PER_S": str(RATE_PER_S),
                "AIPROXY_LIMITS__BURST": str(BURST),
                "AIPROXY_LIMITS__MAX_STREAMS_PER_CALLER": "100",
                # Long enough that no heartbeat precedes an error the agent answers at once.
                "AIPROXY_STREAM__HEARTBEAT_INTERVAL_S": "15",
                # Injected failures must not open it for the next test (its CircuitOpen
                # takes the same path as UPSTREAM_UNAVAILABLE: core.errors.to_grpc_status).
                "AIPROXY_BREAKER__ENABLED": "false",
            },
        )
        envoy = start(
            ["envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address, "--concurrency", "1"],
            "envoy",
        )
        yield {"agent": agent, "proxy": proxy, "envoy": envoy}
    finally:
        for proc in reversed(started):
            proc.cleanup()


def _retry_delay_s(status: dict[str, Any]) -> float:
    (retry,) = [d for d in status["details"] if d["@type"] == RETRY_INFO]
    text = retry["retryDelay"]
    assert text.endswith("s"), text
    return float(text[:-1])


def _reason(status: dict[str, Any]) -> str:
    return str(next(d for d in status["details"] if d["@type"] == ERROR_INFO)["reason"])


def _assert_retry_after_matches_retry_info(reply: Reply) -> float:
    assert reply.content_type == "application/json", reply.body
    delay = _retry_delay_s(reply.json())
    assert "retry-after" in reply.headers, (reply.status, reply.headers)
    # Integer seconds (RFC 9110 delay-seconds), the RetryInfo delay rounded up.
    assert reply.headers["retry-after"].isdigit(), reply.headers["retry-after"]
    assert int(reply.headers["retry-after"]) == math.ceil(delay), (reply.headers, delay)
    return delay


@pytest.mark.parametrize("path", [GENERATE, STREAM])
def test_rate_limited_429_carries_retry_after(stack: dict[str, ServiceProcess], path: str) -> None:
    edge = stack["envoy"].address
    source = "127.0.0.11" if path == GENERATE else "127.0.0.12"
    replies = [
        request(edge, "POST", path, {"prompt": "hi"}, source=source) for _ in range(BURST + 1)
    ]
    assert [r.status for r in replies[:BURST]] == [200] * BURST
    refused = replies[-1]
    assert refused.status == 429, refused.body
    assert _reason(refused.json()) == "RATE_LIMITED"
    delay = _assert_retry_after_matches_retry_info(refused)
    assert 0 < delay <= 1 / RATE_PER_S
    # Admitted answers are not retryable answers: no retry-after there.
    assert all("retry-after" not in r.headers for r in replies[:BURST])


@pytest.mark.parametrize(
    ("path", "extra", "source"),
    [
        (GENERATE, {}, "127.0.0.21"),
        (STREAM, {}, "127.0.0.22"),
        (STREAM, {"x-aiproxy-resumable": "1"}, "127.0.0.23"),
    ],
    ids=["unary", "stream", "resumable-stream"],
)
def test_upstream_failure_503_carries_retry_after(
    stack: dict[str, ServiceProcess], path: str, extra: dict[str, str], source: str
) -> None:
    edge = stack["envoy"].address
    reply = request(
        edge, "POST", path, {"prompt": "fail"},
        headers={"x-fault-code": "UNAVAILABLE", **extra}, source=source,
    )  # fmt: skip
    assert reply.status == 503, reply.body
    assert _reason(reply.json()) == "UPSTREAM_UNAVAILABLE"
    _assert_retry_after_matches_retry_info(reply)


def test_error_mid_stream_carries_retry_info_in_band_and_no_header(
    stack: dict[str, ServiceProcess],
) -> None:
    """After the first chunk the HTTP status (200) and headers have left: an SSE caller
    reads the delay from the final event's RetryInfo."""
    reply = request(
        stack["envoy"].address, "POST", STREAM, {"prompt": "fail later"},
        headers={"x-fault-code": "UNAVAILABLE", "x-fault-after": "2"}, source="127.0.0.31",
    )  # fmt: skip
    assert reply.status == 200 and "retry-after" not in reply.headers
    final = sse_events(reply.body)[-1]
    assert final["isFinal"] and final["finishReason"] == "FINISH_REASON_ERROR"
    assert _retry_delay_s(final["error"]) > 0


def test_cross_origin_fetch_may_read_retry_after(stack: dict[str, ServiceProcess]) -> None:
    """retry-after is not a CORS-safelisted response header: a front end on another
    origin reads it only if the edge exposes it (the default origins include
    http://localhost:3000)."""
    edge = stack["envoy"].address
    replies = [
        request(edge, "POST", GENERATE, {"prompt": "hi"}, source="127.0.0.51",
                headers={"origin": "http://localhost:3000"})
        for _ in range(BURST + 1)
    ]  # fmt: skip
    refused = replies[-1]
    assert refused.status == 429 and "retry-after" in refused.headers
    assert refused.headers["access-control-allow-origin"] == "http://localhost:3000"
    exposed = {h.strip() for h in refused.headers["access-control-expose-headers"].split(",")}
    assert "retry-after" in exposed, exposed


# ---- query strings as browsers encode them ---------------------------------------------------


PROMPTS = ["hello big world", "1+1 = 2 & more", "naïve café? 100%", "  spaced  "]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_url_search_params_encoding_reaches_the_agent_as_typed(
    stack: dict[str, ServiceProcess], prompt: str
) -> None:
    """urlencode(quote_via=quote_plus) is what URLSearchParams and HTML forms send: a
    space is `+`, a plus `%2B`. The agent is deterministic: the GET stream must answer
    exactly what a POST with the prompt in JSON answers (same text, same prompt tokens);
    before query_param_unescape_plus, "hello+big+world" counted 5 prompt tokens, not 3."""
    edge = stack["envoy"].address
    query = urllib.parse.urlencode({"prompt": prompt}, quote_via=urllib.parse.quote_plus)
    assert "+" in query or " " not in prompt
    source = f"127.0.2.{PROMPTS.index(prompt) + 1}"  # a bucket per prompt: 2 calls each
    got = request(edge, "GET", f"{STREAM}?{query}", source=source)
    want = request(edge, "POST", STREAM, {"prompt": prompt}, source=source)
    assert got.status == want.status == 200, (got.body, want.body)
    got_events, want_events = sse_events(got.body), sse_events(want.body)

    def text(events: list[dict[str, Any]]) -> str:
        return "".join(e["delta"] for e in events if not e["heartbeat"])

    assert got_events[-1]["usage"] == want_events[-1]["usage"]
    assert text(got_events) == text(want_events)
