"""Where the upstream endpoints are: static addresses and DNS names re-resolved.

An entry of `upstream.endpoints` is `HOST:PORT`. An IP literal is used as it is; a name
is resolved now and every `upstream.dns_refresh_s` after, and the pool follows the
answer (the Kubernetes headless-service case: one A record per ready pod). Endpoints
that disappear from the answer are retired; their calls in flight finish.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

from aiproxy.core.logs import log_event
from aiproxy.core.settings import parse_hostport

log = logging.getLogger("aiproxy.discovery")

# (host, port) -> the IP addresses it resolves to now.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Discovery:
    """Resolves the configured entries and hands the pool the resulting address set."""

    def __init__(
        self,
        entries: list[str],
        apply: Callable[[list[str]], Awaitable[None]],
        *,
        refresh_s: float,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._entries = [parse_hostport(e) for e in entries]
        self._apply = apply
        self._refresh_s = refresh_s
        self._resolver = resolver
        self._last: dict[tuple[str, int], list[str]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def dynamic(self) -> bool:
        return any(not _is_ip(host) and host != "localhost" for host, _ in self._entries)

    async def start(self) -> None:
        await self.refresh()
        if self.dynamic:
            self._task = asyncio.create_task(self._loop(), name="dns-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def refresh(self) -> list[str]:
        addresses: list[str] = []
        for host, port in self._entries:
            if _is_ip(host) or host == "localhost":
                # localhost stays a name: grpc resolves it (v4 or v6) itself.
                addresses.append(
                    format_address(host, port) if host != "localhost" else f"localhost:{port}"
                )
                continue
            try:
                ips = await self._resolver(host, port)
            except (OSError, socket.gaierror) as exc:
                # Keep the last good answer: a DNS hiccup must not empty the pool.
                ips = self._last.get((host, port), [])
                log_event(
                    log,
                    "dns_resolve_failed",
                    level=logging.WARNING,
                    host=host,
                    error=str(exc),
                    kept=len(ips),
                )
            if ips != self._last.get((host, port)):
                log_event(log, "dns_resolved", host=host, port=port, addresses=ips)
            self._last[(host, port)] = ips
            addresses.extend(format_address(ip, port) for ip in ips)
        await self._apply(addresses)
        return addresses

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception:  # never let the refresher die: the pool would freeze
                log.exception("dns refresh failed")
