"""The shared resumable-stream buffer: Redis Streams, so a caller resumes on any replica.

Keys per stream (one hash tag per stream, so they would sit on one Cluster slot):

- `{prefix}{<id>}:m` a hash: scope, owner, next (the next seq), b (bytes held), first
  (the oldest seq still held), fin, ab (abandoned), cx (cancel requested);
- `{prefix}{<id>}:s` the Redis Stream of chunks: entry id `<seq>-1` (so XADD refuses a
  duplicate or an older seq by itself, and "after seq N" is the id `N-1`), fields d (the
  serialized chunk) and k (0 data, 1 final, 2 error);
- `{prefix}{<id>}:o` the owner's lease (PX), `{prefix}{<id>}:r` a reader's lease (PX).
  `create` takes the owner's first lease; the owner's watcher renews it (every 0.25 s,
  server/request/resume.py), independently of chunks.

Every write is one Lua script (check seq, XADD, bytes accounting and trimming, expiry),
one round trip, sent over the one pipelined connection of server/stores/redis_limits.py
(`_AutoPipeline`). Bounds: `max_bytes` and `max_chunks` per stream (the oldest entries
are XDEL'd past either, never the newest; "first" records it, so a resume from before
is STREAM_EXPIRED, not a silent gap), and `ttl_s` after the last write (PEXPIRE on both
keys: the stream is then gone, STREAM_NOT_FOUND). An abandoned stream keeps only its
hash (a tombstone: resumes get STREAM_EXPIRED) until that expires too.

Reads: one script returns the chunks after the reader's seq, renews the reader lease and
says whether the owner's lease is alive, atomically: a reader that has every stored chunk
of an unfinished stream whose owner's lease lapsed (the replica died) ends with
STREAM_ORIGIN_LOST, at most `owner lease + block_s` after the owner's last renewal;
the live tail is XREAD BLOCK on a separate, bounded pool of connections (a blocking read
must not hold the pipelined connection), at most `block_s` per wait so the reader renews
its lease and notices abandonment; a reader that finds the pool exhausted waits for a
connection (bounded by `block_s`) and otherwise polls with the script.

Failures: every call is bounded by `timeout_s`; a failed call raises
StreamStoreUnavailable (UNAVAILABLE): the stream goes on, not resumable (the caller stops
buffering it). The first failure logs one line ("degraded"), the next success one
("healthy"); while degraded, `create` touches Redis at most once per `probe_interval_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from aiproxy.core.streambuffer import (
    DEFAULT_LEASE_S,
    DEFAULT_MAX_BYTES,
    DEFAULT_TTL_S,
    MISSING,
    Chunk,
    ChunkKind,
    SequenceError,
    StreamExpired,
    StreamNotFound,
    StreamOriginLost,
    StreamState,
    StreamStoreUnavailable,
    new_stream_id,
)
from aiproxy.server.stores.redis_limits import _FAILURES, _AutoPipeline, client_from_url

log = logging.getLogger("aiproxy.streams")

_READ_COUNT: Final = 256  # chunks per read round trip

# Trim from the oldest while over a bound, never the last entry; record the new first seq.
_LIB_LUA: Final = """
local function entry_seq(id) return tonumber(string.sub(id, 1, string.find(id, '-', 1, true) - 1)) end
"""

# KEYS: meta, owner. ARGV: scope, owner, ttl_ms, owner lease ms.
_CREATE_LUA: Final = """
redis.call('HSET', KEYS[1], 'scope', ARGV[1], 'owner', ARGV[2], 'next', 0, 'b', 0, 'first', 0,
           'fin', 0, 'ab', 0, 'cx', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], 1, 'PX', ARGV[4])
return 1
"""

# KEYS: meta, stream. ARGV: seq, data, kind, max_bytes, max_chunks, ttl_ms.
# Returns 1 ok, -1 no stream, -2 finished/abandoned, -3 wrong seq.
_APPEND_LUA: Final = (
    _LIB_LUA
    + """
