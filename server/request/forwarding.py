"""The forwarder: every AgentService method, re-exported and sent upstream.

It is the pipeline's terminal (server/request/pipeline.py): one forwarding function per
method of the service model, so a method added to the proto is forwarded without code here.
Each call: pick an endpoint from the pool, forward the caller's request bytes as they
came (never re-serialized) and its metadata (minus transport and credential headers,
read once into CallInfo) with the request id, give the upstream call what is left of
the call's effective deadline, and relay the answer.

A call with an affinity key goes where its key says (server/pool/balancer.py: rendezvous
hashing with bounded loads), the others by P2C. The key is the request's `session_id`
(methods whose request has one: Chat, StreamChat, the session API), else the caller's
`x-aiproxy-affinity` header, in the caller's scope: the session owner the agent is told
(core/sessions.py: from the verified identity, "anonymous" without one), so the key is
exactly what the agent keys the conversation by (`scoped_key`).
It is read here, from the message the pipeline already decoded: one attribute read and
one dict look-up per call, and a hash only for calls that have a key.

Retries live here, at the pool level, because the next attempt must be able to go to
another endpoint (a channel's own interceptors only ever see one endpoint). They follow
core/retry.py's policy: unary calls, and streams before their first chunk has
reached the caller; never past the deadline. Everything else that protects the
upstreams or the callers is a stage or an interceptor (see server/chain.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from aiproxy.core.callinfo import CallInfo
from aiproxy.core.errors import CircuitOpen, DeadlineExceeded
from aiproxy.core.headers import (
    AFFINITY_HEADER,
    COALESCE_HEADER,
    PROXY_ONLY_METADATA,
    PROXY_PREFIX,
    SESSION_OWNER_HEADER,
    SESSION_QUOTA_HEADER,
    is_credential,
)
from aiproxy.core.retry import RetryPolicy
from aiproxy.core.service import Method, agent_service
from aiproxy.core.sessions import scoped_key, session_owner, session_quota
from aiproxy.core.settings import Settings
from aiproxy.core.types import Context, StreamCall, UnaryCall
from aiproxy.core.upstream_errors import not_the_replicas_fault
from aiproxy.interceptors.deadline import Deadline
from aiproxy.server.pool.balancer import key_hash
from aiproxy.server.pool.endpoint import Endpoint
from aiproxy.server.pool.pool import UpstreamPool
from aiproxy.server.request.streaming import StreamPump

log = logging.getLogger("aiproxy.forward")

REQUEST_ID = "x-request-id"
# gRPC's own retry header (gRFC A6), so upstreams can tell a retry from a first try.
PREVIOUS_ATTEMPTS = "grpc-previous-rpc-attempts"
# Trailer telling the caller how many upstream attempts its call took.
ATTEMPTS_TRAILER = "x-aiproxy-attempts"
# COALESCE_HEADER (core/headers.py): a caller's own stream coalescing window in ms (0 =
# every chunk as it comes; at most 1000), overriding stream.coalesce_window_ms[_per_method].

# Metadata that describes the caller's hop, not the call: never forwarded. Nor is what
# only this proxy interprets (core/headers.py: resume, cancel, cache-control, coalescing,
# the edge's secret, and any x-aiproxy-* by its prefix), nor any credential-bearing
# header (core/headers.is_credential: authorization, proxy-authorization, cookie,
# x-api-key, *-token, *-secret..., a class of names), nor `upstream.drop_metadata`.
_HOP_METADATA = frozenset(
    {
        "content-type",
        "te",
        "user-agent",
        "host",
        "connection",
        "keep-alive",
        "accept-encoding",
        "grpc-accept-encoding",
        PREVIOUS_ATTEMPTS,
        REQUEST_ID,
    }
)

# Pseudo-headers, and the proxy's own x-aiproxy-* (core/headers.py), whatever their name.
_NEVER_FORWARDED_PREFIXES = (":", PROXY_PREFIX)

T = TypeVar("T")
# The request field that names a conversation.
SESSION_FIELD = "session_id"
# An upstream DEADLINE_EXCEEDED this close to the call's own deadline is grpc's local
# deadline (the `timeout=` each attempt carries), i.e. the call's deadline passed.
_DEADLINE_SLACK_S = 0.01


def retry_policy(settings: Settings) -> RetryPolicy:
    r = settings.retry
    return RetryPolicy(
        max_attempts=r.max_attempts,
        initial_backoff_s=r.initial_backoff_s,
        max_backoff_s=max(r.max_backoff_s, r.initial_backoff_s),
        multiplier=r.multiplier,
        retryable_codes=frozenset(grpc.StatusCode[name] for name in r.retryable_codes),
    )


def coalesce_window(call: CallInfo, default_ms: float) -> float:
    """The call's coalescing window: the caller's header if it is a number within
    0..1000 ms (anything else is ignored), else the operator's setting."""
    value = call.metadata.get(COALESCE_HEADER)
    if value is None:
        return default_ms
    try:
        ms = float(value)
    except (TypeError, ValueError):
        return default_ms
    return ms if 0 <= ms <= 1000 else default_ms


