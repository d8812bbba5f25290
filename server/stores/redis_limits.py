"""The shared limits backend: every worker and replica keeps its limit state in one Redis.

Each admission (`admit`) and each end of a call (`finish`) is one atomic Lua script, so
one round trip and no check-then-use race between processes; all of a process's calls
share one pipelined connection (`_AutoPipeline`), so calls in flight together cost one
write and one read between them; the scripts read Redis's own clock (`TIME`), so processes whose clocks
disagree still share one bucket. Scripts are registered once (`register_script`: EVALSHA,
and EVAL again after a NOSCRIPT, e.g. when Redis restarted). Every key has an expiry:
a request bucket lives until it would be full again, a stream-lease set until its last
lease expires, a day counter until the day is over (plus an hour for late settles), so
idle callers cost nothing; a reservation's key is deleted by its settle (or lapses after
`reservation_ttl_s` if its process died). Keys start with `prefix`, so several proxies
can share one Redis. All keys live in one Redis (no Cluster: a token reservation
touches the caller's bucket and the tenant's counter in one script).

Failure policy. Every Redis call is bounded by `timeout_s` (a few ms; event-loop lag
counts against it, so on a CPU-starved process a very tight bound sends calls to the
policy before Redis is slow: 10-25 ms suits a loaded 2-core box). The first call
that fails or times out turns the store `degraded` (one log line, one `on_state(False)`);
while degraded no call touches Redis, so none waits; a background probe PINGs every
`probe_interval_s` and turns it `healthy` again (one log line, `on_state(True)`). While
degraded, the policy decides:

- `fail_open`: each process limits from a local MemoryLimitStore at limit/N (N =
  `processes`, the expected process count; rounded up), so the fleet stays near the
  configured limit while Redis is away;
- `fail_closed`: calls raise LimitsUnavailable (UNAVAILABLE, RetryInfo of one probe
  interval).

A call whose wait ran out may still have been counted by Redis: it is then counted
twice (in Redis and locally), never zero times; its Redis reservation keeps what it
reserved. Limits err towards strict, budgets are never under-charged.

Settles that could not reach Redis are kept (bounded) and replayed on recovery; settling
is idempotent in Redis (the reservation key is deleted by the first settle), so a replay
of a settle that did arrive counts once.

Stream leases: a sorted set per caller key, member = lease id, score = expiry (Redis ms).
The store renews all leases it holds in one pipelined batch every `lease_ttl_s / 3`; a
process that dies stops renewing and its leases lapse within `lease_ttl_s`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any, Final, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from aiproxy.core.limitstore import (
    TOKENS_PER_DAY,
    TOKENS_PER_MINUTE,
    Admission,
    LimitsUnavailable,
    MemoryLimitStore,
    Reservation,
    StreamLease,
    TokenBudget,
    TokenLimits,
    TokenRejection,
)
from aiproxy.core.ratelimit import Decision, LimitSpec
from aiproxy.core.settings import RedisSettings

log = logging.getLogger("aiproxy.limits")

Policy = Literal["fail_open", "fail_closed"]
BACKEND: Final = "redis"
_FALLBACK: Final = "fallback"
_MAX_PENDING_SETTLES: Final = 10_000
# What fails a Redis call: the client's errors, the socket's, and our bounded wait.
_FAILURES: Final = (RedisError, OSError, TimeoutError)

# Lua numbers print with 14 significant digits by default, which would round a
# microsecond timestamp (16 digits): state is written with %.17g (`fmt`).
#
# Every script is this library followed by a few lines; the library's functions are the
# one definition of each rule (refill, lease room, all-or-nothing tokens, settle once).
_LIB_LUA: Final = """
local function fmt(x) return string.format('%.17g', x) end

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2]), tonumber(t[1])
end

-- Request bucket: take n tokens if they are there. {allowed, remaining, retry_us, reset_us}
local function take_rate(key, rate_s, burst, n, now)
  local rate = rate_s / 1000000
  local v = redis.call('HMGET', key, 't', 's')
  local tokens, stamp = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or stamp == nil then tokens = burst; stamp = now end
  if now > stamp then tokens = tokens + (now - stamp) * rate; stamp = now end
  if tokens > burst then tokens = burst end
  local allowed, retry = 0, 0
  if tokens + 1e-9 >= n then
    tokens = tokens - n
    if tokens < 0 then tokens = 0 end
    allowed = 1
  else
    retry = math.ceil((n - tokens) / rate)
  end
  local reset = math.ceil((burst - tokens) / rate)
  redis.call('HSET', key, 't', fmt(tokens), 's', fmt(stamp))
  redis.call('PEXPIRE', key, math.floor(reset / 1000) + 1)  -- gone once it is full again
  return {allowed, math.floor(tokens + 1e-9), retry, reset}
