"""Errors the agent reports: bad requests as google.rpc.Status with BadRequest details.

Handlers raise InvalidArgument; the call interceptor turns it into an INVALID_ARGUMENT
status whose details name the offending field, so callers (and the proxy) can point at
it without parsing the message.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


class StatusError(Exception):
    """An error the handler reports as a ready google.rpc.Status (e.g. agent.openai_backend's
    ModelError); `code_name` and `reason` go to the call log."""

    code_name: str = "INTERNAL"
    reason: str = ""

    def to_status(self) -> status_pb2.Status:
        raise NotImplementedError


class InvalidArgument(Exception):
    """The request is malformed; `field` is its path in the request, e.g. "messages[2].role"."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description

    def to_status(self) -> status_pb2.Status:
        return rpc_status_proto(
            code_pb2.INVALID_ARGUMENT,
            str(self),
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=self.field, description=self.description
                    )
                ]
            ),
        )


def rpc_status_proto(code: int, message: str, *details: object) -> status_pb2.Status:
    """A google.rpc.Status, e.g. for a failed item of a batch."""
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)  # type: ignore[arg-type]
        packed.append(any_detail)
    return status_pb2.Status(code=code, message=message, details=packed)


async def abort_with(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    """End the call with `status`, its details in the grpc-status-details-bin trailer,
    keeping the trailers already set (abort_with_status would replace them)."""
    rich = rpc_status.to_status(status)
    kept = tuple(
        (k, v) for k, v in (context.trailing_metadata() or ()) if k != "grpc-status-details-bin"
    )
    await context.abort(rich.code, rich.details, (*kept, *rich.trailing_metadata))