async def send_reply_metadata(context: Context, call: CallInfo, *extra: tuple[str, str]) -> None:
    """A unary answer's reply metadata: x-request-id, call.reply_metadata and `extra`. In
    the trailing metadata, with the attempts it took, when call.reply_in_trailers (no
    batch of its own: core/headers.REPLY_HEADERS_HEADER); else as initial metadata (the
    trailers keep x-request-id and the attempts, set when the attempts ended)."""
    if call.reply_in_trailers:
        attempts = ((ATTEMPTS_TRAILER, str(call.attempts)),) if call.attempts else ()
        context.set_trailing_metadata(
            ((REQUEST_ID, call.request_id), *attempts, *call.reply_metadata, *extra)
        )
    else:
        await context.send_initial_metadata(
            ((REQUEST_ID, call.request_id), *call.reply_metadata, *extra)
        )


class Forwarder:
    """The pipeline's terminal: per method, the function that sends an admitted call
    through the pool (with retries) and relays the answer."""

    def __init__(self, pool: UpstreamPool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._policy = retry_policy(settings)
        self._drop = (
            _HOP_METADATA
            | PROXY_ONLY_METADATA
            | {k.lower() for k in settings.upstream.drop_metadata}
        )
        self._affinity = settings.upstream.affinity.enabled
        # The upstream's response metadata passed on to the caller (which replica answered).
        self._relayed = frozenset(k.lower() for k in settings.upstream.reply_metadata)
        # Methods that reach a conversation: the agent is told whose (core/sessions.py).
        self._session_paths = frozenset(m.path for m in agent_service().methods if m.sessions)
        # Calls being forwarded now; drain waits for them, not for health Watch streams.
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.active -= 1
        if not self.active:
            self._idle.set()

    # -- per call ---------------------------------------------------------------------

    def _metadata(self, context: Context, call: CallInfo) -> list[tuple[str, Any]]:
        drop = self._drop
        # The dict read on entry; a key the caller repeated keeps all its values.
        pairs = context.invocation_metadata() or () if call.repeated else call.metadata.items()
        out = [
            (key, value)
            for key, value in pairs
            if key not in drop
            and not key.startswith(_NEVER_FORWARDED_PREFIXES)
            and not is_credential(key)
        ]
        out.append((REQUEST_ID, call.request_id))
        if call.method in self._session_paths:
            # After the filter above, which dropped any the caller sent: only ours goes.
            owner = session_owner(call)
            out.append((SESSION_OWNER_HEADER, owner))
            out.append((SESSION_QUOTA_HEADER, session_quota(call, owner)))
        return out

    def keyed(self, method: Method) -> bool:
        """Whether the method's calls are routed by their session id when they have one."""
        fields = method.request_cls.DESCRIPTOR.fields_by_name
        field = fields.get(SESSION_FIELD)
        return self._affinity and field is not None and field.type == field.TYPE_STRING

    def affinity_key(self, call: CallInfo, request: Any, keyed: bool) -> int | None:
        """The hash of the call's scoped affinity key (see the module docstring), or None
        when it has none (or affinity is off): P2C then."""
        if not self._affinity:
            return None
        name = request.session_id if keyed else ""
        if not name:
            name = call.header(AFFINITY_HEADER)
            if not name:
                return None
        return key_hash(scoped_key(session_owner(call), name))

    def _relay(self, call: CallInfo, metadata: Any) -> None:
        """Add the upstream's `reply_metadata` keys (text values) to the caller's headers."""
        names = self._relayed
        pairs = tuple((k, v) for k, v in metadata or () if k in names and isinstance(v, str))
        if pairs:
            call.reply_metadata += pairs

    def _deadline(self, context: Context, call: CallInfo) -> Deadline | None:
        timeout = call.timeout_s if call.timeout_s is not None else context.time_remaining()
        return None if timeout is None else Deadline.from_timeout(timeout)

    async def _within_deadline(
        self,
        context: Context,
        call: CallInfo,
        deadline: Deadline | None,
        attempt_on: Callable[[Endpoint, list[tuple[str, Any]], float | None], Awaitable[T]],
        key: int | None = None,
    ) -> T:
        """`_with_retries`, ended by the proxy itself with DEADLINE_EXCEEDED when the
        call's effective deadline comes, so the caller gets the shaped error before its
        own deadline fires. No timer of its own (asyncio.timeout cost ~10 us of CPU per
        call): each attempt's upstream call carries what is left as its grpc deadline
        (streams: the pump's `end_at` too), a backoff never sleeps past it, and an
        attempt that grpc ended at that deadline becomes the proxy's own
        DEADLINE_EXCEEDED; picks are synchronous."""
        try:
            return await self._with_retries(context, call, deadline, attempt_on, key)
        except grpc.aio.AioRpcError as exc:
            if (
                deadline is not None
                and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                and deadline.remaining() <= _DEADLINE_SLACK_S
            ):
                del exc
                raise DeadlineExceeded("the call's deadline passed") from None
            raise

    async def _with_retries(
        self,
        context: Context,
        call: CallInfo,
        deadline: Deadline | None,
        attempt_on: Callable[[Endpoint, list[tuple[str, Any]], float | None], Awaitable[T]],
        key: int | None = None,
    ) -> T:
        """Run `attempt_on(endpoint, metadata, timeout)` until it succeeds or may not retry.

        A breaker rejection sent nothing upstream, so it moves on to another endpoint
        at once; an upstream failure with a retryable code waits a jittered backoff.
        With an affinity `key`, each attempt goes to the key's next choice (the first is
        its replica; a retry goes where its later calls fail over to if it stays down).
        """
        metadata = self._metadata(context, call)
        tried: set[str] = set()
        policy = self._policy
        attempt = 0
        try:
            while True:
                attempt += 1
                if key is None:
                    endpoint = self._pool.pick(exclude=tried)
                else:
                    endpoint, call.affinity = self._pool.pick_affine(key, tried)
                if endpoint is None:
                    raise self._pool.unavailable_error()
                tried.add(endpoint.address)
                call.upstream = endpoint.address
                call.attempts = attempt
                attempt_metadata = (
                    metadata if attempt == 1 else [*metadata, (PREVIOUS_ATTEMPTS, str(attempt - 1))]
                )
                remaining = None if deadline is None else deadline.remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("the call's deadline passed")
                endpoint.in_flight += 1
                endpoint.total_calls += 1
                try:
                    return await attempt_on(endpoint, attempt_metadata, remaining)
                except CircuitOpen:
                    if attempt >= policy.max_attempts or not self._pool.has_other_usable(tried):
                        raise
                except grpc.aio.AioRpcError as exc:
                    remaining = None if deadline is None else deadline.remaining()
                    backoff = policy.backoff(attempt)
                    if (
                        not policy.should_retry(exc.code(), attempt, remaining, backoff)
                        or not self._pool.has_other_usable(tried)
                        or not_the_replicas_fault(exc)
                    ):
                        # A retry goes to another endpoint (never the one that failed):
                        # with none left, the backoff would only delay the same error;
                        # a shared store that is down fails every replica alike.
                        raise
                    del exc  # not kept alive (with its frames) across the backoff
                    call.retries += 1
                    await asyncio.sleep(backoff)
                finally:
                    endpoint.in_flight -= 1
        finally:
            context.set_trailing_metadata(
                ((REQUEST_ID, call.request_id), (ATTEMPTS_TRAILER, str(attempt)))
            )

    # -- the pipeline's terminal: one forwarding function per method ------------------

    def unary(self, method: Method) -> UnaryCall:
        path, deserialize = method.path, method.response_cls.FromString
        keyed = self.keyed(method)

        async def forward_unary(request: Any, raw: bytes, context: Context, call: CallInfo) -> Any:
            relay = None if not self._relayed else functools.partial(self._relay, call)

            def attempt(
                endpoint: Endpoint, metadata: list[tuple[str, Any]], timeout: float | None
            ) -> Awaitable[Any]:
                # The caller's bytes go upstream as they came.
                return endpoint.unary(path, deserialize, raw, metadata, timeout, relay)

            key = self.affinity_key(call, request, keyed)
            self._enter()
            try:
                response = await self._within_deadline(
                    context, call, self._deadline(context, call), attempt, key
                )
            finally:
                self._leave()
            await send_reply_metadata(context, call)
            return response

        return forward_unary

    def stream(self, method: Method) -> StreamCall:
        path, response_cls = method.path, method.response_cls
        deserialize = response_cls.FromString
        settings = self._settings.stream
        window_ms = settings.coalesce_window_ms_per_method.get(
            method.name, settings.coalesce_window_ms
        )
        keyed = self.keyed(method)

        async def forward_stream(
            request: Any, raw: bytes, context: Context, call: CallInfo
        ) -> AsyncGenerator[Any, None]:
            deadline = self._deadline(context, call)
            end_at = None if deadline is None else deadline.expires_at
            window = coalesce_window(call, window_ms)

            async def attempt(
                endpoint: Endpoint, metadata: list[tuple[str, Any]], timeout: float | None
            ) -> tuple[Any, Any, Endpoint]:
                upstream = endpoint.stream(path, deserialize, raw, metadata, timeout)
                # The pump ends the stream at the deadline (StreamDeadline), in-band.
                chunks = StreamPump(
                    upstream, response_cls, settings, end_at=end_at, window_ms=window
                ).chunks()
                try:
                    # Retrying is safe until a chunk is on its way to the caller.
                    first = await chunks.__anext__()
                except StopAsyncIteration:
                    first = None
                except BaseException:
                    await chunks.aclose()
                    raise
                if self._relayed and first is not None and not first.heartbeat:
                    # An upstream chunk: its headers came before it (which replica
                    # answers). Not after a heartbeat the pump made while the upstream was
                    # still silent: the caller's headers go out with it, now.
                    self._relay(call, await upstream.initial_metadata())
                endpoint.in_flight += 1  # the stream stays open past the attempt
                return first, chunks, endpoint

            key = self.affinity_key(call, request, keyed)
            self._enter()
            try:
                first, chunks, endpoint = await self._within_deadline(
                    context, call, deadline, attempt, key
                )
            except BaseException:
                self._leave()
                raise
            try:
                if first is None:
                    return
                await context.send_initial_metadata(
                    ((REQUEST_ID, call.request_id), *call.reply_metadata)
                )
                yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                endpoint.in_flight -= 1
                self._leave()
                await chunks.aclose()

        return forward_stream
