"""The resumable stream buffer: a stream's chunks kept for a while, so a caller that lost
its connection can resume it (on any replica) instead of paying for the generation again.

One stream in the buffer is written by one *owner* (the replica pumping the upstream) and
read by any number of *readers* (the original caller, then whoever resumes):

- `create(scope, owner, holder)` gives an unguessable id (128 random bits, urlsafe)
  bound to `scope` (who may read or cancel it: server/request/resume.py's stream_scope): a read
  with another scope is NOT_FOUND, exactly like an unknown id, so ids cannot be probed
  across tenants; `holder` (the caller) is whom the stream counts against;
- `append(id, seq, data)`: one chunk, its serialized proto bytes; `seq` numbers the
  chunks from 0 with no hole (the agent API's own `seq`), so a reader can tell a gap;
- `finish(id, seq, data)`: the final chunk (with usage), or with `error=True` a final
  error (a serialized google.rpc.Status); readers stop after it;
- `read(id, scope, after_seq)`: the chunks with seq > after_seq (`last-event-id`), then
  the live tail until the final chunk: no duplicate and no gap, however appends race it;
  a reader whose chunks were dropped (bytes bound) gets STREAM_EXPIRED, not a gap;
  a reader waiting on the tail of a stream whose owner's lease lapsed (the replica died,
  or stopped recording) gets every chunk stored, then STREAM_ORIGIN_LOST: never silence;
- `heartbeat(id, owner)`: the owner's lease (a resumer elsewhere knows the generation
  is alive) and, in the same step, what the owner must act on: a cancel request and
  whether some reader is attached (a reading iterator renews a reader lease by itself).
  `create` takes the first lease (`owner_lease_s`); `watch_owner` renews it on its own
  clock, never per chunk, so a slow generation (a long gap between tokens) is not a dead
  one; an owner stores a chunk before its caller gets it (`StreamRecorder.write`), so
  whatever a caller saw is there for its resume;
- `request_cancel(id, scope)`: a caller that cancels on purpose stops the upstream at once;
- `abandon(id)`: the owner gave up (grace over, nobody resumed): the chunks are dropped
  and a later resume gets STREAM_EXPIRED.

Bounds: `max_bytes` per stream (the oldest chunks are dropped past it: a resume from
before them is STREAM_EXPIRED), `ttl_s` after the last write (then the stream is gone:
STREAM_NOT_FOUND), and, for the memory backend, `max_streams` per process (the least
recently written stream is dropped first) and `max_streams_per_scope` per holder (a caller
past it loses its own oldest stream, never anyone else's, even in a shared scope such as
the anonymous one: one caller cannot flush the buffer).

`Grace` is the pure rule for an upstream whose caller dropped: it continues for `grace_s`,
longer while a reader is attached somewhere, and stops at once on a cancel request;
`watch_owner` runs that rule against the buffer (one heartbeat per interval) and returns
why the upstream must be cancelled.

`MemoryStreamBuffer` is the embedded backend (one process: resume on the same replica
only); `server/stores/redis_streams.py` the shared one (Redis Streams). Single-threaded by design
(one asyncio loop per process); nothing here locks.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol, runtime_checkable

import grpc

from aiproxy.core.errors import ProxyError, Reason
from aiproxy.core.headers import (
    CANCEL_HEADER,
    LAST_EVENT_ID_HEADER,
    RESUMABLE_HEADER,
    RESUME_HEADER,
)
from aiproxy.core.types import Clock

ID_BYTES: Final = 16  # 128 bits: unguessable, so an id is a capability (with its scope)
DEFAULT_MAX_BYTES: Final = 1 << 20
DEFAULT_TTL_S: Final = 300.0
DEFAULT_LEASE_S: Final = 3.0


def new_stream_id() -> str:
    """128 random bits, urlsafe base64 (22 characters): fits a header and a query string."""
    return secrets.token_urlsafe(ID_BYTES)


def valid_stream_id(stream_id: str) -> bool:
    """Cheap shape check before any lookup (a hostile header cannot make a huge key)."""
    return 16 <= len(stream_id) <= 64 and all(c.isalnum() or c in "-_" for c in stream_id)


# ---- Errors -----------------------------------------------------------------------------


class StreamNotFound(ProxyError):
    """No resumable stream by that id for this caller: never created, another tenant's,
    or gone after its time bound. One answer for all three, so ids cannot be probed."""

    code = grpc.StatusCode.NOT_FOUND
    reason = Reason.STREAM_NOT_FOUND
    default_message = "no resumable stream with that id (it may have expired)"


class StreamExpired(ProxyError):
    """The stream existed but what the caller asks for is gone: the generation was
    cancelled after its grace (nobody resumed), or the chunks after `last-event-id`
    were dropped by the bytes bound. Retrying the resume cannot help; a new call can."""

    code = grpc.StatusCode.NOT_FOUND
    reason = Reason.STREAM_EXPIRED
    default_message = "the stream's buffered data has expired; send the request again"


class StreamStoreUnavailable(ProxyError):
    """The shared stream store cannot be reached (the stream is not resumable now).

    A caller only ever sees it on a resume (a new stream just runs unresumable): waiting
    can help (a store that restarts or fails over may still hold the chunks, within the
    stream's grace), so it carries RetryInfo."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.STREAM_STORE_UNAVAILABLE
    default_message = "stream store unavailable"
    RETRY_DELAY_S: Final = 1.0

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("retry_delay_s", self.RETRY_DELAY_S)
        super().__init__(message, **kwargs)


class StreamOriginLost(ProxyError):
    """The replica generating the stream stopped renewing its lease before the final
    chunk (it died, or lost the store): nothing more will come. Sent after every chunk the
    store holds, in-band when some were sent. The generation cannot be resumed anywhere;
    sending the request again (a new generation) can succeed, hence RetryInfo."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.STREAM_ORIGIN_LOST
    default_message = "the replica generating this stream is gone; send the request again"
    RETRY_DELAY_S: Final = 1.0

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("retry_delay_s", self.RETRY_DELAY_S)
        super().__init__(message, **kwargs)


class SequenceError(ValueError):
    """An owner appended out of order (a bug in the caller, not a client error)."""


# ---- Value types ------------------------------------------------------------------------


class ChunkKind(enum.IntEnum):
    DATA = 0
    FINAL = 1  # the last chunk (usage, finish reason)
    ERROR = 2  # the last chunk is a serialized google.rpc.Status: the stream failed


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    data: bytes
    kind: ChunkKind = ChunkKind.DATA

    @property
    def last(self) -> bool:
        return self.kind != ChunkKind.DATA


class StreamState(NamedTuple):
    """What an owner (or a resumer) needs to know about a stream, read in one step."""

    exists: bool
    finished: bool = False
    abandoned: bool = False
    cancel_requested: bool = False
    owner_alive: bool = False
    reader_attached: bool = False
    next_seq: int = 0


MISSING: Final = StreamState(False)


@runtime_checkable
class StreamBuffer(Protocol):
    """Buffered chunks of resumable streams, local or shared. All methods are safe to call
    concurrently from one event loop; none blocks it; the shared backend bounds its waits."""

    async def create(self, scope: str, owner: str, holder: str = "") -> str:
        """A new stream owned by `owner` (a replica-unique name); its id. `scope` is who
        may read or cancel it; `holder` (default: the scope) whom it counts against in a
        per-caller bound, so callers sharing a scope cannot flush each other's streams."""
        ...

    async def append(self, stream_id: str, seq: int, data: bytes) -> None:
        """Add chunk `seq` (the next one: 0, 1, 2 ...; SequenceError otherwise)."""
        ...

    async def finish(self, stream_id: str, seq: int, data: bytes, *, error: bool = False) -> None:
        """Add the final chunk (or, with error=True, a final serialized google.rpc.Status)."""
        ...

    def read(self, stream_id: str, scope: str, after_seq: int = -1) -> AsyncIterator[Chunk]:
        """Chunks with seq > after_seq, then the live tail, ending after the final chunk.
        Raises StreamNotFound / StreamExpired (before the first chunk, or on a gap)."""
        ...

    async def state(self, stream_id: str) -> StreamState:
        """The stream's state (MISSING when there is none)."""
        ...

    async def heartbeat(self, stream_id: str, owner: str, lease_s: float) -> StreamState:
        """Renew the owner's lease for `lease_s`; the state, in the same step."""
        ...

    async def request_cancel(self, stream_id: str, scope: str) -> bool:
        """Ask the owner to stop the upstream now (a caller cancelled on purpose).
        False when there is no such stream for `scope`."""
        ...

    async def abandon(self, stream_id: str) -> None:
        """The owner stopped the upstream: drop the chunks; resumes get StreamExpired."""
        ...

    async def aclose(self) -> None: ...


# ---- Grace: when an upstream whose caller dropped must stop ----------------------------


class Verdict(enum.Enum):
    CONTINUE = "continue"
    CANCEL_REQUESTED = "cancel_requested"  # a caller cancelled on purpose: stop now
    ABANDONED = "abandoned"  # the caller dropped and nobody resumed within the grace


class Grace:
    """The rule for a resumable stream's upstream, as a pure state machine (inject the clock).

    While the caller is attached the upstream runs. When it drops, the upstream continues
    for `grace_s`; a reader attached anywhere (a resume) restarts that grace each time it
    is seen, so a resumer that drops too gets its own grace. A cancel request wins at once.
    """

    __slots__ = ("_attached", "_clock", "_since", "grace_s")

    def __init__(self, grace_s: float, clock: Clock = time.monotonic) -> None:
        if grace_s < 0:
            raise ValueError(f"grace_s must not be negative, got {grace_s}")
        self.grace_s = grace_s
        self._clock = clock
        self._attached = True
        self._since = clock()

    @property
    def attached(self) -> bool:
        return self._attached

    def caller_dropped(self) -> None:
        if self._attached:
            self._attached = False
            self._since = self._clock()

    def caller_attached(self) -> None:
        self._attached = True

    def remaining_s(self) -> float:
        if self._attached:
            return self.grace_s
        return max(0.0, self.grace_s - (self._clock() - self._since))

    def decide(self, state: StreamState) -> Verdict:
        if state.cancel_requested:
            return Verdict.CANCEL_REQUESTED
        if self._attached:
            return Verdict.CONTINUE
        if state.reader_attached:
            self._since = self._clock()  # a resumer is reading: its drop starts a new grace
            return Verdict.CONTINUE
        if self._clock() - self._since >= self.grace_s:
            return Verdict.ABANDONED
        return Verdict.CONTINUE


async def watch_owner(
    buffer: StreamBuffer,
    stream_id: str,
    owner: str,
    grace: Grace,
    *,
    interval_s: float = 0.5,
    lease_s: float = DEFAULT_LEASE_S,
    renew: Callable[[], bool] | None = None,
) -> Verdict:
    """Heartbeat the owner's lease every `interval_s` and return when the upstream must be
    cancelled (never CONTINUE). Run it as a task beside the pump; cancel the task when the
    stream ends. A heartbeat that fails (store down) is skipped: the generation goes on
    under the local rule (the grace still runs out for a caller that left).

    The lease is renewed on this clock alone, not per chunk: a generation that is merely
    slow keeps it. While `renew()` is false (the owner stopped recording: the store holds
    no more of the stream) the state is still read but the lease is let lapse, so a
    resumer gets STREAM_ORIGIN_LOST instead of waiting for chunks that will never come."""
    while True:
        try:
            who = owner if renew is None or renew() else ""
            state = await buffer.heartbeat(stream_id, who, lease_s)
        except StreamStoreUnavailable:
            state = StreamState(True)
        verdict = grace.decide(state)
        if verdict is not Verdict.CONTINUE:
            return verdict
        wait = interval_s if grace.attached else min(interval_s, max(grace.remaining_s(), 0.01))
        await asyncio.sleep(wait)


# ---- The memory backend -----------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Stream:
    scope: str
    owner: str
    expires: float
    holder: str  # whose per-caller bound it counts against (max_streams_per_scope)
    chunks: list[Chunk] = field(default_factory=list)
    first_seq: int = 0  # seq of chunks[0]; chunks before it were dropped (bytes bound)
    next_seq: int = 0
    nbytes: int = 0
    finished: bool = False
    abandoned: bool = False
    cancel: bool = False
    owner_until: float = 0.0
    reader_until: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


# What a buffered stream costs beyond its chunks' payload (tracemalloc,
# tests/unit/test_streambuffer.py::test_memory_per_stream_is_bounded_and_measured: 50
# chunks of 100 B cost 11.2 kB): ~120 B per chunk (the Chunk, its list slot, the bytes
# header) and well under 1 kB per stream (the _Stream, its Event, the dict slot, the id).
CHUNK_OVERHEAD_BYTES: Final = 120


class MemoryStreamBuffer:
    """The StreamBuffer in this process: resume works on the same replica only."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = DEFAULT_TTL_S,
        max_streams: int = 10_000,
        max_streams_per_scope: int = 256,
        reader_lease_s: float = DEFAULT_LEASE_S,
        owner_lease_s: float = DEFAULT_LEASE_S,
        clock: Clock = time.monotonic,
    ) -> None:
        if (
            min(max_bytes, max_streams, max_streams_per_scope) < 1
            or min(ttl_s, reader_lease_s, owner_lease_s) <= 0
        ):
            raise ValueError("bounds, ttl_s and the leases must be positive")
        self.owner_lease_s = owner_lease_s
        self.max_streams_per_scope = max_streams_per_scope
        self._by_holder: dict[str, OrderedDict[str, None]] = {}  # holder -> ids, oldest first
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_streams = max_streams
        self.reader_lease_s = reader_lease_s
        self._clock = clock
        self._streams: OrderedDict[str, _Stream] = OrderedDict()  # least recently written first

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes held (the bound's measure), all streams."""
        return sum(s.nbytes for s in self._streams.values())

    def _live(self, stream_id: str) -> _Stream | None:
        s = self._streams.get(stream_id)
        if s is not None and self._clock() >= s.expires:
            self._remove(stream_id)
            return None
        return s

    def _remove(self, stream_id: str) -> None:
        s = self._streams.pop(stream_id)
        ids = self._by_holder[s.holder]
        del ids[stream_id]
        if not ids:
            del self._by_holder[s.holder]
        s.wake.set()  # a reader of a dropped stream ends (StreamExpired)

    def _sweep(self) -> None:
        now = self._clock()
        while self._streams:
            sid, s = next(iter(self._streams.items()))
            if now < s.expires and len(self._streams) <= self.max_streams:
                break
            self._remove(sid)

    async def create(self, scope: str, owner: str, holder: str = "") -> str:
        return self.create_nowait(scope, owner, holder)

    def create_nowait(self, scope: str, owner: str, holder: str = "") -> str:
        sid = new_stream_id()
        now = self._clock()
        holder = holder or scope
        ids = self._by_holder.setdefault(holder, OrderedDict())
        if len(ids) >= self.max_streams_per_scope:
            self._remove(next(iter(ids)))  # the caller's own oldest, nobody else's
            ids = self._by_holder.setdefault(holder, OrderedDict())
        self._streams[sid] = _Stream(
            scope, owner, now + self.ttl_s, holder, owner_until=now + self.owner_lease_s
        )
        ids[sid] = None
        self._sweep()
        return sid

    def _writable(self, stream_id: str, seq: int) -> _Stream:
        s = self._live(stream_id)
        if s is None:
            raise StreamNotFound()
        if s.finished or s.abandoned:
            raise SequenceError(f"stream already {'finished' if s.finished else 'abandoned'}")
        if seq != s.next_seq:
            raise SequenceError(f"expected seq {s.next_seq}, got {seq}")
        return s

    def _add(self, stream_id: str, s: _Stream, chunk: Chunk) -> None:
        s.chunks.append(chunk)
        s.next_seq = chunk.seq + 1
        s.nbytes += len(chunk.data)
        # The bytes bound drops the oldest chunks, never the newest (the live tail).
        while s.nbytes > self.max_bytes and len(s.chunks) > 1:
            dropped = s.chunks.pop(0)
            s.nbytes -= len(dropped.data)
            s.first_seq = s.chunks[0].seq
        s.expires = self._clock() + self.ttl_s
        self._streams.move_to_end(stream_id)
        s.wake.set()
        s.wake = asyncio.Event()  # readers waiting on the old one are woken once

    async def append(self, stream_id: str, seq: int, data: bytes) -> None:
        self._add(stream_id, self._writable(stream_id, seq), Chunk(seq, data))

    async def finish(self, stream_id: str, seq: int, data: bytes, *, error: bool = False) -> None:
        s = self._writable(stream_id, seq)
        s.finished = True
        self._add(stream_id, s, Chunk(seq, data, ChunkKind.ERROR if error else ChunkKind.FINAL))

    def _state(self, s: _Stream | None) -> StreamState:
        if s is None:
            return MISSING
        now = self._clock()
        return StreamState(
            True,
            s.finished,
            s.abandoned,
            s.cancel,
            now < s.owner_until,
            now < s.reader_until,
            s.next_seq,
        )

    async def state(self, stream_id: str) -> StreamState:
        return self._state(self._live(stream_id))

    async def heartbeat(self, stream_id: str, owner: str, lease_s: float) -> StreamState:
        s = self._live(stream_id)
        if s is not None and s.owner == owner:
            s.owner_until = self._clock() + lease_s
        return self._state(s)

    async def request_cancel(self, stream_id: str, scope: str) -> bool:
        s = self._live(stream_id)
        if s is None or s.scope != scope:
            return False
        s.cancel = True
        return True

    async def abandon(self, stream_id: str) -> None:
        s = self._live(stream_id)
        if s is None or s.finished:
            return
        s.abandoned = True
        s.chunks.clear()
        s.nbytes = 0
        s.owner_until = 0.0
        s.wake.set()
        s.wake = asyncio.Event()

    async def read(self, stream_id: str, scope: str, after_seq: int = -1) -> AsyncIterator[Chunk]:
        last = after_seq
        while True:
            s = self._live(stream_id)
            if s is None or s.scope != scope:
                if last != after_seq:  # it vanished while read (time bound or eviction)
                    raise StreamExpired()
                raise StreamNotFound()
            if s.abandoned:
                raise StreamExpired()
            if last + 1 < s.first_seq:
                raise StreamExpired("the chunks after last-event-id were dropped (size bound)")
            s.reader_until = self._clock() + self.reader_lease_s
            wake = s.wake
            # Chunks are contiguous from first_seq: index arithmetic, no scan.
            start = max(0, last + 1 - s.first_seq)
            for chunk in s.chunks[start:]:
                last = chunk.seq
                yield chunk
                if chunk.last:
                    return
            # Each `yield` above suspends this reader (its caller writes to the network)
            # while the owner may append, finish included: the slice we walked is stale.
            # Decide on the stream's state as it is NOW, never on a flag read after the
            # snapshot: checking `finished` alone here lost the final chunk of a resumed
            # stream whenever it was appended during the reader's last yield.
            if last + 1 < s.next_seq:
                continue  # more arrived while we yielded: send it before anything else
            if s.finished:  # the final chunk was at or before after_seq: nothing more
                return
            if self._clock() >= s.owner_until:  # every stored chunk sent; no more will come
                raise StreamOriginLost()
            # Wake on the next write, or renew the reader lease while the owner is quiet.
            try:
                async with asyncio.timeout(self.reader_lease_s / 3):
                    await wake.wait()
            except TimeoutError:
                pass

    async def aclose(self) -> None:
        for s in self._streams.values():
            s.wake.set()
        self._streams.clear()
        self._by_holder.clear()


# ---- What a call asks for (metadata) ---------------------------------------------------

# The request headers are named in core/headers.py (proxy-only: never forwarded upstream).
STREAM_ID_HEADER: Final = "x-aiproxy-stream-id"  # response (initial metadata): the id


class ResumeAsk(NamedTuple):
    """The resume-related metadata of one call, validated (invalid values read as absent:
    a resume with a malformed id is a new call, never an error about the id's shape)."""

    resumable: bool | None = None  # None: not said (the operator's default applies)
    resume: str | None = None  # a stream id to resume
    after_seq: int = -1  # resume after this seq (-1: from the start)
    cancel: str | None = None  # a stream id whose upstream the caller stops on purpose


def parse_resume(metadata: Iterable[tuple[str, str | bytes]]) -> ResumeAsk:
    """x-aiproxy-resumable (1/true/0/false), x-aiproxy-resume, last-event-id (digits; the
    edge already split "<stream id>:<seq>"), x-aiproxy-cancel."""
    resumable: bool | None = None
    resume = cancel = None
    after = -1
    for key, value in metadata:
        if isinstance(value, bytes):
            continue
        if key == RESUMABLE_HEADER:
            flag = value.strip().lower()
            if flag in ("1", "true", "yes"):
                resumable = True
            elif flag in ("0", "false", "no"):
                resumable = False
        elif key == RESUME_HEADER and valid_stream_id(value):
            resume = value
        elif key == CANCEL_HEADER and valid_stream_id(value):
            cancel = value
        elif key == LAST_EVENT_ID_HEADER:
            sid, _, seq = value.rpartition(":")
            if sid and valid_stream_id(sid) and resume is None:
                resume = sid  # a direct caller that kept the edge's combined form
            if seq.isdigit() and len(seq) <= 10:
                after = int(seq)
    return ResumeAsk(resumable, resume, after, cancel)


# ---- The owner's writer: a chunk is in the buffer before its caller gets it ------------


class StreamRecorder:
    """Writes one stream's chunks to the buffer in order.

    The owner's pump awaits `write` per chunk, then hands the chunk to its caller: what a
    caller has seen is in the buffer, so a resume after it never misses a chunk (a chunk
    handed first and written behind was lost with a replica killed in between: the caller
    had seq 9, the store 8). The cost is one store round trip per chunk on the caller's
    path (pipelined with every other stream's; each bounded by the store's timeout).
    `record` (never suspends; a writer task appends behind) is the off-path variant; one
    recorder uses one or the other.

    The first failure (store down, stream evicted, a bug) stops recording: the stream
    goes on, not resumable any more (the owner lets its lease lapse: watch_owner's
    `renew`), and a later resume finds it expired, missing or its origin lost. `close()`
    waits (bounded) for what is queued, so the final chunk is in the buffer before the
    owner lets go.
    """

    def __init__(self, buffer: StreamBuffer, stream_id: str, max_queued: int = 1024) -> None:
        self.buffer = buffer
        self.stream_id = stream_id
        self.max_queued = max_queued
        self.failed: BaseException | None = None
        self._queue: list[tuple[int, bytes, ChunkKind]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def recording(self) -> bool:
        return self.failed is None and not self._closed

    async def write(self, seq: int, data: bytes, kind: ChunkKind = ChunkKind.DATA) -> None:
        """Record one chunk and wait until it is in the buffer (or recording stopped)."""
        if not self.recording:
            return
        if self._task is not None:
            raise RuntimeError("write() after record(): one recorder writes one way")
        try:
            if kind == ChunkKind.DATA:
                await self.buffer.append(self.stream_id, seq, data)
            else:
                await self.buffer.finish(self.stream_id, seq, data, error=kind == ChunkKind.ERROR)
        except (ProxyError, SequenceError) as exc:
            self.failed = exc
        else:
            if kind != ChunkKind.DATA:
                self._closed = True  # nothing follows the final chunk

    def record(self, seq: int, data: bytes, kind: ChunkKind = ChunkKind.DATA) -> None:
        if not self.recording:
            return
        if len(self._queue) >= self.max_queued:  # the store cannot keep up: give up on it
            self.failed = StreamStoreUnavailable("stream store too slow")
            self._queue.clear()
            return
        self._queue.append((seq, data, kind))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._write())
        self._wake.set()

    async def _write(self) -> None:
        while True:
            while self._queue:
                seq, data, kind = self._queue.pop(0)
                try:
                    if kind == ChunkKind.DATA:
                        await self.buffer.append(self.stream_id, seq, data)
                    else:
                        await self.buffer.finish(
                            self.stream_id, seq, data, error=kind == ChunkKind.ERROR
                        )
                except (ProxyError, SequenceError) as exc:
                    self.failed = exc
                    self._queue.clear()
                    return
                if kind != ChunkKind.DATA:
                    return
            if self._closed:
                return
            await self._wake.wait()
            self._wake.clear()

    async def close(self, timeout_s: float = 1.0) -> None:
        """Stop accepting chunks; wait up to `timeout_s` for the queued ones to be written."""
        self._closed = True
        self._wake.set()
        task = self._task
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
