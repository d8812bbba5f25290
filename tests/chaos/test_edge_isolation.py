"""One caller's headers never reach another caller's call (issue 20, section 1).

grpc-core keeps its parse of a header with the HPACK dynamic-table entry the header came
in: a value it cannot parse fails that request, and every later request that the peer
encodes against the same entry. Envoy multiplexes every caller over one upstream HTTP/2
connection per worker, so with a dynamic table one caller's header could fail other
callers' calls (for good: the entry stays). The edge sends no dynamic table upstream
(`hpack_table_size: 0`), and its guard answers the attacker clearly.

This is a property, not a list of examples: each run draws hostile headers at random
(random names, -bin values of every length mod 4 over the base64 alphabet and beyond,
grpc-encoding of random letters, grpc-timeout of random shapes, lb-cost-bin of random
lengths, the other headers grpc-core parses), sends them as HTTP/JSON, native gRPC,
gRPC-Web or Connect callers through ONE Envoy worker (one upstream connection), and after
each one other callers make good calls that carry the same header name with a valid value.
Then:
- 0 good calls fail;
- the attacker gets an answer about its own request: 200, or 400 / INVALID_ARGUMENT with
  the Status and ErrorInfo (504 / DEADLINE_EXCEEDED for a valid tiny grpc-timeout), never
  500 / INTERNAL.
The seed is printed (and in the failure message) to replay a run: EDGE_FUZZ_SEED=N.
"""

from __future__ import annotations

import base64
import gzip
import os
import random
import string
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc
from aiproxy.server.edge.admin import admin_get
from tests.chaos.test_edge_hostile import GENERATE, _envoy_argv, _grpc_status, _start
from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import request, wait_until
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.envoy

ROUNDS = 60  # hostile requests per run, each followed by the victims' good calls
TIME_BUDGET_S = 120.0  # and never longer than this
B64 = string.ascii_letters + string.digits + "+/"


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, ServiceProcess]]:
    started: list[ServiceProcess] = []
    try:
        agent = _start(started, agent_args(), "agent")
        proxy = _start(
            started,
            proxy_args(agent.address),
            "proxy",
            env={**GENEROUS_LIMITS, "AIPROXY_BREAKER__ENABLED": "false"},
        )
        # One worker: one upstream connection that every caller below shares.
        envoy = _start(started, _envoy_argv(proxy.address), "envoy")
        yield {"agent": agent, "proxy": proxy, "envoy": envoy}
    finally:
        for proc in reversed(started):
            proc.cleanup()


# ---- hostile headers, drawn at random -------------------------------------------------------


def _name(rng: random.Random) -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "x-" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))


def _bin_value(rng: random.Random) -> str:
    """A -bin value of any length mod 4: base64 characters (canonical or not), padding
    or not, sometimes a character outside the alphabet."""
    body = "".join(rng.choice(B64) for _ in range(rng.randint(0, 13)))
    if rng.random() < 0.3:
        body += "=" * rng.randint(1, 3)
    if rng.random() < 0.15 and body:
        pos = rng.randrange(len(body))
        body = body[:pos] + rng.choice("-_.!~*=%") + body[pos + 1 :]
    return body


def _timeout_value(rng: random.Random) -> str:
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(0, 11)))
    unit = rng.choice(["H", "M", "S", "m", "u", "n", "s", "h", "x", "", "SS", " S"])
    value = rng.choice(["", " ", "-", "+"]) + digits + unit
    return value if value.strip() else "x"


def _coding(rng: random.Random) -> str:
    letters = string.ascii_letters + (string.digits + "-._" if rng.random() < 0.3 else "")
    word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 8)))
    return rng.choice([word, word, word, "gzip", "identity", "deflate", "GZIP", "br", "zstd"])


def hostile_header(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["bin", "bin", "bin", "encoding", "encoding", "timeout", "timeout",
                       "lb-cost", "other"])  # fmt: skip
    if kind == "bin":
        return _name(rng) + "-bin", _bin_value(rng)
    if kind == "encoding":
        return rng.choice(["grpc-encoding", "grpc-internal-encoding-request"]), _coding(rng)
    if kind == "timeout":
        return "grpc-timeout", _timeout_value(rng)
    if kind == "lb-cost":
        return "lb-cost-bin", _bin_value(rng)
    name = rng.choice(["grpc-status", "grpc-previous-rpc-attempts", "grpc-retry-pushback-ms",
                       "grpclb_client_stats", "grpc-accept-encoding", "lb-token"])  # fmt: skip
    return name, rng.choice([_coding(rng), _timeout_value(rng), str(rng.randint(-5, 99))])


