"""The proxy's one error shape.

Every error that leaves the proxy is a `google.rpc.Status` carried in the
`grpc-status-details-bin` trailer. Its details always start with an `ErrorInfo` whose
`reason` (see `Reason`) is stable and whose `domain` is `DOMAIN`; then, where they
apply, `RetryInfo` (when waiting helps), `QuotaFailure` (which limit was hit) and
`BadRequest` (which fields are wrong). Callers branch on the reason, never on the
message; the message is for humans and never carries internals (stack traces,
addresses): those go to the log.

Code raises a `ProxyError` subclass; the pipeline's one error frame
(server/request/pipeline.py, with interceptors/error_handling.py) turns it into the
status (`abort_with`, or `to_status_proto` for an in-band stream error chunk). Upstream
failures are mapped onto the same shape by core/upstream_errors.py.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, NoReturn

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from aiproxy.core.types import Context, Metadata

DOMAIN: Final = "aiproxy.ai.agent.v1"

# Trailer that carries the serialized google.rpc.Status (the gRPC convention).
STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"

# Trailer beside RetryInfo: the same delay in whole seconds, rounded up. An error before
# the first chunk is a trailers-only response, whose metadata Envoy's transcoder turns
# into HTTP response headers: HTTP callers get `retry-after`, which browsers' fetch code
# and HTTP SDKs pace their retries by (measured with Envoy 1.40: a trailer sent after
# initial metadata would not reach the HTTP headers, and the proxy sends initial metadata
# only with the first chunk). gRPC callers read RetryInfo and ignore it.
RETRY_AFTER_KEY: Final = "retry-after"

# What a caller is told to wait when the upstreams are unavailable and did not say.
UNAVAILABLE_RETRY_DELAY_S: Final = 1.0

# What a caller refused with OVERLOADED is told to wait, by the overload gate and by the
# cap on calls in flight alike (one reason, one delay): long enough for a burst to pass,
# short enough that a retry (jittered by the client) soon finds room.
OVERLOADED_RETRY_DELAY_S: Final = 1.0

# An upstream message longer than this is not passed on (see `_safe_upstream_message`).
MAX_UPSTREAM_MESSAGE_LEN: Final = 200


class Reason(enum.StrEnum):
    """Stable `ErrorInfo.reason` values: part of the API, never renamed."""

    RATE_LIMITED = "RATE_LIMITED"  # the caller's token bucket is empty
    CONCURRENCY_LIMITED = "CONCURRENCY_LIMITED"  # the caller has too many open streams
    OVERLOADED = "OVERLOADED"  # the proxy as a whole is at its concurrency cap
    CIRCUIT_OPEN = "CIRCUIT_OPEN"  # every upstream's breaker is open: failing fast
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"  # no upstream could be reached
    LIMITS_UNAVAILABLE = "LIMITS_UNAVAILABLE"  # the shared limits store is down (fail_closed)
    UPSTREAM_ERROR = "UPSTREAM_ERROR"  # the upstream failed; the code says how
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the effective deadline passed
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # the request is malformed; see BadRequest
    MALFORMED_REQUEST = "MALFORMED_REQUEST"  # the request bytes are not a valid message
    UNAUTHENTICATED = "UNAUTHENTICATED"  # missing or invalid credentials
    PERMISSION_DENIED = "PERMISSION_DENIED"  # authenticated, but not allowed
    CANCELLED = "CANCELLED"  # the caller cancelled (recorded in logs and metrics)
    INTERNAL = "INTERNAL"  # a proxy bug; the details are in the log, by request id
    STREAM_NOT_FOUND = "STREAM_NOT_FOUND"  # no resumable stream by that id (for this caller)
    STREAM_EXPIRED = "STREAM_EXPIRED"  # the stream's data is gone: grace, time or bytes bound
    STREAM_STORE_UNAVAILABLE = "STREAM_STORE_UNAVAILABLE"  # the shared stream store is down
    STREAM_FINISHED = "STREAM_FINISHED"  # resumed after the final chunk: nothing left to send
    STREAM_ORIGIN_LOST = "STREAM_ORIGIN_LOST"  # the replica generating the stream is gone
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"  # no conversation by that id (for this caller)
    SESSION_STORE_UNAVAILABLE = "SESSION_STORE_UNAVAILABLE"  # the agents' session store is down
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"  # the OpenAI API's `model` names no configured model


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One entry of google.rpc.QuotaFailure: which limit, for whom."""

    subject: str
    description: str


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One entry of google.rpc.BadRequest: a request field and what is wrong with it."""

    field: str
    description: str


class ProxyError(Exception):
    """An error with a caller-safe message, a gRPC code and a stable reason.

    `code` and `reason` are fixed per subclass, so a raise site cannot pair them
    inconsistently; only UpstreamError takes its code from the upstream.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: Reason = Reason.INTERNAL
    default_message: ClassVar[str] = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        retry_delay_s: float | None = None,
        quota_violations: Iterable[QuotaViolation] = (),
        field_violations: Iterable[FieldViolation] = (),
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_delay_s = None if retry_delay_s is None else max(0.0, retry_delay_s)
        self.quota_violations = tuple(quota_violations)
        self.field_violations = tuple(field_violations)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason}, {self.message!r})"


