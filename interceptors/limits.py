"""Stage: admission control on AgentService calls.

Three checks, cheapest and least personal first, before a call costs anything upstream:

  1. the proxy-wide cap on calls in flight: past it RESOURCE_EXHAUSTED (OVERLOADED) at
     once, instead of a queue that grows until memory or latency gives out; it does not
     spend the caller's tokens, since the overload is not the caller's doing;
  2. the caller's token bucket (rate and burst): RESOURCE_EXHAUSTED (RATE_LIMITED) with
     RetryInfo saying when a token is back; admitted calls carry x-ratelimit-limit,
     -remaining and -reset in their response headers;
  3. for streams, the caller's open-stream cap: RESOURCE_EXHAUSTED (CONCURRENCY_LIMITED).

Whose budget a call spends (`Limits.keys`). The owner is an identity the caller cannot
choose: the one auth verified (CallInfo.identity: `sub:<subject>`, `key:<hash>`), else
the caller's address (`peer:<address>`, see below). The owner's bucket is charged for
every call, and the owner's stream cap and token quotas are the ones that apply.

An id the caller declares about itself is a label, not an identity: x-client-id, and,
while auth is off (nothing verifies it), x-api-key. A label may SPLIT its owner's
budget, never MULTIPLY it: it gets its own request bucket INSIDE the owner's
(`client:<id>@<owner>`, `key:<hash>@<owner>`), and a call is admitted only when both
admit (checked inner first, then both charged or neither; one step in the store, one
Lua script in Redis). So a backend serving many users through one address or API key
can give each user a share (an override for `client:<id>` shapes that user's bucket),
but a caller rotating ids per call still draws on one owner bucket: 20 fresh ids get
what one id gets. An override for a label can only narrow (the owner's bucket still
applies); to give a caller more, override its owner (`peer:<address>`, `sub:`,
`apikey:<name>` with auth on). A label can never reach another owner's bucket either
(the victim's id from another address is another bucket). A sub-bucket of the owner's
own shape could never refuse first, so it is skipped (no extra state). CallInfo.caller
is the label's key when there is one (logs, the cache's scope: a label only narrows it),
else the owner; CallInfo.identity, what the upstream breaker, resume bounds and stream
scopes count as distinct callers, is always the owner.

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

Buckets and stream leases live in a LimitStore (core/limitstore.py: in memory, or shared
in Redis), passed in by the assembly: one `admit` on the way in, one `finish` when the
call ends. The proxy-wide cap stays in this process (it protects this process).

Which limits apply is the LimitPolicy's answer (core/limitpolicy.py, built once): the
caller's own override, else its API key name's (`apikey:<name>`), else its tenant's
(`tenant:<value>`, the JWT claim auth put in CallInfo.tenant), else the defaults.

Token-aware limits, for methods whose answers report `usage` (core/tokens.py): the same
`admit` reserves the prompt's estimated tokens plus max_tokens (or a default when
unset) from the caller's tokens-per-minute bucket and from the daily budget (the
tenant's when it has one), all or nothing, inside the store (atomic in Redis: N
concurrent calls against a budget that fits K admit K). A refusal is RESOURCE_EXHAUSTED
with QuotaFailure and RetryInfo at the refill (or 00:00 UTC); an admitted call's
response headers carry the token budget left (x-ratelimit-*-tokens[-day]). When the
call ends, `exit` settles the reservation exactly once with what the agent reported
(the unary response's or the stream's final chunk's usage), or, when no usage arrived
(cancelled, failed mid-stream), with what went out: the prompt estimate plus the
tokens of the chunks the caller was sent (counted by the pipeline). A call that sent
the caller nothing is charged nothing. That is why this stage sits after DECODE: the
reservation needs the request.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from typing import Any, Final, NamedTuple

from google.protobuf.message import Message

from aiproxy.core import headers, tokens
from aiproxy.core.callinfo import CallInfo
from aiproxy.core.errors import OVERLOADED_RETRY_DELAY_S, Overloaded
from aiproxy.core.limitpolicy import LimitPolicy
from aiproxy.core.limitstore import (
    LimitStore,
    MemoryLimitStore,
    Reservation,
    StreamLease,
    refusal_error,
)
from aiproxy.core.ratelimit import (
    API_KEY_HEADER,
    CLIENT_ID_HEADER,
    MAX_CLIENT_ID_LEN,
    ConcurrencyLimiter,
    LimitSpec,
    as_peer,
    hash_api_key,
    peer_host,
    peer_ip,
)
from aiproxy.core.service import Method
from aiproxy.core.settings import LimitSettings
from aiproxy.core.types import Context

_PROXY_KEY: Final = "*"  # the one key of the proxy-wide cap
# The edge's proof that a call came through it (see the module docstring); named in
# core/headers.py with the proxy's other own headers (never forwarded upstream).
EDGE_SECRET_HEADER: Final = headers.EDGE_SECRET_HEADER
STREAM_RETRY_DELAY_S: Final = 1.0


class Keys(NamedTuple):
    """Whose budget a call spends.

    owner: the bucket always charged, and the key of its streams and tokens: the
    verified identity (`sub:`, `key:`) or the address (`peer:<address>`);
    declared: `<label>@<owner>` when the caller declared an id, else None: a sub-bucket
    inside the owner's (it can only refuse sooner); label: that id as overrides name it
    (`client:<id>`, or `key:<hash>` for an API key that auth did not verify).
    """

    owner: str
    declared: str | None
    label: str | None


def declared_label(call: CallInfo, *, verified: bool) -> str | None:
    """The id a caller declares about itself, as overrides name it, or None: x-client-id
    (`client:<id>`, printable, at most 128 characters), or, when auth has not verified
    the caller, its x-api-key (`key:<hash>`: unverified, it is only a label)."""
    if not verified:
        api_key = call.header(API_KEY_HEADER)
        if api_key:
            return f"key:{hash_api_key(api_key)}"
    client_id = call.header(CLIENT_ID_HEADER)
    if client_id and len(client_id) <= MAX_CLIENT_ID_LEN and client_id.isprintable():
        return f"client:{client_id}"
    return None


class Limits:
    """Stage: admission control (see the module docstring)."""

    def __init__(
        self,
        settings: LimitSettings,
        store: LimitStore | None = None,
        *,
        policy: LimitPolicy | None = None,
    ) -> None:
        """`policy`: LimitPolicy.from_settings(settings) so `apikey:<name>` overrides find
        their callers (the default knows no API key names)."""
        self.policy = policy if policy is not None else LimitPolicy(settings)
        self.store: LimitStore = (
            store if store is not None else MemoryLimitStore(max_keys=settings.max_tracked_callers)
        )
        self.in_flight = ConcurrencyLimiter(settings.max_concurrent_calls)
        self._address_header = settings.client_address_header.lower()
        self._edges = tuple(
            ipaddress.ip_network(net, strict=False) for net in settings.trusted_edges
        )
        secret = settings.edge_secret.get_secret_value() if settings.edge_secret else ""
        self._edge_secret = secret.encode()
        # Releases on a remote store, in flight (kept so they are not collected).
        self._pending: set[asyncio.Task[None]] = set()

    def bind(self, method: Method) -> _Bound:
        return _Bound(self, method.streaming, tokens.reports_usage(method.response_cls))

    # -- keys ------------------------------------------------------------------------

    def key(self, call: CallInfo) -> str:
        """The caller's key for logs and scopes (CallInfo.caller): its `Keys.declared`
        when it declared an id, else its `Keys.owner`."""
        keys = self.keys(call)
        return keys.declared or keys.owner

    def keys(self, call: CallInfo) -> Keys:
        """Whose budget a call spends (see the module docstring); sets CallInfo.identity
        (when auth has not) and CallInfo.caller."""
        if not call.identity:
            peer = call.peer
            if self._address_header:
                forwarded = call.header(self._address_header)
                if forwarded and self._from_edge(peer, call.header(EDGE_SECRET_HEADER)):
                    peer = as_peer(forwarded) or peer
            call.identity = f"peer:{peer_host(peer)}"
        owner = call.identity
        label = declared_label(call, verified=not owner.startswith("peer:"))
        if label is None:
            call.caller = owner
            return Keys(owner, None, None)
        declared = f"{label}@{owner}"
        call.caller = declared
        return Keys(owner, declared, label)

    def _from_edge(self, peer: str, secret: str | None) -> bool:
        """Whether the call came through the edge (see the module docstring)."""
        ip = peer_ip(peer)
        if ip is None or not any(ip in net for net in self._edges):
            return False
        if not self._edge_secret:
            return True
        return secret is not None and hmac.compare_digest(secret.encode(), self._edge_secret)

    def sub_spec(self, keys: Keys, owner_spec: LimitSpec) -> LimitSpec | None:
        """The declared id's own bucket shape: its override's (`client:<id>`, or
        `apikey:<name>` / `key:<hash>` for an unverified API key), else the default. None
        when it is the owner's shape: a bucket inside one of the same shape, charged only
        with a share of what the outer one is, can never refuse first, so it is skipped."""
        if keys.label is None:
            return None
        spec = self.policy.for_caller(keys.label).spec
        return None if spec == owner_spec else spec

    # -- the end of a call -----------------------------------------------------------

    def finish(
        self, lease: StreamLease | None, reservation: Reservation | None, actual_tokens: int = 0
    ) -> None:
        store = self.store
        if isinstance(store, MemoryLimitStore):
            store.finish_nowait(lease, reservation, actual_tokens)
            return
        # A remote release must not hold the caller's answer: it runs on its own.
        task = asyncio.get_running_loop().create_task(
            store.finish(lease, reservation, actual_tokens)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


class _Bound:
    """One method's admission. What a call holds is kept on its CallInfo (the in-flight
    lease, the store's stream lease and token reservation) and released by `exit`."""

    __slots__ = ("_limits", "_metered", "_stream", "exit")

    def __init__(self, limits: Limits, stream: bool, metered: bool) -> None:
        self._limits, self._stream = limits, stream
        self._metered = metered  # the method's answers report LLM token usage
        self.exit = self._exit

    async def enter(self, call: CallInfo, request: Any, context: Context) -> None:
        limits = self._limits
        overall = limits.in_flight.try_acquire(_PROXY_KEY)
        if overall is None:
            raise Overloaded(
                "the proxy is at its limit of calls in flight",
                metadata={"limit": str(limits.in_flight.max_per_key)},
                retry_delay_s=OVERLOADED_RETRY_DELAY_S,
            )
        try:
            keys = limits.keys(call)
            key = keys.owner
            resolved = limits.policy.for_caller(key, call.tenant or None)
            token_limits = resolved.token_limits if self._metered else None
            reserve = 0
            if token_limits is not None:
                call.prompt_estimate, reserve = tokens.reserve(request)
            admission = await limits.store.admit(
                key,
                resolved.spec,
                stream_limit=resolved.stream_limit if self._stream else 0,
                tokens=reserve,
                token_limits=token_limits,
                budget_key=resolved.budget_key,
                sub_key=keys.declared,
                sub_spec=limits.sub_spec(keys, resolved.spec),
            )
            if not admission.allowed:
                # A tenant's exhausted daily budget is the tenant's, not this caller's.
                subject = admission.refused_key or key
                if admission.refused == "tokens_per_day" and resolved.budget_key:
                    subject = resolved.budget_key
                raise refusal_error(subject, admission, STREAM_RETRY_DELAY_S)
        except BaseException:
            overall.release()
            raise
        reservation = admission.reservation
        call.reply_metadata += admission.decision.headers()
        if reservation is not None:
            call.reply_metadata += reservation.budget.headers()
            call.chunk_tokens = tokens.chunk_tokens  # the pipeline counts what goes out
        call.in_flight_lease = overall
        call.stream_lease = admission.lease
        call.reservation = reservation

    def _exit(self, call: CallInfo) -> None:
        lease = call.in_flight_lease
        if lease is not None:
            call.in_flight_lease = None
            lease.release()
        end = call.generation_end
        if end is not None and call.reservation is not None and not end.done():
            # A resumable generation goes on after its caller left: free the stream slot
            # now, settle the tokens once it ends, with everything it produced.
            reservation, prompt, limits = call.reservation, call.prompt_estimate, self._limits
            limits.finish(call.stream_lease, None, 0)
            call.stream_lease = call.reservation = None

            def settle(done: asyncio.Future[tuple[Any, int]]) -> None:
                last, produced = (None, 0) if done.cancelled() else done.result()
                limits.finish(None, reservation, generated_tokens(last, produced, prompt))

            end.add_done_callback(settle)
            return
        if call.stream_lease is not None or call.reservation is not None:
            used = used_tokens(call) if call.reservation is not None else 0
            self._limits.finish(call.stream_lease, call.reservation, used)
            call.stream_lease = call.reservation = None


def used_tokens(call: CallInfo) -> int:
    """What a call that held a reservation is charged (see the module docstring): the
    usage the agent reported in its last answer, else what went out to the caller. An
    answer replayed from the cache or a resume buffer generated nothing: it is free (the
    generation was charged to the call that ran it)."""
    if call.replayed:
        return 0
    reported = tokens.reported_usage(call.last)
    if reported is not None:
        return reported
    if not call.chunks and isinstance(call.last, Message):  # a unary answer, no usage
        return call.prompt_estimate + tokens.text_tokens(call.last)
    if not call.streamed_tokens:
        return 0  # the caller got no generated text: nothing to charge
    return call.prompt_estimate + call.streamed_tokens


def generated_tokens(last: Any, produced: int, prompt_estimate: int) -> int:
    """What a generation that outlived its caller is charged: the usage its last chunk
    reported, else the prompt estimate plus the tokens of every chunk it produced."""
    reported = tokens.reported_usage(last)
    if reported is not None:
        return reported
    return prompt_estimate + produced if produced else 0
