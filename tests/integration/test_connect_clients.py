"""gRPC-Web and Connect through the edge, with clients nobody here wrote.

`@connectrpc/connect-node` (tests/integration/connect_clients.cjs, run with node) calls every
AgentService method, unary and streaming, through `aiproxy envoy` over HTTP/1.1 with its
gRPC-Web transport and its Connect transport (binary codec), a few calls over HTTP/2 too,
and reads errors as its own ConnectError with the ErrorInfo and RetryInfo decoded: before
any answer, in the middle of a stream, from the edge's guard, at the caller's deadline. The other tests here pin the wire
format those clients rely on (gRPC-Web's text mode and trailer frame, Connect's JSON error
and end-of-stream message, CORS), with the standard library as the client.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from google.rpc import error_details_pb2, status_pb2

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import request, wait_access_log
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = pytest.mark.envoy

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_SCRIPT = pathlib.Path(__file__).with_name("connect_clients.cjs")
NODE_MODULES = ROOT / "build" / "tools" / "node_modules"
DESCRIPTORS = ROOT / "build" / "descriptors" / "aiproxy.pb"
GENERATE = "/ai.agent.v1.AgentService/Generate"
STREAM = "/ai.agent.v1.AgentService/StreamGenerate"
METHODS = ("generate", "streamGenerate", "chat", "streamChat", "searchRag",
           "streamRagGenerate", "executeAgent", "streamExecuteAgent", "batchGenerate")  # fmt: skip
ORIGIN = "http://localhost:3000"  # one of the edge's default CORS origins


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), env=env, name=name)
        started.append(proc)
        return proc.start(timeout=60)

    try:
        agent = start(agent_args(), "agent")
        proxy = start(proxy_args(agent.address), "proxy", env=GENEROUS_LIMITS)
        envoy = start(
            ["envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address, "--concurrency", "1"],
            "envoy",
        )
        yield {"agent": agent, "proxy": proxy, "envoy": envoy}
    finally:
        for proc in reversed(started):
            proc.cleanup()


@pytest.fixture(scope="module")
def edge(stack: dict[str, ServiceProcess]) -> str:
    return stack["envoy"].address


# ---- @connectrpc/connect-node ---------------------------------------------------------------


def _node() -> str:
    node = shutil.which("node")
    ready = node and (NODE_MODULES / "@connectrpc" / "connect-node" / "package.json").is_file()
    if not ready:
        message = "node or @connectrpc/connect-node missing: `make node-deps` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert node
    return node


@pytest.fixture(scope="module")
def report(edge: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "BASE_URL": f"http://{edge}",
        "DESCRIPTORS": str(DESCRIPTORS),
        "NODE_PATH": str(NODE_MODULES),
    }
    done = subprocess.run(
        [_node(), str(NODE_SCRIPT)], env=env, capture_output=True, text=True, timeout=180,
        cwd=str(NODE_MODULES.parent),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("transport", ["grpcWeb", "connect"])
def test_every_method_unary_and_streaming(report: dict[str, Any], transport: str) -> None:
    methods = report[transport]["methods"]
    assert sorted(methods) == sorted(METHODS)
    for name, outcome in methods.items():
        assert "ok" in outcome, (name, outcome)
        ok = outcome["ok"]
        if name.startswith("stream"):
            assert ok["kind"] == "server_streaming" and ok["chunks"] >= 2, (name, ok)
            assert ok["finalLast"] and ok["text"], (name, ok)
        else:
            assert ok["kind"] == "unary" and ok["reply"].startswith("ai.agent.v1."), (name, ok)
    assert methods["generate"]["ok"]["text"]


@pytest.mark.parametrize("transport", ["grpcWeb", "connect"])
def test_errors_with_their_details(report: dict[str, Any], transport: str) -> None:
    errors = report[transport]["errors"]
    for case in ("unary", "streamBeforeFirst"):
        error = errors[case]["error"]
        assert error["code"] == "Unavailable", (case, error)
        assert error["reasons"] == ["UPSTREAM_UNAVAILABLE"] and error["retryDelayS"] == [1], error
    mid = errors["midStream"]
    assert mid["error"]["code"] == "ResourceExhausted" and mid["error"]["reasons"], mid
    # Two chunks, then the proxy's in-band final chunk with the error, then the status.
    assert mid["chunks"] == 3 and mid["inBand"]["code"] == 8, mid
    for case in ("guardUnary", "guardStream"):
        error = errors[case]["error"]
        assert error["code"] == "InvalidArgument" and error["reasons"] == ["INVALID_ARGUMENT"], (
            error
        )
        assert "binary header" in error["message"], error
    deadline = errors["deadline"]["error"]
    assert deadline["code"] == "DeadlineExceeded", deadline


@pytest.mark.parametrize("transport", ["grpcWeb", "connect"])
def test_over_http2_too(report: dict[str, Any], transport: str) -> None:
    calls = report["http2"][transport]
    assert calls["unary"]["ok"]["text"] and calls["stream"]["ok"]["finalLast"], calls
    assert calls["error"]["error"]["reasons"] == ["UPSTREAM_UNAVAILABLE"], calls


def test_connect_json_codec_is_refused_clearly(report: dict[str, Any]) -> None:
    error = report["connectJson"]["error"]
    assert error["code"] == "Unimplemented" and error["reasons"] == ["UNSUPPORTED_MEDIA_TYPE"]
    assert "binary codec" in error["message"]


# ---- the wire format, with the standard library ---------------------------------------------


def _envelope(message: Any, flags: int = 0) -> bytes:
    raw = message if isinstance(message, bytes) else message.SerializeToString()
    return bytes([flags]) + struct.pack(">I", len(raw)) + raw


def _frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, pos = [], 0
    while pos < len(body):
        (length,) = struct.unpack(">I", body[pos + 1 : pos + 5])
        frames.append((body[pos], body[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    assert pos == len(body), "a truncated frame"
    return frames


def _reasons(status: status_pb2.Status) -> list[str]:
    out = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            out.append(info.reason)
    return out


def _unbase64_text(body: bytes) -> bytes:
    """A grpc-web-text body: each frame base64 on its own, padded, one after the other;
    every group of 4 characters decodes on its own."""
    assert len(body) % 4 == 0, body[-20:]
    return b"".join(base64.b64decode(body[i : i + 4]) for i in range(0, len(body), 4))


def test_grpc_web_text_mode_and_trailer_frame(edge: str) -> None:
    """application/grpc-web-text (base64 both ways, what browsers without binary streaming
    use): the chunks, then the trailer frame (flag 0x80) with grpc-status, and for an error
    grpc-status-details-bin with the ErrorInfo."""
    body = base64.b64encode(_envelope(pb.StreamGenerateRequest(prompt="hello")))
    headers = {"content-type": "application/grpc-web-text", "accept": "application/grpc-web-text"}
    reply = request(edge, "POST", STREAM, body, headers=headers)
    assert reply.status == 200 and reply.content_type == "application/grpc-web-text+proto"
    frames = _frames(_unbase64_text(reply.body))
    chunks = [pb.StreamGenerateResponse.FromString(f) for flag, f in frames if flag == 0]
    assert chunks and chunks[-1].is_final, chunks[-1:]
    assert frames[-1][0] == 0x80 and b"grpc-status:0" in frames[-1][1], frames[-1]

    failing = {**headers, "x-fault-code": "UNAVAILABLE", "x-fault-after": "1"}
    reply = request(edge, "POST", STREAM, body, headers=failing)
    trailer = dict(
        line.split(":", 1)
        for line in _frames(_unbase64_text(reply.body))[-1][1].decode().split("\r\n")
        if line
    )
    assert trailer["grpc-status"] == "14", trailer
    details = trailer["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(base64.b64decode(details + "=" * (-len(details) % 4)))
    assert status.code == 14 and "UPSTREAM_UNAVAILABLE" in _reasons(status), status


def _connect_details(error: dict[str, Any]) -> dict[str, bytes]:
    return {
        d["type"]: base64.b64decode(d["value"] + "=" * (-len(d["value"]) % 4))
        for d in error["details"]
    }


def test_connect_error_json_and_end_of_stream(edge: str) -> None:
    """Connect's own shapes: a unary error is an HTTP status with {"code": "unavailable",
    "message", "details": [{"type": "google.rpc.ErrorInfo", "value": <base64>}]}; a stream's
    error is its end-of-stream message (flag 2) {"error": {...}, "metadata": {...}}."""
    headers = {"content-type": "application/proto", "connect-protocol-version": "1",
               "x-fault-code": "UNAVAILABLE"}  # fmt: skip
    message = pb.GenerateRequest(prompt="p").SerializeToString()
    reply = request(edge, "POST", GENERATE, message, headers=headers)
    assert reply.status == 503 and reply.content_type == "application/json", reply
    assert reply.headers.get("retry-after") == "1"
    assert not any(k.startswith("grpc-") for k in reply.headers), reply.headers
    error = reply.json()
    assert error["code"] == "unavailable" and error["message"] == "upstream unavailable", error
    details = _connect_details(error)
    info = error_details_pb2.ErrorInfo.FromString(details["google.rpc.ErrorInfo"])
    assert info.reason == "UPSTREAM_UNAVAILABLE", info
    assert "google.rpc.RetryInfo" in details

    stream_headers = {**headers, "content-type": "application/connect+proto", "x-fault-after": "2"}
    body = _envelope(pb.StreamGenerateRequest(prompt="p"))
    reply = request(edge, "POST", STREAM, body, headers=stream_headers)
    assert reply.status == 200 and reply.content_type == "application/connect+proto", reply
    frames = _frames(reply.body)
    assert [flag for flag, _ in frames] == [0, 0, 0, 2], frames
    end = json.loads(frames[-1][1])
    assert end["error"]["code"] == "unavailable" and "metadata" in end, end
    info = error_details_pb2.ErrorInfo.FromString(
        _connect_details(end["error"])["google.rpc.ErrorInfo"]
    )
    assert info.reason == "UPSTREAM_UNAVAILABLE", info


def test_the_guard_answers_in_the_callers_protocol(edge: str) -> None:
    """The edge's guard runs for these callers too (they reach the proxy as gRPC): a header
    grpc-core could not parse, a malformed connect-timeout-ms, a non-POST gRPC-Web call and
    a Connect GET are refused in the caller's own protocol, never passed on."""
    message = pb.GenerateRequest(prompt="p").SerializeToString()
    connect = {"content-type": "application/proto", "connect-protocol-version": "1"}
    for bad in ({"x-trace-bin": "A"}, {"connect-timeout-ms": "12345678901"}):
        reply = request(edge, "POST", GENERATE, message, headers={**connect, **bad})
        assert reply.status == 400 and reply.json()["code"] == "invalid_argument", reply
    web = {"content-type": "application/grpc-web+proto"}
    for method, extra in (("POST", {"x-trace-bin": "A"}), ("PUT", {})):
        reply = request(edge, method, GENERATE, _envelope(message), headers={**web, **extra})
        assert reply.status == 200 and reply.headers.get("grpc-status") == "3", reply
        status = status_pb2.Status.FromString(
            base64.b64decode(reply.headers["grpc-status-details-bin"] + "==")
        )
        assert _reasons(status) == ["INVALID_ARGUMENT"], status
    # A gRPC-Web call that also says connect-protocol-version stays a gRPC-Web call.
    mixed = {**web, "connect-protocol-version": "1"}
    reply = request(edge, "POST", GENERATE, _envelope(message), headers=mixed)
    assert reply.status == 200 and _frames(reply.body)[-1][1].startswith(b"grpc-status:0"), reply
    # Connect GET (which Envoy's bridge would take): for methods free of side effects only.
    query = (
        "?connect=v1&encoding=proto&base64=1&message=" + base64.urlsafe_b64encode(message).decode()
    )
    reply = request(edge, "GET", GENERATE + query)
    assert reply.status == 405 and reply.json()["code"] == "unimplemented", reply
    ok = request(
        edge, "POST", GENERATE, message, headers={**connect, "connect-timeout-ms": "30000"}
    )
    assert ok.status == 200 and pb.GenerateResponse.FromString(ok.body).text


