"""The response cache: exact-match answers kept for a while, and one upstream call for
many identical requests in flight (single flight).

- Key (`cache_key`): the method, the caller's scope (tenant; "" only when the operator
  shares answers across tenants) and the request's canonical bytes (`canonical_request`:
  parsed and re-serialized deterministically, so field order and unknown fields cannot
  make two keys for one request, nor one key for two). SHA-256, so a key is short and
  reveals no prompt in Redis or a log.
- Opt-in (`CacheControl`, `decide`): `cache-control: max-age=N` from the request
  metadata (the HTTP header through Envoy), or the method's operator TTL. `no-store`
  bypasses the cache both ways; `no-cache` skips the lookup but stores the fresh answer.
  max-age is capped by the operator's `max_ttl_s`.
- Entries (`Entry`): a unary answer is one chunk, a stream its chunk list (serialized
  proto bytes), replayed in order, first chunk at once. Only complete answers are stored:
  an error, a cancelled or truncated stream never is.
- L1 (`LruCache`): in process, LRU bounded in bytes (and per entry), TTL per entry, on an
  injected clock. L2 (`L2Cache` Protocol): shared; `MemoryL2` here, server/stores/redis_cache.py
  on Redis. A hit in L2 fills L1 (with L2's remaining TTL).
- Single flight (`ResponseCache.stream`): concurrent identical requests share one
  producer. The producer runs in its own task, not in the first caller's: a caller that
  cancels (even the first) leaves the others their stream; when the last one leaves, the
  producer is cancelled (no upstream work for nobody) and nothing is stored. Followers
  see every chunk from the first, then the same end: completion or the same exception.

Single-threaded by design (one asyncio loop per process); nothing here locks.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Protocol, runtime_checkable

from google.protobuf.message import Message

from aiproxy.core.headers import CACHE_CONTROL  # proxy-only: never forwarded upstream
from aiproxy.core.types import Clock

CACHE_HEADER: Final = "x-aiproxy-cache"  # response metadata: hit | miss
_ENTRY_VERSION: Final = 1


class Outcome(enum.StrEnum):
    HIT = "hit"  # served from L1 or L2
    MISS = "miss"  # this call ran the upstream and (if complete) stored the answer
    SHARED = "shared"  # joined an identical call in flight (counted as a hit upstream-wise)
    BYPASS = "bypass"  # not cacheable (no opt-in, no-store, no-cache lookup)

    @property
    def header(self) -> str:
        """The x-aiproxy-cache value: whether this call caused an upstream call."""
        return "hit" if self in (Outcome.HIT, Outcome.SHARED) else "miss"


# ---- Keys -------------------------------------------------------------------------------


def canonical_request(message: Message) -> bytes:
    """Deterministic bytes for a parsed request: map entries sorted, unknown fields
    dropped (an unknown field the upstream ignores must not split the key, and one it
    reads would be a schema we do not know: dropping it keeps the key conservative only if
    the upstream sees the same bytes, so the proxy forwards the canonical form too)."""
    copy = type(message)()
    copy.CopyFrom(message)
    copy.DiscardUnknownFields()
    return copy.SerializeToString(deterministic=True)


def cache_key(method: str, scope: str, canonical: bytes) -> str:
    """SHA-256 over method, scope and canonical request, each length-prefixed (no two
    different triples produce the same input)."""
    h = hashlib.sha256()
    for part in (method.encode(), scope.encode(), canonical):
        h.update(struct.pack(">Q", len(part)))
        h.update(part)
    return h.hexdigest()


# ---- cache-control ----------------------------------------------------------------------


class CacheControl(NamedTuple):
    max_age: int | None = None
    no_cache: bool = False
    no_store: bool = False


def parse_cache_control(metadata: Iterable[tuple[str, str | bytes]]) -> CacheControl:
    """The request's cache-control directives (every cache-control entry, comma lists,
    case-insensitive). A malformed or negative max-age is ignored, not an error: a
    cache hint must never fail a call."""
    max_age: int | None = None
    no_cache = no_store = False
    for key, value in metadata:
        if key.lower() != CACHE_CONTROL:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        for directive in text.split(",")[:32]:
            name, _, arg = directive.strip().partition("=")
            name = name.strip().lower()
            if name == "no-store":
                no_store = True
            elif name == "no-cache":
                no_cache = True
            elif name == "max-age":
                arg = arg.strip().strip('"')
                if arg.isdigit() and len(arg) <= 10:
                    max_age = int(arg) if max_age is None else min(max_age, int(arg))
    return CacheControl(max_age, no_cache, no_store)


class Decision(NamedTuple):
    lookup: bool  # may be served from the cache
    store_ttl_s: int  # store a complete answer for this long (0: do not store)

    @property
    def bypass(self) -> bool:
        return not self.lookup and not self.store_ttl_s


NO_CACHE: Final = Decision(False, 0)


def decide(cc: CacheControl, method_ttl_s: int = 0, max_ttl_s: int = 3600) -> Decision:
    """Whether this call uses the cache: the request's max-age (capped by `max_ttl_s`)
    or else the method's operator TTL; no-store bypasses, no-cache refreshes."""
    if cc.no_store:
        return NO_CACHE
    ttl = min(cc.max_age, max_ttl_s) if cc.max_age is not None else method_ttl_s
    if ttl <= 0:
        return NO_CACHE
    return Decision(not cc.no_cache, ttl)


