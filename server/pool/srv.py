"""DNS SRV discovery: `srv://_SERVICE._PROTO.NAME[?nameserver=HOST:PORT]` as an upstream entry.

The SRV records of the name (what Consul's DNS interface serves for
`_agent._tcp.service.consul`, and Kubernetes for a headless service's named port) give each
instance's target and port; targets are resolved from the answer's additional section when
it carries their A/AAAA records (Consul's does), else with the system resolver. Only the
lowest priority present is used (RFC 2782: higher priorities are fallbacks); weights are
not, since the pool balances by load (balancer.py). The entry is re-resolved every
`upstream.dns_refresh_s` like a DNS name, and a failure keeps the last answer.

The standard library has no SRV lookup: one UDP query to `nameserver` (default: the first
`nameserver` of /etc/resolv.conf, port 53), with a timeout. A truncated answer (TC) is an
error (no TCP retry): SRV sets that large are better served by Consul's HTTP API.
"""

from __future__ import annotations

import asyncio
import ipaddress
import pathlib
import secrets
import socket
import struct
import urllib.parse
from dataclasses import dataclass
from typing import cast

SCHEME = "srv://"
TYPE_A, TYPE_AAAA, TYPE_SRV = 1, 28, 33
RESOLV_CONF = pathlib.Path("/etc/resolv.conf")


def is_srv(entry: str) -> bool:
    return entry.startswith(SCHEME)


def system_nameserver() -> tuple[str, int]:
    try:
        for line in RESOLV_CONF.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1], 53
    except OSError:
        pass
    return "127.0.0.1", 53


@dataclass(frozen=True)
class SrvTarget:
    name: str
    nameserver: tuple[str, int] | None = None

    @classmethod
    def parse(cls, entry: str) -> SrvTarget:
        if not is_srv(entry):
            raise ValueError(f"expected {SCHEME}_service._proto.name, got {entry!r}")
        url = urllib.parse.urlsplit(entry)
        name = (url.netloc + url.path).strip("/").rstrip(".")
        labels = name.split(".")
        if len(labels) < 3 or not labels[0].startswith("_") or not labels[1].startswith("_"):
            raise ValueError(f"expected {SCHEME}_service._proto.name, got {entry!r}")
        query = urllib.parse.parse_qs(url.query)
        unknown = set(query) - {"nameserver"}
        if unknown:
            raise ValueError(f"unknown SRV target parameters {sorted(unknown)} in {entry!r}")
        nameserver = None
        if "nameserver" in query:
            host, _, port = query["nameserver"][-1].rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"nameserver must be HOST:PORT in {entry!r}")
            nameserver = (host.strip("[]"), int(port))
        return cls(name, nameserver)

    @property
    def source(self) -> str:
        return f"srv://{self.name}"


def build_query(name: str, qid: int) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD set, one question
    qname = b"".join(bytes([len(p)]) + p.encode("idna") for p in name.split(".")) + b"\0"
    return header + qname + struct.pack("!HH", TYPE_SRV, 1)


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """A (possibly compressed) domain name at `offset`; returns it and the offset after it."""
    labels: list[str] = []
    end = -1
    for _ in range(128):  # bounded: a pointer loop in a hostile answer ends here
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length == 0:
            return ".".join(labels), (end if end >= 0 else offset + 1)
        labels.append(data[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    raise ValueError("name compression loop")


def parse_answer(
    data: bytes, qid: int
) -> tuple[list[tuple[int, int, int, str]], dict[str, list[str]]]:
    """(SRV records as (priority, weight, port, target), {name: addresses} of the
    additional section)."""
    rid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", data[:12])
    if rid != qid:
        raise ValueError("answer to another query")
    if flags & 0x0200:
        raise ValueError("truncated answer (TC): too many records for UDP")
    rcode = flags & 0x000F
    if rcode == 3:
        return [], {}  # NXDOMAIN: no instance
    if rcode:
        raise ValueError(f"DNS error rcode {rcode}")
    offset = 12
    for _ in range(qd):
        _, offset = _read_name(data, offset)
        offset += 4
    records: list[tuple[int, int, int, str]] = []
    addresses: dict[str, list[str]] = {}
    for index in range(an + ns + ar):
        name, offset = _read_name(data, offset)
        rtype, _cls, _ttl, length = struct.unpack("!HHIH", data[offset : offset + 10])
        offset += 10
        rdata = data[offset : offset + length]
        if index < an and rtype == TYPE_SRV:
            priority, weight, port = struct.unpack("!HHH", rdata[:6])
            target, _ = _read_name(data, offset + 6)
            records.append((priority, weight, port, target.rstrip(".")))
        elif index >= an + ns and rtype in (TYPE_A, TYPE_AAAA):
            ip = str(ipaddress.ip_address(rdata))
            addresses.setdefault(name.rstrip(".").lower(), []).append(ip)
        offset += length
    return records, addresses


class _Query(asyncio.DatagramProtocol):
    def __init__(self, packet: bytes) -> None:
        self.packet = packet
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport is not a DatagramTransport subclass.
        cast(asyncio.DatagramTransport, transport).sendto(self.packet)

    def datagram_received(self, data: bytes, addr: tuple[str | bytes, int]) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def resolve_srv(target: SrvTarget, timeout: float = 2.0) -> list[tuple[str, int]]:
    """(host or IP, port) of every instance at the lowest priority; OSError on failure."""
    nameserver = target.nameserver or system_nameserver()
    qid = secrets.randbelow(65536)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _Query(build_query(target.name, qid)), remote_addr=nameserver
    )
    try:
        data = await asyncio.wait_for(protocol.answer, timeout)
        records, additional = parse_answer(data, qid)
    except (TimeoutError, ValueError, struct.error, IndexError) as exc:
        raise OSError(f"SRV {target.name} via {nameserver[0]}:{nameserver[1]}: {exc}") from exc
    finally:
        transport.close()
    if not records:
        return []
    lowest = min(r[0] for r in records)
    out: list[tuple[str, int]] = []
    for priority, _weight, port, host in records:
        if priority != lowest or host in ("", "."):
            continue
        ips = additional.get(host.lower())
        if not ips:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            ips = sorted({str(info[4][0]) for info in infos})
        out.extend((ip, port) for ip in ips)
    return sorted(set(out))
