"""A small fake of Consul's HTTP health API, for discovery tests (no Consul binary can be
installed here: no Debian package, no wheel).

What it follows, from Consul's API documentation:
- `GET /v1/health/service/:service` answers a JSON list of `{"Node": {...}, "Service":
  {...}, "Checks": [...]}`; `?passing` keeps only instances whose checks all pass; `?tag=`
  keeps instances with that tag; `?dc=` names the datacenter (another one: 500, "No path
  to datacenter"); an instance's `Service.Address` may be empty (then the node's applies).
- Blocking queries: every answer carries `X-Consul-Index`; a request with `index=N` below
  the current index answers at once, else it is held until the index passes N or `wait`
  (default 5 minutes, at most 10) plus a jitter of up to wait/16 has passed, then answers
  the (perhaps unchanged) state with the current index. A request whose index is above
  the current one (the index went backwards) is held too, as Consul holds it.
- ACL: with a token configured, a request without `X-Consul-Token` set to it gets 403
  "ACL not found".

It runs on the test's event loop (asyncio.start_server, HTTP/1.1 with keep-alive) on
127.0.0.1 port 0; `stop()` / `start(port)` simulate an outage on the same address;
`set_index()` simulates an index that goes backwards (a snapshot restore).
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.parse
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Instance:
    id: str
    address: str
    port: int
    passing: bool = True
    tags: list[str] = field(default_factory=list)
    node_address: str = "127.0.0.1"


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    token: str | None


class FakeConsul:
    def __init__(self, service: str, *, datacenter: str = "dc1", token: str | None = None) -> None:
        self.service = service
        self.datacenter = datacenter
        self.token = token
        self.instances: dict[str, Instance] = {}
        self.index = 10
        self.requests: list[Seen] = []
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> FakeConsul:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener and every open connection (Consul gone)."""
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    # -- state changes (each one a Raft write: the index moves on) ------------------------

    async def _bump(self) -> None:
        async with self._changed:
            self.index += 1
            self._changed.notify_all()

    async def register(self, instance: Instance) -> None:
        self.instances[instance.id] = instance
        await self._bump()

    async def deregister(self, instance_id: str) -> None:
        self.instances.pop(instance_id, None)
        await self._bump()

    async def set_passing(self, instance_id: str, passing: bool) -> None:
        self.instances[instance_id].passing = passing
        await self._bump()

    async def touch(self) -> None:
        """A write that changes nothing this query sees (Consul still moves the index)."""
        await self._bump()

    async def set_index(self, index: int) -> None:
        async with self._changed:
            self.index = index
            self._changed.notify_all()

    # -- HTTP ---------------------------------------------------------------------------

    def _entries(self, query: dict[str, str]) -> list[dict[str, Any]]:
        out = []
        for inst in self.instances.values():
            if "passing" in query and not inst.passing:
                continue
            if "tag" in query and query["tag"] not in inst.tags:
                continue
            status = "passing" if inst.passing else "critical"
            out.append({
                "Node": {"Node": f"node-{inst.id}", "Address": inst.node_address, "Datacenter": self.datacenter},
                "Service": {"ID": inst.id, "Service": self.service, "Tags": inst.tags, "Address": inst.address, "Port": inst.port},
                "Checks": [{"CheckID": f"service:{inst.id}", "Status": status, "ServiceID": inst.id}],
            })  # fmt: skip
        return out

    async def _answer(
        self, path: str, query: dict[str, str], token: str | None
    ) -> tuple[int, bytes]:
        if self.token is not None and token != self.token:
            return 403, b"ACL not found"
        if path != f"/v1/health/service/{self.service}":
            return 200, b"[]" if path.startswith("/v1/health/service/") else b""
        if query.get("dc", self.datacenter) != self.datacenter:
            return 500, b"No path to datacenter"
        wanted = int(query.get("index", "0") or 0)
        if wanted and wanted >= self.index:
            wait = _duration(query.get("wait", "5m"))
            wait = min(wait, 600.0)
            wait += random.uniform(0, wait / 16)
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self.index > wanted), wait
                    )
                except TimeoutError:
                    pass
        return 200, json.dumps(self._entries(query)).encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                url = urllib.parse.urlsplit(target)
                query = {
                    k: v[-1]
                    for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()
                }
                token = headers.get("x-consul-token")
                self.requests.append(Seen(url.path, query, token))
                status, body = await self._answer(url.path, query, token)
                reason = {200: "OK", 403: "Forbidden", 500: "Internal Server Error"}[status]
                ctype = "application/json" if status == 200 else "text/plain"
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                    f"X-Consul-Index: {self.index}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()


def _duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


class ConsulThread:
    """A FakeConsul on an event loop of its own thread, driven with plain calls: a test can
    block (starting processes waits synchronously) while the fake keeps answering."""

    def __init__(self, service: str, **kwargs: Any) -> None:
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.fake: FakeConsul = self.call(self._make(service, kwargs))

    @staticmethod
    async def _make(service: str, kwargs: dict[str, Any]) -> FakeConsul:
        return await FakeConsul(service, **kwargs).start()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def address(self) -> str:
        return self.fake.address

    def register(self, instance_id: str, address: str, *, tags: list[str] | None = None) -> None:
        host, port = address.rsplit(":", 1)
        self.call(self.fake.register(Instance(instance_id, host, int(port), tags=tags or [])))

    def deregister(self, instance_id: str) -> None:
        self.call(self.fake.deregister(instance_id))

    def set_passing(self, instance_id: str, passing: bool) -> None:
        self.call(self.fake.set_passing(instance_id, passing))

    def set_index(self, index: int) -> None:
        self.call(self.fake.set_index(index))

    def stop(self) -> None:
        self.call(self.fake.stop())

    def restart(self) -> None:
        self.call(self.fake.start(self.fake.port))

    def close(self) -> None:
        try:
            self.stop()
            self.call(_cancel_all())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