end

-- The same answer without taking or writing anything (a hierarchical admission checks
-- its inner bucket before it charges the outer one). {allowed, remaining, retry_us, reset_us}
local function peek_rate(key, rate_s, burst, n, now)
  local rate = rate_s / 1000000
  local v = redis.call('HMGET', key, 't', 's')
  local tokens, stamp = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or stamp == nil then tokens = burst; stamp = now end
  if now > stamp then tokens = tokens + (now - stamp) * rate end
  if tokens > burst then tokens = burst end
  if tokens + 1e-9 >= n then
    local left = tokens - n
    if left < 0 then left = 0 end
    return {1, math.floor(left + 1e-9), 0, math.ceil((burst - left) / rate)}
  end
  return {0, math.floor(tokens + 1e-9), math.ceil((n - tokens) / rate),
          math.ceil((burst - tokens) / rate)}
end

-- Stream leases: a sorted set, member = lease id, score = expiry (ms). Re-adding a member
-- that is still there renews it; a lapsed one gets a slot back only if there is room.
local function lease_room(key, limit, member, now)
  local now_ms = math.floor(now / 1000)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
  if redis.call('ZSCORE', key, member) then return true end
  return redis.call('ZCARD', key) < limit
end

local function lease_add(key, ttl_ms, member, now)
  redis.call('ZADD', key, fmt(math.floor(now / 1000) + ttl_ms), member)
  redis.call('PEXPIRE', key, ttl_ms)  -- the newest lease's expiry is the set's
end

-- Per-minute token bucket; may be in debt (level < 0) after a call used more than it
-- reserved. A reservation needs min(amount, capacity), so an amount above the capacity
-- runs on a full bucket instead of never.
local function tpm_read(key, pm, now)
  local v = redis.call('HMGET', key, 'l', 's')
  local level, stamp = tonumber(v[1]), tonumber(v[2])
  if level == nil or stamp == nil then level = pm; stamp = now end
  if now > stamp then level = level + (now - stamp) * pm / 60000000 end
  if level > pm then level = pm end
  return level
end

local function tpm_write(key, pm, level, now)
  redis.call('HSET', key, 'l', fmt(level), 's', fmt(now))
  redis.call('PEXPIRE', key, math.floor((pm - level) * 60000 / pm) + 1)
end

-- Check both token quotas without taking anything. The day is Redis's UTC day.
local function tokens_check(tpm_key, day_prefix, amount, pm, pd, now, sec)
  local s = {level = 0, used = 0, minute_wait = 0, day_wait = 0}
  s.day = math.floor(sec / 86400)
  s.day_reset = (s.day + 1) * 86400000000 - now
  s.dkey = day_prefix .. ':' .. s.day
  if pm > 0 then
    s.level = tpm_read(tpm_key, pm, now)
    local need = math.min(amount, pm)
    if s.level + 1e-9 < need then s.minute_wait = math.ceil((need - s.level) * 60000000 / pm) end
  end
  if pd > 0 then
    s.used = tonumber(redis.call('GET', s.dkey) or '0')
    if s.used + math.min(amount, pd) > pd then s.day_wait = s.day_reset end
  end
  return s
end

-- Take both (after tokens_check passed); the reservation key makes the settle count once.
local function tokens_apply(s, tpm_key, rsv_key, amount, pm, pd, rsv_ttl, now)
  if pm > 0 then
    s.level = s.level - amount
    tpm_write(tpm_key, pm, s.level, now)
  end
  if pd > 0 then
    s.used = redis.call('INCRBY', s.dkey, amount)
    redis.call('PEXPIRE', s.dkey, math.floor(s.day_reset / 1000) + 3600000)
  end
  redis.call('SET', rsv_key, string.format('%d:%d', amount, s.day), 'PX', rsv_ttl)
end

-- {ok, quota (0 none, 1 per minute, 2 per day), wait_us, minute_left, minute_reset_us,
--  day_left, day_reset_us, day}
local function tokens_row(s, pm, pd)
  local ok, quota = 1, 0
  if s.minute_wait > 0 or s.day_wait > 0 then
    ok = 0
    if s.day_wait >= s.minute_wait then quota = 2 else quota = 1 end
  end
  local minute_reset = 0
  if pm > 0 then minute_reset = math.ceil((pm - s.level) * 60000000 / pm) end
  return {ok, quota, math.max(s.minute_wait, s.day_wait), math.floor(s.level + 1e-9),
          minute_reset, pd - s.used, s.day_reset, s.day}
