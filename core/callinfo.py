"""What the proxy knows about the call in progress, shared along the interceptor chain.

The outermost server interceptor creates a CallInfo and puts it in `current_call`; the
others and the forwarder fill it in; the access log and metrics read it when the call
ends. One object per call instead of many context variables keeps the hot path cheap.
"""

from __future__ import annotations

import contextvars
import dataclasses
import time


@dataclasses.dataclass(slots=True)
class CallInfo:
    method: str
    request_id: str
    started: float = dataclasses.field(default_factory=time.monotonic)
    caller: str = ""
    # The caller's tenant (the value of limits.tenant_claim in its JWT), set by auth; ""
    # when none. Its callers share `tenant:<value>` overrides and daily token budget
    # (core/limitpolicy.py).
    tenant: str = ""
    # Seconds the upstream call may take (the tighter of the caller's and the method's).
    timeout_s: float | None = None
    upstream: str = ""
    attempts: int = 0
    retries: int = 0
    code: str = "OK"
    reason: str = ""
    first_chunk_s: float | None = None
    chunks: int = 0
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Metadata the caller gets with the response headers (e.g. x-ratelimit-*).
    reply_metadata: tuple[tuple[str, str], ...] = ()


current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(
    "current_call", default=None
)