class RateLimited(ProxyError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.RATE_LIMITED
    default_message = "rate limit exceeded"


class ConcurrencyLimited(ProxyError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.CONCURRENCY_LIMITED
    default_message = "too many concurrent streams"


class Overloaded(ProxyError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.OVERLOADED
    default_message = "proxy overloaded"


class CircuitOpen(ProxyError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.CIRCUIT_OPEN
    default_message = "upstream circuit open"


class UpstreamUnavailable(ProxyError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.UPSTREAM_UNAVAILABLE
    default_message = "upstream unavailable"


class UpstreamError(ProxyError):
    """The upstream failed. Its code is kept (INTERNAL when the proxy has no code,
    e.g. an upstream that broke the protocol), so HTTP callers still get 4xx vs 5xx."""

    reason = Reason.UPSTREAM_ERROR
    default_message = "upstream error"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: grpc.StatusCode = grpc.StatusCode.INTERNAL,
        metadata: Mapping[str, str] | None = None,
        retry_delay_s: float | None = None,
        quota_violations: Iterable[QuotaViolation] = (),
        field_violations: Iterable[FieldViolation] = (),
    ) -> None:
        if code is grpc.StatusCode.OK:
            raise ValueError("an UpstreamError cannot have code OK")
        super().__init__(
            message,
            metadata=metadata,
            retry_delay_s=retry_delay_s,
            quota_violations=quota_violations,
            field_violations=field_violations,
        )
        self.code = code


class SessionNotFound(ProxyError):
    """The agent has no conversation by that id in the caller's scope: never existed,
    expired, deleted, or another caller's (the same answer for all four)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = Reason.SESSION_NOT_FOUND
    default_message = "session not found"


class SessionStoreUnavailable(ProxyError):
    """The agents' shared session store is down: the turn did not run (or its answer was
    not remembered); the caller retries after RetryInfo. Not the replica's fault, so it
    neither counts against that replica's breaker nor is retried on another."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.SESSION_STORE_UNAVAILABLE
    default_message = "session store unavailable"


class DeadlineExceeded(ProxyError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = Reason.DEADLINE_EXCEEDED
    default_message = "deadline exceeded"


class InvalidArgument(ProxyError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.INVALID_ARGUMENT
    default_message = "invalid argument"


class MalformedRequest(InvalidArgument):
    """INVALID_ARGUMENT for request bytes that do not decode as the method's message."""

    reason = Reason.MALFORMED_REQUEST
    default_message = "malformed request"


class Unauthenticated(ProxyError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = Reason.UNAUTHENTICATED
    default_message = "unauthenticated"


class PermissionDenied(ProxyError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = Reason.PERMISSION_DENIED
    default_message = "permission denied"


class Cancelled(ProxyError):
    code = grpc.StatusCode.CANCELLED
    reason = Reason.CANCELLED
    default_message = "cancelled"


class Internal(ProxyError):
    code = grpc.StatusCode.INTERNAL
    reason = Reason.INTERNAL
    default_message = "internal error"


def internal_error() -> Internal:
    """The error for an unexpected exception: generic, the full story goes to the log."""
    return Internal("internal error")


def _duration(seconds: float) -> duration_pb2.Duration:
    """Seconds as a Duration rounded UP to the millisecond, so a caller who waits exactly
    that long is not turned away again by truncation (0.3 s stays 0.3 s: the float is
    rounded to nanoseconds before the ceiling)."""
    nanos = max(0, round(seconds * 1e9))
    millis = -(-nanos // 1_000_000)
    out = duration_pb2.Duration()
    out.FromMilliseconds(millis)
    return out


def to_status_proto(err: ProxyError) -> status_pb2.Status:
    """The google.rpc.Status for `err`: ErrorInfo first, then RetryInfo, QuotaFailure,
    BadRequest (each only when it has content). Also what an in-band stream error chunk
    carries in its `error` field."""
    status = status_pb2.Status(code=err.code.value[0], message=err.message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason=err.reason.value, domain=DOMAIN, metadata=err.metadata)
    )
    if err.retry_delay_s is not None:
        status.details.add().Pack(
            error_details_pb2.RetryInfo(retry_delay=_duration(err.retry_delay_s))
        )
    if err.quota_violations:
        quota = error_details_pb2.QuotaFailure()
        for qv in err.quota_violations:
            quota.violations.add(subject=qv.subject, description=qv.description)
        status.details.add().Pack(quota)
    if err.field_violations:
        bad = error_details_pb2.BadRequest()
        for fv in err.field_violations:
            bad.field_violations.add(field=fv.field, description=fv.description)
        status.details.add().Pack(bad)
    return status


def retry_after_s(retry: error_details_pb2.RetryInfo) -> int:
    """RetryInfo's delay as `retry-after` says it: whole seconds, rounded up."""
    delay = retry.retry_delay
    return max(0, int(delay.seconds) + (1 if delay.nanos > 0 else 0))


class _Status(grpc.Status):
    """grpc.Status is an interface; grpc_status.rpc_status.to_status builds the same."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def to_grpc_status(err: ProxyError) -> grpc.Status:
    """`err` as a grpc.Status whose trailing metadata carries the rich status, and
    `retry-after` when it has RetryInfo (same delay, whole seconds rounded up)."""
    proto = to_status_proto(err)
    trailers: list[tuple[str, str | bytes]] = [(STATUS_DETAILS_KEY, proto.SerializeToString())]
    if err.retry_delay_s is not None:
        retry = error_details_pb2.RetryInfo(retry_delay=_duration(err.retry_delay_s))
        trailers.append((RETRY_AFTER_KEY, str(retry_after_s(retry))))
    return _Status(err.code, proto.message, tuple(trailers))


async def abort_with(
    context: Context, err: ProxyError, trailing_metadata: Metadata = ()
) -> NoReturn:
    """End the call with `err`, keeping the trailing metadata already set on `context`.

    grpc.aio's `abort_with_status` REPLACES the trailers set earlier with
    `set_trailing_metadata` (e.g. x-request-id), so this calls `abort` with the merged
    trailers instead: those already set, then `trailing_metadata`, then the status.
    Like `abort`, it raises; calling it twice on one call is a grpc UsageError.
    """
    status = to_grpc_status(err)
    kept = tuple((k, v) for k, v in (context.trailing_metadata() or ()) if k != STATUS_DETAILS_KEY)
    await context.abort(
        status.code, status.details, (*kept, *trailing_metadata, *status.trailing_metadata)
    )
    raise AssertionError("unreachable: ServicerContext.abort always raises")  # pragma: no cover


# gRPC code -> HTTP status, the table Envoy's transcoder (Grpc::Utility::grpcToHttpStatus)
# and grpc-gateway use, so a browser sees the same status through Envoy as `http_status_for`
# says: rate/concurrency limits 429, unavailable/open breaker 503, deadline 504,
# validation 400, auth 401/403, everything else 500.
_HTTP_STATUS: Final[Mapping[grpc.StatusCode, int]] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def http_status_for(code: grpc.StatusCode) -> int:
    """The HTTP status an HTTP caller sees for `code` (Envoy's mapping)."""
    return _HTTP_STATUS.get(code, 500)