end

-- Correct a reservation by actual - reserved, once: the first settle deletes its key.
local function settle(tpm_key, day_prefix, rsv_key, actual, pm, pd)
  local v = redis.call('GET', rsv_key)
  if not v then return 0 end
  redis.call('DEL', rsv_key)
  local sep = string.find(v, ':', 1, true)
  local reserved, day = tonumber(string.sub(v, 1, sep - 1)), string.sub(v, sep + 1)
  local delta = actual - reserved
  if delta == 0 then return 1 end
  if pm > 0 then
    local now = clock()
    local level = tpm_read(tpm_key, pm, now) - delta
    if level > pm then level = pm end
    tpm_write(tpm_key, pm, level, now)
  end
  if pd > 0 then
    local dkey = day_prefix .. ':' .. day
    if redis.call('EXISTS', dkey) == 1 then  -- a day long over is not touched
      if redis.call('INCRBY', dkey, delta) < 0 then redis.call('SET', dkey, 0, 'KEEPTTL') end
    end
  end
  return 1
end
"""

# KEYS: bucket. ARGV: rate_per_s, burst, n.
_RATE_LUA: Final = (
    _LIB_LUA
    + """
local now = clock()
return take_rate(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), now)
"""
)

# KEYS: stream set. ARGV: limit, ttl_ms, member. Acquire and renew are this one script.
_LEASE_LUA: Final = (
    _LIB_LUA
    + """
local now = clock()
if not lease_room(KEYS[1], tonumber(ARGV[1]), ARGV[3], now) then return 0 end
lease_add(KEYS[1], tonumber(ARGV[2]), ARGV[3], now)
return 1
"""
)

# KEYS: tpm bucket, day counter prefix, reservation. ARGV: amount, per_minute, per_day
# (0 = not enforced), reservation ttl ms.
_RESERVE_LUA: Final = (
    _LIB_LUA
    + """
local amount, pm, pd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, sec = clock()
local s = tokens_check(KEYS[1], KEYS[2], amount, pm, pd, now, sec)
if s.minute_wait == 0 and s.day_wait == 0 then
  tokens_apply(s, KEYS[1], KEYS[3], amount, pm, pd, ARGV[4], now)
end
return tokens_row(s, pm, pd)
"""
)

# KEYS: tpm bucket, day counter prefix, reservation. ARGV: actual, per_minute, per_day.
_SETTLE_LUA: Final = (
    _LIB_LUA
    + """
