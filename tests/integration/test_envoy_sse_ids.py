"""SSE event ids and resume headers through a real Envoy (the edge's aiproxy.sse_ids Lua).

With a real agent <- proxy <- Envoy: every event carries `id: <seq>` (its own seq), the
first event of a slow stream arrives at once (the filter does not buffer), and the resume
inputs a browser can send (Last-Event-ID, x-aiproxy-resume, ?resume=&last_event_id=) reach
the proxy as metadata (the agent behind it records what it receives). With a stand-in
upstream that makes a stream resumable (x-aiproxy-stream-id in its initial metadata, as
the proxy will): the id becomes `<stream id>:<seq>`, the stream id is a response header
(and exposed to CORS callers), and the EventSource reconnect's Last-Event-ID comes back
to the upstream as x-aiproxy-resume + last-event-id.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.streambuffer import new_stream_id
from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import OpenStream, request, sse_events, sse_ids
from tests.support.procs import ServiceProcess, aiproxy_argv, recorded_metadata

pytestmark = pytest.mark.envoy

TOKEN_DELAY_MS = 150
STREAM = "/api/v1/ai/generate/stream"


def envoy_argv(upstream: str) -> list[str]:
    return aiproxy_argv(
        "envoy", "--listen", "127.0.0.1:0", "--proxy", upstream, "--concurrency", "1",
        "--log-flush-ms", "50", "--cors-origin", "https://app.example.com",
        "--health-interval-s", "0.5",
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    record = tmp_path_factory.mktemp("sse-ids") / "agent-metadata.jsonl"
    started: list[ServiceProcess] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(argv, env=env, name=name)
        started.append(proc)
        return proc.start(timeout=60)

    try:
        agent = start(
            aiproxy_argv(
                *agent_args("--record-metadata", str(record), token_delay_ms=TOKEN_DELAY_MS)
            ),
            "agent",
        )
        proxy = start(
            aiproxy_argv(*proxy_args(agent.address)),
            "proxy",
            env={**GENEROUS_LIMITS, "AIPROXY_BREAKER__ENABLED": "false"},
        )
        envoy = start(envoy_argv(proxy.address), "envoy")
        yield {"edge": envoy.address, "record": record}
    finally:
        for proc in reversed(started):
            proc.cleanup()


def _calls_with(record: pathlib.Path, request_id: str, timeout: float = 10) -> dict[str, list]:
    """The metadata the agent received on the call with `request_id`."""
    deadline = time.monotonic() + timeout
    while True:
        for call in recorded_metadata(record):
            if request_id in call["metadata"].get("x-request-id", []):
                return call["metadata"]
        assert time.monotonic() < deadline, f"no call with x-request-id {request_id}"
        time.sleep(0.02)


# ---- a real agent behind a real proxy ------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_every_event_carries_its_seq_as_id(stack: dict[str, Any], method: str) -> None:
    if method == "POST":
        reply = request(
            stack["edge"], "POST", STREAM, {"prompt": "ids please", "options": {"maxTokens": 6}}
        )
    else:  # what EventSource sends
        reply = request(stack["edge"], "GET", f"{STREAM}?prompt=ids%20please&options.max_tokens=6")
    assert reply.status == 200 and reply.content_type == "text/event-stream"
    events = sse_events(reply.body)  # the whole body is id + data events, nothing else
    ids = sse_ids(reply.body)
    assert len(events) >= 3 and events[-1]["isFinal"]
    assert ids == [str(e["seq"]) for e in events]
    assert [e["seq"] for e in events] == list(range(len(events)))


def test_first_event_is_not_delayed_by_the_filter(stack: dict[str, Any]) -> None:
    """A ~2 s stream (150 ms per token): its first event must arrive long before its end."""
    start = time.monotonic()
    stream = OpenStream(
        stack["edge"], STREAM, {"prompt": "slow", "options": {"maxTokens": 14}}, timeout=60
    )
    try:
        arrivals: list[float] = []
        ids: list[str | None] = []
        for event in stream.events():
            arrivals.append(time.monotonic() - start)
            ids.append(stream.last_id)
            if event["isFinal"]:
                break
    finally:
        stream.close()
    assert len(arrivals) >= 10
    total = arrivals[-1]
    assert total >= 1.5  # the stream really was slow
    # Streamed, not buffered: the first event comes well before the end, and events are
    # spread over the stream's life rather than arriving together.
    print(f"\nfirst event {arrivals[0]:.3f} s, last {total:.3f} s, {len(arrivals)} events")
    assert arrivals[0] < total / 2, arrivals
    assert arrivals[len(arrivals) // 2] < total - 0.3, arrivals
    assert ids == [str(i) for i in range(len(ids))]


def test_resume_headers_and_query_reach_the_proxy_as_metadata(stack: dict[str, Any]) -> None:
    """Each way a browser can ask for a resume reaches the proxy, which now acts on it: a
    resumable stream (x-aiproxy-resumable: 1) replayed after the seq each form names, with
    no new generation at the agent."""
    edge, record = stack["edge"], stack["record"]
    body = {"prompt": "resume me", "options": {"maxTokens": 6}}
    first = request(edge, "POST", STREAM, body, headers={"x-aiproxy-resumable": "1"})
    assert first.status == 200
    sid = first.headers["x-aiproxy-stream-id"]
    n = len(sse_events(first.body))
    assert n >= 4
    generations = len(recorded_metadata(record))

    def seqs(reply: Any) -> list[int]:
        assert reply.status == 200, reply.body[:300]
        assert sse_ids(reply.body)[0].startswith(f"{sid}:")
        return [e["seq"] for e in sse_events(reply.body)]

    # Headers (fetch can set them): passed as they are.
    headers = {"x-aiproxy-resume": sid, "last-event-id": "1"}
    assert seqs(request(edge, "POST", STREAM, body, headers=headers)) == list(range(2, n))

    # EventSource's own reconnect: Last-Event-ID "<stream id>:<seq>", as the edge wrote it.
    headers = {"last-event-id": f"{sid}:2"}
    assert seqs(request(edge, "POST", STREAM, body, headers=headers)) == list(range(3, n))

    # A new EventSource after a drop: the query, moved into headers and off the path (the
    # transcoder would refuse the unknown parameters with 400).
    path = f"{STREAM}?prompt=resume%20me&resume={sid}&options.max_tokens=6&last_event_id=0"
    assert seqs(request(edge, "GET", path)) == list(range(1, n))
    assert len(recorded_metadata(record)) == generations  # replays: no upstream call

    # Garbage is dropped at the edge, not passed on (nor a 400: the proxy decides).
    rid = f"sse-bad-{time.monotonic_ns()}"
    reply = request(
        edge,
        "GET",
        f"{STREAM}?prompt=x&options.max_tokens=2&resume=..%2Fnot-an-id",
        headers={"x-request-id": rid, "last-event-id": "drop table", "x-aiproxy-resume": "sh0rt"},
    )
    assert reply.status == 200, reply.body[:300]
    seen = _calls_with(record, rid)
    assert "x-aiproxy-resume" not in seen and "last-event-id" not in seen


def test_proxy_only_headers_never_reach_the_agent(stack: dict[str, Any]) -> None:
    """The HTTP headers that steer the proxy (resume, cache-control, coalescing, any
    x-aiproxy-*) reach it through Envoy and are acted on, but the agent gets none of them;
    the caller's other headers still pass (core/headers.py)."""
    edge, record = stack["edge"], stack["record"]
    rid = f"sse-proxy-only-{time.monotonic_ns()}"
    headers = {
        "x-request-id": rid,
        "x-aiproxy-resumable": "1",
        "last-event-id": "2",  # no stream named: a new call
        "cache-control": "no-store",
        "x-aiproxy-coalesce-ms": "0",
        "x-aiproxy-some-future-knob": "1",
        "x-caller-note": "keep",
    }
    reply = request(edge, "POST", STREAM, {"prompt": "p", "options": {"maxTokens": 3}}, headers)
    assert reply.status == 200 and sse_events(reply.body)[-1]["isFinal"]
    assert reply.headers.get("x-aiproxy-stream-id")  # resumable: the header was acted on
    seen = _calls_with(record, rid)
    assert seen.get("x-caller-note") == ["keep"]
    leaked = sorted(
        k
        for k in seen
        if k.startswith("x-aiproxy-")
        or (k in headers and k not in ("x-request-id", "x-caller-note"))
    )
    assert leaked == [], f"forwarded to the agent: {leaked}"


