"""An example of a deployment's own server interceptor: `server.extra_interceptors:
["aiproxy.interceptors.examples.audit:CallAudit"]`.

Written on the `grpc-interceptor` package's `AsyncServerInterceptor`: one `intercept`
method, the grpc.aio plumbing (unary vs streaming handlers) in its base class. That is the
package's role in aiproxy: the base for interceptors a deployment adds. aiproxy's own
stages do not use it (server/chain.py: they are bound once per method into one handler,
one generator frame per chunk, where the package adds one per interceptor per chunk).

What it does, to show each thing such an interceptor must get right:
- lets the overload gate's own probe calls (`x-aiproxy-probe`) through untouched: a
  server interceptor sees every call that reaches the listener, those included;
- logs one `audit_call` line per call when it ENDS (streams included: the response
  iterator is wrapped, so the whole stream is inside, with its message count), for every
  service (API, health, reflection, admin);
- refuses callers whose `x-tenant` is listed in $AIPROXY_EXAMPLE_DENIED_TENANTS (commas)
  with PERMISSION_DENIED, shaped like every aiproxy error (a google.rpc.Status with an
  ErrorInfo in grpc-status-details-bin, and as the JSON body at the edge) by
  aiproxy.core.errors.abort_with; a bare `context.abort(code, text)` would carry no
  details.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_interceptor import AsyncServerInterceptor

from aiproxy.core.errors import PermissionDenied, abort_with
from aiproxy.core.logs import log_event
from aiproxy.interceptors.overload import PROBE_HEADER

log = logging.getLogger("aiproxy.example.audit")

DENIED_ENV = "AIPROXY_EXAMPLE_DENIED_TENANTS"


class CallAudit(AsyncServerInterceptor):
    def __init__(self, denied_tenants: frozenset[str] | None = None) -> None:
        if denied_tenants is None:
            raw = os.environ.get(DENIED_ENV, "")
            denied_tenants = frozenset(t.strip() for t in raw.split(",") if t.strip())
        self.denied = denied_tenants

    async def intercept(
        self,
        method: Callable[..., Any],
        request_or_iterator: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        method_name: str,
    ) -> Any:
        started = time.monotonic()
        metadata = context.invocation_metadata() or ()
        if any(k == PROBE_HEADER for k, _ in metadata):
            # The overload gate's own probe of the listener's queues (interceptors/
            # overload.py): not a caller's call; let it through untouched.
            return await _passthrough(method, request_or_iterator, context)
        tenant = next((str(v) for k, v in metadata if k == "x-tenant"), "")
        if tenant and tenant in self.denied:
            _audit(method_name, tenant, started, "PERMISSION_DENIED", 0)
            await abort_with(context, PermissionDenied(f"tenant {tenant!r} is not allowed"))
        result = method(request_or_iterator, context)
        if hasattr(result, "__aiter__"):
            return self._stream(result, method_name, tenant, started, context)
        try:
            response = await result
        except BaseException:
            _audit(method_name, tenant, started, _code(context, "ERROR"), 0)
            raise
        _audit(method_name, tenant, started, _code(context, "OK"), 1)
        return response

    async def _stream(
        self,
        responses: AsyncIterator[Any],
        method_name: str,
        tenant: str,
        started: float,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Any]:
        count = 0
        outcome = "ERROR"
        try:
            async for response in responses:
                count += 1
                yield response
            outcome = "OK"
        finally:
            _audit(method_name, tenant, started, _code(context, outcome), count)


async def _passthrough(method: Callable[..., Any], request: Any, context: Any) -> Any:
    result = method(request, context)
    return result if hasattr(result, "__aiter__") else await result


def _code(context: grpc.aio.ServicerContext[Any, Any], default: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int) and code in {c.value[0] for c in grpc.StatusCode}:
        return next(c.name for c in grpc.StatusCode if c.value[0] == code)
    return default


def _audit(method: str, tenant: str, started: float, code: str, messages: int) -> None:
    log_event(
        log,
        "audit_call",
        method=method,
        tenant=tenant,
        code=code,
        messages=messages,
        duration_ms=round((time.monotonic() - started) * 1000, 2),
    )
