"""Hostile callers at the edge: agent <- proxy <- `aiproxy envoy` <- many kinds of client.

What one caller sends must never take the service away from another (issue 13):
- malformed gRPC-reserved headers (grpc-timeout above all: grpc-core poisons a whole HTTP/2
  connection after one) from HTTP/JSON, SSE and native gRPC callers, interleaved with good
  requests from other clients through ONE Envoy: every good request succeeds, every bad one
  gets 400 (HTTP) or INVALID_ARGUMENT (gRPC) with the google.rpc.Status and its ErrorInfo;
- every answer Envoy makes itself has that shape: 404, 405 with Allow, 413 whatever the
  framing, 431 instead of GOAWAY, 503 with RetryInfo when no replica is healthy;
- the access log holds neither query strings (prompts, ?access_token=) nor the
  transcoder's rewritten method;
- callers behind the edge are keyed by their own address; a direct gRPC caller that forges
  the edge's header is keyed by its peer.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc
from aiproxy.core.errors import DOMAIN
from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import Reply, access_logs, request, sse_events, wait_until
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = pytest.mark.envoy

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
EDGE_SECRET = "edge-secret-for-tests-" + os.urandom(8).hex()
GENERATE = "/api/v1/ai/generate"
STREAM = "/api/v1/ai/generate/stream"


def _start(
    started: list[ServiceProcess], argv: list[str], name: str, env: dict[str, str] | None = None
) -> ServiceProcess:
    proc = ServiceProcess(aiproxy_argv(*argv), env=env, name=name)
    started.append(proc)
    return proc.start(timeout=60.0)


def _envoy_argv(*proxies: str, extra: tuple[str, ...] = ()) -> list[str]:
    argv = [
        "envoy",
        "--listen",
        "127.0.0.1:0",
        "--concurrency",
        "1",
        "--log-flush-ms",
        "50",
        "--health-interval-s",
        "0.5",
    ]
    for proxy in proxies:
        argv += ["--proxy", proxy]
    return [*argv, *extra]


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, ServiceProcess]]:
    """One agent, one proxy, one Envoy with a single worker: every caller shares its
    upstream connection(s) to the proxy, which is what a poisoned connection would hurt."""
    started: list[ServiceProcess] = []
    try:
        agent = _start(started, agent_args(), "agent")
        proxy = _start(
            started,
            proxy_args(agent.address),
            "proxy",
            env={**GENEROUS_LIMITS, "AIPROXY_BREAKER__ENABLED": "false"},
        )
        envoy = _start(started, _envoy_argv(proxy.address), "envoy")
        yield {"agent": agent, "proxy": proxy, "envoy": envoy}
    finally:
        for proc in reversed(started):
            proc.cleanup()


def _status_body(reply: Any, http_status: int, code: int, reason: str) -> dict[str, Any]:
    assert reply.status == http_status, (reply.status, reply.body[:300])
    assert reply.content_type.startswith("application/json"), reply.headers
    body = reply.json()
    assert body["code"] == code and body["message"], body
    info = next(d for d in body["details"] if d["@type"] == ERROR_INFO)
    assert info["reason"] == reason and info["domain"] == DOMAIN, body
    return body


def _grpc_status(details_bin: str) -> status_pb2.Status:
    return status_pb2.Status.FromString(
        base64.b64decode(details_bin + "=" * (-len(details_bin) % 4))
    )


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


def _grpc_frame(message: Any) -> bytes:
    raw = message.SerializeToString()
    return b"\0" + struct.pack(">I", len(raw)) + raw


def _curl_grpc(
    address: str,
    method: str,
    message: Any | None,
    headers: list[tuple[str, str]],
    tmp_path: Any,
    http_method: str = "POST",
) -> dict[str, str]:
    """A native gRPC call over h2c by curl, whose headers we choose (grpc clients refuse to
    send a malformed grpc-timeout); returns the response headers and trailers.

    A request the edge refuses is sent without a body (`message` None): Envoy answers at
    the headers and resets a stream whose body is still coming (RST_STREAM NO_ERROR, RFC
    9113 8.1), which curl may report as an error before it prints the answer.
    """
    argv = ["curl", "-sS", "--http2-prior-knowledge", "-o", os.devnull, "-D", "-", "--max-time", "20",
            "-X", http_method, f"http://{address}/ai.agent.v1.AgentService/{method}"]  # fmt: skip
    if http_method == "HEAD":
        argv[argv.index("-X") : argv.index("-X") + 2] = ["--head"]
    if message is not None:
        frame = tmp_path / "frame.bin"
        frame.write_bytes(_grpc_frame(message))
        argv += ["--data-binary", f"@{frame}"]
    for key, value in [("content-type", "application/grpc"), ("te", "trailers"), *headers]:
        argv += ["-H", f"{key}: {value}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("HTTP/2"), (done.returncode, done.stderr)
    out = done.stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            found.setdefault(key.strip().lower(), value.strip())
        elif line.startswith("HTTP/"):
            found[":status"] = line.split()[1]
    return found


# ---- 1. malformed gRPC-reserved headers, interleaved with good requests ----------------------

# (headers, what the guard names) an HTTP/JSON caller might send; each alone used to be
# forwarded as-is, and the first one poisoned the connection for everyone.
BAD_HTTP_HEADERS: list[list[tuple[str, str]]] = [
    [("grpc-timeout", "x")],
    [("grpc-timeout", "bogus")],
    [("grpc-timeout", "123456789S")],  # 9 digits: the spec allows 8
    [("grpc-timeout", "5s")],  # lower-case s is not a unit
    [("grpc-timeout", "-1S")],
    [("grpc-timeout", "1.5S")],
    [("grpc-timeout", "7S"), ("grpc-timeout", "300m")],  # repeated
    [("grpc-encoding", "gzip, br")],
    [("grpc-accept-encoding", "gzip,,identity")],
    [("x-trace-bin", "not base64!")],
]
# (method, headers) of a native gRPC caller: a non-POST call is the same class
# (grpc/grpc#34721: after a HEAD every later call on the connection fails).
BAD_GRPC_CALLS: list[tuple[str, list[tuple[str, str]]]] = [
    ("POST", [("grpc-timeout", "x")]),
    ("POST", [("grpc-timeout", "99999999999n")]),
    ("POST", [("grpc-encoding", "g zip")]),
    ("POST", [("x-tags-bin", "%%%")]),
    ("HEAD", []),
    ("GET", [("grpc-timeout", "5S")]),
]


def test_bad_headers_from_some_callers_never_fail_the_good_ones(
    stack: dict[str, ServiceProcess], tmp_path: Any
) -> None:
    edge = stack["envoy"].address
    channel = grpc.insecure_channel(edge)  # one long-lived native gRPC client through Envoy
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    counts = {"good": 0, "bad_http": 0, "bad_grpc": 0}
    failures: list[str] = []
    try:
        rounds = 3
        for round_no in range(rounds):
            for bad_http, bad_grpc in itertools.zip_longest(BAD_HTTP_HEADERS, BAD_GRPC_CALLS):
                # A bad HTTP/JSON caller.
                reply = request(edge, "POST", GENERATE, {"prompt": "bad"}, headers=bad_http)
                body = _status_body(reply, 400, 3, "INVALID_ARGUMENT")
                assert (
                    bad_http[0][0] in body["message"]
                    or "repeated" in body["message"]
                    or "-bin" in body["message"]
                ), body
                counts["bad_http"] += 1
                # Good callers of every kind right after it, each with its own valid deadline.
                good = request(
                    edge,
                    "POST",
                    GENERATE,
                    {"prompt": f"good {round_no}"},
                    headers={"grpc-timeout": "7S"},
                )
                if good.status != 200 or not good.json().get("text"):
                    failures.append(f"HTTP JSON: {good.status} {good.body[:200]!r}")
                sse = request(
                    edge, "POST", STREAM, {"prompt": "good stream"}, headers={"grpc-timeout": "30S"}
                )
                events = sse_events(sse.body) if sse.status == 200 else []
                if (
                    sse.status != 200
                    or not events
                    or not events[-1].get("isFinal")
                    or "error" in events[-1]
                ):
                    failures.append(f"SSE: {sse.status} {sse.body[-200:]!r}")
                get_sse = request(
                    edge, "GET", STREAM + "?prompt=good%20get", headers={"grpc-timeout": "20000m"}
                )
                if get_sse.status != 200 or not sse_events(get_sse.body)[-1].get("isFinal"):
                    failures.append(f"SSE GET: {get_sse.status} {get_sse.body[-200:]!r}")
                if bad_grpc is not None:
                    # A bad native gRPC caller (curl over h2c).
                    answer = _curl_grpc(
                        edge, "Generate", None, bad_grpc[1], tmp_path, http_method=bad_grpc[0]
                    )
                    assert answer.get("grpc-status") == "3", answer
                    status = _grpc_status(answer["grpc-status-details-bin"])
                    assert status.code == 3 and status.message == answer["grpc-message"]
                    assert (
                        _error_info(status).reason == "INVALID_ARGUMENT"
                        and _error_info(status).domain == DOMAIN
                    )
                    counts["bad_grpc"] += 1
                try:
                    unary = stub.Generate(pb.GenerateRequest(prompt="good grpc"), timeout=10)
                    assert unary.text
                    chunks = list(
                        stub.StreamGenerate(
                            pb.StreamGenerateRequest(prompt="good grpc stream"), timeout=10
                        )
                    )
                    assert chunks and chunks[-1].is_final
                except grpc.RpcError as exc:
                    failures.append(f"gRPC: {exc.code()} {exc.details()}")
                # A good call by curl too: a fresh client with an explicit valid grpc-timeout.
                fresh = _curl_grpc(
                    edge,
                    "Generate",
                    pb.GenerateRequest(prompt="good curl"),
                    [("grpc-timeout", "5S")],
                    tmp_path,
                )
                if fresh.get("grpc-status") != "0":
                    failures.append(f"gRPC by curl: {fresh}")
                counts["good"] += 6
    finally:
        channel.close()
    assert not failures, f"{len(failures)} of {counts['good']} good requests failed: {failures[:5]}"
    assert counts == {
        "good": 6 * rounds * len(BAD_HTTP_HEADERS),
        "bad_http": rounds * len(BAD_HTTP_HEADERS),
        "bad_grpc": rounds * len(BAD_GRPC_CALLS),
    }


def test_grpc_reserved_headers_that_are_not_the_callers_are_stripped(
    stack: dict[str, ServiceProcess], tmp_path: Any
) -> None:
    edge = stack["envoy"].address
    # An HTTP caller's grpc-encoding would make the upstream expect compressed frames the
    # transcoder never sends; grpc-status in a request is meaningless: both are dropped.
    reply = request(
        edge,
        "POST",
        GENERATE,
        {"prompt": "p"},
        headers={
            "grpc-encoding": "gzip",
            "grpc-status": "13",
            "te": "gzip",
            "grpc-internal-encoding-request": "gzip",
        },
    )
    assert reply.status == 200 and reply.json()["text"]
    answer = _curl_grpc(
        edge,
        "Generate",
        pb.GenerateRequest(prompt="p"),
        [("grpc-status", "13"), ("grpc-message", "x"), ("grpc-timeout", "5S")],
        tmp_path,
    )
    assert answer.get("grpc-status") == "0", answer
    # A native gRPC caller must speak gRPC: te: trailers and an application/grpc content-type.
    answer = _curl_grpc(
        edge, "Generate", None, [("content-type", "application/grpc-bogus")], tmp_path
    )
    assert (
        answer.get("grpc-status") == "3"
        and _error_info(_grpc_status(answer["grpc-status-details-bin"])).reason
        == "INVALID_ARGUMENT"
    )


# ---- 2. every answer Envoy makes itself has the documented shape ------------------------------


def test_envoy_answers_have_error_info(stack: dict[str, ServiceProcess]) -> None:
    edge = stack["envoy"].address
    _status_body(request(edge, "POST", "/api/v1/ai/nope", {"prompt": "p"}), 404, 5, "NOT_FOUND")
    _status_body(request(edge, "POST", GENERATE, b'{"prompt": '), 400, 3, "INVALID_ARGUMENT")
    _status_body(request(edge, "GET", STREAM + "?prompt=p&bogus=1"), 400, 3, "INVALID_ARGUMENT")
    for method, path, allow in (("PUT", GENERATE, "POST, OPTIONS"), ("DELETE", GENERATE, "POST, OPTIONS"),
                                ("GET", GENERATE, "POST, OPTIONS"), ("PATCH", STREAM, "GET, POST, OPTIONS")):  # fmt: skip
        reply = request(edge, method, path, {"prompt": "p"} if method != "GET" else None)
        _status_body(reply, 405, 12, "METHOD_NOT_ALLOWED")
        assert reply.headers["allow"] == allow, (method, path, reply.headers)


def _post_reading_early(address: str, path: str, body: bytes, chunked: bool) -> Reply:
    """POST the way browsers and curl do: the answer is read while the body is still being
    sent. Envoy refuses an oversized body as soon as it knows (at the headers for a
    Content-Length, past the cap for a chunked one) and then closes the connection, so a
    client that only reads after its last byte would see a reset instead of the 413."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {len(body)}"
    head = f"POST {path} HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n{framing}\r\n\r\n"

    def send() -> None:
        try:
            sock.sendall(head.encode())
            for i in range(0, len(body), 65536):
                piece = body[i : i + 65536]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the edge answered and closed: what the test reads below

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        sock.close()
        sender.join(timeout=30)