def test_a_resumed_live_stream_always_ends_with_its_final_event(stack: dict[str, Any]) -> None:
    """Regression (issue 16): a stream dropped mid-way and resumed while the generation
    is still live must end with its final event, every time. The proxy's memory buffer
    once ended such a resume without it whenever the final chunk was appended while the
    resume was writing the previous one (about 1 resume in 2, through Envoy and over gRPC
    alike: the edge was not the cause). Bounded: 12 resumes of ~1 s answers."""
    edge = stack["edge"]
    body = {"prompt": "the last word", "options": {"maxTokens": 5}}
    whole = sse_events(request(edge, "POST", STREAM, body).body)
    text = "".join(e["delta"] for e in whole)
    deadline = time.monotonic() + 120
    missing = []
    for run in range(6):
        for keep in (1, 4):  # drop early (replay, then live tail) and near the end
            stream = OpenStream(edge, STREAM, body, headers={"x-aiproxy-resumable": "1"})
            try:
                sid = stream.resp.getheader("x-aiproxy-stream-id")
                assert sid, "the stream was not made resumable"
                seen = []
                for event in stream.events():
                    seen.append(event)
                    if len(seen) >= keep:
                        break
            finally:
                stream.close()
            last = seen[-1]["seq"]
            headers = {"x-aiproxy-resume": sid, "last-event-id": str(last)}
            reply = request(edge, "POST", STREAM, body, headers=headers)
            assert reply.status == 200, reply.body[:300]
            rest = sse_events(reply.body)
            assert [e["seq"] for e in rest] == list(range(last + 1, last + 1 + len(rest)))
            if not (rest and rest[-1]["isFinal"]):
                missing.append((run, keep, last, [e["seq"] for e in rest]))
                continue
            assert "".join(e["delta"] for e in seen + rest) == text
            assert rest[-1]["usage"] == whole[-1]["usage"]
        assert time.monotonic() < deadline, "the resumes took far too long"
    assert missing == [], f"resumes that ended without their final event: {missing}"


