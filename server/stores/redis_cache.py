"""The response cache's shared level (L2) on Redis: replicas share answers.

One key per answer (`{prefix}<sha256>`), the encoded Entry as value, `SET ... PX` with
the entry's TTL; a lookup is `GET` and `PTTL` sent together (one write, one round trip)
so the L1 copy a hit makes expires when the shared one does. Both go over the one
pipelined connection of server/stores/redis_limits.py (`_AutoPipeline`).

Fail-open: every call is bounded by `timeout_s`; a failure or timeout is a miss (get) or
a no-op (set), so the proxy serves from L1 and the upstream. The first failure logs one
line ("degraded") and, for `probe_interval_s`, no call touches Redis (no wait per call
while it is away); the first success after that logs one line ("healthy").

Entries over `max_value_bytes` are not sent (a huge answer would cost every replica a
large read and Redis memory; L1 keeps its own bound).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import redis.asyncio as aioredis

from aiproxy.server.stores.redis_limits import _FAILURES, _AutoPipeline, client_from_url

log = logging.getLogger("aiproxy.cache")

DEFAULT_MAX_VALUE_BYTES: Final = 1 << 20


class RedisL2:
    """The L2Cache Protocol (core/cache.py) on Redis."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "aiproxy:cache:",
        timeout_s: float = 0.02,
        probe_interval_s: float = 1.0,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        if timeout_s <= 0 or probe_interval_s <= 0 or max_value_bytes < 1:
            raise ValueError("timeout_s, probe_interval_s and max_value_bytes must be positive")
        self._client = client
        self._prefix = prefix
        self._timeout = timeout_s
        self._probe_every = probe_interval_s
        self.max_value_bytes = max_value_bytes
        self._pipe = _AutoPipeline(client)
        self.healthy = True
        self._down_since = 0.0
        self._reset_task: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisL2:
        return cls(client_from_url(url), **kwargs)

    def _skip(self) -> bool:
        """While degraded, try Redis again only once per probe interval."""
        if self.healthy:
            return False
        if time.monotonic() - self._down_since < self._probe_every:
            return True
        self._down_since = time.monotonic()  # this call is the probe; others skip
        return False

    def _degrade(self, exc: BaseException) -> None:
        self._down_since = time.monotonic()
        if self.healthy:
            self.healthy = False
            log.warning(
                "response cache L2 degraded: redis unreachable (%s); serving from L1 only",
                type(exc).__name__,
                extra={"event": "cache_l2_degraded"},
            )
            self._reset_task = asyncio.get_running_loop().create_task(self._pipe.reset())

    def _recover(self) -> None:
        if not self.healthy:
            self.healthy = True
            log.warning("response cache L2 healthy again", extra={"event": "cache_l2_recovered"})

    async def get(self, key: str) -> tuple[bytes, float] | None:
        if self._skip():
            return None
        name = self._prefix + key
        try:
            async with asyncio.timeout(self._timeout):
                value, pttl = await asyncio.gather(
                    self._pipe.call("GET", name), self._pipe.call("PTTL", name)
                )
        except _FAILURES as exc:
            self._degrade(exc)
            return None
        self._recover()
        if value is None or pttl is None or pttl <= 0:
            return None  # absent, or expiring between the two commands
        return value, pttl / 1000

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if ttl_s <= 0 or len(value) > self.max_value_bytes or self._skip():
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._pipe.call("SET", self._prefix + key, value, "PX", int(ttl_s * 1000))
        except _FAILURES as exc:
            self._degrade(exc)
            return
        self._recover()

    async def aclose(self) -> None:
        if self._reset_task is not None:
            await asyncio.gather(self._reset_task, return_exceptions=True)
        await self._pipe.reset()
        await self._client.aclose()
