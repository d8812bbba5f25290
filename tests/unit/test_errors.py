"""The one error shape: status contents, the wire round trip, upstream mapping, no leaks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiproxy.core import errors
from aiproxy.core.errors import (
    DOMAIN,
    FieldViolation,
    ProxyError,
    QuotaViolation,
    Reason,
    abort_with,
    http_status_for,
    to_grpc_status,
    to_status_proto,
)
from aiproxy.core.upstream_errors import from_upstream, parse_rpc_error, to_proxy_error

Code = grpc.StatusCode


def unpack(detail: any_pb2.Any, cls: Any) -> Any:
    assert detail.Is(cls.DESCRIPTOR), detail.type_url
    out = cls()
    detail.Unpack(out)
    return out


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    return unpack(status.details[0], error_details_pb2.ErrorInfo)


def details_of(status: status_pb2.Status, cls: Any) -> list[Any]:
    return [unpack(d, cls) for d in status.details if d.Is(cls.DESCRIPTOR)]


@pytest.mark.parametrize(
    ("cls", "code", "reason"),
    [
        (errors.RateLimited, Code.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),
        (errors.ConcurrencyLimited, Code.RESOURCE_EXHAUSTED, Reason.CONCURRENCY_LIMITED),
        (errors.Overloaded, Code.RESOURCE_EXHAUSTED, Reason.OVERLOADED),
        (errors.CircuitOpen, Code.UNAVAILABLE, Reason.CIRCUIT_OPEN),
        (errors.UpstreamUnavailable, Code.UNAVAILABLE, Reason.UPSTREAM_UNAVAILABLE),
        (errors.UpstreamError, Code.INTERNAL, Reason.UPSTREAM_ERROR),
        (errors.DeadlineExceeded, Code.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED),
        (errors.InvalidArgument, Code.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT),
        (errors.MalformedRequest, Code.INVALID_ARGUMENT, Reason.MALFORMED_REQUEST),
        (errors.Unauthenticated, Code.UNAUTHENTICATED, Reason.UNAUTHENTICATED),
        (errors.PermissionDenied, Code.PERMISSION_DENIED, Reason.PERMISSION_DENIED),
        (errors.Cancelled, Code.CANCELLED, Reason.CANCELLED),
        (errors.Internal, Code.INTERNAL, Reason.INTERNAL),
    ],
)
def test_each_error_has_its_code_reason_and_an_error_info_first(
    cls: type[ProxyError], code: Code, reason: Reason
) -> None:
    err = cls()
    assert (err.code, err.reason) == (code, reason)
    assert err.message == cls.default_message and str(err) == err.message
    status = to_status_proto(err)
    assert status.code == code.value[0]
    assert status.message == err.message
    assert len(status.details) == 1  # nothing optional was given
    info = error_info(status)
    assert (info.reason, info.domain, dict(info.metadata)) == (reason.value, DOMAIN, {})


def test_status_proto_carries_every_detail_in_order() -> None:
    err = errors.RateLimited(
        "slow down",
        metadata={"limit": "10"},
        retry_delay_s=1.25,
        quota_violations=[QuotaViolation("peer:10.0.0.1", "10 per burst")],
        field_violations=[FieldViolation("prompt", "must not be empty")],
    )
    status = to_status_proto(err)
    assert status.code == Code.RESOURCE_EXHAUSTED.value[0]
    assert status.message == "slow down"
    assert [d.type_url.rsplit(".", 1)[1] for d in status.details] == [
        "ErrorInfo",
        "RetryInfo",
        "QuotaFailure",
        "BadRequest",
    ]
    info = error_info(status)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "RATE_LIMITED",
        DOMAIN,
        {"limit": "10"},
    )
    (retry,) = details_of(status, error_details_pb2.RetryInfo)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (1, 250_000_000)
    (quota,) = details_of(status, error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in quota.violations] == [
        ("peer:10.0.0.1", "10 per burst")
    ]
    (bad,) = details_of(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("prompt", "must not be empty")
    ]


@pytest.mark.parametrize(
    ("delay_s", "seconds", "nanos"),
    [
        (0.0, 0, 0),
        (0.3, 0, 300_000_000),  # float noise must not round 0.3 up to 0.301
        (2.0, 2, 0),
        (0.0001, 0, 1_000_000),  # rounded UP to the millisecond
        (1.2344, 1, 235_000_000),
        (-5.0, 0, 0),  # clamped
    ],
)
def test_retry_info_is_rounded_up_to_the_millisecond(
    delay_s: float, seconds: int, nanos: int
) -> None:
    (retry,) = details_of(
        to_status_proto(errors.CircuitOpen(retry_delay_s=delay_s)), error_details_pb2.RetryInfo
    )
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (seconds, nanos)


def test_grpc_status_carries_the_rich_status_in_the_details_trailer() -> None:
    err = errors.InvalidArgument(
        "bad request", field_violations=[FieldViolation("messages[0].role", "unknown role")]
    )
    status = to_grpc_status(err)
    assert status.code is Code.INVALID_ARGUMENT
    assert status.details == "bad request"
    ((key, value),) = status.trailing_metadata
    assert key == errors.STATUS_DETAILS_KEY == "grpc-status-details-bin"
    assert status_pb2.Status.FromString(value) == to_status_proto(err)


@pytest.mark.parametrize(
    ("delay_s", "retry_after"),
    [(0.0, "0"), (0.0001, "1"), (0.3, "1"), (1.0, "1"), (1.0004, "2"), (2.5, "3"), (30.0, "30")],
)
def test_retry_after_trailer_is_retry_info_in_whole_seconds_rounded_up(
    delay_s: float, retry_after: str
) -> None:
    """HTTP callers read `retry-after` (Envoy's transcoder turns a trailers-only
    response's metadata into headers): the same delay as RetryInfo, never shorter."""
    err = errors.RateLimited(retry_delay_s=delay_s)
    status = to_grpc_status(err)
    trailers = dict(status.trailing_metadata)
    assert trailers[errors.RETRY_AFTER_KEY] == retry_after
    (retry,) = details_of(
        status_pb2.Status.FromString(trailers[errors.STATUS_DETAILS_KEY]),
        error_details_pb2.RetryInfo,
    )
    assert int(retry_after) * 10**9 >= retry.retry_delay.ToNanoseconds()
    assert int(retry_after) == errors.retry_after_s(retry)
    # No RetryInfo, no retry-after.
    assert errors.RETRY_AFTER_KEY not in dict(to_grpc_status(errors.Internal()).trailing_metadata)


def test_upstream_error_takes_its_code_but_never_ok() -> None:
    assert errors.UpstreamError(code=Code.NOT_FOUND).code is Code.NOT_FOUND
    assert errors.UpstreamError.code is Code.INTERNAL  # the class default is untouched
    with pytest.raises(ValueError):
        errors.UpstreamError(code=Code.OK)


def test_internal_error_is_generic() -> None:
    err = errors.internal_error()
    assert (err.code, err.reason, err.message) == (Code.INTERNAL, Reason.INTERNAL, "internal error")


@pytest.mark.parametrize(
    ("code", "http"),
    [
        (Code.RESOURCE_EXHAUSTED, 429),
        (Code.UNAVAILABLE, 503),
        (Code.DEADLINE_EXCEEDED, 504),
        (Code.INVALID_ARGUMENT, 400),
        (Code.UNAUTHENTICATED, 401),
        (Code.PERMISSION_DENIED, 403),
        (Code.INTERNAL, 500),
        (Code.UNKNOWN, 500),
        (Code.DATA_LOSS, 500),
        (Code.NOT_FOUND, 404),
        (Code.UNIMPLEMENTED, 501),
        (Code.CANCELLED, 499),
        (Code.OK, 200),
    ],
)
def test_http_status_follows_envoys_mapping(code: Code, http: int) -> None:
    assert http_status_for(code) == http


def test_every_code_has_an_http_status() -> None:
    assert all(100 <= http_status_for(code) <= 599 for code in Code)


# ---- Upstream mapping -----------------------------------------------------------------


def rich(code: Code, message: str, *details: Any) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return status


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(round(seconds * 1e9))
    return info


BAD_PROMPT = error_details_pb2.BadRequest(
    field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="prompt", description="too long")
    ]
)
UPSTREAM_QUOTA = error_details_pb2.QuotaFailure(
    violations=[
        error_details_pb2.QuotaFailure.Violation(
            subject="model:big", description="tokens per minute"
        )
    ]
)

