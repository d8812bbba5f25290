"""Server interceptor: admission control on AgentService calls.

Three checks, cheapest and least personal first, before a call costs anything upstream:

  1. the proxy-wide cap on calls in flight: past it RESOURCE_EXHAUSTED (OVERLOADED) at
     once, instead of a queue that grows until memory or latency gives out; it does not
     spend the caller's tokens, since the overload is not the caller's doing;
  2. the caller's token bucket (rate and burst): RESOURCE_EXHAUSTED (RATE_LIMITED) with
     RetryInfo saying when a token is back; admitted calls carry x-ratelimit-limit,
     -remaining and -reset in their response headers;
  3. for streams, the caller's open-stream cap: RESOURCE_EXHAUSTED (CONCURRENCY_LIMITED).

The caller's key is the authenticated identity that an earlier interceptor put in
CallInfo.caller, else what `caller_key` derives from the API key, client id header or
peer address; it is written back to CallInfo.caller so the log shows who was limited.

Behind the edge every HTTP caller's peer is Envoy, so anonymous callers would share one
bucket (one heavy browser exhausts everyone's budget). Envoy puts the caller's own
address in `limits.client_address_header` (x-envoy-external-address, overwriting what a
caller sent), and that address replaces the peer. But any direct gRPC caller can send
the same header, to pick its own bucket key (a fresh one per call escapes its limits) or
a victim's (to exhaust theirs). So the header is believed only from the edge:
- the connection's peer is in `limits.trusted_edges` (default loopback: `aiproxy envoy`
  and the demo run beside the proxy; compose names Envoy's fixed address), and
- when `limits.edge_secret` is set, the call also carries it in x-aiproxy-edge, which
  the project's Envoy adds to every request it forwards (compose, k8s, demo set it).
  Peers alone cannot tell Envoy from another process on the same host or pod network;
  a secret that only the edge holds can. The forwarder drops x-aiproxy-edge, so it never
  reaches an agent.
From anyone else the header is ignored and the peer address is the key.
Health, reflection and admin calls are not limited: probes must never be turned away.

The pure logic (buckets, leases, keys, memory bounds) is in ratelimit.py.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, Final

from grpc_interceptor.server import AsyncServerInterceptor

from core.callinfo import CallInfo, current_call
from core.errors import Overloaded
from core.ratelimit import (
    API_KEY_HEADER,
    CLIENT_ID_HEADER,
    ConcurrencyLimiter,
    KeyedLimiter,
    Lease,
    LimitSpec,
    caller_key,
    concurrency_limited_error,
    rate_limited_error,
)
from core.settings import LimitSettings

_PROXY_KEY: Final = "*"  # the one key of the proxy-wide cap
# The edge's proof that a call came through it (see the module docstring).
EDGE_SECRET_HEADER: Final = "x-aiproxy-edge"
# What an OVERLOADED caller is told to wait: calls finish in well under a second on
# average, so a short, jittered retry (the client's job) finds room.
OVERLOADED_RETRY_DELAY_S: Final = 0.5
STREAM_RETRY_DELAY_S: Final = 1.0


class LimitsInterceptor(AsyncServerInterceptor):
    def __init__(
        self,
        settings: LimitSettings,
        limited_methods: Collection[str],
        streaming_methods: Collection[str],
    ) -> None:
        self._limited = frozenset(limited_methods)
        self._streaming = frozenset(streaming_methods)
        overrides = settings.overrides
        self.rates = KeyedLimiter(
            LimitSpec(settings.rate_per_s, settings.burst),
            {key: LimitSpec(o.rate_per_s, o.burst) for key, o in overrides.items()},
            max_keys=settings.max_tracked_callers,
        )
        self.streams = ConcurrencyLimiter(
            settings.max_streams_per_caller,
            {key: o.max_streams for key, o in overrides.items() if o.max_streams is not None},
        )
        self.in_flight = ConcurrencyLimiter(settings.max_concurrent_calls)
        self._address_header = settings.client_address_header.lower()
        self._edges = tuple(
            ipaddress.ip_network(net, strict=False) for net in settings.trusted_edges
        )
        secret = settings.edge_secret.get_secret_value() if settings.edge_secret else ""
        self._edge_secret = secret.encode()
        self._key_headers = frozenset(
            {API_KEY_HEADER, CLIENT_ID_HEADER, self._address_header, EDGE_SECRET_HEADER} - {""}
        )

    def _key(self, call: CallInfo, context: Any) -> str:
        if call.caller:
            return call.caller
        wanted = self._key_headers
        headers = {k: v for k, v in context.invocation_metadata() or () if k in wanted}
        peer = context.peer()
        forwarded = headers.get(self._address_header) if self._address_header else None
        if forwarded and self._from_edge(peer, headers.get(EDGE_SECRET_HEADER)):
            peer = _as_peer(forwarded) or peer
        call.caller = caller_key(headers, peer)
        return call.caller

    def _from_edge(self, peer: str, secret: str | None) -> bool:
        """Whether the call came through the edge (see the module docstring)."""
        ip = _peer_ip(peer)
        if ip is None or not any(ip in net for net in self._edges):
            return False
        if not self._edge_secret:
            return True
        return secret is not None and hmac.compare_digest(secret.encode(), self._edge_secret)

    def _admit(self, call: CallInfo, context: Any, stream: bool) -> list[Lease]:
        """The leases that admit the call (release them when it ends), or a raise."""
        overall = self.in_flight.try_acquire(_PROXY_KEY)
        if overall is None:
            raise Overloaded(
                "the proxy is at its limit of calls in flight",
                metadata={"limit": str(self.in_flight.max_per_key)},
                retry_delay_s=OVERLOADED_RETRY_DELAY_S,
            )
        leases = [overall]
        try:
            key = self._key(call, context)
            decision = self.rates.try_acquire(key)
            if not decision.allowed:
                raise rate_limited_error(key, decision)
            call.reply_metadata += decision.headers()
            if stream:
                lease = self.streams.try_acquire(key)
                if lease is None:
                    raise concurrency_limited_error(
                        key, self.streams.limit_for(key), STREAM_RETRY_DELAY_S
                    )
                leases.append(lease)
        except BaseException:
            _release(leases)
            raise
        return leases

    async def intercept(
        self, method: Callable[..., Any], request: Any, context: Any, method_name: str
    ) -> Any:
        call = current_call.get()
        if method_name not in self._limited or call is None:
            return await super().intercept(method, request, context, method_name)
        if method_name in self._streaming:
            # Admitted inside the generator, so the leases are taken and released by the
            # same frame: a stream cancelled before its first read never held any.
            return self._limited_stream(method, request, context, call)
        leases = self._admit(call, context, stream=False)
        try:
            return await method(request, context)
        finally:
            _release(leases)

    async def _limited_stream(
        self, method: Callable[..., Any], request: Any, context: Any, call: CallInfo
    ) -> AsyncIterator[Any]:
        leases = self._admit(call, context, stream=True)
        try:
            async for chunk in method(request, context):
                yield chunk
        finally:
            _release(leases)


def _as_peer(address: str) -> str | None:
    """A client address from a trusted header, in grpc's peer format (so that
    `caller_key` treats it like a connection's address), or None if it is not one."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    return f"ipv4:{ip}:0" if ip.version == 4 else f"ipv6:[{ip}]:0"


def _peer_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a grpc peer string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5"), or None (unix: ...)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
    else:
        return None
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    # An IPv4 peer on a dual-stack socket reads as ::ffff:a.b.c.d.
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def _release(leases: list[Lease]) -> None:
    for lease in leases:
        lease.release()
