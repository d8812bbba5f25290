"""What the proxy knows about the call in progress, shared along the pipeline.

The pipeline (server/request/pipeline.py) creates one CallInfo per call, with the caller's
metadata read once into a dict, and puts it in `current_call`; the stages and the
forwarder fill it in; the observability stage reads it when the call ends. One object
per call instead of many context variables keeps the hot path cheap.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # What the limits stage holds for a call (core/ratelimit.py, core/limitstore.py):
    # for the annotations only, so this module stays at the bottom of core/.
    from aiproxy.core.limitstore import Reservation, StreamLease
    from aiproxy.core.ratelimit import Lease


# The keys repeated in a call's metadata, when none is (nearly always): one shared empty
# set instead of a new one per call (CPython no longer shares the empty frozenset, ~0.2 KiB).
_NONE_REPEATED: frozenset[str] = frozenset()


def metadata_dict(
    metadata: Collection[tuple[str, str | bytes]] | None,
) -> tuple[dict[str, str | bytes], frozenset[str]]:
    """The caller's metadata as a dict (the first value of each key wins) and the keys
    that appear more than once (auth refuses a repeated credential instead of choosing)."""
    headers: dict[str, str | bytes] = {}
    if not metadata:
        return headers, _NONE_REPEATED
    for key, value in metadata:
        headers.setdefault(key, value)
    if len(headers) == len(metadata):
        return headers, _NONE_REPEATED
    seen: set[str] = set()
    repeated: set[str] = set()
    for key, _ in metadata:
        if key in seen:
            repeated.add(key)
        seen.add(key)
    return headers, frozenset(repeated)


@dataclasses.dataclass(slots=True)
class CallInfo:
    method: str
    request_id: str = ""
    started: float = dataclasses.field(default_factory=time.monotonic)
    # The invocation metadata, read once on entry (request id, auth, limits, forwarding).
    metadata: dict[str, str | bytes] = dataclasses.field(default_factory=dict)
    # Keys that appear more than once in the metadata.
    repeated: frozenset[str] = _NONE_REPEATED
    peer: str = ""
    # Who the caller is for logs and the cache's scope: its identity ("sub:", "key:",
    # "peer:"), or "<declared id>@<identity>" ("client:<id>@peer:10.0.0.1") when it
    # declared an id (interceptors/limits.py: a sub-bucket inside the identity's).
    caller: str = ""
    # The caller's tenant (the value of limits.tenant_claim in its JWT), set by auth; ""
    # when none. Its callers share `tenant:<value>` overrides and daily token budget
    # (core/limitpolicy.py).
    tenant: str = ""
    # Unforgeable identity only (authenticated subject, verified API key, or address):
    # what the breaker counts as distinct callers. Never the self-declared client id.
    identity: str = ""
    # Seconds the upstream call may take (the tighter of the caller's and the method's).
    timeout_s: float | None = None
    upstream: str = ""
    # How the pool placed a call with an affinity key (its session, or x-aiproxy-affinity):
    # "hit", "spill" or "failover" (server/pool/balancer.py); "" for a call without one.
    affinity: str = ""
    attempts: int = 0
    retries: int = 0
    code: str = "OK"
    reason: str = ""
    # Stream timing, kept by the pipeline's one stream wrapper.
    first_chunk_s: float | None = None
    chunks: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    gap_max: float = 0.0
    # The decoded request and the first / last answer (model and usage for the metrics).
    request: Any = None
    first: Any = None
    last: Any = None
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Metadata the caller gets with the response headers (e.g. x-ratelimit-*).
    reply_metadata: tuple[tuple[str, str], ...] = ()
    # A unary answer's reply metadata goes in the trailing metadata, with the status,
    # instead of as initial metadata of its own (core/headers.REPLY_HEADERS_HEADER): set
    # by the pipeline for native gRPC callers that did not ask for "initial".
    reply_in_trailers: bool = False
    # Set when the answer does not come from an upstream call: "cache" (a cache hit or a
    # shared in-flight call), "resume" (a replay from the stream buffer), "cancel". The
    # upstream was paid for once already: no token charge for this call.
    replayed: str = ""
    # Set by a resumable stream whose caller left while its generation goes on
    # (server/request/resume.py): a future resolved with (last chunk, tokens produced)
    # when the generation ends, so the limits settle the call's token reservation with
    # all it produced, once.
    generation_end: asyncio.Future[tuple[Any, int]] | None = None
    # What the limits stage holds for this call, released when it ends: its slot under
    # the proxy-wide cap on calls in flight, its stream slot and its token reservation
    # in the limit store.
    in_flight_lease: Lease | None = None
    stream_lease: StreamLease | None = None
    reservation: Reservation | None = None
    # Token-aware limits (core/tokens.py): the prompt's estimated tokens; when the limits
    # stage holds a reservation, `chunk_tokens` (chunk -> its completion tokens) is set
    # and the pipeline adds up, in `streamed_tokens`, those of the chunks handed to gRPC:
    # what a stream that ends without usage (cancelled, failed) is charged.
    prompt_estimate: int = 0
    chunk_tokens: Callable[[Any], int] | None = None
    streamed_tokens: int = 0

    def header(self, key: str) -> str | None:
        """A text metadata value, or None (absent or binary)."""
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None


current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(
    "current_call", default=None
)
