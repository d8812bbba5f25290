"""HTTP through a real Envoy (`aiproxy envoy`): a small client, SSE parsing, admin waits.

The stdlib http.client is enough: it reads chunked bodies as they arrive, so a test can
take the first SSE event of a stream and then drop the connection.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiproxy.server.edge.admin import host_health
from tests.support.procs import ServiceProcess
from tests.support.waiting import wait_until  # the Envoy tests import it from here too

# One SSE event exactly as the edge frames it: the id line the edge's sse_ids filter adds
# (`id: <seq>` or `id: <stream id>:<seq>`), then one data line of compact JSON.
SSE_EVENT = re.compile(rb"(?:id: ([^\n]*)\n)?data: (\{[^\n]*\})\n\n")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def request(
    address: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    timeout: float = 30.0,
    source: str | None = None,
) -> Reply:
    """One HTTP/1.1 request; the whole body is read (a stream until it ends).

    `headers` as a list of pairs may repeat a name. `source` is the local address to
    connect from (any of 127.0.0.0/8 works on Linux loopback): a caller with its own
    address, as Envoy sees it.
    """
    conn = http.client.HTTPConnection(
        *_split(address), timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        if data is not None and not any(k.lower() == "content-type" for k, _ in pairs):
            pairs.insert(0, ("content-type", "application/json"))
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in pairs:
            conn.putheader(key, value)
        if data is not None:
            conn.putheader("content-length", str(len(data)))
        conn.endheaders(data)
        resp = conn.getresponse()
        payload = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
    finally:
        conn.close()


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """The events of an SSE body; fails unless the body is exactly `data: {json}\\n\\n`*."""
    events = []
    pos = 0
    for match in SSE_EVENT.finditer(body):
        assert match.start() == pos, (
            f"unexpected bytes in the SSE body at {pos}: {body[pos : match.start()]!r}"
        )
        events.append(json.loads(match.group(2)))
        pos = match.end()
    assert pos == len(body), f"trailing bytes in the SSE body: {body[pos:]!r}"
    return events


def sse_ids(body: bytes) -> list[str | None]:
    """The id line of each event of an SSE body (None where an event has none)."""
    return [m.group(1).decode() if m.group(1) else None for m in SSE_EVENT.finditer(body)]


class OpenStream:
    """A streaming request whose events are read one at a time; close() drops it."""

    def __init__(
        self,
        address: str,
        path: str,
        body: Any,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.conn = http.client.HTTPConnection(*_split(address), timeout=timeout)
        self.conn.request(
            "POST",
            path,
            body=json.dumps(body).encode(),
            headers={"content-type": "application/json", **(headers or {})},
        )
        self.resp = self.conn.getresponse()
        self._buffer = b""
        self.last_id: str | None = None  # the id line of the last event read

    def events(self) -> Iterator[dict[str, Any]]:
        while True:
            while b"\n\n" not in self._buffer:
                piece = self.resp.read1(65536)
                if not piece:
                    return
                self._buffer += piece
            raw, self._buffer = self._buffer.split(b"\n\n", 1)
            match = SSE_EVENT.fullmatch(raw + b"\n\n")
            assert match, f"not an SSE data event: {raw!r}"
            self.last_id = match.group(1).decode() if match.group(1) is not None else None
            yield json.loads(match.group(2))

    def close(self) -> None:
        self.conn.close()


def wait_host_health(
    envoy: ServiceProcess, proxy_address: str, healthy: bool, timeout: float = 20.0
) -> None:
    """Wait until Envoy's view of one proxy replica is `healthy`."""
    wait_until(
        lambda: host_health(envoy.ready["admin"]).get(proxy_address) is healthy,
        timeout,
        f"envoy to see {proxy_address} as {'healthy' if healthy else 'unhealthy'}",
    )


def access_logs(envoy: ServiceProcess, request_id: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in envoy.log_events("access")
        if request_id is None or e.get("request_id") == request_id
    ]


def wait_access_log(
    envoy: ServiceProcess, request_id: str, timeout: float = 10.0
) -> dict[str, Any]:
    """Envoy writes the access log line when the request ends; wait for it."""
    return wait_until(
        lambda: next(iter(access_logs(envoy, request_id)), None),
        timeout,
        f"access log of {request_id}",
    )
