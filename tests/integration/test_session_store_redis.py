"""The agent's Redis session store against a real redis-server (agent/sessions.py):
atomic appends from two clients, the bounds, the TTL, and what Redis going away does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from aiproxy.agent.sessions import (
    Bounds,
    MemorySessionStore,
    RedisSessionStore,
    SessionStore,
    SessionStoreUnavailable,
)
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.support.waiting import eventually

USER, ASSISTANT, SYSTEM = 2, 3, 1


@pytest.fixture
async def two_stores(
    redis_server: RedisServer,  # noqa: F811
) -> AsyncIterator[tuple[RedisSessionStore, RedisSessionStore]]:
    """Two replicas' stores on one Redis."""
    bounds = Bounds(max_sessions=50, max_messages=200, max_chars=64, ttl_s=60)
    # A generous bound: 40 appends at once open 40 connections on a loaded 2-core box.
    a = RedisSessionStore(redis_server.url, bounds, timeout_s=3.0)
    b = RedisSessionStore(redis_server.url, bounds, timeout_s=3.0)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def test_two_replicas_appending_at_once_lose_nothing(two_stores) -> None:
    a, b = two_stores
    await a.create("owner\x00s")

    async def turn(store: SessionStore, n: int) -> None:
        await store.append("owner\x00s", [(USER, f"q{n}"), (ASSISTANT, f"a{n}")], replace=False)

    await asyncio.gather(*(turn(a if n % 2 else b, n) for n in range(40)))
    messages = await b.load("owner\x00s")
    assert messages is not None and len(messages) == 80
    # Every turn is there once, its question and answer adjacent.
    pairs = [(messages[i], messages[i + 1]) for i in range(0, 80, 2)]
    assert sorted(q[1] for q, _ in pairs) == sorted(f"q{n}" for n in range(40))
    assert all(q[1][1:] == ans[1][1:] and ans[0] == ASSISTANT for q, ans in pairs)


