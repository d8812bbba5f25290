"""Sessions on the proxy's side (issue 22): the owner it tells the agent, the agents'
session errors in the one error shape, and what a session-store outage must not do
(count against a replica's breaker, be retried on another replica, be cached)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from aiproxy.agent.sessions import SessionNotFound as AgentSessionNotFound
from aiproxy.agent.sessions import SessionStoreUnavailable as AgentStoreUnavailable
from aiproxy.agent.sessions import owner_of, quota_of
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core import errors
from aiproxy.core.callinfo import CallInfo
from aiproxy.core.headers import SESSION_OWNER_HEADER, SESSION_QUOTA_HEADER
from aiproxy.core.service import SESSION_METHODS, agent_service
from aiproxy.core.sessions import ANONYMOUS_OWNER, scoped_key, session_owner, session_quota
from aiproxy.core.settings import ValidationSettings
from aiproxy.core.upstream_errors import from_upstream, not_the_replicas_fault, to_proxy_error
from aiproxy.interceptors.validation import RequestRules
from aiproxy.server.pool.calls import settle_failed

Code = grpc.StatusCode


def _call(identity: str = "", tenant: str = "") -> CallInfo:
    return CallInfo("/ai.agent.v1.AgentService/Chat", identity=identity, tenant=tenant)


@pytest.mark.parametrize("seed", range(5))
def test_anonymous_callers_share_the_owner_but_each_address_has_its_own_quota(seed: int) -> None:
    """Generated addresses: every anonymous caller is the owner "anonymous", but counts its
    sessions under its own address's quota (a hash: no address in it); a verified caller's
    quota is its owner; no address known, the shared "anonymous" as before."""
    import random

    rng = random.Random(seed)
    addresses = {f"{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}.{n}"
                 for n in range(50)} | {f"2001:db8::{rng.randrange(1 << 16):x}"}  # fmt: skip
    quotas = {}
    for address in addresses:
        call = _call(f"peer:{address}")
        owner = session_owner(call)
        assert owner == ANONYMOUS_OWNER
        quota = session_quota(call, owner)
        assert quota == session_quota(_call(f"peer:{address}"), owner)  # stable
        assert address not in quota and len(quota) == 33 and quota.isascii()
        assert quota_of([(SESSION_QUOTA_HEADER, quota)], owner) == quota  # the agent reads it
        quotas[address] = quota
    assert len(set(quotas.values())) == len(addresses)
    alice = _call("sub:alice")
    assert session_quota(alice, session_owner(alice)) == session_owner(alice)
    assert session_quota(_call(""), ANONYMOUS_OWNER) == ANONYMOUS_OWNER
    # The agent falls back to the owner for a missing or malformed quota.
    assert quota_of([], "o") == "o"
    assert quota_of([(SESSION_QUOTA_HEADER, "x" * 500)], "o") == "o"
    assert quota_of([(SESSION_QUOTA_HEADER, "bad\x00value")], "o") == "o"


def test_the_owner_is_the_verified_identity_hashed_and_anonymous_otherwise() -> None:
    alice = session_owner(_call("sub:alice"))
    assert alice == session_owner(_call("sub:alice"))  # stable across calls and replicas
    assert len(alice) == 32 and alice.isascii() and alice.isalnum()
    assert "alice" not in alice
    assert alice != session_owner(_call("sub:mallory"))
    assert alice != session_owner(_call("key:alice"))  # kinds never collide
    # A tenant shares nothing: the same subject in another tenant is another owner.
    assert session_owner(_call("sub:alice", "acme")) not in (
        alice,
        session_owner(_call("sub:alice", "globex")),
    )
    # Not verified by the auth stage (the limits stage's peer:, or nothing): anonymous.
    assert session_owner(_call("peer:10.0.0.1")) == ANONYMOUS_OWNER
    assert session_owner(_call("")) == ANONYMOUS_OWNER
    assert session_owner(_call("sub:\u00e9l\u00e8ve")).isascii()  # any subject, ASCII owner
    assert scoped_key("a", "s") != scoped_key("a\x00s", "")


def test_the_agent_reads_the_owner_and_refuses_what_the_proxy_never_sends() -> None:
    assert owner_of([("x-request-id", "r"), (SESSION_OWNER_HEADER, "0f" * 16)]) == "0f" * 16
    assert owner_of([]) == owner_of(None) == ANONYMOUS_OWNER
    assert owner_of([(SESSION_OWNER_HEADER, "x" * 257)]) == ANONYMOUS_OWNER
    assert owner_of([(SESSION_OWNER_HEADER, "")]) == ANONYMOUS_OWNER


def test_the_session_methods_are_marked_in_the_service_model() -> None:
    service = agent_service()
    marked = {m.name for m in service.methods if m.sessions}
    assert marked == SESSION_METHODS
    assert {"CreateSession", "GetSession", "DeleteSession"} <= set(service.by_name)
    assert not service.by_name["GetSession"].streaming
    assert service.by_name["DeleteSession"].deadline_class == "unary"


def _rpc_error(status: status_pb2.Status) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        Code(next(c for c in Code if c.value[0] == status.code)),
        trailing_metadata=grpc.aio.Metadata(
            (errors.STATUS_DETAILS_KEY, status.SerializeToString())
        ),
        details=status.message,
    )


def test_the_agents_session_errors_reach_the_caller_in_the_one_shape() -> None:
    missing = to_proxy_error(_rpc_error(AgentSessionNotFound().to_status()))
    assert isinstance(missing, errors.SessionNotFound)
    assert (missing.code, missing.reason) == (Code.NOT_FOUND, errors.Reason.SESSION_NOT_FOUND)
    assert missing.retry_delay_s is None

    down = to_proxy_error(_rpc_error(AgentStoreUnavailable().to_status()))
    assert isinstance(down, errors.SessionStoreUnavailable)
    assert (down.code, down.reason) == (Code.UNAVAILABLE, errors.Reason.SESSION_STORE_UNAVAILABLE)
    assert down.retry_delay_s == 1.0
    status = errors.to_status_proto(down)
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry) and retry.retry_delay.ToMilliseconds() == 1000

    # Another code with that reason is not ours to trust: the usual mapping.
    odd = status_pb2.Status(code=code_pb2.INTERNAL, message="x")
    odd.details.add().Pack(error_details_pb2.ErrorInfo(reason="SESSION_NOT_FOUND"))
    assert isinstance(to_proxy_error(_rpc_error(odd)), errors.UpstreamError)
    # Without RetryInfo from the agent, the proxy's own delay.
    bare = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="down")
    bare.details.add().Pack(error_details_pb2.ErrorInfo(reason="SESSION_STORE_UNAVAILABLE"))
    assert from_upstream(Code.UNAVAILABLE, "down", bare).retry_delay_s == 1.0


class _Permit:
    def __init__(self) -> None:
        self.outcome: Any = None

    def record(self, code: Code) -> None:
        self.outcome = code

    def ignore(self) -> None:
        self.outcome = "ignored"


def test_a_session_store_outage_is_not_the_replicas_fault() -> None:
    store_down = _rpc_error(AgentStoreUnavailable().to_status())
    replica_down = grpc.aio.AioRpcError(Code.UNAVAILABLE, details="connection refused")
    assert not_the_replicas_fault(store_down)
    assert not not_the_replicas_fault(replica_down)
    permit = _Permit()
    settle_failed(permit, store_down)  # type: ignore[arg-type]
    assert permit.outcome == "ignored"
    settle_failed(permit, replica_down)  # type: ignore[arg-type]
    assert permit.outcome is Code.UNAVAILABLE
    settle_failed(None, store_down)  # no breaker: nothing to settle


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (pb.CreateSessionRequest(), []),
        (pb.GetSessionRequest(session_id="sess_abc"), []),
        (pb.GetSessionRequest(), ["session_id"]),
        (pb.DeleteSessionRequest(session_id="x" * 1000), ["session_id"]),
        (pb.DeleteSessionRequest(session_id="a\nb"), ["session_id"]),
    ],
)
def test_the_session_requests_are_validated(request_: Any, fields: list[str]) -> None:
    rules = RequestRules(ValidationSettings())
    validators = rules.for_service(pb.DESCRIPTOR.services_by_name["AgentService"])
    path = f"/ai.agent.v1.AgentService/{type(request_).__name__.removesuffix('Request')}"
    assert [v.field for v in validators[path](request_)] == fields


def test_agent_retry_info_is_whole_milliseconds() -> None:
    status = AgentStoreUnavailable().to_status()
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry)
    assert retry.retry_delay == duration_pb2.Duration(seconds=1)


def test_the_agent_takes_its_session_store_from_flags_then_environment() -> None:
    import argparse

    from aiproxy.agent import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    env = {
        "AIPROXY_AGENT_SESSIONS": "redis",
        "AIPROXY_AGENT_REDIS_URL": "redis://sessions:6379/1",
        "AIPROXY_AGENT_SESSION_TTL_S": "60",
    }
    settings = cli.settings_from_args(parser.parse_args([]), env)
    assert (settings.sessions, settings.redis_url, settings.session_ttl_s) == (
        "redis",
        "redis://sessions:6379/1",
        60.0,
    )
    assert settings.prefill_ms_per_token == 0 and settings.replica_name is None  # off
    flags = parser.parse_args(
        ["--sessions", "memory", "--prefill-ms-per-token", "2", "--replica-name", "r1"]
    )
    settings = cli.settings_from_args(flags, env)
    assert (settings.sessions, settings.prefill_ms_per_token, settings.replica_name) == (
        "memory",
        2.0,
        "r1",
    )
    assert cli.settings_from_args(parser.parse_args([]), {}).sessions == "memory"
    with pytest.raises(ValueError, match="redis_url"):
        cli.settings_from_args(parser.parse_args(["--sessions", "redis"]), {})
    with pytest.raises(ValueError, match="redis_url must be"):
        cli.settings_from_args(
            parser.parse_args(["--sessions", "redis", "--redis-url", "http://x"]), {}
        )