# ---- Entries ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A complete answer: its chunks (one for unary), serialized."""

    chunks: tuple[bytes, ...]
    stream: bool = False

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks) + 64 + 8 * len(self.chunks)

    def encode(self) -> bytes:
        """Version, kind, count, then length-prefixed chunks (for L2)."""
        head = struct.pack(">BBI", _ENTRY_VERSION, int(self.stream), len(self.chunks))
        return head + b"".join(struct.pack(">I", len(c)) + c for c in self.chunks)

    @classmethod
    def decode(cls, blob: bytes) -> Entry | None:
        """None for anything malformed or of another version (treated as a miss)."""
        try:
            version, stream, n = struct.unpack_from(">BBI", blob, 0)
            if version != _ENTRY_VERSION:
                return None
            pos, chunks = 6, []
            for _ in range(n):
                (size,) = struct.unpack_from(">I", blob, pos)
                pos += 4
                if pos + size > len(blob):
                    return None
                chunks.append(blob[pos : pos + size])
                pos += size
            if pos != len(blob):
                return None
            return cls(tuple(chunks), bool(stream))
        except struct.error:
            return None


# ---- L1: in process, bounded in bytes ---------------------------------------------------


class LruCache:
    """An LRU of entries bounded in total bytes; each entry has its own expiry."""

    def __init__(
        self, max_bytes: int, *, max_entry_bytes: int | None = None, clock: Clock = time.monotonic
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_bytes, max_entry_bytes or max_bytes // 8 or 1)
        self._clock = clock
        self._items: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> tuple[Entry, float] | None:
        """The entry and its remaining TTL, or None."""
        item = self._items.get(key)
        if item is None:
            return None
        entry, expires = item
        left = expires - self._clock()
        if left <= 0:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return entry, left

    def put(self, key: str, entry: Entry, ttl_s: float) -> bool:
        """Store; False when the entry alone is over the per-entry bound (not kept)."""
        if entry.nbytes > self.max_entry_bytes or ttl_s <= 0:
            return False
        self._drop(key)
        self._items[key] = (entry, self._clock() + ttl_s)
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._items)))
        return True

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= item[0].nbytes


# ---- L2: shared -------------------------------------------------------------------------


@runtime_checkable
class L2Cache(Protocol):
    """The shared level. Never raises for an unreachable store: a failure is a miss (get)
    or a no-op (set), so the cache fails open to L1 only."""

    async def get(self, key: str) -> tuple[bytes, float] | None:
        """The encoded entry and its remaining TTL in seconds, or None."""
        ...

    async def set(self, key: str, value: bytes, ttl_s: int) -> None: ...

    async def aclose(self) -> None: ...