def test_cors_for_grpc_web_and_connect_clients(edge: str) -> None:
    asked = "content-type, x-grpc-web, x-user-agent, connect-protocol-version, connect-timeout-ms"
    preflight = request(
        edge, "OPTIONS", GENERATE, headers={
            "origin": ORIGIN, "access-control-request-method": "POST",
            "access-control-request-headers": asked,
        },
    )  # fmt: skip
    assert preflight.status == 200, preflight
    allowed = preflight.headers.get("access-control-allow-headers", "")
    for header in asked.split(", "):
        assert header in allowed, (header, allowed)
    reply = request(
        edge, "POST", GENERATE, _envelope(pb.GenerateRequest(prompt="p")),
        headers={"origin": ORIGIN, "content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )  # fmt: skip
    exposed = reply.headers.get("access-control-expose-headers", "")
    for header in ("grpc-status", "grpc-message", "grpc-status-details-bin"):
        assert header in exposed, (header, exposed)


def test_the_access_log_names_the_callers_protocol(stack: dict[str, ServiceProcess]) -> None:
    edge = stack["envoy"].address
    message = pb.GenerateRequest(prompt="p").SerializeToString()
    calls = {
        "grpc-web": ({"content-type": "application/grpc-web+proto"}, _envelope(message)),
        "connect": (
            {"content-type": "application/proto", "connect-protocol-version": "1"},
            message,
        ),
    }
    for protocol, (headers, body) in calls.items():
        rid = f"protocol-{protocol}"
        reply = request(edge, "POST", GENERATE, body, headers={**headers, "x-request-id": rid})
        assert reply.status == 200, reply
        # A unary answer's reply metadata are response headers for these protocols too.
        assert reply.headers["x-request-id"] == rid and reply.headers["x-ratelimit-limit"]
        line = wait_access_log(stack["envoy"], rid)
        # (Its grpc_status reads the response trailers, which these protocols' filters have
        # moved into the body by then: "Unknown", docs/http.md.)
        assert line["caller_protocol"] == protocol and line["http_status"] == 200, line
