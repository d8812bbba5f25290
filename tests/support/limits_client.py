"""A separate process using the Redis limits store, for the cross-process tests.

    python -m tests.support.limits_client take URL KEY RATE BURST START_AT SECONDS
    python -m tests.support.limits_client reserve URL KEY AMOUNT PER_DAY START_AT N
    python -m tests.support.limits_client hold URL KEY LIMIT TTL_S

`take` hammers KEY's bucket from START_AT (epoch seconds, so processes start together)
for SECONDS and prints {"allowed": n, "calls": n, "start": t, "end": t}. `reserve` fires N
concurrent reservations at START_AT and prints {"admitted": n}. `hold` takes LIMIT leases,
prints {"held": n} and keeps them (renewing) until it is killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiproxy.core.limitstore import Reservation, TokenLimits
from aiproxy.core.ratelimit import LimitSpec
from aiproxy.server.stores.redis_limits import RedisLimitStore


async def _wait_until(start_at: float) -> None:
    await asyncio.sleep(max(0.0, start_at - time.time()))


async def take(
    url: str, key: str, rate: float, burst: int, start_at: float, seconds: float
) -> None:
    store = RedisLimitStore.from_url(url, timeout_s=2.0)
    await store.start()
    spec = LimitSpec(rate, burst)
    allowed = calls = 0
    await _wait_until(start_at)
    start = time.time()
    while time.time() - start < seconds:
        decision = await store.take(key, spec)
        calls += 1
        allowed += decision.allowed
        await asyncio.sleep(0.002)  # bounded load on a shared machine
    end = time.time()
    assert store.healthy
    await store.aclose()
    print(json.dumps({"allowed": allowed, "calls": calls, "start": start, "end": end}))


async def reserve(url: str, key: str, amount: int, per_day: int, start_at: float, n: int) -> None:
    store = RedisLimitStore.from_url(url, timeout_s=2.0)
    await store.start()
    limits = TokenLimits(per_minute=None, per_day=per_day)
    await _wait_until(start_at)
    results = await asyncio.gather(*(store.reserve_tokens(key, amount, limits) for _ in range(n)))
    assert store.healthy
    await store.aclose()
    print(json.dumps({"admitted": sum(isinstance(r, Reservation) for r in results)}))


async def hold(url: str, key: str, limit: int, ttl_s: float) -> None:
    store = RedisLimitStore.from_url(url, timeout_s=2.0, lease_ttl_s=ttl_s)
    await store.start()
    leases = [await store.acquire_stream(key, limit) for _ in range(limit)]
    print(json.dumps({"held": sum(lease is not None for lease in leases)}), flush=True)
    await asyncio.Event().wait()  # until killed: the store renews in the background


def main() -> None:
    mode, url, key, *rest = sys.argv[1:]
    if mode == "take":
        asyncio.run(take(url, key, float(rest[0]), int(rest[1]), float(rest[2]), float(rest[3])))
    elif mode == "reserve":
        asyncio.run(reserve(url, key, int(rest[0]), int(rest[1]), float(rest[2]), int(rest[3])))
    elif mode == "hold":
        asyncio.run(hold(url, key, int(rest[0]), float(rest[1])))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
