"""The deployment's own interceptors (server.extra_interceptors, upstream.extra_interceptors)
with real agent and proxy processes: the example interceptor (interceptors/examples/audit.py,
on grpc-interceptor's AsyncServerInterceptor) sees every call, streams included, and its
abort is shaped like the proxy's own errors; the upstream one tags every call sent."""

from __future__ import annotations

import json

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.errors import DOMAIN
from aiproxy.core.settings import ConfigError, load_settings
from aiproxy.server.extensions import check_settings
from tests.conftest import agent_args, proxy_args
from tests.integration.test_pool import endpoints
from tests.support.grpc_helpers import stub
from tests.support.procs import recorded_metadata

AUDIT = "aiproxy.interceptors.examples.audit:CallAudit"


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    raw = dict(exc.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, "no google.rpc.Status in the trailers"
    status = status_pb2.Status.FromString(raw)
    assert status.code == exc.code().value[0]
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo")


async def test_extra_interceptors_see_every_call(spawn, tmp_path) -> None:
    record = tmp_path / "metadata.jsonl"
    agent = spawn(*agent_args("--record-metadata", str(record)), name="agent")
    env = {
        "AIPROXY_SERVER__EXTRA_INTERCEPTORS": json.dumps([AUDIT]),
        "AIPROXY_UPSTREAM__EXTRA_INTERCEPTORS": json.dumps(
            ["tests.support.client_tagger:make_tagger"]
        ),
        "AIPROXY_EXAMPLE_DENIED_TENANTS": "blocked,evil",
    }
    proxy = spawn(*proxy_args(agent.address), env=env, name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        api = stub(channel)
        reply = await api.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
        assert reply.text
        stream = api.StreamGenerate(
            pb.StreamGenerateRequest(prompt="count", options=pb.GenerationOptions(max_tokens=5)),
            timeout=10,
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].is_final
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert await endpoints(channel)

        # Refused by the example, unary and stream alike: our error shape.
        for call in (
            lambda md: api.Generate(pb.GenerateRequest(prompt="x"), timeout=10, metadata=md),
            lambda md: api.StreamGenerate(
                pb.StreamGenerateRequest(prompt="x"), timeout=10, metadata=md
            ).read(),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call((("x-tenant", "blocked"),))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            info = error_info(refused.value)
            assert (info.reason, info.domain) == ("PERMISSION_DENIED", DOMAIN)
        # Another tenant passes.
        assert (
            await api.Generate(
                pb.GenerateRequest(prompt="x"), timeout=10, metadata=(("x-tenant", "good"),)
            )
        ).text

    def audited() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for line in proxy.log_events("audit_call"):
            out.setdefault(line["method"].rsplit("/", 1)[-1], []).append(line)
        return out

    lines = proxy.wait_for_log(lambda e: e.get("tenant") == "good") and audited()
    assert [(e["code"], e["messages"]) for e in lines["StreamGenerate"]] == [
        ("OK", len(chunks)),
        ("PERMISSION_DENIED", 0),
    ]
    assert [e["code"] for e in lines["Generate"]] == ["OK", "PERMISSION_DENIED", "OK"]
    assert lines["Check"][0]["code"] == "OK"
    assert lines["ListEndpoints"][0]["code"] == "OK"
    # The stream's line is written when it ends, not when its generator is created.
    assert lines["StreamGenerate"][0]["duration_ms"] > 0

    # Upstream: every call the proxy sent carried the tag; the refused ones were never sent.
    sent = [c for c in recorded_metadata(record) if c["method"].startswith("/ai.agent")]
    assert len(sent) == 3
    assert all(c["metadata"].get("x-deployment") == ["tagged"] for c in sent)


@pytest.mark.parametrize(
    "setting, path, message",
    [
        ("server", "tests.support.client_tagger:make_tagger", "not a grpc.aio.ServerInterceptor"),
        ("upstream", AUDIT, "not a grpc.aio.ClientInterceptor"),
        ("server", "tests.support.nope:X", "cannot import"),
        ("upstream", "tests.support.client_tagger:NOT_AN_INTERCEPTOR", "neither"),
        ("server", "no-colon", "module:attribute"),
    ],
)
def test_a_wrong_interceptor_fails_start_up_by_name(setting: str, path: str, message: str) -> None:
    with pytest.raises((ConfigError, ValueError)) as err:
        check_settings(load_settings(**{setting: {"extra_interceptors": [path]}}))
    assert message in str(err.value)