def good_value(name: str, rng: random.Random) -> str:
    """A value grpc-core parses, for a victim that sends the same header name."""
    if name == "lb-cost-bin":
        return base64.b64encode(struct.pack("<d", rng.random()) + b"name").decode()
    if name.endswith("-bin"):
        return base64.b64encode(os.urandom(rng.randint(0, 12))).decode()
    if name == "grpc-timeout":
        return rng.choice(["20S", "20000m", "1M"])
    return "gzip"


# ---- callers ---------------------------------------------------------------------------------


def _frame(message: Any, compressed: bool = False) -> bytes:
    raw = message.SerializeToString()
    if compressed:
        raw = gzip.compress(raw)
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(raw)) + raw


def curl_grpc(
    address: str,
    headers: list[tuple[str, str]],
    tmp_path: Any,
    compressed: bool = False,
    body: bool = True,
) -> dict[str, str]:
    """A native gRPC Generate call by curl over h2c with exactly these headers; returns the
    response headers and trailers ({} if curl failed). `body` False sends the headers
    alone: when Envoy answers at the headers it resets a stream whose body is still coming
    (RST_STREAM NO_ERROR), and curl may then report an error instead of the answer."""
    frame = tmp_path / f"frame-{int(compressed)}.bin"
    frame.write_bytes(_frame(pb.GenerateRequest(prompt="p"), compressed) if body else b"")
    argv = ["curl", "-sS", "--http2-prior-knowledge", "-o", os.devnull, "-D", "-", "--max-time", "20",
            "--data-binary", f"@{frame}", f"http://{address}/ai.agent.v1.AgentService/Generate"]  # fmt: skip
    for key, value in [("content-type", "application/grpc"), ("te", "trailers"), *headers]:
        argv += ["-H", f"{key}: {value}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    found: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            found.setdefault(key.strip().lower(), value.strip())
    return found


# gRPC-Web and Connect callers (the grpc_web and connect_grpc_bridge filters make them gRPC
# callers of the proxy, over the same upstream connection), over HTTP/1.1 as browsers send.
BROWSER_GRPC = {
    "grpc-web": {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    "connect": {"content-type": "application/proto", "connect-protocol-version": "1"},
}


def browser_grpc(address: str, kind: str, headers: list[tuple[str, str]]) -> Any:
    message = pb.GenerateRequest(prompt="p")
    body = _frame(message) if kind == "grpc-web" else message.SerializeToString()
    pairs = [*BROWSER_GRPC[kind].items(), *headers]
    return request(address, "POST", "/ai.agent.v1.AgentService/Generate", body, pairs, timeout=20)


def _grpc_web_status(answer: Any) -> dict[str, str]:
    """grpc-status and its friends of a gRPC-Web answer: its headers (trailers-only) or its
    trailer frame (flag 0x80, the last frame of the body)."""
    if "grpc-status" in answer.headers:
        return dict(answer.headers)
    body, pos, trailer = answer.body, 0, b""
    while pos + 5 <= len(body):
        (length,) = struct.unpack(">I", body[pos + 1 : pos + 5])
        if body[pos] & 0x80:
            trailer = body[pos + 5 : pos + 5 + length]
        pos += 5 + length
    lines = trailer.decode(errors="replace").split("\r\n")
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _browser_ok(kind: str, answer: Any) -> bool:
    if kind == "grpc-web":
        return answer.status == 200 and _grpc_web_status(answer).get("grpc-status") == "0"
    return answer.status == 200


def _attacker_outcome(kind: str, answer: Any) -> str | None:
    """What is wrong with the attacker's own answer (None: a clear answer about itself)."""
    if kind == "grpc-web":
        answer = _grpc_web_status(answer)
        kind = "grpc"
    if kind == "connect":
        if answer.status == 200:
            return None
        error = answer.json() if answer.content_type == "application/json" else {}
        if error.get("code") == "deadline_exceeded":
            return None
        if error.get("code") == "invalid_argument" and error.get("details"):
            return None
        return f"Connect {answer.status} {answer.body[:200]!r}"
    if kind == "http":
        if answer.status in (200, 504):
            return None
        if answer.status == 400:
            body = answer.json()
            reasons = [d.get("reason") for d in body.get("details", [])]
            return (
                None if body.get("code") == 3 and "INVALID_ARGUMENT" in reasons else f"400 {body}"
            )
        return f"HTTP {answer.status} {answer.body[:200]!r}"
    status = answer.get("grpc-status")
    if status in ("0", "4"):
        return None
    if status == "3" and "grpc-status-details-bin" in answer:
        detail = _grpc_status(answer["grpc-status-details-bin"])
        return None if detail.code == 3 and detail.details else f"no ErrorInfo: {detail}"
    return f"gRPC {status} {answer.get('grpc-message')}"


def test_random_unparsable_headers_never_fail_other_callers(
    stack: dict[str, ServiceProcess], tmp_path: Any
) -> None:
    seed = int(os.environ.get("EDGE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    print(f"EDGE_FUZZ_SEED={seed}")
    rng = random.Random(seed)
    edge = stack["envoy"].address
    channel = grpc.insecure_channel(edge)  # a long-lived gRPC client beside the others
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    good = attacks = 0
    victims: list[str] = []
    attackers: list[str] = []
    started = time.monotonic()
    try:
        for _ in range(ROUNDS):
            if time.monotonic() - started > TIME_BUDGET_S:
                break
            name, value = hostile_header(rng)
            via = rng.choice(["http", "grpc", "grpc-web", "connect"])
            if via == "http":
                answer: Any = request(
                    edge, "POST", GENERATE, {"prompt": "x"}, headers=[(name, value)], timeout=20
                )
            elif via in BROWSER_GRPC:
                answer = browser_grpc(edge, via, [(name, value)])
            else:
                answer = curl_grpc(edge, [(name, value)], tmp_path)
                if "grpc-status" not in answer:  # refused at the headers (see curl_grpc)
                    answer = curl_grpc(edge, [(name, value)], tmp_path, body=False)
            attacks += 1
            wrong = _attacker_outcome(via, answer)
            if wrong:
                attackers.append(f"{via} {name}: {value!r} -> {wrong}")
            # Other callers, each with the same header name and a valid value.
            ok = good_value(name, rng)
            if name == "grpc-encoding":
                reply = curl_grpc(edge, [(name, ok)], tmp_path, compressed=True)
            else:
                reply = curl_grpc(
                    edge,
                    [(name, ok)] if not name.startswith("grpc-") or name == "grpc-timeout" else [],
                    tmp_path,
                )
            good += 1
            if reply.get("grpc-status") != "0":
                victims.append(
                    f"after {name}: {value!r}: gRPC by curl {reply.get('grpc-status')} {reply.get('grpc-message')}"
                )
            if name.endswith("-bin") or name == "grpc-timeout":
                http = request(
                    edge, "POST", GENERATE, {"prompt": "good"}, headers=[(name, ok)], timeout=20
                )
                good += 1
                if http.status != 200:
                    victims.append(
                        f"after {name}: {value!r}: HTTP {http.status} {http.body[:200]!r}"
                    )
            if name.endswith("-bin") or name == "grpc-timeout":
                kind = rng.choice(list(BROWSER_GRPC))
                good += 1
                reply_of = browser_grpc(edge, kind, [(name, ok)])
                if not _browser_ok(kind, reply_of):
                    victims.append(
                        f"after {name}: {value!r}: {kind} {reply_of.status} {reply_of.body[:200]!r}"
                    )
            if name.endswith("-bin"):
                metadata = [(name, base64.b64decode(ok))]
                try:
                    good += 1
                    assert stub.Generate(
                        pb.GenerateRequest(prompt="good"), metadata=metadata, timeout=20
                    ).text
                except grpc.RpcError as exc:
                    victims.append(f"after {name}: {value!r}: gRPC {exc.code()} {exc.details()}")
    finally:
        channel.close()
    assert attacks >= 10, f"only {attacks} hostile requests in {TIME_BUDGET_S} s"
    assert not victims, f"seed {seed}: {len(victims)} of {good} good calls failed: {victims[:8]}"
    assert not attackers, (
        f"seed {seed}: {len(attackers)} of {attacks} attackers got no clear answer: {attackers[:8]}"
    )


# ---- calls the handler never saw must still end (issue 20, section 2) -------------------------

# A stream that ends (END_STREAM) without one whole request message: no DATA at all, or a
# length prefix of 48 bytes followed by 3. grpc.aio's unary-request path never called the
# handler for these and never answered: the caller waited until its own deadline.
NO_WHOLE_MESSAGE = {
    "empty": b"",
    "short": b"\x00\x00\x00\x00\x30\x0a\x01\x78",
}
METHODS = (
    "ai.agent.v1.AgentService/Generate",
    "ai.agent.v1.AgentService/StreamGenerate",
    "grpc.health.v1.Health/Check",
)


def _curl_raw(
    address: str, method: str, body: bytes, tmp_path: Any, max_s: int = 10
) -> dict[str, str]:
    frame = tmp_path / f"raw-{len(body)}.bin"
    frame.write_bytes(body)
    argv = ["curl", "-sS", "--http2-prior-knowledge", "-o", os.devnull, "-D", "-", "--max-time", str(max_s),
            "--data-binary", f"@{frame}", "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"http://{address}/{method}"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=max_s + 10)
    found: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            found.setdefault(key.strip().lower(), value.strip())
    return found


def _upstream_active(admin: str) -> int:
    doc = admin_get(admin, "/stats?format=json&filter=cluster%5C.aiproxy%5C.upstream_rq_active%24")
    return int(sum(s.get("value", 0) for s in doc.get("stats", [])))


def test_calls_without_a_whole_request_message_are_answered(
    stack: dict[str, ServiceProcess], tmp_path: Any
) -> None:
    """Directly and through Envoy, every method kind: INVALID_ARGUMENT MALFORMED_REQUEST
    with the Status, not silence until the caller gives up (curl's --max-time 10 s here,
    which the answer never reaches: no timing assertion, a missing answer fails)."""
    for target in (stack["proxy"].address, stack["envoy"].address):
        for method in METHODS:
            for name, body in NO_WHOLE_MESSAGE.items():
                answer = _curl_raw(target, method, body, tmp_path)
                assert answer.get("grpc-status") == "3", (target, method, name, answer)
                status = _grpc_status(answer["grpc-status-details-bin"])
                reasons = [_reason(d) for d in status.details]
                assert "MALFORMED_REQUEST" in reasons, (target, method, name, status)


def _reason(detail: Any) -> str:
    info = error_details_pb2.ErrorInfo()
    return info.reason if detail.Unpack(info) else ""


def test_such_calls_hold_no_stream_of_the_shared_connection(
    stack: dict[str, ServiceProcess], tmp_path: Any
) -> None:
    """Many at once through one Envoy worker: each is answered, and none is left open on
    the upstream connection every caller shares (Envoy's upstream_rq_active back to 0)."""
    envoy = stack["envoy"]
    procs = []
    frame = tmp_path / "short.bin"
    frame.write_bytes(NO_WHOLE_MESSAGE["short"])
    for _ in range(30):
        argv = ["curl", "-sS", "--http2-prior-knowledge", "-o", os.devnull, "-D", "-", "--max-time", "10",
                "--data-binary", f"@{frame}", "-H", "content-type: application/grpc", "-H", "te: trailers",
                f"http://{envoy.address}/ai.agent.v1.AgentService/StreamGenerate"]  # fmt: skip
        procs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        )
    answers = []
    for proc in procs:
        out, _ = proc.communicate(timeout=30)
        answers.append("grpc-status: 3" in out)
    assert all(answers), f"{answers.count(False)} of {len(answers)} got no answer"
    wait_until(
        lambda: _upstream_active(envoy.ready["admin"]) == 0, 10, "no request left open upstream"
    )
    # The connection serves everyone as before.
    assert curl_grpc(envoy.address, [], tmp_path).get("grpc-status") == "0"


# ---- headers past Envoy's codec limits ----------------------------------------------------------


def test_headers_past_the_codec_limits(stack: dict[str, ServiceProcess]) -> None:
    """The guard answers 431 / INVALID_ARGUMENT HEADERS_TOO_LARGE up to the codec's limits
    (96 KiB, 400 headers). Past them HTTP/1.1 callers still get the 431 with the Status body
    (it was Envoy's plain text: the gRPC mapper matched a request no filter had seen); an
    HTTP/2 caller's stream is reset by Envoy's codec before any filter (documented in the
    README: Envoy cannot answer it), and only that stream: its connection serves on."""
    edge = stack["envoy"].address
    for headers in (
        {f"x-h{i}": "v" for i in range(450)},
        {f"x-h{i}": "v" * 1100 for i in range(90)},
    ):
        reply = request(edge, "POST", GENERATE, {"prompt": "p"}, headers=headers)
        assert reply.status == 431 and reply.content_type.startswith("application/json"), (
            reply.status,
            reply.headers,
            reply.body[:200],
        )
        body = reply.json()
        assert body["code"] == 3 and body["details"][0]["reason"] == "HEADERS_TOO_LARGE", body
    with grpc.insecure_channel(edge) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(
                pb.GenerateRequest(prompt="p"),
                metadata=[(f"x-h{i}", "v") for i in range(450)],
                timeout=10,
            )
        assert caught.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
        assert stub.Generate(pb.GenerateRequest(prompt="after"), timeout=10).text


# ---- the guard accepts exactly what grpc-core parses -------------------------------------------

# (header, value, grpc-core parses it): grpc-core's HPACK parser drops trailing '=', then
# needs the standard alphabet, never 1 character past a group of 4, and zero unused bits in
# a last partial group; lb-cost-bin needs at least 8 bytes; grpc-encoding its own codings.
EXACT_CASES = [
    ("x-t-bin", "", True),
    ("x-t-bin", "AA", True),
    ("x-t-bin", "AA==", True),
    ("x-t-bin", "AAA", True),
    ("x-t-bin", "AAE=", True),
    ("x-t-bin", "QUJD", True),
    ("x-t-bin", "QUJDRA", True),  # unpadded
    ("x-t-bin", "QUJDRA===", True),  # any number of trailing '='
    ("x-t-bin", "A", False),
    ("x-t-bin", "AAAAA", False),
    ("x-t-bin", "AB", False),  # unused bits not zero
    ("x-t-bin", "AAB", False),
    ("x-t-bin", "AA=A", False),
    ("x-t-bin", "QU-D", False),  # the URL-safe alphabet is not grpc-core's
    ("lb-cost-bin", base64.b64encode(b"\0" * 8).decode(), True),
    ("lb-cost-bin", base64.b64encode(b"\0" * 8 + b"name").decode(), True),
    ("lb-cost-bin", "AAAA", False),  # 3 bytes
    ("lb-cost-bin", base64.b64encode(b"\0" * 7).decode(), False),
    ("grpc-encoding", "identity", True),
    ("grpc-encoding", "gzip", True),
    ("grpc-encoding", "deflate", True),
    ("grpc-encoding", "GZIP", False),
    ("grpc-encoding", "br", False),
    ("grpc-encoding", "zstd", False),
]


@pytest.mark.parametrize(("name", "value", "parsed"), EXACT_CASES)
def test_the_guard_refuses_exactly_what_grpc_core_cannot_parse(
    stack: dict[str, ServiceProcess], tmp_path: Any, name: str, value: str, parsed: bool
) -> None:
    """`parsed` is checked against grpc-core itself too: the same header sent to the proxy
    directly (its own connection, no guard) fails INTERNAL exactly when the guard refuses it."""
    direct = curl_grpc(stack["proxy"].address, [(name, value)], tmp_path)
    assert (direct.get("grpc-status") == "0") is parsed, ("grpc-core directly", direct)
    edge = stack["envoy"].address
    answer = curl_grpc(edge, [(name, value)], tmp_path)
    if "grpc-status" not in answer:  # refused at the headers (see curl_grpc)
        answer = curl_grpc(edge, [(name, value)], tmp_path, body=False)
    assert answer.get("grpc-status") == ("0" if parsed else "3"), answer
    if not parsed:
        status = _grpc_status(answer["grpc-status-details-bin"])
        assert "INVALID_ARGUMENT" in [_reason(d) for d in status.details], status
    if name != "grpc-encoding":  # HTTP callers' grpc-encoding is stripped, not checked twice
        reply = request(
            edge, "POST", GENERATE, {"prompt": "p"}, headers=[(name, value)], timeout=20
        )
        assert reply.status == (200 if parsed else 400), (reply.status, reply.body[:200])
