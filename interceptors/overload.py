"""The pipeline's first step: refuse new API calls at once while the proxy is full.

Why a gate before everything else: grpc.aio takes new calls from
grpc-core one at a time, on the event loop, a few loop iterations per call. Every call it
takes then runs the whole pipeline before the limiter in interceptors/limits.py
can refuse it, and while the loop is busy with that, the next callers wait in grpc-core's
pending queue, invisible to the proxy. A burst of a few thousand streams therefore
queued for many seconds, and the calls grpc-core held past
`grpc.server_max_unrequested_time_in_server` (30 s by default) were CANCELLED without
ever reaching the proxy's code.

This gate makes a refusal as cheap as it can be, so the loop drains that queue fast: it
runs on the caller's metadata alone, before the request message is read or decoded or a
CallInfo exists (server/request/pipeline.py runs `check` first), and answers
RESOURCE_EXHAUSTED (ErrorInfo OVERLOADED with its `cause`, RetryInfo) with a prebuilt
status. interceptors/limits.py keeps its exact, lease-based cap further in.

WHOM it refuses (docs/overload.md): with `policy="fair"` the gate counts the
calls it admitted per caller (core/shedding.py: groups are verified identities and
addresses, keys inside an address are client ids and unverified credentials; who is
who: `CallerIdentity`), and past the limit refuses only callers holding their fair share
or more, after letting such a call wait briefly for one of its caller's own calls to end
(`share_wait_s`: calls that arrive bunched take their caller's own slots in turn);
priority classes come from the operator's configuration only. A stream whose
deadline ends before streams lately took to their first chunk (`FirstChunkEstimate`)
is refused at the door (`deadline`). `policy="blind"` is the gate as it was: every new
call past the limit is refused, whoever sends it.

The limit is `capacity` (a fixed ceiling) lowered by `BacklogLimit` while new calls
wait too long to be taken. A fixed number alone cannot tell: a burst of short streams
backs grpc-core's queue up with only a few dozen streams open, and the active count
never reaches any sane ceiling. Nor can the loop's lag: it stays at a few ms while the
queue grows, because the loop is not slow, it only takes one call per few iterations
(grpc/grpc#43436 works on that main loop's throughput). So the proxy measures the wait
itself (server/pool/backlog.py: a probe call to its own listener, on each API method that
takes calls since each registered method has its own queue in grpc-core; the gate
answers it first thing) and the limit follows the longest, AIMD as TCP and Netflix's concurrency-limits do with
latency: while the wait is above its target the limit drops below what is open now, so
new calls are refused cheaply and the queue drains; once the wait is back under the
target the limit climbs again. A floor keeps the proxy serving whatever happens.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc

from aiproxy.core.errors import OVERLOADED_RETRY_DELAY_S, Overloaded, to_grpc_status
from aiproxy.core.headers import EDGE_SECRET_HEADER
from aiproxy.core.ratelimit import (
    API_KEY_HEADER,
    CLIENT_ID_HEADER,
    as_peer,
    hash_api_key,
    peer_host,
    peer_ip,
)
from aiproxy.core.service import Method
from aiproxy.core.shedding import (
    BLIND,
    DEADLINE,
    DEFAULT_CLASS,
    FULL,
    OVER_SHARE,
    QUEUE,
    FairShedder,
    Ticket,
    late_p90,
    lateness,
)
from aiproxy.core.types import Context


class BacklogLimit:
    """A concurrency limit that follows how long new calls wait (pure logic: `sample` is
    fed by `run`, or by a test).

    Every `interval_s` the wait (`delay()`, seconds) is compared with `target_s`: above
    it the limit becomes `decrease` x min(limit, calls open now), never below `floor`;
    at or under it the limit grows by `increase` of itself (at least 1), up to `ceiling`.
    """

    def __init__(
        self,
        ceiling: int,
        floor: int,
        target_s: float,
        *,
        interval_s: float = 0.05,
        decrease: float = 0.9,
        increase: float = 0.05,
    ) -> None:
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.target_s = target_s
        self.interval_s = interval_s
        self._decrease = decrease
        self._increase = increase
        self.limit = ceiling

    def sample(self, delay_s: float, active: int) -> None:
        if delay_s > self.target_s:
            self.limit = max(self.floor, int(self._decrease * min(self.limit, active)))
        elif self.limit < self.ceiling:
            self.limit = min(self.ceiling, self.limit + max(1, int(self.limit * self._increase)))

    async def run(
        self,
        delay: Callable[[], float],
        active: Callable[[], int],
        idle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Sample until cancelled. With `idle` (the gate's `next_call`), a proxy with no
        call open, no wait and the limit back at its ceiling is not sampled again until
        `idle()` returns: there is nothing to measure, and an idle replica wakes for
        nothing."""
        while True:
            await asyncio.sleep(self.interval_s)
            waited, open_calls = delay(), active()
            self.sample(waited, open_calls)
            if (
                idle is not None
                and not open_calls
                and waited <= self.target_s
                and self.limit >= self.ceiling
            ):
                await idle()