# (code, message, rich status) -> expected class, code, message, retry, fields, quota
UPSTREAM_MAPPING: dict[str, tuple[tuple[Code, str, status_pb2.Status | None], dict[str, Any]]] = {
    "unavailable gets the default retry delay": (
        (
            Code.UNAVAILABLE,
            "failed to connect to all addresses; last error: ipv4:10.1.2.3:50052",
            None,
        ),
        dict(
            cls=errors.UpstreamUnavailable,
            code=Code.UNAVAILABLE,
            message="upstream unavailable",
            retry=1.0,
        ),
    ),
    "unavailable keeps the upstream's retry delay": (
        (Code.UNAVAILABLE, "draining", rich(Code.UNAVAILABLE, "draining", retry_info(2.5))),
        dict(
            cls=errors.UpstreamUnavailable,
            code=Code.UNAVAILABLE,
            message="upstream unavailable",
            retry=2.5,
        ),
    ),
    "cancelled by the upstream is unavailable": (
        (Code.CANCELLED, "server shutting down", None),
        dict(
            cls=errors.UpstreamUnavailable,
            code=Code.UNAVAILABLE,
            message="upstream unavailable",
            retry=1.0,
        ),
    ),
    "deadline": (
        (Code.DEADLINE_EXCEEDED, "Deadline Exceeded", None),
        dict(cls=errors.DeadlineExceeded, code=Code.DEADLINE_EXCEEDED, message="deadline exceeded"),
    ),
    "invalid argument keeps a safe message and the field violations": (
        (
            Code.INVALID_ARGUMENT,
            "prompt too long",
            rich(Code.INVALID_ARGUMENT, "prompt too long", BAD_PROMPT),
        ),
        dict(
            cls=errors.InvalidArgument,
            code=Code.INVALID_ARGUMENT,
            message="prompt too long",
            fields=(FieldViolation("prompt", "too long"),),
        ),
    ),
    "invalid argument without details": (
        (Code.INVALID_ARGUMENT, "", None),
        dict(cls=errors.InvalidArgument, code=Code.INVALID_ARGUMENT, message="invalid argument"),
    ),
    "resource exhausted that the upstream calls rate limiting": (
        (
            Code.RESOURCE_EXHAUSTED,
            "quota exceeded",
            rich(
                Code.RESOURCE_EXHAUSTED,
                "quota exceeded",
                error_details_pb2.ErrorInfo(reason="RATE_LIMITED", domain="agent.example"),
                retry_info(3),
                UPSTREAM_QUOTA,
            ),
        ),
        dict(
            cls=errors.RateLimited,
            code=Code.RESOURCE_EXHAUSTED,
            message="quota exceeded",
            retry=3.0,
            quota=(QuotaViolation("model:big", "tokens per minute"),),
        ),
    ),
    "other resource exhausted stays an upstream error": (
        (Code.RESOURCE_EXHAUSTED, "out of GPU memory", None),
        dict(cls=errors.UpstreamError, code=Code.RESOURCE_EXHAUSTED, message="out of GPU memory"),
    ),
    "permission denied": (
        (Code.PERMISSION_DENIED, "model not allowed", None),
        dict(cls=errors.PermissionDenied, code=Code.PERMISSION_DENIED, message="model not allowed"),
    ),
    "unauthenticated is the proxy's problem, not the caller's": (
        (Code.UNAUTHENTICATED, "bad service token", None),
        dict(cls=errors.UpstreamError, code=Code.INTERNAL, message="upstream error"),
    ),
    "internal hides the exception text": (
        (Code.INTERNAL, "KeyError: 'model'", None),
        dict(cls=errors.UpstreamError, code=Code.INTERNAL, message="upstream error"),
    ),
    "unknown hides the exception text": (
        (Code.UNKNOWN, "Exception calling application: boom", None),
        dict(cls=errors.UpstreamError, code=Code.UNKNOWN, message="upstream error"),
    ),
    "not found keeps its code and safe message": (
        (Code.NOT_FOUND, "no such model", None),
        dict(cls=errors.UpstreamError, code=Code.NOT_FOUND, message="no such model"),
    ),
    "unimplemented": (
        (Code.UNIMPLEMENTED, "Method not found!", None),
        dict(cls=errors.UpstreamError, code=Code.UNIMPLEMENTED, message="upstream error"),
    ),
}


