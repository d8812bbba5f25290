"""Rate and concurrency limits per caller: the pure logic behind the limits stage.

- `TokenBucket`: `burst` tokens, refilled continuously at `rate_per_s` (fractional refill:
  0.25 s at 4/s is exactly one token; a bucket refilled in whole-interval steps lets a
  caller burst twice at every step boundary).
- `KeyedLimiter`: one bucket per caller key, a default spec and per-key overrides, with
  memory bounded however many distinct keys arrive.
- `ConcurrencyLimiter`: open streams per key (long streams are what loads an LLM).
- `caller_key`: who the caller is, for both.

Single-threaded by design (one asyncio loop); nothing here awaits or locks.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NamedTuple

from aiproxy.core.errors import ConcurrencyLimited, QuotaViolation, RateLimited
from aiproxy.core.types import Clock

# Tolerance for float refill arithmetic: a caller who waits exactly `retry_after_s`
# must get the token even if the subtraction came out a hair short.
_EPS: Final = 1e-9

API_KEY_HEADER: Final = "x-api-key"
CLIENT_ID_HEADER: Final = "x-client-id"
MAX_CLIENT_ID_LEN: Final = 128


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A token bucket's shape: sustained `rate_per_s`, at most `burst` at once."""

    rate_per_s: float
    burst: int

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0 or not math.isfinite(self.rate_per_s):
            raise ValueError(f"rate_per_s must be a positive number, got {self.rate_per_s}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")

    @property
    def refill_s(self) -> float:
        """How long an empty bucket takes to fill up."""
        return self.burst / self.rate_per_s


class Decision(NamedTuple):
    """The outcome of one `try_acquire` (a NamedTuple: built on every call, so cheap).

    remaining: whole tokens left after this call; retry_after_s: 0 when allowed, else
    how long until `n` tokens are there; reset_after_s: how long until the bucket is
    full again; limit: the bucket's burst (for x-ratelimit-limit).
    """

    allowed: bool
    remaining: int
    retry_after_s: float
    reset_after_s: float
    limit: int

    def headers(self) -> tuple[tuple[str, str], ...]:
        """The x-ratelimit-* metadata (reset in whole seconds, rounded up)."""
        return (
            ("x-ratelimit-limit", str(self.limit)),
            ("x-ratelimit-remaining", str(self.remaining)),
            ("x-ratelimit-reset", str(math.ceil(self.reset_after_s))),
        )


class TokenBucket:
    """A token bucket with continuous refill; starts full."""

    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate_per_s: float, burst: int, clock: Clock = time.monotonic) -> None:
        LimitSpec(rate_per_s, burst)  # validates
        self._rate = float(rate_per_s)
        self._burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    @property
    def last_used(self) -> float:
        return self._stamp

    def try_acquire(self, n: int = 1) -> Decision:
        """Take `n` tokens if they are there; never waits, never goes into debt."""
        rate, burst = self._rate, self._burst
        if not 1 <= n <= burst:
            raise ValueError(f"n must be between 1 and the burst ({burst}), got {n}")
        now = self._clock()
        tokens = self._tokens
        if now > self._stamp:  # a clock that steps back must not drain tokens
            tokens += (now - self._stamp) * rate
            if tokens > burst:
                tokens = float(burst)
            self._stamp = now
        if tokens + _EPS >= n:
            tokens = tokens - n if tokens > n else 0.0
            self._tokens = tokens
            return Decision(True, int(tokens + _EPS), 0.0, (burst - tokens) / rate, burst)
        self._tokens = tokens
        return Decision(
            False, int(tokens + _EPS), (n - tokens) / rate, (burst - tokens) / rate, burst
        )

    def peek(self, n: int = 1) -> Decision:
        """What `try_acquire(n)` would answer now, taking nothing (a hierarchical
        admission checks its inner bucket before it charges the outer one)."""
        rate, burst = self._rate, self._burst
        tokens = self._tokens
        now = self._clock()
        if now > self._stamp:
            tokens = min(float(burst), tokens + (now - self._stamp) * rate)
        if tokens + _EPS >= n:
            left = tokens - n if tokens > n else 0.0
            return Decision(True, int(left + _EPS), 0.0, (burst - left) / rate, burst)
        return Decision(
            False, int(tokens + _EPS), (n - tokens) / rate, (burst - tokens) / rate, burst
        )


