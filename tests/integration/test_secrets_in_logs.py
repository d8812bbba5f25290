"""No secret and no prompt in any log of any process; no credential reaches the agent.

The whole stack, each process a real one: Envoy (`aiproxy envoy`) -> proxy (auth on: a
JWT secret and an API key, logs at DEBUG) -> agent (logs at DEBUG, `--record-metadata`,
a test-only flag that writes the metadata of every call it receives to a file).

Secrets travel where callers put them: bearer tokens, API keys and cookies in headers,
`?access_token=` and `?prompt=` in query strings, distinctive prompts in bodies; over HTTP
through Envoy, over gRPC through Envoy and over gRPC straight to the proxy; on success and
on the error paths where secrets usually leak (bad and expired tokens, unknown API keys,
a missing scope, validation errors, malformed JSON, upstream failures before and in the
middle of a stream). Then every byte each process wrote (Envoy stdout/stderr with its
access log, proxy stdout/stderr, agent stdout/stderr) is searched for each secret.

Issue 13 item 8: until the edge logs paths without their query string, the query case
fails (Envoy's access log writes `path` with the query); it asserts the target behaviour.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.ratelimit import hash_api_key
from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import request, sse_events, wait_access_log, wait_host_health
from tests.support.grpc_helpers import stub
from tests.support.procs import CREDENTIAL_HEADERS, ServiceProcess, aiproxy_argv, recorded_metadata

pytestmark = pytest.mark.envoy

# Every secret is distinctive, so a hit in a log can only be a leak.
JWT_SECRET = "jwt-signing-s3cr3t-7f0e1d2c3b4a59687766554433221100"
API_KEY = "ak_s3cr3t_9b8a7f6e5d4c"
WRONG_API_KEY = "ak_wr0ng_s3cr3t_1a2b3c4d"
COOKIE = "sid=c00kie-s3cr3t-5a6b7c8d"
GARBAGE_BEARER = "garbage-b34rer-s3cr3t-0f1e2d3c"
PROMPT = "PROMPT-s3cr3t-zebra-quartz-4471"  # in bodies
LONG_PROMPT = "LONGPROMPT-s3cr3t-walrus-" + "x" * 300  # rejected by validation (max 200)
JSON_SECRET = "malformed-json-s3cr3t-77aa"
TASK = "TASK-s3cr3t-heron-8812"
QUERY_PROMPT = "QPROMPT-s3cr3t-otter-5521"
QUERY_TOKEN = "qs-access-t0ken-s3cr3t-6c5d4e"
AUDIENCE = "aiproxy"
AUTH_ENV = {
    "AIPROXY_AUTH__JWT_SECRET": JWT_SECRET,
    "AIPROXY_AUTH__AUDIENCE": json.dumps([AUDIENCE]),
    "AIPROXY_AUTH__METHOD_SCOPES": json.dumps({"ExecuteAgent": ["agent:execute"]}),
    "AIPROXY_AUTH__API_KEYS": json.dumps(
        [{"name": "ci", "key_hash": hash_api_key(API_KEY), "scopes": []}]
    ),
    "AIPROXY_VALIDATION__MAX_PROMPT_CHARS": "200",
}


def _token(key: str = JWT_SECRET, **claims: Any) -> str:
    # Valid for a day: these are signed when the module is imported, which is when the
    # session collects (every xdist worker at its start), not when the test runs; with
    # 10 minutes the good token expired before its test on a loaded box (401s).
    now = int(time.time())
    return jwt.encode(
        {"sub": "alice", "aud": AUDIENCE, "exp": now + 86_400, **claims}, key, algorithm="HS256"
    )


# Signed at import, so each is a fixed string the test can look for.
GOOD_JWT = _token()
FORGED_JWT = _token(key="an-attackers-key-that-is-32-bytes-long!!")
EXPIRED_JWT = _token(exp=int(time.time()) - 3600)

HEADER_AND_BODY_SECRETS = {
    "jwt": GOOD_JWT,
    "jwt signature": GOOD_JWT.rsplit(".", 1)[1],
    "forged jwt": FORGED_JWT,
    "expired jwt": EXPIRED_JWT,
    "jwt signing secret": JWT_SECRET,
    "api key": API_KEY,
    "wrong api key": WRONG_API_KEY,
    "cookie": COOKIE.split("=", 1)[1],
    "garbage bearer": GARBAGE_BEARER,
    "prompt": PROMPT,
    "rejected prompt": LONG_PROMPT[:30],
    "malformed json": JSON_SECRET,
    "task": TASK,
}
QUERY_SECRETS = {"prompt in query": QUERY_PROMPT, "access_token in query": QUERY_TOKEN}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    record = tmp_path_factory.mktemp("agent") / "metadata.jsonl"
    started: list[ServiceProcess] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), env=env, name=name)
        started.append(proc)
        return proc.start(timeout=60)

    try:
        agent = start(agent_args("--record-metadata", str(record), "--log-level", "DEBUG"), "agent")
        proxy = start(
            proxy_args(agent.address, extra=("--log-level", "DEBUG")),
            "proxy",
            {**GENEROUS_LIMITS, **AUTH_ENV, "AIPROXY_BREAKER__ENABLED": "false"},
        )
        envoy = start(
            ["envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address, "--concurrency", "1",
             "--log-flush-ms", "50", "--health-interval-s", "0.5"],
            "envoy",
        )  # fmt: skip
        wait_host_health(envoy, proxy.address, True)
        yield {"agent": agent, "proxy": proxy, "envoy": envoy, "record": record}
    finally:
        for proc in reversed(started):
            proc.cleanup()


def _rid(name: str) -> str:
    return f"sec-{name}-{time.monotonic_ns()}"


def _post(
    edge: str, path: str, body: Any, headers: dict[str, str], name: str
) -> tuple[int, bytes, str]:
    rid = _rid(name)
    reply = request(edge, "POST", path, body, headers={"x-request-id": rid, **headers})
    return reply.status, reply.body, rid


def _leaks(stack: dict[str, Any], secrets: dict[str, str]) -> list[str]:
    """'<secret> in <process> <stream>' for every secret found in any output of any process."""
    found = []
    for name in ("envoy", "proxy", "agent"):
        proc: ServiceProcess = stack[name]
        for stream, path in (("stdout", proc.stdout_path), ("stderr", proc.stderr_path)):
            text = path.read_text(errors="replace") if path.exists() else ""
            for label, secret in secrets.items():
                if secret in text:
                    line = next(ln for ln in text.splitlines() if secret in ln)
                    found.append(f"{label} in {name} {stream}: {line[:300]}")
    return found


def _assert_no_credentials_at_the_agent(stack: dict[str, Any], secrets: dict[str, str]) -> None:
    calls = recorded_metadata(stack["record"])
    assert calls, "the agent recorded no call"
    for call in calls:
        names = set(call["metadata"])
        assert not names & set(CREDENTIAL_HEADERS), f"credentials reached the agent: {call}"
    raw = stack["record"].read_text()
    assert not [label for label, secret in secrets.items() if label != "prompt" and secret in raw]


def test_secrets_in_headers_and_bodies_never_reach_a_log(stack: dict[str, Any]) -> None:
    edge = stack["envoy"].address
    bearer = {"authorization": f"Bearer {GOOD_JWT}", "cookie": COOKIE}
    generate, stream = "/api/v1/ai/generate", "/api/v1/ai/generate/stream"
    body = {"prompt": PROMPT, "options": {"maxTokens": 4}}
    outcomes: dict[str, int] = {}

    # Success, over HTTP: bearer + cookie, API key + cookie, a stream.
    outcomes["bearer"], _, _ = _post(edge, generate, body, bearer, "bearer")
    outcomes["api key"], _, _ = _post(
        edge, generate, body, {"x-api-key": API_KEY, "cookie": COOKIE}, "apikey"
    )
    status, raw, _ = _post(edge, stream, body, bearer, "stream")
    outcomes["stream"] = status
    assert sse_events(raw)[-1]["isFinal"]
    # The error paths: every credential wrong in its own way, a missing scope, bad input.
    outcomes["garbage bearer"], _, _ = _post(
        edge,
        generate,
        body,
        {"authorization": f"Bearer {GARBAGE_BEARER}", "cookie": COOKIE},
        "garbage",
    )
    outcomes["forged jwt"], _, _ = _post(
        edge, generate, body, {"authorization": f"Bearer {FORGED_JWT}"}, "forged"
    )
    outcomes["expired jwt"], _, _ = _post(
        edge, generate, body, {"authorization": f"Bearer {EXPIRED_JWT}"}, "expired"
    )
    outcomes["wrong api key"], _, _ = _post(
        edge, generate, body, {"x-api-key": WRONG_API_KEY}, "wrongkey"
    )
    outcomes["cookie only"], _, _ = _post(edge, generate, body, {"cookie": COOKIE}, "cookieonly")
    outcomes["missing scope"], _, _ = _post(
        edge,
        "/api/v1/ai/agents/execute",
        {"agentType": "AGENT_TYPE_ANALYSIS", "task": TASK},
        bearer,
        "scope",
    )
    outcomes["too long"], _, _ = _post(edge, generate, {"prompt": LONG_PROMPT}, bearer, "toolong")
    outcomes["malformed json"], _, _ = _post(
        edge, generate, b'{"prompt": "' + JSON_SECRET.encode() + b'", ', bearer, "badjson"
    )
    outcomes["upstream INTERNAL"], _, _ = _post(
        edge, generate, body, {**bearer, "x-fault-code": "INTERNAL"}, "internal"
    )
    status, raw, last_rid = _post(
        edge, stream, {"prompt": PROMPT, "options": {"maxTokens": 20}},
        {**bearer, "x-fault-code": "UNAVAILABLE", "x-fault-after": "2"}, "midstream",
    )  # fmt: skip
    outcomes["mid-stream fault"] = status
    assert "error" in sse_events(raw)[-1]

    assert outcomes == {
        "bearer": 200, "api key": 200, "stream": 200,
        "garbage bearer": 401, "forged jwt": 401, "expired jwt": 401, "wrong api key": 401, "cookie only": 401,
        "missing scope": 403, "too long": 400, "malformed json": 400, "upstream INTERNAL": 500,
        "mid-stream fault": 200,
    }  # fmt: skip
    wait_access_log(stack["envoy"], last_rid)
    print(f"\nHTTP outcomes through Envoy: {outcomes}")
    assert not _leaks(stack, HEADER_AND_BODY_SECRETS), "\n".join(
        _leaks(stack, HEADER_AND_BODY_SECRETS)
    )
    _assert_no_credentials_at_the_agent(stack, HEADER_AND_BODY_SECRETS)


async def test_secrets_over_grpc_never_reach_a_log(stack: dict[str, Any]) -> None:
    """gRPC callers, through Envoy and straight to the proxy, good and bad credentials."""
    request_msg = pb.GenerateRequest(prompt=PROMPT, options=pb.GenerationOptions(max_tokens=4))
    codes: dict[str, str] = {}
    envoy_rids: list[str] = []
    for via in ("envoy", "proxy"):
        async with grpc.aio.insecure_channel(stack[via].address) as channel:
            client = stub(channel)
            for label, metadata in (
                ("bearer", (("authorization", f"Bearer {GOOD_JWT}"), ("cookie", COOKIE))),
                ("api key", (("x-api-key", API_KEY),)),
                ("garbage bearer", (("authorization", f"Bearer {GARBAGE_BEARER}"),)),
                ("forged jwt", (("authorization", f"Bearer {FORGED_JWT}"),)),
                ("wrong api key", (("x-api-key", WRONG_API_KEY), ("cookie", COOKIE))),
            ):
                rid = _rid(label)
                if via == "envoy":
                    envoy_rids.append(rid)
                try:
                    await client.Generate(
                        request_msg, metadata=(("x-request-id", rid), *metadata), timeout=10
                    )
                    codes[f"{via} {label}"] = "OK"
                except grpc.aio.AioRpcError as err:
                    codes[f"{via} {label}"] = err.code().name
            call = client.StreamGenerate(
                pb.StreamGenerateRequest(prompt=PROMPT, options=pb.GenerationOptions(max_tokens=4)),
                metadata=(("authorization", f"Bearer {GOOD_JWT}"), ("cookie", COOKIE)),
                timeout=10,
            )
            codes[f"{via} stream"] = "OK" if [c async for c in call][-1].is_final else "INCOMPLETE"
    print(f"\ngRPC outcomes: {codes}")
    for via in ("envoy", "proxy"):
        assert codes[f"{via} bearer"] == codes[f"{via} api key"] == codes[f"{via} stream"] == "OK"
        assert {
            codes[f"{via} {bad}"] for bad in ("garbage bearer", "forged jwt", "wrong api key")
        } == {"UNAUTHENTICATED"}
    for rid in envoy_rids:  # Envoy writes its access log lines when requests end
        wait_access_log(stack["envoy"], rid)
    assert not _leaks(stack, HEADER_AND_BODY_SECRETS), "\n".join(
        _leaks(stack, HEADER_AND_BODY_SECRETS)
    )
    _assert_no_credentials_at_the_agent(stack, HEADER_AND_BODY_SECRETS)


def test_secrets_in_query_strings_never_reach_a_log(stack: dict[str, Any]) -> None:
    """EventSource can only send GET with a query: prompts and tokens end up there."""
    edge = stack["envoy"].address
    bearer = {"authorization": f"Bearer {GOOD_JWT}"}
    get_rid = _rid("qprompt")
    ok = request(
        edge,
        "GET",
        f"/api/v1/ai/generate/stream?prompt={QUERY_PROMPT}&options.maxTokens=4",
        headers={**bearer, "x-request-id": get_rid},
    )
    assert ok.status == 200 and sse_events(ok.body)[-1]["isFinal"]
    # A token in the query is not a credential the stack accepts: refused, and not logged.
    statuses = []
    for i, path in enumerate(
        (
            f"/api/v1/ai/generate/stream?prompt=hi&access_token={QUERY_TOKEN}",
            f"/api/v1/ai/generate?access_token={QUERY_TOKEN}",
        )
    ):
        rid = _rid(f"qtoken{i}")
        if path.startswith("/api/v1/ai/generate?"):
            reply = request(edge, "POST", path, {"prompt": "hi"}, headers={"x-request-id": rid})
        else:
            reply = request(edge, "GET", path, headers={"x-request-id": rid})
        statuses.append(reply.status)
        assert reply.status in (400, 401), reply
    wait_access_log(stack["envoy"], rid)
    print(f"\nquery-string outcomes: GET prompt -> {ok.status}, access_token -> {statuses}")
    leaks = _leaks(stack, QUERY_SECRETS)
    assert not leaks, "\n".join(leaks)
    # The access log says what the caller did: a GET, its path without the query.
    logged = wait_access_log(stack["envoy"], get_rid)
    assert logged["method"] == "GET" and "?" not in logged["path"], logged
    raw = stack["record"].read_text()
    assert QUERY_TOKEN not in raw, "a query-string token reached the agent's metadata"