@pytest.mark.parametrize(
    ("given", "expected"), UPSTREAM_MAPPING.values(), ids=UPSTREAM_MAPPING.keys()
)
def test_from_upstream_mapping(
    given: tuple[Code, str, status_pb2.Status | None], expected: dict[str, Any]
) -> None:
    code, message, status = given
    err = from_upstream(code, message, status)
    assert type(err) is expected["cls"]
    assert err.code is expected["code"]
    assert err.message == expected["message"]
    assert err.retry_delay_s == expected.get("retry")
    assert err.field_violations == expected.get("fields", ())
    assert err.quota_violations == expected.get("quota", ())
    assert err.metadata == {"upstreamCode": code.name}


LEAKY_MESSAGES = [
    "x" * (errors.MAX_UPSTREAM_MESSAGE_LEN + 1),
    'Traceback (most recent call last):\n  File "/srv/agent.py", line 3',
    "prompt invalid\nsecond line",
    "Exception calling application: division by zero",
    "ValueError: exception in validator",
    "upstream ipv4:10.0.0.7:50052 refused",
    "bad pointer 0x7f3a2c",
    "tab\tseparated",
]


@pytest.mark.parametrize("message", LEAKY_MESSAGES)
def test_long_or_internal_upstream_messages_never_reach_the_caller(message: str) -> None:
    err = from_upstream(Code.INVALID_ARGUMENT, message, None)
    assert err.message == "invalid argument"