class KeyedLimiter:
    """One token bucket per caller key, memory bounded.

    Buckets are kept in least-recently-used order. A bucket unused for `idle_ttl_s` is
    dropped; the TTL is never shorter than the longest spec's refill time, and a bucket
    idle that long is full anyway, so dropping it forgives nothing. Past `max_keys`
    the least recently used bucket is dropped even if it is not full, and that key
    restarts with a full bucket: it can gain at most one burst, and only after
    `max_keys` other callers were seen since its last call, so it cannot be arranged
    cheaply; the proxy-wide concurrency cap still bounds the upstream's load.
    """

    def __init__(
        self,
        default: LimitSpec,
        overrides: Mapping[str, LimitSpec] | None = None,
        *,
        max_keys: int = 100_000,
        idle_ttl_s: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.default = default
        self.overrides = dict(overrides or {})
        self.max_keys = max_keys
        longest_refill = max(spec.refill_s for spec in (default, *self.overrides.values()))
        self.idle_ttl_s = max(idle_ttl_s or 0.0, longest_refill)
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def spec_for(self, key: str) -> LimitSpec:
        return self.overrides.get(key, self.default)

    def try_acquire(self, key: str, n: int = 1) -> Decision:
        self._evict_idle()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            spec = self.spec_for(key)
            bucket = self._buckets[key] = TokenBucket(spec.rate_per_s, spec.burst, self._clock)
        else:
            self._buckets.move_to_end(key)
        return bucket.try_acquire(n)

    def _evict_idle(self) -> None:
        """Drop idle buckets from the LRU end: amortized O(1) per call."""
        horizon = self._clock() - self.idle_ttl_s
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            if oldest.last_used > horizon:
                return
            buckets.popitem(last=False)


def rate_limited_error(key: str, decision: Decision) -> RateLimited:
    """The RESOURCE_EXHAUSTED for a denied `decision`, with RetryInfo and QuotaFailure."""
    return RateLimited(
        metadata={"limit": str(decision.limit)},
        retry_delay_s=decision.retry_after_s,
        quota_violations=(QuotaViolation(key, f"at most {decision.limit} requests in a burst"),),
    )


class Lease:
    """One admitted stream's slot; `release()` frees it, once, however often it is called."""

    __slots__ = ("_limiter", "_released", "key")

    def __init__(self, limiter: ConcurrencyLimiter, key: str) -> None:
        self.key = key
        self._limiter = limiter
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self.key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class ConcurrencyLimiter:
    """At most `max_per_key` (or the key's override) leases open at once per key.

    A key's counter is deleted when its last lease is released, so memory is bounded by
    the number of open leases (which the proxy-wide cap bounds), not by how many keys
    were ever seen; no LRU is needed. The proxy-wide cap itself is this class with one
    constant key.
    """

    def __init__(self, max_per_key: int, overrides: Mapping[str, int] | None = None) -> None:
        if max_per_key < 1:
            raise ValueError(f"max_per_key must be at least 1, got {max_per_key}")
        self.max_per_key = max_per_key
        self.overrides = dict(overrides or {})
        self._open: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def limit_for(self, key: str) -> int:
        return self.overrides.get(key, self.max_per_key)

    def in_use(self, key: str) -> int:
        return self._open.get(key, 0)

    def try_acquire(self, key: str) -> Lease | None:
        """A lease, or None when `key` is at its limit."""
        count = self._open.get(key, 0)
        if count >= self.limit_for(key):
            return None
        self._open[key] = count + 1
        return Lease(self, key)

    def _release(self, key: str) -> None:
        count = self._open[key] - 1
        if count:
            self._open[key] = count
        else:
            del self._open[key]


def concurrency_limited_error(
    key: str, limit: int, retry_delay_s: float = 1.0
) -> ConcurrencyLimited:
    """The RESOURCE_EXHAUSTED for a key at its stream limit. When a stream ends is
    unknowable, so RetryInfo carries a fixed hint."""
    return ConcurrencyLimited(
        metadata={"limit": str(limit)},
        retry_delay_s=retry_delay_s,
        quota_violations=(QuotaViolation(key, f"at most {limit} concurrent streams"),),
    )


def hash_api_key(raw: str) -> str:
    """The id an API key is known by in keys, overrides and logs: the raw key is a
    credential and is never kept. 128 bits of SHA-256 (keys are high-entropy secrets,
    so an unsalted hash does not reveal them)."""
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_ip(peer: str) -> IPAddress | None:
    """The IP address of a grpc peer string (`context.peer()`), or None (unix sockets,
    anything unparsable): the one parser of peers, for keys and for trusted edges alike.

    "ipv4:127.0.0.1:5555" -> 127.0.0.1; "ipv6:[::1]:5555", which grpc 1.85 writes
    URL-encoded ("ipv6:%5B::1%5D:5555"), -> ::1 (a zone "%eth0" is dropped); an IPv4
    client of a dual-stack listener ("ipv6:[::ffff:10.0.0.1]:5") -> 10.0.0.1.
    """
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0] or rest
    elif kind == "ipv6":
        host = urllib.parse.unquote(rest)
        if host.startswith("["):
            host = host[1:].partition("]")[0]
        host = host.split("%")[0]
    else:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def as_peer(address: str) -> str | None:
    """A client address from a trusted header (an edge's client-address header), in
    grpc's peer format, so that `peer_ip`, `peer_host` and `caller_key` treat it like a
    connection's address; None if it is not an IP address. Shared by the limiter
    (interceptors/limits.py) and the overload gate (interceptors/overload.py), which must
    read the same header the same way."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    return f"ipv4:{ip}:0" if ip.version == 4 else f"ipv6:[{ip}]:0"


def peer_host(peer: str) -> str:
    """The caller's address without the port, from grpc's `context.peer()` (`peer_ip`).

    "ipv4:127.0.0.1:5555" -> "127.0.0.1". IPv6 peers become their /64 network, since one
    client usually owns a whole /64 and could rotate addresses in it; loopback and
    IPv4-mapped addresses stay single hosts. Other peers (unix sockets) are returned as
    they are.
    """
    host = _PEER_HOSTS.get(peer)
    if host is None:
        if len(_PEER_HOSTS) >= _PEER_HOSTS_MAX:
            _PEER_HOSTS.clear()
        host = _PEER_HOSTS[peer] = _peer_host(peer)
    return host


# peer string -> peer_host: the overload gate and the limits both ask once per call, and
# parsing with ipaddress costs ~10 us each time; a connection's calls share one peer
# string. Bounded (cleared when full), so a flood of new connections cannot grow it.
_PEER_HOSTS: dict[str, str] = {}
_PEER_HOSTS_MAX = 4096


def _peer_host(peer: str) -> str:
    ip = peer_ip(peer)
    if ip is None:
        return peer
    if ip.version == 4 or ip.is_loopback:
        return str(ip)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


def caller_key(metadata: Mapping[str, str], peer: str, subject: str | None = None) -> str:
    """Who the caller is, for limiting: the authenticated subject, else the API key
    (hashed), else the client id header, else the peer address; prefixed with the kind
    ("sub:", "key:", "client:", "peer:") so the kinds never collide.

    Only the subject and a VERIFIED API key are identities (auth uses this for them). The
    limits stage never keys a bucket on an unverified key or a client id alone: those
    are declared labels, given a sub-bucket inside the caller's identity or address
    (interceptors/limits.py), so minting them gains nothing.
    """
    if subject:
        return f"sub:{subject}"
    api_key = metadata.get(API_KEY_HEADER)
    if api_key:
        return f"key:{hash_api_key(api_key)}"
    client_id = metadata.get(CLIENT_ID_HEADER)
    if client_id and len(client_id) <= MAX_CLIENT_ID_LEN and client_id.isprintable():
        return f"client:{client_id}"
    return f"peer:{peer_host(peer)}"
