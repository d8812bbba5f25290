"""Upstream failures in the proxy's one error shape (core/errors.py).

An agent's error reaches the caller with the agent's code where it describes the
caller's request, and its message only when that message cannot carry internals
(exception text, addresses); everything else becomes a generic error of the right code,
with the original in the log. `to_proxy_error` is the one entry point: any exception in,
the error the caller gets out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiproxy.core.errors import (
    MAX_UPSTREAM_MESSAGE_LEN,
    UNAVAILABLE_RETRY_DELAY_S,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ProxyError,
    QuotaViolation,
    RateLimited,
    Reason,
    SessionNotFound,
    SessionStoreUnavailable,
    UpstreamError,
    UpstreamUnavailable,
    internal_error,
)

# Codes whose message describes the caller's request, so it can be passed on. Messages of
# the other codes are where servers put exception text ("Exception calling application:
# ...") and the C-core puts addresses ("ipv4:10.0.0.3:50052: Connection refused").
_CALLER_FACING_CODES: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
_LEAK_MARKERS: Final = ("traceback", 'file "', "exception", "ipv4:", "ipv6:", "unix:", "0x")

# Upstream ErrorInfo reasons that mean "this caller is rate limited" (ours and Google's).
_UPSTREAM_RATE_LIMIT_REASONS: Final = frozenset({"RATE_LIMITED", "RATE_LIMIT_EXCEEDED"})

# Reasons the agents give (agent/sessions.py) that the caller gets as they are: what its
# conversation is (not found), or what is down (the agents' shared session store).
_SESSION_ERRORS: Final = {
    (grpc.StatusCode.NOT_FOUND, Reason.SESSION_NOT_FOUND.value): SessionNotFound,
    (grpc.StatusCode.UNAVAILABLE, Reason.SESSION_STORE_UNAVAILABLE.value): SessionStoreUnavailable,
}

# An upstream UNAVAILABLE with these reasons is a shared dependency that is down, not the
# replica that answered: it says nothing about that replica (its breaker does not count
# it) and another replica would fail the same way (the call is not retried).
NOT_THE_REPLICAS_FAULT: Final = frozenset({Reason.SESSION_STORE_UNAVAILABLE.value})


def _safe_upstream_message(code: grpc.StatusCode, message: str) -> str | None:
    """The upstream's message if it may reach the caller, else None.

    The rule: only for caller-facing codes (the message is about the request), at most
    MAX_UPSTREAM_MESSAGE_LEN characters, one printable line, and none of the markers of
    stack traces, exception text, addresses or pointers. Anything else is replaced by a
    generic message; the original goes to the proxy's log with the request id.
    """
    if code not in _CALLER_FACING_CODES or not message or len(message) > MAX_UPSTREAM_MESSAGE_LEN:
        return None
    if not message.isprintable():  # also rejects newlines and tabs
        return None
    lowered = message.lower()
    if any(marker in lowered for marker in _LEAK_MARKERS):
        return None
    return message


@dataclass(slots=True)
class _UpstreamDetails:
    """The upstream's status details the proxy understands; DebugInfo and the rest
    are dropped (DebugInfo is literally a stack trace)."""

    reason: str = ""
    retry_delay_s: float | None = None
    quota: tuple[QuotaViolation, ...] = ()
    fields: tuple[FieldViolation, ...] = ()


def _upstream_details(code: grpc.StatusCode, status: status_pb2.Status | None) -> _UpstreamDetails:
    out = _UpstreamDetails()
    if status is None or status.code != code.value[0]:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out.retry_delay_s = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            out.quota = tuple(QuotaViolation(v.subject, v.description) for v in quota.violations)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.fields = tuple(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return out


def from_upstream(
    code: grpc.StatusCode,
    details: str,
    status_proto: status_pb2.Status | None = None,
    *,
    unavailable_retry_s: float = UNAVAILABLE_RETRY_DELAY_S,
) -> ProxyError:
    """Map an upstream's failure onto the proxy's error shape.

    UNAVAILABLE, and CANCELLED the proxy did not ask for (the upstream went away) ->
    UpstreamUnavailable with RetryInfo (the upstream's delay, else `unavailable_retry_s`);
    NOT_FOUND SESSION_NOT_FOUND -> SessionNotFound; UNAVAILABLE SESSION_STORE_UNAVAILABLE
    -> SessionStoreUnavailable with RetryInfo (the agents' reasons, kept as they are);
    DEADLINE_EXCEEDED -> DeadlineExceeded; INVALID_ARGUMENT -> InvalidArgument keeping
    the upstream's BadRequest; PERMISSION_DENIED -> PermissionDenied;
    RESOURCE_EXHAUSTED -> RateLimited if the upstream's ErrorInfo says so, else
    UpstreamError, keeping RetryInfo and QuotaFailure either way;
    UNAUTHENTICATED -> UpstreamError INTERNAL: the proxy, not the caller, authenticates
    to the upstream, so a 401 would send a browser into a pointless re-login;
    anything else -> UpstreamError with the same code. The ErrorInfo metadata records
    `upstreamCode`; the message follows `_safe_upstream_message`.
    """
    if code is grpc.StatusCode.OK:
        raise ValueError("from_upstream needs a failed call")
    found = _upstream_details(code, status_proto)
    message = _safe_upstream_message(code, details)
    metadata = {"upstreamCode": code.name}
    session_error = _SESSION_ERRORS.get((code, found.reason))
    if session_error is not None:
        delay = found.retry_delay_s
        if delay is None and code is grpc.StatusCode.UNAVAILABLE:
            delay = unavailable_retry_s
        return session_error(metadata=metadata, retry_delay_s=delay)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        delay = found.retry_delay_s if found.retry_delay_s is not None else unavailable_retry_s
        return UpstreamUnavailable(metadata=metadata, retry_delay_s=delay)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(metadata=metadata)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(message, metadata=metadata, field_violations=found.fields)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(message, metadata=metadata)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and found.reason in _UPSTREAM_RATE_LIMIT_REASONS:
        return RateLimited(
            message,
            metadata=metadata,
            retry_delay_s=found.retry_delay_s,
            quota_violations=found.quota,
        )
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return UpstreamError(code=grpc.StatusCode.INTERNAL, metadata=metadata)
    return UpstreamError(
        message,
        code=code,
        metadata=metadata,
        retry_delay_s=found.retry_delay_s,
        quota_violations=found.quota,
    )


def parse_rpc_error(
    err: grpc.aio.AioRpcError,
) -> tuple[grpc.StatusCode, str, status_pb2.Status | None]:
    """(code, message, rich status or None) of a failed grpc.aio call.

    grpcio-status's synchronous `from_call` reads it (its async twin would need the
    call object, which a raised error no longer is). A rich status that does not
    decode or disagrees with the call's code or message is ignored rather than trusted.
    """
    try:
        # AioRpcError is not a grpc.Call, but has the synchronous accessors from_call uses.
        status: status_pb2.Status | None = rpc_status.from_call(cast(grpc.Call, err))
    except (ValueError, DecodeError):
        status = None
    return err.code(), err.details() or "", status


def upstream_reason(err: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed upstream call ("" when it has none). Parses the
    status details: for failure paths only (e.g. `NOT_THE_REPLICAS_FAULT`)."""
    code, _, status = parse_rpc_error(err)
    return _upstream_details(code, status).reason


def not_the_replicas_fault(err: grpc.aio.AioRpcError) -> bool:
    """True for an UNAVAILABLE that names a shared dependency (NOT_THE_REPLICAS_FAULT):
    neither a breaker failure of the replica nor a reason to retry on another."""
    return err.code() is grpc.StatusCode.UNAVAILABLE and upstream_reason(err) in (
        NOT_THE_REPLICAS_FAULT
    )


def to_proxy_error(exc: Exception) -> ProxyError:
    """Any exception as the error the caller gets: ProxyErrors as they are, failed
    upstream calls via `from_upstream`, anything else as a generic INTERNAL (log `exc`).
    asyncio.CancelledError is a BaseException and must propagate, not come here."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_upstream(*parse_rpc_error(exc))
    return internal_error()