def test_server_side_codes_never_pass_on_the_message_even_when_short() -> None:
    for code in (
        Code.INTERNAL,
        Code.UNKNOWN,
        Code.DATA_LOSS,
        Code.UNAVAILABLE,
        Code.DEADLINE_EXCEEDED,
    ):
        assert "secret" not in from_upstream(code, "secret", None).message


def test_upstream_debug_info_and_error_info_metadata_are_dropped() -> None:
    status = rich(
        Code.INTERNAL,
        "boom",
        error_details_pb2.ErrorInfo(
            reason="DB_DOWN", domain="agent", metadata={"host": "db-7.internal"}
        ),
        error_details_pb2.DebugInfo(stack_entries=["agent.py:3"], detail="boom"),
    )
    out = to_status_proto(from_upstream(Code.INTERNAL, "boom", status))
    assert [d.type_url.rsplit(".", 1)[1] for d in out.details] == ["ErrorInfo"]
    assert dict(error_info(out).metadata) == {"upstreamCode": "INTERNAL"}
    assert b"db-7" not in out.SerializeToString()


def test_a_rich_status_with_another_code_is_not_trusted() -> None:
    mismatched = rich(Code.INVALID_ARGUMENT, "x", BAD_PROMPT)
    err = from_upstream(Code.INTERNAL, "x", mismatched)
    assert err.field_violations == ()


def test_from_upstream_refuses_ok() -> None:
    with pytest.raises(ValueError):
        from_upstream(Code.OK, "", None)


def test_parse_rpc_error_reads_the_rich_status() -> None:
    status = rich(Code.INVALID_ARGUMENT, "bad", BAD_PROMPT)
    err = grpc.aio.AioRpcError(
        Code.INVALID_ARGUMENT,
        trailing_metadata=grpc.aio.Metadata(
            (errors.STATUS_DETAILS_KEY, status.SerializeToString())
        ),
        details="bad",
    )
    assert parse_rpc_error(err) == (Code.INVALID_ARGUMENT, "bad", status)


