"""Authentication end to end: a real agent and a real proxy with auth switched on by
the environment, tokens minted by `aiproxy token`, errors read back as google.rpc.Status.

Plus the real server chain in-process, to see the identity the chain records for the
call (CallInfo.caller, which the access log and the rate limiter read).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from aiproxy.ai.proxy.v1 import admin_service_pb2, admin_service_pb2_grpc
from aiproxy.core.callinfo import current_call
from aiproxy.core.errors import DOMAIN
from aiproxy.core.ratelimit import caller_key, hash_api_key
from aiproxy.core.settings import load_settings
from aiproxy.server.chain import pipeline_stages
from tests.conftest import proxy_args
from tests.support.grpc_helpers import SERVING, stub, wait_health
from tests.support.pipeline import serving
from tests.support.procs import aiproxy_argv

SECRET = "integration-secret-0123456789abcdefghij"
AUDIENCE = "aiproxy"
API_KEY = "ak_integration_7c1d"
AUTH_ENV = {
    "AIPROXY_AUTH__JWT_SECRET": SECRET,
    "AIPROXY_AUTH__AUDIENCE": json.dumps([AUDIENCE]),
    "AIPROXY_AUTH__METHOD_SCOPES": json.dumps(
        {"ExecuteAgent": ["agent:execute"], "StreamExecuteAgent": ["agent:execute"]}
    ),
    "AIPROXY_AUTH__API_KEYS": json.dumps(
        [{"name": "ci", "key_hash": hash_api_key(API_KEY), "scopes": []}]
    ),
}
GENERATE = pb.GenerateRequest(
    prompt="Explain token buckets", options=pb.GenerationOptions(max_tokens=8)
)
EXECUTE = pb.ExecuteAgentRequest(
    agent_type=pb.AGENT_TYPE_ANALYSIS, task="What is 12*7?", tools=["calculator"]
)


def mint(*args: str) -> str:
    """A token from the `aiproxy token` command, as a developer would get one."""
    out = subprocess.run(
        aiproxy_argv("token", "--secret", SECRET, *args),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def token(**overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "aud": AUDIENCE, "iat": now, "exp": now + 300}
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET, algorithm="HS256")


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(cast(grpc.Call, err))
    assert status is not None, f"no google.rpc.Status in {err}"
    assert status.code == err.code().value[0]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


@pytest.fixture
def auth_proxy(spawn, agent):
    return spawn(*proxy_args(agent.address), env=AUTH_ENV, name="proxy")


@pytest.fixture
async def channel(auth_proxy) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(auth_proxy.address) as ch:
        yield ch


async def test_valid_token_passes_unary_and_stream(channel, auth_proxy) -> None:
    good = mint("--sub", "alice", "--aud", AUDIENCE, "--scope", "agent:execute", "--ttl", "300")
    reply = await stub(channel).Generate(GENERATE, metadata=bearer(good), timeout=10)
    assert reply.text
    chunks = [
        c
        async for c in stub(channel).StreamGenerate(
            pb.StreamGenerateRequest(prompt="hi"), metadata=bearer(good), timeout=10
        )
    ]
    assert chunks and chunks[-1].is_final
    result = await stub(channel).ExecuteAgent(EXECUTE, metadata=bearer(good), timeout=10)
    assert result.result
    assert good not in auth_proxy.stderr_text()


async def test_api_key_passes(channel) -> None:
    reply = await stub(channel).Generate(GENERATE, metadata=(("x-api-key", API_KEY),), timeout=10)
    assert reply.text
    reply = await stub(channel).Generate(
        GENERATE, metadata=(("authorization", f"ApiKey {API_KEY}"),), timeout=10
    )
    assert reply.text


def unsigned_token() -> str:
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'alice', 'aud': AUDIENCE, 'exp': now + 300})}."


REJECTIONS = {
    "missing": (lambda: (), "missing_credentials"),
    "expired": (lambda: bearer(token(exp=int(time.time()) - 600)), "token_expired"),
    "wrong-signature": (
        lambda: bearer(
            jwt.encode(
                {"sub": "alice", "aud": AUDIENCE, "exp": int(time.time()) + 300},
                "x" * 40,
                algorithm="HS256",
            )
        ),
        "bad_signature",
    ),
    "wrong-audience": (lambda: bearer(token(aud="another-service")), "wrong_audience"),
    "alg-none": (lambda: bearer(unsigned_token()), "algorithm_not_allowed"),
    "malformed": (lambda: bearer("this.is.not-a-jwt"), "malformed_token"),
    "unknown-api-key": (lambda: (("x-api-key", "guess"),), "unknown_api_key"),
}


@pytest.mark.parametrize("make_metadata,cause", REJECTIONS.values(), ids=REJECTIONS.keys())
async def test_rejected_credentials_are_unauthenticated(
    channel, auth_proxy, make_metadata, cause
) -> None:
    metadata = (*make_metadata(), ("x-request-id", f"req-{cause}"))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub(channel).Generate(GENERATE, metadata=metadata, timeout=10)
    err = exc.value
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    info = error_info(err)
    assert (info.reason, info.domain, info.metadata["cause"]) == ("UNAUTHENTICATED", DOMAIN, cause)
    assert ("x-request-id", f"req-{cause}") in tuple(err.trailing_metadata() or ())
    line = auth_proxy.wait_for_log(
        lambda e: e.get("event") == "auth_rejected" and e.get("request_id") == f"req-{cause}"
    )
    assert line["cause"] == cause and line["code"] == "UNAUTHENTICATED"
    for key, value in metadata:
        if key in ("authorization", "x-api-key"):
            assert value.split()[-1] not in auth_proxy.stderr_text()


async def test_streams_are_refused_before_the_first_chunk(channel) -> None:
    call = stub(channel).StreamGenerate(
        pb.StreamGenerateRequest(prompt="hi"), metadata=bearer(token(exp=1)), timeout=10
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in call:
            raise AssertionError("no chunk may reach an unauthenticated caller")
    assert exc.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error_info(exc.value).metadata["cause"] == "token_expired"


async def test_missing_scope_is_permission_denied(channel) -> None:
    reader = token(scope="read")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub(channel).ExecuteAgent(EXECUTE, metadata=bearer(reader), timeout=10)
    assert exc.value.code() is grpc.StatusCode.PERMISSION_DENIED
    info = error_info(exc.value)
    assert info.reason == "PERMISSION_DENIED"
    assert dict(info.metadata) == {"cause": "missing_scope", "scope": "agent:execute"}
    stream = stub(channel).StreamExecuteAgent(
        pb.StreamExecuteAgentRequest(agent_type=pb.AGENT_TYPE_ASSISTANT, task="count words"),
        metadata=bearer(reader),
        timeout=10,
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stream:
            pass
    assert exc.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # The same token may still call what needs no scope.
    assert (await stub(channel).Generate(GENERATE, metadata=bearer(reader), timeout=10)).text


async def test_health_and_reflection_need_no_credentials(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status == SERVING
    await wait_health(channel, SERVING, service="ai.agent.v1.AgentService")
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo(timeout=10)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    assert "ai.agent.v1.AgentService" in {s.name for s in reply.list_services_response.service}


async def test_admin_service_needs_credentials_and_the_admin_scope(channel) -> None:
    admin = admin_service_pb2_grpc.ProxyAdminServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await admin.ListEndpoints(admin_service_pb2.ListEndpointsRequest(), timeout=10)
    assert exc.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # Issue 20 §4: any authenticated subject, with no scope, could read the pool.
    for scope in (None, "agent:execute", "aiproxy.admins"):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await admin.ListEndpoints(
                admin_service_pb2.ListEndpointsRequest(),
                metadata=bearer(token(scope=scope)),
                timeout=10,
            )
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert error_info(denied.value).metadata["scope"] == "aiproxy.admin"
    reply = await admin.ListEndpoints(
        admin_service_pb2.ListEndpointsRequest(),
        metadata=bearer(token(scope="agent:execute aiproxy.admin")),
        timeout=10,
    )
    assert reply.endpoints


# -- the chain in-process: the identity recorded for the call ---------------------------


class RecordingAgent(pb_grpc.AgentServiceServicer):
    """Answers Generate/StreamGenerate and records the caller the chain saw."""

    def __init__(self) -> None:
        self.callers: list[str] = []

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        call = current_call.get()
        assert call is not None
        self.callers.append(call.caller)
        return pb.GenerateResponse(text="ok")

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        call = current_call.get()
        assert call is not None
        self.callers.append(call.caller)
        yield pb.StreamGenerateResponse(delta="ok", is_final=True)


@pytest.fixture
async def chain_server(monkeypatch) -> AsyncIterator[tuple[str, RecordingAgent]]:
    for key, value in AUTH_ENV.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    servicer = RecordingAgent()
    async with serving(servicer, pipeline_stages(settings)) as address:
        yield address, servicer


async def test_the_subject_is_the_callers_rate_limit_key(chain_server) -> None:
    address, servicer = chain_server
    async with grpc.aio.insecure_channel(address) as ch:
        await stub(ch).Generate(GENERATE, metadata=bearer(token(sub="alice")), timeout=10)
        async for _ in stub(ch).StreamGenerate(
            pb.StreamGenerateRequest(prompt="x"), metadata=bearer(token(sub="bob")), timeout=10
        ):
            pass
        await stub(ch).Generate(GENERATE, metadata=(("x-api-key", API_KEY),), timeout=10)
    assert servicer.callers == [
        caller_key({}, "", subject="alice"),
        caller_key({}, "", subject="bob"),
        caller_key({"x-api-key": API_KEY}, "ipv4:127.0.0.1:1"),
    ]
    assert servicer.callers[:2] == ["sub:alice", "sub:bob"]


def test_api_key_command_prints_a_working_config_entry(monkeypatch) -> None:
    out = subprocess.run(
        aiproxy_argv("api-key", "--name", "ci", "--scope", "agent:execute"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    raw = out.splitlines()[0].removeprefix("key: ")
    entry = next(line for line in out.splitlines() if "AIPROXY_AUTH__API_KEYS=" in line)
    value = entry.split("=", 1)[1].strip().strip("'")
    assert raw not in value  # only the hash goes into configuration
    monkeypatch.setenv("AIPROXY_AUTH__API_KEYS", value)
    from aiproxy.interceptors.auth import Authenticator

    principal = Authenticator(load_settings().auth).authenticate(
        (("x-api-key", raw),), "ipv4:127.0.0.1:1"
    )
    assert principal.caller == caller_key({"x-api-key": raw}, "") and principal.scopes == {
        "agent:execute"
    }


def test_token_command_signs_with_a_private_key(tmp_path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "signing.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    out = subprocess.run(
        aiproxy_argv(
            "token", "--private-key", str(path), "--sub", "svc", "--kid", "k1", "--ttl", "60"
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert jwt.get_unverified_header(out) == {"alg": "ES256", "kid": "k1", "typ": "JWT"}
    claims = jwt.decode(out, key.public_key(), algorithms=["ES256"])
    assert claims["sub"] == "svc" and claims["exp"] - claims["iat"] == 60