return settle(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
"""
)

# One round trip per admission. The request token is taken first (a refused call still
# counts as a request, so retrying a refused stream in a loop is rate limited); the stream
# slot and the tokens are then taken both or neither.
# A declared id's sub-bucket (KEYS[6], '' = none) is checked first without taking; the
# caller's bucket is then always charged, and the sub-bucket with it: both or neither.
# KEYS: bucket, stream set, tpm bucket, day prefix, reservation, sub-bucket.
# ARGV: rate_per_s, burst, n, stream limit (0 = no lease), lease ttl ms, lease member,
#       amount, per_minute, per_day (0 = not enforced; both 0 = no reservation), rsv ttl ms,
#       sub rate_per_s, sub burst.
# Returns {outcome (0 admitted, 1 rate, 2 streams, 3 tokens, 4 the sub-bucket's rate),
#          rate row (the tighter bucket's when admitted), tokens row or 0, rate row's burst}.
_ADMIT_LUA: Final = (
    _LIB_LUA
    + """
local now, sec = clock()
local n = tonumber(ARGV[3])
local sub, sub_rate, sub_burst = KEYS[6], tonumber(ARGV[11]), tonumber(ARGV[12])
if sub ~= '' then
  local peeked = peek_rate(sub, sub_rate, sub_burst, n, now)
  if peeked[1] == 0 then return {4, peeked, 0, sub_burst} end
end
local burst = tonumber(ARGV[2])
local rate = take_rate(KEYS[1], tonumber(ARGV[1]), burst, n, now)
if rate[1] == 0 then return {1, rate, 0, burst} end
if sub ~= '' then
  local inner = take_rate(sub, sub_rate, sub_burst, n, now)
  if inner[2] < rate[2] then rate = inner; burst = sub_burst end
end
local limit = tonumber(ARGV[4])
if limit > 0 and not lease_room(KEYS[2], limit, ARGV[6], now) then return {2, rate, 0, burst} end
local amount, pm, pd = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local row = 0
if pm > 0 or pd > 0 then
  local s = tokens_check(KEYS[3], KEYS[4], amount, pm, pd, now, sec)
  row = tokens_row(s, pm, pd)
  if row[1] == 0 then return {3, rate, row, burst} end
  tokens_apply(s, KEYS[3], KEYS[5], amount, pm, pd, ARGV[10], now)
  row = tokens_row(s, pm, pd)
end
if limit > 0 then lease_add(KEYS[2], tonumber(ARGV[5]), ARGV[6], now) end
return {0, rate, row, burst}
"""
)

# The end of a call: release its lease (member '' = none) and settle its reservation
# (reservation key '' = none), one round trip.
# KEYS: stream set, tpm bucket, day prefix, reservation. ARGV: member, actual, pm, pd.
_FINISH_LUA: Final = (
    _LIB_LUA
    + """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
if KEYS[4] ~= '' then
  settle(KEYS[2], KEYS[3], KEYS[4], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
end
return 1
"""
)


def client_from_url(url: str, *, connect_timeout_s: float = 1.0, **kwargs: Any) -> aioredis.Redis:
    """A redis.asyncio client for `url` (redis://, rediss://, unix://) that never retries
    by itself (the store bounds and handles every failure) and never waits long to connect."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=None,  # the store's own bounded wait applies to each call
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        **kwargs,
    )
    return client


def client_from_settings(r: RedisSettings) -> aioredis.Redis:
    """The client for the `redis` section (limits, stream buffer and cache alike)."""
    assert r.url is not None  # Settings refuses a redis backend without a url
    password = r.password.get_secret_value() if r.password is not None else None
    return client_from_url(
        r.url,
        connect_timeout_s=r.connect_timeout_s,
        **({"password": password} if password is not None else {}),
    )


class _AutoPipeline:
    """All of this process's admissions over one Redis connection, pipelined.

    Calls made while the previous batch is being written are sent together in one write,
    and replies are read in order by one reader task (Redis answers a connection's
    commands in order). redis-py still does the connection, AUTH/SELECT, TLS, command packing and
    reply parsing (hiredis): only the multiplexing is ours.

    Measured (bench/limits_cost.py, this 2-core box under load): ~70-110 us of CPU per
    call one at a time, ~22-33 us with 64 calls in flight, against ~150-170 us through
    redis-py's client and Script (connection pool per call). Most of what remains is the
    loopback send() and epoll themselves, which batching amortizes; a write straight
    from the caller (no writer task) measured the same, so the public API is kept.

    A caller that stops waiting (its bounded wait ran out) leaves its future cancelled;
    the reader still consumes its reply, so replies never go to the wrong caller. Any
    connection error fails every pending call and drops the connection; the next call
    opens a new one.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._outbox: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future resolves with its reply (or error)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._outbox.append((args, fut))
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        assert self._wake is not None
        self._wake.set()
        return fut

    async def _run(self) -> None:
        # redis-py leaves this one unannotated.
        conn = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        error: BaseException = ConnectionError("limits pipeline closed")
        try:
            await conn.connect()
            tasks = [
                loop.create_task(self._read_loop(conn)),
                loop.create_task(self._write_loop(conn)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    error = task.exception()  # type: ignore[assignment]
        except _FAILURES as exc:
            error = exc
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._task = None
            self._fail_all(error)
            await conn.disconnect(nowait=True)

    async def _write_loop(self, conn: Any) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            batch, self._outbox = self._outbox, []
            chunks: list[bytes] = []
            for args, fut in batch:
                if fut.done():  # its caller gave up before it was sent
                    continue
                chunks.extend(conn.pack_command(*args))
                self._waiting.append(fut)
            if chunks:
                await conn.send_packed_command(chunks, check_health=False)

    async def _read_loop(self, conn: Any) -> None:
        waiting = self._waiting
        while True:
            try:
                reply: Any = await conn.read_response(timeout=math.inf)
            except ResponseError as exc:  # an error reply: that call's, not the connection's
                reply = exc
            fut = waiting.popleft()
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def _fail_all(self, error: BaseException) -> None:
        pending = [fut for _, fut in self._outbox] + list(self._waiting)
        self._outbox.clear()
        self._waiting.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(ConnectionError(str(error) or type(error).__name__))

    async def reset(self) -> None:
        """Drop the connection and fail what is pending (e.g. Redis stopped answering)."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class RedisLimitStore:
    """The LimitStore on Redis. See the module docstring for keys, scripts and failures."""

    local: Final = False

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "aiproxy:limits:",
        timeout_s: float = 0.01,
        policy: Policy = "fail_open",
        processes: int = 1,
        lease_ttl_s: float = 10.0,
        reservation_ttl_s: float = 3600.0,
        probe_interval_s: float = 0.5,
        probe_timeout_s: float = 0.5,
        on_state: Callable[[bool], None] | None = None,
        fallback: MemoryLimitStore | None = None,
    ) -> None:
        if policy not in ("fail_open", "fail_closed"):
            raise ValueError(f"policy must be fail_open or fail_closed, got {policy!r}")
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        if not timeout_s > 0 or not lease_ttl_s > 0 or not probe_interval_s > 0:
            raise ValueError("timeout_s, lease_ttl_s and probe_interval_s must be positive")
        self._client = client
        self._prefix = prefix
        self._timeout = timeout_s
        self.policy: Policy = policy
        self._processes = processes
        self._lease_ttl_ms = max(1, round(lease_ttl_s * 1000))
        self._renew_every = lease_ttl_s / 3
        self._rsv_ttl_ms = max(1, round(reservation_ttl_s * 1000))
        self._probe_every = probe_interval_s
        self._probe_timeout = max(timeout_s, probe_timeout_s)
        self._on_state = on_state
        self._fallback = fallback or MemoryLimitStore(name=_FALLBACK)
        self._pipe = _AutoPipeline(client)
        self._rate = client.register_script(_RATE_LUA)
        self._lease = client.register_script(_LEASE_LUA)
        self._reserve = client.register_script(_RESERVE_LUA)
        self._settle = client.register_script(_SETTLE_LUA)
        self._admit = client.register_script(_ADMIT_LUA)
        self._finish = client.register_script(_FINISH_LUA)
        self._token = uuid.uuid4().hex[:16]  # this process's ids never collide with another's
        self._ids = itertools.count(1)
        self._held: dict[str, StreamLease] = {}  # lease id -> lease, renewed in batches
        self._pending: collections.deque[tuple[Reservation, int]] = collections.deque(
            maxlen=_MAX_PENDING_SETTLES
        )
        self._scaled_specs: dict[LimitSpec, LimitSpec] = {}
        self.healthy = True
        self._probe_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisLimitStore:
        return cls(client_from_url(url), **kwargs)

    async def _script(
        self,
        script: Any,
        keys: tuple[str, ...],
        args: tuple[Any, ...],
        timeout: float | None = None,
    ) -> Any:
        """One script call through the pipeline, bounded by the store's wait; EVAL once
        when Redis does not know the script (it restarted, or SCRIPT FLUSH)."""
        async with asyncio.timeout(timeout or self._timeout):
            try:
                return await self._pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await self._pipe.call("EVAL", script.script, len(keys), *keys, *args)

    async def _ping(self) -> None:
        """PING through the pipeline: success also means its connection is up again."""
        async with asyncio.timeout(self._probe_timeout):
            await self._pipe.call("PING")

    async def start(self) -> None:
        """Open the connection before the first admission (a cold connect takes a few
        round trips, more than one call's bounded wait). If Redis does not answer, the
        store starts degraded and recovers by itself: the proxy serves under its policy."""
        try:
            await self._ping()
        except _FAILURES as exc:
            self._degrade(exc)

    # -- state transitions

    def _degrade(self, exc: BaseException) -> None:
        """Called on a failed Redis call: the first one turns the store degraded."""
        if not self.healthy or self._closed:
            return
        self.healthy = False
        log.warning(
            "limits store degraded: redis unreachable (%s), policy %s",
            type(exc).__name__,
            self.policy,
            extra={"event": "limits_degraded", "policy": self.policy},
        )
        if self._on_state is not None:
            self._on_state(False)
        self._probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        await self._pipe.reset()  # replies that may never come are not waited for
        while not self._closed:
            await asyncio.sleep(self._probe_every)
            try:
                await self._ping()
            except _FAILURES:
                continue
            await self._replay_settles()
            self.healthy = True
            log.warning(
                "limits store healthy: redis reachable again",
                extra={"event": "limits_recovered", "policy": self.policy},
            )
            if self._on_state is not None:
                self._on_state(True)
            return

    async def _replay_settles(self) -> None:
        while self._pending:
            reservation, actual = self._pending[0]
            try:
                await self._run_settle(reservation, actual, self._probe_timeout)
            except _FAILURES:
                return  # still flaky: the next recovery replays the rest
            self._pending.popleft()

    def _unavailable(self) -> LimitsUnavailable:
        return LimitsUnavailable(retry_delay_s=self._probe_every)

    # -- request rate

    def _scaled(self, spec: LimitSpec) -> LimitSpec:
        scaled = self._scaled_specs.get(spec)
        if scaled is None:
            n = self._processes
            scaled = LimitSpec(spec.rate_per_s / n, max(1, math.ceil(spec.burst / n)))
            if len(self._scaled_specs) < 1024:
                self._scaled_specs[spec] = scaled
        return scaled

    async def take(self, key: str, spec: LimitSpec, n: int = 1) -> Decision:
        if not 1 <= n <= spec.burst:
            raise ValueError(f"n must be between 1 and the burst ({spec.burst}), got {n}")
        if self.healthy:
            try:
                allowed, remaining, retry_us, reset_us = await self._script(
                    self._rate,
                    (f"{self._prefix}rate:{key}",),
                    (repr(spec.rate_per_s), spec.burst, n),
                )
                return Decision(allowed == 1, remaining, retry_us / 1e6, reset_us / 1e6, spec.burst)
            except _FAILURES as exc:
                self._degrade(exc)
        if self.policy == "fail_closed":
            raise self._unavailable()
        scaled = self._scaled(spec)
        return self._fallback.take_nowait(key, scaled, min(n, scaled.burst))

    # -- stream leases

    async def acquire_stream(self, key: str, limit: int) -> StreamLease | None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if self.healthy:
            lease = StreamLease(f"{self._token}:{next(self._ids)}", key, limit, BACKEND)
            try:
                granted = await self._script(
                    self._lease,
                    (f"{self._prefix}streams:{key}",),
                    (limit, self._lease_ttl_ms, lease.id),
                )
            except _FAILURES as exc:
                # It may have been granted before the wait ran out: it lapses in one TTL.
                self._degrade(exc)
            else:
                if not granted:
                    return None
                self._held[lease.id] = lease
                self._ensure_renewer()
                return lease
        if self.policy == "fail_closed":
            raise self._unavailable()
        return self._fallback.acquire_stream_nowait(key, math.ceil(limit / self._processes))

    async def release_stream(self, lease: StreamLease) -> None:
        if lease.backend != BACKEND:
            self._fallback.release_stream_nowait(lease)
            return
        if lease.released:
            return
        lease.released = True
        self._held.pop(lease.id, None)
        if not self.healthy:
            return  # not renewed any more: it lapses within one TTL
        try:
            async with asyncio.timeout(self._timeout):
                await self._pipe.call("ZREM", f"{self._prefix}streams:{lease.key}", lease.id)
        except _FAILURES as exc:
            self._degrade(exc)

    def _ensure_renewer(self) -> None:
        if self._renew_task is None or self._renew_task.done():
            self._renew_task = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        """Renew every held lease, in one pipelined round trip per interval; ends when
        none is held (the next acquire starts it again)."""
        while self._held and not self._closed:
            await asyncio.sleep(self._renew_every)
            if not self.healthy or not self._held:
                continue
            leases = list(self._held.values())
            try:
                # One batch: the pipeline sends these in one write.
                await asyncio.gather(
                    *(
                        self._script(
                            self._lease,
                            (f"{self._prefix}streams:{lease.key}",),
                            (lease.limit, self._lease_ttl_ms, lease.id),
                            timeout=max(self._probe_timeout, self._timeout),
                        )
                        for lease in leases
                    )
                )
            except _FAILURES as exc:
                self._degrade(exc)
        # A lease that lapsed while Redis was away and finds its key full again is not
        # re-granted: the stream goes on (ending a live stream would be worse), and its
        # caller is over the limit by that one stream until it ends.

    # -- tokens

    def _scaled_limits(self, limits: TokenLimits) -> TokenLimits:
        n = self._processes
        return TokenLimits(
            None if limits.per_minute is None else math.ceil(limits.per_minute / n),
            None if limits.per_day is None else math.ceil(limits.per_day / n),
        )

    async def reserve_tokens(
        self, key: str, amount: int, limits: TokenLimits, *, budget_key: str | None = None
    ) -> Reservation | TokenRejection:
        if amount < 0:
            raise ValueError(f"amount must not be negative, got {amount}")
        budget_key = budget_key or key
        if not limits.enforced:  # nothing to count: no round trip
            return self._fallback.reserve_tokens_nowait(key, amount, limits, budget_key=budget_key)
        if self.healthy:
            rid = f"{self._token}:{next(self._ids)}"
            try:
                row = await self._script(
                    self._reserve,
                    (
                        f"{self._prefix}tpm:{key}",
                        f"{self._prefix}day:{budget_key}",
                        f"{self._prefix}rsv:{rid}",
                    ),
                    (amount, limits.per_minute or 0, limits.per_day or 0, self._rsv_ttl_ms),
                )
            except _FAILURES as exc:
                self._degrade(exc)
            else:
                ok, quota, wait_us, m_left, m_reset_us, d_left, d_reset_us, day = row
                budget = TokenBudget(
                    limits.per_minute,
                    m_left if limits.per_minute is not None else 0,
                    m_reset_us / 1e6 if limits.per_minute is not None else 0.0,
                    limits.per_day,
                    d_left if limits.per_day is not None else 0,
                    d_reset_us / 1e6 if limits.per_day is not None else 0.0,
                )
                if not ok:
                    which = TOKENS_PER_DAY if quota == 2 else TOKENS_PER_MINUTE
                    return TokenRejection(which, wait_us / 1e6, budget)
                return Reservation(rid, key, budget_key, amount, limits, day, budget, BACKEND)
        if self.policy == "fail_closed":
            raise self._unavailable()
        return self._fallback.reserve_tokens_nowait(
            key, amount, self._scaled_limits(limits), budget_key=budget_key
        )

    async def _run_settle(
        self, reservation: Reservation, actual: int, timeout: float | None = None
    ) -> None:
        await self._script(
            self._settle,
            (
                f"{self._prefix}tpm:{reservation.key}",
                f"{self._prefix}day:{reservation.budget_key}",
                f"{self._prefix}rsv:{reservation.id}",
            ),
            (max(0, actual), reservation.limits.per_minute or 0, reservation.limits.per_day or 0),
            timeout,
        )

    async def settle_tokens(self, reservation: Reservation, actual: int) -> None:
        if reservation.backend != BACKEND:
            self._fallback.settle_tokens_nowait(reservation, actual)
            return
        if reservation.settled:
            return
        reservation.settled = True
        # Run even when actual == reserved: the settle deletes the reservation key, which
        # would otherwise hold memory in Redis for reservation_ttl_s.
        if self.healthy:
            try:
                await self._run_settle(reservation, actual)
                return
            except _FAILURES as exc:
                self._degrade(exc)
        self._pending.append((reservation, actual))  # replayed on recovery, counted once

    # -- one round trip per call at each end

    def _token_budget(self, limits: TokenLimits, row: Any) -> TokenBudget:
        _, _, _, m_left, m_reset_us, d_left, d_reset_us, _ = row
        return TokenBudget(
            limits.per_minute,
            m_left if limits.per_minute is not None else 0,
            m_reset_us / 1e6 if limits.per_minute is not None else 0.0,
            limits.per_day,
            d_left if limits.per_day is not None else 0,
            d_reset_us / 1e6 if limits.per_day is not None else 0.0,
        )

    async def admit(
        self,
        key: str,
        spec: LimitSpec,
        *,
        stream_limit: int = 0,
        tokens: int = 0,
        token_limits: TokenLimits | None = None,
        budget_key: str | None = None,
        sub_key: str | None = None,
        sub_spec: LimitSpec | None = None,
    ) -> Admission:
        if stream_limit < 0 or tokens < 0:
            raise ValueError("stream_limit and tokens must not be negative")
        budget_key = budget_key or key
        reserve = token_limits is not None and token_limits.enforced
        limits = token_limits if token_limits is not None else TokenLimits()
        if self.healthy:
            uid = f"{self._token}:{next(self._ids)}"
            p = self._prefix
            try:
                sub = sub_key is not None and sub_spec is not None
                outcome, rate_row, token_row, burst = await self._script(
                    self._admit,
                    (
                        f"{p}rate:{key}",
                        f"{p}streams:{key}",
                        f"{p}tpm:{key}",
                        f"{p}day:{budget_key}",
                        f"{p}rsv:{uid}",
                        f"{p}rate:{sub_key}" if sub else "",
                    ),
                    (
                        repr(spec.rate_per_s),
                        spec.burst,
                        1,
                        stream_limit,
                        self._lease_ttl_ms,
                        uid,
                        tokens,
                        limits.per_minute or 0,
                        limits.per_day or 0,
                        self._rsv_ttl_ms,
                        repr(sub_spec.rate_per_s) if sub_spec is not None else 0,
                        sub_spec.burst if sub_spec is not None else 0,
                    ),
                )
            except _FAILURES as exc:
                self._degrade(exc)
            else:
                allowed, remaining, retry_us, reset_us = rate_row
                decision = Decision(allowed == 1, remaining, retry_us / 1e6, reset_us / 1e6, burst)
                if outcome == 1:
                    return Admission(decision, "rate", stream_limit=stream_limit)
                if outcome == 4:
                    return Admission(
                        decision, "rate", stream_limit=stream_limit, refused_key=sub_key or ""
                    )
                if outcome == 2:
                    return Admission(decision, "streams", stream_limit=stream_limit)
                reservation = rejection = None
                if reserve:
                    budget = self._token_budget(limits, token_row)
                    if outcome == 3:
                        quota = TOKENS_PER_DAY if token_row[1] == 2 else TOKENS_PER_MINUTE
                        rejection = TokenRejection(quota, token_row[2] / 1e6, budget)
                        return Admission(decision, quota, None, None, rejection, stream_limit)
                    reservation = Reservation(
                        uid, key, budget_key, tokens, limits, token_row[7], budget, BACKEND
                    )
                lease = None
                if stream_limit:
                    lease = StreamLease(uid, key, stream_limit, BACKEND)
                    self._held[uid] = lease
                    self._ensure_renewer()
                return Admission(decision, None, lease, reservation, None, stream_limit)
        if self.policy == "fail_closed":
            raise self._unavailable()
        n = self._processes
        return self._fallback.admit_nowait(
            key,
            self._scaled(spec),
            stream_limit=math.ceil(stream_limit / n) if stream_limit else 0,
            tokens=tokens,
            token_limits=self._scaled_limits(limits) if reserve else None,
            budget_key=budget_key,
            sub_key=sub_key,
            sub_spec=self._scaled(sub_spec) if sub_spec is not None else None,
        )

    async def finish(
        self, lease: StreamLease | None, reservation: Reservation | None, actual_tokens: int = 0
    ) -> None:
        # Whatever the fallback holds is the fallback's; the rest goes in one script.
        if lease is not None and (lease.backend != BACKEND or lease.released):
            await self.release_stream(lease)
            lease = None
        if reservation is not None and (reservation.backend != BACKEND or reservation.settled):
            await self.settle_tokens(reservation, actual_tokens)
            reservation = None
        if lease is None and reservation is None:
            return
        if lease is not None:
            lease.released = True
            self._held.pop(lease.id, None)
        if reservation is not None:
            reservation.settled = True
        if self.healthy:
            p = self._prefix
            limits = reservation.limits if reservation is not None else TokenLimits()
            try:
                await self._script(
                    self._finish,
                    (
                        f"{p}streams:{lease.key}" if lease is not None else "",
                        f"{p}tpm:{reservation.key}" if reservation is not None else "",
                        f"{p}day:{reservation.budget_key}" if reservation is not None else "",
                        f"{p}rsv:{reservation.id}" if reservation is not None else "",
                    ),
                    (
                        lease.id if lease is not None else "",
                        max(0, actual_tokens),
                        limits.per_minute or 0,
                        limits.per_day or 0,
                    ),
                )
                return
            except _FAILURES as exc:
                self._degrade(exc)
        # The lease is no longer renewed, so it lapses; the settle is replayed on recovery.
        if reservation is not None:
            self._pending.append((reservation, actual_tokens))

    # -- lifecycle

    async def aclose(self) -> None:
        """Stop the background tasks and close the connections. Leases still held are
        released first (bounded), so a replica that shuts down cleanly frees its callers'
        slots at once instead of after one TTL. A second call does nothing."""
        if self._closed:
            return
        held, self._held = list(self._held.values()), {}
        if held and self.healthy:
            try:
                async with asyncio.timeout(self._probe_timeout):
                    await asyncio.gather(
                        *(
                            self._pipe.call("ZREM", f"{self._prefix}streams:{lease.key}", lease.id)
                            for lease in held
                        )
                    )
            except _FAILURES:
                pass  # they lapse within one TTL
        self._closed = True
        for task in (self._probe_task, self._renew_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        await self._pipe.reset()
        await self._client.aclose()
