"""Chat sessions: whose they are, where they are kept, how they are bounded.

Scope. Every session is stored under its owner and its id together (`scoped_key`, from
aiproxy.core.sessions): the owner is request metadata `x-aiproxy-session-owner`, which
the proxy sets from the caller's verified identity (and drops when a caller sends it).
The agent trusts that header because it listens behind the proxy only: a private
address, and mutual TLS with the proxy's client certificate where configured
(`--tls-client-ca`). A call without it (a direct caller, a test) is "anonymous", like a
caller of a proxy without auth. Another owner naming the same id reaches another,
empty conversation; its GetSession / DeleteSession is NOT_FOUND SESSION_NOT_FOUND, the
same answer as for an id that never existed.

Stores (`--sessions`): `memory`, this process only (the embedded default: replicas do not
share it), or `redis` (`--redis-url`), shared by every replica, so a conversation
survives the replica that served it and any replica can answer its next turn.

Order. A turn reads the conversation when it starts and, once its answer is complete,
appends its user message and the answer together, in one atomic step (Redis: one Lua
script, RPUSH + trim + expiry). So two turns of one session at once, on two replicas,
never lose a message: both pairs are kept, each pair adjacent, in the order the turns
finished; neither turn saw the other's question (each answered the conversation as it
was when it started). A turn that fails or is cancelled before its answer is complete
leaves no trace. A request that sends `messages` replaces the conversation with them
(plus its answer) instead of appending: the last such turn wins, as a replacement does.

Bounds, on every axis, so no caller grows the store without limit: characters per
message (longer content is cut), messages per session (the oldest are dropped, a
leading system message kept), sessions per owner and sessions in all (the least
recently written are dropped: one caller making sessions in a loop pushes out its own
first; anonymous callers, who share one owner, are counted per address as the proxy names
it in x-aiproxy-session-quota, the last writer's), and a TTL refreshed by every turn
(CreateSession sets it; reads do not).

Failures. A store that cannot answer (Redis down, slow past `--session-store-timeout-s`)
fails the call with UNAVAILABLE, ErrorInfo SESSION_STORE_UNAVAILABLE and RetryInfo: never
a silent new conversation, never an answer that is not remembered (a stream whose final
write fails ends with that error instead of its final chunk). Nothing is cached or
retried here: the next call tries Redis again, so the agent recovers by itself when it
comes back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from aiproxy.agent.errors import StatusError, rpc_status_proto
from aiproxy.agent.logs import log_event
from aiproxy.core.headers import SESSION_OWNER_HEADER, SESSION_QUOTA_HEADER
from aiproxy.core.sessions import ANONYMOUS_OWNER, scoped_key

log = logging.getLogger("agent.sessions")

# (role, content); role is the ai.agent.v1.ChatRole number.
Message = tuple[int, str]

SYSTEM_ROLE: Final = 1  # ai.agent.v1.CHAT_ROLE_SYSTEM
STORES: Final = ("memory", "redis")
DOMAIN: Final = "agent.aiproxy.sessions"
# What a caller is told to wait when the store is down.
STORE_RETRY_DELAY_S: Final = 1.0
# An owner longer than this, or not printable, is not the proxy's: refused.
MAX_OWNER_CHARS: Final = 256
DEFAULT_TTL_S: Final = 24 * 3600.0
DEFAULT_KEY_PREFIX: Final = "aiproxy:agent:sessions:"

Clock = Callable[[], float]


def new_session_id() -> str:
    """A fresh session id: 128 random bits, URL-safe (the id is the capability when
    callers are anonymous)."""
    return "sess_" + secrets.token_urlsafe(16)


class SessionNotFound(StatusError):
    code_name = "NOT_FOUND"
    reason = "SESSION_NOT_FOUND"

    def to_status(self) -> status_pb2.Status:
        return rpc_status_proto(
            code_pb2.NOT_FOUND,
            "session not found",
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN),
        )


class SessionStoreUnavailable(StatusError):
    code_name = "UNAVAILABLE"
    reason = "SESSION_STORE_UNAVAILABLE"

    def to_status(self) -> status_pb2.Status:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(STORE_RETRY_DELAY_S * 1000))
        return rpc_status_proto(
            code_pb2.UNAVAILABLE,
            "session store unavailable",
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN),
            error_details_pb2.RetryInfo(retry_delay=delay),
        )


def owner_part(key: str) -> str:
    """The owner of a scoped key (core/sessions.scoped_key: owner, NUL, session id)."""
    return key.partition("\x00")[0]


def owner_of(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The owner the proxy named for this call ("anonymous" when none did)."""
    for key, value in metadata or ():
        if key == SESSION_OWNER_HEADER and isinstance(value, str):
            if not value or len(value) > MAX_OWNER_CHARS or not value.isprintable():
                return ANONYMOUS_OWNER  # not what the proxy sends: no scope of its own
            return value
    return ANONYMOUS_OWNER


