"""HTTP through a real Envoy: agent <- proxy <- `aiproxy envoy` <- http.client.

Every route's JSON, the exact SSE framing of streams, errors before the first chunk
(HTTP status + google.rpc.Status body) and after it (an in-band final chunk), CORS,
request validation, heartbeats, client disconnects, the access log, gRPC through Envoy.
One stack serves the whole module (start-up is the slow part); every test uses its own
request ids, and the proxy's breaker is off so injected failures cannot leak into the
next test.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from aiproxy.agent.textgen import count_tokens
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import OpenStream, access_logs, request, sse_events, wait_access_log
from tests.support.grpc_helpers import SERVING, health_status, stub
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = pytest.mark.envoy

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
# Short enough that the heartbeat test is quick, long enough that an error the agent
# answers at once is never preceded by a heartbeat on a loaded CI box (a heartbeat is a
# first chunk: the error would then travel in-band, not as the HTTP status tested here).
HEARTBEAT_S = 1.0


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(
        argv: list[str], name: str, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), env=env, name=name)
        started.append(proc)
        return proc.start(timeout=timeout)

    try:
        agent = start(agent_args(), "agent")
        proxy = start(
            proxy_args(agent.address),
            "proxy",
            env={
                **GENEROUS_LIMITS,
                "AIPROXY_BREAKER__ENABLED": "false",
                "AIPROXY_STREAM__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            },
        )
        envoy = start(
            ["envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address, "--concurrency", "1", "--log-flush-ms", "50",
             "--cors-origin", "https://app.example.com", "--health-interval-s", "0.5"],
            "envoy",
        )  # fmt: skip
        yield {"agent": agent, "proxy": proxy, "envoy": envoy}
    finally:
        for proc in reversed(started):
            proc.cleanup()


@pytest.fixture
def edge(stack: dict[str, ServiceProcess]) -> str:
    return stack["envoy"].address


def _rid(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


# ---- start-up ------------------------------------------------------------------------------


def test_ready_line_names_the_bound_port_and_a_loopback_admin(
    stack: dict[str, ServiceProcess],
) -> None:
    ready = stack["envoy"].ready
    assert ready["service"] == "envoy"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", ready["address"]) and not ready["address"].endswith(
        ":0"
    )
    assert ready["admin"].startswith("127.0.0.1:")
    started = stack["envoy"].log_events("envoy_ready")
    assert started and started[0]["healthy_proxies"] == 1


def test_healthz_and_the_page(edge: str) -> None:
    assert request(edge, "GET", "/healthz").status == 200
    page = request(edge, "GET", "/")
    assert page.status == 200 and page.content_type.startswith("text/html")
    assert b"/api/v1/ai/generate/stream" in page.body and b"EventSource" in page.body


# ---- every route -----------------------------------------------------------------------------

UNARY_ROUTES: list[tuple[str, dict[str, Any], set[str]]] = [
    ("/api/v1/ai/generate", {"prompt": "Explain circuit breakers", "options": {"maxTokens": 12}}, {"text", "model", "usage", "finishReason"}),
    ("/api/v1/ai/chat", {"sessionId": "http-chat", "messages": [{"role": "CHAT_ROLE_SYSTEM", "content": "Be terse."}, {"role": "CHAT_ROLE_USER", "content": "What is backpressure?"}]}, {"sessionId", "message", "model", "usage", "finishReason"}),
    ("/api/v1/ai/rag/search", {"query": "circuit breaker half-open", "topK": 2}, {"sources"}),
    ("/api/v1/ai/agents/execute", {"agentType": "AGENT_TYPE_ANALYSIS", "task": "What is 12*7?", "tools": ["calculator"]}, {"result", "toolCalls", "status", "reasoningSteps", "usage", "model"}),
    ("/api/v1/ai/generate/batch", {"prompts": ["one", "two"], "options": {"maxTokens": 4}}, {"results", "model", "succeeded", "failed", "usage"}),
    ("/api/v1/ai/sessions", {}, {"sessionId"}),
]  # fmt: skip
# The routes of one session (GET and DELETE): tests/integration/test_sessions.py.
SESSION_ROUTES = {("GET", "/api/v1/ai/sessions/{session_id}"), ("DELETE", "/api/v1/ai/sessions/{session_id}")}  # fmt: skip

STREAM_ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/api/v1/ai/generate/stream", {"prompt": "Stream a haiku about queues", "options": {"maxTokens": 12}}),
    ("/api/v1/ai/chat/stream", {"sessionId": "http-stream", "userMessage": "What is backpressure?", "options": {"maxTokens": 12}}),
    ("/api/v1/ai/rag/generate/stream", {"query": "how does envoy transcode grpc", "topK": 2, "options": {"maxTokens": 12}}),
    ("/api/v1/ai/agents/execute/stream", {"agentType": "AGENT_TYPE_ASSISTANT", "task": "Count words in hello big world", "tools": ["word_count"]}),
]  # fmt: skip


def test_every_http_route_is_a_method_of_the_service() -> None:
    """The lists above must follow the proto's google.api.http annotations."""
    from google.api import annotations_pb2

    paths, others = set(), set()
    for method in pb.DESCRIPTOR.services_by_name["AgentService"].methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        if rule.post:
            paths.add(rule.post)
        else:
            verb = rule.WhichOneof("pattern")
            others.add((verb.upper(), getattr(rule, verb)))
    assert paths == {p for p, _, _ in UNARY_ROUTES} | {p for p, _ in STREAM_ROUTES}
    assert others == SESSION_ROUTES