@pytest.mark.parametrize("size_mib", [1.5, 5, 10])
@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_bodies_are_413_whatever_the_framing(
    stack: dict[str, ServiceProcess], size_mib: float, chunked: bool
) -> None:
    body = json.dumps({"prompt": "a" * int(size_mib * 1024 * 1024)}).encode()
    _status_body(
        _post_reading_early(stack["envoy"].address, GENERATE, body, chunked),
        413,
        3,
        "REQUEST_TOO_LARGE",
    )
    # Just under the cap still reaches the proxy (which refuses the prompt's length itself).
    small = json.dumps({"prompt": "a" * (1024 * 1024 - 100)}).encode()
    assert _post_reading_early(stack["envoy"].address, GENERATE, small, chunked).status != 413


def test_headers_too_large_are_431_not_goaway(stack: dict[str, ServiceProcess]) -> None:
    edge = stack["envoy"].address
    _status_body(
        request(edge, "POST", GENERATE, {"prompt": "p"}, headers={"x-big": "a" * 20_000}),
        431,
        3,
        "HEADERS_TOO_LARGE",
    )
    _status_body(
        request(
            edge, "POST", GENERATE, {"prompt": "p"}, headers={f"x-h{i}": "v" for i in range(150)}
        ),
        431,
        3,
        "HEADERS_TOO_LARGE",
    )
    # A gRPC caller: a per-call INVALID_ARGUMENT, and its connection lives on (GOAWAY
    # would have failed the call UNAVAILABLE, which clients retry).
    with grpc.insecure_channel(edge) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        for metadata in ([("x-big", "a" * 30_000)], [(f"x-h{i}", "a" * 9_000) for i in range(10)]):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(pb.GenerateRequest(prompt="p"), metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            status = rpc_status.from_call(caught.value)
            assert status is not None and _error_info(status).reason == "HEADERS_TOO_LARGE"
            assert stub.Generate(pb.GenerateRequest(prompt="after"), timeout=10).text


def test_no_healthy_upstream_has_error_info_and_retry_info(tmp_path: Any) -> None:
    started: list[ServiceProcess] = []
    try:
        envoy = _start(
            started, _envoy_argv("127.0.0.1:1", extra=("--startup-wait-s", "0.2")), "envoy-nobody"
        )
        reply = request(envoy.address, "POST", GENERATE, {"prompt": "p"})
        body = _status_body(reply, 503, 14, "UPSTREAM_UNAVAILABLE")
        assert "upstream" not in body["message"]  # fixed text, not Envoy's internals
        assert next(d for d in body["details"] if d["@type"] == RETRY_INFO)["retryDelay"] == "1s"
        assert reply.headers.get("retry-after") == "1"
        with (
            grpc.insecure_channel(envoy.address) as channel,
            pytest.raises(grpc.RpcError) as caught,
        ):
            agent_service_pb2_grpc.AgentServiceStub(channel).Generate(
                pb.GenerateRequest(prompt="p"), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(caught.value)
        assert status is not None and _error_info(status).reason == "UPSTREAM_UNAVAILABLE"
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    finally:
        for proc in reversed(started):
            proc.cleanup()


# ---- 3. the access log ------------------------------------------------------------------------


def test_access_log_has_no_query_and_the_callers_method(stack: dict[str, ServiceProcess]) -> None:
    envoy = stack["envoy"]
    prompt, token = "secretprompt" + os.urandom(6).hex(), "secrettoken" + os.urandom(6).hex()
    rid = f"log-{time.monotonic_ns()}"
    reply = request(
        envoy.address, "GET", f"{STREAM}?prompt={prompt}", headers={"x-request-id": rid}
    )
    assert reply.status == 200 and sse_events(reply.body)[-1]["isFinal"]
    rid_token = f"log-token-{time.monotonic_ns()}"
    request(
        envoy.address,
        "GET",
        f"{STREAM}?prompt=p&access_token={token}",
        headers={"x-request-id": rid_token},
    )
    line = wait_until(lambda: next(iter(access_logs(envoy, rid)), None), 10, "the access log line")
    assert line["method"] == "GET" and line["path"] == STREAM, line
    assert (
        line["grpc_method"] == "/ai.agent.v1.AgentService/StreamGenerate"
        and line["http_status"] == 200
    )
    wait_until(
        lambda: access_logs(envoy, rid_token), 10, "the access log line of the token request"
    )
    log = envoy.stderr_text()
    assert prompt not in log and token not in log


# ---- 4. caller keying behind the edge --------------------------------------------------------


def test_callers_behind_the_edge_have_their_own_buckets_and_forgers_do_not(tmp_path: Any) -> None:
    started: list[ServiceProcess] = []
    limits = {
        "AIPROXY_LIMITS__RATE_PER_S": "0.01",
        "AIPROXY_LIMITS__BURST": "1",
        "AIPROXY_LIMITS__EDGE_SECRET": EDGE_SECRET,
    }
    try:
        agent = _start(started, agent_args(), "agent")
        proxy = _start(started, proxy_args(agent.address), "proxy", env=limits)
        envoy = _start(
            started,
            _envoy_argv(proxy.address),
            "envoy",
            env={"AIPROXY_LIMITS__EDGE_SECRET": EDGE_SECRET},
        )
        edge = envoy.address

        def http_from(source: str, **headers: str) -> int:
            return request(
                edge, "POST", GENERATE, {"prompt": "p"}, headers=headers, source=source
            ).status

        # Two browsers with their own addresses: one bucket each.
        assert http_from("127.0.0.2") == 200
        assert http_from("127.0.0.3") == 200
        # Each bucket is spent now, whatever address a caller claims through the edge
        # (Envoy overwrites the header with the caller's real address).
        reply = request(
            edge,
            "POST",
            GENERATE,
            {"prompt": "p"},
            source="127.0.0.2",
            headers={"x-envoy-external-address": "10.1.2.3"},
        )
        _status_body(reply, 429, 8, "RATE_LIMITED")
        assert http_from("127.0.0.3", **{"x-envoy-external-address": "10.1.2.4"}) == 429
        # A third browser still gets in.
        assert http_from("127.0.0.4") == 200

        # A direct gRPC caller that forges the edge's header (with or without a guess at
        # the secret) is keyed by its own peer: the first call spends the bucket of
        # peer 127.0.0.1, the next one with another forged address is refused.
        with grpc.insecure_channel(proxy.address) as channel:
            stub = agent_service_pb2_grpc.AgentServiceStub(channel)
            stub.Generate(
                pb.GenerateRequest(prompt="p"),
                metadata=[("x-envoy-external-address", "10.9.9.1")],
                timeout=10,
            )
            for forged in ([("x-envoy-external-address", "10.9.9.2")],
                           [("x-envoy-external-address", "10.9.9.3"), ("x-aiproxy-edge", "guess")]):  # fmt: skip
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Generate(pb.GenerateRequest(prompt="p"), metadata=forged, timeout=10)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The access log is written in batches (core/accesslog.py): wait for the direct
        # caller's line; the edge callers' lines were written before it.
        proxy.wait_for_log(
            lambda line: line.get("event") == "access" and line.get("caller") == "peer:127.0.0.1",
            timeout=10,
        )
        callers = {e.get("caller") for e in proxy.log_events("access") if e.get("caller")}
        assert {
            "peer:127.0.0.2",
            "peer:127.0.0.3",
            "peer:127.0.0.4",
            "peer:127.0.0.1",
        } <= callers, callers
        assert not any("10.9.9." in c or "10.1.2." in c for c in callers), callers
        # The edge secret is for the proxy only: it never reaches the agent, nor a log.
        for proc in (agent, proxy, envoy):
            assert EDGE_SECRET not in proc.stderr_text()
    finally:
        for proc in reversed(started):
            proc.cleanup()