@pytest.mark.parametrize(
    "trailer",
    [
        rich(Code.INTERNAL, "bad").SerializeToString(),  # another code
        rich(Code.INVALID_ARGUMENT, "other message").SerializeToString(),
        b"\xff\xff not a status",
    ],
)
def test_parse_rpc_error_ignores_an_inconsistent_or_broken_rich_status(trailer: bytes) -> None:
    err = grpc.aio.AioRpcError(
        Code.INVALID_ARGUMENT,
        trailing_metadata=grpc.aio.Metadata((errors.STATUS_DETAILS_KEY, trailer)),
        details="bad",
    )
    assert parse_rpc_error(err) == (Code.INVALID_ARGUMENT, "bad", None)


def test_parse_rpc_error_without_trailers() -> None:
    err = grpc.aio.AioRpcError(Code.UNAVAILABLE, details=None)
    assert parse_rpc_error(err) == (Code.UNAVAILABLE, "", None)


def test_to_proxy_error() -> None:
    own = errors.CircuitOpen(retry_delay_s=1)
    assert to_proxy_error(own) is own
    upstream = to_proxy_error(grpc.aio.AioRpcError(Code.UNAVAILABLE, details="down"))
    assert isinstance(upstream, errors.UpstreamUnavailable)
    bug = to_proxy_error(KeyError("session_id"))
    assert (type(bug), bug.message) == (errors.Internal, "internal error")


# ---- On the wire: abort_with on a real grpc.aio server ---------------------------------