def quota_of(metadata: Iterable[tuple[str, Any]] | None, owner: str) -> str:
    """Whose count the sessions this call writes go to, for max_sessions_per_owner: what
    the proxy named (for an anonymous caller, a hash of its address: anonymous callers
    share one owner, not one bound), else the owner itself."""
    for key, value in metadata or ():
        if key == SESSION_QUOTA_HEADER and isinstance(value, str):
            if not value or len(value) > MAX_OWNER_CHARS or not value.isprintable():
                return owner
            return value
    return owner


@dataclass(frozen=True, slots=True)
class Bounds:
    max_sessions: int = 10_000
    max_messages: int = 100
    max_chars: int = 8192
    ttl_s: float = DEFAULT_TTL_S
    # One owner's sessions: past it, that owner's least recently written goes, so one
    # caller making sessions in a loop pushes out its own, not everyone's. Counted per
    # quota (`quota_of`): the owner, or for anonymous callers (who share one owner) the
    # caller's address as the proxy names it, so they do not share this bound either.
    max_sessions_per_owner: int = 1000

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_messages < 2 or self.max_chars < 1:
            raise ValueError("session limits must be positive (and max_messages >= 2)")
        if self.max_sessions_per_owner < 1:
            raise ValueError("max_sessions_per_owner must be at least 1")
        if not self.ttl_s > 0:
            raise ValueError("the session TTL must be positive")


def bounded(messages: Sequence[Message], bounds: Bounds) -> list[Message]:
    """`messages` within the bounds: each cut to max_chars, the oldest dropped past
    max_messages (a leading system message kept: it frames everything that follows)."""
    out = [(role, content[: bounds.max_chars]) for role, content in messages]
    if len(out) > bounds.max_messages:
        if out[0][0] == SYSTEM_ROLE:
            out = [out[0], *out[-(bounds.max_messages - 1) :]]
        else:
            out = out[-bounds.max_messages :]
    return out


class SessionStore(Protocol):
    """Where conversations are kept; keys are `scoped_key(owner, session_id)`."""

    bounds: Bounds
    kind: str

    async def create(self, key: str, quota: str | None = None) -> None:
        """An empty conversation (it exists: GetSession answers it). `quota`: whose count
        it goes to for max_sessions_per_owner (None: its owner's)."""

    async def load(self, key: str) -> tuple[Message, ...] | None:
        """The conversation, oldest first; None when there is none by that key."""

    async def append(
        self, key: str, messages: Sequence[Message], *, replace: bool, quota: str | None = None
    ) -> None:
        """Add `messages` at the end (replace: instead of what was there), atomically;
        creates the conversation when needed; refreshes its TTL. The session then counts
        to `quota` (None: its owner), the last writer's."""

    async def delete(self, key: str) -> bool:
        """Forget the conversation; False when there was none."""

    async def aclose(self) -> None: ...


class MemorySessionStore:
    """This process's conversations: the least recently written dropped past
    max_sessions (as in Redis: reads change nothing), a TTL per entry, on an injected clock.

    Single-threaded (one event loop): each method is one synchronous step, so appends
    never interleave."""

    kind = "memory"

    def __init__(self, bounds: Bounds | None = None, clock: Clock = time.monotonic) -> None:
        self.bounds = bounds or Bounds()
        self._clock = clock
        self._sessions: OrderedDict[str, tuple[list[Message], float]] = OrderedDict()
        # Each quota's keys, least recently written first (the per-owner bound), and the
        # quota each key counts to now (its last writer's).
        self._owners: dict[str, OrderedDict[str, None]] = {}
        self._quota_of: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def _drop(self, key: str) -> None:
        self._sessions.pop(key, None)
        self._uncount(key)

    def _uncount(self, key: str) -> None:
        quota = self._quota_of.pop(key, None)
        if quota is None:
            return
        mine = self._owners.get(quota)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._owners[quota]

    def _live(self, key: str) -> list[Message] | None:
        entry = self._sessions.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            self._drop(key)
            return None
        return entry[0]

    def _store(self, key: str, messages: list[Message], quota: str | None) -> None:
        self._sessions[key] = (messages, self._clock() + self.bounds.ttl_s)
        self._sessions.move_to_end(key)
        quota = quota or owner_part(key)
        if self._quota_of.get(key, quota) != quota:
            self._uncount(key)  # written by another caller now: it counts to that one
        self._quota_of[key] = quota
        mine = self._owners.setdefault(quota, OrderedDict())
        mine[key] = None
        mine.move_to_end(key)
        while len(mine) > self.bounds.max_sessions_per_owner:
            self._drop(next(iter(mine)))
        while len(self._sessions) > self.bounds.max_sessions:
            self._drop(next(iter(self._sessions)))

    async def create(self, key: str, quota: str | None = None) -> None:
        self._store(key, [], quota)

    async def load(self, key: str) -> tuple[Message, ...] | None:
        messages = self._live(key)
        return None if messages is None else tuple(messages)

    async def append(
        self, key: str, messages: Sequence[Message], *, replace: bool, quota: str | None = None
    ) -> None:
        kept = [] if replace else (self._live(key) or [])
        self._store(key, bounded([*kept, *messages], self.bounds), quota)

    async def delete(self, key: str) -> bool:
        if self._live(key) is None:
            return False
        self._drop(key)
        return True

    async def aclose(self) -> None:
        return None


