"""Stage: the call's request id.

The request id comes from the caller's `x-request-id` (Envoy sets one on every HTTP
request) or is generated; it goes upstream with the call and back to the caller in
the trailing metadata always, and with the reply metadata on success (initial metadata;
for a native gRPC unary answer the trailers: core/headers.REPLY_HEADERS_HEADER).
"""

from __future__ import annotations

import os
from typing import Any

from aiproxy.core.callinfo import CallInfo
from aiproxy.core.service import Method
from aiproxy.core.types import Context

REQUEST_ID = "x-request-id"
_MAX_REQUEST_ID_LEN = 128


def request_id_from(metadata: Any) -> str:
    """The caller's request id if usable, else a new one (`metadata`: a dict or pairs)."""
    value = metadata.get(REQUEST_ID) if isinstance(metadata, dict) else None
    if not isinstance(metadata, dict):
        for key, v in metadata or ():
            if key == REQUEST_ID:
                value = v
                break
    # A caller's id is echoed into logs and headers: keep it short and printable.
    if isinstance(value, str) and 0 < len(value) <= _MAX_REQUEST_ID_LEN and value.isprintable():
        return value
    # 128 random bits as 32 hex digits, like uuid4().hex, at a third of its cost.
    return os.urandom(16).hex()


class _Bound:
    __slots__ = ()
    exit = None

    async def enter(self, call: CallInfo, request: Any, context: Context) -> None:
        call.request_id = request_id_from(call.metadata)
        context.set_trailing_metadata(((REQUEST_ID, call.request_id),))


_BOUND = _Bound()


class RequestContext:
    """Stage: every API method gets a request id (see the module docstring)."""

    def bind(self, method: Method) -> _Bound:
        return _BOUND
