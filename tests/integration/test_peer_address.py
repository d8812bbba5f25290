"""One parser for the caller's address (core.ratelimit.peer_ip / peer_host), for limits
keys and trusted edges alike, fed what grpc 1.85 really gives: real servers listening on
127.0.0.1, [::1] and a unix socket (issue 20 §4: the IPv6 form "ipv6:%5B::1%5D:port" was
not decoded by the edge check, so the default trusted edge ::1/128 never matched)."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aiproxy.core.callinfo import CallInfo
from aiproxy.core.ratelimit import peer_host, peer_ip
from aiproxy.core.settings import load_settings
from aiproxy.interceptors.limits import Limits

METHOD = "/test.Peer/Who"


@pytest.mark.parametrize(
    ("peer", "ip", "host"),
    [
        ("ipv4:127.0.0.1:5555", "127.0.0.1", "127.0.0.1"),
        ("ipv4:10.1.2.3:1", "10.1.2.3", "10.1.2.3"),
        ("ipv6:%5B::1%5D:5555", "::1", "::1"),
        ("ipv6:[::1]:5555", "::1", "::1"),
        ("ipv6:%5B2001:db8::7%5D:443", "2001:db8::7", "2001:db8::/64"),
        ("ipv6:%5B::ffff:10.0.0.1%5D:5", "10.0.0.1", "10.0.0.1"),
        ("ipv6:%5Bfe80::1%25eth0%5D:5", "fe80::1", "fe80::/64"),
        ("unix:/tmp/aiproxy.sock", None, "unix:/tmp/aiproxy.sock"),
        ("unix-abstract:aiproxy", None, "unix-abstract:aiproxy"),
        ("ipv4:not-an-address:1", None, "ipv4:not-an-address:1"),
    ],
)
def test_peer_forms(peer: str, ip: str | None, host: str) -> None:
    assert peer_ip(peer) == (ipaddress.ip_address(ip) if ip else None)
    assert peer_host(peer) == host


def edge_stage() -> Limits:
    return Limits(load_settings().limits)  # default trusted edges: 127.0.0.0/8, ::1/128


@pytest.fixture
async def who() -> AsyncIterator[Any]:
    """Start a real grpc.aio server on `address`; its one method answers what the limits
    stage makes of the caller: its identity, given an x-envoy-external-address."""
    servers: list[grpc.aio.Server] = []
    stage = edge_stage()

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        call = CallInfo(METHOD, metadata=metadata, peer=context.peer())
        stage.key(call)
        return f"{context.peer()} {call.identity}".encode()

    async def start(address: str) -> str:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "test.Peer", {"Who": grpc.unary_unary_rpc_method_handler(answer)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port(address)
        await server.start()
        servers.append(server)
        return address.replace(":0", f":{port}") if not address.startswith("unix:") else address

    yield start
    for server in servers:
        await server.stop(None)


async def ask(target: str, forwarded: str) -> tuple[str, str]:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await channel.unary_unary(METHOD)(
            b"", metadata=(("x-envoy-external-address", forwarded),), timeout=10
        )
    peer, identity = reply.decode().split(" ")
    return peer, identity


async def test_an_edge_on_ipv6_loopback_is_trusted(who: Any) -> None:
    client = f"203.0.113.{random.randrange(1, 255)}"
    peer, identity = await ask(await who("[::1]:0"), client)
    assert peer.startswith("ipv6:")  # grpc 1.85: "ipv6:%5B::1%5D:port"
    assert peer_ip(peer) == ipaddress.ip_address("::1")
    assert identity == f"peer:{client}"


async def test_an_edge_on_ipv4_loopback_is_trusted(who: Any) -> None:
    client = f"2001:db8:{random.randrange(1, 0xFFFF):x}::1"
    peer, identity = await ask(await who("127.0.0.1:0"), client)
    assert peer_ip(peer) == ipaddress.ip_address("127.0.0.1")
    assert identity == f"peer:{ipaddress.IPv6Network((client, 64), strict=False)}"


async def test_a_unix_socket_peer_is_no_edge(who: Any, tmp_path: Any) -> None:
    peer, identity = await ask(await who(f"unix:{tmp_path}/p.sock"), "203.0.113.9")
    assert peer.startswith("unix:") and peer_ip(peer) is None
    assert identity == f"peer:{peer}"  # the header is not believed; the socket keys it
