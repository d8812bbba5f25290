"""A tiny authoritative DNS server for SRV tests (UDP, 127.0.0.1, port 0): answers SRV
queries from `records` with the targets' A records in the additional section, as Consul's
DNS interface does; NXDOMAIN for names it does not know. Runs on its own thread's loop."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import threading
from typing import Any


def _name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


class _Server(asyncio.DatagramProtocol):
    def __init__(self, owner: FakeDns) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | bytes, int]) -> None:
        assert self.transport is not None
        self.owner.queries += 1
        self.transport.sendto(self.owner.answer(data), addr)


class FakeDns:
    def __init__(self) -> None:
        # name -> [(priority, weight, port, target)]; target -> [IPv4]
        self.records: dict[str, list[tuple[int, int, int, str]]] = {}
        self.hosts: dict[str, list[str]] = {}
        self.queries = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._transport: Any = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> int:
        self._transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Server(self), local_addr=("127.0.0.1", 0)
        )
        return int(self._transport.get_extra_info("sockname")[1])

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, instances: list[tuple[str, int]], priority: int = 1) -> None:
        """`name` answers one SRV record per (IP, port), each with its own target name."""
        records = []
        for n, (ip, port) in enumerate(instances):
            target = f"node{n}-{port}.fake.internal"
            self.hosts[target] = [ip]
            records.append((priority, 1, port, target))
        self.records[name] = records

    def answer(self, query: bytes) -> bytes:
        qid = struct.unpack("!H", query[:2])[0]
        labels, offset = [], 12
        while query[offset]:
            length = query[offset]
            labels.append(query[offset + 1 : offset + 1 + length].decode())
            offset += 1 + length
        question = query[12 : offset + 5]
        name = ".".join(labels)
        records = self.records.get(name)
        if records is None:
            return struct.pack("!HHHHHH", qid, 0x8183, 1, 0, 0, 0) + question
        answers, extra = b"", b""
        for priority, weight, port, target in records:
            rdata = struct.pack("!HHH", priority, weight, port) + _name(target)
            answers += b"\xc0\x0c" + struct.pack("!HHIH", 33, 1, 0, len(rdata)) + rdata
            for ip in self.hosts.get(target, []):
                packed = ipaddress.ip_address(ip).packed
                extra += _name(target) + struct.pack("!HHIH", 1, 1, 0, len(packed)) + packed
        n_extra = sum(len(self.hosts.get(r[3], [])) for r in records)
        header = struct.pack("!HHHHHH", qid, 0x8180, 1, len(records), 0, n_extra)
        return header + question + answers + extra

    async def _close_transport(self) -> None:
        self._transport.close()
        await asyncio.sleep(0)

    def close(self) -> None:
        """Stop answering (the nameserver is gone); idempotent."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._close_transport(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
