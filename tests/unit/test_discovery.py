"""Discovery: names re-resolved on a timer, IP literals as they are, DNS failures tolerated.

The resolver is the seam (a fake answer table); the refresh loop is the real one.
"""

from __future__ import annotations

import asyncio
import socket

from aiproxy.server.pool.discovery import Discovery


class FakeDns:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.fail = False

    async def __call__(self, host: str, port: int) -> list[str]:
        if self.fail:
            raise socket.gaierror("temporary failure in name resolution")
        return list(self.answers[host])


async def test_names_are_re_resolved_and_the_pool_follows() -> None:
    dns = FakeDns({"agents.svc": ["10.0.0.1", "10.0.0.2"]})
    applied: list[list[str]] = []
    changed = asyncio.Event()

    async def apply(addresses: list[str]) -> None:
        applied.append(addresses)
        changed.set()

    discovery = Discovery(
        ["agents.svc:50052", "127.0.0.9:7000"], apply, refresh_s=0.02, resolver=dns
    )
    await discovery.start()
    assert applied[-1] == ["10.0.0.1:50052", "10.0.0.2:50052", "127.0.0.9:7000"]

    dns.answers["agents.svc"] = ["10.0.0.2", "10.0.0.3", "fd00::7"]
    for _ in range(100):
        changed.clear()
        await asyncio.wait_for(changed.wait(), 1)
        if "10.0.0.3:50052" in applied[-1]:
            break
    assert applied[-1] == ["10.0.0.2:50052", "10.0.0.3:50052", "[fd00::7]:50052", "127.0.0.9:7000"]

    # A failing resolver keeps the last good answer instead of emptying the pool.
    dns.fail = True
    assert await discovery.refresh() == [
        "10.0.0.2:50052",
        "10.0.0.3:50052",
        "[fd00::7]:50052",
        "127.0.0.9:7000",
    ]
    await discovery.stop()


async def test_static_addresses_need_no_refresher() -> None:
    applied: list[list[str]] = []

    async def apply(addresses: list[str]) -> None:
        applied.append(addresses)

    discovery = Discovery(["127.0.0.1:1", "localhost:2", "[::1]:3"], apply, refresh_s=0.01)
    assert not discovery.dynamic
    await discovery.start()
    assert applied == [["127.0.0.1:1", "localhost:2", "[::1]:3"]]
    await discovery.stop()
