"""Where the upstream endpoints are: static addresses, DNS names re-resolved, Consul.

An entry of `upstream.endpoints` is `HOST:PORT`, `consul://HOST:PORT/SERVICE[?tag=T&dc=D]`
or `srv://_SERVICE._PROTO.NAME[?nameserver=HOST:PORT]`. An IP literal is used as it is; a
name is resolved now and every `upstream.dns_refresh_s` after, and the pool follows the
answer (the Kubernetes headless-service case: one A record per ready pod); so is an SRV
name (srv.py). A Consul entry is followed with blocking queries (consul.py). The pool gets
the union of all entries' addresses. Endpoints that disappear from the answer are retired;
their calls in flight finish. A source that fails keeps its last good answer and reports
itself down (`on_status`, the ai_proxy_discovery_* metrics).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiproxy.core.logs import log_event
from aiproxy.core.settings import parse_hostport
from aiproxy.server.pool.consul import ConsulTarget, ConsulWatch, is_consul
from aiproxy.server.pool.srv import SrvTarget, is_srv, resolve_srv

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
        consul_options: dict[str, Any] | None = None,
    ) -> None:
        self._entries = [parse_hostport(e) for e in entries if not is_consul(e) and not is_srv(e)]
        self._srv = [SrvTarget.parse(e) for e in entries if is_srv(e)]
        self._srv_last: dict[str, list[str]] = {}
        self._apply = apply
        self._refresh_s = refresh_s
        self._resolver = resolver
        self._last: dict[tuple[str, int], list[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._status_listeners: list[Callable[[str, bool], None]] = []
        # The last addresses of the DNS/static entries; Consul's are in each watch.
        self._resolved: list[str] = []
        self._apply_lock = asyncio.Lock()
        self.consul = [
            ConsulWatch(
                ConsulTarget.parse(e),
                self._consul_changed,
                on_status=self._status,
                **(consul_options or {}),
            )
            for e in entries
            if is_consul(e)
        ]

    @property
    def dynamic(self) -> bool:
        return bool(self._srv) or any(
            not _is_ip(host) and host != "localhost" for host, _ in self._entries
        )

    def add_status_listener(self, listener: Callable[[str, bool], None]) -> None:
        """`listener(source, up)` after each resolution or query of a dynamic source."""
        self._status_listeners.append(listener)

    def _status(self, source: str, up: bool) -> None:
        for listener in self._status_listeners:
            listener(source, up)

    async def start(self) -> None:
        for watch in self.consul:
            await watch.query()  # an unreachable Consul at start: empty, retried below
        await self.refresh()
        if self.dynamic:
            self._tasks.append(asyncio.create_task(self._loop(), name="dns-refresh"))
        for watch in self.consul:
            self._tasks.append(asyncio.create_task(watch.run(), name="consul-watch"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for watch in self.consul:
            await watch.aclose()

    async def _consul_changed(self, _addresses: list[str]) -> None:
        if self._tasks:  # after start(): start() publishes the first union itself
            await self._publish()

    async def _publish(self) -> list[str]:
        async with self._apply_lock:
            addresses = list(self._resolved)
            for watch in self.consul:
                addresses.extend(watch.addresses or [])
            addresses = list(dict.fromkeys(addresses))
            await self._apply(addresses)
            return addresses

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
                self._status(f"dns://{host}:{port}", True)
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
                self._status(f"dns://{host}:{port}", False)
            if ips != self._last.get((host, port)):
                log_event(log, "dns_resolved", host=host, port=port, addresses=ips)
            self._last[(host, port)] = ips
            addresses.extend(format_address(ip, port) for ip in ips)
        for target in self._srv:
            addresses.extend(await self._resolve_srv(target))
        self._resolved = addresses
        return await self._publish()

    async def _resolve_srv(self, target: SrvTarget) -> list[str]:
        try:
            found = [format_address(host, port) for host, port in await resolve_srv(target)]
            self._status(target.source, True)
        except OSError as exc:
            found = self._srv_last.get(target.name, [])
            log_event(
                log,
                "srv_resolve_failed",
                level=logging.WARNING,
                name=target.name,
                error=str(exc),
                kept=len(found),
            )
            self._status(target.source, False)
        if found != self._srv_last.get(target.name):
            log_event(log, "srv_resolved", name=target.name, addresses=found)
        self._srv_last[target.name] = found
        return found

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception:  # never let the refresher die: the pool would freeze
                log.exception("dns refresh failed")