# --- Redis ----------------------------------------------------------------------------
#
# Per session (hash tag = the session's hash, so both keys would share a Cluster slot):
#   {prefix}{<h>}:l   the messages, a list, oldest first, each "<role>:<content>"
#   {prefix}{<h>}:e   the marker that the session exists (a created session has no list)
#   {prefix}{<h>}:t   the ids of its last appends (a retried append is applied once)
#   {prefix}{<h>}:q   the name of the owner index it counts in now (its last writer's)
# and, for the bounds on sessions, the sorted sets {prefix}index (every session) and
# {prefix}owner:<quota hash> (one owner's, or for anonymous callers one address's: see
# Bounds), member <h>, score the order of its last write
# (the counter {prefix}index:seq). <h> is the first 128 bits of SHA-256 over the scoped key: no owner or id in
# Redis. The index spans sessions, so this store wants one Redis (a primary, replicas
# allowed), not a Cluster.

# The session becomes the most recently written, in the index and in its owner's index
# (score: the next number of one counter, so two writes in one millisecond still have an
# order), then the least recently written go, with their keys: the owner's past
# max_sessions_per_owner, everyone's past max_sessions. Sessions that expired by
# themselves, or that the other bound took, stay in an index until then; they are the
# least recently written of it (a write refreshes the TTL), so they go first and never
# push a live session out. An owner's index expires with its last session.
_BOUND_LUA: Final = """
local function trim(index, prefix, max)
  local over = redis.call('ZCARD', index) - max
  if over > 0 then
    local old = redis.call('ZPOPMIN', index, over)
    for i = 1, #old, 2 do
      local base = prefix .. '{' .. old[i] .. '}'
      redis.call('DEL', base .. ':l', base .. ':e', base .. ':t', base .. ':q')
    end
  end
end
local function bound(index, owner_index, quota_key, prefix, member, ttl, max, max_owner)
  local seq = redis.call('INCR', index .. ':seq')
  redis.call('ZADD', index, seq, member)
  -- Written by another caller than last time: it leaves that caller's count.
  local was = redis.call('GET', quota_key)
  if was and was ~= owner_index then redis.call('ZREM', was, member) end
  redis.call('SET', quota_key, owner_index, 'PX', ttl)
  redis.call('ZADD', owner_index, seq, member)
  redis.call('PEXPIRE', owner_index, ttl)
  trim(owner_index, prefix, max_owner)
  trim(index, prefix, max)
  return seq
end
"""

# KEYS: list, marker, index, owner index, applied appends, quota pointer. ARGV: prefix,
# member, ttl_ms, max_sessions, max_sessions_per_owner.
_CREATE_LUA: Final = (
    _BOUND_LUA
    + """
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], 1, 'PX', ARGV[3])
bound(KEYS[3], KEYS[4], KEYS[6], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
return 1
"""
)