local m = redis.call('HMGET', KEYS[1], 'next', 'fin', 'ab')
if not m[1] then return -1 end
if m[2] == '1' or m[3] == '1' then return -2 end
local seq = tonumber(ARGV[1])
if tonumber(m[1]) ~= seq then return -3 end
redis.call('XADD', KEYS[2], seq .. '-1', 'd', ARGV[2], 'k', ARGV[3])
local nbytes = redis.call('HINCRBY', KEYS[1], 'b', #ARGV[2])
local max_bytes, max_chunks = tonumber(ARGV[4]), tonumber(ARGV[5])
local n = redis.call('XLEN', KEYS[2])
while (nbytes > max_bytes or n > max_chunks) and n > 1 do
  local e = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  redis.call('XDEL', KEYS[2], e[1])
  nbytes = nbytes - #e[2][2]
  n = n - 1
  redis.call('HSET', KEYS[1], 'first', entry_seq(e[1]) + 1)
end
redis.call('HSET', KEYS[1], 'b', nbytes, 'next', seq + 1)
if ARGV[3] ~= '0' then redis.call('HSET', KEYS[1], 'fin', 1) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 1
"""
)

# KEYS: meta, owner, reader. ARGV: owner ('' to only read), lease_ms.
# {exists, fin, ab, cx, owner_alive, reader_attached, next}
_STATE_LUA: Final = """
local m = redis.call('HMGET', KEYS[1], 'owner', 'fin', 'ab', 'cx', 'next')
if not m[1] then return {0, 0, 0, 0, 0, 0, 0} end
if ARGV[1] ~= '' and m[1] == ARGV[1] then redis.call('SET', KEYS[2], 1, 'PX', ARGV[2]) end
return {1, tonumber(m[2]), tonumber(m[3]), tonumber(m[4]), redis.call('EXISTS', KEYS[2]),
        redis.call('EXISTS', KEYS[3]), tonumber(m[5])}
"""

# KEYS: meta. ARGV: scope. 1 when the stream is the scope's and the request was recorded.
_CANCEL_LUA: Final = """
if redis.call('HGET', KEYS[1], 'scope') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'cx', 1)
return 1
"""

# KEYS: meta, stream, owner.
_ABANDON_LUA: Final = """
local fin = redis.call('HGET', KEYS[1], 'fin')
if not fin or fin == '1' then return 0 end
redis.call('HSET', KEYS[1], 'ab', 1, 'b', 0)
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""

# KEYS: meta, stream, reader, owner. ARGV: scope, after id (exclusive, or '-'), count,
# reader lease ms. {status, first, fin, entries, owner alive}: status 1 ok, -1 not found,
# -2 abandoned.
_READ_LUA: Final = """
local m = redis.call('HMGET', KEYS[1], 'scope', 'first', 'fin', 'ab')
if not m[1] or m[1] ~= ARGV[1] then return {-1, 0, 0, {}, 0} end
if m[4] == '1' then return {-2, 0, 0, {}, 0} end
redis.call('SET', KEYS[3], 1, 'PX', ARGV[4])
local entries = redis.call('XRANGE', KEYS[2], ARGV[2], '+', 'COUNT', ARGV[3])
return {1, tonumber(m[2]), tonumber(m[3]), entries, redis.call('EXISTS', KEYS[4])}
"""


def _after_id(seq: int) -> str:
    """The XRANGE start / XREAD id for "entries after chunk `seq`" (-1: from the start)."""
    return "-" if seq < 0 else f"({seq}-1"


def _chunk(entry: Any) -> Chunk:
    entry_id, fields = entry
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    seq = int(entry_id.split("-", 1)[0])
    if isinstance(fields, dict):
        data, kind = fields[b"d"], fields[b"k"]
    else:  # a flat [field, value, ...] list, as scripts return it
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        data, kind = values[b"d"], values[b"k"]
    return Chunk(seq, data, ChunkKind(int(kind)))


