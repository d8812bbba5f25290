"""The response cache, wired: core/cache.py's ResponseCache in front of the forwarder.

`Caching.unary(method, inner)` / `Caching.stream(method, inner)` wrap a method's
terminal. Per call: `decide(parse_cache_control(metadata), method TTL, max_ttl_s)`; a
call that does not opt in (no `cache-control: max-age=N`, no operator TTL for the
method) or says `no-store` goes straight to `inner`, untouched. Otherwise the key is
method + canonical request + the caller's tenant scope (core/cache.cache_key), and:

- a hit replays the stored answer (a stream: its chunks, first at once, renumbered);
- identical calls in flight share one upstream call (single flight);
- a miss runs `inner` with a DetachedContext (the producer may outlive the first caller
  when others follow it) and stores the answer only if it is complete: an error never,
  a stream only when it ended with its final chunk and no in-band error. The callers of a
  flight get its heartbeats (their connections must stay alive while the upstream is
  quiet); a replay from the cache leaves them out (it is immediate).

Every cached call gets `x-aiproxy-cache: hit|miss` in its initial metadata (hit: no
upstream call was made for it, including a shared flight) and counts in
ai_proxy_cache_requests_total{method,outcome}. A hit sets CallInfo.replayed = "cache":
no upstream call, no token charge.

Never cached: the methods that reach a conversation (core/service.SESSION_METHODS: Chat,
StreamChat and the session API), whatever cache-control or `cache.methods` say. Their
answer depends on what the agent remembers, a hit would not be remembered as a turn, and
a conversation is per subject while the cache is shared by a tenant.

Scope: `tenant:<t>` when the caller has a tenant, else its caller key (so anonymous
callers behind different addresses never share answers); "" when the operator sets
`cache.shared_across_tenants`. The caller key is its identity (verified, else its
address), or `<declared id>@<identity>`: an id the caller declares (x-client-id, an
unverified x-api-key) only narrows the scope inside its identity, never widens it to
whoever else declares the same value.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from aiproxy.core.cache import (
    CACHE_HEADER,
    LruCache,
    Outcome,
    ResponseCache,
    cache_key,
    canonical_request,
    decide,
    parse_cache_control,
)
from aiproxy.core.callinfo import CallInfo
from aiproxy.core.headers import CACHE_CONTROL
from aiproxy.core.metrics import ProxyMetrics
from aiproxy.core.service import Method
from aiproxy.core.settings import CacheSettings, Settings
from aiproxy.core.types import Context, StreamCall, UnaryCall
from aiproxy.server.request.forwarding import send_reply_metadata
from aiproxy.server.request.resume import DetachedContext, initial_metadata


class _Incomplete(Exception):
    """Raised by a producer after its last chunk: the answer must not be stored (an
    in-band error, or no final chunk). Followers have every chunk by then: they end."""


class Caching:
    def __init__(
        self, cache: ResponseCache, settings: CacheSettings, metrics: ProxyMetrics | None = None
    ) -> None:
        self.cache = cache
        self.settings = settings
        self._metrics = metrics

    def _ttl(self, method: Method) -> int:
        m = self.settings.methods
        return m.get(method.name, m.get(method.path, 0))

    def _scope(self, call: CallInfo) -> str:
        if self.settings.shared_across_tenants:
            return ""
        return f"tenant:{call.tenant}" if call.tenant else call.caller or call.peer

    def _counter(self, method: Method) -> Callable[[Outcome], None]:
        metrics = self._metrics
        children: dict[Outcome, Any] = {}

        def count(outcome: Outcome) -> None:
            if metrics is None:
                return
            child = children.get(outcome)
            if child is None:
                child = children[outcome] = metrics.cache_requests.labels(
                    method.name, outcome.value
                )
            child.inc()

        return count

    def unary(self, method: Method, inner: UnaryCall) -> UnaryCall:
        ttl, max_ttl = self._ttl(method), self.settings.max_ttl_s
        path, cls = method.path, method.response_cls
        count = self._counter(method)
        cache = self.cache

        async def cached_unary(request: Any, raw: bytes, context: Context, call: CallInfo) -> Any:
            if not ttl and CACHE_CONTROL not in call.metadata:
                # Neither the operator nor the caller asked (gRPC metadata keys are
                # lowercase): the common case, without parsing the metadata.
                count(Outcome.BYPASS)
                return await inner(request, raw, context, call)
            decision = decide(parse_cache_control(call.metadata.items()), ttl, max_ttl)
            if decision.bypass:
                count(Outcome.BYPASS)
                return await inner(request, raw, context, call)
            key = cache_key(path, self._scope(call), canonical_request(request))
            detached = DetachedContext(context)

            async def load() -> bytes:
                response = await inner(request, raw, detached.as_context(), call)
                return bytes(response.SerializeToString())

            outcome, data = await cache.unary(key, decision, load)
            count(outcome)
            if outcome is not Outcome.MISS:
                call.replayed = "cache"
            cache_header = (CACHE_HEADER, outcome.header)
            if call.reply_in_trailers:
                await send_reply_metadata(context, call, cache_header)
            else:
                await context.send_initial_metadata(initial_metadata(call, detached, cache_header))
            return cls.FromString(data)

        return cached_unary

    def stream(self, method: Method, inner: StreamCall) -> StreamCall:
        ttl, max_ttl = self._ttl(method), self.settings.max_ttl_s
        count = self._counter(method)

        def cached_stream(
            request: Any, raw: bytes, context: Context, call: CallInfo
        ) -> AsyncGenerator[Any, None]:
            decision = decide(parse_cache_control(call.metadata.items()), ttl, max_ttl)
            if decision.bypass:
                count(Outcome.BYPASS)
                return inner(request, raw, context, call)
            return self._stream(method, inner, decision, count, request, raw, context, call)

        return cached_stream

    async def _stream(
        self,
        method: Method,
        inner: StreamCall,
        decision: Any,
        count: Callable[[Outcome], None],
        request: Any,
        raw: bytes,
        context: Context,
        call: CallInfo,
    ) -> AsyncGenerator[Any, None]:
        cls = method.response_cls
        key = cache_key(method.path, self._scope(call), canonical_request(request))
        detached = DetachedContext(context)

        async def produce() -> AsyncIterator[bytes]:
            complete = False
            async for chunk in inner(request, raw, detached.as_context(), call):
                complete = chunk.is_final and not chunk.HasField("error")
                yield bytes(chunk.SerializeToString())
            if not complete:
                raise _Incomplete()

        outcome, chunks = await self.cache.stream(key, decision, produce)
        count(outcome)
        if outcome is not Outcome.MISS:
            call.replayed = "cache"
        hit = outcome is Outcome.HIT
        seq = 0
        try:
            async for data in chunks:
                chunk = cls.FromString(data)
                if hit and chunk.heartbeat:
                    continue  # a replay is immediate: nothing to keep alive
                chunk.seq = seq  # this caller's own numbering (heartbeats left out of a replay)
                if not seq:
                    await context.send_initial_metadata(
                        initial_metadata(call, detached, (CACHE_HEADER, outcome.header))
                    )
                seq += 1
                yield chunk
        except _Incomplete:
            return  # every chunk was delivered; the answer was just not stored
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]


def cache_backend(settings: Settings) -> str:
    return settings.cache.backend or settings.limits.backend


def build_response_cache(settings: Settings) -> ResponseCache:
    """L1 in this process; L2 on Redis (`redis.url`) when the cache backend is redis."""
    c = settings.cache
    l1 = LruCache(c.l1_max_bytes, max_entry_bytes=c.max_entry_bytes)
    if cache_backend(settings) == "memory":
        return ResponseCache(l1, None)
    from aiproxy.server.stores.redis_cache import RedisL2
    from aiproxy.server.stores.redis_limits import client_from_settings

    rs = settings.redis
    client = client_from_settings(rs)
    l2 = RedisL2(
        client,
        prefix=c.key_prefix,
        timeout_s=max(0.05, rs.timeout_ms / 1000),
        probe_interval_s=rs.probe_interval_s,
        max_value_bytes=c.max_entry_bytes,
    )
    return ResponseCache(l1, l2)


class AnswerTerminal:
    """The pipeline's terminal: the forwarder, behind the cache and resumable streams
    (either may be None: off). Stream order: resume(cache(forward)), so a resumable
    stream records what the cache serves too."""

    def __init__(self, forwarder: Any, caching: Caching | None, resumer: Any | None) -> None:
        self._forwarder = forwarder
        self._caching = caching
        self._resumer = resumer

    def unary(self, method: Method) -> UnaryCall:
        call: UnaryCall = self._forwarder.unary(method)
        if self._caching is None or method.sessions:
            return call
        return self._caching.unary(method, call)

    def stream(self, method: Method) -> StreamCall:
        call: StreamCall = self._forwarder.stream(method)
        if self._caching is not None and not method.sessions:
            call = self._caching.stream(method, call)
        return call if self._resumer is None else self._resumer.wrap(method, call)