# The probe's header (server/pool/backlog.py): a call carrying this process's probe token
# is answered at once, before any other work; it only measures the method's queue.
PROBE_HEADER: Final = "x-aiproxy-probe"
_PROBE_ANSWER: Final = (grpc.StatusCode.UNAVAILABLE, "probe", ())

# Credentials at the gate are known by a keyed hash (never kept as they are); the key is
# this process's own, so nobody outside can aim at a hash.
_CRED_KEY: Final = secrets.token_bytes(16)
MAX_VERIFIED: Final = 10_000  # credentials whose verified identity the gate remembers
STREAM_SAMPLE: Final = 256  # streams in flight the lateness sampler reads per call
_MAX_CLIENT_ID_LEN: Final = 128


def _cred_id(credential: str) -> str:
    return hashlib.blake2b(credential.encode(), digest_size=12, key=_CRED_KEY).hexdigest()


class FirstChunkEstimate:
    """How long admitted streams recently took from the gate to their first chunk: the
    90th percentile of the last `size` samples younger than `horizon_s` (0 when there are
    fewer than `min_samples`): an idle proxy forgets a slow minute.

    `excess()` is what the gate's limit follows besides the queue wait: how far the recent
    p90 is above twice a slow-moving floor of the median (the model's own time to first
    token, whatever it is: a slow model is not an overloaded proxy, a proxy whose streams
    start twice as slow as they usually do is)."""

    def __init__(
        self,
        size: int = 64,
        horizon_s: float = 10.0,
        min_samples: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._samples: list[tuple[float, float]] = []
        self._size, self._horizon_s, self._min = size, horizon_s, min_samples
        self._clock = clock
        self._next = 0
        self._cached = 0.0
        self._stale = True
        self.floor = 0.0  # the median's floor: drops at once, climbs 2 % per estimate

    def sample(self, seconds: float) -> None:
        entry = (self._clock(), seconds)
        if len(self._samples) < self._size:
            self._samples.append(entry)
        else:
            self._samples[self._next] = entry
            self._next = (self._next + 1) % self._size
        self._stale = True

    def p90(self) -> float:
        if self._stale:
            horizon = self._clock() - self._horizon_s
            fresh = sorted(s for at, s in self._samples if at >= horizon)
            if len(fresh) >= self._min:
                self._cached = fresh[int(0.9 * (len(fresh) - 1))]
                median = fresh[len(fresh) // 2]
                floor = self.floor
                self.floor = (
                    median if not floor or median < floor else floor + 0.02 * (median - floor)
                )
            else:
                self._cached = 0.0
            self._stale = False
        return self._cached

    def excess(self) -> float:
        """Seconds the recent p90 is above twice the median's floor (0: not above)."""
        p90 = self.p90()
        return max(0.0, p90 - 2 * self.floor) if p90 else 0.0


class CallerIdentity:
    """Who a call comes from, from its metadata and peer alone (before decoding):
    `(group, key, credential id, caller class)` for core/shedding.py.

    - address: the peer's, or behind the edge the client address Envoy writes in the
      trusted header (believed only from `trusted_edges`, with the edge secret when one
      is set: the rule of interceptors/limits.py);
    - a credential (bearer token, x-api-key) is known by a keyed hash. An API key whose
      hash is one of auth.api_keys is verified by that match: its group is "key:<hash>".
      A bearer token whose identity the auth stage verified on an earlier call (`learn`)
      counts under that identity ("sub:<subject>"). Any other credential, and x-client-id,
      is a key inside its address's group.
    """

    def __init__(
        self,
        *,
        address_header: str = "",
        trusted_edges: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
        edge_secret: bytes = b"",
        api_keys: dict[str, str] | None = None,
        caller_classes: dict[str, str] | None = None,
    ) -> None:
        self._address_header = address_header.lower()
        self._edges = trusted_edges
        self._edge_secret = edge_secret
        self._api_keys = api_keys or {}  # key hash -> name
        classes = caller_classes or {}
        self._classes = classes
        self._cidrs = tuple(
            (ipaddress.ip_network(k.partition(":")[2], strict=False), v)
            for k, v in classes.items()
            if k.startswith("cidr:")
        )
        self._address_class: dict[str, str | None] = {}
        # credential id -> (verified identity, its class)
        self._verified: dict[str, tuple[str, str | None]] = {}

    def __call__(
        self, headers: dict[str, Any], peer: str
    ) -> tuple[str, str, str | None, str | None]:
        address = self.address(headers, peer)
        token = headers.get("authorization")
        if isinstance(token, str) and token:
            cred = _cred_id(token)
            known = self._verified.get(cred)
            if known is not None:
                return known[0], "", cred, known[1]
            return address, f"cred:{cred}", cred, self.address_class(address)
        api_key = headers.get(API_KEY_HEADER)
        if isinstance(api_key, str) and api_key:
            if self._api_keys:
                hashed = hash_api_key(api_key)
                name = self._api_keys.get(hashed)
                if name is not None:
                    return f"key:{hashed}", "", None, self._classes.get(f"apikey:{name}")
            return address, f"cred:{_cred_id(api_key)}", None, self.address_class(address)
        client = headers.get(CLIENT_ID_HEADER)
        if isinstance(client, str) and client and len(client) <= _MAX_CLIENT_ID_LEN:
            return address, f"client:{client}", None, self.address_class(address)
        return address, "", None, self.address_class(address)

    def address(self, headers: dict[str, Any], peer: str) -> str:
        if self._address_header:
            forwarded = headers.get(self._address_header)
            if isinstance(forwarded, str) and forwarded and self._from_edge(peer, headers):
                edge_peer = as_peer(forwarded)
                if edge_peer is not None:
                    peer = edge_peer
        return f"peer:{peer_host(peer)}"

    def _from_edge(self, peer: str, headers: dict[str, Any]) -> bool:
        ip = peer_ip(peer)
        if ip is None or not any(ip in net for net in self._edges):
            return False
        if not self._edge_secret:
            return True
        secret = headers.get(EDGE_SECRET_HEADER)
        return isinstance(secret, str) and hmac.compare_digest(secret.encode(), self._edge_secret)

    def address_class(self, address: str) -> str | None:
        if not self._cidrs:
            return None
        cached = self._address_class.get(address, "")
        if cached != "":
            return cached
        found = None
        try:
            ip = ipaddress.ip_network(address.removeprefix("peer:"), strict=False)
        except ValueError:
            ip = None
        if ip is not None:
            for net, cls in self._cidrs:
                if ip.version == net.version and ip.subnet_of(net):  # type: ignore[arg-type]
                    found = cls
                    break
        if len(self._address_class) >= MAX_VERIFIED:
            self._address_class.clear()
        self._address_class[address] = found
        return found

    def learn(self, cred: str, identity: str, tenant: str) -> None:
        """The auth stage verified `cred` as `identity` (and `tenant`): later calls with
        the same credential count under it, in its class."""
        if cred in self._verified:
            return
        cls = self._classes.get(identity)
        if cls is None and tenant:
            cls = self._classes.get(f"tenant:{tenant}")
        verified = self._verified
        if len(verified) >= MAX_VERIFIED:
            del verified[next(iter(verified))]  # the oldest learned
        verified[cred] = (identity, cls)


class OverloadGate:
    """The gate (see the module docstring). Not a Stage: it runs before the CallInfo and
    the decoding; `bind(method)` gives the method's `check(context, headers)`.

    policy "fair" (core/shedding.py): past the limit only callers under their fair share
    are admitted, up to `capacity`; "blind": every new call past the limit is refused."""

    def __init__(
        self,
        active: Callable[[], int],
        capacity: int,
        on_reject: Callable[[str, str, str], None] | None = None,
        backlog_limit: BacklogLimit | None = None,
        *,
        policy: str = "fair",
        reserve: float = 0.0,
        identity: CallerIdentity | None = None,
        classes: dict[str, float] | None = None,
        method_classes: dict[str, str] | None = None,
        refuse_doomed_streams: bool = True,
        probe_token: str = "",
        min_share: int = 1,
        share_wait_s: float = 0.0,
        distress_s: float = 0.0,
        gap_factor: float = 4.0,
        gap_grace_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._active = active
        self.capacity = capacity
        self._on_reject = on_reject
        self.backlog_limit = backlog_limit
        self.policy = policy
        self.fair = policy == "fair"
        # The adaptive limit never passes capacity x (1 - reserve): the rest is for callers
        # under their share and classes that shed later.
        self.top = max(1, round(capacity * (1.0 - reserve))) if self.fair else capacity
        self.identity = identity if identity is not None else CallerIdentity()
        self.sheds_at = classes if classes is not None else {DEFAULT_CLASS: 1.0}
        self._method_classes = method_classes or {}
        self.refuse_doomed_streams = refuse_doomed_streams
        self.probe_token = probe_token
        self.shedder = FairShedder(capacity, self.top, min_share)
        self.first_chunk = FirstChunkEstimate()
        self.taken: dict[str, int] = {}  # calls that reached the gate, per method path
        # A method's queue wait (the probe's, server/pool/backlog.py) and the wait past
        # which its calls get no exemption past the limit (0: never).
        self.queue_wait: Callable[[str], float] | None = None
        self.distress_s = distress_s
        # How long a call over its share may wait for one of its own group's calls to end.
        self.share_wait_s = share_wait_s
        # How late streams in flight are by their own cadence (core/shedding.lateness):
        # the sampler reads a window of at most STREAM_SAMPLE streams per call.
        self.gap_factor, self.gap_grace_s = gap_factor, gap_grace_s
        self.clock = clock
        self.late_s = 0.0  # the last sample's p90 (a gauge)
        self._cursor = 0
        self.refusals = {
            cause: _refusal(capacity, cause) for cause in (BLIND, OVER_SHARE, FULL, DEADLINE, QUEUE)
        }
        self.refusal = self.refusals[BLIND]
        # The loops that measure traffic (the backlog probe, the adaptive limit, the
        # admin's rates) park on `next_call()` while there is none: one future, resolved
        # by the next call that reaches the gate (probes excepted).
        self._next_call: asyncio.Future[None] | None = None

    def limit(self) -> int:
        """The limit now: past it the gate sheds (fair) or refuses (blind)."""
        backlog_limit = self.backlog_limit
        top = self.top
        return top if backlog_limit is None else min(top, backlog_limit.limit)

    def stream_lateness(self) -> float:
        """The p90 of how late admitted streams in flight are (seconds; 0: on time), over a
        rotating window of at most STREAM_SAMPLE of them: what callers of streams feel
        besides their first chunk. Read by the limit's sampler, never on the chunk path."""
        streams = self.shedder.streams
        n = len(streams)
        if not n:
            self.late_s = 0.0
            return 0.0
        k = min(n, STREAM_SAMPLE)
        start = self._cursor % n
        window = streams[start : start + k]
        if len(window) < k:
            window += streams[: k - len(window)]
        self._cursor = start + k
        now, factor, grace = self.clock(), self.gap_factor, self.gap_grace_s
        usual = self.first_chunk.floor
        self.late_s = late = late_p90([lateness(now, t, factor, grace, usual) for t in window])
        return late

    def full(self) -> bool:
        return self._active() >= self.limit()

    async def next_call(self) -> None:
        """Return when the next call reaches the gate."""
        waiting = self._next_call
        if waiting is None:
            waiting = self._next_call = asyncio.get_running_loop().create_future()
        # Shielded: a waiter cancelled (the proxy stopping) leaves the others waiting.
        await asyncio.shield(waiting)

    def _arrived(self) -> None:
        waiting, self._next_call = self._next_call, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def release(self, ticket: Ticket | None, identity: str, tenant: str) -> None:
        """The end of an admitted call: its place is freed, and a bearer token the auth
        stage verified is remembered with its identity ("peer:..." is not one)."""
        if ticket is None:
            return
        ticket.release()
        cred = ticket.cred
        if cred is not None and identity and not identity.startswith("peer:"):
            self.identity.learn(cred, identity, tenant)

    def bind(self, method: Method) -> GateCheck:
        cls = self._method_classes.get(method.path) or self._method_classes.get(method.name)
        self.taken.setdefault(method.path, 0)
        return GateCheck(self, method, cls or DEFAULT_CLASS)


def _time_up(woken: asyncio.Future[bool]) -> None:
    if not woken.done():
        woken.set_result(False)


def _refusal(capacity: int, cause: str) -> tuple[Any, str, tuple[Any, ...]]:
    message = (
        "the proxy is at capacity; retry after the delay in RetryInfo"
        if cause in (BLIND, FULL)
        else "the proxy is shedding load from the callers using the most; retry after the delay in RetryInfo"
        if cause == OVER_SHARE
        else "the proxy's queue for this method is long; retry after the delay in RetryInfo"
        if cause == QUEUE
        else "the proxy cannot start this stream before its deadline; retry after the delay in RetryInfo"
    )
    metadata = {"limit": str(capacity)}
    if cause != BLIND:
        metadata["cause"] = cause
    status = to_grpc_status(
        Overloaded(message, metadata=metadata, retry_delay_s=OVERLOADED_RETRY_DELAY_S)
    )
    return (status.code, status.details, tuple(status.trailing_metadata))


class GateCheck:
    """One method's gate: `await check(context, headers)` aborts the call when it must be
    refused, else returns its Ticket (None with the blind policy) for `gate.release`."""

    __slots__ = ("_class", "_gate", "_path", "_streaming")

    def __init__(self, gate: OverloadGate, method: Method, cls: str) -> None:
        self._gate, self._path, self._streaming = gate, method.path, method.streaming
        self._class = cls

    @property
    def gate(self) -> OverloadGate:
        return self._gate

    async def check(self, context: Context, headers: dict[str, Any]) -> Ticket | None:
        gate = self._gate
        if gate.probe_token and headers.get(PROBE_HEADER) == gate.probe_token:
            await context.abort(*_PROBE_ANSWER)
        gate.taken[self._path] += 1
        if gate._next_call is not None:
            gate._arrived()
        if not gate.fair:
            if gate.full():
                await self._refuse(context, BLIND, self._class)
            return None
        group, key, cred, caller_class = gate.identity(headers, context.peer())
        cls = caller_class or self._class
        shedder = gate.shedder
        shedder.limit = gate.limit()
        wait = gate.queue_wait
        strict = bool(wait and gate.distress_s and wait(self._path) > gate.distress_s)
        sheds_at = gate.sheds_at.get(cls, 1.0)
        ticket = shedder.admit(group, key, sheds_at, gate._active(), strict)
        if (
            ticket == OVER_SHARE
            and gate.share_wait_s > 0.0
            and shedder.held(group) < 2 * shedder.min_share
            and shedder.waiters(group) < 4 * shedder.min_share
            and shedder.waiting < gate.capacity
        ):
            ticket = await self._wait_for_own_call(context, group, key, sheds_at)
        if isinstance(ticket, str):
            await self._refuse(context, ticket, cls)
            raise AssertionError("unreachable: abort raises")  # pragma: no cover
        if self._streaming and gate.refuse_doomed_streams:
            expected = gate.first_chunk.p90()
            if expected:
                remaining = context.time_remaining()
                if remaining is not None and remaining < expected:
                    ticket.release()
                    await self._refuse(context, DEADLINE, cls)
        ticket.cred = cred
        if self._streaming:
            shedder.track(ticket, gate.clock())
        return ticket

    async def _wait_for_own_call(
        self, context: Context, group: str, key: str, sheds_at: float
    ) -> Ticket | str:
        """A call over its group's share waits, at most `share_wait_s` and half of what is
        left of its deadline (so a caller still gets the refusal, with its RetryInfo,
        rather than DEADLINE_EXCEEDED), for one of the group's own calls to end, then asks
        again; the cause of its refusal if it is still not admitted (core/shedding.py,
        FairShedder.wait). Only a group holding a handful (fewer than 2 x min_share: a
        light caller's calls arriving bunched) waits; a heavier one is refused at once, as
        its calls are no bunch and its streams rarely end within the wait. At most
        4 x min_share calls of one group wait (so one caller cannot take the room others'
        bunches wait in) and `capacity` in all (past either, refused at once): waiting is
        not a way around the ceiling."""
        gate = self._gate
        shedder = gate.shedder
        loop = asyncio.get_running_loop()
        budget = gate.share_wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining / 2)
        end = loop.time() + budget
        while True:
            left = end - loop.time()
            if left <= 0.0:
                return OVER_SHARE
            woken: asyncio.Future[bool] = loop.create_future()

            def wake(woken: asyncio.Future[bool] = woken) -> None:
                if not woken.done():
                    woken.set_result(True)

            timer = loop.call_later(left, _time_up, woken)
            shedder.wait(group, wake)
            try:
                if not await woken:
                    return OVER_SHARE
            finally:
                timer.cancel()
                shedder.unwait(group, wake)
            shedder.limit = gate.limit()
            wait = gate.queue_wait
            strict = bool(wait and gate.distress_s and wait(self._path) > gate.distress_s)
            ticket = shedder.admit(group, key, sheds_at, gate._active(), strict)
            if ticket != OVER_SHARE:
                return ticket

    async def _refuse(self, context: Context, cause: str, cls: str) -> None:
        gate = self._gate
        if gate._on_reject is not None:
            gate._on_reject(self._path, cause, cls)
        await context.abort(*gate.refusals[cause])
