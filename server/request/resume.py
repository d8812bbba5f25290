"""Resumable streams, wired: the stream id, the recording, the grace, the resume.

`Resumer.wrap(method, inner)` wraps a stream method's terminal (the forwarder, or the
cache in front of it). Per call, from the metadata (core/streambuffer.parse_resume):

- `x-aiproxy-cancel: <id>`: the caller stops that stream's upstream on purpose
  (`request_cancel`); the owner's watcher sees it at its next heartbeat and cancels the
  upstream at once. The call answers with no chunk; an unknown id is STREAM_NOT_FOUND.
- `x-aiproxy-resume: <id>` (+ `last-event-id: <seq>`): a replay from the buffer, on any
  replica sharing it: the chunks after `seq`, then the live tail, to the final chunk.
  No upstream call, so no token charge (CallInfo.replayed says so to the stages).
  Unknown / other tenant's id: NOT_FOUND STREAM_NOT_FOUND; data gone (grace over, bytes
  bound): NOT_FOUND STREAM_EXPIRED. The owner replica died (its lease, renewed by its
  watcher every WATCH_INTERVAL_S whatever the chunks do, lapsed before the final chunk):
  the stored chunks, then UNAVAILABLE STREAM_ORIGIN_LOST with RetryInfo (in-band as the
  final chunk when chunks were sent; before any, the status alone, so an EventSource
  reconnecting after that final chunk gets HTTP 503 and stops). The generation is not
  re-run here: its caller sends the request again (a new generation, charged as one). Resuming at or after the final chunk answers
  OUT_OF_RANGE STREAM_FINISHED: an error status, because an EventSource that nobody
  closed stops reconnecting only on a non-200 answer (an empty 200 would make it
  reconnect every 3 s forever; replaying the final chunk would too).
- resumable (`x-aiproxy-resumable: 1`, or `stream.resume.default` / `.methods` unless
  the caller said 0): `buffer.create` gives the id, sent in the initial metadata
  (`x-aiproxy-stream-id`); the upstream is pumped by an *owner task*, not by the
  caller's handler, which stores every chunk (StreamRecorder.write) and only then hands
  it to the caller through a bounded queue (whatever a caller saw, a resume finds) (a slow caller still pushes back on the upstream).
  When the caller drops, the owner keeps going with nobody to hand chunks to, and
  `watch_owner` (its heartbeat) decides: a resume somewhere keeps it alive, otherwise
  it is cancelled after `grace_s` (the cancellation reaches the agent, only later) and
  the buffer `abandon`s the stream (later resumes: STREAM_EXPIRED).
  Generations running without their caller are bounded per caller
  (`max_detached_per_caller`) and per process (`max_detached`): past either, the oldest
  is stopped at once (why="evicted"), so dropping streams is no way around the caller's
  open-stream limit (which counts connected calls only).

The stream's scope (who may resume or cancel it) is the caller's tenant, else its
authenticated identity; an anonymous caller's stream is scoped to "anon" and the
128-bit id alone is the capability (a phone that reconnects from another address must
still resume). A stream whose store is down at creation runs unresumable (no id sent).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Final, cast

import grpc

from aiproxy.core.callinfo import CallInfo
from aiproxy.core.errors import Cancelled, ProxyError, Reason
from aiproxy.core.logs import log_event
from aiproxy.core.metrics import ProxyMetrics
from aiproxy.core.service import Method
from aiproxy.core.settings import ResumeSettings, Settings
from aiproxy.core.streambuffer import (
    STREAM_ID_HEADER,
    ChunkKind,
    Grace,
    MemoryStreamBuffer,
    StreamBuffer,
    StreamExpired,
    StreamNotFound,
    StreamOriginLost,
    StreamRecorder,
    StreamStoreUnavailable,
    Verdict,
    parse_resume,
    watch_owner,
)
from aiproxy.core.types import Context, StreamCall
from aiproxy.interceptors.error_handling import final_chunk, shape

log = logging.getLogger("aiproxy.resume")


REQUEST_ID: Final = "x-request-id"
# The owner's heartbeat (and so how soon a cancel request or the grace's end is seen).
WATCH_INTERVAL_S: Final = 0.25


class StreamFinished(ProxyError):
    """A resume at or after the final chunk: the stream is complete, nothing is left."""

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = Reason.STREAM_FINISHED
    default_message = "the stream has finished; nothing left to resume"


class DetachedContext:
    """The servicer context an inner terminal sees when it may outlive its caller (an
    owner task, a shared cache producer): initial metadata is captured, not sent (the
    wrapper sends it, with its own headers, to the caller it serves); everything else
    goes to the real context, and a failure there (the caller left) is ignored."""

    __slots__ = ("_context", "initial")

    def __init__(self, context: Context) -> None:
        self._context = context
        self.initial: tuple[tuple[str, str], ...] | None = None

    async def send_initial_metadata(self, metadata: Any) -> None:
        self.initial = tuple(metadata)

    def set_trailing_metadata(self, metadata: Any) -> None:
        try:
            self._context.set_trailing_metadata(metadata)
        except Exception:  # noqa: BLE001 - the caller's call is over: nobody to tell
            pass

    def as_context(self) -> Context:
        """This object, typed as what the inner terminal takes (it duck-types it)."""
        return cast(Context, self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def initial_metadata(
    call: CallInfo, detached: DetachedContext | None, *extra: tuple[str, str]
) -> tuple[tuple[str, str], ...]:
    """What the inner terminal would have sent (or the forwarder's default), plus `extra`."""
    base = detached.initial if detached is not None and detached.initial is not None else None
    if base is None:
        base = ((REQUEST_ID, call.request_id), *call.reply_metadata)
    return (*base, *extra)


def stream_scope(call: CallInfo) -> str:
    """Who may resume or cancel a stream (see the module docstring).

    Anonymous callers share one scope on purpose. Keying them by address instead would
    break the very case resume is for: a phone that drops off Wi-Fi comes back over its
    mobile network with another address (and behind Envoy without an edge secret every
    caller has Envoy's address anyway, so it would isolate nobody). The stream id is the
    capability instead: 128 bits from `secrets` (core/streambuffer.new_stream_id), sent
    only to the caller that started the stream, checked before any work, and an unknown
    id gets the same NOT_FOUND as another scope's (nothing to probe). What a shared scope
    must not share, the per-caller bound, is counted per caller (`holder` in create): one
    anonymous caller cannot flush another's streams. Authenticated callers and tenants
    get their own scope: a leaked id is useless to anyone outside it. Both the scope and
    the holder come from CallInfo.identity (what auth verified, else the address), never
    from an id the caller declares (x-client-id, an unverified x-api-key): a fresh id per
    call must not be a fresh per-caller bound (`caller_of`).
    """
    if call.tenant:
        return f"tenant:{call.tenant}"
    if call.identity.startswith(("sub:", "key:")):  # verified by auth, never declared
        return call.identity
    return "anon"


def caller_of(call: CallInfo) -> str:
    """Whom a stream counts against in the per-caller bounds: the caller's unforgeable
    identity (see `stream_scope`)."""
    return call.identity or call.peer


class _End:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class _Owner:
    """One resumable stream's upstream, pumped in its own task (see the module docstring)."""

    def __init__(self, sid: str, maxsize: int, caller: str) -> None:
        self.sid = sid
        self.caller = caller
        self.attached = True
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=maxsize)
        self.evicted = asyncio.Event()  # stop now: a bound on detached generations
        # What the generation produced, for the token settlement of a caller that left
        # (CallInfo.generation_end): the last chunk and the tokens of every chunk pumped.
        self.count: Callable[[Any], int] | None = None
        self.last: Any = None
        self.produced = 0
        self.done: asyncio.Future[tuple[Any, int]] = asyncio.get_running_loop().create_future()

    def detach(self) -> None:
        """The caller left: stop handing it chunks, and free a put that waits on it."""
        self.attached = False
        while not self.queue.empty():
            self.queue.get_nowait()

    async def hand(self, item: Any) -> None:
        if self.attached:
            await self.queue.put(item)

    def queue_end(self, end: _End) -> None:
        """The end, without waiting: what the caller had not read yet is dropped."""
        if self.attached:
            while self.queue.full():
                self.queue.get_nowait()
            self.queue.put_nowait(end)