async def test_scoped_keys_and_the_session_api_semantics(two_stores) -> None:
    a, b = two_stores
    assert await a.load("alice\x00s1") is None  # never existed
    await a.create("alice\x00s1")
    assert await b.load("alice\x00s1") == ()  # created: exists, empty, on every replica
    assert await b.load("mallory\x00s1") is None  # the same id, another owner
    assert not await b.delete("mallory\x00s1")
    await b.append("alice\x00s1", [(USER, "hello: world")], replace=False)
    assert await a.load("alice\x00s1") == ((USER, "hello: world"),)  # ":" in content is kept
    assert await a.delete("alice\x00s1")
    assert await b.load("alice\x00s1") is None and not await b.delete("alice\x00s1")


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_both_stores_bound_messages_and_characters_alike(
    kind: str,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    bounds = Bounds(max_sessions=10, max_messages=4, max_chars=5, ttl_s=60)
    store: SessionStore = (
        MemorySessionStore(bounds)
        if kind == "memory"
        else RedisSessionStore(redis_server.url, bounds, timeout_s=0.5)
    )
    try:
        await store.append("k", [(SYSTEM, "be brief please"), (USER, "one")], replace=False)
        for n in ("two", "three", "four"):
            await store.append("k", [(USER, n)], replace=False)
        # Four at most, the leading system message kept, content cut at five characters.
        assert await store.load("k") == (
            (SYSTEM, "be br"),
            (USER, "two"),
            (USER, "three"),
            (USER, "four"),
        )
        await store.append("k", [(USER, "replaced")], replace=True)
        assert await store.load("k") == ((USER, "repla"),)
        await store.append(
            "j", [(USER, "a"), (USER, "b"), (USER, "c"), (USER, "d"), (USER, "e")], replace=False
        )
        assert await store.load("j") == ((USER, "b"), (USER, "c"), (USER, "d"), (USER, "e"))
    finally:
        await store.aclose()


async def test_the_least_recently_written_sessions_go_past_the_bound(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    store = RedisSessionStore(
        redis_server.url, Bounds(max_sessions=3, max_messages=10, ttl_s=60), timeout_s=0.5
    )
    try:
        for n in range(5):
            await store.append(f"k{n}", [(USER, str(n))], replace=False)
        assert [await store.load(f"k{n}") is not None for n in range(5)] == [
            False,
            False,
            True,
            True,
            True,
        ]
        await store.create("k5")  # creating counts too
        assert await store.load("k2") is None and await store.load("k5") == ()
    finally:
        await store.aclose()


def _three_per_owner(kind: str, redis_server: RedisServer) -> SessionStore:  # noqa: F811
    bounds = Bounds(max_sessions=100, max_sessions_per_owner=3, ttl_s=60)
    if kind == "memory":
        return MemorySessionStore(bounds)
    return RedisSessionStore(redis_server.url, bounds, timeout_s=0.5)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_one_owner_making_sessions_pushes_out_its_own_not_everyones(
    kind: str,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    store = _three_per_owner(kind, redis_server)
    try:
        await store.append("alice\x00mine", [(USER, "keep me")], replace=False)
        for n in range(10):
            await store.create(f"mallory\x00s{n}")
        assert await store.load("alice\x00mine") == ((USER, "keep me"),)
        alive = [n for n in range(10) if await store.load(f"mallory\x00s{n}") is not None]
        assert alive == [7, 8, 9]
        assert await store.delete("mallory\x00s8")
        await store.create("mallory\x00s10")  # room again: nothing else goes
        assert [await store.load(f"mallory\x00s{n}") is not None for n in (7, 9, 10)] == [
            True,
            True,
            True,
        ]
    finally:
        await store.aclose()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_anonymous_callers_at_two_addresses_each_push_out_only_their_own(
    kind: str,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """One owner ("anonymous"), two quotas (two callers' addresses): one caller making
    sessions in a loop pushes out its own oldest, never the other's; a session written
    last by the other counts to the other (and leaves the first's count), and deleting
    it frees that place."""
    store = _three_per_owner(kind, redis_server)
    try:
        await store.append("anonymous\x00alice", [(USER, "keep me")], replace=False, quota="qa")
        for n in range(10):
            await store.create(f"anonymous\x00m{n}", "qm")
        assert await store.load("anonymous\x00alice") == ((USER, "keep me"),)
        alive = [n for n in range(10) if await store.load(f"anonymous\x00m{n}") is not None]
        assert alive == [7, 8, 9]
        # qa writes one of qm's: it counts to qa now, so qm has room for one more.
        await store.append("anonymous\x00m7", [(USER, "mine now")], replace=False, quota="qa")
        await store.create("anonymous\x00m10", "qm")
        assert [await store.load(f"anonymous\x00m{n}") is not None for n in (7, 8, 9, 10)] == [
            True, True, True, True,
        ]  # fmt: skip
        # qa's count: alice, m7 (2 of 3): two more of its own push out alice only.
        await store.create("anonymous\x00a1", "qa")
        await store.create("anonymous\x00a2", "qa")
        assert await store.load("anonymous\x00alice") is None
        assert await store.load("anonymous\x00m7") is not None
        assert await store.delete("anonymous\x00m7")  # leaves qa's count
        await store.create("anonymous\x00a3", "qa")
        assert [await store.load(f"anonymous\x00a{n}") is not None for n in (1, 2, 3)] == [
            True, True, True,
        ]  # fmt: skip
    finally:
        await store.aclose()


async def test_the_ttl_runs_from_the_last_turn(redis_server: RedisServer) -> None:  # noqa: F811
    # Margins of 0.4 s either side of the expiry (a loaded box oversleeps by tens of ms);
    # the end is waited for as a state, not slept past.
    store = RedisSessionStore(redis_server.url, Bounds(ttl_s=1.0), timeout_s=0.5)
    try:
        await store.append("k", [(USER, "a")], replace=False)
        await asyncio.sleep(0.6)
        await store.append("k", [(USER, "b")], replace=False)  # refreshed: now until +1.6 s
        await asyncio.sleep(0.6)  # past the first turn's expiry (+1.0 s)
        assert await store.load("k") == ((USER, "a"), (USER, "b"))

        async def expired() -> bool:
            return await store.load("k") is None

        await eventually(expired, 5, "the session expired a TTL after its last turn")
    finally:
        await store.aclose()


async def test_redis_down_or_hung_is_unavailable_and_it_recovers_by_itself(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    store = RedisSessionStore(redis_server.url, Bounds(), timeout_s=0.3)
    try:
        await store.append("k", [(USER, "kept")], replace=False)
        redis_server.pause()  # a hung host: every call waits its bound, then fails
        try:
            for op in (store.load("k"), store.append("k", [(USER, "x")], replace=False)):
                with pytest.raises(SessionStoreUnavailable):
                    await op
        finally:
            redis_server.resume()
        assert await store.load("k") == ((USER, "kept"),)  # no restart, history intact

        redis_server.stop()  # gone: refused at once
        with pytest.raises(SessionStoreUnavailable):
            await store.load("k")
        with pytest.raises(SessionStoreUnavailable):
            await store.create("k2")
        redis_server.start()  # back on the same port (empty: persistence is off here)
        assert await store.load("k") is None
        await store.append("k", [(USER, "again")], replace=False)
        assert await store.load("k") == ((USER, "again"),)
    finally:
        await store.aclose()


async def test_an_append_sent_twice_is_applied_once(redis_server: RedisServer) -> None:  # noqa: F811
    """What makes retrying an append safe (a reply lost with the connection): its id."""
    store = RedisSessionStore(redis_server.url, Bounds(), timeout_s=0.5)
    try:
        member, keys = store._keys("k")
        args = [*store._common(member), 100, 0, "append-1", b"2:q", b"3:a"]
        assert await store._append(keys=keys, args=args) == 2
        assert await store._append(keys=keys, args=args) == -1  # the same append again
        assert await store.load("k") == ((USER, "q"), (ASSISTANT, "a"))
        assert await store.delete("k")
        assert await store._append(keys=keys, args=args) == 2  # deleted: its ids went too
    finally:
        await store.aclose()


async def test_a_redis_restart_while_idle_costs_no_failed_call(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    store = RedisSessionStore(redis_server.url, Bounds(), timeout_s=0.5)
    try:
        await store.append("k", [(USER, "before")], replace=False)
        redis_server.stop()
        redis_server.start()  # the pooled connection is now closed by the other side
        assert await store.load("k") is None  # (persistence is off here)
        await store.append("k", [(USER, "after")], replace=False)
        assert await store.load("k") == ((USER, "after"),)
    finally:
        await store.aclose()