ABORTS: dict[str, ProxyError] = {
    "rate": errors.RateLimited(
        metadata={"limit": "10"},
        retry_delay_s=0.5,
        quota_violations=[QuotaViolation("peer:127.0.0.1", "at most 10 requests in a burst")],
    ),
    "bad": errors.InvalidArgument(
        "bad request", field_violations=[FieldViolation("prompt", "required")]
    ),
}


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        context.set_trailing_metadata((("x-request-id", "req-1"),))
        await abort_with(context, ABORTS[request.decode()], (("x-ratelimit-limit", "10"),))

    async def stream(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        yield b"chunk"
        await abort_with(context, ABORTS[request.decode()])

    handler = grpc.method_handlers_generic_handler(
        "test.Errors",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(None)


@pytest.mark.parametrize("name", ABORTS)
async def test_abort_with_round_trips_through_grpc_status(
    channel: grpc.aio.Channel, name: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary("/test.Errors/Unary")(name.encode(), timeout=5)
    code, message, status = parse_rpc_error(caught.value)
    err = ABORTS[name]
    assert (code, message) == (err.code, err.message)
    assert status == to_status_proto(err)
    assert rpc_status.from_call(caught.value) == status
    # Trailers set before the abort survive it; abort_with_status would have dropped them.
    trailers = dict(caught.value.trailing_metadata() or ())
    assert trailers["x-request-id"] == "req-1"
    assert trailers["x-ratelimit-limit"] == "10"
    # retry-after with RetryInfo (0.5 s -> 1), none without.
    assert trailers.get("retry-after") == ("1" if err.retry_delay_s is not None else None)


async def test_abort_with_ends_a_stream_after_its_chunks(channel: grpc.aio.Channel) -> None:
    call = channel.unary_stream("/test.Errors/Stream")(b"rate", timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in call:
            received.append(chunk)
    assert received == [b"chunk"]
    assert parse_rpc_error(caught.value)[2] == to_status_proto(ABORTS["rate"])


# ---- The pipeline's error frame on a real server: nothing unshaped, no internals ---------


@pytest.fixture
async def guarded() -> AsyncIterator[grpc.aio.Channel]:
    """The AgentService pipeline (no stages: only its own error frame) over a servicer
    that fails in every way, and beside it a service with a request stream, registered
    as health and reflection are (interceptors/error_handling.SafeGenericHandler)."""
    from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
    from aiproxy.interceptors.error_handling import SafeGenericHandler
    from tests.support.pipeline import channel_for

    class Failing:
        async def Generate(
            self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> pb.GenerateResponse:
            raise KeyError("<class 'secret.Internal'> at 0x7f")

        async def StreamGenerate(
            self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            yield pb.StreamGenerateResponse(delta="a")
            raise ValueError("boom in ipv4:10.0.0.1")

        def __getattr__(self, name: str) -> Any:
            return self.Generate

    async def echo(
        request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        return pb.GenerateResponse(text=request.prompt)

    async def echo_stream(
        request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in request_iterator:
            yield pb.GenerateResponse(text=request.prompt)

    G = pb.GenerateRequest
    beside = grpc.method_handlers_generic_handler(
        "test.Beside",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo, G.FromString, pb.GenerateResponse.SerializeToString
            ),
            "EchoStream": grpc.stream_stream_rpc_method_handler(
                echo_stream, G.FromString, pb.GenerateResponse.SerializeToString
            ),
        },
    )
    async with channel_for(Failing(), beside=[SafeGenericHandler(beside)]) as ch:
        yield ch


# Field 1 length-delimited, length 100, then 3 bytes: not a message.
_TRUNCATED = b"\x0a\x64abc"
_LEAKS = ("class", "Error", "0x", "ipv4", "secret", "<")


def _assert_clean(err: grpc.aio.AioRpcError, code: Code, reason: Reason) -> None:
    got_code, message, status = parse_rpc_error(err)
    assert got_code is code and status is not None
    assert error_info(status).reason == reason.value
    assert not any(leak in message for leak in _LEAKS), message


async def test_malformed_request_bytes_are_invalid_argument(guarded: grpc.aio.Channel) -> None:
    for path in ("/ai.agent.v1.AgentService/Generate", "/test.Beside/Echo"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await guarded.unary_unary(path)(_TRUNCATED, timeout=5)
        _assert_clean(caught.value, Code.INVALID_ARGUMENT, Reason.MALFORMED_REQUEST)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in guarded.unary_stream("/ai.agent.v1.AgentService/StreamGenerate")(
            _TRUNCATED, timeout=5
        ):
            pass
    _assert_clean(caught.value, Code.INVALID_ARGUMENT, Reason.MALFORMED_REQUEST)


async def test_malformed_message_in_a_request_stream_is_invalid_argument(
    guarded: grpc.aio.Channel,
) -> None:
    from aiproxy.ai.agent.v1 import agent_service_pb2 as pb

    call = guarded.stream_stream("/test.Beside/EchoStream")(timeout=5)
    await call.write(pb.GenerateRequest(prompt="fine").SerializeToString())
    assert await call.read()  # the good message is answered
    await call.write(_TRUNCATED)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while await call.read() is not grpc.aio.EOF:
            pass
    _assert_clean(caught.value, Code.INVALID_ARGUMENT, Reason.MALFORMED_REQUEST)


async def test_servicer_exceptions_are_internal_without_their_text(
    guarded: grpc.aio.Channel,
) -> None:
    from aiproxy.ai.agent.v1 import agent_service_pb2 as pb

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await guarded.unary_unary("/ai.agent.v1.AgentService/Generate")(
            pb.GenerateRequest(prompt="x").SerializeToString(), timeout=5
        )
    _assert_clean(caught.value, Code.INTERNAL, Reason.INTERNAL)
    chunks = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in guarded.unary_stream(
            "/ai.agent.v1.AgentService/StreamGenerate",
            response_deserializer=pb.StreamGenerateResponse.FromString,
        )(pb.StreamGenerateRequest(prompt="x").SerializeToString(), timeout=5):
            chunks.append(chunk)
    _assert_clean(caught.value, Code.INTERNAL, Reason.INTERNAL)
    # The in-band final chunk carries the same clean status.
    assert [c.delta for c in chunks] == ["a", ""] and chunks[-1].is_final
    assert error_info(chunks[-1].error).reason == "INTERNAL"
