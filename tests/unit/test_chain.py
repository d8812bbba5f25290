"""The interceptor chains: one place, one documented order."""

from __future__ import annotations

from core.settings import load_settings
from interceptors.auth import AuthInterceptor
from interceptors.breaker import CircuitBreaker
from interceptors.deadline import DeadlineInterceptor
from interceptors.error_handling import ErrorInterceptor
from interceptors.limits import LimitsInterceptor
from interceptors.observability import ObservabilityInterceptor
from interceptors.request_context import RequestContextInterceptor
from interceptors.upstream_breaker import BreakerStreamInterceptor, BreakerUnaryInterceptor
from interceptors.validation import ValidationInterceptor
from server.chain import client_interceptors, method_deadlines, server_interceptors
from server.telemetry import Telemetry

PREFIX = "/ai.agent.v1.AgentService/"


def kinds(chain) -> list[type]:
    return [type(i) for i in chain]


def test_server_chain_order_outermost_first() -> None:
    assert kinds(server_interceptors(load_settings())) == [
        RequestContextInterceptor,
        ErrorInterceptor,
        LimitsInterceptor,
        ValidationInterceptor,
        DeadlineInterceptor,
    ]


def test_full_server_chain_with_telemetry_and_tracing() -> None:
    settings = load_settings(tracing={"exporter": "console"})
    telemetry = Telemetry(settings)
    try:
        chain = kinds(server_interceptors(settings, telemetry))
    finally:
        telemetry.shutdown()
    assert chain[0] is RequestContextInterceptor
    assert chain[1].__module__.startswith("opentelemetry.instrumentation.grpc")
    assert chain[2:] == [
        ObservabilityInterceptor,
        ErrorInterceptor,
        LimitsInterceptor,
        ValidationInterceptor,
        DeadlineInterceptor,
    ]


def test_auth_joins_the_chain_after_errors_before_limits() -> None:
    settings = load_settings(auth={"jwt_secret": "x" * 32})
    assert kinds(server_interceptors(settings)) == [
        RequestContextInterceptor,
        ErrorInterceptor,
        AuthInterceptor,
        LimitsInterceptor,
        ValidationInterceptor,
        DeadlineInterceptor,
    ]


def test_disabled_interceptors_leave_the_chain() -> None:
    settings = load_settings(limits={"enabled": False}, validation={"enabled": False})
    assert kinds(server_interceptors(settings)) == [
        RequestContextInterceptor,
        ErrorInterceptor,
        DeadlineInterceptor,
    ]


def test_client_chain_has_the_endpoints_breaker() -> None:
    breaker = CircuitBreaker("127.0.0.1:1")
    unary, stream = client_interceptors(breaker)
    # One object per call type: grpc.aio files an interceptor under its first type only.
    assert isinstance(unary, BreakerUnaryInterceptor) and unary.breaker is breaker
    assert isinstance(stream, BreakerStreamInterceptor) and stream.breaker is breaker
    assert client_interceptors(None) == []


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