@pytest.mark.parametrize(("path", "body", "fields"), UNARY_ROUTES, ids=[r[0] for r in UNARY_ROUTES])
def test_unary_routes_answer_json(
    edge: str, path: str, body: dict[str, Any], fields: set[str]
) -> None:
    rid = _rid("unary")
    reply = request(edge, "POST", path, body, headers={"x-request-id": rid})
    assert reply.status == 200, reply.body
    assert reply.content_type == "application/json"
    # The reply metadata are response headers for HTTP callers (the edge asks the proxy
    # for them first: x-aiproxy-reply-headers), not HTTP trailers they could not read.
    assert reply.headers["x-request-id"] == rid
    assert int(reply.headers["x-ratelimit-limit"]) > 0
    doc = reply.json()
    assert fields <= doc.keys(), doc
    if path == "/api/v1/ai/generate/batch":
        assert doc["succeeded"] == 2 and doc["failed"] == 0  # zero values are printed too
    if path == "/api/v1/ai/rag/search":
        assert (
            1 <= len(doc["sources"]) <= 2
            and {"id", "title", "snippet", "score"} <= doc["sources"][0].keys()
        )


@pytest.mark.parametrize(("path", "body"), STREAM_ROUTES, ids=[r[0] for r in STREAM_ROUTES])
def test_stream_routes_are_exact_sse(edge: str, path: str, body: dict[str, Any]) -> None:
    reply = request(edge, "POST", path, body)
    assert reply.status == 200
    assert reply.content_type == "text/event-stream"
    events = [e for e in sse_events(reply.body) if not e["heartbeat"]]  # framing checked on all
    assert len(events) >= 3
    assert [e["isFinal"] for e in events] == [False] * (len(events) - 1) + [True]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    final = events[-1]
    assert (
        final["finishReason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
        and "error" not in final
    )
    assert final["usage"]["totalTokens"] > 0
    assert "".join(e["delta"] for e in events).strip()


def test_get_binding_streams_with_query_parameters(edge: str) -> None:
    """What EventSource uses: GET with the request's fields as query parameters."""
    reply = request(
        edge,
        "GET",
        "/api/v1/ai/chat/stream?session_id=http-get&user_message=Hello%20there&options.max_tokens=5",
    )
    assert reply.status == 200 and reply.content_type == "text/event-stream"
    events = sse_events(reply.body)
    assert events[0]["sessionId"] == "http-get"
    assert events[-1]["isFinal"] and events[-1]["usage"]["completionTokens"] == 5


# ---- errors --------------------------------------------------------------------------------------

# Injected upstream code -> (HTTP status, gRPC code in the body, ErrorInfo reason).
FAULTS = [
    ("UNAVAILABLE", 503, 14, "UPSTREAM_UNAVAILABLE"),
    ("RESOURCE_EXHAUSTED", 429, 8, "UPSTREAM_ERROR"),
    ("DEADLINE_EXCEEDED", 504, 4, None),
    ("INVALID_ARGUMENT", 400, 3, "INVALID_ARGUMENT"),
    ("PERMISSION_DENIED", 403, 7, "PERMISSION_DENIED"),
    ("NOT_FOUND", 404, 5, "UPSTREAM_ERROR"),
    ("INTERNAL", 500, 13, "UPSTREAM_ERROR"),
]


@pytest.mark.parametrize("path", ["/api/v1/ai/generate", "/api/v1/ai/generate/stream"])
@pytest.mark.parametrize(
    ("fault", "http_status", "code", "reason"), FAULTS, ids=[f[0] for f in FAULTS]
)
def test_error_before_the_first_chunk_is_an_http_status_with_a_status_body(
    edge: str, path: str, fault: str, http_status: int, code: int, reason: str | None
) -> None:
    reply = request(edge, "POST", path, {"prompt": "fail"}, headers={"x-fault-code": fault})
    assert reply.status == http_status, reply.body
    assert reply.content_type == "application/json"
    status = reply.json()
    assert status["code"] == code and status["message"]
    info = next(d for d in status["details"] if d["@type"] == ERROR_INFO)
    assert info["domain"] == "aiproxy.ai.agent.v1"
    if reason:
        assert info["reason"] == reason


def test_callers_deadline_through_http_is_a_504(edge: str) -> None:
    """A grpc-timeout header from an HTTP caller becomes the proxy's deadline.

    (Unary: on a stream, the heartbeats this stack sends every HEARTBEAT_S would count as
    chunks, and the error would travel in-band.)
    """
    reply = request(
        edge, "POST", "/api/v1/ai/generate", {"prompt": "slow"},
        headers={"grpc-timeout": "300m", "x-fault-delay-ms": "5000"},
    )  # fmt: skip
    assert reply.status == 504
    status = reply.json()
    assert status["code"] == 4 and status["message"]
    # When the caller's own deadline fires, gRPC's core may answer before the proxy can
    # (no ErrorInfo then); when the proxy answers, the reason is DEADLINE_EXCEEDED.
    infos = [d for d in status["details"] if d["@type"] == ERROR_INFO]
    assert all(i["reason"] == "DEADLINE_EXCEEDED" for i in infos)


@pytest.mark.parametrize("path", [p for p, _ in STREAM_ROUTES[:2]])
def test_error_mid_stream_is_an_in_band_final_event(edge: str, path: str) -> None:
    body = dict(STREAM_ROUTES[[p for p, _ in STREAM_ROUTES].index(path)][1])
    reply = request(
        edge, "POST", path, body, headers={"x-fault-code": "UNAVAILABLE", "x-fault-after": "3"}
    )
    assert reply.status == 200  # the status line left long ago; the error is in the body
    events = [e for e in sse_events(reply.body) if not e["heartbeat"]]
    *text, final = events
    # Three tokens came first; the proxy may have merged some of them into one chunk
    # (coalescing behind a slower reader), never dropped or reordered them.
    assert 1 <= len(text) <= 3 and all(e["delta"] and not e["isFinal"] for e in text)
    assert count_tokens("".join(e["delta"] for e in text)) == 3
    assert (
        final["isFinal"] and final["finishReason"] == "FINISH_REASON_ERROR" and final["delta"] == ""
    )
    assert final["error"]["code"] == 14
    assert (
        next(d for d in final["error"]["details"] if d["@type"] == ERROR_INFO)["reason"]
        == "UPSTREAM_UNAVAILABLE"
    )


def test_unknown_path_is_404_json(edge: str) -> None:
    for method, path in (("POST", "/api/v1/ai/nope"), ("GET", "/nothing/here")):
        reply = request(edge, method, path, {} if method == "POST" else None)
        assert reply.status == 404, (method, path, reply.body)
        assert reply.content_type == "application/json" and reply.json()["code"] == 5
        assert reply.json()["details"][0]["reason"] == "NOT_FOUND"


def test_a_known_path_with_another_method_is_405_with_allow(edge: str) -> None:
    for method, path, allow in (("GET", "/api/v1/ai/generate", "POST, OPTIONS"), ("PUT", "/api/v1/ai/chat", "POST, OPTIONS"),
                                ("DELETE", "/api/v1/ai/chat/stream", "GET, POST, OPTIONS")):  # fmt: skip
        reply = request(edge, method, path, None)
        assert reply.status == 405 and reply.headers["allow"] == allow, (
            method,
            path,
            reply.headers,
        )
        assert (
            reply.json()["code"] == 12
            and reply.json()["details"][0]["reason"] == "METHOD_NOT_ALLOWED"
        )


def test_unknown_query_parameter_is_400(edge: str) -> None:
    reply = request(edge, "GET", "/api/v1/ai/generate/stream?prompt=x&bogus=1")
    assert reply.status == 400 and reply.json()["code"] == 3 and "bogus" in reply.json()["message"]


@pytest.mark.parametrize(
    "body", [b'{"prompt":', b'{"prompt": 5}', b'{"nosuchfield": "x"}', b"not json"]
)
def test_malformed_json_is_400(edge: str, body: bytes) -> None:
    reply = request(edge, "POST", "/api/v1/ai/generate", body)
    assert reply.status == 400, reply.body
    assert reply.json()["code"] == 3


def test_proxy_admin_rpc_is_not_exposed(edge: str) -> None:
    reply = request(
        edge,
        "POST",
        "/ai.proxy.v1.ProxyAdminService/ListEndpoints",
        b"",
        headers={"content-type": "application/grpc", "te": "trailers"},
    )
    # Envoy answers a gRPC request's local reply the gRPC way: 403 -> PERMISSION_DENIED.
    assert reply.headers["grpc-status"] == "7" and "edge" in reply.headers["grpc-message"]


# ---- CORS --------------------------------------------------------------------------------------


def test_cors_preflight_allows_the_configured_origin_and_headers(edge: str) -> None:
    reply = request(
        edge, "OPTIONS", "/api/v1/ai/generate/stream",
        headers={
            "origin": "https://app.example.com",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-request-id, last-event-id",
        },
    )  # fmt: skip
    assert reply.status == 200
    assert reply.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "POST" in reply.headers["access-control-allow-methods"]
    allowed = {h.strip() for h in reply.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-request-id", "last-event-id"} <= allowed
    assert "x-request-id" in reply.headers["access-control-expose-headers"]


def test_cors_refuses_other_origins(edge: str) -> None:
    preflight = request(
        edge, "OPTIONS", "/api/v1/ai/generate",
        headers={"origin": "https://evil.example.com", "access-control-request-method": "POST"},
    )  # fmt: skip
    assert "access-control-allow-origin" not in preflight.headers
    simple = request(
        edge,
        "POST",
        "/api/v1/ai/generate",
        {"prompt": "x", "options": {"maxTokens": 1}},
        headers={"origin": "https://evil.example.com"},
    )
    assert "access-control-allow-origin" not in simple.headers
    allowed = request(
        edge,
        "POST",
        "/api/v1/ai/generate",
        {"prompt": "x", "options": {"maxTokens": 1}},
        headers={"origin": "https://app.example.com"},
    )
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"


# ---- streams over time -------------------------------------------------------------------------


def test_heartbeats_reach_the_browser_while_the_upstream_is_quiet(edge: str) -> None:
    """The proxy's heartbeat chunks (every HEARTBEAT_S in this stack) come through as events."""
    reply = request(
        edge, "POST", "/api/v1/ai/generate/stream", {"prompt": "think first", "options": {"maxTokens": 3}},
        headers={"x-fault-delay-ms": str(int(HEARTBEAT_S * 1000 * 4))},
    )  # fmt: skip
    events = sse_events(reply.body)
    beats = [e for e in events if e["heartbeat"]]
    assert len(beats) >= 2
    assert all(e["delta"] == "" and not e["isFinal"] for e in beats)
    assert events[-1]["isFinal"] and not events[-1]["heartbeat"]


def test_client_disconnect_cancels_the_upstream_work(
    edge: str, stack: dict[str, ServiceProcess]
) -> None:
    rid = _rid("disconnect")
    stream = OpenStream(
        edge, "/api/v1/ai/generate/stream", {"prompt": "a long answer", "options": {"maxTokens": 200}},
        headers={"x-request-id": rid, "x-fault-slow-ms": "100"},
    )  # fmt: skip
    try:
        first = next(stream.events())
        assert first["delta"] and not first["isFinal"]
    finally:
        stream.close()
    finished = stack["agent"].wait_for_log(
        lambda e: e.get("event") == "call_finished" and e.get("request_id") == rid, timeout=10
    )
    assert finished["cancelled"] is True and finished["code"] == "CANCELLED"
    assert finished["chunks"] < 200


def test_access_log_has_request_status_duration_and_stream_usage(
    edge: str, stack: dict[str, ServiceProcess]
) -> None:
    envoy = stack["envoy"]
    ok_id, err_id = _rid("log-ok"), _rid("log-err")
    events = sse_events(
        request(
            edge,
            "POST",
            "/api/v1/ai/generate/stream",
            {"prompt": "count", "options": {"maxTokens": 7}},
            headers={"x-request-id": ok_id},
        ).body
    )
    usage = events[-1]["usage"]
    line = wait_access_log(envoy, ok_id)
    assert line["method"] == "POST" and line["path"] == "/api/v1/ai/generate/stream"
    assert line["grpc_method"] == "/ai.agent.v1.AgentService/StreamGenerate"
    assert line["http_status"] == 200 and line["grpc_status"] == "OK"
    assert isinstance(line["duration_ms"], int) and line["upstream_host"] == stack["proxy"].address
    assert (
        line["usage_total_tokens"] == usage["totalTokens"] and line["usage_completion_tokens"] == 7
    )
    assert line["model"] == events[0]["model"]

    request(
        edge,
        "POST",
        "/api/v1/ai/generate",
        {"prompt": "x"},
        headers={"x-request-id": err_id, "x-fault-code": "RESOURCE_EXHAUSTED"},
    )
    line = wait_access_log(envoy, err_id)
    # The transcoder turned the error into HTTP 429 (which Envoy's %GRPC_STATUS% reads
    # back as Unavailable); grpc_code keeps the code the proxy answered with.
    assert line["http_status"] == 429 and line["grpc_code"] == 8
    assert len(access_logs(envoy, err_id)) == 1


# ---- gRPC through Envoy ------------------------------------------------------------------------


async def test_grpc_clients_come_in_through_envoy_too(edge: str) -> None:
    async with grpc.aio.insecure_channel(edge) as channel:
        assert await health_status(channel, "ai.agent.v1.AgentService") == SERVING
        chunks = [
            c
            async for c in stub(channel).StreamGenerate(
                pb.StreamGenerateRequest(prompt="hi", options=pb.GenerationOptions(max_tokens=4)),
                timeout=30,
            )
        ]
        assert chunks[-1].is_final and chunks[-1].usage.completion_tokens == 4
        assert count_tokens("".join(c.delta for c in chunks)) == 4
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub(channel).Generate(
                pb.GenerateRequest(prompt="x"),
                metadata=(("x-fault-code", "UNAVAILABLE"),),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A native caller's unary reply metadata come in the trailers, through the edge
        # as directly (the edge asks for them first only for its HTTP-side protocols).
        call = stub(channel).Generate(pb.GenerateRequest(prompt="x"), timeout=30)
        await call
        trailers = dict(await call.trailing_metadata())
        assert trailers["x-request-id"] and int(trailers["x-ratelimit-limit"]) > 0
        assert "x-ratelimit-limit" not in dict(await call.initial_metadata())


def test_no_request_failed_at_the_edge_itself(stack: dict[str, ServiceProcess]) -> None:
    """Nothing in this module should have met Envoy's own failures (UF, UH, URX...)."""
    flags = {e["response_flags"] for e in access_logs(stack["envoy"])}
    assert flags <= {"-", "DC", "DPE", "NR"}, flags