# ---- a stand-in upstream that makes the stream resumable -----------------------------------


class ResumableUpstream:
    """StreamGenerate that sends x-aiproxy-stream-id first (what the proxy will do for a
    resumable stream) and records the metadata of each call; grpc.health.v1 for Envoy."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.calls: list[dict[str, str]] = []

    async def stream_generate(
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        self.calls.append(
            {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        )
        await context.send_initial_metadata((("x-aiproxy-stream-id", self.stream_id),))
        for seq in range(4):
            yield pb.StreamGenerateResponse(delta=f"w{seq} ", seq=seq)
            await asyncio.sleep(0.05)
        yield pb.StreamGenerateResponse(
            is_final=True,
            seq=4,
            usage=pb.Usage(prompt_tokens=1, completion_tokens=4, total_tokens=5),
            finish_reason=pb.FINISH_REASON_STOP,
        )

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "ai.agent.v1.AgentService",
            {
                "StreamGenerate": grpc.unary_stream_rpc_method_handler(
                    self.stream_generate,
                    request_deserializer=pb.StreamGenerateRequest.FromString,
                    response_serializer=pb.StreamGenerateResponse.SerializeToString,
                )
            },
        )


async def test_resumable_stream_ids_carry_the_stream_id_and_come_back() -> None:
    sid = new_stream_id()
    upstream = ResumableUpstream(sid)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((upstream.handler(),))
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("ai.agent.v1.AgentService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    envoy = ServiceProcess(envoy_argv(f"127.0.0.1:{port}"), name="envoy")
    try:
        # Blocking helpers run in threads: this loop serves the upstream meanwhile.
        await asyncio.to_thread(envoy.start, 60)
        edge = envoy.address
        body = {"prompt": "p", "options": {"maxTokens": 4}}
        reply = await asyncio.to_thread(
            request, edge, "POST", STREAM, body, {"origin": "https://app.example.com"}
        )
        assert reply.status == 200
        assert reply.headers.get("x-aiproxy-stream-id") == sid
        exposed = reply.headers.get("access-control-expose-headers", "")
        assert "x-aiproxy-stream-id" in exposed and "x-aiproxy-cache" in exposed
        events = sse_events(reply.body)
        assert sse_ids(reply.body) == [f"{sid}:{e['seq']}" for e in events]
        assert events[-1]["isFinal"] and events[-1]["usage"]["totalTokens"] == 5

        # The browser reconnects with the last id it saw: the upstream gets both halves.
        reply = await asyncio.to_thread(
            request, edge, "GET", f"{STREAM}?prompt=p", None, {"last-event-id": f"{sid}:2"}
        )
        assert reply.status == 200
        last = upstream.calls[-1]
        assert last["x-aiproxy-resume"] == sid and last["last-event-id"] == "2"

        # CORS preflight: a front end on another origin may send the resume headers.
        reply = await asyncio.to_thread(
            request,
            edge,
            "OPTIONS",
            STREAM,
            None,
            {
                "origin": "https://app.example.com",
                "access-control-request-method": "POST",
                "access-control-request-headers": "x-aiproxy-resume, last-event-id, cache-control",
            },
        )
        allowed = reply.headers.get("access-control-allow-headers", "")
        wanted = ("x-aiproxy-resume", "x-aiproxy-cancel", "last-event-id", "cache-control")
        assert all(h in allowed for h in wanted), allowed
    finally:
        await asyncio.to_thread(envoy.cleanup)
        await server.stop(None)


def test_sse_helper_accepts_only_edge_framing() -> None:
    """The test helper stays strict: id lines are allowed, anything else is not."""
    body = b'id: 0\ndata: {"seq":0}\n\nid: abc:1\ndata: {"seq":1}\n\n'
    assert sse_events(body) == [{"seq": 0}, {"seq": 1}]
    assert sse_ids(body) == ["0", "abc:1"]
    with pytest.raises(AssertionError):
        sse_events(b'event: x\ndata: {"seq":0}\n\n')
    assert json.loads(b'{"seq":0}') == {"seq": 0}
