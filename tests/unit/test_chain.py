"""The pipeline order and the upstream chains: one place, one documented order."""

from __future__ import annotations

from aiproxy.core.service import agent_service
from aiproxy.core.settings import load_settings
from aiproxy.interceptors.auth import AuthStage
from aiproxy.interceptors.deadline import DeadlineStage
from aiproxy.interceptors.limits import Limits
from aiproxy.interceptors.observability import Observability
from aiproxy.interceptors.request_context import RequestContext
from aiproxy.interceptors.validation import Validation
from aiproxy.server.chain import DECODE, client_interceptors, method_deadlines, pipeline_stages
from aiproxy.server.telemetry import Telemetry

PREFIX = "/ai.agent.v1.AgentService/"


def kinds(chain) -> list[type]:
    return [type(i) for i in chain]


def test_pipeline_order_outermost_first() -> None:
    assert kinds(pipeline_stages(load_settings())) == [
        RequestContext,
        type(DECODE),
        Limits,
        Validation,
        DeadlineStage,
    ]


def test_full_pipeline_with_telemetry_and_tracing() -> None:
    settings = load_settings(tracing={"exporter": "console"})
    telemetry = Telemetry(settings)
    try:
        order = kinds(pipeline_stages(settings, telemetry))
    finally:
        telemetry.shutdown()
    # The OpenTelemetry server interceptor is a grpc.aio interceptor (server/app.py),
    # outside the pipeline; the stages are the same with tracing on or off.
    assert order == [
        RequestContext,
        Observability,
        type(DECODE),
        Limits,
        Validation,
        DeadlineStage,
    ]


def test_auth_joins_before_limits() -> None:
    settings = load_settings(auth={"jwt_secret": "x" * 32})
    assert kinds(pipeline_stages(settings)) == [
        RequestContext,
        AuthStage,
        type(DECODE),
        Limits,
        Validation,
        DeadlineStage,
    ]


def test_disabled_stages_leave_the_pipeline() -> None:
    settings = load_settings(limits={"enabled": False}, validation={"enabled": False})
    assert kinds(pipeline_stages(settings)) == [RequestContext, type(DECODE), DeadlineStage]


def test_every_stage_binds_every_api_method_once() -> None:
    """Bound at start-up: each stage gives each method its hooks (or None)."""
    settings = load_settings(auth={"jwt_secret": "x" * 32})
    service = agent_service()
    for stage in pipeline_stages(settings):
        if stage is DECODE:
            continue
        for method in service.methods:
            bound = stage.bind(method)
            assert bound is not None, (stage, method.name)
            assert callable(bound.enter)
            assert bound.exit is None or callable(bound.exit)


def test_upstream_channels_carry_no_interceptors_unless_tracing() -> None:
    # The breaker and the client metrics are in the upstream call (server/pool/endpoint.py),
    # not grpc.aio client interceptors (issue 15: ~115 us of CPU per call).
    assert client_interceptors(None) == []
    assert client_interceptors(Telemetry(load_settings())) == []


def test_deadlines_by_kind_with_overrides() -> None:
    settings = load_settings(
        deadlines={"per_method": {"BatchGenerate": {"default_s": 60, "max_s": 90}}}
    )
    limits = method_deadlines(settings)
    assert (
        limits.limit_for(PREFIX + "Generate").max_s,
        limits.limit_for(PREFIX + "StreamChat").max_s,
    ) == (30, 120)
    assert (
        limits.limit_for(PREFIX + "ExecuteAgent").max_s
        == limits.limit_for(PREFIX + "StreamExecuteAgent").max_s
        == 300
    )
    assert (
        limits.limit_for(PREFIX + "BatchGenerate").default_s,
        limits.limit_for(PREFIX + "BatchGenerate").max_s,
    ) == (60, 90)