# KEYS: list, marker, index, owner index, applied appends, quota pointer. ARGV: prefix,
# member, ttl_ms, max_sessions, max_sessions_per_owner, max_messages, replace (0/1), append id, then the
# encoded messages. An append id already applied is not applied again (-1): a retry after
# a lost reply never adds a turn twice. The last 32 ids are kept.
_APPEND_LUA: Final = (
    _BOUND_LUA
    + """
if redis.call('ZSCORE', KEYS[5], ARGV[8]) then return -1 end
if ARGV[7] == '1' then redis.call('DEL', KEYS[1]) end
local n = 0
for i = 9, #ARGV do n = redis.call('RPUSH', KEYS[1], ARGV[i]) end
local max = tonumber(ARGV[6])
if n > max then
  local first = redis.call('LINDEX', KEYS[1], 0)
  if string.sub(first, 1, 2) == '1:' then
    redis.call('LTRIM', KEYS[1], n - max + 1, -1)
    redis.call('LPUSH', KEYS[1], first)
  else
    redis.call('LTRIM', KEYS[1], n - max, -1)
  end
end
redis.call('SET', KEYS[2], 1, 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local seq = bound(KEYS[3], KEYS[4], KEYS[6], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
redis.call('ZADD', KEYS[5], seq, ARGV[8])
redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -33)
redis.call('PEXPIRE', KEYS[5], ARGV[3])
return n
"""
)

# KEYS: list, marker. {exists, messages}.
_LOAD_LUA: Final = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, {}} end
return {1, redis.call('LRANGE', KEYS[1], 0, -1)}
"""

# KEYS: list, marker, index, owner index, applied appends, quota pointer. ARGV: member.
# 1 when the session existed.
_DELETE_LUA: Final = """
local existed = redis.call('DEL', KEYS[2])
local was = redis.call('GET', KEYS[6])
if was then redis.call('ZREM', was, ARGV[1]) end
redis.call('DEL', KEYS[1], KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return existed
"""


def _digest(text: str) -> str:
    """128 bits of SHA-256, hex: a key name that reveals no owner or session id."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _encode(message: Message) -> bytes:
    role, content = message
    return f"{role}:{content}".encode()


def _decode(item: bytes) -> Message:
    role, _, content = item.decode("utf-8", errors="replace").partition(":")
    return int(role), content


class RedisSessionStore:
    """The conversations of every replica, in one Redis (see the module docstring).

    Each operation is one Lua script (one round trip, atomic), bounded by `timeout_s`;
    any failure raises SessionStoreUnavailable. A call that finds its pooled connection
    closed (Redis restarted meanwhile) is sent once more on a new one, within the same
    bound; redis-py's client never retries by itself. Nothing here remembers that Redis
    was down, except one log line when it goes ("session_store_degraded") and one when
    it is back."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        bounds: Bounds | None = None,
        *,
        timeout_s: float = 1.0,
        key_prefix: str = DEFAULT_KEY_PREFIX,
    ) -> None:
        self.bounds = bounds or Bounds()
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._failures: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._create = self._client.register_script(_CREATE_LUA)
        self._append = self._client.register_script(_APPEND_LUA)
        self._load = self._client.register_script(_LOAD_LUA)
        self._delete = self._client.register_script(_DELETE_LUA)
        self._degraded = False

    def _keys(self, key: str, quota: str | None = None) -> tuple[str, list[str]]:
        member = _digest(key)
        base = f"{self._prefix}{{{member}}}"
        owner_index = f"{self._prefix}owner:{_digest(quota or owner_part(key))}"
        return member, [
            f"{base}:l",
            f"{base}:e",
            f"{self._prefix}index",
            owner_index,
            f"{base}:t",
            f"{base}:q",
        ]

    def _common(self, member: str) -> list[Any]:
        b = self.bounds
        return [
            self._prefix,
            member,
            max(1, int(b.ttl_s * 1000)),
            b.max_sessions,
            b.max_sessions_per_owner,
        ]

    async def _run(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    result = await script(keys=keys, args=args)
                except RedisConnectionError:
                    # A pooled connection the server closed (Redis restarted while this
                    # process was idle): once more, on a new connection, within the same
                    # bound. Safe for every script: an append carries its id (applied once).
                    result = await script(keys=keys, args=args)
        except self._failures as exc:
            if not self._degraded:
                self._degraded = True
                log_event(
                    log,
                    "session_store_degraded",
                    logging.WARNING,
                    op=op,
                    error=type(exc).__name__,
                )
            raise SessionStoreUnavailable() from None
        if self._degraded:
            self._degraded = False
            log_event(log, "session_store_healthy", op=op)
        return result

    async def create(self, key: str, quota: str | None = None) -> None:
        member, keys = self._keys(key, quota)
        await self._run("create", self._create, keys, self._common(member))

    async def load(self, key: str) -> tuple[Message, ...] | None:
        _, keys = self._keys(key)
        exists, items = await self._run("load", self._load, keys[:2], [])
        if not exists:
            return None
        return tuple(_decode(item) for item in items)

    async def append(
        self, key: str, messages: Sequence[Message], *, replace: bool, quota: str | None = None
    ) -> None:
        member, keys = self._keys(key, quota)
        b = self.bounds
        encoded = [_encode(m) for m in bounded(messages, b)]
        append_id = secrets.token_hex(8)
        args = [*self._common(member), b.max_messages, 1 if replace else 0, append_id, *encoded]
        await self._run("append", self._append, keys, args)

    async def delete(self, key: str) -> bool:
        member, keys = self._keys(key)
        return bool(await self._run("delete", self._delete, keys, [member]))

    async def aclose(self) -> None:
        await self._client.aclose()


def build_store(
    kind: str, bounds: Bounds, *, redis_url: str | None = None, timeout_s: float = 1.0
) -> SessionStore:
    if kind == "redis":
        if not redis_url:
            raise ValueError("--sessions redis needs --redis-url")
        return RedisSessionStore(redis_url, bounds, timeout_s=timeout_s)
    if kind != "memory":
        raise ValueError(f"sessions must be one of {', '.join(STORES)}, got {kind!r}")
    return MemorySessionStore(bounds)


# --- the modelled prefix cache ---------------------------------------------------------


class PrefixCache:
    """What a model server's prefix cache (vLLM's automatic prefix caching) would hold
    on this replica: per session, how many tokens of its conversation are cached.

    LRU bounded in tokens. A turn's prompt extends its session's previous prompt and
    answer, so only the tokens past the cached count need prefill (`uncached`); the
    turn then caches its whole sequence, prompt and answer (`remember`). A replica
    that never served the session, or evicted it, prefills everything."""

    def __init__(self, max_tokens: int = 1_000_000) -> None:
        if max_tokens < 1:
            raise ValueError("the prefix cache needs room for at least one token")
        self.max_tokens = max_tokens
        self._tokens = 0
        self._entries: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def uncached(self, key: str, prompt_tokens: int) -> int:
        return max(0, prompt_tokens - self._entries.get(key, 0))

    def remember(self, key: str, tokens: int) -> None:
        self._tokens -= self._entries.pop(key, 0)
        tokens = min(max(0, tokens), self.max_tokens)
        self._entries[key] = tokens
        self._tokens += tokens
        while self._tokens > self.max_tokens:
            _, dropped = self._entries.popitem(last=False)
            self._tokens -= dropped


@dataclass(slots=True)
class Turn:
    """One chat call's conversation: whose, which, what it read at its start."""

    key: str  # scoped_key(owner, session_id)
    quota: str  # whose count it goes to (quota_of)
    session_id: str
    history: list[Message]  # the conversation for the prompt, this turn's message(s) last
    new: list[Message]  # what the turn adds when it completes (before the answer)
    replace: bool  # the request sent `messages`: they replace the stored conversation


