"""Consul discovery: `consul://HOST:PORT/SERVICE[?tag=T&dc=D]` as an upstream entry.

The target form is the one Go's grpc-consul-resolver made familiar. The healthy instances
come from Consul's health API, `GET /v1/health/service/SERVICE?passing` (an instance is
listed only while every one of its checks passes), followed with blocking queries: the
request carries `index` (the `X-Consul-Index` of the previous answer) and `wait`, and Consul
holds it until the answer may have changed or `wait` passes. A change therefore reaches
the pool as soon as Consul has it (one round trip), without polling.

The rules Consul's documentation gives for blocking queries ("Blocking Queries",
implementation details) and how they are kept here:
- a return is no proof of a change (timeout, idempotent write): the set is compared and
  the pool told only when it differs;
- the index can go backwards (a snapshot restore, a new leader's view, a Raft reset): when
  `X-Consul-Index` is lower than the index sent, the answer is used and the index reset to
  0, so the next query is a plain read that gets a fresh index;
- the index must stay above zero (an index of 0 makes every query return at once, a busy
  loop): one below 1 is used as 1;
- the loop is rate limited: queries start at least `min_interval_s` apart, and failures
  back off (doubling up to `max_backoff_s`).

Consul unreachable (connection refused, timeout, an HTTP error, an answer that is not the
documented JSON): the pool keeps the last known set, a `consul_unreachable` log line says
so (once per outage, with what is kept), `on_status` is told (the telemetry turns it into
`ai_proxy_discovery_up{source}` 0 and `ai_proxy_discovery_errors_total{source}`), and the
query is retried with backoff; `consul_recovered` when it answers again. Instances that
leave the answer are retired by the pool like DNS removals: no new calls, the calls in
flight finish.

The ACL token is read from `CONSUL_HTTP_TOKEN` (Consul's own variable) and sent as
`X-Consul-Token`; never from the target, argv or a config file, and never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from aiproxy.core.logs import log_event

log = logging.getLogger("aiproxy.discovery")

TOKEN_ENV = "CONSUL_HTTP_TOKEN"
SCHEME = "consul://"


def _format(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True)
class ConsulTarget:
    """One `consul://HOST:PORT/SERVICE[?tag=T&dc=D]` entry."""

    host: str
    port: int
    service: str
    tag: str | None = None
    dc: str | None = None

    @classmethod
    def parse(cls, entry: str) -> ConsulTarget:
        if not entry.startswith(SCHEME):
            raise ValueError(f"expected {SCHEME}HOST:PORT/SERVICE, got {entry!r}")
        url = urllib.parse.urlsplit(entry)
        service = url.path.strip("/")
        if not url.hostname or not url.port or not service or "/" in service:
            raise ValueError(f"expected {SCHEME}HOST:PORT/SERVICE[?tag=T&dc=D], got {entry!r}")
        if url.username or url.password:
            raise ValueError(f"no credentials in a Consul target: use ${TOKEN_ENV} ({entry!r})")
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True, strict_parsing=False)
        unknown = set(query) - {"tag", "dc"}
        if unknown:
            raise ValueError(f"unknown Consul target parameters {sorted(unknown)} in {entry!r}")
        tag = query.get("tag", [None])[-1] or None
        dc = query.get("dc", [None])[-1] or None
        return cls(url.hostname, url.port, service, tag, dc)

    @property
    def name(self) -> str:
        """The label this source carries in logs and metrics (no secret in it)."""
        return f"consul://{_format(self.host, self.port)}/{self.service}"

    @property
    def url(self) -> str:
        return f"http://{_format(self.host, self.port)}/v1/health/service/{urllib.parse.quote(self.service, safe='')}"


def is_consul(entry: str) -> bool:
    return entry.startswith(SCHEME)


def addresses_from_health(entries: Any) -> list[str]:
    """HOST:PORT of each instance in a /v1/health/service answer. An instance's address is
    its service address, or its node's when the service registered none (Consul's rule)."""
    if not isinstance(entries, list):
        raise ValueError("a list of health entries expected")
    out: list[str] = []
    for entry in entries:
        service = entry["Service"]
        address = service.get("Address") or entry["Node"]["Address"]
        port = int(service["Port"])
        if not address or not 0 < port < 65536:
            raise ValueError(f"instance without an address or port: {service.get('ID')!r}")
        out.append(_format(str(address), port))
    return sorted(set(out))


class ConsulWatch:
    """Follows one Consul service with blocking queries; calls `on_change` with its set of
    addresses whenever it differs from the last one (and once at the first answer)."""

    def __init__(
        self,
        target: ConsulTarget,
        on_change: Callable[[list[str]], Awaitable[None]],
        *,
        on_status: Callable[[str, bool], None] | None = None,
        wait_s: float = 300.0,
        min_interval_s: float = 0.05,
        initial_backoff_s: float = 0.25,
        max_backoff_s: float = 5.0,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self._on_change = on_change
        self._on_status = on_status
        self._wait_s = wait_s
        self._min_interval_s = min_interval_s
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self._headers = {"X-Consul-Token": token} if token else {}
        self._transport = transport
        self._clock = clock
        self.index = 0
        # None until Consul has answered once.
        self.addresses: list[str] | None = None
        self.up = False
        self.errors = 0
        self.last_error: str | None = None
        self._client: httpx.AsyncClient | None = None

    def _client_for(self) -> httpx.AsyncClient:
        if self._client is None:
            # The read timeout covers the blocking wait plus Consul's jitter (wait / 16).
            self._client = httpx.AsyncClient(
                transport=self._transport,
                headers=self._headers,
                timeout=httpx.Timeout(self._wait_s * 1.1 + 5.0, connect=2.0),
                trust_env=False,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def query(self) -> bool:
        """One (blocking, once an index is known) query; True when Consul answered. The
        pool is told when the set changed."""
        params: dict[str, str] = {"passing": "1"}
        if self.target.tag:
            params["tag"] = self.target.tag
        if self.target.dc:
            params["dc"] = self.target.dc
        sent = self.index
        if sent > 0:
            params["index"] = str(sent)
            params["wait"] = f"{self._wait_s:g}s"
        try:
            reply = await self._client_for().get(self.target.url, params=params)
            if reply.status_code != 200:
                raise ValueError(f"HTTP {reply.status_code}: {reply.text[:200].strip()}")
            addresses = addresses_from_health(reply.json())
            new_index = int(reply.headers.get("X-Consul-Index", "0"))
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self._failed(exc)
            return False
        if new_index < sent:
            new_index = 0  # went backwards: the next query re-reads without blocking
        elif new_index < 1:
            new_index = 1  # never 0: it would make every query return at once
        self.index = new_index
        if not self.up:
            self.up = True
            if self.errors:
                log_event(log, "consul_recovered", source=self.target.name, addresses=addresses)
            if self._on_status is not None:
                self._on_status(self.target.name, True)
        if addresses != self.addresses:
            log_event(
                log,
                "consul_resolved",
                source=self.target.name,
                index=new_index,
                addresses=addresses,
            )
            self.addresses = addresses
            await self._on_change(addresses)
        return True

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if self.up or self.errors == 1:
            log_event(
                log,
                "consul_unreachable",
                level=logging.WARNING,
                source=self.target.name,
                error=self.last_error,
                kept=len(self.addresses or []),
                kept_addresses=self.addresses or [],
            )
        self.up = False
        if self._on_status is not None:
            self._on_status(self.target.name, False)

    async def run(self) -> None:
        """Query until cancelled (the first query is `query()`'s caller's, at start)."""
        backoff = self._initial_backoff_s
        while True:
            started = self._clock()
            ok = await self.query()
            if ok:
                backoff = self._initial_backoff_s
                pause = self._min_interval_s - (self._clock() - started)
            else:
                pause, backoff = backoff, min(backoff * 2, self._max_backoff_s)
            if pause > 0:
                await asyncio.sleep(pause)