class RedisStreamBuffer:
    """The StreamBuffer on Redis Streams. See the module docstring for keys and failures."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "aiproxy:streams:",
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_chunks: int = 100_000,
        ttl_s: float = DEFAULT_TTL_S,
        reader_lease_s: float = DEFAULT_LEASE_S,
        owner_lease_s: float = DEFAULT_LEASE_S,
        timeout_s: float = 0.05,
        block_s: float = 1.0,
        max_blocking_readers: int = 64,
        probe_interval_s: float = 0.5,
    ) -> None:
        if min(max_bytes, max_chunks, max_blocking_readers) < 1:
            raise ValueError("max_bytes, max_chunks and max_blocking_readers must be positive")
        if min(ttl_s, reader_lease_s, owner_lease_s, timeout_s, block_s, probe_interval_s) <= 0:
            raise ValueError("ttl_s, the leases, timeout_s and block_s must be positive")
        self._client = client
        self._prefix = prefix
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._reader_lease_ms = max(1, round(reader_lease_s * 1000))
        self._owner_lease_ms = max(1, round(owner_lease_s * 1000))
        self._timeout = timeout_s
        self._block_s = min(block_s, reader_lease_s / 3)
        self._probe_every = probe_interval_s
        self._pipe = _AutoPipeline(client)
        pool = client.connection_pool
        # Blocking reads get their own bounded pool: a waiting XREAD holds its connection.
        self._blocking = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool(
                connection_class=pool.connection_class,
                max_connections=max_blocking_readers,
                timeout=self._block_s,
                **pool.connection_kwargs,
            )
        )
        self._create = client.register_script(_CREATE_LUA)
        self._append = client.register_script(_APPEND_LUA)
        self._state = client.register_script(_STATE_LUA)
        self._cancel = client.register_script(_CANCEL_LUA)
        self._abandon = client.register_script(_ABANDON_LUA)
        self._read = client.register_script(_READ_LUA)
        self.healthy = True
        self._last_try = 0.0
        self._reset_task: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisStreamBuffer:
        return cls(client_from_url(url), **kwargs)

    def _keys(self, sid: str) -> tuple[str, str, str, str]:
        base = f"{self._prefix}{{{sid}}}"
        return f"{base}:m", f"{base}:s", f"{base}:o", f"{base}:r"

    # -- one bounded call, and the transitions it reports

    async def _script(self, script: Any, keys: tuple[str, ...], *args: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    reply = await self._pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
                except NoScriptError:
                    reply = await self._pipe.call("EVAL", script.script, len(keys), *keys, *args)
        except _FAILURES as exc:
            self._degrade(exc)
            raise StreamStoreUnavailable() from None
        self._recover()
        return reply

    def _degrade(self, exc: BaseException) -> None:
        self._last_try = time.monotonic()
        if self.healthy:
            self.healthy = False
            log.warning(
                "stream store degraded: redis unreachable (%s); new streams are not resumable",
                type(exc).__name__,
                extra={"event": "streams_degraded"},
            )
            # Replies that may never come are not waited for; the next call reconnects.
            self._reset_task = asyncio.get_running_loop().create_task(self._pipe.reset())

    def _recover(self) -> None:
        if not self.healthy:
            self.healthy = True
            log.warning("stream store healthy again", extra={"event": "streams_recovered"})

    # -- the StreamBuffer interface

    async def create(self, scope: str, owner: str, holder: str = "") -> str:
        # `holder` is for a per-caller count bound, which this backend does not keep
        # (ttl_s and the bytes bounds per stream hold; the caller's rate limits pace it).
        if not self.healthy and time.monotonic() - self._last_try < self._probe_every:
            raise StreamStoreUnavailable()  # fail fast: no wait per call while Redis is away
        sid = new_stream_id()
        meta, _, okey, _ = self._keys(sid)
        await self._script(
            self._create, (meta, okey), scope, owner, self._ttl_ms, self._owner_lease_ms
        )
        return sid

    async def _write(self, sid: str, seq: int, data: bytes, kind: ChunkKind) -> None:
        meta, stream, _, _ = self._keys(sid)
        result = await self._script(
            self._append,
            (meta, stream),
            seq,
            data,
            int(kind),
            self.max_bytes,
            self.max_chunks,
            self._ttl_ms,
        )
        if result == -1:
            raise StreamNotFound()
        if result == -2:
            raise SequenceError("stream already finished or abandoned")
        if result == -3:
            raise SequenceError(f"seq {seq} is not the next one")

    async def append(self, stream_id: str, seq: int, data: bytes) -> None:
        await self._write(stream_id, seq, data, ChunkKind.DATA)

    async def finish(self, stream_id: str, seq: int, data: bytes, *, error: bool = False) -> None:
        await self._write(stream_id, seq, data, ChunkKind.ERROR if error else ChunkKind.FINAL)

    async def _read_state(self, stream_id: str, owner: str, lease_ms: int) -> StreamState:
        meta, _, okey, rkey = self._keys(stream_id)
        row = await self._script(self._state, (meta, okey, rkey), owner, lease_ms)
        if not row[0]:
            return MISSING
        _, fin, abandoned, cancel, owner_alive, reader, next_seq = row
        return StreamState(
            True,
            finished=bool(fin),
            abandoned=bool(abandoned),
            cancel_requested=bool(cancel),
            owner_alive=bool(owner_alive),
            reader_attached=bool(reader),
            next_seq=int(next_seq),
        )

    async def state(self, stream_id: str) -> StreamState:
        return await self._read_state(stream_id, "", 1)

    async def heartbeat(self, stream_id: str, owner: str, lease_s: float) -> StreamState:
        return await self._read_state(stream_id, owner, max(1, round(lease_s * 1000)))

    async def request_cancel(self, stream_id: str, scope: str) -> bool:
        return bool(await self._script(self._cancel, self._keys(stream_id)[:1], scope))

    async def abandon(self, stream_id: str) -> None:
        await self._script(self._abandon, self._keys(stream_id)[:3])

    async def read(self, stream_id: str, scope: str, after_seq: int = -1) -> AsyncIterator[Chunk]:
        meta, stream, okey, rkey = self._keys(stream_id)
        last = after_seq
        while True:
            status, first, fin, entries, owner_alive = await self._script(
                self._read,
                (meta, stream, rkey, okey),
                scope,
                _after_id(last),
                _READ_COUNT,
                self._reader_lease_ms,
            )
            if status == -1:
                if last != after_seq:
                    raise StreamExpired()  # it expired while being read
                raise StreamNotFound()
            if status == -2:
                raise StreamExpired()
            if last + 1 < first:
                raise StreamExpired("the chunks after last-event-id were dropped (size bound)")
            for entry in entries:
                chunk = _chunk(entry)
                if chunk.seq != last + 1:  # trimmed meanwhile: never a silent gap
                    raise StreamExpired("the chunks after last-event-id were dropped")
                last = chunk.seq
                yield chunk
                if chunk.last:
                    return
            if len(entries) == _READ_COUNT:
                continue  # more is already there
            if fin:
                return  # the final chunk was at or before after_seq
            if not owner_alive:
                # Every stored chunk is sent and the owner's lease lapsed in the same
                # atomic read: nothing more will come (the owner died, or stopped recording).
                raise StreamOriginLost()
            # The live tail: wait for the next entry (or block_s, then check the state).
            await self._wait_for_more(stream, last)

    async def _wait_for_more(self, stream: str, last: int) -> None:
        start = "0-0" if last < 0 else f"{last}-1"
        try:
            async with asyncio.timeout(self._block_s + self._timeout + 0.5):
                await self._blocking.xread(
                    {stream: start}, count=1, block=max(1, round(self._block_s * 1000))
                )
        except _FAILURES:
            # Pool exhausted or a failed connection: poll with the script instead, paced.
            await asyncio.sleep(min(self._block_s, 0.1))

    async def aclose(self) -> None:
        if self._reset_task is not None:
            await asyncio.gather(self._reset_task, return_exceptions=True)
        await self._pipe.reset()
        await self._blocking.aclose()
        # A pool handed to a client is not closed with it (redis-py closes only its own).
        await self._blocking.connection_pool.disconnect()
        await self._client.aclose()