class Resumer:
    """Resumable streams for every stream method (one per process)."""

    def __init__(
        self,
        buffer: StreamBuffer,
        settings: ResumeSettings,
        *,
        replica_id: str,
        queue_chunks: int = 100,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.buffer = buffer
        self.settings = settings
        self.replica_id = replica_id
        self._queue_chunks = queue_chunks
        self._metrics = metrics
        self._methods = frozenset(settings.methods)
        # Owner tasks alive (caller attached or in grace): kept referenced, cancelled at close.
        self._tasks: set[asyncio.Task[None]] = set()
        # Owners whose caller dropped, oldest first: all, and per caller.
        self._detached: OrderedDict[_Owner, None] = OrderedDict()
        self._detached_by_caller: dict[str, OrderedDict[_Owner, None]] = {}

    @property
    def detached(self) -> int:
        return len(self._detached)

    @property
    def generating(self) -> int:
        """Resumable generations running (caller attached, or in its grace)."""
        return len(self._tasks)

    def _detach(self, owner: _Owner) -> None:
        """The caller left: count the owner against the bounds; evict the oldest past them."""
        owner.detach()
        mine = self._detached_by_caller.setdefault(owner.caller, OrderedDict())
        mine[owner] = None
        self._detached[owner] = None
        if len(mine) > self.settings.max_detached_per_caller:
            next(iter(mine)).evicted.set()
        if len(self._detached) > self.settings.max_detached:
            next(iter(self._detached)).evicted.set()

    def _forget(self, owner: _Owner) -> None:
        if self._detached.pop(owner, 0) is None:
            mine = self._detached_by_caller[owner.caller]
            del mine[owner]
            if not mine:
                del self._detached_by_caller[owner.caller]

    def _default_for(self, method: Method) -> bool:
        return self.settings.default or method.name in self._methods or method.path in self._methods

    def _count(self, counter: Any, *labels: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, counter).labels(*labels).inc()

    def wrap(self, method: Method, inner: StreamCall) -> StreamCall:
        by_default = self._default_for(method)
        name = method.name

        def resumable_stream(
            request: Any, raw: bytes, context: Context, call: CallInfo
        ) -> AsyncGenerator[Any, None]:
            ask = parse_resume(call.metadata.items())
            if ask.cancel is not None:
                return self._cancel(ask.cancel, context, call)
            if ask.resume is not None:
                return self._replay(method, ask.resume, ask.after_seq, context, call)
            wanted = by_default if ask.resumable is None else ask.resumable
            if not wanted:
                return inner(request, raw, context, call)
            return self._own(method, inner, request, raw, context, call)

        resumable_stream.__name__ = f"resumable_{name}"
        return resumable_stream

    # -- x-aiproxy-cancel ----------------------------------------------------------------

    async def _cancel(
        self, sid: str, context: Context, call: CallInfo
    ) -> AsyncGenerator[Any, None]:
        call.replayed = "cancel"
        if not await self.buffer.request_cancel(sid, stream_scope(call)):
            raise StreamNotFound()
        await context.send_initial_metadata(initial_metadata(call, None, (STREAM_ID_HEADER, sid)))
        return
        yield  # pragma: no cover  (an async generator)

    # -- x-aiproxy-resume ----------------------------------------------------------------

    async def _replay(
        self,
        method: Method,
        sid: str,
        after_seq: int,
        context: Context,
        call: CallInfo,
    ) -> AsyncGenerator[Any, None]:
        call.replayed = "resume"  # no upstream call: the limits charge no tokens for it
        cls = method.response_cls
        reader = self.buffer.read(sid, stream_scope(call), after_seq)
        try:
            try:
                first = await anext(reader)
            except StopAsyncIteration:
                self._count("stream_resumes", method.name, "finished")
                raise StreamFinished() from None
            except StreamNotFound:
                self._count("stream_resumes", method.name, "not_found")
                raise
            except StreamExpired:
                self._count("stream_resumes", method.name, "expired")
                raise
            except StreamOriginLost:
                self._count("stream_resumes", method.name, "origin_lost")
                raise
            self._count("stream_resumes", method.name, "resumed")
            await context.send_initial_metadata(
                initial_metadata(call, None, (STREAM_ID_HEADER, sid))
            )
            yield cls.FromString(first.data)
            try:
                async for chunk in reader:
                    yield cls.FromString(chunk.data)
            except StreamOriginLost:
                # In-band: the pipeline ends the stream with its final error chunk.
                self._count("stream_resumes", method.name, "origin_lost")
                raise
        finally:
            await reader.aclose()  # type: ignore[attr-defined]

    # -- a new resumable stream ----------------------------------------------------------

    async def _own(
        self,
        method: Method,
        inner: StreamCall,
        request: Any,
        raw: bytes,
        context: Context,
        call: CallInfo,
    ) -> AsyncGenerator[Any, None]:
        try:
            sid = await self.buffer.create(stream_scope(call), self.replica_id, caller_of(call))
        except StreamStoreUnavailable:
            # The store is away: the stream runs, not resumable (no id is promised).
            async for chunk in inner(request, raw, context, call):
                yield chunk
            return
        owner = _Owner(sid, self._queue_chunks, caller_of(call))
        owner.count = call.chunk_tokens  # set by the limits when the call reserved tokens
        detached = DetachedContext(context)
        grace = Grace(self.settings.grace_s)
        task = asyncio.get_running_loop().create_task(
            self._supervise(method, owner, grace, inner(request, raw, detached.as_context(), call))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        sent = ended = False
        try:
            while True:
                item = await owner.queue.get()
                if isinstance(item, _End):
                    ended = True
                    if item.error is not None:
                        error, item.error = item.error, None
                        try:
                            raise error
                        finally:
                            del error
                    return
                if not sent:
                    sent = True
                    await context.send_initial_metadata(
                        initial_metadata(call, detached, (STREAM_ID_HEADER, sid))
                    )
                yield item
        finally:
            if not ended and not task.done():
                # The caller left before the end: the owner goes on for the grace.
                grace.caller_dropped()
                self._detach(owner)
                # Charged when the generation ends, with everything it produced (read by
                # the limits stage's exit, which runs after this).
                call.generation_end = owner.done

    async def _supervise(
        self, method: Method, owner: _Owner, grace: Grace, chunks: AsyncIterator[Any]
    ) -> None:
        """Run the owner's pump beside its watcher; the first to end decides."""
        recorder = StreamRecorder(self.buffer, owner.sid)
        pump = asyncio.create_task(self._pump(method, owner, chunks, recorder))
        watch = asyncio.create_task(
            watch_owner(
                self.buffer,
                owner.sid,
                self.replica_id,
                grace,
                interval_s=WATCH_INTERVAL_S,
                lease_s=self.settings.owner_lease_s,
                # A stream the store stopped receiving is let go: resumers get
                # STREAM_ORIGIN_LOST after the lease instead of waiting forever.
                renew=lambda: recorder.failed is None,
            )
        )
        evicted = asyncio.create_task(owner.evicted.wait())
        shutdown = False
        try:
            await asyncio.wait((pump, watch, evicted), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            shutdown = True  # Resumer.aclose: resumers must not wait for a tail that never comes
            raise
        finally:
            stopped: Verdict | str | None = None
            if not pump.done():
                if shutdown:
                    stopped = "shutdown"
                elif evicted.done() and not evicted.cancelled():
                    stopped = "evicted"
                elif watch.done() and not watch.cancelled():
                    failed = watch.exception()
                    # A watcher that failed (a bug) cannot keep time: stop, bounded.
                    stopped = Verdict.ABANDONED if failed is not None else watch.result()
                    if failed is not None:
                        log.error("stream watcher failed", exc_info=failed)
                pump.cancel()  # cancels the upstream call (the forwarder closes its pump)
            watch.cancel()
            evicted.cancel()
            await asyncio.wait((pump, watch, evicted))
            self._forget(owner)
            if not pump.cancelled():
                pump.exception()  # retrieved: _pump handles its own errors
            if stopped is not None:
                why = (
                    stopped
                    if isinstance(stopped, str)
                    else "cancel_requested"
                    if stopped is Verdict.CANCEL_REQUESTED
                    else "abandoned"
                )
                self._count("streams_stopped", method.name, why)
                log_event(log, "resumable_stream_stopped", method=method.name, why=why)
                # A caller still attached (a cancel from elsewhere, a shutdown) gets the
                # in-band CANCELLED end, not a stream that just stops.
                owner.queue_end(_End(Cancelled(f"the generation was stopped ({why})")))
                try:
                    await self.buffer.abandon(owner.sid)
                except StreamStoreUnavailable:
                    pass  # the stream's TTL removes it

    async def _pump(
        self,
        method: Method,
        owner: _Owner,
        chunks: AsyncIterator[Any],
        recorder: StreamRecorder,
    ) -> None:
        seq = 0
        final = False
        try:
            async for chunk in chunks:
                seq = chunk.seq + 1
                final = chunk.is_final
                owner.last = chunk
                if owner.count is not None:
                    owner.produced += owner.count(chunk)
                # Stored first, then handed: a chunk the caller saw is there for a resume,
                # even if this replica dies right after (bounded by the store's timeout; a
                # failed store stops recording, never the stream).
                await recorder.write(
                    chunk.seq,
                    chunk.SerializeToString(),
                    ChunkKind.FINAL if final else ChunkKind.DATA,
                )
                await owner.hand(chunk)
            if not final:
                # An upstream that ended without a final chunk: resumers still need an end.
                await recorder.write(
                    seq,
                    method.response_cls(is_final=True, seq=seq).SerializeToString(),
                    ChunkKind.FINAL,
                )
            await owner.hand(_End(None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the caller gets it; the buffer its chunk
            err = shape(exc, None, method.path)
            await recorder.write(
                seq, final_chunk(method.response_cls, seq, err).SerializeToString(), ChunkKind.FINAL
            )
            await owner.hand(_End(exc.with_traceback(None)))
            del exc
        finally:
            if not owner.done.done():
                owner.done.set_result((owner.last, owner.produced))
            try:
                await chunks.aclose()  # type: ignore[attr-defined]
            finally:
                await recorder.close()

    async def aclose(self) -> None:
        """Cancel the owners still running (shutdown), then close the buffer."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.buffer.aclose()


def resume_backend(settings: Settings) -> str:
    return settings.stream.resume.backend or settings.limits.backend


def build_stream_buffer(settings: Settings) -> StreamBuffer:
    """The buffer `stream.resume.backend` names (memory, or Redis on `redis.url`)."""
    r = settings.stream.resume
    if resume_backend(settings) == "memory":
        return MemoryStreamBuffer(
            max_bytes=r.max_bytes,
            ttl_s=r.ttl_s,
            max_streams=r.max_streams,
            max_streams_per_scope=r.max_streams_per_caller,
            owner_lease_s=r.owner_lease_s,
        )
    from aiproxy.server.stores.redis_limits import client_from_settings
    from aiproxy.server.stores.redis_streams import RedisStreamBuffer

    rs = settings.redis
    client = client_from_settings(rs)
    return RedisStreamBuffer(
        client,
        prefix=r.key_prefix,
        max_bytes=r.max_bytes,
        ttl_s=r.ttl_s,
        owner_lease_s=r.owner_lease_s,
        # A write delays its chunk by at most this (StreamRecorder.write), once: a store
        # past it stops the recording. A loaded box may take longer than a limits call's
        # bound without losing resumability.
        timeout_s=max(0.25, rs.timeout_ms / 1000),
        probe_interval_s=rs.probe_interval_s,
    )
