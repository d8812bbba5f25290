"""A TCP relay that gives each caller its own source address on loopback (127.0.0.N).

Envoy tells callers apart by their address (it writes it in the trusted client-address
header); every test client connects from 127.0.0.1, and gRPC's Python client cannot pick
its source address. So this relay listens on one port per caller and connects onward
from that caller's own 127.0.0.N (Linux routes all of 127/8 to loopback).

Run as `python -m devtools.relay TARGET N FIRST_HOST`; prints one JSON line
{"ports": [...]} once listening (port i relays from 127.0.0.(FIRST_HOST + i)) and runs
until killed. Its own process: bytes are copied at the protocol level, no coroutine per
chunk, and not on the loop of the measuring test.
"""

from __future__ import annotations

import asyncio
import json
import sys


class _Pipe(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()


_CONNECTING: set[asyncio.Task[None]] = set()


async def _serve(target: tuple[str, int], source: str) -> int:
    loop = asyncio.get_running_loop()

    def accepted() -> _Pipe:
        inbound = _Pipe()

        async def connect() -> None:
            try:
                _, outbound = await loop.create_connection(_Pipe, *target, local_addr=(source, 0))
            except OSError:
                if inbound.transport is not None:
                    inbound.transport.close()
                return
            outbound.peer, inbound.peer = inbound, outbound
            assert outbound.transport is not None
            for data in inbound.pending:
                outbound.transport.write(data)
            inbound.pending.clear()

        task = loop.create_task(connect())
        _CONNECTING.add(task)
        task.add_done_callback(_CONNECTING.discard)
        return inbound

    server = await loop.create_server(accepted, "127.0.0.1", 0)
    return int(server.sockets[0].getsockname()[1])


async def main(target: str, count: int, first_host: int) -> None:
    host, _, port = target.rpartition(":")
    ports = [await _serve((host, int(port)), f"127.0.0.{first_host + i}") for i in range(count)]
    print(json.dumps({"ports": ports}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