class MemoryL2:
    """L2 in this process (tests, and the `memory` backend: then L1 alone would do)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._items: dict[str, tuple[bytes, float]] = {}

    async def get(self, key: str) -> tuple[bytes, float] | None:
        item = self._items.get(key)
        if item is None:
            return None
        left = item[1] - self._clock()
        if left <= 0:
            del self._items[key]
            return None
        return item[0], left

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._items[key] = (value, self._clock() + ttl_s)

    async def aclose(self) -> None:
        self._items.clear()


# ---- Single flight ----------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Flight:
    chunks: list[bytes] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    subscribers: int = 0
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.wake.set()
        self.wake = asyncio.Event()


Producer = Callable[[], AsyncIterator[bytes]]


class CacheStats:
    """Counters for metrics (hit/miss/shared/bypass, stores, L2 hits)."""

    __slots__ = ("bypass", "hit_l1", "hit_l2", "miss", "shared", "stored")

    def __init__(self) -> None:
        self.hit_l1 = self.hit_l2 = self.miss = self.shared = self.bypass = self.stored = 0


class ResponseCache:
    """L1 + L2 + single flight. One per process; the forwarding path calls `stream`
    (streams) or `unary`."""

    def __init__(self, l1: LruCache, l2: L2Cache | None = None) -> None:
        self.l1 = l1
        self.l2 = l2
        self._flights: dict[str, _Flight] = {}
        self.stats = CacheStats()

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def lookup(self, key: str) -> Entry | None:
        """L1, then L2 (filling L1 with L2's remaining TTL)."""
        hit = self.l1.get(key)
        if hit is not None:
            self.stats.hit_l1 += 1
            return hit[0]
        if self.l2 is None:
            return None
        got = await self.l2.get(key)
        if got is None:
            return None
        entry = Entry.decode(got[0])
        if entry is None:
            return None
        self.stats.hit_l2 += 1
        self.l1.put(key, entry, got[1])
        return entry

    async def store(self, key: str, entry: Entry, ttl_s: int) -> None:
        self.stats.stored += 1
        self.l1.put(key, entry, ttl_s)
        if self.l2 is not None:
            await self.l2.set(key, entry.encode(), ttl_s)

    async def stream(
        self, key: str, decision: Decision, producer: Producer, *, stream: bool = True
    ) -> tuple[Outcome, AsyncIterator[bytes]]:
        """The chunks of the answer and where they came from. `producer()` opens the
        upstream call (an async iterator of serialized chunks) and is called at most once
        for all identical calls in flight. Iterate the returned iterator to the end or
        close it (`aclose`); leaving early counts as leaving the flight."""
        if decision.bypass:
            self.stats.bypass += 1
            return Outcome.BYPASS, producer()
        if decision.lookup:
            entry = await self.lookup(key)
            if entry is not None:
                return Outcome.HIT, _replay(entry)
            flight = self._flights.get(key)
            if flight is not None:
                self.stats.shared += 1
                return Outcome.SHARED, self._follow(key, flight)
        # no-cache refreshes: it does not join a flight started by a caller that may be
        # served stale, and it starts none that others would join (it must not be shared).
        self.stats.miss += 1
        flight = _Flight()
        if decision.lookup:
            self._flights[key] = flight
        flight.task = asyncio.get_running_loop().create_task(
            self._produce(key, flight, producer, decision.store_ttl_s, stream)
        )
        return Outcome.MISS, self._follow(key, flight)

    async def unary(
        self, key: str, decision: Decision, loader: Callable[[], Awaitable[bytes]]
    ) -> tuple[Outcome, bytes]:
        """One answer, from the cache or `loader()` (shared by identical calls)."""

        async def one() -> AsyncIterator[bytes]:
            yield await loader()

        outcome, chunks = await self.stream(key, decision, one, stream=False)
        try:
            result = [c async for c in chunks]
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        return outcome, result[0]

    async def _produce(
        self, key: str, flight: _Flight, producer: Producer, ttl_s: int, stream: bool
    ) -> None:
        try:
            async for chunk in producer():
                flight.chunks.append(chunk)
                flight.notify()
        except asyncio.CancelledError:
            flight.error = asyncio.CancelledError()  # everyone left: never stored
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every follower, never stored
            flight.error = exc
        else:
            if ttl_s > 0:
                await self.store(key, Entry(tuple(flight.chunks), stream), ttl_s)
        finally:
            flight.done = True
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.notify()

    async def _follow(self, key: str, flight: _Flight) -> AsyncIterator[bytes]:
        flight.subscribers += 1
        pos = 0
        try:
            while True:
                while pos < len(flight.chunks):
                    pos += 1
                    yield flight.chunks[pos - 1]
                if flight.done:
                    if flight.error is not None:
                        raise _copy_error(flight.error)
                    return
                await flight.wake.wait()
        finally:
            flight.subscribers -= 1
            if flight.subscribers == 0 and not flight.done and flight.task is not None:
                # The last caller left: stop the upstream; a truncated answer is not stored.
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.task.cancel()


def _copy_error(error: BaseException) -> BaseException:
    """The same error for every follower (one exception object raised in several tasks
    would chain their tracebacks together)."""
    if isinstance(error, asyncio.CancelledError):
        # Only when the producer was cancelled from outside (e.g. shutdown): followers
        # must not read that as their own cancellation.
        return ProducerCancelled()
    try:
        copy = type(error).__new__(type(error))
        copy.__dict__.update(getattr(error, "__dict__", {}))
        copy.args = error.args
    except (TypeError, AttributeError):
        return error  # an exception type that cannot be copied: the one object, then
    return copy


class ProducerCancelled(Exception):
    """The shared upstream call was cancelled by something other than the callers."""


async def _replay(entry: Entry) -> AsyncIterator[bytes]:
    for chunk in entry.chunks:
        yield chunk