class Conversations:
    """The agent's sessions, scoped by owner: what the handlers use."""

    def __init__(self, store: SessionStore, prefix_cache: PrefixCache | None = None) -> None:
        self.store = store
        self.prefix_cache = prefix_cache or PrefixCache()

    @staticmethod
    def key(metadata: Iterable[tuple[str, Any]] | None, session_id: str) -> str:
        return scoped_key(owner_of(metadata), session_id)

    async def begin(
        self,
        metadata: Iterable[tuple[str, Any]] | None,
        session_id: str,
        messages: Sequence[Message],
        user_message: str,
        user_role: int,
    ) -> Turn:
        """Read the conversation a turn continues (none when `messages` replace it)."""
        session_id = session_id or new_session_id()
        key = self.key(metadata, session_id)
        if messages:
            history = [*messages]
            new = [*messages]
        else:
            history = list(await self.store.load(key) or ())
            new = []
        if user_message:
            history.append((user_role, user_message))
            new.append((user_role, user_message))
        quota = quota_of(metadata, owner_of(metadata))
        return Turn(key, quota, session_id, history, new, replace=bool(messages))

    async def finish(self, turn: Turn, answer: Message) -> None:
        """Remember the turn: its message(s) and the answer, in one atomic append."""
        await self.store.append(
            turn.key, [*turn.new, answer], replace=turn.replace, quota=turn.quota
        )

    async def create(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        session_id = new_session_id()
        quota = quota_of(metadata, owner_of(metadata))
        await self.store.create(self.key(metadata, session_id), quota)
        return session_id

    async def get(
        self, metadata: Iterable[tuple[str, Any]] | None, session_id: str
    ) -> tuple[Message, ...]:
        messages = await self.store.load(self.key(metadata, session_id))
        if messages is None:
            raise SessionNotFound()
        return messages

    async def delete(self, metadata: Iterable[tuple[str, Any]] | None, session_id: str) -> None:
        if not await self.store.delete(self.key(metadata, session_id)):
            raise SessionNotFound()
